//! Event-derived metrics: how an ingested event becomes conversions (pure, no I/O).
//!
//! Conversions from events are stored **once per event**, not once per metric: an event of
//! kind K is recorded under the *source key* of K ([`source_key`], e.g. `@order_completed`,
//! `@custom:signup`) with the idempotency key `event:<source>/<event_id>`, and every
//! event-derived metric reads the conversions of its source key. So a redelivered event (the
//! feed is at-least-once) replays its key and counts once, a metric defined later sees the
//! events already recorded, and two metrics on the same kind (say a binary "purchased" and a
//! continuous "revenue") share the rows. Source keys start with `@`, which metric keys cannot,
//! so they never collide with recorded metrics.
//!
//! Purchases and refunds:
//! * ORDER_COMPLETED is always recorded (`@order_completed`), with the order total as value, at
//!   the order's `occurred_at`, for the profile the event was resolved to. A second
//!   ORDER_COMPLETED with an order id already seen is ignored (the first one wins, as for RFM
//!   and points).
//! * ORDER_REFUNDED reduces the revenue of the order it refunds: it is recorded under
//!   `@order_completed` as a **negative** value at the *order's* time and for the order's unit
//!   (key `refund:<source>/<event_id>`), so revenue per unit is "order total minus refunds of
//!   that order", counted in the conversion window exactly when the order is. A refund of an
//!   order bought before exposure therefore never reduces a unit's in-experiment revenue. A
//!   refund arriving before its order waits until the order is seen. Refunds never change
//!   binary metrics: a refunded purchase still happened (use a binary metric on
//!   EVENT_KIND_ORDER_REFUNDED, with goal DECREASE, as a refund-rate guardrail).
//! * Other kinds are recorded only while some experiment has an event metric on them (the
//!   `wanted` set), with value 0.
//!
//! Whether a conversion counts for an experiment (after the unit's first exposure, within the
//! metric's window, in the metric's currency) is decided when results are computed, not here.

use std::collections::BTreeSet;

use clientele_proto::v1 as pb;
use clientele_runtime::time::micros;

/// Source key of ORDER_COMPLETED: purchases and their revenue (net of refunds).
pub const ORDER_COMPLETED: &str = "@order_completed";

/// The source key conversions of an event metric are stored under: `@<kind>` (lower case,
/// without the `EVENT_KIND_` prefix) or `@custom:<name>` for custom events.
#[must_use]
pub fn source_key(kind: pb::EventKind, custom_event_name: &str) -> String {
    if kind == pb::EventKind::Custom {
        return format!("@custom:{custom_event_name}");
    }
    let name = kind.as_str_name();
    let name = name.strip_prefix("EVENT_KIND_").unwrap_or(name);
    format!("@{}", name.to_ascii_lowercase())
}

/// The key a metric's conversions are read from: its own key for recorded metrics, the
/// source key of its event kind for event-derived ones.
#[must_use]
pub fn conversion_key(metric: &pb::Metric) -> String {
    match &metric.source {
        Some(pb::metric::Source::Event(e)) => source_key(
            pb::EventKind::try_from(e.kind).unwrap_or(pb::EventKind::Unspecified),
            &e.custom_event_name,
        ),
        _ => metric.key.clone(),
    }
}

/// Whether `metric` reads conversions from ingested events.
#[must_use]
pub fn is_event_metric(metric: &pb::Metric) -> bool {
    matches!(metric.source, Some(pb::metric::Source::Event(_)))
}

/// The source keys event metrics of `experiments` read (always including purchases).
pub fn wanted_keys<'a>(
    experiments: impl IntoIterator<Item = &'a pb::Experiment>,
) -> BTreeSet<String> {
    let mut keys = BTreeSet::from([ORDER_COMPLETED.to_owned()]);
    for e in experiments {
        for m in e.primary_metric.iter().chain(&e.guardrail_metrics) {
            if is_event_metric(m) {
                keys.insert(conversion_key(m));
            }
        }
    }
    keys
}

/// What one ingested event contributes to experiment metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventFact {
    /// A purchase: recorded under [`ORDER_COMPLETED`] unless the order id was seen before.
    Order {
        /// `event:<source>/<event_id>`.
        idempotency_key: String,
        /// The retailer's order id.
        order_id: String,
        /// The profile the event was resolved to.
        profile_id: String,
        /// When the order was placed, µs.
        occurred_at: i64,
        /// The order total in minor units (0 without a total).
        value_minor: i64,
        /// ISO 4217 code of the total, empty without one.
        currency: String,
    },
    /// A refund: a negative value for its order under [`ORDER_COMPLETED`], and, when wanted,
    /// a conversion of its own under `@order_refunded` (`own`).
    Refund {
        /// `refund:<source>/<event_id>`.
        idempotency_key: String,
        /// The refunded order.
        order_id: String,
        /// The amount refunded, minor units, > 0.
        amount_minor: i64,
        /// Its ISO 4217 code.
        currency: String,
        /// The refund as a conversion of `@order_refunded`, when some metric wants it.
        own: Option<Box<EventFact>>,
    },
    /// Any other wanted event kind (and refunds as such): one conversion with value 0.
    Other {
        /// `event:<source>/<event_id>`.
        idempotency_key: String,
        /// The source key (`@cart_abandoned`, `@custom:signup`, …).
        source_key: String,
        /// The profile the event was resolved to.
        profile_id: String,
        /// When it happened, µs.
        occurred_at: i64,
    },
}

impl EventFact {
    /// The profile the fact belongs to, when it names one directly (refunds follow their
    /// order's unit).
    #[must_use]
    pub fn profile_id(&self) -> Option<&str> {
        match self {
            Self::Order { profile_id, .. } | Self::Other { profile_id, .. } => Some(profile_id),
            Self::Refund { own, .. } => own.as_deref().and_then(Self::profile_id),
        }
    }
}

/// The fact of one stored event, or `None` when it matters to no metric (unwanted kind, no
/// profile, no time, or a refund without a positive amount).
#[must_use]
pub fn fact_of(stored: &pb::StoredEvent, wanted: &BTreeSet<String>) -> Option<EventFact> {
    use pb::event::Payload;
    let event = stored.event.as_ref()?;
    if stored.profile_id.is_empty() {
        return None;
    }
    let occurred_at = event.occurred_at.as_ref().and_then(micros)?;
    let event_key = format!("event:{}/{}", event.source, event.event_id);
    let profile_id = stored.profile_id.clone();
    match event.payload.as_ref()? {
        Payload::OrderCompleted(o) => Some(EventFact::Order {
            idempotency_key: event_key,
            order_id: o.order_id.clone(),
            profile_id,
            occurred_at,
            value_minor: o.total.as_ref().map_or(0, |m| m.amount_minor),
            currency: o
                .total
                .as_ref()
                .map(|m| m.currency.clone())
                .unwrap_or_default(),
        }),
        Payload::OrderRefunded(r) => {
            let own_key = source_key(pb::EventKind::OrderRefunded, "");
            let own = wanted.contains(&own_key).then(|| {
                Box::new(EventFact::Other {
                    idempotency_key: event_key,
                    source_key: own_key,
                    profile_id,
                    occurred_at,
                })
            });
            let refund = r.refund.as_ref().filter(|m| m.amount_minor > 0);
            match refund {
                Some(m) => Some(EventFact::Refund {
                    idempotency_key: format!("refund:{}/{}", event.source, event.event_id),
                    order_id: r.order_id.clone(),
                    amount_minor: m.amount_minor,
                    currency: m.currency.clone(),
                    own,
                }),
                None => own.map(|b| *b),
            }
        }
        Payload::Custom(c) => {
            let key = source_key(pb::EventKind::Custom, &c.name);
            wanted.contains(&key).then_some(EventFact::Other {
                idempotency_key: event_key,
                source_key: key,
                profile_id,
                occurred_at,
            })
        }
        _ => {
            let kind = pb::EventKind::try_from(stored.kind).ok()?;
            let key = source_key(kind, "");
            wanted.contains(&key).then_some(EventFact::Other {
                idempotency_key: event_key,
                source_key: key,
                profile_id,
                occurred_at,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn stored(kind: pb::EventKind, payload: pb::event::Payload) -> pb::StoredEvent {
        pb::StoredEvent {
            event: Some(pb::Event {
                event_id: "e1".into(),
                source: "shop".into(),
                occurred_at: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                payload: Some(payload),
                ..Default::default()
            }),
            kind: kind as i32,
            profile_id: "p1".into(),
            ..Default::default()
        }
    }

    fn usd(amount_minor: i64) -> Option<pb::Money> {
        Some(pb::Money {
            amount_minor,
            currency: "USD".into(),
        })
    }

    #[test]
    fn source_keys_name_the_kind_and_cannot_collide_with_metric_keys() {
        assert_eq!(
            source_key(pb::EventKind::OrderCompleted, ""),
            ORDER_COMPLETED
        );
        assert_eq!(
            source_key(pb::EventKind::CartAbandoned, ""),
            "@cart_abandoned"
        );
        assert_eq!(
            source_key(pb::EventKind::Custom, "signup"),
            "@custom:signup"
        );
        assert!(!crate::definition::is_key(ORDER_COMPLETED));
    }

    #[test]
    fn an_order_is_a_purchase_with_its_total_for_its_profile() {
        let e = stored(
            pb::EventKind::OrderCompleted,
            pb::event::Payload::OrderCompleted(pb::OrderCompleted {
                order_id: "o1".into(),
                total: usd(4_200),
                ..Default::default()
            }),
        );
        assert_eq!(
            fact_of(&e, &BTreeSet::new()),
            Some(EventFact::Order {
                idempotency_key: "event:shop/e1".into(),
                order_id: "o1".into(),
                profile_id: "p1".into(),
                occurred_at: 1_700_000_000_000_000,
                value_minor: 4_200,
                currency: "USD".into(),
            })
        );
    }

    #[test]
    fn a_refund_reduces_its_order_and_counts_as_its_own_kind_only_when_wanted() {
        let e = stored(
            pb::EventKind::OrderRefunded,
            pb::event::Payload::OrderRefunded(pb::OrderRefunded {
                order_id: "o1".into(),
                refund: usd(500),
                ..Default::default()
            }),
        );
        let Some(EventFact::Refund {
            idempotency_key,
            amount_minor,
            own,
            ..
        }) = fact_of(&e, &BTreeSet::new())
        else {
            panic!("expected a refund");
        };
        assert_eq!(idempotency_key, "refund:shop/e1");
        assert_eq!(amount_minor, 500);
        assert!(own.is_none());
        let wanted = BTreeSet::from(["@order_refunded".to_owned()]);
        let Some(EventFact::Refund { own: Some(own), .. }) = fact_of(&e, &wanted) else {
            panic!("expected a refund with its own conversion");
        };
        assert_eq!(own.profile_id(), Some("p1"));
    }

    #[test]
    fn unwanted_kinds_and_events_without_a_profile_are_ignored() {
        let custom = stored(
            pb::EventKind::Custom,
            pb::event::Payload::Custom(pb::CustomEvent {
                name: "signup".into(),
                ..Default::default()
            }),
        );
        assert_eq!(fact_of(&custom, &BTreeSet::new()), None);
        let wanted = BTreeSet::from(["@custom:signup".to_owned()]);
        assert!(matches!(
            fact_of(&custom, &wanted),
            Some(EventFact::Other { ref source_key, .. }) if source_key == "@custom:signup"
        ));
        let mut anonymous = custom;
        anonymous.profile_id.clear();
        assert_eq!(fact_of(&anonymous, &wanted), None);
    }

    #[test]
    fn wanted_keys_always_include_purchases_and_every_event_metric_source() {
        let metric = |kind: pb::EventKind| pb::Metric {
            key: "m".into(),
            source: Some(pb::metric::Source::Event(pb::EventMetricSource {
                kind: kind as i32,
                custom_event_name: String::new(),
            })),
            ..Default::default()
        };
        let e = pb::Experiment {
            primary_metric: Some(metric(pb::EventKind::CartAbandoned)),
            guardrail_metrics: vec![metric(pb::EventKind::OrderRefunded)],
            ..Default::default()
        };
        let keys: Vec<String> = wanted_keys([&e]).into_iter().collect();
        assert_eq!(
            keys,
            vec!["@cart_abandoned", "@order_completed", "@order_refunded"]
        );
    }
}
