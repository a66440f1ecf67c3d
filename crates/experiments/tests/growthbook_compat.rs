//! Bit-compatibility of `assignment` with GrowthBook's SDK algorithm.
//!
//! Two sources of truth:
//! * `data/growthbook_cases.json`: GrowthBook's own cross-SDK cases (MIT,
//!   credited in the file);
//! * the constants below: produced by running GrowthBook's JS functions
//!   (`hashFnv32a`, `hash`, `getBucketRanges`, `chooseVariation`,
//!   `inNamespace` and the bucketing part of `_run`) under Node.js, with ids
//!   chosen to exercise UTF-16: Hangul, BMP accents, emoji and CJK extension
//!   B characters that are surrogate pairs, and an embedded NUL. See
//!   `reference/README.md` for how to regenerate them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::float_cmp)]

use clientele_experiments::assignment::{
    Assignment, BucketRange, Exclusion, ExperimentSpec, HashVersion, NamespaceRange,
    assign_variant, bucket_ranges, choose_variant, fnv1a32_utf16, hash, in_namespace,
};
use serde_json::Value;

/// `(string, hashFnv32a(string))` from GrowthBook's JS algorithm.
const FNV_REFERENCE: &[(&str, u32)] = &[
    ("", 2166136261),
    ("user-1", 4115888500),
    ("123", 1916298011),
    ("고객-42", 1939560215),
    ("김민준", 1919729371),
    ("😀", 3409036472),
    ("user-😀-🚀", 803874858),
    ("naïve café", 1987337365),
    ("𠜎𠜱", 1286823484),
    ("a\0b", 284404690),
];

/// `(seed, id, version, hash(seed, id, version))` from GrowthBook's JS algorithm.
const HASH_REFERENCE: &[(&str, &str, u32, f64)] = &[
    ("", "user-1", 1, 0.5),
    ("", "user-1", 2, 0.8703),
    ("", "123", 1, 0.011),
    ("", "123", 2, 0.4547),
    ("", "고객-42", 1, 0.215),
    ("", "고객-42", 2, 0.9184),
    ("", "김민준", 1, 0.371),
    ("", "김민준", 2, 0.2092),
    ("", "😀", 1, 0.472),
    ("", "😀", 2, 0.4971),
    ("", "user-😀-🚀", 1, 0.858),
    ("", "user-😀-🚀", 2, 0.469),
    ("", "naïve café", 1, 0.365),
    ("", "naïve café", 2, 0.5639),
    ("", "𠜎𠜱", 1, 0.484),
    ("", "𠜎𠜱", 2, 0.5221),
    ("", "a\0b", 1, 0.69),
    ("", "a\0b", 2, 0.103),
    ("checkout-redesign", "user-1", 1, 0.448),
    ("checkout-redesign", "user-1", 2, 0.2855),
    ("checkout-redesign", "123", 1, 0.889),
    ("checkout-redesign", "123", 2, 0.5842),
    ("checkout-redesign", "고객-42", 1, 0.245),
    ("checkout-redesign", "고객-42", 2, 0.0347),
    ("checkout-redesign", "김민준", 1, 0.705),
    ("checkout-redesign", "김민준", 2, 0.9935),
    ("checkout-redesign", "😀", 1, 0.692),
    ("checkout-redesign", "😀", 2, 0.0065),
    ("checkout-redesign", "user-😀-🚀", 1, 0.562),
    ("checkout-redesign", "user-😀-🚀", 2, 0.5086),
    ("checkout-redesign", "naïve café", 1, 0.639),
    ("checkout-redesign", "naïve café", 2, 0.4988),
    ("checkout-redesign", "𠜎𠜱", 1, 0.136),
    ("checkout-redesign", "𠜎𠜱", 2, 0.9739),
    ("checkout-redesign", "a\0b", 1, 0.234),
    ("checkout-redesign", "a\0b", 2, 0.367),
    ("실험-1", "user-1", 1, 0.026),
    ("실험-1", "user-1", 2, 0.7106),
    ("실험-1", "123", 1, 0.765),
    ("실험-1", "123", 2, 0.5927),
    ("실험-1", "고객-42", 1, 0.977),
    ("실험-1", "고객-42", 2, 0.2349),
    ("실험-1", "김민준", 1, 0.285),
    ("실험-1", "김민준", 2, 0.9561),
    ("실험-1", "😀", 1, 0.974),
    ("실험-1", "😀", 2, 0.9781),
    ("실험-1", "user-😀-🚀", 1, 0.52),
    ("실험-1", "user-😀-🚀", 2, 0.8859),
    ("실험-1", "naïve café", 1, 0.463),
    ("실험-1", "naïve café", 2, 0.8581),
    ("실험-1", "𠜎𠜱", 1, 0.93),
    ("실험-1", "𠜎𠜱", 2, 0.5713),
    ("실험-1", "a\0b", 1, 0.272),
    ("실험-1", "a\0b", 2, 0.9471),
    ("🎯", "user-1", 1, 0.565),
    ("🎯", "user-1", 2, 0.1564),
    ("🎯", "123", 1, 0.542),
    ("🎯", "123", 2, 0.5272),
    ("🎯", "고객-42", 1, 0.442),
    ("🎯", "고객-42", 2, 0.2746),
    ("🎯", "김민준", 1, 0.006),
    ("🎯", "김민준", 2, 0.0718),
    ("🎯", "😀", 1, 0.817),
    ("🎯", "😀", 2, 0.6019),
    ("🎯", "user-😀-🚀", 1, 0.799),
    ("🎯", "user-😀-🚀", 2, 0.9196),
    ("🎯", "naïve café", 1, 0.54),
    ("🎯", "naïve café", 2, 0.2755),
    ("🎯", "𠜎𠜱", 1, 0.445),
    ("🎯", "𠜎𠜱", 2, 0.5543),
    ("🎯", "a\0b", 1, 0.903),
    ("🎯", "a\0b", 2, 0.4754),
];

// even2_v1: {"key":"checkout-redesign","variations":2}
const EVEN2_V1: &[(&str, Option<usize>)] = &[
    ("user-1", Some(0)),
    ("user-2", Some(1)),
    ("user-3", Some(1)),
    ("user-4", Some(1)),
    ("user-5", Some(1)),
    ("고객-42", Some(0)),
    ("김민준", Some(1)),
    ("😀", Some(1)),
    ("user-😀-🚀", Some(1)),
    ("𠜎𠜱", Some(0)),
    ("naïve café", Some(1)),
    ("x", Some(1)),
    ("", None),
];
// even3_v2: {"key":"checkout-redesign","variations":3,"hashVersion":2}
const EVEN3_V2: &[(&str, Option<usize>)] = &[
    ("user-1", Some(0)),
    ("user-2", Some(1)),
    ("user-3", Some(1)),
    ("user-4", Some(2)),
    ("user-5", Some(1)),
    ("고객-42", Some(0)),
    ("김민준", Some(2)),
    ("😀", Some(0)),
    ("user-😀-🚀", Some(1)),
    ("𠜎𠜱", Some(2)),
    ("naïve café", Some(1)),
    ("x", Some(0)),
    ("", None),
];
// uneven_v2: {"key":"loyalty-tiers","variations":3,"hashVersion":2,"weights":[0.5,0.3,0.2]}
const UNEVEN_V2: &[(&str, Option<usize>)] = &[
    ("user-1", Some(0)),
    ("user-2", Some(1)),
    ("user-3", Some(2)),
    ("user-4", Some(2)),
    ("user-5", Some(1)),
    ("고객-42", Some(0)),
    ("김민준", Some(1)),
    ("😀", Some(0)),
    ("user-😀-🚀", Some(1)),
    ("𠜎𠜱", Some(0)),
    ("naïve café", Some(0)),
    ("x", Some(2)),
    ("", None),
];
// coverage_v2: {"key":"loyalty-tiers","seed":"tiers-seed","variations":2,"hashVersion":2,"weights":[0.2,0.8],"coverage":0.4}
const COVERAGE_V2: &[(&str, Option<usize>)] = &[
    ("user-1", None),
    ("user-2", None),
    ("user-3", Some(1)),
    ("user-4", Some(1)),
    ("user-5", None),
    ("고객-42", Some(1)),
    ("김민준", None),
    ("😀", Some(1)),
    ("user-😀-🚀", Some(1)),
    ("𠜎𠜱", None),
    ("naïve café", None),
    ("x", None),
    ("", None),
];
// namespace_v1: {"key":"points-banner","variations":2,"namespace":["promo",0.25,0.75]}
const NAMESPACE_V1: &[(&str, Option<usize>)] = &[
    ("user-1", Some(1)),
    ("user-2", None),
    ("user-3", None),
    ("user-4", None),
    ("user-5", None),
    ("고객-42", None),
    ("김민준", Some(1)),
    ("😀", None),
    ("user-😀-🚀", None),
    ("𠜎𠜱", None),
    ("naïve café", Some(1)),
    ("x", Some(0)),
    ("", None),
];
// namespace_v2_cov: {"key":"points-banner","variations":4,"hashVersion":2,"coverage":0.7,"namespace":["promo",0,0.5]}
const NAMESPACE_V2_COV: &[(&str, Option<usize>)] = &[
    ("user-1", None),
    ("user-2", None),
    ("user-3", None),
    ("user-4", Some(2)),
    ("user-5", None),
    ("고객-42", None),
    ("김민준", Some(3)),
    ("😀", None),
    ("user-😀-🚀", Some(1)),
    ("𠜎𠜱", None),
    ("naïve café", None),
    ("x", Some(0)),
    ("", None),
];
const NAMESPACE_REFERENCE: &[(&str, &str, f64, f64, bool)] = &[
    ("user-1", "promo", 0.25, 0.75, true),
    ("user-1", "점수", 0.00, 0.50, true),
    ("user-2", "promo", 0.25, 0.75, false),
    ("user-2", "점수", 0.00, 0.50, false),
    ("user-3", "promo", 0.25, 0.75, false),
    ("user-3", "점수", 0.00, 0.50, true),
    ("user-4", "promo", 0.25, 0.75, false),
    ("user-4", "점수", 0.00, 0.50, false),
    ("user-5", "promo", 0.25, 0.75, false),
    ("user-5", "점수", 0.00, 0.50, false),
    ("고객-42", "promo", 0.25, 0.75, false),
    ("고객-42", "점수", 0.00, 0.50, false),
    ("김민준", "promo", 0.25, 0.75, true),
    ("김민준", "점수", 0.00, 0.50, false),
    ("😀", "promo", 0.25, 0.75, false),
    ("😀", "점수", 0.00, 0.50, true),
    ("user-😀-🚀", "promo", 0.25, 0.75, false),
    ("user-😀-🚀", "점수", 0.00, 0.50, true),
    ("𠜎𠜱", "promo", 0.25, 0.75, false),
    ("𠜎𠜱", "점수", 0.00, 0.50, true),
    ("naïve café", "promo", 0.25, 0.75, true),
    ("naïve café", "점수", 0.00, 0.50, false),
    ("x", "promo", 0.25, 0.75, true),
    ("x", "점수", 0.00, 0.50, true),
];

fn assert_matches_js(spec: &ExperimentSpec, reference: &[(&str, Option<usize>)]) {
    spec.validate().expect("reference specs are valid");
    for &(unit, expected) in reference {
        assert_eq!(
            assign_variant(spec, unit).variant(),
            expected,
            "experiment {} unit {unit:?}",
            spec.key
        );
    }
}

#[test]
fn fnv1a_matches_js_char_code_at_hashing() {
    for &(s, expected) in FNV_REFERENCE {
        assert_eq!(fnv1a32_utf16(&[s]), expected, "{s:?}");
    }
}

#[test]
fn ascii_ids_hash_like_growthbook_js() {
    for &(seed, id, version, expected) in HASH_REFERENCE
        .iter()
        .filter(|r| r.0.is_ascii() && r.1.is_ascii())
    {
        assert_eq!(
            hash(seed, id, version),
            Some(expected),
            "{seed:?} {id:?} v{version}"
        );
    }
}

#[test]
fn korean_ids_hash_like_growthbook_js() {
    let korean = |s: &str| s.chars().any(|c| ('\u{AC00}'..='\u{D7A3}').contains(&c));
    let mut checked = 0;
    for &(seed, id, version, expected) in
        HASH_REFERENCE.iter().filter(|r| korean(r.0) || korean(r.1))
    {
        assert_eq!(
            hash(seed, id, version),
            Some(expected),
            "{seed:?} {id:?} v{version}"
        );
        checked += 1;
    }
    assert!(checked >= 16);
}

#[test]
fn surrogate_pair_ids_hash_like_growthbook_js() {
    let astral = |s: &str| s.chars().any(|c| u32::from(c) > 0xFFFF);
    let mut checked = 0;
    for &(seed, id, version, expected) in
        HASH_REFERENCE.iter().filter(|r| astral(r.0) || astral(r.1))
    {
        assert_eq!(
            hash(seed, id, version),
            Some(expected),
            "{seed:?} {id:?} v{version}"
        );
        checked += 1;
    }
    assert!(checked >= 24);
}

#[test]
fn every_reference_hash_matches_in_both_versions() {
    for &(seed, id, version, expected) in HASH_REFERENCE {
        let typed = if version == 1 {
            HashVersion::V1
        } else {
            HashVersion::V2
        };
        assert_eq!(
            clientele_experiments::assignment::bucket(seed, id, typed),
            expected
        );
    }
}

#[test]
fn unknown_hash_version_yields_none() {
    assert_eq!(hash("abc", "def", 99), None);
    assert_eq!(hash("abc", "def", 0), None);
}

#[test]
fn even_split_v1_assigns_like_growthbook_js() {
    let mut spec = ExperimentSpec::equal_split("checkout-redesign", 2);
    spec.hash_version = HashVersion::V1;
    assert_matches_js(&spec, EVEN2_V1);
}

#[test]
fn three_way_split_v2_assigns_like_growthbook_js() {
    assert_matches_js(
        &ExperimentSpec::equal_split("checkout-redesign", 3),
        EVEN3_V2,
    );
}

#[test]
fn uneven_weights_assign_like_growthbook_js() {
    assert_matches_js(
        &ExperimentSpec::new("loyalty-tiers", vec![0.5, 0.3, 0.2]),
        UNEVEN_V2,
    );
}

#[test]
fn explicit_seed_and_partial_coverage_assign_like_growthbook_js() {
    let spec = ExperimentSpec {
        seed: Some("tiers-seed".into()),
        coverage: 0.4,
        ..ExperimentSpec::new("loyalty-tiers", vec![0.2, 0.8])
    };
    assert_matches_js(&spec, COVERAGE_V2);
    assert_eq!(
        assign_variant(&spec, "user-1"),
        Assignment::NotInExperiment(Exclusion::OutsideCoverage)
    );
}

#[test]
fn namespace_v1_assigns_like_growthbook_js() {
    let spec = ExperimentSpec {
        hash_version: HashVersion::V1,
        namespace: Some(NamespaceRange {
            id: "promo".into(),
            start: 0.25,
            end: 0.75,
        }),
        ..ExperimentSpec::equal_split("points-banner", 2)
    };
    assert_matches_js(&spec, NAMESPACE_V1);
    assert_eq!(
        assign_variant(&spec, "user-2"),
        Assignment::NotInExperiment(Exclusion::OutsideNamespace)
    );
}

#[test]
fn namespace_with_coverage_v2_assigns_like_growthbook_js() {
    let spec = ExperimentSpec {
        coverage: 0.7,
        namespace: Some(NamespaceRange {
            id: "promo".into(),
            start: 0.0,
            end: 0.5,
        }),
        ..ExperimentSpec::equal_split("points-banner", 4)
    };
    assert_matches_js(&spec, NAMESPACE_V2_COV);
}

#[test]
fn empty_unit_id_is_not_in_experiment() {
    let spec = ExperimentSpec::equal_split("k", 2);
    assert_eq!(
        assign_variant(&spec, ""),
        Assignment::NotInExperiment(Exclusion::EmptyUnitId)
    );
}

#[test]
fn namespace_membership_matches_growthbook_js() {
    for &(unit, ns, start, end, expected) in NAMESPACE_REFERENCE {
        assert_eq!(
            in_namespace(unit, (ns, start, end)),
            expected,
            "{unit:?} in {ns:?}"
        );
    }
}

#[test]
fn bucket_ranges_are_bit_identical_to_js_floats() {
    // JS: getBucketRanges(3, 0.7, [0.1, 0.2, 0.7]) — float rounding included.
    let ranges = bucket_ranges(3, 0.7, Some(&[0.1, 0.2, 0.7]));
    let expected = [
        (0.0, 0.069_999_999_999_999_99),
        (0.1, 0.24),
        (0.300_000_000_000_000_04, 0.79),
    ];
    for (r, (start, end)) in ranges.iter().zip(expected) {
        assert_eq!((r.start, r.end), (start, end));
    }
    let ranges = bucket_ranges(3, 0.2, Some(&[0.2, 0.3, 0.5]));
    assert_eq!(ranges[0].end, 0.040_000_000_000_000_01);
}

fn growthbook_cases() -> Value {
    serde_json::from_str(include_str!("data/growthbook_cases.json")).expect("valid JSON")
}

fn as_ranges(v: &Value) -> Vec<BucketRange> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| BucketRange {
            start: r[0].as_f64().unwrap(),
            end: r[1].as_f64().unwrap(),
        })
        .collect()
}

#[test]
fn growthbook_spec_hash_cases_pass() {
    let cases = growthbook_cases();
    for case in cases["hash"].as_array().unwrap() {
        let seed = case[0].as_str().unwrap();
        let value = case[1].as_str().unwrap();
        let version = u32::try_from(case[2].as_u64().unwrap()).unwrap();
        let expected = case[3].as_f64();
        assert_eq!(hash(seed, value, version), expected, "{case}");
    }
}

#[test]
fn growthbook_spec_bucket_range_cases_pass() {
    let cases = growthbook_cases();
    for case in cases["getBucketRange"].as_array().unwrap() {
        let args = &case[1];
        let n = usize::try_from(args[0].as_u64().unwrap()).unwrap();
        let coverage = args[1].as_f64().unwrap();
        let weights: Option<Vec<f64>> = args[2]
            .as_array()
            .map(|w| w.iter().map(|x| x.as_f64().unwrap()).collect());
        let actual = bucket_ranges(n, coverage, weights.as_deref());
        let expected = as_ranges(&case[2]);
        assert_eq!(actual.len(), expected.len(), "{}", case[0]);
        for (a, e) in actual.iter().zip(&expected) {
            // The JSON spells rounded decimals (0.04) where JS computes
            // 0.04000000000000001; GrowthBook's own runners compare loosely.
            assert!(
                (a.start - e.start).abs() < 1e-9 && (a.end - e.end).abs() < 1e-9,
                "{}: {a:?} vs {e:?}",
                case[0]
            );
        }
    }
}

#[test]
fn growthbook_spec_choose_variation_cases_pass() {
    let cases = growthbook_cases();
    for case in cases["chooseVariation"].as_array().unwrap() {
        let n = case[1].as_f64().unwrap();
        let ranges = as_ranges(&case[2]);
        let expected = case[3].as_i64().unwrap();
        let actual = choose_variant(n, &ranges).map_or(-1, |i| i64::try_from(i).unwrap());
        assert_eq!(actual, expected, "{}", case[0]);
    }
}

#[test]
fn growthbook_spec_in_namespace_cases_pass() {
    let cases = growthbook_cases();
    for case in cases["inNamespace"].as_array().unwrap() {
        let unit = case[1].as_str().unwrap();
        let ns = &case[2];
        let range = (
            ns[0].as_str().unwrap(),
            ns[1].as_f64().unwrap(),
            ns[2].as_f64().unwrap(),
        );
        assert_eq!(
            in_namespace(unit, range),
            case[3].as_bool().unwrap(),
            "{}",
            case[0]
        );
    }
}
