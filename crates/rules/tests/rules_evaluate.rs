//! Evaluation against a profile, including three-valued handling of missing values.

#![allow(clippy::unwrap_used)]

mod common;

use clientele_rules::{CompiledRule, Truth, compile};
use common::{Profile, schema};

fn rule(source: &str) -> CompiledRule {
    compile(source, &schema()).unwrap()
}

fn loyal_reader() -> Profile {
    Profile::default()
        .with_feature("recency_days", 12.0)
        .with_feature("orders", 5.0)
        .with_feature("tier", "gold")
        .with_feature("is_subscribed", true)
        .with_category_share("books", 0.7)
        .with_category_share("music", 0.1)
        .with_consent("email")
        .in_segment("active")
}

#[test]
fn example_rule_matches_a_recent_frequent_book_buyer() {
    let rule = rule(r#"recency_days <= 30 and orders >= 3 and category_share("books") > 0.5"#);
    assert!(rule.matches(&loyal_reader()));
    let lapsed = loyal_reader().with_feature("recency_days", 45.0);
    assert!(!rule.matches(&lapsed));
    let music_fan = loyal_reader().with_category_share("books", 0.2);
    assert_eq!(rule.evaluate(&music_fan), Truth::False);
}

#[test]
fn example_rule_with_traits_tiers_and_consent() {
    let rule =
        rule(r#"trait("vip") == true or (tier in ["gold", "vip"] and not consent("email"))"#);
    // No "vip" trait (unknown) or gold but consented to email (false): unknown overall.
    assert_eq!(rule.evaluate(&loyal_reader()), Truth::Unknown);
    let vip = loyal_reader().with_trait("vip", true);
    assert_eq!(rule.evaluate(&vip), Truth::True);
    let not_vip = loyal_reader().with_trait("vip", false);
    assert_eq!(rule.evaluate(&not_vip), Truth::False);
    let mut no_email = loyal_reader().with_trait("vip", false);
    no_email.consents.clear();
    assert_eq!(rule.evaluate(&no_email), Truth::True);
}

#[test]
fn comparison_with_a_missing_feature_is_unknown_and_does_not_match() {
    let profile = Profile::default().with_feature("orders", 5.0);
    assert_eq!(
        rule("recency_days <= 30").evaluate(&profile),
        Truth::Unknown
    );
    assert_eq!(
        rule("recency_days != 30").evaluate(&profile),
        Truth::Unknown
    );
    // `not` of unknown stays unknown: a missing value never qualifies a profile.
    assert_eq!(
        rule("not recency_days <= 30").evaluate(&profile),
        Truth::Unknown
    );
    assert!(!rule("not recency_days <= 30").matches(&profile));
    assert_eq!(
        rule("tier not in ['gold']").evaluate(&profile),
        Truth::Unknown
    );
}

#[test]
fn kleene_logic_lets_known_operands_decide() {
    let profile = Profile::default().with_feature("orders", 5.0);
    assert_eq!(
        rule("recency_days < 30 and orders > 10").evaluate(&profile),
        Truth::False
    );
    assert_eq!(
        rule("recency_days < 30 and orders > 1").evaluate(&profile),
        Truth::Unknown
    );
    assert_eq!(
        rule("recency_days < 30 or orders > 1").evaluate(&profile),
        Truth::True
    );
    assert_eq!(
        rule("recency_days < 30 or orders > 10").evaluate(&profile),
        Truth::Unknown
    );
}

#[test]
fn missing_category_share_is_unknown_but_zero_share_is_known() {
    let rule = rule(r#"category_share("garden") < 0.1"#);
    assert_eq!(rule.evaluate(&loyal_reader()), Truth::Unknown);
    let gardener_never = loyal_reader().with_category_share("garden", 0.0);
    assert_eq!(rule.evaluate(&gardener_never), Truth::True);
}

#[test]
fn nan_feature_values_count_as_missing() {
    let profile = loyal_reader().with_feature("orders", f64::NAN);
    assert_eq!(rule("orders > 1").evaluate(&profile), Truth::Unknown);
    assert_eq!(rule("orders != 1").evaluate(&profile), Truth::Unknown);
}

#[test]
fn undeclared_trait_of_unexpected_type_is_unknown() {
    let rule = rule(r#"trait("age") > 30"#);
    assert_eq!(
        rule.evaluate(&loyal_reader().with_trait("age", 41.0)),
        Truth::True
    );
    assert_eq!(
        rule.evaluate(&loyal_reader().with_trait("age", "41")),
        Truth::Unknown
    );
    assert_eq!(rule.evaluate(&loyal_reader()), Truth::Unknown);
}

#[test]
fn bare_boolean_features_and_traits_are_conditions() {
    assert!(rule("is_subscribed").matches(&loyal_reader()));
    let unsubscribed = loyal_reader().with_feature("is_subscribed", false);
    assert!(rule("not is_subscribed").matches(&unsubscribed));
    let rule = rule(r#"trait("newsletter")"#);
    assert_eq!(
        rule.evaluate(&loyal_reader().with_trait("newsletter", true)),
        Truth::True
    );
    assert_eq!(
        rule.evaluate(&loyal_reader().with_trait("newsletter", "yes")),
        Truth::Unknown
    );
}

#[test]
fn in_and_not_in_test_list_membership() {
    assert!(rule(r#"tier in ["gold", "vip"]"#).matches(&loyal_reader()));
    assert!(!rule(r#"tier in ["silver"]"#).matches(&loyal_reader()));
    assert!(rule(r#"tier not in ["silver", "bronze"]"#).matches(&loyal_reader()));
    assert!(!rule("orders in []").matches(&loyal_reader()));
    assert!(rule("orders in [1, 5, 9]").matches(&loyal_reader()));
    assert!(
        rule(r#"trait("colour") in ["red", 3]"#)
            .matches(&loyal_reader().with_trait("colour", "red"))
    );
    // A dynamic trait compared with items of another type: unknown unless a match is found.
    assert_eq!(
        rule(r#"trait("colour") in [3]"#).evaluate(&loyal_reader().with_trait("colour", "red")),
        Truth::Unknown
    );
}

#[test]
fn string_comparison_is_exact_and_case_sensitive() {
    assert!(rule(r#"tier == "gold""#).matches(&loyal_reader()));
    assert!(!rule(r#"tier == "Gold""#).matches(&loyal_reader()));
    assert!(rule(r#"tier != "Gold""#).matches(&loyal_reader()));
}

#[test]
fn segment_membership_and_consent_are_never_unknown() {
    let nobody = Profile::default();
    assert_eq!(rule(r#"segment("active")"#).evaluate(&nobody), Truth::False);
    assert_eq!(
        rule(r#"not in_segment("active")"#).evaluate(&nobody),
        Truth::True
    );
    assert_eq!(rule(r#"consent("email")"#).evaluate(&nobody), Truth::False);
    assert!(rule(r#"in_segment("active") and consent("email")"#).matches(&loyal_reader()));
}

#[test]
fn conditions_can_be_compared_with_each_other() {
    assert!(rule("(orders > 3) == is_subscribed").matches(&loyal_reader()));
    assert!(rule("(orders > 30) != is_subscribed").matches(&loyal_reader()));
}

#[test]
fn compiled_rules_evaluate_through_a_trait_object() {
    let rule = rule("orders >= 5");
    let profile: &dyn clientele_rules::EvalContext = &loyal_reader();
    assert!(rule.matches(profile));
}

#[test]
fn long_and_chains_evaluate_without_deep_recursion() {
    let source = vec!["orders > 1"; 600].join(" and ");
    assert!(rule(&source).matches(&loyal_reader()));
}
