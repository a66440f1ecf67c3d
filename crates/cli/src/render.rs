//! Human-readable output: profiles, resolve results and timestamps as aligned text.

use std::fmt::Write as _;

use clientele_proto::Timestamp;
use clientele_proto::v1 as pb;

use crate::money::format_minor;

/// How many hex digits of a keyed hash are shown in human output (JSON shows all of them).
const HASH_PREFIX_LEN: usize = 12;

/// `2026-05-09 07:33:12 UTC`, or `-` when unset or out of range.
pub fn timestamp(t: Option<&Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))
        .map_or_else(
            || "-".to_string(),
            |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        )
}

/// A readable name for an identifier type ("customer id", "email", ...).
pub fn identifier_type_name(kind: i32) -> &'static str {
    match pb::IdentifierType::try_from(kind) {
        Ok(pb::IdentifierType::CustomerId) => "customer id",
        Ok(pb::IdentifierType::Email) => "email",
        Ok(pb::IdentifierType::Phone) => "phone",
        Ok(pb::IdentifierType::DeviceId) => "device id",
        Ok(pb::IdentifierType::AnonymousId) => "anonymous id",
        Ok(pb::IdentifierType::Custom) => "custom",
        Ok(pb::IdentifierType::Unspecified) | Err(_) => "unknown",
    }
}

/// A readable name for a consent purpose.
pub fn consent_purpose_name(purpose: i32) -> &'static str {
    match pb::ConsentPurpose::try_from(purpose) {
        Ok(pb::ConsentPurpose::Email) => "email",
        Ok(pb::ConsentPurpose::Sms) => "sms",
        Ok(pb::ConsentPurpose::Push) => "push",
        Ok(pb::ConsentPurpose::Personalisation) => "personalisation",
        Ok(pb::ConsentPurpose::Analytics) => "analytics",
        Ok(pb::ConsentPurpose::Unspecified) | Err(_) => "unknown",
    }
}

/// A readable name for a consent status.
pub fn consent_status_name(status: i32) -> &'static str {
    match pb::ConsentStatus::try_from(status) {
        Ok(pb::ConsentStatus::Granted) => "granted",
        Ok(pb::ConsentStatus::Denied) => "denied",
        Ok(pb::ConsentStatus::Revoked) => "revoked",
        Ok(pb::ConsentStatus::Unspecified) | Err(_) => "unknown",
    }
}

/// A trait value as text: strings quoted, numbers and booleans bare, times formatted.
pub fn value(v: &pb::Value) -> String {
    use pb::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s)) => format!("{s:?}"),
        Some(Kind::IntValue(i)) => i.to_string(),
        Some(Kind::DoubleValue(d)) => format!("{d:?}"),
        Some(Kind::BoolValue(b)) => b.to_string(),
        Some(Kind::TimestampValue(t)) => timestamp(Some(t)),
        None => "(empty)".to_string(),
    }
}

/// A stored identifier's value for display: keyed hashes are shortened to a prefix.
fn stored_value(id: &pb::StoredIdentifier) -> String {
    match id.stored_value.strip_prefix("hmac-sha256:") {
        Some(hex) if hex.len() > HASH_PREFIX_LEN => {
            format!("hmac-sha256:{}…", &hex[..HASH_PREFIX_LEN])
        }
        _ => id.stored_value.clone(),
    }
}

/// The multi-line summary `clientele profiles get` prints: identifiers, traits, consents and
/// aggregates (money in major units of each currency).
pub fn profile(p: &pb::Profile) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_profile(&mut out, p);
    out
}

fn write_profile(out: &mut String, p: &pb::Profile) -> std::fmt::Result {
    writeln!(out, "Profile {}  (version {})", p.profile_id, p.version)?;
    writeln!(out, "  created  {}", timestamp(p.created_at.as_ref()))?;
    writeln!(out, "  updated  {}", timestamp(p.updated_at.as_ref()))?;
    if !p.merged_profile_ids.is_empty() {
        writeln!(out, "  merged   {}", p.merged_profile_ids.join(", "))?;
    }

    writeln!(out, "Identifiers ({})", p.identifiers.len())?;
    for id in &p.identifiers {
        let kind = if id.namespace.is_empty() {
            identifier_type_name(id.r#type).to_string()
        } else {
            format!("custom {}", id.namespace)
        };
        writeln!(
            out,
            "  {kind:<16} {:<40} since {}",
            stored_value(id),
            timestamp(id.first_seen_at.as_ref())
        )?;
    }

    writeln!(out, "Traits ({})", p.traits.len())?;
    let mut traits: Vec<_> = p.traits.iter().collect();
    traits.sort_by(|a, b| a.0.cmp(b.0));
    for (name, v) in traits {
        writeln!(out, "  {name:<24} {}", value(v))?;
    }

    writeln!(out, "Consents ({})", p.consents.len())?;
    for c in &p.consents {
        writeln!(
            out,
            "  {:<16} {:<8} {}  via {}",
            consent_purpose_name(c.purpose),
            consent_status_name(c.status),
            timestamp(c.decided_at.as_ref()),
            c.source
        )?;
    }

    writeln!(out, "Aggregates")?;
    match &p.aggregates {
        None => writeln!(out, "  (none)")?,
        Some(a) => write_aggregates(out, a)?,
    }
    Ok(())
}

fn write_aggregates(out: &mut String, a: &pb::ProfileAggregates) -> std::fmt::Result {
    writeln!(
        out,
        "  orders {}  refunds {}",
        a.order_count, a.refund_count
    )?;
    writeln!(
        out,
        "  first order  {}",
        timestamp(a.first_order_at.as_ref())
    )?;
    writeln!(
        out,
        "  last order   {}",
        timestamp(a.last_order_at.as_ref())
    )?;
    writeln!(out, "  last seen    {}", timestamp(a.last_seen_at.as_ref()))?;
    for s in &a.spend {
        writeln!(
            out,
            "  spend {}: gross {}, refunded {}, net {}",
            s.currency,
            format_minor(s.gross_minor, &s.currency),
            format_minor(s.refunded_minor, &s.currency),
            format_minor(s.gross_minor.saturating_sub(s.refunded_minor), &s.currency)
        )?;
    }
    if !a.engagement.is_empty() {
        let mut engagement: Vec<_> = a.engagement.iter().collect();
        engagement.sort();
        let parts: Vec<String> = engagement
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        writeln!(out, "  engagement   {}", parts.join(", "))?;
    }
    Ok(())
}

/// What `clientele profiles resolve` prints. `request` is the identifier set that was sent,
/// so refused links can name the identifier they refer to.
pub fn resolve_response(request: &pb::IdentifierSet, r: &pb::ResolveResponse) -> String {
    let mut out = String::new();
    if r.erased {
        out.push_str(
            "erased    yes: an identifier in this set belongs to an erased person; nothing was \
             written\n",
        );
        return out;
    }
    let merged = if r.merged_profile_ids.is_empty() {
        "(none)".to_string()
    } else {
        r.merged_profile_ids.join(", ")
    };
    let _ = writeln!(out, "profile   {}", r.profile_id);
    let _ = writeln!(out, "created   {}", if r.created { "yes" } else { "no" });
    let _ = writeln!(out, "merged    {merged}");
    if r.refused_links.is_empty() {
        let _ = writeln!(out, "refused   (none)");
    } else {
        for link in &r.refused_links {
            let what = usize::try_from(link.identifier_index)
                .ok()
                .and_then(|i| request.identifiers.get(i))
                .map_or_else(
                    || format!("identifier #{}", link.identifier_index),
                    |id| format!("{} {}", identifier_type_name(id.r#type), id.value),
                );
            let why = match pb::LinkRefusal::try_from(link.reason) {
                Ok(pb::LinkRefusal::OverMergeCap) => {
                    "over-merge guard: it already links the most profiles allowed"
                }
                _ => "unknown reason",
            };
            let _ = writeln!(out, "refused   {what} ({why})");
        }
    }
    let _ = writeln!(out, "erased    no");
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample_profile() -> pb::Profile {
        pb::Profile {
            profile_id: "p-1".into(),
            identifiers: vec![
                pb::StoredIdentifier {
                    r#type: pb::IdentifierType::Email as i32,
                    namespace: String::new(),
                    stored_value: format!("hmac-sha256:{}", "ab".repeat(32)),
                    first_seen_at: Some(Timestamp {
                        seconds: 0,
                        nanos: 0,
                    }),
                },
                pb::StoredIdentifier {
                    r#type: pb::IdentifierType::Custom as i32,
                    namespace: "pos.card".into(),
                    stored_value: "card-9".into(),
                    first_seen_at: None,
                },
            ],
            traits: [(
                "vip".to_string(),
                pb::Value {
                    kind: Some(pb::value::Kind::BoolValue(true)),
                },
            )]
            .into(),
            aggregates: Some(pb::ProfileAggregates {
                order_count: 2,
                spend: vec![pb::CurrencySpend {
                    currency: "KRW".into(),
                    gross_minor: 45_000,
                    refunded_minor: 5_000,
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn profiles_show_type_names_short_hashes_and_money_in_major_units() {
        let text = profile(&sample_profile());
        assert!(text.contains("email"), "{text}");
        assert!(text.contains("hmac-sha256:abababababab…"), "{text}");
        assert!(text.contains("custom pos.card"), "{text}");
        assert!(text.contains("vip"), "{text}");
        assert!(
            text.contains("gross 45,000 KRW, refunded 5,000 KRW, net 40,000 KRW"),
            "{text}"
        );
        assert!(text.contains("1970-01-01 00:00:00 UTC"), "{text}");
    }

    #[test]
    fn refused_links_name_the_identifier_from_the_request() {
        let request = pb::IdentifierSet {
            identifiers: vec![
                pb::Identifier {
                    r#type: pb::IdentifierType::CustomerId as i32,
                    value: "c-1".into(),
                    namespace: String::new(),
                },
                pb::Identifier {
                    r#type: pb::IdentifierType::DeviceId as i32,
                    value: "tablet".into(),
                    namespace: String::new(),
                },
            ],
        };
        let response = pb::ResolveResponse {
            profile_id: "p-1".into(),
            refused_links: vec![pb::RefusedLink {
                identifier_index: 1,
                reason: pb::LinkRefusal::OverMergeCap as i32,
            }],
            ..Default::default()
        };
        let text = resolve_response(&request, &response);
        assert!(
            text.contains("refused   device id tablet (over-merge guard"),
            "{text}"
        );
    }
}
