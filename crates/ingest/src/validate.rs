//! Event validation and canonicalisation (pure, no I/O).
//!
//! [`validate_event`] checks one `Event` against the rules of `ingest.proto` and, when it is
//! valid, returns its canonical form: the user agent truncated to 512 bytes, plus everything
//! the store needs (the idempotency key, the payload hash, the kind, the aggregate effect).
//! A rejection names the offending field with a path relative to the event
//! (`order_completed.total.currency`), which callers prefix (`events[3].`).

use clientele_proto::v1 as pb;
use prost::Message;
use sha2::{Digest, Sha256};

/// Largest serialized event accepted, bytes.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Most identifiers per event.
pub const MAX_IDENTIFIERS: usize = 32;
/// Longest identifier value, bytes after trimming.
pub const MAX_IDENTIFIER_BYTES: usize = 256;
/// Most line items in an order, refund or cart.
pub const MAX_LINE_ITEMS: usize = 500;
/// Most properties on a custom event.
pub const MAX_PROPERTIES: usize = 64;
/// Longest string property value, bytes.
pub const MAX_PROPERTY_STRING_BYTES: usize = 1024;
/// Largest money amount accepted, minor units (10^15: a quadrillion cents).
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;
/// Longest user agent kept; longer values are truncated, not rejected.
pub const MAX_USER_AGENT_BYTES: usize = 512;
/// Earliest `occurred_at` accepted: 2000-01-01T00:00:00Z, µs since the epoch.
pub const EARLIEST_OCCURRED_AT: i64 = 946_684_800_000_000;

/// Active ISO 4217 currency codes (circulating currencies and the commonly used fund codes;
/// precious metals and testing codes are not money a customer pays with).
pub const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD",
    "CAD", "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY", "COP", "COU", "CRC", "CUC", "CUP",
    "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP",
    "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS",
    "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW",
    "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD",
    "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN",
    "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR",
    "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS",
    "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD",
    "TWD", "TZS", "UAH", "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES", "VND",
    "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

/// Is `code` an active ISO 4217 currency code?
pub fn is_currency(code: &str) -> bool {
    ISO_4217.binary_search(&code).is_ok()
}

/// A rejected field: its path relative to the event and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path from the event (`order_completed.line_items[2].quantity`); empty for the event.
    pub field: String,
    /// Why, in English; never contains the rejected value.
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Limits that come from settings rather than the contract.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The current time, µs since the epoch.
    pub now: i64,
    /// How far in the future `occurred_at` may be, µs.
    pub max_future_skew: i64,
    /// How far in the past `occurred_at` may be, µs; `None` means back to 2000-01-01 only.
    pub max_age: Option<i64>,
}

/// What an event does to its profile's aggregates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A completed order: counts once per order id (the first event wins).
    Order {
        /// The retailer's order id.
        order_id: String,
        /// Currency of the total.
        currency: String,
        /// Total in minor units.
        amount: i64,
    },
    /// A refund: counts when its order is known; a full refund also un-counts the order (once
    /// per order id).
    Refund {
        /// The refunded order's id.
        order_id: String,
        /// Currency of the refund.
        currency: String,
        /// Refunded minor units.
        amount: i64,
        /// True for `REFUND_TYPE_FULL`.
        full: bool,
    },
    /// A behaviour event: one increment of the engagement counter named by the kind.
    Engagement(&'static str),
}

/// A valid event in canonical form, ready to resolve and store.
#[derive(Debug, Clone)]
pub struct ValidEvent {
    /// The canonical event (user agent truncated).
    pub event: pb::Event,
    /// `source`, part of the key.
    pub source: String,
    /// `event_id`, part of the key.
    pub event_id: String,
    /// The payload case.
    pub kind: pb::EventKind,
    /// `CustomEvent.name` for custom events.
    pub custom_name: Option<String>,
    /// `occurred_at`, µs since the epoch.
    pub occurred_at: i64,
    /// SHA-256 of the canonical encoding (see [`payload_hash`]).
    pub hash: [u8; 32],
    /// The aggregate effect.
    pub effect: Effect,
}

impl ValidEvent {
    /// The idempotency key sent to ProfileService.ApplyAggregates: `<source>/<event_id>`,
    /// or `sha256:<hex>` of it when that is longer than the 128 bytes ApplyAggregates accepts.
    pub fn aggregate_key(&self) -> String {
        aggregate_key(&self.source, &self.event_id)
    }
}

/// See [`ValidEvent::aggregate_key`].
pub fn aggregate_key(source: &str, event_id: &str) -> String {
    let k = format!("{source}/{event_id}");
    if k.len() <= 128 {
        k
    } else {
        format!("sha256:{}", hex::encode(Sha256::digest(k.as_bytes())))
    }
}

/// The payload hash: SHA-256 over the protobuf encoding of the canonical event with custom
/// properties removed, followed by the properties sorted by key (protobuf maps encode in
/// arbitrary order, so they are hashed separately in a stable order).
pub fn payload_hash(event: &pb::Event) -> [u8; 32] {
    let mut h = Sha256::new();
    if let Some(pb::event::Payload::Custom(c)) = &event.payload {
        let mut bare = event.clone();
        if let Some(pb::event::Payload::Custom(bc)) = &mut bare.payload {
            bc.properties.clear();
        }
        h.update(bare.encode_to_vec());
        let mut keys: Vec<&String> = c.properties.keys().collect();
        keys.sort();
        for k in keys {
            let v = c.properties[k].encode_to_vec();
            h.update((k.len() as u64).to_le_bytes());
            h.update(k.as_bytes());
            h.update((v.len() as u64).to_le_bytes());
            h.update(&v);
        }
    } else {
        h.update(event.encode_to_vec());
    }
    h.finalize().into()
}

use clientele_runtime::time::micros;

/// The kind of a payload.
pub fn kind_of(payload: &pb::event::Payload) -> pb::EventKind {
    use pb::EventKind as K;
    use pb::event::Payload as P;
    match payload {
        P::OrderCompleted(_) => K::OrderCompleted,
        P::OrderRefunded(_) => K::OrderRefunded,
        P::ProductViewed(_) => K::ProductViewed,
        P::CartUpdated(_) => K::CartUpdated,
        P::CartAbandoned(_) => K::CartAbandoned,
        P::Searched(_) => K::Searched,
        P::PageViewed(_) => K::PageViewed,
        P::ScreenViewed(_) => K::ScreenViewed,
        P::AppOpened(_) => K::AppOpened,
        P::EmailOpened(_) => K::EmailOpened,
        P::EmailClicked(_) => K::EmailClicked,
        P::PushClicked(_) => K::PushClicked,
        P::ReviewSubmitted(_) => K::ReviewSubmitted,
        P::SurveyResponded(_) => K::SurveyResponded,
        P::Custom(_) => K::Custom,
    }
}

/// The payload field name of a kind ("order_completed"), which is also its engagement key.
pub fn kind_name(kind: pb::EventKind) -> &'static str {
    use pb::EventKind as K;
    match kind {
        K::Unspecified => "unspecified",
        K::OrderCompleted => "order_completed",
        K::OrderRefunded => "order_refunded",
        K::ProductViewed => "product_viewed",
        K::CartUpdated => "cart_updated",
        K::CartAbandoned => "cart_abandoned",
        K::Searched => "searched",
        K::PageViewed => "page_viewed",
        K::ScreenViewed => "screen_viewed",
        K::AppOpened => "app_opened",
        K::EmailOpened => "email_opened",
        K::EmailClicked => "email_clicked",
        K::PushClicked => "push_clicked",
        K::ReviewSubmitted => "review_submitted",
        K::SurveyResponded => "survey_responded",
        K::Custom => "custom",
    }
}

fn len_between(field: &str, s: &str, min: usize, max: usize) -> Result<(), FieldError> {
    if s.len() < min || s.len() > max {
        return Err(if min == 0 {
            bad(field, format!("must be at most {max} bytes"))
        } else {
            bad(field, format!("must be {min} to {max} bytes"))
        });
    }
    Ok(())
}

fn at_most(field: &str, s: &str, max: usize) -> Result<(), FieldError> {
    len_between(field, s, 0, max)
}

/// Checks the money at `field` and the event-wide currency (`currency` is the first one seen).
fn money(
    field: &str,
    m: Option<&pb::Money>,
    required: bool,
    positive: bool,
    currency: &mut Option<String>,
) -> Result<Option<(String, i64)>, FieldError> {
    let Some(m) = m else {
        return if required {
            Err(bad(field, "is required"))
        } else {
            Ok(None)
        };
    };
    if !is_currency(&m.currency) {
        return Err(bad(
            format!("{field}.currency"),
            "must be an active ISO 4217 code in upper case",
        ));
    }
    if m.amount_minor < 0 || (positive && m.amount_minor == 0) {
        return Err(bad(
            format!("{field}.amount_minor"),
            if positive {
                "must be greater than zero"
            } else {
                "must not be negative"
            },
        ));
    }
    if m.amount_minor > MAX_AMOUNT_MINOR {
        return Err(bad(
            format!("{field}.amount_minor"),
            format!("must be at most {MAX_AMOUNT_MINOR}"),
        ));
    }
    match currency {
        Some(c) if *c != m.currency => {
            return Err(bad(
                format!("{field}.currency"),
                format!("all money in one event must use the same currency ({c})"),
            ));
        }
        Some(_) => {}
        None => *currency = Some(m.currency.clone()),
    }
    Ok(Some((m.currency.clone(), m.amount_minor)))
}

fn line_items(
    field: &str,
    items: &[pb::LineItem],
    currency: &mut Option<String>,
) -> Result<(), FieldError> {
    if items.len() > MAX_LINE_ITEMS {
        return Err(bad(field, format!("at most {MAX_LINE_ITEMS} line items")));
    }
    for (i, li) in items.iter().enumerate() {
        let f = |s: &str| format!("{field}[{i}].{s}");
        len_between(&f("sku"), &li.sku, 1, 128)?;
        at_most(&f("category"), &li.category, 256)?;
        if !(1..=100_000).contains(&li.quantity) {
            return Err(bad(f("quantity"), "must be 1 to 100000"));
        }
        money(
            &f("unit_price"),
            li.unit_price.as_ref(),
            true,
            false,
            currency,
        )?;
        at_most(&f("name"), &li.name, 256)?;
    }
    Ok(())
}

fn identifiers(set: Option<&pb::IdentifierSet>) -> Result<(), FieldError> {
    let ids = set.map(|s| s.identifiers.as_slice()).unwrap_or_default();
    if ids.is_empty() || ids.len() > MAX_IDENTIFIERS {
        return Err(bad(
            "identifiers.identifiers",
            format!("1 to {MAX_IDENTIFIERS} identifiers are required"),
        ));
    }
    for (i, id) in ids.iter().enumerate() {
        let f = |s: &str| format!("identifiers.identifiers[{i}].{s}");
        let kind = pb::IdentifierType::try_from(id.r#type).unwrap_or_default();
        if kind == pb::IdentifierType::Unspecified {
            return Err(bad(f("type"), "must be a known identifier type"));
        }
        let v = id.value.trim();
        if v.is_empty() || v.len() > MAX_IDENTIFIER_BYTES {
            return Err(bad(
                f("value"),
                format!("must be 1 to {MAX_IDENTIFIER_BYTES} bytes after trimming"),
            ));
        }
        if v.chars().any(char::is_control) {
            return Err(bad(f("value"), "contains control characters"));
        }
        if kind == pb::IdentifierType::Custom {
            let ns = &id.namespace;
            let ok = !ns.is_empty()
                && ns.len() <= 64
                && ns.contains('.')
                && ns.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-')
                });
            if !ok {
                return Err(bad(
                    f("namespace"),
                    "custom identifiers need a dotted namespace of [a-z0-9_.-], 1 to 64 bytes",
                ));
            }
        } else if !id.namespace.is_empty() {
            return Err(bad(
                f("namespace"),
                "only custom identifiers have a namespace",
            ));
        }
    }
    Ok(())
}

fn enum_known<E: TryFrom<i32>>(field: &str, v: i32) -> Result<(), FieldError> {
    E::try_from(v)
        .map(|_| ())
        .map_err(|_| bad(field, "unknown enum value"))
}

fn context(ctx: &mut pb::EventContext) -> Result<(), FieldError> {
    enum_known::<pb::Channel>("context.channel", ctx.channel)?;
    at_most("context.locale", &ctx.locale, 35)?;
    at_most("context.time_zone", &ctx.time_zone, 64)?;
    at_most("context.store_id", &ctx.store_id, 64)?;
    at_most("context.session_id", &ctx.session_id, 128)?;
    if let Some(d) = &mut ctx.device {
        enum_known::<pb::DeviceType>("context.device.type", d.r#type)?;
        at_most("context.device.os_name", &d.os_name, 64)?;
        at_most("context.device.os_version", &d.os_version, 64)?;
        at_most("context.device.manufacturer", &d.manufacturer, 64)?;
        at_most("context.device.model", &d.model, 64)?;
        at_most("context.device.app_version", &d.app_version, 64)?;
        if d.user_agent.len() > MAX_USER_AGENT_BYTES {
            let mut end = MAX_USER_AGENT_BYTES;
            while !d.user_agent.is_char_boundary(end) {
                end -= 1;
            }
            d.user_agent.truncate(end);
        }
    }
    if let Some(c) = &ctx.campaign {
        for (name, v) in [
            ("source", &c.source),
            ("medium", &c.medium),
            ("name", &c.name),
            ("term", &c.term),
            ("content", &c.content),
            ("click_id", &c.click_id),
        ] {
            at_most(&format!("context.campaign.{name}"), v, 256)?;
        }
    }
    Ok(())
}

fn custom(c: &pb::CustomEvent) -> Result<(), FieldError> {
    let segments: Vec<&str> = c.name.split('.').collect();
    let name_ok = (3..=128).contains(&c.name.len())
        && segments.len() >= 2
        && segments.iter().all(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
        });
    if !name_ok {
        return Err(bad(
            "custom.name",
            "must be 3 to 128 bytes of dot-separated [a-z0-9_] segments, at least two",
        ));
    }
    if segments[0] == "clientele" {
        return Err(bad("custom.name", "the `clientele.` namespace is reserved"));
    }
    if c.properties.len() > MAX_PROPERTIES {
        return Err(bad(
            "custom.properties",
            format!("at most {MAX_PROPERTIES} properties"),
        ));
    }
    let mut keys: Vec<&String> = c.properties.keys().collect();
    keys.sort();
    for k in keys {
        let field = format!("custom.properties[{k:?}]");
        let key_ok = !k.is_empty()
            && k.len() <= 64
            && k.starts_with(|ch: char| ch.is_ascii_lowercase())
            && k.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_');
        if !key_ok {
            let field = format!("custom.properties[{:?}]", k.escape_debug().to_string());
            return Err(bad(field, "keys match [a-z][a-z0-9_]{0,63}"));
        }
        use pb::value::Kind;
        match &c.properties[k].kind {
            None => return Err(bad(field, "value has no kind set")),
            Some(Kind::StringValue(s)) if s.len() > MAX_PROPERTY_STRING_BYTES => {
                return Err(bad(
                    field,
                    format!("strings are at most {MAX_PROPERTY_STRING_BYTES} bytes"),
                ));
            }
            Some(Kind::DoubleValue(d)) if !d.is_finite() => {
                return Err(bad(field, "doubles must be finite"));
            }
            Some(Kind::TimestampValue(t)) if micros(t).is_none() => {
                return Err(bad(field, "timestamp out of range"));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Validates `event` against the contract and `limits`; returns its canonical form.
pub fn validate_event(mut event: pb::Event, limits: &Limits) -> Result<ValidEvent, FieldError> {
    if event.encoded_len() > MAX_EVENT_BYTES {
        return Err(bad(
            "",
            format!("event larger than {MAX_EVENT_BYTES} bytes"),
        ));
    }
    let id_ok = !event.event_id.is_empty()
        && event.event_id.len() <= 128
        && event.event_id.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if !id_ok {
        return Err(bad("event_id", "must be 1 to 128 bytes of printable ASCII"));
    }
    let source_ok = !event.source.is_empty()
        && event.source.len() <= 64
        && event
            .source
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'));
    if !source_ok {
        return Err(bad("source", "must be 1 to 64 bytes of [a-z0-9_.-]"));
    }
    let occurred_at = event
        .occurred_at
        .as_ref()
        .map(|t| micros(t).ok_or_else(|| bad("occurred_at", "is not a valid time")))
        .transpose()?
        .ok_or_else(|| bad("occurred_at", "is required"))?;
    if occurred_at > limits.now.saturating_add(limits.max_future_skew) {
        return Err(bad(
            "occurred_at",
            format!(
                "is more than {} s in the future",
                limits.max_future_skew / 1_000_000
            ),
        ));
    }
    let floor = limits.max_age.map_or(EARLIEST_OCCURRED_AT, |a| {
        limits.now.saturating_sub(a).max(EARLIEST_OCCURRED_AT)
    });
    if occurred_at < floor {
        return Err(bad(
            "occurred_at",
            if floor == EARLIEST_OCCURRED_AT {
                "is before 2000-01-01T00:00:00Z".to_string()
            } else {
                format!(
                    "is older than the ingestion horizon of {} days",
                    limits.max_age.unwrap_or(0) / 86_400_000_000
                )
            },
        ));
    }
    identifiers(event.identifiers.as_ref())?;
    if let Some(ctx) = &mut event.context {
        context(ctx)?;
    }
    let payload = event
        .payload
        .as_ref()
        .ok_or_else(|| bad("payload", "exactly one payload must be set"))?;
    let kind = kind_of(payload);
    let mut cur = None;
    let mut custom_name = None;
    use pb::event::Payload as P;
    let effect = match payload {
        P::OrderCompleted(o) => {
            len_between("order_completed.order_id", &o.order_id, 1, 128)?;
            let (currency, amount) = money(
                "order_completed.total",
                o.total.as_ref(),
                true,
                false,
                &mut cur,
            )?
            .unwrap_or_default();
            line_items("order_completed.line_items", &o.line_items, &mut cur)?;
            let channel = pb::Channel::try_from(o.channel).unwrap_or_default();
            if !matches!(
                channel,
                pb::Channel::Web | pb::Channel::App | pb::Channel::Pos
            ) {
                return Err(bad(
                    "order_completed.channel",
                    "must be CHANNEL_WEB, CHANNEL_APP or CHANNEL_POS",
                ));
            }
            if channel == pb::Channel::Pos {
                len_between("order_completed.store_id", &o.store_id, 1, 64)?;
            } else if !o.store_id.is_empty() {
                return Err(bad(
                    "order_completed.store_id",
                    "is only set for CHANNEL_POS orders",
                ));
            }
            money(
                "order_completed.discount_total",
                o.discount_total.as_ref(),
                false,
                false,
                &mut cur,
            )?;
            if o.offer_codes.len() > 20 {
                return Err(bad("order_completed.offer_codes", "at most 20 offer codes"));
            }
            for (i, c) in o.offer_codes.iter().enumerate() {
                len_between(&format!("order_completed.offer_codes[{i}]"), c, 1, 64)?;
            }
            Effect::Order {
                order_id: o.order_id.clone(),
                currency,
                amount,
            }
        }
        P::OrderRefunded(r) => {
            len_between("order_refunded.order_id", &r.order_id, 1, 128)?;
            let (currency, amount) = money(
                "order_refunded.refund",
                r.refund.as_ref(),
                true,
                true,
                &mut cur,
            )?
            .unwrap_or_default();
            let t = pb::RefundType::try_from(r.r#type).unwrap_or_default();
            if t == pb::RefundType::Unspecified {
                return Err(bad(
                    "order_refunded.type",
                    "must be REFUND_TYPE_FULL or REFUND_TYPE_PARTIAL",
                ));
            }
            line_items("order_refunded.line_items", &r.line_items, &mut cur)?;
            at_most("order_refunded.refund_id", &r.refund_id, 128)?;
            Effect::Refund {
                order_id: r.order_id.clone(),
                currency,
                amount,
                full: t == pb::RefundType::Full,
            }
        }
        P::ProductViewed(p) => {
            len_between("product_viewed.sku", &p.sku, 1, 128)?;
            at_most("product_viewed.category", &p.category, 256)?;
            money(
                "product_viewed.price",
                p.price.as_ref(),
                false,
                false,
                &mut cur,
            )?;
            at_most("product_viewed.name", &p.name, 256)?;
            Effect::Engagement(kind_name(kind))
        }
        P::CartUpdated(c) => {
            len_between("cart_updated.cart_id", &c.cart_id, 1, 128)?;
            line_items("cart_updated.line_items", &c.line_items, &mut cur)?;
            money(
                "cart_updated.cart_value",
                c.cart_value.as_ref(),
                true,
                false,
                &mut cur,
            )?;
            Effect::Engagement(kind_name(kind))
        }
        P::CartAbandoned(c) => {
            len_between("cart_abandoned.cart_id", &c.cart_id, 1, 128)?;
            money(
                "cart_abandoned.cart_value",
                c.cart_value.as_ref(),
                true,
                false,
                &mut cur,
            )?;
            line_items("cart_abandoned.line_items", &c.line_items, &mut cur)?;
            Effect::Engagement(kind_name(kind))
        }
        P::Searched(s) => {
            len_between("searched.query", &s.query, 1, 512)?;
            if s.result_count
                .is_some_and(|n| !(0..=1_000_000).contains(&n))
            {
                return Err(bad("searched.result_count", "must be 0 to 1000000"));
            }
            Effect::Engagement(kind_name(kind))
        }
        P::PageViewed(p) => {
            len_between("page_viewed.url", &p.url, 1, 2048)?;
            at_most("page_viewed.title", &p.title, 512)?;
            at_most("page_viewed.referrer", &p.referrer, 2048)?;
            Effect::Engagement(kind_name(kind))
        }
        P::ScreenViewed(s) => {
            len_between("screen_viewed.screen_name", &s.screen_name, 1, 256)?;
            Effect::Engagement(kind_name(kind))
        }
        P::AppOpened(a) => {
            at_most(
                "app_opened.from_push_message_id",
                &a.from_push_message_id,
                128,
            )?;
            Effect::Engagement(kind_name(kind))
        }
        P::EmailOpened(e) => {
            at_most("email_opened.campaign_id", &e.campaign_id, 128)?;
            at_most("email_opened.message_id", &e.message_id, 128)?;
            Effect::Engagement(kind_name(kind))
        }
        P::EmailClicked(e) => {
            at_most("email_clicked.campaign_id", &e.campaign_id, 128)?;
            at_most("email_clicked.message_id", &e.message_id, 128)?;
            len_between("email_clicked.url", &e.url, 1, 2048)?;
            Effect::Engagement(kind_name(kind))
        }
        P::PushClicked(p) => {
            at_most("push_clicked.campaign_id", &p.campaign_id, 128)?;
            at_most("push_clicked.message_id", &p.message_id, 128)?;
            at_most("push_clicked.action_id", &p.action_id, 64)?;
            Effect::Engagement(kind_name(kind))
        }
        P::ReviewSubmitted(r) => {
            len_between("review_submitted.review_id", &r.review_id, 1, 128)?;
            if !(1..=5).contains(&r.rating) {
                return Err(bad("review_submitted.rating", "must be 1 to 5"));
            }
            at_most("review_submitted.sku", &r.sku, 128)?;
            at_most("review_submitted.body", &r.body, 4096)?;
            Effect::Engagement(kind_name(kind))
        }
        P::SurveyResponded(s) => {
            len_between("survey_responded.survey_id", &s.survey_id, 1, 128)?;
            if !(0..=10).contains(&s.score) {
                return Err(bad("survey_responded.score", "must be 0 to 10"));
            }
            at_most("survey_responded.comment", &s.comment, 4096)?;
            Effect::Engagement(kind_name(kind))
        }
        P::Custom(c) => {
            custom(c)?;
            custom_name = Some(c.name.clone());
            Effect::Engagement(kind_name(kind))
        }
    };
    let hash = payload_hash(&event);
    Ok(ValidEvent {
        source: event.source.clone(),
        event_id: event.event_id.clone(),
        kind,
        custom_name,
        occurred_at,
        hash,
        effect,
        event,
    })
}

/// The event as stored: EMAIL and PHONE identifiers removed (their types are returned, one
/// entry per removed identifier), so raw contact details never reach the event log.
pub fn redact(mut e: pb::Event) -> (pb::Event, Vec<i32>) {
    let mut removed = Vec::new();
    if let Some(set) = &mut e.identifiers {
        set.identifiers.retain(|i| {
            let pii = i.r#type == pb::IdentifierType::Email as i32
                || i.r#type == pb::IdentifierType::Phone as i32;
            if pii {
                removed.push(i.r#type);
            }
            !pii
        });
    }
    (e, removed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clientele_runtime::time::timestamp;

    const NOW: i64 = 1_750_000_000_000_000;

    #[test]
    fn every_behaviour_kind_is_counted_in_the_profile_row() {
        // ProfileService keeps these counters as columns of the profile row; a kind missing
        // from its list would still count, but as an extra engagement row per profile.
        for code in 1..=15 {
            let kind = pb::EventKind::try_from(code).unwrap();
            if matches!(
                kind,
                pb::EventKind::OrderCompleted | pb::EventKind::OrderRefunded
            ) {
                continue;
            }
            assert!(
                clientele_profiles::row_engagement::row_counter(kind_name(kind)).is_some(),
                "{kind:?}"
            );
        }
        assert!(
            pb::EventKind::try_from(16).is_err(),
            "a new kind: list it here and there"
        );
    }

    fn limits() -> Limits {
        Limits {
            now: NOW,
            max_future_skew: 300_000_000,
            max_age: None,
        }
    }

    fn usd(amount: i64) -> Option<pb::Money> {
        Some(pb::Money {
            amount_minor: amount,
            currency: "USD".into(),
        })
    }

    fn order() -> pb::Event {
        pb::Event {
            event_id: "e-1".into(),
            source: "web".into(),
            occurred_at: Some(timestamp(NOW - 1_000_000)),
            identifiers: Some(pb::IdentifierSet {
                identifiers: vec![pb::Identifier {
                    r#type: pb::IdentifierType::CustomerId as i32,
                    value: "c-1".into(),
                    namespace: String::new(),
                }],
            }),
            context: None,
            payload: Some(pb::event::Payload::OrderCompleted(pb::OrderCompleted {
                order_id: "o-1".into(),
                total: usd(1234),
                channel: pb::Channel::Web as i32,
                ..Default::default()
            })),
        }
    }

    fn field_of(e: pb::Event) -> String {
        validate_event(e, &limits()).unwrap_err().field
    }

    fn with_order(f: impl FnOnce(&mut pb::OrderCompleted)) -> pb::Event {
        let mut e = order();
        if let Some(pb::event::Payload::OrderCompleted(o)) = &mut e.payload {
            f(o);
        }
        e
    }

    #[test]
    fn a_complete_order_is_valid_and_counts_its_total() {
        let v = validate_event(order(), &limits()).unwrap();
        assert_eq!(v.kind, pb::EventKind::OrderCompleted);
        assert_eq!(
            v.effect,
            Effect::Order {
                order_id: "o-1".into(),
                currency: "USD".into(),
                amount: 1234
            }
        );
        assert_eq!(v.aggregate_key(), "web/e-1");
    }

    #[test]
    fn unknown_or_lower_case_currencies_are_rejected_naming_the_field() {
        for c in ["usd", "ABC", "US", ""] {
            let e = with_order(|o| o.total.as_mut().unwrap().currency = c.into());
            assert_eq!(field_of(e), "order_completed.total.currency", "{c}");
        }
        assert!(is_currency("KRW") && is_currency("EUR") && !is_currency("XXX"));
    }

    #[test]
    fn the_currency_list_is_sorted_for_binary_search() {
        assert!(ISO_4217.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn negative_and_oversized_amounts_are_rejected() {
        let e = with_order(|o| o.total = usd(-1));
        assert_eq!(field_of(e), "order_completed.total.amount_minor");
        let e = with_order(|o| o.total = usd(MAX_AMOUNT_MINOR + 1));
        assert_eq!(field_of(e), "order_completed.total.amount_minor");
    }

    #[test]
    fn mixed_currencies_in_one_event_are_rejected() {
        let e = with_order(|o| {
            o.discount_total = Some(pb::Money {
                amount_minor: 1,
                currency: "EUR".into(),
            });
        });
        assert_eq!(field_of(e), "order_completed.discount_total.currency");
    }

    #[test]
    fn line_item_errors_name_the_item() {
        let e = with_order(|o| {
            o.line_items = vec![
                pb::LineItem {
                    sku: "a".into(),
                    quantity: 1,
                    unit_price: usd(1),
                    ..Default::default()
                },
                pb::LineItem {
                    sku: "b".into(),
                    quantity: 0,
                    unit_price: usd(1),
                    ..Default::default()
                },
            ];
        });
        assert_eq!(field_of(e), "order_completed.line_items[1].quantity");
    }

    #[test]
    fn events_too_far_in_the_future_or_past_are_rejected() {
        let mut e = order();
        e.occurred_at = Some(timestamp(NOW + 301_000_000));
        assert_eq!(field_of(e), "occurred_at");
        let mut e = order();
        e.occurred_at = Some(timestamp(NOW + 299_000_000));
        assert!(validate_event(e, &limits()).is_ok());
        let mut e = order();
        e.occurred_at = Some(timestamp(EARLIEST_OCCURRED_AT - 1));
        assert_eq!(field_of(e), "occurred_at");
        let mut e = order();
        e.occurred_at = Some(timestamp(NOW - 2 * 86_400_000_000));
        let horizon = Limits {
            max_age: Some(86_400_000_000),
            ..limits()
        };
        assert_eq!(
            validate_event(e, &horizon).unwrap_err().field,
            "occurred_at"
        );
        let mut e = order();
        e.occurred_at = None;
        assert_eq!(field_of(e), "occurred_at");
    }

    #[test]
    fn keys_must_be_printable_and_sources_lower_case() {
        let mut e = order();
        e.event_id = "has space".into();
        assert_eq!(field_of(e), "event_id");
        let mut e = order();
        e.source = "Web".into();
        assert_eq!(field_of(e), "source");
    }

    #[test]
    fn identifier_problems_name_the_identifier() {
        let mut e = order();
        e.identifiers = Some(pb::IdentifierSet {
            identifiers: vec![
                pb::Identifier {
                    r#type: 1,
                    value: "ok".into(),
                    namespace: String::new(),
                },
                pb::Identifier {
                    r#type: 6,
                    value: "x".into(),
                    namespace: "nodot".into(),
                },
            ],
        });
        assert_eq!(field_of(e), "identifiers.identifiers[1].namespace");
        let mut e = order();
        e.identifiers = None;
        assert_eq!(field_of(e), "identifiers.identifiers");
    }

    #[test]
    fn an_event_without_payload_is_rejected() {
        let mut e = order();
        e.payload = None;
        assert_eq!(field_of(e), "payload");
    }

    #[test]
    fn a_pos_order_needs_a_store_and_other_channels_none() {
        let e = with_order(|o| o.channel = pb::Channel::Pos as i32);
        assert_eq!(field_of(e), "order_completed.store_id");
        let e = with_order(|o| o.channel = pb::Channel::Email as i32);
        assert_eq!(field_of(e), "order_completed.channel");
    }

    #[test]
    fn a_refund_must_be_positive_and_typed() {
        let mut e = order();
        e.payload = Some(pb::event::Payload::OrderRefunded(pb::OrderRefunded {
            order_id: "o-1".into(),
            refund: usd(0),
            r#type: pb::RefundType::Full as i32,
            ..Default::default()
        }));
        assert_eq!(field_of(e.clone()), "order_refunded.refund.amount_minor");
        if let Some(pb::event::Payload::OrderRefunded(r)) = &mut e.payload {
            r.refund = usd(5);
            r.r#type = 0;
        }
        assert_eq!(field_of(e.clone()), "order_refunded.type");
        if let Some(pb::event::Payload::OrderRefunded(r)) = &mut e.payload {
            r.r#type = pb::RefundType::Partial as i32;
        }
        let v = validate_event(e, &limits()).unwrap();
        assert!(matches!(
            v.effect,
            Effect::Refund {
                full: false,
                amount: 5,
                ..
            }
        ));
    }

    fn custom_event(name: &str, props: Vec<(&str, pb::value::Kind)>) -> pb::Event {
        let mut e = order();
        e.payload = Some(pb::event::Payload::Custom(pb::CustomEvent {
            name: name.into(),
            properties: props
                .into_iter()
                .map(|(k, v)| (k.to_string(), pb::Value { kind: Some(v) }))
                .collect(),
        }));
        e
    }

    #[test]
    fn custom_events_are_namespaced_and_their_properties_bounded() {
        use pb::value::Kind;
        assert_eq!(field_of(custom_event("quiz", vec![])), "custom.name");
        assert_eq!(field_of(custom_event("clientele.x", vec![])), "custom.name");
        assert_eq!(
            field_of(custom_event(
                "acme.quiz",
                vec![("score", Kind::DoubleValue(f64::NAN))]
            )),
            "custom.properties[\"score\"]"
        );
        assert_eq!(
            field_of(custom_event(
                "acme.quiz",
                vec![("s", Kind::StringValue("x".repeat(1025)))]
            )),
            "custom.properties[\"s\"]"
        );
        let many: Vec<(String, pb::value::Kind)> = (0..65)
            .map(|i| (format!("k{i}"), Kind::IntValue(i)))
            .collect();
        let e = custom_event(
            "acme.quiz",
            many.iter().map(|(k, v)| (k.as_str(), v.clone())).collect(),
        );
        assert_eq!(field_of(e), "custom.properties");
        let ok = custom_event("acme.quiz", vec![("score", Kind::IntValue(3))]);
        let v = validate_event(ok, &limits()).unwrap();
        assert_eq!(v.custom_name.as_deref(), Some("acme.quiz"));
        assert_eq!(v.effect, Effect::Engagement("custom"));
    }

    #[test]
    fn the_payload_hash_ignores_property_order_but_not_content() {
        use pb::value::Kind;
        let props: Vec<(String, Kind)> = (0..20)
            .map(|i| (format!("k{i}"), Kind::IntValue(i)))
            .collect();
        fn refs(v: &[(String, pb::value::Kind)]) -> Vec<(&str, pb::value::Kind)> {
            v.iter().map(|(k, x)| (k.as_str(), x.clone())).collect()
        }
        let a = custom_event("acme.x", refs(&props));
        let mut rev = props.clone();
        rev.reverse();
        let b = custom_event("acme.x", refs(&rev));
        assert_eq!(payload_hash(&a), payload_hash(&b));
        let c = custom_event("acme.x", vec![("k0", Kind::IntValue(99))]);
        assert_ne!(payload_hash(&a), payload_hash(&c));
        let mut o2 = order();
        o2.event_id = "e-2".into();
        assert_ne!(payload_hash(&order()), payload_hash(&o2));
    }

    #[test]
    fn long_user_agents_are_truncated_not_rejected() {
        let mut e = order();
        e.context = Some(pb::EventContext {
            device: Some(pb::Device {
                user_agent: "é".repeat(400),
                ..Default::default()
            }),
            ..Default::default()
        });
        let v = validate_event(e, &limits()).unwrap();
        let ua = &v.event.context.unwrap().device.unwrap().user_agent;
        assert!(ua.len() <= MAX_USER_AGENT_BYTES && ua.len() >= MAX_USER_AGENT_BYTES - 1);
    }

    #[test]
    fn long_keys_are_hashed_for_apply_aggregates() {
        let k = aggregate_key(&"s".repeat(64), &"e".repeat(128));
        assert!(k.starts_with("sha256:") && k.len() <= 128);
    }

    #[test]
    fn redaction_removes_emails_and_phones_and_reports_their_types() {
        let mut e = order();
        e.identifiers = Some(pb::IdentifierSet {
            identifiers: vec![
                pb::Identifier {
                    r#type: 2,
                    value: "a@b.co".into(),
                    namespace: String::new(),
                },
                pb::Identifier {
                    r#type: 1,
                    value: "c-1".into(),
                    namespace: String::new(),
                },
                pb::Identifier {
                    r#type: 3,
                    value: "+15551234567".into(),
                    namespace: String::new(),
                },
            ],
        });
        let (r, removed) = redact(e);
        assert_eq!(removed, vec![2, 3]);
        assert_eq!(r.identifiers.unwrap().identifiers.len(), 1);
    }
}
