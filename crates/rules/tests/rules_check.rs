//! Checking against a schema: unknown names with suggestions, arity, and type errors, each
//! reported at the right position.

#![allow(clippy::unwrap_used)]

mod common;

use clientele_rules::{Position, RuleError, RuleErrorKind, Schema, compile};
use common::schema;

fn check_error(source: &str) -> RuleError {
    compile(source, &schema()).unwrap_err()
}

#[test]
fn example_rules_check_against_the_schema() {
    for source in [
        r#"recency_days <= 30 and orders >= 3 and category_share("books") > 0.5"#,
        r#"trait("vip") == true or (tier in ["gold", "vip"] and not consent("email"))"#,
        r#"is_subscribed and not segment("churned") and in_segment("active")"#,
        r#"trait("favourite_colour") == "red" or trait("age") > 30"#,
        r#"(orders > 3) == is_subscribed"#,
    ] {
        compile(source, &schema()).unwrap();
    }
}

#[test]
fn unknown_feature_suggests_the_closest_declared_name() {
    let error = check_error("recncy_days <= 30");
    assert_eq!(error.kind, RuleErrorKind::UnknownFeature);
    assert_eq!(error.span.start, 0);
    assert_eq!(
        error.to_string(),
        r#"unknown feature "recncy_days" at 1:1; did you mean "recency_days"?"#
    );
}

#[test]
fn unknown_feature_without_a_close_match_has_no_suggestion() {
    let error = check_error("orders > 1 and\nlifetime_margin > 3");
    assert_eq!(error.position, Position { line: 2, column: 1 });
    assert_eq!(error.suggestion, None);
    assert_eq!(
        error.to_string(),
        r#"unknown feature "lifetime_margin" at 2:1"#
    );
}

#[test]
fn unknown_function_suggests_a_known_one() {
    let error = check_error(r#"orders > 1 and category_shar("books") > 0.5"#);
    assert_eq!(error.kind, RuleErrorKind::UnknownFunction);
    assert_eq!(error.span.start, 15);
    assert_eq!(error.suggestion.as_deref(), Some("category_share"));
}

#[test]
fn function_used_as_a_feature_gets_a_hint() {
    let error = check_error("consent");
    assert_eq!(error.kind, RuleErrorKind::UnknownFeature);
    assert!(error.message.contains("is a function"), "{error}");
}

#[test]
fn wrong_arity_is_reported_at_the_call() {
    let error = check_error(r#"orders > 1 and consent("email", "sms")"#);
    assert_eq!(error.kind, RuleErrorKind::BadArguments);
    assert_eq!(error.span.start, 15);
    assert!(error.message.contains("takes 1 argument, got 2"), "{error}");
    assert_eq!(check_error("consent()").kind, RuleErrorKind::BadArguments);
}

#[test]
fn function_arguments_must_be_string_literals() {
    let error = check_error("category_share(tier) > 0.5");
    assert_eq!(error.kind, RuleErrorKind::BadArguments);
    assert_eq!(error.span.start, 15);
    assert!(error.message.contains("must be a quoted string"), "{error}");
}

#[test]
fn comparing_a_string_with_a_number_is_a_type_error() {
    let error = check_error(r#"orders >= 3 and tier == 3"#);
    assert_eq!(error.kind, RuleErrorKind::Type);
    assert_eq!(error.span.start, 16);
    assert_eq!(
        error.to_string(),
        "cannot compare `tier` (a string) with `3` (a number) at 1:17"
    );
}

#[test]
fn ordering_strings_or_booleans_is_a_type_error() {
    let error = check_error(r#"tier > "gold""#);
    assert_eq!(error.kind, RuleErrorKind::Type);
    assert_eq!(error.span.start, 0);
    assert!(error.message.contains("compares numbers"), "{error}");
    let error = check_error("orders < is_subscribed");
    assert_eq!(error.span.start, 9);
}

#[test]
fn a_number_is_not_a_condition() {
    let error = check_error("orders and is_subscribed");
    assert_eq!(error.kind, RuleErrorKind::Type);
    assert!(
        error.message.contains("compare it, e.g. `orders > 0`"),
        "{error}"
    );
    assert_eq!(check_error("not tier").kind, RuleErrorKind::Type);
    assert_eq!(
        check_error(r#"category_share("books")"#).kind,
        RuleErrorKind::Type
    );
}

#[test]
fn declared_trait_types_are_enforced() {
    let error = check_error(r#"trait("vip") == "yes""#);
    assert_eq!(error.kind, RuleErrorKind::Type);
}

#[test]
fn in_list_items_must_match_the_operand_type() {
    let error = check_error(r#"tier in ["gold", 3]"#);
    assert_eq!(error.kind, RuleErrorKind::Type);
    assert_eq!(error.span.start, 17);
    let error = check_error("orders in [1, orders]");
    assert!(error.message.contains("literal values"), "{error}");
}

#[test]
fn consent_purposes_and_segments_are_validated_when_declared() {
    let schema = schema()
        .with_consent_purposes(["email", "sms"])
        .with_segments(["churned", "active"]);
    let error = compile(r#"consent("emial")"#, &schema).unwrap_err();
    assert_eq!(error.kind, RuleErrorKind::UnknownName);
    assert_eq!(error.span.start, 8);
    assert_eq!(error.suggestion.as_deref(), Some("email"));
    let error = compile(r#"segment("vips")"#, &schema).unwrap_err();
    assert_eq!(error.kind, RuleErrorKind::UnknownName);
    compile(r#"consent("sms") and segment("active")"#, &schema).unwrap();
}

#[test]
fn compiled_rule_reports_what_it_reads() {
    let rule = compile(
        r#"orders > 1 and (tier == "gold" or orders > 9) and segment("active")"#,
        &schema(),
    )
    .unwrap();
    let features: Vec<&str> = rule
        .referenced_features()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(features, ["orders", "tier"]);
    let segments: Vec<&str> = rule
        .referenced_segments()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(segments, ["active"]);
    assert_eq!(
        rule.source(),
        r#"orders > 1 and (tier == "gold" or orders > 9) and segment("active")"#
    );
}

#[test]
fn an_empty_schema_knows_no_features() {
    let error = compile("orders > 1", &Schema::new()).unwrap_err();
    assert_eq!(error.kind, RuleErrorKind::UnknownFeature);
}
