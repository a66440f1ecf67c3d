//! Runtime values, the three-valued result of a rule, and the context trait through which a
//! rule reads a profile.

use serde::{Deserialize, Serialize};

/// A value supplied by an [`EvalContext`]: a feature or trait of a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// A number. NaN is treated as a missing value.
    Number(f64),
    /// A string, compared byte-for-byte (case-sensitive).
    String(String),
    /// A boolean.
    Bool(bool),
}

impl From<f64> for Value {
    fn from(value: f64) -> Self {
        Value::Number(value)
    }
}

impl From<bool> for Value {
    fn from(value: bool) -> Self {
        Value::Bool(value)
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::String(value.to_string())
    }
}

impl From<String> for Value {
    fn from(value: String) -> Self {
        Value::String(value)
    }
}

/// The declared type of a feature or trait in a [`crate::Schema`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    /// Numbers: compared with any operator.
    Number,
    /// Strings: compared with `==`, `!=` and `in` only.
    String,
    /// Booleans: usable directly as conditions, or with `==`/`!=`.
    Bool,
}

/// Result of evaluating a rule under three-valued (Kleene / SQL-style) logic.
///
/// A comparison involving a missing value (a feature or trait the profile does not have, a
/// category share the context cannot compute, or a trait of an unexpected type) is
/// `Unknown`. `not Unknown` is `Unknown`; `False and Unknown` is `False`; `True or Unknown` is
/// `True`; otherwise `and`/`or` with an `Unknown` operand are `Unknown`. A profile is in a
/// segment only when its rule is `True`, so a missing value never silently qualifies a
/// profile — including under `not`/`!=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truth {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The condition depends on a missing value.
    Unknown,
}

impl Truth {
    /// `true` only for [`Truth::True`]: the membership decision.
    pub fn is_true(self) -> bool {
        self == Truth::True
    }

    pub(crate) fn from_option(value: Option<bool>) -> Self {
        match value {
            Some(true) => Truth::True,
            Some(false) => Truth::False,
            None => Truth::Unknown,
        }
    }
}

/// What a rule can read about one profile. Implemented by the profile store's view of a
/// customer; evaluation calls only the methods the rule uses, once per occurrence.
pub trait EvalContext {
    /// The value of a declared feature, or `None` if the profile does not have it.
    fn feature(&self, name: &str) -> Option<Value>;
    /// Share of the profile's spend in `category`, in `[0, 1]`; `None` if it cannot be
    /// computed (e.g. no purchases yet). Return `Some(0.0)` for a known profile that never
    /// bought in the category.
    fn category_share(&self, category: &str) -> Option<f64>;
    /// The value of a profile trait (a marketer-defined attribute), or `None` if unset.
    fn trait_value(&self, key: &str) -> Option<Value>;
    /// Whether the profile has granted consent for `purpose` (e.g. `"email"`). Absence of a
    /// record means no consent, so this is never unknown.
    fn consent(&self, purpose: &str) -> bool;
    /// Whether the profile is currently a member of `segment`.
    fn in_segment(&self, segment: &str) -> bool;
}
