//! Checking a parsed rule against a [`Schema`] and lowering it to a compact evaluation tree.
//!
//! The checker resolves every name and function, enforces types (numbers are ordered,
//! strings and booleans only compared for equality, conditions must be true/false) and
//! requires function arguments to be string literals, so the lowered [`CompiledRule`]
//! cannot fail at evaluation time: it only ever meets missing values, which three-valued
//! logic absorbs (see [`Truth`]).

use std::borrow::Cow;
use std::collections::BTreeSet;

use crate::ast::{CompareOp, Expr, ExprKind, Literal};
use crate::error::{RuleError, RuleErrorKind, Span, closest_match};
use crate::parser::parse;
use crate::schema::Schema;
use crate::value::{EvalContext, Truth, Value, ValueType};

/// Functions the language provides; each takes one string-literal argument.
const FUNCTIONS: [&str; 5] = [
    "category_share",
    "trait",
    "consent",
    "segment",
    "in_segment",
];

/// Parses `source` and checks it against `schema`, producing a rule ready to evaluate.
///
/// Fails with the first problem found, positioned in `source`: syntax errors, unknown
/// features or functions (with a "did you mean" suggestion when one is close), wrong
/// arguments, type errors, and size/depth limits.
pub fn compile(source: &str, schema: &Schema) -> Result<CompiledRule, RuleError> {
    let expression = parse(source)?;
    let mut checker = Checker {
        source,
        schema,
        features: BTreeSet::new(),
        segments: BTreeSet::new(),
    };
    let root = checker.condition(&expression)?;
    Ok(CompiledRule {
        source: source.to_string(),
        root,
        features: checker.features,
        segments: checker.segments,
    })
}

/// A checked rule: evaluates against any [`EvalContext`] without re-parsing.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledRule {
    source: String,
    root: Node,
    features: BTreeSet<String>,
    segments: BTreeSet<String>,
}

impl CompiledRule {
    /// The rule text it was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Features the rule reads, so callers can load only those.
    pub fn referenced_features(&self) -> &BTreeSet<String> {
        &self.features
    }

    /// Segments the rule depends on via `segment(..)`/`in_segment(..)`, for ordering
    /// evaluation and rejecting cycles between segment definitions.
    pub fn referenced_segments(&self) -> &BTreeSet<String> {
        &self.segments
    }

    /// Evaluates the rule for one profile under three-valued logic.
    pub fn evaluate<C: EvalContext + ?Sized>(&self, context: &C) -> Truth {
        Truth::from_option(self.root.truth(context))
    }

    /// Whether the profile satisfies the rule: [`Self::evaluate`] is [`Truth::True`].
    /// Missing values never make a rule match.
    pub fn matches<C: EvalContext + ?Sized>(&self, context: &C) -> bool {
        self.evaluate(context).is_true()
    }
}

/// Static type of an expression during checking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Number,
    String,
    Bool,
    /// An undeclared trait: any of the above, known only at evaluation.
    Dynamic,
}

impl Type {
    fn of(value_type: ValueType) -> Self {
        match value_type {
            ValueType::Number => Type::Number,
            ValueType::String => Type::String,
            ValueType::Bool => Type::Bool,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Type::Number => "a number",
            Type::String => "a string",
            Type::Bool => "true/false",
            Type::Dynamic => "a trait value",
        }
    }
}

/// Lowered, checked expression.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Literal(Value),
    Feature(Box<str>),
    CategoryShare(Box<str>),
    Trait(Box<str>),
    Consent(Box<str>),
    InSegment(Box<str>),
    Compare {
        op: CompareOp,
        left: Box<Node>,
        right: Box<Node>,
    },
    In {
        operand: Box<Node>,
        items: Box<[Value]>,
        negated: bool,
    },
    Not(Box<Node>),
    And(Box<[Node]>),
    Or(Box<[Node]>),
}

/// A value during evaluation, borrowing literals from the compiled rule.
#[derive(Debug, Clone, PartialEq)]
enum Scalar<'a> {
    Number(f64),
    Str(Cow<'a, str>),
    Bool(bool),
}

impl<'a> Scalar<'a> {
    fn borrowed(value: &'a Value) -> Option<Self> {
        match value {
            Value::Number(number) if number.is_nan() => None,
            Value::Number(number) => Some(Scalar::Number(*number)),
            Value::String(text) => Some(Scalar::Str(Cow::Borrowed(text))),
            Value::Bool(flag) => Some(Scalar::Bool(*flag)),
        }
    }

    fn owned(value: Value) -> Option<Self> {
        match value {
            Value::Number(number) if number.is_nan() => None,
            Value::Number(number) => Some(Scalar::Number(number)),
            Value::String(text) => Some(Scalar::Str(Cow::Owned(text))),
            Value::Bool(flag) => Some(Scalar::Bool(flag)),
        }
    }

    /// `self op other`, or `None` when the runtime types differ (only possible with
    /// dynamically typed traits) or the operator cannot order these values.
    fn compare(&self, op: CompareOp, other: &Scalar<'_>) -> Option<bool> {
        let ordering = match (self, other) {
            (Scalar::Number(left), Scalar::Number(right)) => left.partial_cmp(right)?,
            (Scalar::Str(left), Scalar::Str(right)) if !op.is_ordering() => left.cmp(right),
            (Scalar::Bool(left), Scalar::Bool(right)) if !op.is_ordering() => left.cmp(right),
            _ => return None,
        };
        Some(match op {
            CompareOp::Equal => ordering.is_eq(),
            CompareOp::NotEqual => ordering.is_ne(),
            CompareOp::Less => ordering.is_lt(),
            CompareOp::LessEqual => ordering.is_le(),
            CompareOp::Greater => ordering.is_gt(),
            CompareOp::GreaterEqual => ordering.is_ge(),
        })
    }
}

impl Node {
    fn value<'a, C: EvalContext + ?Sized>(&'a self, context: &C) -> Option<Scalar<'a>> {
        match self {
            Node::Literal(value) => Scalar::borrowed(value),
            Node::Feature(name) => Scalar::owned(context.feature(name)?),
            Node::CategoryShare(category) => context
                .category_share(category)
                .filter(|share| !share.is_nan())
                .map(Scalar::Number),
            Node::Trait(key) => Scalar::owned(context.trait_value(key)?),
            _ => self.truth(context).map(Scalar::Bool),
        }
    }

    /// Kleene three-valued truth: `None` is unknown.
    fn truth<C: EvalContext + ?Sized>(&self, context: &C) -> Option<bool> {
        match self {
            Node::Consent(purpose) => Some(context.consent(purpose)),
            Node::InSegment(segment) => Some(context.in_segment(segment)),
            Node::Compare { op, left, right } => {
                let left = left.value(context)?;
                let right = right.value(context)?;
                left.compare(*op, &right)
            }
            Node::In {
                operand,
                items,
                negated,
            } => {
                let operand = operand.value(context)?;
                let mut unknown = false;
                let mut found = false;
                for item in items.iter() {
                    match Scalar::borrowed(item)
                        .and_then(|item| operand.compare(CompareOp::Equal, &item))
                    {
                        Some(true) => {
                            found = true;
                            break;
                        }
                        Some(false) => {}
                        None => unknown = true,
                    }
                }
                if !found && unknown {
                    return None;
                }
                Some(found != *negated)
            }
            Node::Not(inner) => inner.truth(context).map(|value| !value),
            Node::And(operands) => {
                let mut unknown = false;
                for operand in operands.iter() {
                    match operand.truth(context) {
                        Some(false) => return Some(false),
                        Some(true) => {}
                        None => unknown = true,
                    }
                }
                (!unknown).then_some(true)
            }
            Node::Or(operands) => {
                let mut unknown = false;
                for operand in operands.iter() {
                    match operand.truth(context) {
                        Some(true) => return Some(true),
                        Some(false) => {}
                        None => unknown = true,
                    }
                }
                (!unknown).then_some(false)
            }
            Node::Literal(_) | Node::Feature(_) | Node::CategoryShare(_) | Node::Trait(_) => {
                match self.value(context)? {
                    Scalar::Bool(flag) => Some(flag),
                    _ => None,
                }
            }
        }
    }
}

struct Checker<'s> {
    source: &'s str,
    schema: &'s Schema,
    features: BTreeSet<String>,
    segments: BTreeSet<String>,
}

impl Checker<'_> {
    fn error(&self, kind: RuleErrorKind, span: Span, message: impl Into<String>) -> RuleError {
        RuleError::new(kind, self.source, span, message)
    }

    /// The source text of `span`, shortened for messages.
    fn text(&self, span: Span) -> String {
        let text = self.source.get(span.start..span.end).unwrap_or("");
        let mut shortened: String = text.chars().take(40).collect();
        if shortened.len() < text.len() {
            shortened.push('…');
        }
        shortened
    }

    /// Checks an expression used as a condition (true/false).
    fn condition(&mut self, expression: &Expr) -> Result<Node, RuleError> {
        let (node, found) = self.expression(expression)?;
        match found {
            Type::Bool | Type::Dynamic => Ok(node),
            Type::Number => Err(self.error(
                RuleErrorKind::Type,
                expression.span,
                format!(
                    "expected a condition (true/false), but `{}` is a number; compare it, e.g. `{} > 0`",
                    self.text(expression.span),
                    self.text(expression.span)
                ),
            )),
            Type::String => Err(self.error(
                RuleErrorKind::Type,
                expression.span,
                format!(
                    "expected a condition (true/false), but `{}` is a string; compare it with `==` or `in`",
                    self.text(expression.span)
                ),
            )),
        }
    }

    fn expression(&mut self, expression: &Expr) -> Result<(Node, Type), RuleError> {
        let span = expression.span;
        match &expression.kind {
            ExprKind::Literal(literal) => Ok(literal_node(literal)),
            ExprKind::Identifier(name) => self.feature(name, span),
            ExprKind::Call {
                name,
                name_span,
                arguments,
            } => self.call(name, *name_span, arguments, span),
            ExprKind::Compare { op, left, right } => {
                let (left_node, left_type) = self.expression(left)?;
                let (right_node, right_type) = self.expression(right)?;
                self.check_comparison(*op, left, left_type, right, right_type, span)?;
                Ok((
                    Node::Compare {
                        op: *op,
                        left: Box::new(left_node),
                        right: Box::new(right_node),
                    },
                    Type::Bool,
                ))
            }
            ExprKind::In {
                operand,
                items,
                negated,
            } => {
                let (operand_node, operand_type) = self.expression(operand)?;
                let mut values = Vec::with_capacity(items.len());
                for item in items {
                    let ExprKind::Literal(literal) = &item.kind else {
                        return Err(self.error(
                            RuleErrorKind::Type,
                            item.span,
                            format!(
                                "list items must be literal values, found `{}`",
                                self.text(item.span)
                            ),
                        ));
                    };
                    let (value, item_type) = literal_value(literal);
                    if operand_type != Type::Dynamic && item_type != operand_type {
                        return Err(self.error(
                            RuleErrorKind::Type,
                            item.span,
                            format!(
                                "list item `{}` is {}, but `{}` is {}",
                                self.text(item.span),
                                item_type.describe(),
                                self.text(operand.span),
                                operand_type.describe()
                            ),
                        ));
                    }
                    values.push(value);
                }
                Ok((
                    Node::In {
                        operand: Box::new(operand_node),
                        items: values.into_boxed_slice(),
                        negated: *negated,
                    },
                    Type::Bool,
                ))
            }
            ExprKind::Not(inner) => Ok((Node::Not(Box::new(self.condition(inner)?)), Type::Bool)),
            ExprKind::And(operands) => {
                let nodes = operands
                    .iter()
                    .map(|operand| self.condition(operand))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((Node::And(nodes.into_boxed_slice()), Type::Bool))
            }
            ExprKind::Or(operands) => {
                let nodes = operands
                    .iter()
                    .map(|operand| self.condition(operand))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((Node::Or(nodes.into_boxed_slice()), Type::Bool))
            }
        }
    }

    fn feature(&mut self, name: &str, span: Span) -> Result<(Node, Type), RuleError> {
        if let Some(value_type) = self.schema.features.get(name) {
            self.features.insert(name.to_string());
            return Ok((Node::Feature(name.into()), Type::of(*value_type)));
        }
        if FUNCTIONS.contains(&name) {
            return Err(self.error(
                RuleErrorKind::UnknownFeature,
                span,
                format!("`{name}` is a function; call it like {name}(\"...\")"),
            ));
        }
        let suggestion = closest_match(name, self.schema.features.keys().map(String::as_str));
        Err(self
            .error(
                RuleErrorKind::UnknownFeature,
                span,
                format!("unknown feature \"{name}\""),
            )
            .with_suggestion(suggestion))
    }

    fn call(
        &mut self,
        name: &str,
        name_span: Span,
        arguments: &[Expr],
        span: Span,
    ) -> Result<(Node, Type), RuleError> {
        if !FUNCTIONS.contains(&name) {
            let message = if self.schema.features.contains_key(name) {
                format!("`{name}` is a feature, not a function; write it without parentheses")
            } else {
                format!("unknown function \"{name}\"")
            };
            return Err(self
                .error(RuleErrorKind::UnknownFunction, name_span, message)
                .with_suggestion(closest_match(name, FUNCTIONS)));
        }
        let argument = match arguments {
            [argument] => argument,
            _ => {
                return Err(self.error(
                    RuleErrorKind::BadArguments,
                    span,
                    format!(
                        "{name} takes 1 argument, got {}; e.g. {name}(\"name\")",
                        arguments.len()
                    ),
                ));
            }
        };
        let ExprKind::Literal(Literal::String(text)) = &argument.kind else {
            return Err(self.error(
                RuleErrorKind::BadArguments,
                argument.span,
                format!(
                    "the argument of {name} must be a quoted string, found `{}`",
                    self.text(argument.span)
                ),
            ));
        };
        let text = text.as_str();
        match name {
            "category_share" => Ok((Node::CategoryShare(text.into()), Type::Number)),
            "trait" => {
                let found = self
                    .schema
                    .traits
                    .get(text)
                    .map_or(Type::Dynamic, |t| Type::of(*t));
                Ok((Node::Trait(text.into()), found))
            }
            "consent" => {
                self.known_name(
                    self.schema.consent_purposes.as_ref(),
                    text,
                    "consent purpose",
                    argument.span,
                )?;
                Ok((Node::Consent(text.into()), Type::Bool))
            }
            _ => {
                self.known_name(
                    self.schema.segments.as_ref(),
                    text,
                    "segment",
                    argument.span,
                )?;
                self.segments.insert(text.to_string());
                Ok((Node::InSegment(text.into()), Type::Bool))
            }
        }
    }

    fn known_name(
        &self,
        known: Option<&BTreeSet<String>>,
        name: &str,
        what: &str,
        span: Span,
    ) -> Result<(), RuleError> {
        match known {
            Some(known) if !known.contains(name) => Err(self
                .error(
                    RuleErrorKind::UnknownName,
                    span,
                    format!("unknown {what} \"{name}\""),
                )
                .with_suggestion(closest_match(name, known.iter().map(String::as_str)))),
            _ => Ok(()),
        }
    }

    fn check_comparison(
        &self,
        op: CompareOp,
        left: &Expr,
        left_type: Type,
        right: &Expr,
        right_type: Type,
        span: Span,
    ) -> Result<(), RuleError> {
        if op.is_ordering() {
            for (operand, found) in [(left, left_type), (right, right_type)] {
                if matches!(found, Type::String | Type::Bool) {
                    return Err(self.error(
                        RuleErrorKind::Type,
                        operand.span,
                        format!(
                            "`{}` compares numbers, but `{}` is {}",
                            op.symbol(),
                            self.text(operand.span),
                            found.describe()
                        ),
                    ));
                }
            }
        }
        let compatible =
            left_type == right_type || left_type == Type::Dynamic || right_type == Type::Dynamic;
        if compatible {
            return Ok(());
        }
        Err(self.error(
            RuleErrorKind::Type,
            span,
            format!(
                "cannot compare `{}` ({}) with `{}` ({})",
                self.text(left.span),
                left_type.describe(),
                self.text(right.span),
                right_type.describe()
            ),
        ))
    }
}

fn literal_value(literal: &Literal) -> (Value, Type) {
    match literal {
        Literal::Number(number) => (Value::Number(*number), Type::Number),
        Literal::String(text) => (Value::String(text.clone()), Type::String),
        Literal::Bool(flag) => (Value::Bool(*flag), Type::Bool),
    }
}

fn literal_node(literal: &Literal) -> (Node, Type) {
    let (value, found) = literal_value(literal);
    (Node::Literal(value), found)
}
