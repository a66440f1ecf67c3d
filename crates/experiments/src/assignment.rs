//! Deterministic, stateless variant assignment, bit-compatible with GrowthBook.
//!
//! A unit (customer, device, …) is assigned by hashing its id with the
//! experiment's seed into a bucket in `[0, 1)` and finding the variant whose
//! bucket range contains it. No state is stored: the same spec and id always
//! give the same answer, here and in every GrowthBook SDK, so a web page using
//! the GrowthBook JS SDK and this service agree on who sees what.
//!
//! Compatibility details that matter:
//!
//! * Strings are hashed as **UTF-16 code units** with 32-bit FNV-1a, because
//!   the JS SDK uses `str.charCodeAt(i)`. A Korean syllable is one unit, an
//!   emoji outside the BMP is two (a surrogate pair). Hashing UTF-8 bytes
//!   would silently split such users differently from the SDKs.
//! * Hash version 1 hashes `id + seed` modulo 1000 (the original, slightly
//!   biased scheme kept for running experiments); version 2 hashes the decimal
//!   string of `fnv(seed + id)` again, modulo 10 000. New experiments should
//!   use version 2.
//! * Namespaces always use the version-1 hash of `id + "__" + namespace_id`.
//! * Invalid weights or coverage are handled like the SDK does (equal weights,
//!   clamped coverage) so both sides still agree; [`ExperimentSpec::validate`]
//!   is how the service refuses such specs before they ever reach users.
//!
//! The hot path ([`assign_variant`]) does not allocate.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// FNV-1a 32-bit offset basis.
const FNV_OFFSET_BASIS: u32 = 0x811c_9dc5;
/// FNV-1a 32-bit prime (`2^24 + 2^8 + 0x93`).
const FNV_PRIME: u32 = 0x0100_0193;

/// Tolerance GrowthBook allows on the sum of weights: it accepts sums in
/// `[0.99, 1.01]` and falls back to equal weights outside that band.
pub const WEIGHT_SUM_TOLERANCE: f64 = 0.01;

/// Incremental FNV-1a over UTF-16 code units, mirroring JS `charCodeAt`.
#[derive(Debug, Clone, Copy)]
struct Fnv1a32(u32);

impl Fnv1a32 {
    fn new() -> Self {
        Self(FNV_OFFSET_BASIS)
    }

    #[inline]
    fn write_code_unit(&mut self, unit: u16) {
        self.0 = (self.0 ^ u32::from(unit)).wrapping_mul(FNV_PRIME);
    }

    #[inline]
    fn write_str(&mut self, s: &str) {
        if s.is_ascii() {
            // ASCII bytes are their own UTF-16 code units.
            for &b in s.as_bytes() {
                self.write_code_unit(u16::from(b));
            }
        } else {
            for unit in s.encode_utf16() {
                self.write_code_unit(unit);
            }
        }
    }

    /// Hashes the decimal representation of `n` (what JS `n + ""` yields for
    /// a non-negative integer below 2^32), without allocating.
    #[inline]
    fn write_decimal(&mut self, mut n: u32) {
        let mut digits = [0u8; 10];
        let mut start = digits.len();
        loop {
            start -= 1;
            // `n % 10` is below 10, so the cast cannot truncate.
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &d in &digits[start..] {
            self.write_code_unit(u16::from(d));
        }
    }

    fn finish(self) -> u32 {
        self.0
    }
}

/// 32-bit FNV-1a of the concatenation of `parts`, taken over UTF-16 code
/// units exactly like GrowthBook's `hashFnv32a(parts.join(""))`.
///
/// Concatenation is implicit: no `String` is built.
#[must_use]
pub fn fnv1a32_utf16(parts: &[&str]) -> u32 {
    let mut h = Fnv1a32::new();
    for part in parts {
        h.write_str(part);
    }
    h.finish()
}

/// GrowthBook hashing algorithm version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum HashVersion {
    /// `fnv(id + seed) % 1000 / 1000`: three decimal places, slightly biased.
    /// GrowthBook's default when a payload omits `hashVersion`.
    V1,
    /// `fnv(str(fnv(seed + id))) % 10000 / 10000`: unbiased, four decimal
    /// places. Use for every new experiment.
    V2,
}

impl HashVersion {
    /// The version number as written in GrowthBook payloads.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
        }
    }
}

impl From<HashVersion> for u8 {
    fn from(v: HashVersion) -> Self {
        v.number()
    }
}

impl TryFrom<u8> for HashVersion {
    type Error = SpecError;

    fn try_from(n: u8) -> Result<Self, Self::Error> {
        match n {
            1 => Ok(Self::V1),
            2 => Ok(Self::V2),
            other => Err(SpecError::UnknownHashVersion(u32::from(other))),
        }
    }
}

/// Bucket of `value` for `seed` in `[0, 1)` with the given typed version.
///
/// Version 1 yields multiples of 0.001, version 2 multiples of 0.0001.
#[must_use]
#[inline]
pub fn bucket(seed: &str, value: &str, version: HashVersion) -> f64 {
    match version {
        HashVersion::V2 => {
            let mut inner = Fnv1a32::new();
            inner.write_str(seed);
            inner.write_str(value);
            let mut outer = Fnv1a32::new();
            outer.write_decimal(inner.finish());
            f64::from(outer.finish() % 10_000) / 10_000.0
        }
        HashVersion::V1 => {
            let mut h = Fnv1a32::new();
            h.write_str(value);
            h.write_str(seed);
            f64::from(h.finish() % 1_000) / 1_000.0
        }
    }
}

/// GrowthBook's `hash(seed, value, version)`: a bucket in `[0, 1)`, or `None`
/// for a version other than 1 or 2 (GrowthBook then excludes the unit).
#[must_use]
pub fn hash(seed: &str, value: &str, version: u32) -> Option<f64> {
    match version {
        1 => Some(bucket(seed, value, HashVersion::V1)),
        2 => Some(bucket(seed, value, HashVersion::V2)),
        _ => None,
    }
}

/// Half-open bucket range `[start, end)` owned by one variant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BucketRange {
    /// Inclusive lower bound in `[0, 1]`.
    pub start: f64,
    /// Exclusive upper bound in `[0, 1]`.
    pub end: f64,
}

impl BucketRange {
    /// Whether `n` falls in `[start, end)`.
    #[must_use]
    #[inline]
    pub fn contains(&self, n: f64) -> bool {
        n >= self.start && n < self.end
    }
}

/// `n` equal weights of `1 / n` (empty for `n == 0`), like `getEqualWeights`.
#[must_use]
pub fn equal_weights(n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    // Variant counts are tiny; the conversion is exact.
    #[allow(clippy::cast_precision_loss)]
    let w = 1.0 / n as f64;
    vec![w; n]
}

/// Coverage as GrowthBook uses it: clamped to `[0, 1]`, NaN left as is (a NaN
/// coverage makes every range empty, as in JS).
#[inline]
fn clamp_coverage(coverage: f64) -> f64 {
    // `f64::clamp` returns NaN for NaN, matching JS comparisons.
    coverage.clamp(0.0, 1.0)
}

/// Whether GrowthBook would use `weights` as given for `num_variants`
/// variants, rather than falling back to equal weights.
#[inline]
fn weights_usable(num_variants: usize, weights: &[f64]) -> bool {
    if weights.len() != num_variants {
        return false;
    }
    let total: f64 = weights.iter().fold(0.0, |sum, w| w + sum);
    (1.0 - WEIGHT_SUM_TOLERANCE..=1.0 + WEIGHT_SUM_TOLERANCE).contains(&total)
}

/// GrowthBook's `getBucketRanges(numVariations, coverage, weights)`.
///
/// Variant `i` owns `[c_i, c_i + coverage * w_i)` where `c_i` is the sum of
/// the previous weights, so reducing coverage shrinks each range from its
/// end and never moves a unit from one variant to another. Coverage is
/// clamped to `[0, 1]`; weights of the wrong length or whose sum is outside
/// `1 ± 0.01` are replaced by equal weights, exactly as the SDK does.
#[must_use]
pub fn bucket_ranges(
    num_variants: usize,
    coverage: f64,
    weights: Option<&[f64]>,
) -> Vec<BucketRange> {
    let coverage = clamp_coverage(coverage);
    let equal;
    let weights = match weights {
        Some(w) if weights_usable(num_variants, w) => w,
        _ => {
            equal = equal_weights(num_variants);
            &equal[..]
        }
    };
    let mut cumulative = 0.0;
    weights
        .iter()
        .map(|&w| {
            let start = cumulative;
            cumulative += w;
            BucketRange {
                start,
                end: start + coverage * w,
            }
        })
        .collect()
}

/// GrowthBook's `chooseVariation(n, ranges)`: index of the first range that
/// contains bucket `n`, or `None` (JS `-1`) when `n` falls outside all of
/// them, i.e. the unit is outside coverage.
#[must_use]
#[inline]
pub fn choose_variant(n: f64, ranges: &[BucketRange]) -> Option<usize> {
    ranges.iter().position(|r| r.contains(n))
}

/// Slice `[start, end)` of a namespace that an experiment occupies.
///
/// Experiments sharing a namespace id with non-overlapping slices are
/// mutually exclusive: a unit hashes to one point of the namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamespaceRange {
    /// Namespace identifier shared by mutually exclusive experiments.
    pub id: String,
    /// Inclusive lower bound in `[0, 1]`.
    pub start: f64,
    /// Exclusive upper bound in `[0, 1]`, at least `start`.
    pub end: f64,
}

/// GrowthBook's `inNamespace(hashValue, [id, start, end])`: the version-1
/// hash of `unit_id + "__" + id` lies in `[start, end)`.
#[must_use]
#[inline]
pub fn in_namespace(unit_id: &str, namespace: (&str, f64, f64)) -> bool {
    let (id, start, end) = namespace;
    let mut h = Fnv1a32::new();
    h.write_str(unit_id);
    h.write_str("__");
    h.write_str(id);
    let n = f64::from(h.finish() % 1_000) / 1_000.0;
    n >= start && n < end
}

/// Everything needed to assign a unit to a variant.
///
/// Field names follow GrowthBook's experiment definition so a spec can be
/// mirrored into an SDK payload one-to-one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentSpec {
    /// Unique experiment key; also the hashing seed when `seed` is `None`.
    pub key: String,
    /// Hashing seed. `None` (or empty, as in JS `seed || key`) means `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
    /// Hashing algorithm. Required: GrowthBook's implicit default is the
    /// biased version 1, which a new experiment should not get by accident.
    pub hash_version: HashVersion,
    /// Traffic share of each variant, variant 0 being control. Non-negative,
    /// summing to 1 within [`WEIGHT_SUM_TOLERANCE`]; at least two variants.
    pub weights: Vec<f64>,
    /// Fraction of eligible units enrolled, in `[0, 1]`. Units outside
    /// coverage are not in the experiment (they see the default experience
    /// and must not be counted in the analysis).
    #[serde(default = "full_coverage")]
    pub coverage: f64,
    /// Optional namespace slice for mutually exclusive experiments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<NamespaceRange>,
}

fn full_coverage() -> f64 {
    1.0
}

impl ExperimentSpec {
    /// A spec with the given key and weights, hash version 2, full coverage
    /// and no namespace.
    #[must_use]
    pub fn new(key: impl Into<String>, weights: Vec<f64>) -> Self {
        Self {
            key: key.into(),
            seed: None,
            hash_version: HashVersion::V2,
            weights,
            coverage: 1.0,
            namespace: None,
        }
    }

    /// A spec splitting traffic equally between `num_variants` variants.
    #[must_use]
    pub fn equal_split(key: impl Into<String>, num_variants: usize) -> Self {
        Self::new(key, equal_weights(num_variants))
    }

    /// The seed actually hashed: `seed` unless absent or empty, else `key`.
    #[must_use]
    pub fn effective_seed(&self) -> &str {
        match self.seed.as_deref() {
            Some(seed) if !seed.is_empty() => seed,
            _ => &self.key,
        }
    }

    /// Checks the spec is one GrowthBook would apply as written, so that no
    /// silent SDK fallback (equal weights, clamped coverage) kicks in.
    ///
    /// # Errors
    /// A [`SpecError`] naming the first offending field.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.key.is_empty() {
            return Err(SpecError::EmptyKey);
        }
        if self.weights.len() < 2 {
            return Err(SpecError::TooFewVariants {
                count: self.weights.len(),
            });
        }
        for (index, &weight) in self.weights.iter().enumerate() {
            if !weight.is_finite() || weight < 0.0 {
                return Err(SpecError::InvalidWeight { index, weight });
            }
        }
        let sum: f64 = self.weights.iter().sum();
        if !weights_usable(self.weights.len(), &self.weights) {
            return Err(SpecError::WeightsDoNotSumToOne { sum });
        }
        if !(0.0..=1.0).contains(&self.coverage) {
            return Err(SpecError::CoverageOutOfRange {
                coverage: self.coverage,
            });
        }
        if let Some(ns) = &self.namespace {
            if ns.id.is_empty() {
                return Err(SpecError::EmptyNamespaceId);
            }
            let bounds_ok = (0.0..=1.0).contains(&ns.start) && (0.0..=1.0).contains(&ns.end);
            if !bounds_ok || ns.start > ns.end {
                return Err(SpecError::NamespaceRangeInvalid {
                    start: ns.start,
                    end: ns.end,
                });
            }
        }
        Ok(())
    }

    /// The bucket ranges this spec assigns with (GrowthBook fallbacks applied).
    #[must_use]
    pub fn bucket_ranges(&self) -> Vec<BucketRange> {
        bucket_ranges(self.weights.len(), self.coverage, Some(&self.weights))
    }
}

/// Why a spec is refused. Each variant names the offending field.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SpecError {
    /// `key` is empty.
    #[error("key must not be empty")]
    EmptyKey,
    /// `weights` has fewer than two entries.
    #[error("weights must have at least 2 entries (control and one treatment), got {count}")]
    TooFewVariants {
        /// Number of weights given.
        count: usize,
    },
    /// A weight is negative, infinite or NaN.
    #[error("weights[{index}] must be a finite non-negative number, got {weight}")]
    InvalidWeight {
        /// Index of the offending weight.
        index: usize,
        /// The offending value.
        weight: f64,
    },
    /// Weights do not sum to 1 within [`WEIGHT_SUM_TOLERANCE`].
    #[error("weights must sum to 1 (within 0.01), got {sum}")]
    WeightsDoNotSumToOne {
        /// The actual sum.
        sum: f64,
    },
    /// `coverage` is outside `[0, 1]` or NaN.
    #[error("coverage must be within [0, 1], got {coverage}")]
    CoverageOutOfRange {
        /// The offending value.
        coverage: f64,
    },
    /// `namespace.id` is empty.
    #[error("namespace.id must not be empty")]
    EmptyNamespaceId,
    /// `namespace.start`/`namespace.end` are not `0 <= start <= end <= 1`.
    #[error("namespace range must satisfy 0 <= start <= end <= 1, got [{start}, {end})")]
    NamespaceRangeInvalid {
        /// The given start.
        start: f64,
        /// The given end.
        end: f64,
    },
    /// `hash_version` is neither 1 nor 2.
    #[error("hash_version must be 1 or 2, got {0}")]
    UnknownHashVersion(u32),
}

/// Why a unit is not in an experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exclusion {
    /// The unit id is empty; GrowthBook never hashes an empty id.
    EmptyUnitId,
    /// The spec has fewer than two variants.
    TooFewVariants,
    /// The unit falls outside the experiment's namespace slice.
    OutsideNamespace,
    /// The unit's bucket falls outside every (coverage-reduced) range.
    OutsideCoverage,
}

/// Result of [`assign_variant`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Assignment {
    /// The unit is enrolled and sees `variant` (0 = control).
    InExperiment {
        /// Index into the spec's `weights`.
        variant: usize,
        /// The unit's hash bucket in `[0, 1)` (GrowthBook's `bucket`).
        bucket: f64,
    },
    /// The unit is not enrolled; it gets the default experience and must be
    /// left out of the analysis.
    NotInExperiment(Exclusion),
}

impl Assignment {
    /// The assigned variant index, if enrolled.
    #[must_use]
    pub fn variant(&self) -> Option<usize> {
        match self {
            Self::InExperiment { variant, .. } => Some(*variant),
            Self::NotInExperiment(_) => None,
        }
    }

    /// Whether the unit is enrolled.
    #[must_use]
    pub fn is_in_experiment(&self) -> bool {
        matches!(self, Self::InExperiment { .. })
    }
}

/// Assigns `unit_id` to a variant of `spec`, exactly as GrowthBook's
/// `_run` does for an experiment without targeting conditions:
///
/// 1. an empty id or fewer than two variants is not in the experiment;
/// 2. a unit outside the namespace slice is not in the experiment;
/// 3. the unit's bucket is `hash(effective_seed, unit_id, hash_version)`;
/// 4. the variant is the bucket range containing it (see [`bucket_ranges`]),
///    or none when outside coverage.
///
/// Deterministic and allocation-free. Specs should have passed
/// [`ExperimentSpec::validate`]; an invalid one is still handled the
/// GrowthBook way so server and SDKs agree.
///
/// ```
/// use clientele_experiments::assignment::{ExperimentSpec, assign_variant};
///
/// let mut spec = ExperimentSpec::new("checkout-redesign", vec![0.5, 0.3, 0.2]);
/// spec.coverage = 0.8;
/// spec.validate()?;
/// let assignment = assign_variant(&spec, "고객-42");
/// assert_eq!(assignment, assign_variant(&spec, "고객-42"));
/// if let Some(variant) = assignment.variant() {
///     assert!(variant < 3);
/// }
/// # Ok::<(), clientele_experiments::assignment::SpecError>(())
/// ```
#[must_use]
pub fn assign_variant(spec: &ExperimentSpec, unit_id: &str) -> Assignment {
    let num_variants = spec.weights.len();
    if num_variants < 2 {
        return Assignment::NotInExperiment(Exclusion::TooFewVariants);
    }
    if unit_id.is_empty() {
        return Assignment::NotInExperiment(Exclusion::EmptyUnitId);
    }
    if let Some(ns) = &spec.namespace
        && !in_namespace(unit_id, (&ns.id, ns.start, ns.end))
    {
        return Assignment::NotInExperiment(Exclusion::OutsideNamespace);
    }
    let n = bucket(spec.effective_seed(), unit_id, spec.hash_version);
    let coverage = clamp_coverage(spec.coverage);

    // Walk the ranges lazily instead of building them: same arithmetic as
    // `bucket_ranges`, no allocation.
    let use_given = weights_usable(num_variants, &spec.weights);
    #[allow(clippy::cast_precision_loss)]
    let equal = 1.0 / num_variants as f64;
    let mut cumulative = 0.0;
    for i in 0..num_variants {
        let w = if use_given { spec.weights[i] } else { equal };
        let range = BucketRange {
            start: cumulative,
            end: cumulative + coverage * w,
        };
        cumulative += w;
        if range.contains(n) {
            return Assignment::InExperiment {
                variant: i,
                bucket: n,
            };
        }
    }
    Assignment::NotInExperiment(Exclusion::OutsideCoverage)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::float_cmp)]
mod tests {
    use super::*;

    #[test]
    fn empty_string_hashes_to_offset_basis() {
        assert_eq!(fnv1a32_utf16(&[""]), FNV_OFFSET_BASIS);
    }

    #[test]
    fn concatenated_parts_hash_like_joined_string() {
        assert_eq!(fnv1a32_utf16(&["고객", "-42"]), fnv1a32_utf16(&["고객-42"]));
        assert_eq!(
            fnv1a32_utf16(&["user-😀", "-🚀"]),
            fnv1a32_utf16(&["user-😀-🚀"])
        );
    }

    #[test]
    fn decimal_writer_matches_to_string() {
        for n in [0u32, 7, 10, 99, 1_000, 4_294_967_295, 2_166_136_261] {
            let mut a = Fnv1a32::new();
            a.write_decimal(n);
            assert_eq!(a.finish(), fnv1a32_utf16(&[&n.to_string()]), "n = {n}");
        }
    }

    #[test]
    fn bucket_ranges_sum_of_lengths_equals_coverage() {
        let ranges = bucket_ranges(3, 0.6, Some(&[0.5, 0.3, 0.2]));
        let covered: f64 = ranges.iter().map(|r| r.end - r.start).sum();
        assert!((covered - 0.6).abs() < 1e-12);
    }

    #[test]
    fn validate_accepts_a_typical_spec() {
        let mut spec = ExperimentSpec::new("checkout", vec![0.5, 0.25, 0.25]);
        spec.coverage = 0.8;
        spec.namespace = Some(NamespaceRange {
            id: "checkout-ns".into(),
            start: 0.0,
            end: 0.5,
        });
        assert_eq!(spec.validate(), Ok(()));
    }

    #[test]
    fn validate_names_the_offending_field() {
        let cases: Vec<(ExperimentSpec, &str)> = vec![
            (ExperimentSpec::new("", vec![0.5, 0.5]), "key"),
            (
                ExperimentSpec::new("k", vec![1.0]),
                "weights must have at least 2",
            ),
            (ExperimentSpec::new("k", vec![1.2, -0.2]), "weights[1]"),
            (ExperimentSpec::new("k", vec![f64::NAN, 1.0]), "weights[0]"),
            (
                ExperimentSpec::new("k", vec![0.4, 0.4]),
                "weights must sum to 1",
            ),
            (
                ExperimentSpec {
                    coverage: 1.5,
                    ..ExperimentSpec::new("k", vec![0.5, 0.5])
                },
                "coverage",
            ),
            (
                ExperimentSpec {
                    coverage: f64::NAN,
                    ..ExperimentSpec::new("k", vec![0.5, 0.5])
                },
                "coverage",
            ),
            (
                ExperimentSpec {
                    namespace: Some(NamespaceRange {
                        id: "ns".into(),
                        start: 0.7,
                        end: 0.2,
                    }),
                    ..ExperimentSpec::new("k", vec![0.5, 0.5])
                },
                "namespace range",
            ),
            (
                ExperimentSpec {
                    namespace: Some(NamespaceRange {
                        id: String::new(),
                        start: 0.0,
                        end: 1.0,
                    }),
                    ..ExperimentSpec::new("k", vec![0.5, 0.5])
                },
                "namespace.id",
            ),
        ];
        for (spec, field) in cases {
            let err = spec.validate().unwrap_err();
            assert!(
                err.to_string().contains(field),
                "{err} should mention {field}"
            );
        }
    }

    #[test]
    fn weights_within_growthbook_tolerance_are_accepted() {
        assert_eq!(
            ExperimentSpec::new("k", vec![0.4, 0.5999]).validate(),
            Ok(())
        );
    }

    #[test]
    fn empty_seed_falls_back_to_key_like_js_or() {
        let spec = ExperimentSpec {
            seed: Some(String::new()),
            ..ExperimentSpec::new("my-key", vec![0.5, 0.5])
        };
        assert_eq!(spec.effective_seed(), "my-key");
    }

    #[test]
    fn spec_round_trips_through_json_with_numeric_hash_version() {
        let spec = ExperimentSpec::new("k", vec![0.5, 0.5]);
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains("\"hash_version\":2"), "{json}");
        let back: ExperimentSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
        let bad = json.replace("\"hash_version\":2", "\"hash_version\":3");
        assert!(serde_json::from_str::<ExperimentSpec>(&bad).is_err());
    }

    #[test]
    fn assignment_is_deterministic_and_roughly_follows_weights() {
        let spec = ExperimentSpec::new("balance", vec![0.2, 0.8]);
        let mut counts = [0usize; 2];
        for i in 0..20_000 {
            let id = format!("unit-{i}");
            let a = assign_variant(&spec, &id);
            assert_eq!(a, assign_variant(&spec, &id));
            counts[a.variant().unwrap()] += 1;
        }
        let share = counts[0] as f64 / 20_000.0;
        assert!((share - 0.2).abs() < 0.015, "control share {share}");
    }
}
