//! Integer money: an amount in minor units plus an ISO 4217 currency code.
//!
//! Floats are never used for money. Arithmetic that could overflow is checked.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Errors building money values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// The code is not three ASCII upper-case letters.
    #[error("invalid ISO 4217 currency code {0:?}: expected three upper-case letters")]
    InvalidCurrencyCode(String),
}

/// An ISO 4217 alphabetic currency code such as `EUR` (three upper-case ASCII letters).
///
/// Only the shape is validated; whether the code is in the current ISO list is
/// the configuration's business. Serialises as the plain string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CurrencyCode([u8; 3]);

impl CurrencyCode {
    /// Parses a code; it must be exactly three ASCII upper-case letters.
    pub fn new(code: &str) -> Result<Self, MoneyError> {
        let bytes = code.as_bytes();
        if bytes.len() == 3 && bytes.iter().all(u8::is_ascii_uppercase) {
            Ok(Self([bytes[0], bytes[1], bytes[2]]))
        } else {
            Err(MoneyError::InvalidCurrencyCode(code.to_owned()))
        }
    }

    /// The code as a string slice, e.g. `"EUR"`.
    pub fn as_str(&self) -> &str {
        // Invariant: constructed only from ASCII upper-case letters.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl TryFrom<String> for CurrencyCode {
    type Error = MoneyError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(&value)
    }
}

impl From<CurrencyCode> for String {
    fn from(value: CurrencyCode) -> Self {
        value.as_str().to_owned()
    }
}

impl fmt::Display for CurrencyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An amount of money in integer minor units (cents for EUR, yen for JPY).
///
/// `amount_minor` may be negative only where a field's contract says so
/// (e.g. a signed adjustment); order and line amounts must be `>= 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    /// Amount in the currency's minor unit.
    pub amount_minor: i64,
    /// ISO 4217 currency.
    pub currency: CurrencyCode,
}

impl Money {
    /// Builds a money value.
    pub fn new(amount_minor: i64, currency: CurrencyCode) -> Self {
        Self {
            amount_minor,
            currency,
        }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (minor units)", self.amount_minor, self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currency_code_accepts_only_three_upper_case_letters() {
        assert!(CurrencyCode::new("EUR").is_ok());
        assert!(CurrencyCode::new("eur").is_err());
        assert!(CurrencyCode::new("EURO").is_err());
        assert!(CurrencyCode::new("E1R").is_err());
    }
}
