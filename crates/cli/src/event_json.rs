//! The JSON Lines mapping of `clientele.v1.Event` that `clientele generate` writes and
//! `clientele import --format jsonl` reads (prost types do not derive `Serialize`).
//!
//! One event is one JSON object. Field names are the proto field names; the payload is the
//! one field named after its oneof case (`"order_completed": {...}`); enums are their proto
//! names (`"CHANNEL_WEB"`), and readers also accept the name without the prefix (`"WEB"`,
//! any case) or the number; times are RFC 3339 strings; `Money` is
//! `{"amount_minor": 1234, "currency": "USD"}`; `identifiers` is the list of identifiers
//! (the `IdentifierSet` object `{"identifiers": [...]}` is accepted too). Fields at their
//! default value may be left out, and writers leave them out. Unknown fields are an error, so
//! a misspelt field name never silently drops data.

use std::collections::HashMap;

use clientele_proto::Timestamp;
use clientele_proto::v1 as pb;
use serde_json::{Map, Value, json};

/// Why a JSON object is not an event: the field path (proto names, zero-based indexes, as
/// `order_completed.line_items[2].quantity`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonFieldError {
    /// Path of the offending field; empty for the whole object.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for JsonFieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

type Result<T> = std::result::Result<T, JsonFieldError>;

fn fail<T>(field: &str, message: impl Into<String>) -> Result<T> {
    Err(JsonFieldError {
        field: field.to_string(),
        message: message.into(),
    })
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// RFC 3339 text of `t` (UTC, `Z`, fractional seconds only when present).
pub fn timestamp_text(t: &Timestamp) -> String {
    chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_default()
}

/// Inserts `key: value` unless `value` is the default (empty string, zero, false, null).
fn put(map: &mut Map<String, Value>, key: &str, value: Value) {
    let empty = match &value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_i64() == Some(0) || n.as_u64() == Some(0),
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    };
    if !empty {
        map.insert(key.to_string(), value);
    }
}

fn enum_value(raw: i32, name: Option<&'static str>) -> Value {
    match name {
        Some(n) if raw != 0 => json!(n),
        _ if raw == 0 => Value::Null,
        _ => json!(raw),
    }
}

fn money(m: Option<&pb::Money>) -> Value {
    m.map_or(
        Value::Null,
        |m| json!({ "amount_minor": m.amount_minor, "currency": m.currency }),
    )
}

fn line_items(items: &[pb::LineItem]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|l| {
                let mut o = Map::new();
                put(&mut o, "sku", json!(l.sku));
                put(&mut o, "category", json!(l.category));
                put(&mut o, "quantity", json!(l.quantity));
                put(&mut o, "unit_price", money(l.unit_price.as_ref()));
                put(&mut o, "name", json!(l.name));
                Value::Object(o)
            })
            .collect(),
    )
}

fn value_json(v: &pb::Value) -> Value {
    use pb::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s)) => json!({ "string_value": s }),
        Some(Kind::IntValue(i)) => json!({ "int_value": i }),
        Some(Kind::DoubleValue(d)) => json!({ "double_value": d }),
        Some(Kind::BoolValue(b)) => json!({ "bool_value": b }),
        Some(Kind::TimestampValue(t)) => json!({ "timestamp_value": timestamp_text(t) }),
        None => json!({}),
    }
}

fn payload_json(p: &pb::event::Payload) -> (&'static str, Value) {
    use pb::event::Payload as P;
    let mut o = Map::new();
    let name = match p {
        P::OrderCompleted(x) => {
            put(&mut o, "order_id", json!(x.order_id));
            put(&mut o, "total", money(x.total.as_ref()));
            put(&mut o, "line_items", line_items(&x.line_items));
            put(
                &mut o,
                "channel",
                enum_value(
                    x.channel,
                    pb::Channel::try_from(x.channel)
                        .ok()
                        .map(|c| c.as_str_name()),
                ),
            );
            put(&mut o, "store_id", json!(x.store_id));
            put(&mut o, "discount_total", money(x.discount_total.as_ref()));
            put(&mut o, "offer_codes", json!(x.offer_codes));
            "order_completed"
        }
        P::OrderRefunded(x) => {
            put(&mut o, "order_id", json!(x.order_id));
            put(&mut o, "refund", money(x.refund.as_ref()));
            put(
                &mut o,
                "type",
                enum_value(
                    x.r#type,
                    pb::RefundType::try_from(x.r#type)
                        .ok()
                        .map(|c| c.as_str_name()),
                ),
            );
            put(&mut o, "line_items", line_items(&x.line_items));
            put(&mut o, "refund_id", json!(x.refund_id));
            "order_refunded"
        }
        P::ProductViewed(x) => {
            put(&mut o, "sku", json!(x.sku));
            put(&mut o, "category", json!(x.category));
            put(&mut o, "price", money(x.price.as_ref()));
            put(&mut o, "name", json!(x.name));
            "product_viewed"
        }
        P::CartUpdated(x) => {
            put(&mut o, "cart_id", json!(x.cart_id));
            put(&mut o, "line_items", line_items(&x.line_items));
            put(&mut o, "cart_value", money(x.cart_value.as_ref()));
            "cart_updated"
        }
        P::CartAbandoned(x) => {
            put(&mut o, "cart_id", json!(x.cart_id));
            put(&mut o, "cart_value", money(x.cart_value.as_ref()));
            put(&mut o, "line_items", line_items(&x.line_items));
            "cart_abandoned"
        }
        P::Searched(x) => {
            put(&mut o, "query", json!(x.query));
            if let Some(n) = x.result_count {
                o.insert("result_count".into(), json!(n));
            }
            "searched"
        }
        P::PageViewed(x) => {
            put(&mut o, "url", json!(x.url));
            put(&mut o, "title", json!(x.title));
            put(&mut o, "referrer", json!(x.referrer));
            "page_viewed"
        }
        P::ScreenViewed(x) => {
            put(&mut o, "screen_name", json!(x.screen_name));
            "screen_viewed"
        }
        P::AppOpened(x) => {
            put(&mut o, "first_open", json!(x.first_open));
            put(
                &mut o,
                "from_push_message_id",
                json!(x.from_push_message_id),
            );
            "app_opened"
        }
        P::EmailOpened(x) => {
            put(&mut o, "campaign_id", json!(x.campaign_id));
            put(&mut o, "message_id", json!(x.message_id));
            "email_opened"
        }
        P::EmailClicked(x) => {
            put(&mut o, "campaign_id", json!(x.campaign_id));
            put(&mut o, "message_id", json!(x.message_id));
            put(&mut o, "url", json!(x.url));
            "email_clicked"
        }
        P::PushClicked(x) => {
            put(&mut o, "campaign_id", json!(x.campaign_id));
            put(&mut o, "message_id", json!(x.message_id));
            put(&mut o, "action_id", json!(x.action_id));
            "push_clicked"
        }
        P::ReviewSubmitted(x) => {
            put(&mut o, "review_id", json!(x.review_id));
            put(&mut o, "rating", json!(x.rating));
            put(&mut o, "sku", json!(x.sku));
            put(&mut o, "body", json!(x.body));
            "review_submitted"
        }
        P::SurveyResponded(x) => {
            put(&mut o, "survey_id", json!(x.survey_id));
            o.insert("score".into(), json!(x.score));
            put(&mut o, "comment", json!(x.comment));
            put(&mut o, "is_nps", json!(x.is_nps));
            "survey_responded"
        }
        P::Custom(x) => {
            put(&mut o, "name", json!(x.name));
            let props: Map<String, Value> = x
                .properties
                .iter()
                .map(|(k, v)| (k.clone(), value_json(v)))
                .collect();
            put(&mut o, "properties", Value::Object(props));
            "custom"
        }
    };
    (name, Value::Object(o))
}

/// `event` as one JSON object (see the module docs for the mapping).
pub fn event_to_json(event: &pb::Event) -> Value {
    let mut o = Map::new();
    put(&mut o, "event_id", json!(event.event_id));
    put(&mut o, "source", json!(event.source));
    if let Some(t) = &event.occurred_at {
        o.insert("occurred_at".into(), json!(timestamp_text(t)));
    }
    if let Some(set) = &event.identifiers {
        let ids: Vec<Value> = set
            .identifiers
            .iter()
            .map(|i| {
                let mut m = Map::new();
                put(
                    &mut m,
                    "type",
                    enum_value(
                        i.r#type,
                        pb::IdentifierType::try_from(i.r#type)
                            .ok()
                            .map(|t| t.as_str_name()),
                    ),
                );
                put(&mut m, "value", json!(i.value));
                put(&mut m, "namespace", json!(i.namespace));
                Value::Object(m)
            })
            .collect();
        o.insert("identifiers".into(), Value::Array(ids));
    }
    if let Some(c) = &event.context {
        let mut m = Map::new();
        put(
            &mut m,
            "channel",
            enum_value(
                c.channel,
                pb::Channel::try_from(c.channel)
                    .ok()
                    .map(|c| c.as_str_name()),
            ),
        );
        if let Some(d) = &c.device {
            let mut dm = Map::new();
            put(
                &mut dm,
                "type",
                enum_value(
                    d.r#type,
                    pb::DeviceType::try_from(d.r#type)
                        .ok()
                        .map(|t| t.as_str_name()),
                ),
            );
            put(&mut dm, "os_name", json!(d.os_name));
            put(&mut dm, "os_version", json!(d.os_version));
            put(&mut dm, "manufacturer", json!(d.manufacturer));
            put(&mut dm, "model", json!(d.model));
            put(&mut dm, "app_version", json!(d.app_version));
            put(&mut dm, "user_agent", json!(d.user_agent));
            m.insert("device".into(), Value::Object(dm));
        }
        put(&mut m, "locale", json!(c.locale));
        put(&mut m, "time_zone", json!(c.time_zone));
        if let Some(k) = &c.campaign {
            let mut km = Map::new();
            put(&mut km, "source", json!(k.source));
            put(&mut km, "medium", json!(k.medium));
            put(&mut km, "name", json!(k.name));
            put(&mut km, "term", json!(k.term));
            put(&mut km, "content", json!(k.content));
            put(&mut km, "click_id", json!(k.click_id));
            m.insert("campaign".into(), Value::Object(km));
        }
        put(&mut m, "store_id", json!(c.store_id));
        put(&mut m, "session_id", json!(c.session_id));
        o.insert("context".into(), Value::Object(m));
    }
    if let Some(p) = &event.payload {
        let (name, v) = payload_json(p);
        o.insert(name.into(), v);
    }
    Value::Object(o)
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// A JSON object being read, with its path for error messages.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    /// `value` at `path` as an object whose keys are all in `allowed`.
    fn new(value: &'a Value, path: &str, allowed: &[&str]) -> Result<Self> {
        let Some(map) = value.as_object() else {
            return fail(path, "must be a JSON object");
        };
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return fail(&join(path, k), "unknown field");
        }
        Ok(Self {
            map,
            path: path.to_string(),
        })
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn field(&self, name: &str) -> String {
        join(&self.path, name)
    }

    fn string(&self, name: &str) -> Result<String> {
        match self.get(name) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => fail(&self.field(name), "must be a string"),
        }
    }

    fn int(&self, name: &str) -> Result<i64> {
        match self.get(name) {
            None => Ok(0),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => Ok(i),
                None => fail(&self.field(name), "must be an integer"),
            },
            // proto JSON writes 64-bit integers as strings
            Some(Value::String(s)) => s
                .parse()
                .or_else(|_| fail(&self.field(name), "must be an integer")),
            Some(_) => fail(&self.field(name), "must be an integer"),
        }
    }

    fn int32(&self, name: &str) -> Result<i32> {
        let v = self.int(name)?;
        i32::try_from(v).or_else(|_| fail(&self.field(name), "out of range for int32"))
    }

    fn boolean(&self, name: &str) -> Result<bool> {
        match self.get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => fail(&self.field(name), "must be true or false"),
        }
    }

    fn enumeration(
        &self,
        name: &str,
        prefix: &str,
        from_name: impl Fn(&str) -> Option<i32>,
    ) -> Result<i32> {
        match self.get(name) {
            None => Ok(0),
            Some(Value::Number(n)) => n
                .as_i64()
                .and_then(|i| i32::try_from(i).ok())
                .map_or_else(|| fail(&self.field(name), "not an enum number"), Ok),
            Some(Value::String(s)) => {
                let upper = s.trim().to_ascii_uppercase();
                from_name(&upper)
                    .or_else(|| from_name(&format!("{prefix}{upper}")))
                    .map_or_else(
                        || fail(&self.field(name), format!("unknown value `{s}`")),
                        Ok,
                    )
            }
            Some(_) => fail(&self.field(name), "must be an enum name or number"),
        }
    }

    fn object(&self, name: &str, allowed: &[&str]) -> Result<Option<Obj<'a>>> {
        self.get(name)
            .map(|v| Obj::new(v, &self.field(name), allowed))
            .transpose()
    }

    fn array(&self, name: &str) -> Result<&'a [Value]> {
        match self.get(name) {
            None => Ok(&[]),
            Some(Value::Array(a)) => Ok(a.as_slice()),
            Some(_) => fail(&self.field(name), "must be an array"),
        }
    }

    fn timestamp(&self, name: &str) -> Result<Option<Timestamp>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => parse_timestamp(s)
                .map(Some)
                .map_or_else(|| fail(&self.field(name), "must be an RFC 3339 time"), Ok),
            Some(_) => fail(&self.field(name), "must be an RFC 3339 time string"),
        }
    }

    fn money(&self, name: &str) -> Result<Option<pb::Money>> {
        let Some(o) = self.object(name, &["amount_minor", "currency"])? else {
            return Ok(None);
        };
        Ok(Some(pb::Money {
            amount_minor: o.int("amount_minor")?,
            currency: o.string("currency")?,
        }))
    }

    fn line_items(&self, name: &str) -> Result<Vec<pb::LineItem>> {
        let base = self.field(name);
        self.array(name)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let o = Obj::new(
                    v,
                    &format!("{base}[{i}]"),
                    &["sku", "category", "quantity", "unit_price", "name"],
                )?;
                Ok(pb::LineItem {
                    sku: o.string("sku")?,
                    category: o.string("category")?,
                    quantity: o.int32("quantity")?,
                    unit_price: o.money("unit_price")?,
                    name: o.string("name")?,
                })
            })
            .collect()
    }

    fn strings(&self, name: &str) -> Result<Vec<String>> {
        let base = self.field(name);
        self.array(name)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                _ => fail(&format!("{base}[{i}]"), "must be a string"),
            })
            .collect()
    }
}

/// Parses an RFC 3339 time into a protobuf timestamp.
pub fn parse_timestamp(text: &str) -> Option<Timestamp> {
    let t = chrono::DateTime::parse_from_rfc3339(text.trim()).ok()?;
    Some(Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).ok()?,
    })
}

fn channel(o: &Obj<'_>, name: &str) -> Result<i32> {
    o.enumeration(name, "CHANNEL_", |s| {
        pb::Channel::from_str_name(s).map(|c| c as i32)
    })
}

fn value_from(v: &Value, path: &str) -> Result<pb::Value> {
    use pb::value::Kind;
    let o = Obj::new(
        v,
        path,
        &[
            "string_value",
            "int_value",
            "double_value",
            "bool_value",
            "timestamp_value",
        ],
    )?;
    if o.map.len() != 1 {
        return fail(
            path,
            "set exactly one of string_value, int_value, double_value, bool_value, timestamp_value",
        );
    }
    let kind = if o.get("string_value").is_some() {
        Kind::StringValue(o.string("string_value")?)
    } else if o.get("int_value").is_some() {
        Kind::IntValue(o.int("int_value")?)
    } else if let Some(d) = o.get("double_value") {
        match d.as_f64() {
            Some(d) => Kind::DoubleValue(d),
            None => return fail(&o.field("double_value"), "must be a number"),
        }
    } else if o.get("bool_value").is_some() {
        Kind::BoolValue(o.boolean("bool_value")?)
    } else {
        match o.timestamp("timestamp_value")? {
            Some(t) => Kind::TimestampValue(t),
            None => return fail(path, "empty value"),
        }
    };
    Ok(pb::Value { kind: Some(kind) })
}

const PAYLOADS: &[&str] = &[
    "order_completed",
    "order_refunded",
    "product_viewed",
    "cart_updated",
    "cart_abandoned",
    "searched",
    "page_viewed",
    "screen_viewed",
    "app_opened",
    "email_opened",
    "email_clicked",
    "push_clicked",
    "review_submitted",
    "survey_responded",
    "custom",
];

fn payload_from(name: &str, v: &Value) -> Result<pb::event::Payload> {
    use pb::event::Payload as P;
    let p = match name {
        "order_completed" => {
            let o = Obj::new(
                v,
                name,
                &[
                    "order_id",
                    "total",
                    "line_items",
                    "channel",
                    "store_id",
                    "discount_total",
                    "offer_codes",
                ],
            )?;
            P::OrderCompleted(pb::OrderCompleted {
                order_id: o.string("order_id")?,
                total: o.money("total")?,
                line_items: o.line_items("line_items")?,
                channel: channel(&o, "channel")?,
                store_id: o.string("store_id")?,
                discount_total: o.money("discount_total")?,
                offer_codes: o.strings("offer_codes")?,
            })
        }
        "order_refunded" => {
            let o = Obj::new(
                v,
                name,
                &["order_id", "refund", "type", "line_items", "refund_id"],
            )?;
            P::OrderRefunded(pb::OrderRefunded {
                order_id: o.string("order_id")?,
                refund: o.money("refund")?,
                r#type: o.enumeration("type", "REFUND_TYPE_", |s| {
                    pb::RefundType::from_str_name(s).map(|c| c as i32)
                })?,
                line_items: o.line_items("line_items")?,
                refund_id: o.string("refund_id")?,
            })
        }
        "product_viewed" => {
            let o = Obj::new(v, name, &["sku", "category", "price", "name"])?;
            P::ProductViewed(pb::ProductViewed {
                sku: o.string("sku")?,
                category: o.string("category")?,
                price: o.money("price")?,
                name: o.string("name")?,
            })
        }
        "cart_updated" => {
            let o = Obj::new(v, name, &["cart_id", "line_items", "cart_value"])?;
            P::CartUpdated(pb::CartUpdated {
                cart_id: o.string("cart_id")?,
                line_items: o.line_items("line_items")?,
                cart_value: o.money("cart_value")?,
            })
        }
        "cart_abandoned" => {
            let o = Obj::new(v, name, &["cart_id", "cart_value", "line_items"])?;
            P::CartAbandoned(pb::CartAbandoned {
                cart_id: o.string("cart_id")?,
                cart_value: o.money("cart_value")?,
                line_items: o.line_items("line_items")?,
            })
        }
        "searched" => {
            let o = Obj::new(v, name, &["query", "result_count"])?;
            P::Searched(pb::Searched {
                query: o.string("query")?,
                result_count: match o.get("result_count") {
                    Some(_) => Some(o.int32("result_count")?),
                    None => None,
                },
            })
        }
        "page_viewed" => {
            let o = Obj::new(v, name, &["url", "title", "referrer"])?;
            P::PageViewed(pb::PageViewed {
                url: o.string("url")?,
                title: o.string("title")?,
                referrer: o.string("referrer")?,
            })
        }
        "screen_viewed" => {
            let o = Obj::new(v, name, &["screen_name"])?;
            P::ScreenViewed(pb::ScreenViewed {
                screen_name: o.string("screen_name")?,
            })
        }
        "app_opened" => {
            let o = Obj::new(v, name, &["first_open", "from_push_message_id"])?;
            P::AppOpened(pb::AppOpened {
                first_open: o.boolean("first_open")?,
                from_push_message_id: o.string("from_push_message_id")?,
            })
        }
        "email_opened" => {
            let o = Obj::new(v, name, &["campaign_id", "message_id"])?;
            P::EmailOpened(pb::EmailOpened {
                campaign_id: o.string("campaign_id")?,
                message_id: o.string("message_id")?,
            })
        }
        "email_clicked" => {
            let o = Obj::new(v, name, &["campaign_id", "message_id", "url"])?;
            P::EmailClicked(pb::EmailClicked {
                campaign_id: o.string("campaign_id")?,
                message_id: o.string("message_id")?,
                url: o.string("url")?,
            })
        }
        "push_clicked" => {
            let o = Obj::new(v, name, &["campaign_id", "message_id", "action_id"])?;
            P::PushClicked(pb::PushClicked {
                campaign_id: o.string("campaign_id")?,
                message_id: o.string("message_id")?,
                action_id: o.string("action_id")?,
            })
        }
        "review_submitted" => {
            let o = Obj::new(v, name, &["review_id", "rating", "sku", "body"])?;
            P::ReviewSubmitted(pb::ReviewSubmitted {
                review_id: o.string("review_id")?,
                rating: o.int32("rating")?,
                sku: o.string("sku")?,
                body: o.string("body")?,
            })
        }
        "survey_responded" => {
            let o = Obj::new(v, name, &["survey_id", "score", "comment", "is_nps"])?;
            P::SurveyResponded(pb::SurveyResponded {
                survey_id: o.string("survey_id")?,
                score: o.int32("score")?,
                comment: o.string("comment")?,
                is_nps: o.boolean("is_nps")?,
            })
        }
        _ => {
            let o = Obj::new(v, name, &["name", "properties"])?;
            let mut properties = HashMap::new();
            if let Some(Value::Object(m)) = o.get("properties") {
                for (k, v) in m {
                    properties.insert(k.clone(), value_from(v, &format!("custom.properties.{k}"))?);
                }
            } else if o.get("properties").is_some() {
                return fail("custom.properties", "must be a JSON object");
            }
            P::Custom(pb::CustomEvent {
                name: o.string("name")?,
                properties,
            })
        }
    };
    Ok(p)
}

/// Reads one event from a JSON object (see the module docs for the mapping). Checks only the
/// shape; the server validates the content.
pub fn event_from_json(value: &Value) -> Result<pb::Event> {
    let mut allowed = vec![
        "event_id",
        "source",
        "occurred_at",
        "identifiers",
        "context",
    ];
    allowed.extend_from_slice(PAYLOADS);
    let o = Obj::new(value, "", &allowed)?;
    let ids_value = match o.get("identifiers") {
        Some(Value::Object(m)) => m.get("identifiers").cloned().unwrap_or(Value::Null),
        Some(v) => v.clone(),
        None => Value::Null,
    };
    let ids = match &ids_value {
        Value::Null => Vec::new(),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let io = Obj::new(
                    v,
                    &format!("identifiers[{i}]"),
                    &["type", "value", "namespace"],
                )?;
                Ok(pb::Identifier {
                    r#type: io.enumeration("type", "IDENTIFIER_TYPE_", |s| {
                        pb::IdentifierType::from_str_name(s).map(|c| c as i32)
                    })?,
                    value: io.string("value")?,
                    namespace: io.string("namespace")?,
                })
            })
            .collect::<Result<Vec<_>>>()?,
        _ => return fail("identifiers", "must be an array of identifiers"),
    };
    let context = match o.object(
        "context",
        &[
            "channel",
            "device",
            "locale",
            "time_zone",
            "campaign",
            "store_id",
            "session_id",
        ],
    )? {
        None => None,
        Some(c) => Some(pb::EventContext {
            channel: channel(&c, "channel")?,
            device: match c.object(
                "device",
                &[
                    "type",
                    "os_name",
                    "os_version",
                    "manufacturer",
                    "model",
                    "app_version",
                    "user_agent",
                ],
            )? {
                None => None,
                Some(d) => Some(pb::Device {
                    r#type: d.enumeration("type", "DEVICE_TYPE_", |s| {
                        pb::DeviceType::from_str_name(s).map(|c| c as i32)
                    })?,
                    os_name: d.string("os_name")?,
                    os_version: d.string("os_version")?,
                    manufacturer: d.string("manufacturer")?,
                    model: d.string("model")?,
                    app_version: d.string("app_version")?,
                    user_agent: d.string("user_agent")?,
                }),
            },
            locale: c.string("locale")?,
            time_zone: c.string("time_zone")?,
            campaign: match c.object(
                "campaign",
                &["source", "medium", "name", "term", "content", "click_id"],
            )? {
                None => None,
                Some(k) => Some(pb::Campaign {
                    source: k.string("source")?,
                    medium: k.string("medium")?,
                    name: k.string("name")?,
                    term: k.string("term")?,
                    content: k.string("content")?,
                    click_id: k.string("click_id")?,
                }),
            },
            store_id: c.string("store_id")?,
            session_id: c.string("session_id")?,
        }),
    };
    let present: Vec<&str> = PAYLOADS
        .iter()
        .copied()
        .filter(|p| o.get(p).is_some())
        .collect();
    let payload = match present.as_slice() {
        [] => {
            return fail(
                "",
                format!("no payload: set one of {}", PAYLOADS.join(", ")),
            );
        }
        [one] => payload_from(one, o.map.get(*one).unwrap_or(&Value::Null))?,
        many => {
            return fail(
                many[1],
                format!("only one payload may be set, not {}", many.join(" and ")),
            );
        }
    };
    Ok(pb::Event {
        event_id: o.string("event_id")?,
        source: o.string("source")?,
        occurred_at: o.timestamp("occurred_at")?,
        identifiers: (!ids.is_empty()).then_some(pb::IdentifierSet { identifiers: ids }),
        context,
        payload: Some(payload),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn order() -> pb::Event {
        pb::Event {
            event_id: "e-1".into(),
            source: "web".into(),
            occurred_at: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            identifiers: Some(pb::IdentifierSet {
                identifiers: vec![pb::Identifier {
                    r#type: pb::IdentifierType::CustomerId as i32,
                    value: "c-1".into(),
                    namespace: String::new(),
                }],
            }),
            context: Some(pb::EventContext {
                channel: pb::Channel::Web as i32,
                device: Some(pb::Device {
                    r#type: pb::DeviceType::Tablet as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            payload: Some(pb::event::Payload::OrderCompleted(pb::OrderCompleted {
                order_id: "o-1".into(),
                total: Some(pb::Money {
                    amount_minor: 1234,
                    currency: "USD".into(),
                }),
                line_items: vec![pb::LineItem {
                    sku: "s-1".into(),
                    category: "home".into(),
                    quantity: 2,
                    unit_price: Some(pb::Money {
                        amount_minor: 617,
                        currency: "USD".into(),
                    }),
                    name: String::new(),
                }],
                channel: pb::Channel::Web as i32,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn events_survive_a_round_trip_through_json() {
        let e = order();
        let v = event_to_json(&e);
        assert_eq!(v["identifiers"][0]["type"], "IDENTIFIER_TYPE_CUSTOMER_ID");
        assert_eq!(v["occurred_at"], "2023-11-14T22:13:20Z");
        assert_eq!(v["order_completed"]["total"]["amount_minor"], 1234);
        assert_eq!(event_from_json(&v).unwrap(), e);
    }

    #[test]
    fn short_enum_names_and_identifier_set_objects_are_accepted() {
        let v: Value = serde_json::from_str(
            r#"{"event_id":"x","source":"web","occurred_at":"2024-01-01T00:00:00Z",
                "identifiers":{"identifiers":[{"type":"email","value":"a@b.c"}]},
                "context":{"channel":"WEB"},"app_opened":{"first_open":true}}"#,
        )
        .unwrap();
        let e = event_from_json(&v).unwrap();
        assert_eq!(
            e.identifiers.unwrap().identifiers[0].r#type,
            pb::IdentifierType::Email as i32
        );
        assert_eq!(e.context.unwrap().channel, pb::Channel::Web as i32);
    }

    #[test]
    fn unknown_fields_and_missing_payloads_name_the_field() {
        let v = json!({"event_id": "x", "order_completed": {"order_idd": "o"}});
        assert_eq!(
            event_from_json(&v).unwrap_err().field,
            "order_completed.order_idd"
        );
        let v = json!({"event_id": "x"});
        assert!(
            event_from_json(&v)
                .unwrap_err()
                .message
                .contains("no payload")
        );
        let v = json!({"product_viewed": {"sku": "a"}, "app_opened": {}});
        assert!(
            event_from_json(&v)
                .unwrap_err()
                .message
                .contains("only one payload")
        );
    }
}
