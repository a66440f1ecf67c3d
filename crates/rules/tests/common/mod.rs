//! Shared fixtures for the rule tests: a schema resembling the platform's feature set and an
//! in-memory profile implementing `EvalContext`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use clientele_rules::{EvalContext, Schema, Value, ValueType};

pub fn schema() -> Schema {
    Schema::new()
        .with_feature("recency_days", ValueType::Number)
        .with_feature("orders", ValueType::Number)
        .with_feature("total_spend", ValueType::Number)
        .with_feature("tier", ValueType::String)
        .with_feature("is_subscribed", ValueType::Bool)
        .with_trait("vip", ValueType::Bool)
}

/// A profile held in maps; anything absent is missing.
#[derive(Debug, Default)]
pub struct Profile {
    pub features: BTreeMap<String, Value>,
    pub category_shares: BTreeMap<String, f64>,
    pub traits: BTreeMap<String, Value>,
    pub consents: BTreeSet<String>,
    pub segments: BTreeSet<String>,
}

impl Profile {
    pub fn with_feature(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.features.insert(name.to_string(), value.into());
        self
    }

    pub fn with_category_share(mut self, category: &str, share: f64) -> Self {
        self.category_shares.insert(category.to_string(), share);
        self
    }

    pub fn with_trait(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.traits.insert(key.to_string(), value.into());
        self
    }

    pub fn with_consent(mut self, purpose: &str) -> Self {
        self.consents.insert(purpose.to_string());
        self
    }

    pub fn in_segment(mut self, segment: &str) -> Self {
        self.segments.insert(segment.to_string());
        self
    }
}

impl EvalContext for Profile {
    fn feature(&self, name: &str) -> Option<Value> {
        self.features.get(name).cloned()
    }

    fn category_share(&self, category: &str) -> Option<f64> {
        self.category_shares.get(category).copied()
    }

    fn trait_value(&self, key: &str) -> Option<Value> {
        self.traits.get(key).cloned()
    }

    fn consent(&self, purpose: &str) -> bool {
        self.consents.contains(purpose)
    }

    fn in_segment(&self, segment: &str) -> bool {
        self.segments.contains(segment)
    }
}
