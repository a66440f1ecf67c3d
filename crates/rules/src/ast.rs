//! Syntax tree produced by the parser. Every node carries its source span so the checker can
//! point at problems. `and`/`or` chains are n-ary (flattened), so a long chain of conditions
//! does not make the tree deep.

use crate::error::Span;

/// A literal value written in the rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// A number such as `3`, `0.5`, `-2`, `1e3`.
    Number(f64),
    /// A quoted string, escapes resolved.
    String(String),
    /// `true` or `false`.
    Bool(bool),
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareOp {
    /// `==`
    Equal,
    /// `!=`
    NotEqual,
    /// `<`
    Less,
    /// `<=`
    LessEqual,
    /// `>`
    Greater,
    /// `>=`
    GreaterEqual,
}

impl CompareOp {
    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        match self {
            CompareOp::Equal => "==",
            CompareOp::NotEqual => "!=",
            CompareOp::Less => "<",
            CompareOp::LessEqual => "<=",
            CompareOp::Greater => ">",
            CompareOp::GreaterEqual => ">=",
        }
    }

    /// Whether the operator orders its operands (only numbers can be ordered).
    pub fn is_ordering(self) -> bool {
        !matches!(self, CompareOp::Equal | CompareOp::NotEqual)
    }
}

/// An expression node with its span.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    /// What the node is.
    pub kind: ExprKind,
    /// Where it is in the source.
    pub span: Span,
}

/// The kinds of expression node.
#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    /// A literal value.
    Literal(Literal),
    /// A bare name, resolved against the schema's features.
    Identifier(String),
    /// `name(arguments…)`; `name_span` covers just the name.
    Call {
        /// Function name as written.
        name: String,
        /// Span of the name.
        name_span: Span,
        /// Argument expressions.
        arguments: Vec<Expr>,
    },
    /// `left op right`.
    Compare {
        /// Operator.
        op: CompareOp,
        /// Left operand.
        left: Box<Expr>,
        /// Right operand.
        right: Box<Expr>,
    },
    /// `operand in [items…]` or, with `negated`, `operand not in [items…]`.
    In {
        /// The value looked up.
        operand: Box<Expr>,
        /// List elements (literals).
        items: Vec<Expr>,
        /// `not in`.
        negated: bool,
    },
    /// `not operand`.
    Not(Box<Expr>),
    /// `a and b and …` (two or more operands).
    And(Vec<Expr>),
    /// `a or b or …` (two or more operands).
    Or(Vec<Expr>),
}
