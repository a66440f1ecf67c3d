//! Identifier normalisation and keyed hashing (pure, no I/O).
//!
//! Emails are trimmed and lower-cased; phones are parsed and written in E.164. Both are then
//! stored only as `hmac-sha256:<hex>` under the configured secret, so the raw value never
//! reaches the database or the logs. Other identifiers are stored trimmed, as given.
//! Tombstones of erased people hold a keyed hash of every identifier kind, so no raw value
//! outlives an erasure.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Longest identifier value accepted, in bytes after trimming.
pub const MAX_VALUE_BYTES: usize = 256;
/// Most identifiers in one set.
pub const MAX_SET_SIZE: usize = 32;

/// Identifier kinds, with the numeric codes of `clientele.v1.IdentifierType` (also the codes
/// stored in the database).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdKind {
    /// The retailer's customer id.
    CustomerId = 1,
    /// Email address (hashed).
    Email = 2,
    /// Phone number (hashed).
    Phone = 3,
    /// Device id.
    DeviceId = 4,
    /// Anonymous visitor id.
    AnonymousId = 5,
    /// Custom namespaced id.
    Custom = 6,
}

impl IdKind {
    /// The kind for a proto / database code.
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            1 => Self::CustomerId,
            2 => Self::Email,
            3 => Self::Phone,
            4 => Self::DeviceId,
            5 => Self::AnonymousId,
            6 => Self::Custom,
            _ => return None,
        })
    }

    /// Numeric code.
    pub fn code(self) -> i64 {
        self as i64
    }

    /// How strongly the kind names a person; lower is stronger. When an identifier set links
    /// several profiles, the profile holding the strongest identifier is the anchor and the
    /// others' identifiers count against the over-merge cap (a shared device is blamed, not
    /// the customer's account id).
    pub fn strength_rank(self) -> u8 {
        match self {
            Self::CustomerId => 0,
            Self::Email => 1,
            Self::Phone => 2,
            Self::Custom => 3,
            Self::DeviceId => 4,
            Self::AnonymousId => 5,
        }
    }
}

/// A normalised identifier as stored: kind, namespace (custom ids only) and stored value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentifierKey {
    /// The kind.
    pub kind: IdKind,
    /// Namespace for custom ids, empty otherwise.
    pub namespace: String,
    /// Raw trimmed value, or `hmac-sha256:<hex>` for emails and phones.
    pub stored_value: String,
}

impl IdentifierKey {
    /// A stable text form used for lock keys: `<code>:<namespace>:<value>`.
    pub fn lock_key(&self) -> String {
        format!(
            "i:{}:{}:{}",
            self.kind.code(),
            self.namespace,
            self.stored_value
        )
    }
}

/// Why an identifier was refused. `field` is relative to the identifier (`value`,
/// `namespace`, `type`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct IdentifierError {
    /// Offending field of the identifier.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> IdentifierError {
    IdentifierError {
        field,
        message: message.into(),
    }
}

/// Normalises identifiers and hashes the personal ones under a secret key.
#[derive(Clone)]
pub struct IdentifierHasher {
    mac: Hmac<Sha256>,
    phone_region: phonenumber::country::Id,
}

impl std::fmt::Debug for IdentifierHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentifierHasher")
            .field("phone_region", &self.phone_region)
            .finish_non_exhaustive()
    }
}

impl IdentifierHasher {
    /// A hasher keyed by `secret` (any length; at least 32 random bytes recommended) that reads
    /// phone numbers without a `+country` prefix as belonging to `phone_region` (ISO 3166
    /// alpha-2, e.g. `US`, `KR`).
    pub fn new(secret: &[u8], phone_region: &str) -> Result<Self, IdentifierError> {
        let mac = Hmac::<Sha256>::new_from_slice(secret)
            .map_err(|_| bad("hash_secret", "unusable HMAC key"))?;
        let phone_region = phone_region.to_ascii_uppercase().parse().map_err(|_| {
            bad(
                "default_phone_region",
                format!("unknown region `{phone_region}`"),
            )
        })?;
        Ok(Self { mac, phone_region })
    }

    fn keyed_hash(&self, domain: &str, value: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(domain.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// Validates and normalises one identifier. `kind_code` is the proto enum value.
    pub fn normalise(
        &self,
        kind_code: i32,
        value: &str,
        namespace: &str,
    ) -> Result<IdentifierKey, IdentifierError> {
        let kind = IdKind::from_code(i64::from(kind_code))
            .ok_or_else(|| bad("type", format!("unknown identifier type {kind_code}")))?;
        let value = value.trim();
        if value.is_empty() {
            return Err(bad("value", "must not be empty"));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(bad("value", format!("longer than {MAX_VALUE_BYTES} bytes")));
        }
        if value.chars().any(char::is_control) {
            return Err(bad("value", "contains control characters"));
        }
        if kind == IdKind::Custom {
            validate_namespace(namespace)?;
        } else if !namespace.is_empty() {
            return Err(bad("namespace", "only custom identifiers have a namespace"));
        }
        let stored_value = match kind {
            IdKind::Email => self.keyed_hash("email", &normalise_email(value)?),
            IdKind::Phone => self.keyed_hash("phone", &self.normalise_phone(value)?),
            _ => value.to_string(),
        };
        Ok(IdentifierKey {
            kind,
            namespace: if kind == IdKind::Custom {
                namespace.to_string()
            } else {
                String::new()
            },
            stored_value,
        })
    }

    /// E.164 form of a phone number (`+821012345678`).
    pub fn normalise_phone(&self, value: &str) -> Result<String, IdentifierError> {
        // A number written with `+country` is parsed on its own: giving a default region
        // makes the parser reject valid foreign numbers (e.g. `+82 10…` with region US).
        let region = (!value.trim_start().starts_with('+')).then_some(self.phone_region);
        let parsed = phonenumber::parse(region, value)
            .map_err(|e| bad("value", format!("not a phone number: {e}")))?;
        if !phonenumber::is_valid(&parsed) {
            return Err(bad("value", "not a valid phone number"));
        }
        Ok(parsed.format().mode(phonenumber::Mode::E164).to_string())
    }

    /// The tombstone key of a stored identifier: a keyed hash, so tombstones hold no raw ids.
    pub fn tombstone_hash(&self, key: &IdentifierKey) -> String {
        self.keyed_hash(
            &format!("tombstone:{}:{}", key.kind.code(), key.namespace),
            &key.stored_value,
        )
    }
}

/// Lower-cased, trimmed email after a structural check (one `@`, a local part of 1–64 bytes,
/// a dotted domain of letters, digits and hyphens). Deliberately not RFC 5322 complete: quoted
/// local parts and IP-literal domains are refused.
pub fn normalise_email(value: &str) -> Result<String, IdentifierError> {
    let email = value.trim().to_lowercase();
    let Some((local, domain)) = email.split_once('@') else {
        return Err(bad("value", "email has no `@`"));
    };
    if local.is_empty() || local.len() > 64 {
        return Err(bad("value", "email local part must be 1 to 64 bytes"));
    }
    if local
        .chars()
        .any(|c| c.is_whitespace() || c == '@' || c == '"')
        || local.starts_with('.')
        || local.ends_with('.')
    {
        return Err(bad("value", "email local part is malformed"));
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_alphanumeric() || c == '-')
    };
    if labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(bad("value", "email domain is malformed"));
    }
    Ok(email)
}

fn validate_namespace(ns: &str) -> Result<(), IdentifierError> {
    if ns.is_empty() || ns.len() > 64 {
        return Err(bad(
            "namespace",
            "custom identifiers need a namespace of 1 to 64 bytes",
        ));
    }
    if !ns.contains('.')
        || !ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
    {
        return Err(bad(
            "namespace",
            "must be lowercase [a-z0-9_.-] with at least one dot, e.g. `pos.card`",
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hasher() -> IdentifierHasher {
        IdentifierHasher::new(b"test-secret", "KR").unwrap()
    }

    #[test]
    fn emails_differing_in_case_and_spaces_hash_the_same() {
        let h = hasher();
        let a = h.normalise(2, "  Jane.Doe@Example.COM ", "").unwrap();
        let b = h.normalise(2, "jane.doe@example.com", "").unwrap();
        assert_eq!(a, b);
        assert!(a.stored_value.starts_with("hmac-sha256:"));
        assert!(!a.stored_value.contains("jane"));
    }

    #[test]
    fn phones_are_normalised_to_e164_before_hashing() {
        let h = hasher();
        assert_eq!(h.normalise_phone("010-1234-5678").unwrap(), "+821012345678");
        let a = h.normalise(3, "010 1234 5678", "").unwrap();
        let b = h.normalise(3, "+82 10-1234-5678", "").unwrap();
        assert_eq!(a, b);
        let us = IdentifierHasher::new(b"test-secret", "US").unwrap();
        assert_eq!(
            us.normalise_phone("+82 10-1234-5678").unwrap(),
            "+821012345678"
        );
        assert_eq!(
            us.normalise_phone("(415) 555-2671").unwrap(),
            "+14155552671"
        );
    }

    #[test]
    fn the_same_value_as_email_and_as_customer_id_never_collide() {
        let h = hasher();
        let e = h.normalise(2, "a@b.co", "").unwrap();
        let c = h.normalise(1, "a@b.co", "").unwrap();
        assert_ne!(e.stored_value, c.stored_value);
    }

    #[test]
    fn malformed_values_name_the_field() {
        let h = hasher();
        assert_eq!(h.normalise(2, "no-at-sign", "").unwrap_err().field, "value");
        assert_eq!(
            h.normalise(2, "a@localhost", "").unwrap_err().field,
            "value"
        );
        assert_eq!(h.normalise(3, "12", "").unwrap_err().field, "value");
        assert_eq!(h.normalise(1, "   ", "").unwrap_err().field, "value");
        assert_eq!(
            h.normalise(1, &"x".repeat(257), "").unwrap_err().field,
            "value"
        );
        assert_eq!(h.normalise(0, "x", "").unwrap_err().field, "type");
        assert_eq!(h.normalise(99, "x", "").unwrap_err().field, "type");
        assert_eq!(h.normalise(6, "x", "nodot").unwrap_err().field, "namespace");
        assert_eq!(h.normalise(6, "x", "").unwrap_err().field, "namespace");
        assert_eq!(
            h.normalise(1, "x", "pos.card").unwrap_err().field,
            "namespace"
        );
        assert!(h.normalise(6, "123", "pos.card").is_ok());
    }

    #[test]
    fn different_secrets_give_different_hashes() {
        let a = IdentifierHasher::new(b"one", "US").unwrap();
        let b = IdentifierHasher::new(b"two", "US").unwrap();
        let ka = a.normalise(2, "x@y.io", "").unwrap();
        let kb = b.normalise(2, "x@y.io", "").unwrap();
        assert_ne!(ka.stored_value, kb.stored_value);
        assert_ne!(a.tombstone_hash(&ka), ka.stored_value);
    }
}
