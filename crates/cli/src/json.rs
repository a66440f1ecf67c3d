//! `--output json`: protobuf messages mapped by hand to JSON (prost types do not derive
//! `Serialize`). Field names are the proto field names, enums their proto names, times
//! RFC 3339 strings, int64 values JSON numbers, trait values `{"<oneof field>": value}`.

use clientele_proto::Timestamp;
use clientele_proto::v1 as pb;
use serde_json::{Map, Value, json};

/// RFC 3339 text of `t`, or `null` when unset or out of range.
pub fn timestamp(t: Option<&Timestamp>) -> Value {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))
        .map_or(Value::Null, |t| {
            Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        })
}

fn enum_name<E: TryFrom<i32>>(raw: i32, name: impl Fn(&E) -> &'static str) -> Value {
    E::try_from(raw).map_or_else(|_| json!(raw), |e| json!(name(&e)))
}

/// A trait value as `{"string_value": "x"}`, `{"int_value": 3}`, ...; `{}` when empty.
pub fn value(v: &pb::Value) -> Value {
    use pb::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s)) => json!({ "string_value": s }),
        Some(Kind::IntValue(i)) => json!({ "int_value": i }),
        Some(Kind::DoubleValue(d)) => json!({ "double_value": d }),
        Some(Kind::BoolValue(b)) => json!({ "bool_value": b }),
        Some(Kind::TimestampValue(t)) => json!({ "timestamp_value": timestamp(Some(t)) }),
        None => json!({}),
    }
}

fn consent(c: &pb::Consent) -> Value {
    json!({
        "purpose": enum_name(c.purpose, pb::ConsentPurpose::as_str_name),
        "status": enum_name(c.status, pb::ConsentStatus::as_str_name),
        "decided_at": timestamp(c.decided_at.as_ref()),
        "source": c.source,
    })
}

fn aggregates(a: &pb::ProfileAggregates) -> Value {
    let engagement: Map<String, Value> = a
        .engagement
        .iter()
        .map(|(k, n)| (k.clone(), json!(n)))
        .collect();
    json!({
        "first_order_at": timestamp(a.first_order_at.as_ref()),
        "last_order_at": timestamp(a.last_order_at.as_ref()),
        "order_count": a.order_count,
        "refund_count": a.refund_count,
        "spend": a.spend.iter().map(|s| json!({
            "currency": s.currency,
            "gross_minor": s.gross_minor,
            "refunded_minor": s.refunded_minor,
        })).collect::<Vec<_>>(),
        "engagement": engagement,
        "last_seen_at": timestamp(a.last_seen_at.as_ref()),
    })
}

/// A profile as JSON.
pub fn profile(p: &pb::Profile) -> Value {
    let traits: Map<String, Value> = p
        .traits
        .iter()
        .map(|(k, v)| (k.clone(), value(v)))
        .collect();
    json!({
        "profile_id": p.profile_id,
        "merged_profile_ids": p.merged_profile_ids,
        "identifiers": p.identifiers.iter().map(|i| json!({
            "type": enum_name(i.r#type, pb::IdentifierType::as_str_name),
            "namespace": i.namespace,
            "stored_value": i.stored_value,
            "first_seen_at": timestamp(i.first_seen_at.as_ref()),
        })).collect::<Vec<_>>(),
        "traits": traits,
        "consents": p.consents.iter().map(consent).collect::<Vec<_>>(),
        "aggregates": p.aggregates.as_ref().map_or(Value::Null, aggregates),
        "created_at": timestamp(p.created_at.as_ref()),
        "updated_at": timestamp(p.updated_at.as_ref()),
        "version": p.version,
    })
}

/// A resolve result as JSON.
pub fn resolve_response(r: &pb::ResolveResponse) -> Value {
    json!({
        "profile_id": r.profile_id,
        "created": r.created,
        "merged_profile_ids": r.merged_profile_ids,
        "refused_links": r.refused_links.iter().map(|l| json!({
            "identifier_index": l.identifier_index,
            "reason": enum_name(l.reason, pb::LinkRefusal::as_str_name),
        })).collect::<Vec<_>>(),
        "erased": r.erased,
    })
}

/// An erase result as JSON.
pub fn erase_response(profile_id: &str, r: &pb::EraseProfileResponse) -> Value {
    json!({
        "profile_id": profile_id,
        "identifiers_tombstoned": r.identifiers_tombstoned,
        "erased_at": timestamp(r.erased_at.as_ref()),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn profiles_map_enums_to_names_and_times_to_rfc3339() {
        let p = pb::Profile {
            profile_id: "p-1".into(),
            identifiers: vec![pb::StoredIdentifier {
                r#type: pb::IdentifierType::CustomerId as i32,
                stored_value: "c-1".into(),
                ..Default::default()
            }],
            traits: [(
                "visits".to_string(),
                pb::Value {
                    kind: Some(pb::value::Kind::IntValue(3)),
                },
            )]
            .into(),
            created_at: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        let v = profile(&p);
        assert_eq!(v["identifiers"][0]["type"], "IDENTIFIER_TYPE_CUSTOMER_ID");
        assert_eq!(v["traits"]["visits"]["int_value"], 3);
        assert_eq!(v["created_at"], "2023-11-14T22:13:20Z");
        assert_eq!(v["aggregates"], Value::Null);
    }

    #[test]
    fn unknown_enum_values_stay_numbers() {
        let r = pb::ResolveResponse {
            refused_links: vec![pb::RefusedLink {
                identifier_index: 0,
                reason: 99,
            }],
            ..Default::default()
        };
        assert_eq!(resolve_response(&r)["refused_links"][0]["reason"], 99);
    }
}
