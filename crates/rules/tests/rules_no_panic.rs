//! Property tests: no input, however malformed, makes parsing, checking or evaluation panic,
//! and reported error positions always lie within the source.

#![allow(clippy::unwrap_used)]

mod common;

use clientele_rules::compile;
use common::{Profile, schema};
use proptest::prelude::*;

/// Fragments that make random strings look like rules, so generated input reaches deep
/// into the parser and checker instead of failing in the lexer.
const FRAGMENTS: &[&str] = &[
    "orders",
    "recency_days",
    "tier",
    "is_subscribed",
    "recncy_days",
    " and ",
    " or ",
    "not ",
    " in ",
    "(",
    ")",
    "[",
    "]",
    ",",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "3",
    "-0.5",
    "1e3",
    "\"gold\"",
    "'vip'",
    "true",
    "false",
    "category_share(",
    "trait(",
    "consent(",
    "segment(",
    "\"books\"",
    "\"",
    "\\",
    "é",
    "\n",
    " ",
];

fn rule_like() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 0..40).prop_map(|parts| parts.concat())
}

fn check_never_panics(source: &str) {
    match compile(source, &schema()) {
        Ok(rule) => {
            let _ = rule.evaluate(&Profile::default());
            let _ = rule.evaluate(
                &Profile::default()
                    .with_feature("orders", 3.0)
                    .with_feature("tier", "gold")
                    .with_trait("vip", "not a bool"),
            );
        }
        Err(error) => {
            assert!(error.span.start <= source.len(), "{error:?} for {source:?}");
            assert!(error.span.end <= source.len(), "{error:?} for {source:?}");
            assert!(
                error.span.start <= error.span.end,
                "{error:?} for {source:?}"
            );
            assert!(error.position.line >= 1 && error.position.column >= 1);
            assert!(!error.to_string().is_empty());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_text_never_panics(source in any::<String>()) {
        check_never_panics(&source);
    }

    #[test]
    fn rule_like_text_never_panics(source in rule_like()) {
        check_never_panics(&source);
    }
}

#[test]
fn pathological_inputs_never_panic() {
    for source in [
        "(".repeat(100_000),
        "not ".repeat(4_000),
        "[".repeat(5_000),
        format!("orders in [{}]", "1,".repeat(5_000)),
        "category_share(".repeat(3_000),
        "-".repeat(1_000),
        "\"".to_string(),
        "'\\".to_string(),
        "\u{0}".to_string(),
        "1e".to_string(),
        "99999999999999999999999999999999999999".to_string(),
    ] {
        check_never_panics(&source);
    }
}
