//! The offer catalogue: what an offer gives, who may get it, where, when and
//! how often. Pure data plus the pure checks [`crate::decision::decide`] uses.
//!
//! # Consent
//!
//! An offer needs, on a given [`Channel`] (see [`Offer::required_consents`]):
//!
//! * if it is **marketing**, the channel's marketing consent: email →
//!   [`ConsentPurpose::EmailMarketing`], SMS → [`ConsentPurpose::SmsMarketing`],
//!   push → [`ConsentPurpose::PushMarketing`]; web, app and POS are
//!   customer-initiated surfaces and need no channel consent;
//! * if it is **personalised** — its eligibility uses anything about the
//!   customer (segments, tiers, lifecycle state or a rule, see
//!   [`Eligibility::is_targeted`]) — [`ConsentPurpose::Personalisation`], on
//!   every channel. Personalisation is derived, not declared, so an offer
//!   cannot be mis-flagged as generic while targeting a segment.
//!
//! # Budgets
//!
//! [`Budget::would_exceed`] answers "would one more issuance exceed the
//! budget given this usage"; it is advisory for ranking. The store must
//! enforce the same rule atomically when it records the issuance, e.g.
//! `UPDATE offer_budget SET issued = issued + 1, spent_minor = spent_minor + $cost
//! WHERE offer_id = $1 AND issued + 1 <= max AND spent_minor + $cost <= limit`
//! and treat "no row updated" as [`crate::decision::RejectionReason::BudgetExhausted`].

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ledger::Points;
use crate::money::Money;
use crate::tiers::TierId;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// Builds the id from anything string-like.
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }
        }
    };
}

string_id!(
    /// A customer segment, e.g. `"champions"` or `"at-risk"` (from the segmentation crate).
    SegmentId
);
string_id!(
    /// A customer lifecycle state, e.g. `"active"`, `"lapsed"`.
    LifecycleState
);
string_id!(
    /// An offer's identifier, unique within a catalogue.
    OfferId
);
string_id!(
    /// An experiment's identifier.
    ExperimentId
);

/// The arm of an experiment a customer is assigned to (supplied by the caller).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ExperimentArm {
    /// The control group.
    Control,
    /// A named treatment variant.
    Variant(String),
}

/// What an offer gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OfferKind {
    /// Percentage off, in basis points (1 000 = 10 %), `1..=10_000`.
    PercentageDiscount {
        /// Discount in basis points.
        basis_points: u32,
    },
    /// A fixed amount off.
    FixedDiscount {
        /// The amount, `> 0`.
        amount: Money,
    },
    /// Flat bonus points on the next qualifying purchase.
    BonusPoints {
        /// Points, `> 0`.
        points: Points,
    },
    /// A points multiplier on the next qualifying purchase, in basis points.
    PointsMultiplier {
        /// Multiplier in basis points (20 000 = double points).
        multiplier_bp: u32,
    },
    /// Free shipping.
    FreeShipping,
    /// A perk or experience (event invitation, early access…).
    Perk {
        /// What the perk is.
        description: String,
    },
    /// A coupon code.
    Coupon {
        /// The code (or code prefix when the store mints unique codes).
        code: String,
    },
}

/// Where an offer is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Channel {
    /// Email.
    Email,
    /// SMS.
    Sms,
    /// Mobile push notification.
    Push,
    /// Website.
    Web,
    /// Mobile app (in-app).
    App,
    /// Point of sale.
    Pos,
}

impl Channel {
    /// The marketing consent this channel needs, if any (web/app/POS need none).
    pub fn marketing_consent(self) -> Option<ConsentPurpose> {
        match self {
            Channel::Email => Some(ConsentPurpose::EmailMarketing),
            Channel::Sms => Some(ConsentPurpose::SmsMarketing),
            Channel::Push => Some(ConsentPurpose::PushMarketing),
            Channel::Web | Channel::App | Channel::Pos => None,
        }
    }
}

/// A consent purpose the customer may have granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ConsentPurpose {
    /// Marketing by email.
    EmailMarketing,
    /// Marketing by SMS.
    SmsMarketing,
    /// Marketing by push notification.
    PushMarketing,
    /// Use of profile data to personalise offers.
    Personalisation,
}

/// Who may receive an offer. Empty sets mean "no requirement".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eligibility {
    /// The customer must be in at least one of these segments.
    pub segments_in: BTreeSet<SegmentId>,
    /// The customer must be in none of these segments (exclusion wins over inclusion).
    pub segments_out: BTreeSet<SegmentId>,
    /// The customer's tier must be one of these.
    pub tiers: BTreeSet<TierId>,
    /// The customer's lifecycle state must be one of these.
    pub lifecycle_states: BTreeSet<LifecycleState>,
    /// A rule id or expression the caller's [`crate::decision::RuleEvaluator`] must accept.
    pub rule: Option<String>,
}

impl Eligibility {
    /// Whether eligibility depends on anything about the customer (which makes
    /// the offer personalised and requires personalisation consent).
    pub fn is_targeted(&self) -> bool {
        !self.segments_in.is_empty()
            || !self.segments_out.is_empty()
            || !self.tiers.is_empty()
            || !self.lifecycle_states.is_empty()
            || self.rule.is_some()
    }
}

/// A global budget for an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Budget {
    /// At most `max_issuances` issuances in total.
    Count {
        /// Maximum issuances.
        max_issuances: u64,
    },
    /// At most `limit` spent, each issuance costing `cost_per_issuance_minor`
    /// (the face value of a fixed discount, or an estimate for percentage offers).
    Money {
        /// Total budget.
        limit: Money,
        /// Cost booked per issuance in `limit`'s currency minor units, `>= 0`.
        cost_per_issuance_minor: i64,
    },
}

/// How much of an offer's budget has been used (read from the store).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetUsage {
    /// Issuances so far.
    pub issued: u64,
    /// Money booked so far, minor units of the budget currency.
    pub spent_minor: i64,
}

impl Budget {
    /// Whether issuing once more would exceed the budget given `usage`.
    pub fn would_exceed(&self, usage: &BudgetUsage) -> bool {
        match self {
            Budget::Count { max_issuances } => usage.issued.saturating_add(1) > *max_issuances,
            Budget::Money {
                limit,
                cost_per_issuance_minor,
            } => usage.spent_minor.saturating_add(*cost_per_issuance_minor) > limit.amount_minor,
        }
    }
}

/// Ties an offer to an experiment.
///
/// The offer goes only to customers assigned to one of `arms`. Customers in
/// [`ExperimentArm::Control`] are withheld the offer unless `arms` contains
/// `Control` — that is how a "default variant" for the control group is
/// expressed. Customers without an assignment never get it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferExperiment {
    /// The experiment.
    pub experiment: ExperimentId,
    /// Arms that receive this offer; must not be empty.
    pub arms: BTreeSet<ExperimentArm>,
}

/// One offer of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// Unique id.
    pub id: OfferId,
    /// Display name.
    pub name: String,
    /// What it gives.
    pub kind: OfferKind,
    /// Who may get it.
    pub eligibility: Eligibility,
    /// Channels it may be delivered on; empty = all.
    pub channels: BTreeSet<Channel>,
    /// Whether this is marketing (needs the channel's marketing consent).
    pub marketing: bool,
    /// Valid from (inclusive).
    pub valid_from: DateTime<Utc>,
    /// Valid until (exclusive); `None` = open-ended.
    pub valid_until: Option<DateTime<Utc>>,
    /// Higher ranks first.
    pub priority: i32,
    /// Expected value (to the business or customer, as the programme defines)
    /// in minor units of the programme currency; breaks ties within a priority.
    pub expected_value_minor: i64,
    /// Maximum issuances to one customer; `None` = unlimited.
    pub per_customer_cap: Option<u32>,
    /// Global budget; `None` = unlimited.
    pub budget: Option<Budget>,
    /// Experiment binding, if the offer is under test.
    pub experiment: Option<OfferExperiment>,
}

impl Offer {
    /// Whether the offer is personalised (see the [module docs](self#consent)).
    pub fn is_personalised(&self) -> bool {
        self.eligibility.is_targeted()
    }

    /// Consents the customer must have granted for this offer on `channel`,
    /// at most two: the channel's marketing consent then personalisation.
    pub fn required_consents(&self, channel: Channel) -> impl Iterator<Item = ConsentPurpose> {
        let marketing = if self.marketing {
            channel.marketing_consent()
        } else {
            None
        };
        let personal = self
            .is_personalised()
            .then_some(ConsentPurpose::Personalisation);
        marketing.into_iter().chain(personal)
    }

    /// Whether `now` is within `[valid_from, valid_until)`.
    pub fn is_valid_at(&self, now: DateTime<Utc>) -> bool {
        self.valid_from <= now && self.valid_until.is_none_or(|until| now < until)
    }
}

/// At most `max_offers` issued to one customer within a rolling `window_hours`, across offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrequencyCap {
    /// Maximum issuances in the window.
    pub max_offers: u32,
    /// Window length in hours, `> 0`.
    pub window_hours: u32,
}

/// The set of offers plus catalogue-wide policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalogue {
    /// The offers; order is irrelevant.
    pub offers: Vec<Offer>,
    /// Per-customer frequency cap across offers; `None` = none.
    pub frequency_cap: Option<FrequencyCap>,
}

/// Invalid catalogue data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogueError {
    /// Two offers share an id.
    #[error("offer {0:?} is defined twice")]
    DuplicateOffer(OfferId),
    /// `valid_until` is not after `valid_from`.
    #[error("offer {0:?} has an empty validity window")]
    EmptyWindow(OfferId),
    /// A value out of range (percentage, points, amounts).
    #[error("offer {offer:?}: {detail}")]
    InvalidValue {
        /// The offer.
        offer: OfferId,
        /// What is wrong.
        detail: &'static str,
    },
    /// An experiment binding with no arms.
    #[error("offer {0:?} is bound to an experiment but to no arm")]
    NoExperimentArms(OfferId),
    /// A frequency cap with a zero window.
    #[error("the frequency cap window must be at least one hour")]
    EmptyFrequencyWindow,
}

impl Catalogue {
    /// Builds a validated catalogue.
    pub fn new(
        offers: Vec<Offer>,
        frequency_cap: Option<FrequencyCap>,
    ) -> Result<Self, CatalogueError> {
        let catalogue = Self {
            offers,
            frequency_cap,
        };
        catalogue.validate()?;
        Ok(catalogue)
    }

    /// Checks ids are unique and values are in range.
    pub fn validate(&self) -> Result<(), CatalogueError> {
        if self.frequency_cap.is_some_and(|c| c.window_hours == 0) {
            return Err(CatalogueError::EmptyFrequencyWindow);
        }
        let mut ids = HashSet::new();
        for offer in &self.offers {
            let invalid = |detail| CatalogueError::InvalidValue {
                offer: offer.id.clone(),
                detail,
            };
            if !ids.insert(&offer.id) {
                return Err(CatalogueError::DuplicateOffer(offer.id.clone()));
            }
            if offer.valid_until.is_some_and(|u| u <= offer.valid_from) {
                return Err(CatalogueError::EmptyWindow(offer.id.clone()));
            }
            match &offer.kind {
                OfferKind::PercentageDiscount { basis_points }
                    if *basis_points == 0 || *basis_points > 10_000 =>
                {
                    return Err(invalid("percentage must be 1..=10000 basis points"));
                }
                OfferKind::FixedDiscount { amount } if amount.amount_minor <= 0 => {
                    return Err(invalid("fixed discount must be positive"));
                }
                OfferKind::BonusPoints { points } if *points <= 0 => {
                    return Err(invalid("bonus points must be positive"));
                }
                OfferKind::PointsMultiplier { multiplier_bp } if *multiplier_bp == 0 => {
                    return Err(invalid("points multiplier must be positive"));
                }
                _ => {}
            }
            if let Some(Budget::Money {
                cost_per_issuance_minor,
                ..
            }) = &offer.budget
                && *cost_per_issuance_minor < 0
            {
                return Err(invalid("budget cost per issuance must not be negative"));
            }
            if offer.experiment.as_ref().is_some_and(|e| e.arms.is_empty()) {
                return Err(CatalogueError::NoExperimentArms(offer.id.clone()));
            }
        }
        Ok(())
    }

    /// The offer with this id.
    pub fn offer(&self, id: &OfferId) -> Option<&Offer> {
        self.offers.iter().find(|o| &o.id == id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::money::CurrencyCode;

    fn offer(id: &str) -> Offer {
        Offer {
            id: OfferId::new(id),
            name: id.into(),
            kind: OfferKind::FreeShipping,
            eligibility: Eligibility::default(),
            channels: BTreeSet::new(),
            marketing: true,
            valid_from: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
            valid_until: None,
            priority: 0,
            expected_value_minor: 0,
            per_customer_cap: None,
            budget: None,
            experiment: None,
        }
    }

    #[test]
    fn marketing_email_needs_email_consent_and_targeting_needs_personalisation() {
        let mut o = offer("a");
        assert_eq!(
            o.required_consents(Channel::Email).collect::<Vec<_>>(),
            vec![ConsentPurpose::EmailMarketing]
        );
        assert_eq!(o.required_consents(Channel::Web).count(), 0);
        o.eligibility
            .segments_in
            .insert(SegmentId::new("champions"));
        assert_eq!(
            o.required_consents(Channel::Sms).collect::<Vec<_>>(),
            vec![
                ConsentPurpose::SmsMarketing,
                ConsentPurpose::Personalisation
            ]
        );
        assert_eq!(
            o.required_consents(Channel::Pos).collect::<Vec<_>>(),
            vec![ConsentPurpose::Personalisation]
        );
    }

    #[test]
    fn budget_refuses_the_issuance_that_would_exceed_it() {
        let count = Budget::Count { max_issuances: 2 };
        assert!(!count.would_exceed(&BudgetUsage {
            issued: 1,
            spent_minor: 0
        }));
        assert!(count.would_exceed(&BudgetUsage {
            issued: 2,
            spent_minor: 0
        }));
        let money = Budget::Money {
            limit: Money::new(10_000, CurrencyCode::new("EUR").unwrap()),
            cost_per_issuance_minor: 2_000,
        };
        assert!(!money.would_exceed(&BudgetUsage {
            issued: 4,
            spent_minor: 8_000
        }));
        assert!(money.would_exceed(&BudgetUsage {
            issued: 5,
            spent_minor: 8_001
        }));
    }

    #[test]
    fn catalogue_rejects_duplicate_ids_and_bad_values() {
        assert!(matches!(
            Catalogue::new(vec![offer("a"), offer("a")], None),
            Err(CatalogueError::DuplicateOffer(_))
        ));
        let mut bad = offer("b");
        bad.kind = OfferKind::PercentageDiscount {
            basis_points: 10_001,
        };
        assert!(matches!(
            Catalogue::new(vec![bad], None),
            Err(CatalogueError::InvalidValue { .. })
        ));
    }
}
