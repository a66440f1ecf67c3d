//! The schema a rule is checked against when a segment is defined: which features exist and
//! their types, the declared types of traits, and optionally the known consent purposes and
//! segment names.

use std::collections::{BTreeMap, BTreeSet};

use crate::value::ValueType;

/// Names a rule may refer to and their types.
///
/// Features must be declared. Traits may be declared with a type for stricter checking;
/// undeclared traits are allowed and typed dynamically (a runtime type mismatch makes the
/// comparison `Unknown`). Consent purposes and segment names are validated only when a set of
/// them has been given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schema {
    pub(crate) features: BTreeMap<String, ValueType>,
    pub(crate) traits: BTreeMap<String, ValueType>,
    pub(crate) consent_purposes: Option<BTreeSet<String>>,
    pub(crate) segments: Option<BTreeSet<String>>,
}

impl Schema {
    /// An empty schema: no features, any trait, purpose or segment name.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares feature `name` with type `value_type` (replacing an earlier declaration).
    pub fn with_feature(mut self, name: impl Into<String>, value_type: ValueType) -> Self {
        self.features.insert(name.into(), value_type);
        self
    }

    /// Declares trait `key` with type `value_type`, so `trait("key")` is statically typed.
    pub fn with_trait(mut self, key: impl Into<String>, value_type: ValueType) -> Self {
        self.traits.insert(key.into(), value_type);
        self
    }

    /// Restricts `consent(..)` to these purposes.
    pub fn with_consent_purposes<I, S>(mut self, purposes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.consent_purposes = Some(purposes.into_iter().map(Into::into).collect());
        self
    }

    /// Restricts `segment(..)`/`in_segment(..)` to these segment names.
    pub fn with_segments<I, S>(mut self, segments: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.segments = Some(segments.into_iter().map(Into::into).collect());
        self
    }

    /// The declared type of feature `name`, if declared.
    pub fn feature_type(&self, name: &str) -> Option<ValueType> {
        self.features.get(name).copied()
    }
}
