//! Reproduces the published CDNOW results for the BG/NBD and Gamma-Gamma models and checks
//! predictions against the Python `lifetimes` library (0.11.3).
//!
//! Fixtures: `tests/data/cdnow/` (see its README for source and licence). The reference
//! numbers below were computed once with `lifetimes` 0.11.3 (numpy/scipy) at the fixed
//! parameter values in [`reference_bgnbd`] / [`reference_gamma_gamma`] — the `lifetimes`
//! fit rounded to 7 decimals — and hard-coded because CI has no Python.

#![allow(clippy::unwrap_used)]

use clientele_segmentation::clv::{
    BgNbd, ClvHorizon, FitOptions, GammaGamma, PurchaseHistory, SpendHistory, TimeUnit,
    customer_lifetime_value,
};

const CDNOW_SUMMARY: &str = include_str!("data/cdnow/cdnow_customers_summary.csv");
const CDNOW_WITH_VALUE: &str =
    include_str!("data/cdnow/cdnow_customers_summary_with_transactions.csv");

/// Rows of a numeric CSV with a header, as `f64` columns.
fn csv_rows(text: &str) -> Vec<Vec<f64>> {
    text.lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            line.split(',')
                .map(|field| field.trim().parse::<f64>().unwrap())
                .collect()
        })
        .collect()
}

/// `ID, frequency, recency, T` in weeks.
fn cdnow_purchase_histories() -> Vec<PurchaseHistory> {
    csv_rows(CDNOW_SUMMARY)
        .iter()
        .map(|row| PurchaseHistory {
            frequency: row[1] as u32,
            recency: row[2],
            age: row[3],
        })
        .collect()
}

/// `ID, x, t_x, T, zbar` in weeks and dollars; repeat customers only.
fn cdnow_repeat_spend() -> Vec<SpendHistory> {
    csv_rows(CDNOW_WITH_VALUE)
        .iter()
        .filter(|row| row[1] > 0.0)
        .map(|row| SpendHistory {
            frequency: row[1] as u32,
            average_order_value: row[4],
        })
        .collect()
}

fn reference_bgnbd() -> BgNbd {
    BgNbd::new(0.2425932, 4.4135316, 0.7928862, 2.4257520).unwrap()
}

fn reference_gamma_gamma() -> GammaGamma {
    GammaGamma::new(6.2488023, 3.7445876, 15.4477478).unwrap()
}

fn relative_error(actual: f64, expected: f64) -> f64 {
    ((actual - expected) / expected).abs()
}

fn assert_close(actual: f64, expected: f64, tolerance: f64, what: &str) {
    let error = relative_error(actual, expected);
    assert!(
        error <= tolerance,
        "{what}: got {actual}, expected {expected} (relative error {error:e} > {tolerance:e})"
    );
}

fn history(frequency: u32, recency: f64, age: f64) -> PurchaseHistory {
    PurchaseHistory {
        frequency,
        recency,
        age,
    }
}

#[test]
fn cdnow_fixtures_have_the_documented_customer_counts() {
    assert_eq!(cdnow_purchase_histories().len(), 2357);
    assert_eq!(csv_rows(CDNOW_WITH_VALUE).len(), 2357);
    assert_eq!(cdnow_repeat_spend().len(), 946);
}

#[test]
fn bgnbd_fit_reproduces_published_cdnow_parameters() {
    let fit = BgNbd::fit(&cdnow_purchase_histories(), &FitOptions::default()).unwrap();
    let model = fit.model;
    // Fader, Hardie & Lee (2005), Marketing Science 24(2), p. 279.
    assert_close(model.r, 0.243, 0.01, "r");
    assert_close(model.alpha, 4.414, 0.01, "alpha");
    assert_close(model.a, 0.793, 0.01, "a");
    assert_close(model.b, 2.426, 0.01, "b");
    // lifetimes 0.11.3 (BFGS with exact gradients) finds the same optimum to ~1e-5.
    assert_close(model.r, 0.24259292827982148, 1e-4, "r vs lifetimes");
    assert_close(model.alpha, 4.413532265271809, 1e-4, "alpha vs lifetimes");
    assert_close(model.a, 0.7928859664406578, 1e-4, "a vs lifetimes");
    assert_close(model.b, 2.4257523826257374, 1e-4, "b vs lifetimes");
    // The paper's maximised log-likelihood is −9582.4 over the 2357 customers.
    assert_close(
        fit.mean_log_likelihood * 2357.0,
        -9582.4,
        1e-5,
        "total log-likelihood",
    );
}

#[test]
fn gamma_gamma_fit_reproduces_published_cdnow_parameters() {
    let fit = GammaGamma::fit(&cdnow_repeat_spend(), &FitOptions::default()).unwrap();
    let model = fit.model;
    // Fader, Hardie & Lee (2005), JMR 42(4); Hardie's note 025.
    assert_close(model.p, 6.25, 0.01, "p");
    assert_close(model.q, 3.74, 0.01, "q");
    assert_close(model.v, 15.44, 0.01, "v");
    assert_close(model.p, 6.24880249607099, 1e-4, "p vs lifetimes");
    assert_close(model.q, 3.7445884609237634, 1e-4, "q vs lifetimes");
    assert_close(model.v, 15.447748064943575, 1e-4, "v vs lifetimes");
}

#[test]
fn gamma_gamma_fit_is_equivariant_to_the_money_unit() {
    let dollars = GammaGamma::fit(&cdnow_repeat_spend(), &FitOptions::default()).unwrap();
    let cents: Vec<SpendHistory> = cdnow_repeat_spend()
        .into_iter()
        .map(|c| SpendHistory {
            average_order_value: c.average_order_value * 100.0,
            ..c
        })
        .collect();
    let cents = GammaGamma::fit(&cents, &FitOptions::default()).unwrap();
    assert_close(cents.model.p, dollars.model.p, 1e-5, "p");
    assert_close(cents.model.q, dollars.model.q, 1e-5, "q");
    assert_close(cents.model.v, dollars.model.v * 100.0, 1e-5, "v");
}

#[test]
fn bgnbd_penalizer_shrinks_parameters() {
    let options = FitOptions {
        penalizer: 0.1,
        ..FitOptions::default()
    };
    let plain = BgNbd::fit(&cdnow_purchase_histories(), &FitOptions::default()).unwrap();
    let penalised = BgNbd::fit(&cdnow_purchase_histories(), &options).unwrap();
    assert!(penalised.model.b < plain.model.b);
    assert!(penalised.mean_log_likelihood < plain.mean_log_likelihood);
}

#[test]
fn bgnbd_log_likelihood_matches_lifetimes() {
    let model = reference_bgnbd();
    let histories = cdnow_purchase_histories();
    let mean: f64 = histories
        .iter()
        .map(|h| model.log_likelihood(h))
        .sum::<f64>()
        / histories.len() as f64;
    assert_close(mean, -4.065517844958872, 1e-10, "mean log-likelihood");
}

#[test]
fn gamma_gamma_log_likelihood_matches_lifetimes() {
    let model = reference_gamma_gamma();
    let spend = cdnow_repeat_spend();
    let mean: f64 = spend.iter().map(|c| model.log_likelihood(c)).sum::<f64>() / spend.len() as f64;
    assert_close(mean, -4.287445289115139, 1e-10, "mean log-likelihood");
}

/// `(frequency, recency, T)`, P(alive), and expected purchases in the next 1, 39, 52 and
/// 520 weeks, from `lifetimes`' `conditional_probability_alive` and
/// `conditional_expected_number_of_purchases_up_to_time`.
struct ConditionalReference {
    /// `(frequency, recency, T)` in weeks.
    history: (u32, f64, f64),
    probability_alive: f64,
    /// Expected purchases in the next [`WINDOWS_WEEKS`].
    expected_purchases: [f64; 4],
}

const CONDITIONAL_REFERENCES: [ConditionalReference; 7] = [
    ConditionalReference {
        history: (0, 0.0, 38.86),
        probability_alive: 1.0,
        expected_purchases: [
            0.005586357632892169,
            0.19478106692133756,
            0.25166599141954143,
            1.4624064192062913,
        ],
    },
    ConditionalReference {
        history: (2, 30.43, 38.86),
        probability_alive: 0.7266090427439477,
        expected_purchases: [
            0.03744319350627878,
            1.2259103453756401,
            1.55858363438759,
            7.3194945314943265,
        ],
    },
    ConditionalReference {
        history: (1, 1.71, 38.86),
        probability_alive: 0.2122272042468794,
        expected_purchases: [
            0.006064646708016677,
            0.20325048188788958,
            0.25990689294930835,
            1.3079981766924738,
        ],
    },
    ConditionalReference {
        history: (7, 35.0, 38.0),
        probability_alive: 0.8620074616560023,
        expected_purchases: [
            0.14610048395148176,
            4.556214959102415,
            5.728764488632621,
            24.10990362100405,
        ],
    },
    ConditionalReference {
        history: (14, 29.43, 37.71),
        probability_alive: 0.4628185967839836,
        expected_purchases: [
            0.15519836691153868,
            4.747551186158269,
            5.945427727520399,
            24.190047656930997,
        ],
    },
    ConditionalReference {
        history: (3, 5.0, 36.0),
        probability_alive: 0.04720068200110442,
        expected_purchases: [
            0.0037620854764021916,
            0.11998881687474669,
            0.15164536516318228,
            0.6711459626390138,
        ],
    },
    ConditionalReference {
        history: (29, 37.71, 38.0),
        probability_alive: 0.9691335846663626,
        expected_purchases: [
            0.6623964902976419,
            20.05366401783384,
            25.0614204324859,
            100.29452853947213,
        ],
    },
];

const WINDOWS_WEEKS: [f64; 4] = [1.0, 39.0, 52.0, 520.0];

#[test]
fn probability_alive_matches_lifetimes() {
    let model = reference_bgnbd();
    for reference in CONDITIONAL_REFERENCES {
        let ((x, t_x, age), expected) = (reference.history, reference.probability_alive);
        let actual = model.probability_alive(&history(x, t_x, age));
        assert_close(
            actual,
            expected,
            1e-6,
            &format!("P(alive | {x}, {t_x}, {age})"),
        );
    }
}

#[test]
fn conditional_expected_purchases_match_lifetimes() {
    let model = reference_bgnbd();
    for reference in CONDITIONAL_REFERENCES {
        let ((x, t_x, age), expected) = (reference.history, reference.expected_purchases);
        for (window, expected) in WINDOWS_WEEKS.into_iter().zip(expected) {
            let actual = model
                .conditional_expected_purchases(&history(x, t_x, age), window)
                .unwrap();
            assert_close(
                actual,
                expected,
                1e-6,
                &format!("E[purchases in {window} | {x}, {t_x}, {age}]"),
            );
        }
    }
}

#[test]
fn new_customer_expected_purchases_match_lifetimes() {
    let model = reference_bgnbd();
    let expected = [
        0.053184803268775525,
        1.19501737205772,
        1.4440220911049835,
        4.968751188684947,
    ];
    for (window, expected) in WINDOWS_WEEKS.into_iter().zip(expected) {
        let actual = model.expected_purchases_new_customer(window).unwrap();
        assert_close(actual, expected, 1e-6, &format!("E[purchases in {window}]"));
    }
}

#[test]
fn conditional_expected_order_value_matches_lifetimes() {
    let model = reference_gamma_gamma();
    let references = [
        (1, 11.77, 18.911481315122337),
        (2, 22.35, 24.658617334090565),
        (6, 53.84, 52.56659086773084),
        (14, 34.67, 34.68523997691076),
        (29, 4.84, 5.292523287296707),
    ];
    for (frequency, average_order_value, expected) in references {
        let actual = model
            .conditional_expected_average_order_value(&SpendHistory {
                frequency,
                average_order_value,
            })
            .unwrap();
        assert_close(
            actual,
            expected,
            1e-6,
            &format!("E[order value | {frequency}, {average_order_value}]"),
        );
    }
}

#[test]
fn customer_lifetime_value_matches_lifetimes() {
    let purchases = reference_bgnbd();
    let spend = reference_gamma_gamma();
    let customers = [
        (history(2, 30.43, 38.86), 22.35),
        (history(1, 1.71, 38.86), 11.77),
        (history(7, 35.0, 38.0), 53.84),
        (history(14, 29.43, 37.71), 34.67),
    ];
    // lifetimes: customer_lifetime_value(bgf, ..., time=months, discount_rate=rate, freq="W")
    let cases = [
        (
            12,
            0.01,
            [
                36.2784945366011,
                4.637463362546776,
                285.47131104822023,
                194.92655560649274,
            ],
        ),
        (
            6,
            0.05,
            [
                18.120242970858175,
                2.2869792587734663,
                146.18718117711825,
                100.74711101336605,
            ],
        ),
    ];
    for (months, monthly_discount_rate, expected) in cases {
        let horizon = ClvHorizon {
            months,
            monthly_discount_rate,
            time_unit: TimeUnit::Week,
        };
        for ((history, value), expected) in customers.iter().zip(expected) {
            let actual =
                customer_lifetime_value(&purchases, &spend, history, *value, &horizon).unwrap();
            assert_close(
                actual,
                expected,
                1e-6,
                &format!("CLV {months} months at {monthly_discount_rate} for {history:?}"),
            );
        }
    }
}
