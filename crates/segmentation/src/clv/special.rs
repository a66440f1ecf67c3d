//! Special functions needed by the CLV models: `ln Γ`, a stable two-term log-sum-exp and the
//! Gauss hypergeometric function `₂F₁` evaluated by its power series with an explicit
//! convergence check (never a silent truncation).

/// Lanczos coefficients for `g = 7`, `n = 9` (Godfrey); relative error below `2e-15` for
/// positive arguments, which is far below the optimiser tolerances used here.
const LANCZOS_G: f64 = 7.0;
const LANCZOS_COEFFICIENTS: [f64; 9] = [
    0.999_999_999_999_809_9,
    676.520_368_121_885_1,
    -1_259.139_216_722_402_8,
    771.323_428_777_653_1,
    -176.615_029_162_140_6,
    12.507_343_278_686_905,
    -0.138_571_095_265_720_12,
    9.984_369_578_019_572e-6,
    1.505_632_735_149_311_6e-7,
];

/// Natural logarithm of the gamma function, `ln Γ(x)`, for `x > 0`.
///
/// Returns `+∞` at `x = 0` and NaN for negative or NaN input: the models only ever need
/// positive arguments and a NaN makes an invalid parameter visible instead of hiding it.
pub(crate) fn ln_gamma(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::INFINITY;
    }
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 − x) = π / sin(πx); keeps the Lanczos sum in its accurate range.
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = LANCZOS_COEFFICIENTS[0];
    for (k, coefficient) in LANCZOS_COEFFICIENTS.iter().enumerate().skip(1) {
        sum += coefficient / (x + k as f64);
    }
    let t = x + LANCZOS_G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// `ln(eᵃ + eᵇ)` without overflow or underflow of the exponentials.
pub(crate) fn log_sum_exp(a: f64, b: f64) -> f64 {
    let max = a.max(b);
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    max + ((a - max).exp() + (b - max).exp()).ln()
}

/// Largest number of series terms summed before `hyp2f1` gives up.
const HYP2F1_MAX_TERMS: usize = 1_000_000;

/// Why the `₂F₁` series could not be evaluated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Hyp2f1Error {
    /// `|z| ≥ 1`, a non-positive-integer `c`, or a non-finite argument.
    OutsideDomain,
    /// The tail bound did not fall below the tolerance within [`HYP2F1_MAX_TERMS`] terms.
    DidNotConverge,
}

/// Gauss hypergeometric function `₂F₁(a, b; c; z) = Σₙ (a)ₙ (b)ₙ / ((c)ₙ n!) zⁿ` for `|z| < 1`.
///
/// Sums the power series until the remaining tail, bounded geometrically by the current
/// term and `max(|term ratio|, |z|)`, is below `1e-16` of the partial sum. That bound is
/// rigorous once the term ratios move monotonically towards `z`, which they do for large
/// `n`. Fails rather than returning a truncated value when the series is too slow (`|z|`
/// extremely close to 1) — callers transform their arguments so that does not happen in
/// practice.
pub(crate) fn hyp2f1(a: f64, b: f64, c: f64, z: f64) -> Result<f64, Hyp2f1Error> {
    let finite = a.is_finite() && b.is_finite() && c.is_finite() && z.is_finite();
    let c_is_pole = c <= 0.0 && c.fract() == 0.0;
    if !finite || c_is_pole || z.abs() >= 1.0 {
        return Err(Hyp2f1Error::OutsideDomain);
    }
    let mut sum = 1.0_f64;
    let mut term = 1.0_f64;
    for n in 0..HYP2F1_MAX_TERMS {
        let n = n as f64;
        let ratio = (a + n) * (b + n) / ((c + n) * (n + 1.0)) * z;
        term *= ratio;
        sum += term;
        if term == 0.0 {
            return Ok(sum);
        }
        let rho = ratio.abs().max(z.abs());
        if rho < 1.0 && term.abs() * rho / (1.0 - rho) <= 1e-16 * sum.abs() {
            return Ok(sum);
        }
        if !sum.is_finite() {
            return Err(Hyp2f1Error::DidNotConverge);
        }
    }
    Err(Hyp2f1Error::DidNotConverge)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn assert_relative(actual: f64, expected: f64, tolerance: f64) {
        let error = ((actual - expected) / expected).abs();
        assert!(
            error <= tolerance,
            "{actual} vs {expected}: relative error {error:e}"
        );
    }

    #[test]
    fn ln_gamma_matches_known_values() {
        assert!(ln_gamma(1.0).abs() < 1e-15);
        assert!(ln_gamma(2.0).abs() < 1e-15);
        assert_relative(ln_gamma(0.5), 0.572_364_942_924_700_1, 1e-14);
        assert_relative(ln_gamma(10.0), 12.801_827_480_081_469, 1e-14);
        assert_relative(ln_gamma(100.0), 359.134_205_369_575_4, 1e-14);
        assert_relative(ln_gamma(0.1), 2.252_712_651_734_206, 1e-14);
        assert_relative(ln_gamma(1e-3), 6.907_178_885_383_854, 1e-13);
    }

    #[test]
    fn ln_gamma_rejects_negative_arguments() {
        assert!(ln_gamma(-1.5).is_nan());
        assert_eq!(ln_gamma(0.0), f64::INFINITY);
    }

    #[test]
    fn log_sum_exp_is_stable_for_large_magnitudes() {
        assert_relative(log_sum_exp(1000.0, 1000.0), 1000.0 + 2f64.ln(), 1e-15);
        assert_relative(
            log_sum_exp(-1000.0, -1001.0),
            -1000.0 + (1.0 + (-1f64).exp()).ln(),
            1e-15,
        );
        assert_eq!(
            log_sum_exp(f64::NEG_INFINITY, f64::NEG_INFINITY),
            f64::NEG_INFINITY
        );
        assert_eq!(log_sum_exp(f64::NEG_INFINITY, 3.0), 3.0);
    }

    #[test]
    fn hyp2f1_matches_closed_forms() {
        // ₂F₁(1, 1; 2; z) = −ln(1 − z) / z
        for z in [-0.9_f64, -0.3, 0.01, 0.5, 0.9, 0.99] {
            let expected = -(1.0 - z).ln() / z;
            assert_relative(hyp2f1(1.0, 1.0, 2.0, z).unwrap(), expected, 1e-13);
        }
        // ₂F₁(a, b; b; z) = (1 − z)^(−a)
        assert_relative(
            hyp2f1(0.7, 2.5, 2.5, 0.8).unwrap(),
            0.2f64.powf(-0.7),
            1e-13,
        );
        // ₂F₁(1/2, 1/2; 3/2; z²) = asin(z) / z
        let z = 0.95_f64;
        assert_relative(hyp2f1(0.5, 0.5, 1.5, z * z).unwrap(), z.asin() / z, 1e-12);
        // Terminating series: ₂F₁(−2, b; c; z) is a quadratic polynomial.
        let (b, c, z) = (3.0, 4.0, 0.5);
        let expected = 1.0 - 2.0 * b / c * z + b * (b + 1.0) / (c * (c + 1.0)) * z * z;
        assert_relative(hyp2f1(-2.0, b, c, z).unwrap(), expected, 1e-15);
        assert_eq!(hyp2f1(1.0, 1.0, 2.0, 0.0).unwrap(), 1.0);
    }

    #[test]
    fn hyp2f1_rejects_arguments_outside_the_disc_and_poles() {
        assert_eq!(hyp2f1(1.0, 1.0, 2.0, 1.0), Err(Hyp2f1Error::OutsideDomain));
        assert_eq!(hyp2f1(1.0, 1.0, -2.0, 0.5), Err(Hyp2f1Error::OutsideDomain));
        assert_eq!(
            hyp2f1(f64::NAN, 1.0, 2.0, 0.5),
            Err(Hyp2f1Error::OutsideDomain)
        );
    }

    #[test]
    fn hyp2f1_reports_non_convergence_instead_of_truncating() {
        assert_eq!(
            hyp2f1(1.0, 1.0, 2.0, 1.0 - 1e-9),
            Err(Hyp2f1Error::DidNotConverge)
        );
    }
}
