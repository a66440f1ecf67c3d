//! The global long-term holdout: a fixed share of all customers kept away from every
//! marketing experiment and every offer, to measure the overall effect of marketing.
//!
//! A unit is held out when `bucket(seed, unit_id, hash_version) < fraction`, with the same
//! GrowthBook hash as experiment assignment ([`crate::assignment::bucket`]) but a seed of its
//! own, so holdout membership is independent of every experiment's split. It is stateless
//! and deterministic: the OfferService evaluates the same function with the same
//! configuration (or asks `ExperimentService.IsInHoldout`) and both agree on who is held out.
//! Changing the seed or shrinking the fraction releases units from the holdout; growing the
//! fraction only adds units (ranges start at 0), which is why growth is the safe direction.

use serde::{Deserialize, Serialize};

use crate::assignment::{HashVersion, bucket};

/// Default hash seed of the global holdout. Never reuse an experiment key here.
pub const DEFAULT_HOLDOUT_SEED: &str = "clientele-global-holdout";
/// Largest allowed holdout share: beyond half, "holdout" is the treatment.
pub const MAX_HOLDOUT_FRACTION: f64 = 0.5;

/// Configuration of the global holdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldoutConfig {
    /// False means nobody is held out.
    pub enabled: bool,
    /// Share of units held out, in `[0, MAX_HOLDOUT_FRACTION]`.
    pub fraction: f64,
    /// Hash seed, independent of experiment seeds.
    pub seed: String,
    /// Hash version; 2 for any new deployment.
    pub hash_version: HashVersion,
    /// Since when this configuration is in force, µs since the Unix epoch.
    pub effective_since: i64,
}

impl Default for HoldoutConfig {
    /// Disabled, so a deployment holds nobody out until it configures a share on purpose.
    fn default() -> Self {
        Self {
            enabled: false,
            fraction: 0.0,
            seed: DEFAULT_HOLDOUT_SEED.to_owned(),
            hash_version: HashVersion::V2,
            effective_since: 0,
        }
    }
}

/// Why a holdout configuration is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HoldoutError {
    /// `fraction` outside `[0, MAX_HOLDOUT_FRACTION]` or NaN.
    #[error("holdout fraction must be within [0, {MAX_HOLDOUT_FRACTION}], got {0}")]
    Fraction(f64),
    /// `seed` is empty.
    #[error("holdout seed must not be empty")]
    EmptySeed,
}

impl HoldoutConfig {
    /// An enabled holdout of `fraction` with the default seed and hash version 2.
    ///
    /// # Errors
    /// [`HoldoutError::Fraction`] outside `[0, MAX_HOLDOUT_FRACTION]`.
    pub fn enabled(fraction: f64) -> Result<Self, HoldoutError> {
        let config = Self {
            enabled: true,
            fraction,
            ..Self::default()
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the fraction and seed.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), HoldoutError> {
        if !(0.0..=MAX_HOLDOUT_FRACTION).contains(&self.fraction) {
            return Err(HoldoutError::Fraction(self.fraction));
        }
        if self.seed.is_empty() {
            return Err(HoldoutError::EmptySeed);
        }
        Ok(())
    }

    /// The unit's holdout bucket in `[0, 1)`.
    #[must_use]
    pub fn bucket(&self, unit_id: &str) -> f64 {
        bucket(&self.seed, unit_id, self.hash_version)
    }

    /// Whether `unit_id` is held out. An empty id is never held out.
    #[must_use]
    pub fn contains(&self, unit_id: &str) -> bool {
        self.enabled && !unit_id.is_empty() && self.bucket(unit_id) < self.fraction
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn disabled_holdout_holds_nobody() {
        let h = HoldoutConfig::default();
        assert!((0..1000).all(|i| !h.contains(&format!("u{i}"))));
    }

    #[test]
    fn enabled_holdout_holds_about_its_share_deterministically() {
        let h = HoldoutConfig::enabled(0.1).unwrap();
        let held = (0..20_000).filter(|i| h.contains(&format!("u{i}"))).count();
        assert!((1_700..2_300).contains(&held), "held {held}");
        assert_eq!(h.contains("u42"), h.contains("u42"));
    }

    #[test]
    fn growing_the_fraction_only_adds_units() {
        let small = HoldoutConfig::enabled(0.05).unwrap();
        let large = HoldoutConfig::enabled(0.2).unwrap();
        for i in 0..5_000 {
            let id = format!("u{i}");
            if small.contains(&id) {
                assert!(large.contains(&id));
            }
        }
    }

    #[test]
    fn fraction_above_half_is_refused() {
        assert_eq!(
            HoldoutConfig::enabled(0.6),
            Err(HoldoutError::Fraction(0.6))
        );
    }
}
