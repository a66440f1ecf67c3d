//! RFM (recency, frequency, monetary) quintile scoring and the named RFM segments.
//!
//! Scores are computed over the *current customer base* by rank-then-quantile, the pandas
//! idiom `pd.qcut(values.rank(method="first"), 5, labels=[1, 2, 3, 4, 5])`:
//!
//! 1. each value gets an ordinal rank `1..=n` in ascending order; equal values are ranked by
//!    their position in the input slice (the caller's profile order is the tiebreak, exactly
//!    like `method="first"`), so every rank is distinct and quintiles are balanced;
//! 2. rank `r` falls into quintile `q` = the smallest `q ∈ 1..=5` with
//!    `r ≤ 1 + (n - 1)·q/5` (the linear-interpolation quantiles of the ranks, right-closed
//!    bins, lowest bin closed on the left). This is evaluated in exact integer arithmetic as
//!    `q = max(1, ⌈5(r - 1)/(n - 1)⌉)`; it was checked equal to pandas for every n in 2..3000.
//!
//! F and M scores are the quintile of frequency and monetary value (5 = highest). R is
//! reversed: recency in days is ranked ascending and `R = 6 - quintile`, so the most recent
//! customers score 5.
//!
//! Alongside the scores, a batch produces [`RfmCutPoints`]: the largest value in each of the
//! lower four quintiles. A single changed profile can then be re-scored against the latest cut
//! points without re-ranking the whole base (see [`RfmCutPoints::score`]).
//!
//! Segments are named from the R score and the FM score (mean of F and M, rounded half up)
//! through a configurable [`SegmentMap`]; [`SegmentMap::standard`] is the widely used
//! 11-segment grid.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors of RFM scoring and segment-map validation.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RfmError {
    /// Scoring needs at least one customer.
    #[error("cannot score an empty customer base")]
    EmptyBase,
    /// An input value was NaN or infinite.
    #[error("profile at index {index} has a non-finite {field} value")]
    NonFinite {
        /// Index of the offending profile in the input slice.
        index: usize,
        /// `"recency"`, `"frequency"` or `"monetary"`.
        field: &'static str,
    },
    /// A segment rule has a bound outside `1..=5` or min > max.
    #[error(
        "segment rule {name:?} has an invalid range (bounds must satisfy 1 <= min <= max <= 5)"
    )]
    InvalidRule {
        /// Name of the offending rule.
        name: String,
    },
    /// Some (R, FM) cells are not covered by any rule.
    #[error("segment map leaves (R, FM) cells uncovered: {cells:?}")]
    UncoveredCells {
        /// The uncovered `(r, fm)` cells.
        cells: Vec<(u8, u8)>,
    },
}

/// The RFM inputs of one profile, typically taken from [`crate::features::ProfileFeatures`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RfmInput {
    /// Days since the last order (smaller is better). Customers without orders should not be
    /// scored; filter them out before calling.
    pub recency_days: f64,
    /// Number of orders (larger is better).
    pub frequency: f64,
    /// Monetary value, e.g. total net spend in minor units (larger is better).
    pub monetary: f64,
}

/// R, F and M scores, each in `1..=5` (5 is best).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RfmScore {
    /// Recency score: 5 for the most recent fifth of the base.
    pub r: u8,
    /// Frequency score: 5 for the most frequent fifth.
    pub f: u8,
    /// Monetary score: 5 for the highest-spending fifth.
    pub m: u8,
}

impl RfmScore {
    /// FM score: the mean of F and M rounded half up, in `1..=5` (F 4, M 5 → 5). Rounding up
    /// gives the benefit of the doubt to customers strong on one of the two axes.
    #[must_use]
    pub fn fm(&self) -> u8 {
        (self.f + self.m).div_ceil(2)
    }

    /// The conventional three-digit code, e.g. `"545"`.
    #[must_use]
    pub fn code(&self) -> String {
        format!("{}{}{}", self.r, self.f, self.m)
    }
}

/// Value-space boundaries of the quintiles of one batch.
///
/// Each array holds, for quintiles 1 to 4 (in ascending order of the *raw value*), the largest
/// value that the batch placed in that quintile. A value `v` belongs to value-quintile
/// `1 + #{c : v > c}`: bins are closed on the right, so **a value equal to a cut point scores
/// in the lower quintile** (the quintile whose maximum it equals). For F and M the
/// value-quintile is the score; for R (days ascending) the score is `6 - value-quintile`, so a
/// recency equal to a cut point gets the *higher* R score of the two adjacent ones.
///
/// Re-scoring with cut points reproduces the batch score of every profile except those whose
/// value is tied with a cut point and which the batch's ordinal tiebreak pushed into the upper
/// quintile; those get the lower one (they are indistinguishable from the cut value anyway).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RfmCutPoints {
    /// Upper bounds (inclusive) of recency-days quintiles 1..=4, i.e. of R scores 5..=2.
    pub recency_days: [f64; 4],
    /// Upper bounds (inclusive) of frequency scores 1..=4.
    pub frequency: [f64; 4],
    /// Upper bounds (inclusive) of monetary scores 1..=4.
    pub monetary: [f64; 4],
    /// Number of profiles in the batch the cut points were computed from.
    pub base_size: usize,
}

fn value_quintile(cuts: &[f64; 4], value: f64) -> u8 {
    let above = cuts.iter().filter(|&&c| value > c).count();
    // at most 4 → fits in u8
    1 + u8::try_from(above).unwrap_or(4)
}

impl RfmCutPoints {
    /// Scores one profile against these cut points without re-ranking the base. Values outside
    /// the batch's range clamp to score 1 or 5. NaN scores as the lowest value quintile.
    #[must_use]
    pub fn score(&self, input: &RfmInput) -> RfmScore {
        RfmScore {
            r: 6 - value_quintile(&self.recency_days, input.recency_days),
            f: value_quintile(&self.frequency, input.frequency),
            m: value_quintile(&self.monetary, input.monetary),
        }
    }
}

/// Quintile (1..=5) of the 1-based ordinal rank `rank` among `n` ranks; see the module doc.
#[must_use]
pub fn rank_quintile(rank: usize, n: usize) -> u8 {
    if n <= 1 || rank <= 1 {
        return 1;
    }
    let q = (5 * (rank - 1)).div_ceil(n - 1).clamp(1, 5);
    u8::try_from(q).unwrap_or(5)
}

/// Quintiles (in input order) and value cut points of one column.
fn quintiles_of(values: &[f64]) -> (Vec<u8>, [f64; 4]) {
    let n = values.len();
    let mut order: Vec<usize> = (0..n).collect();
    // stable sort: equal values keep input order, i.e. rank method="first"
    order.sort_by(|&a, &b| values[a].partial_cmp(&values[b]).unwrap_or(Ordering::Equal));
    let mut quintiles = vec![0_u8; n];
    let mut cuts = [f64::NEG_INFINITY; 4];
    for (pos, &idx) in order.iter().enumerate() {
        let q = rank_quintile(pos + 1, n);
        quintiles[idx] = q;
        if q <= 4 {
            cuts[usize::from(q - 1)] = values[idx];
        }
    }
    // Quintiles that received no rank (only for n < 5) inherit the previous cut so that the
    // cut points stay non-decreasing.
    for i in 1..4 {
        if cuts[i] < cuts[i - 1] {
            cuts[i] = cuts[i - 1];
        }
    }
    (quintiles, cuts)
}

/// Scores of a batch and the cut points to re-score single profiles later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RfmBatch {
    /// Scores in the order of the input slice.
    pub scores: Vec<RfmScore>,
    /// Cut points of this batch.
    pub cut_points: RfmCutPoints,
}

/// One rectangle of the (R, FM) grid mapped to a segment name. Bounds are inclusive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRule {
    /// Segment name, e.g. `"Champions"`.
    pub name: String,
    /// Lowest R score of the rectangle (1..=5).
    pub r_min: u8,
    /// Highest R score of the rectangle (1..=5).
    pub r_max: u8,
    /// Lowest FM score of the rectangle (1..=5).
    pub fm_min: u8,
    /// Highest FM score of the rectangle (1..=5).
    pub fm_max: u8,
}

impl SegmentRule {
    /// A rule covering `r_min..=r_max` × `fm_min..=fm_max`.
    #[must_use]
    pub fn new(name: &str, r_min: u8, r_max: u8, fm_min: u8, fm_max: u8) -> Self {
        Self {
            name: name.to_owned(),
            r_min,
            r_max,
            fm_min,
            fm_max,
        }
    }

    fn contains(&self, r: u8, fm: u8) -> bool {
        (self.r_min..=self.r_max).contains(&r) && (self.fm_min..=self.fm_max).contains(&fm)
    }
}

/// A validated map from (R, FM) score cells to segment names: an ordered list of rectangles,
/// the first rectangle containing a cell wins, and every one of the 25 cells must be covered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentMap {
    rules: Vec<SegmentRule>,
    /// `cell[r-1][fm-1]` = index of the winning rule.
    cell: [[usize; 5]; 5],
}

impl SegmentMap {
    /// Validates `rules` (bounds in `1..=5`, min ≤ max, all 25 cells covered) and builds the
    /// lookup table.
    ///
    /// # Errors
    /// [`RfmError::InvalidRule`] for a malformed rectangle, [`RfmError::UncoveredCells`] when
    /// some cells match no rule.
    pub fn new(rules: Vec<SegmentRule>) -> Result<Self, RfmError> {
        for rule in &rules {
            let ok = (1..=5).contains(&rule.r_min)
                && (1..=5).contains(&rule.r_max)
                && (1..=5).contains(&rule.fm_min)
                && (1..=5).contains(&rule.fm_max)
                && rule.r_min <= rule.r_max
                && rule.fm_min <= rule.fm_max;
            if !ok {
                return Err(RfmError::InvalidRule {
                    name: rule.name.clone(),
                });
            }
        }
        let mut cell = [[0_usize; 5]; 5];
        let mut uncovered = Vec::new();
        for r in 1..=5_u8 {
            for fm in 1..=5_u8 {
                match rules.iter().position(|rule| rule.contains(r, fm)) {
                    Some(i) => cell[usize::from(r - 1)][usize::from(fm - 1)] = i,
                    None => uncovered.push((r, fm)),
                }
            }
        }
        if !uncovered.is_empty() {
            return Err(RfmError::UncoveredCells { cells: uncovered });
        }
        Ok(Self { rules, cell })
    }

    /// The standard 11-segment map (the common "RFM segmentation" grid of R score against FM
    /// score), first match wins:
    ///
    /// ```text
    ///  FM 5 | Can't Lose  Can't Lose  Loyal       Loyal       Champions
    ///  FM 4 | At Risk     At Risk     Loyal       Loyal       Champions
    ///  FM 3 | At Risk     At Risk     Need Att.   Pot. Loyal  Pot. Loyal
    ///  FM 2 | Hibernating Hibernating About Sleep Pot. Loyal  Pot. Loyal
    ///  FM 1 | Lost        Hibernating About Sleep Promising   New Customers
    ///       +------------------------------------------------------------
    ///          R 1         R 2         R 3         R 4         R 5
    /// ```
    ///
    /// As rules: Champions R5 FM4–5; Loyal Customers R3–4 FM4–5; Potential Loyalists R4–5
    /// FM2–3; New Customers R5 FM1; Promising R4 FM1; Need Attention R3 FM3; About to Sleep
    /// R3 FM1–2; Can't Lose Them R1–2 FM5; At Risk R1–2 FM3–4; Lost R1 FM1; Hibernating R1–2
    /// FM1–2 (after Lost). This is the well-known regex map (`5[4-5]` Champions,
    /// `[3-4][4-5]` Loyal, …, `[1-2][1-2]` Hibernating) with its bottom-left cell split off
    /// as Lost.
    #[must_use]
    pub fn standard() -> Self {
        let rules = vec![
            SegmentRule::new("Champions", 5, 5, 4, 5),
            SegmentRule::new("Loyal Customers", 3, 4, 4, 5),
            SegmentRule::new("Potential Loyalists", 4, 5, 2, 3),
            SegmentRule::new("New Customers", 5, 5, 1, 1),
            SegmentRule::new("Promising", 4, 4, 1, 1),
            SegmentRule::new("Need Attention", 3, 3, 3, 3),
            SegmentRule::new("About to Sleep", 3, 3, 1, 2),
            SegmentRule::new("Can't Lose Them", 1, 2, 5, 5),
            SegmentRule::new("At Risk", 1, 2, 3, 4),
            SegmentRule::new("Lost", 1, 1, 1, 1),
            SegmentRule::new("Hibernating", 1, 2, 1, 2),
        ];
        match Self::new(rules) {
            Ok(map) => map,
            Err(e) => unreachable!("standard segment map is valid: {e}"),
        }
    }

    /// Rules in priority order.
    #[must_use]
    pub fn rules(&self) -> &[SegmentRule] {
        &self.rules
    }

    /// Segment name of an (R, FM) cell; scores outside `1..=5` are clamped into range.
    #[must_use]
    pub fn segment(&self, r: u8, fm: u8) -> &str {
        let r = usize::from(r.clamp(1, 5) - 1);
        let fm = usize::from(fm.clamp(1, 5) - 1);
        &self.rules[self.cell[r][fm]].name
    }
}

impl<'de> Deserialize<'de> for SegmentMap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            rules: Vec<SegmentRule>,
        }
        let raw = Raw::deserialize(deserializer)?;
        Self::new(raw.rules).map_err(serde::de::Error::custom)
    }
}

impl Default for SegmentMap {
    fn default() -> Self {
        Self::standard()
    }
}

/// Quintile RFM scorer over a customer base, with named segments.
///
/// Deterministic: the same inputs in the same order always produce the same scores; the input
/// order is the tiebreak between equal values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RfmScorer {
    segments: SegmentMap,
}

impl RfmScorer {
    /// A scorer naming segments with `segments`.
    #[must_use]
    pub fn new(segments: SegmentMap) -> Self {
        Self { segments }
    }

    /// The segment map in use.
    #[must_use]
    pub fn segment_map(&self) -> &SegmentMap {
        &self.segments
    }

    /// Scores the whole base by rank-then-quintile (see the module doc) and returns the scores
    /// in input order plus the cut points for later single-profile re-scoring.
    ///
    /// A base of one profile scores R 5, F 1, M 1 (its rank is 1 in every column).
    ///
    /// # Errors
    /// [`RfmError::EmptyBase`] for no input, [`RfmError::NonFinite`] for NaN or infinite values.
    pub fn score_base(&self, inputs: &[RfmInput]) -> Result<RfmBatch, RfmError> {
        if inputs.is_empty() {
            return Err(RfmError::EmptyBase);
        }
        for (index, input) in inputs.iter().enumerate() {
            for (field, value) in [
                ("recency", input.recency_days),
                ("frequency", input.frequency),
                ("monetary", input.monetary),
            ] {
                if !value.is_finite() {
                    return Err(RfmError::NonFinite { index, field });
                }
            }
        }
        let recency: Vec<f64> = inputs.iter().map(|i| i.recency_days).collect();
        let frequency: Vec<f64> = inputs.iter().map(|i| i.frequency).collect();
        let monetary: Vec<f64> = inputs.iter().map(|i| i.monetary).collect();
        let (rq, rcuts) = quintiles_of(&recency);
        let (fq, fcuts) = quintiles_of(&frequency);
        let (mq, mcuts) = quintiles_of(&monetary);
        let scores = (0..inputs.len())
            .map(|i| RfmScore {
                r: 6 - rq[i],
                f: fq[i],
                m: mq[i],
            })
            .collect();
        Ok(RfmBatch {
            scores,
            cut_points: RfmCutPoints {
                recency_days: rcuts,
                frequency: fcuts,
                monetary: mcuts,
                base_size: inputs.len(),
            },
        })
    }

    /// Segment name of a score (R against FM, see [`RfmScore::fm`]).
    #[must_use]
    pub fn segment(&self, score: &RfmScore) -> &str {
        self.segments.segment(score.r, score.fm())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn input(r: f64, f: f64, m: f64) -> RfmInput {
        RfmInput {
            recency_days: r,
            frequency: f,
            monetary: m,
        }
    }

    #[test]
    fn ten_distinct_values_split_two_per_quintile() {
        let inputs: Vec<RfmInput> = (1..=10)
            .map(|i| input(f64::from(i), f64::from(i), f64::from(i)))
            .collect();
        let batch = RfmScorer::default().score_base(&inputs).unwrap();
        let f: Vec<u8> = batch.scores.iter().map(|s| s.f).collect();
        let r: Vec<u8> = batch.scores.iter().map(|s| s.r).collect();
        assert_eq!(f, vec![1, 1, 2, 2, 3, 3, 4, 4, 5, 5]);
        assert_eq!(r, vec![5, 5, 4, 4, 3, 3, 2, 2, 1, 1]);
        assert_eq!(batch.cut_points.frequency, [2.0, 4.0, 6.0, 8.0]);
    }

    #[test]
    fn ties_are_broken_by_input_order() {
        let inputs: Vec<RfmInput> = (0..10).map(|_| input(1.0, 1.0, 1.0)).collect();
        let batch = RfmScorer::default().score_base(&inputs).unwrap();
        let m: Vec<u8> = batch.scores.iter().map(|s| s.m).collect();
        assert_eq!(m, vec![1, 1, 2, 2, 3, 3, 4, 4, 5, 5]);
    }

    #[test]
    fn value_equal_to_cut_point_scores_in_lower_quintile() {
        let inputs: Vec<RfmInput> = (1..=10)
            .map(|i| input(f64::from(i), f64::from(i), f64::from(i)))
            .collect();
        let cuts = RfmScorer::default().score_base(&inputs).unwrap().cut_points;
        let at_cut = cuts.score(&input(4.0, 4.0, 4.0));
        assert_eq!((at_cut.f, at_cut.m), (2, 2));
        // recency 4 days sits in value quintile 2 → R = 4 (the higher of R 4 / R 3)
        assert_eq!(at_cut.r, 4);
        let just_above = cuts.score(&input(4.5, 4.5, 4.5));
        assert_eq!((just_above.r, just_above.f, just_above.m), (3, 3, 3));
    }

    #[test]
    fn rescoring_with_cut_points_reproduces_batch_scores_for_distinct_values() {
        let inputs: Vec<RfmInput> = (0..37)
            .map(|i| {
                let x = f64::from(i);
                input((x * 7.3) % 41.0, (x * 3.1) % 13.0, x * x)
            })
            .collect();
        let batch = RfmScorer::default().score_base(&inputs).unwrap();
        for (inp, score) in inputs.iter().zip(&batch.scores) {
            assert_eq!(batch.cut_points.score(inp), *score);
        }
    }

    #[test]
    fn values_outside_base_range_clamp_to_extreme_scores() {
        let inputs: Vec<RfmInput> = (1..=10)
            .map(|i| input(f64::from(i), f64::from(i), f64::from(i)))
            .collect();
        let cuts = RfmScorer::default().score_base(&inputs).unwrap().cut_points;
        assert_eq!(
            cuts.score(&input(-1.0, 1e9, 1e9)),
            RfmScore { r: 5, f: 5, m: 5 }
        );
        assert_eq!(
            cuts.score(&input(1e9, 0.0, -5.0)),
            RfmScore { r: 1, f: 1, m: 1 }
        );
    }

    #[test]
    fn single_profile_base_scores_recent_but_low_value() {
        let batch = RfmScorer::default()
            .score_base(&[input(3.0, 2.0, 10.0)])
            .unwrap();
        assert_eq!(batch.scores[0], RfmScore { r: 5, f: 1, m: 1 });
    }

    #[test]
    fn two_profile_base_uses_extreme_quintiles() {
        let batch = RfmScorer::default()
            .score_base(&[input(3.0, 2.0, 10.0), input(1.0, 5.0, 5.0)])
            .unwrap();
        assert_eq!(batch.scores[0], RfmScore { r: 1, f: 1, m: 5 });
        assert_eq!(batch.scores[1], RfmScore { r: 5, f: 5, m: 1 });
        // cut points stay non-decreasing even with empty middle quintiles
        assert_eq!(batch.cut_points.frequency, [2.0, 2.0, 2.0, 2.0]);
    }

    #[test]
    fn empty_base_is_rejected() {
        assert_eq!(
            RfmScorer::default().score_base(&[]),
            Err(RfmError::EmptyBase)
        );
    }

    #[test]
    fn non_finite_value_is_rejected() {
        let err = RfmScorer::default()
            .score_base(&[input(1.0, 1.0, 1.0), input(1.0, f64::NAN, 1.0)])
            .unwrap_err();
        assert_eq!(
            err,
            RfmError::NonFinite {
                index: 1,
                field: "frequency"
            }
        );
    }

    #[test]
    fn fm_score_rounds_half_up() {
        assert_eq!(RfmScore { r: 1, f: 4, m: 5 }.fm(), 5);
        assert_eq!(RfmScore { r: 1, f: 1, m: 2 }.fm(), 2);
        assert_eq!(RfmScore { r: 1, f: 3, m: 3 }.fm(), 3);
        assert_eq!(RfmScore { r: 5, f: 4, m: 3 }.code(), "543");
    }

    #[test]
    fn standard_map_names_every_cell_as_documented() {
        let map = SegmentMap::standard();
        let grid = [
            // fm = 1..=5 for r = 1
            [
                "Lost",
                "Hibernating",
                "At Risk",
                "At Risk",
                "Can't Lose Them",
            ],
            [
                "Hibernating",
                "Hibernating",
                "At Risk",
                "At Risk",
                "Can't Lose Them",
            ],
            [
                "About to Sleep",
                "About to Sleep",
                "Need Attention",
                "Loyal Customers",
                "Loyal Customers",
            ],
            [
                "Promising",
                "Potential Loyalists",
                "Potential Loyalists",
                "Loyal Customers",
                "Loyal Customers",
            ],
            [
                "New Customers",
                "Potential Loyalists",
                "Potential Loyalists",
                "Champions",
                "Champions",
            ],
        ];
        for (r, row) in (1..=5_u8).zip(grid) {
            for (fm, expected) in (1..=5_u8).zip(row) {
                assert_eq!(map.segment(r, fm), expected, "cell r={r} fm={fm}");
            }
        }
        let names: std::collections::BTreeSet<&str> =
            map.rules().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names.len(), 11);
    }

    #[test]
    fn first_matching_rule_wins() {
        let map = SegmentMap::new(vec![
            SegmentRule::new("Top", 5, 5, 5, 5),
            SegmentRule::new("Everyone", 1, 5, 1, 5),
        ])
        .unwrap();
        assert_eq!(map.segment(5, 5), "Top");
        assert_eq!(map.segment(5, 4), "Everyone");
    }

    #[test]
    fn map_with_uncovered_cells_is_rejected() {
        let err = SegmentMap::new(vec![SegmentRule::new("Most", 1, 5, 1, 4)]).unwrap_err();
        assert_eq!(
            err,
            RfmError::UncoveredCells {
                cells: vec![(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
            }
        );
    }

    #[test]
    fn map_with_out_of_range_rule_is_rejected() {
        let err = SegmentMap::new(vec![SegmentRule::new("Bad", 0, 5, 1, 5)]).unwrap_err();
        assert!(matches!(err, RfmError::InvalidRule { .. }));
        let err = SegmentMap::new(vec![SegmentRule::new("Inverted", 3, 2, 1, 5)]).unwrap_err();
        assert!(matches!(err, RfmError::InvalidRule { .. }));
    }

    #[test]
    fn standard_map_rules_rebuild_an_equal_map() {
        let map = SegmentMap::standard();
        let rebuilt = SegmentMap::new(map.rules().to_vec()).unwrap();
        assert_eq!(map, rebuilt);
    }

    #[test]
    fn scorer_names_segment_from_r_and_fm() {
        let scorer = RfmScorer::default();
        assert_eq!(scorer.segment(&RfmScore { r: 5, f: 5, m: 4 }), "Champions");
        assert_eq!(scorer.segment(&RfmScore { r: 1, f: 1, m: 1 }), "Lost");
        assert_eq!(
            scorer.segment(&RfmScore { r: 2, f: 5, m: 5 }),
            "Can't Lose Them"
        );
    }
}
