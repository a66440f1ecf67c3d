//! The rule expression language marketers use to define rule-based segments and offer or
//! experiment eligibility, e.g.
//!
//! ```text
//! recency_days <= 30 and orders >= 3 and category_share("books") > 0.5
//! trait("vip") == true or (tier in ["gold", "vip"] and not consent("email"))
//! ```
//!
//! * **Syntax**: `and`, `or`, `not` (case-insensitive; `not` binds tighter than `and`, which
//!   binds tighter than `or`), parentheses, comparisons `== != < <= > >=` (not chainable),
//!   `x in [..]` / `x not in [..]` with literal lists, number literals (`3`, `-0.5`, `1e3`),
//!   string literals in `"…"` or `'…'` (escapes `\" \' \\ \n \t`), `true`/`false`, feature
//!   names, and the functions `category_share("c")` (number in `[0, 1]`), `trait("k")`,
//!   `consent("purpose")` and `segment("name")` / `in_segment("name")` (true/false).
//! * **Checking**: [`compile`] parses and checks a rule against a [`Schema`] when the segment
//!   is defined, so typos and type errors are reported then — with byte offset, line:column
//!   and a suggestion — rather than silently excluding everyone later.
//! * **Evaluation**: a [`CompiledRule`] evaluates against any [`EvalContext`] by walking a
//!   small checked tree (no re-parsing, no allocation except for string values the context
//!   returns). Missing values follow three-valued logic; see [`Truth`].
//! * **Limits**: rules are at most [`MAX_SOURCE_BYTES`] long, [`MAX_NODES`] terms and
//!   [`MAX_NESTING_DEPTH`] levels of nesting; beyond that compilation fails with an error, so
//!   untrusted input can never overflow the stack.
//!
//! ```
//! use clientele_rules::{EvalContext, Schema, Truth, Value, ValueType, compile};
//!
//! struct Customer;
//! impl EvalContext for Customer {
//!     fn feature(&self, name: &str) -> Option<Value> {
//!         (name == "orders").then_some(Value::Number(4.0))
//!     }
//!     fn category_share(&self, category: &str) -> Option<f64> {
//!         (category == "books").then_some(0.6)
//!     }
//!     fn trait_value(&self, _key: &str) -> Option<Value> { None }
//!     fn consent(&self, purpose: &str) -> bool { purpose == "email" }
//!     fn in_segment(&self, _segment: &str) -> bool { false }
//! }
//!
//! let schema = Schema::new()
//!     .with_feature("orders", ValueType::Number)
//!     .with_feature("recency_days", ValueType::Number);
//! let rule = compile(r#"orders >= 3 and category_share("books") > 0.5"#, &schema)?;
//! assert!(rule.matches(&Customer));
//!
//! // `recency_days` is declared but this customer has no value: unknown, so no match.
//! let rule = compile("recency_days <= 30 and consent(\"email\")", &schema)?;
//! assert_eq!(rule.evaluate(&Customer), Truth::Unknown);
//!
//! let error = compile("recncy_days <= 30", &schema).unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     r#"unknown feature "recncy_days" at 1:1; did you mean "recency_days"?"#
//! );
//! # Ok::<(), clientele_rules::RuleError>(())
//! ```

mod ast;
mod compile;
mod error;
mod lexer;
mod parser;
mod schema;
mod value;

pub use ast::{CompareOp, Expr, ExprKind, Literal};
pub use compile::{CompiledRule, compile};
pub use error::{Position, RuleError, RuleErrorKind, Span};
pub use parser::parse;
pub use schema::Schema;
pub use value::{EvalContext, Truth, Value, ValueType};

/// Longest accepted rule source, in bytes.
pub const MAX_SOURCE_BYTES: usize = 16 * 1024;

/// Deepest accepted nesting of parentheses, `not`, call arguments and list items.
pub const MAX_NESTING_DEPTH: usize = 64;

/// Most syntax-tree nodes (terms, operators, list items) accepted in one rule.
pub const MAX_NODES: usize = 2_000;
