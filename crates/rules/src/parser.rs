//! Recursive-descent parser. Grammar, loosest binding first:
//!
//! ```text
//! or         := and ("or" and)*
//! and        := not ("and" not)*
//! not        := "not" not | comparison
//! comparison := operand (("==" | "!=" | "<" | "<=" | ">" | ">=") operand
//!                        | "not"? "in" list)?
//! operand    := number | "-" number | string | "true" | "false"
//!             | name | name "(" (or ("," or)*)? ")" | "(" or ")"
//! list       := "[" (operand ("," operand)* ","?)? "]"
//! ```
//!
//! Comparisons do not chain (`a < b < c` is an error). Nesting depth and node count are
//! bounded so hostile input is rejected with an error instead of exhausting the stack.

use crate::ast::{CompareOp, Expr, ExprKind, Literal};
use crate::error::{RuleError, RuleErrorKind, Span};
use crate::lexer::{Token, TokenKind, tokenize};
use crate::{MAX_NESTING_DEPTH, MAX_NODES, MAX_SOURCE_BYTES};

/// Parses rule source into a syntax tree without checking names or types (see
/// [`crate::compile`] for that).
///
/// Errors: [`RuleErrorKind::Syntax`], [`RuleErrorKind::TooDeep`] beyond
/// [`MAX_NESTING_DEPTH`] nested parentheses/`not`/call arguments, and
/// [`RuleErrorKind::TooLarge`] beyond [`MAX_SOURCE_BYTES`] or [`MAX_NODES`].
pub fn parse(source: &str) -> Result<Expr, RuleError> {
    if source.len() > MAX_SOURCE_BYTES {
        return Err(RuleError::new(
            RuleErrorKind::TooLarge,
            source,
            Span::new(MAX_SOURCE_BYTES, source.len()),
            format!("rule is longer than {MAX_SOURCE_BYTES} bytes"),
        ));
    }
    let tokens = tokenize(source)?;
    let mut parser = Parser {
        source,
        tokens,
        position: 0,
        depth: 0,
        nodes: 0,
    };
    if parser.peek() == &TokenKind::End {
        return Err(parser.error_here("empty rule; expected a condition"));
    }
    let expression = parser.parse_or()?;
    if parser.peek() != &TokenKind::End {
        let token = parser.current().clone();
        let message = match token.kind {
            TokenKind::RightParen => "unmatched `)`".to_string(),
            _ => format!(
                "expected `and`, `or` or end of rule, found {}",
                token.kind.describe()
            ),
        };
        return Err(RuleError::new(
            RuleErrorKind::Syntax,
            source,
            token.span,
            message,
        ));
    }
    Ok(expression)
}

struct Parser<'s> {
    source: &'s str,
    tokens: Vec<Token>,
    position: usize,
    depth: usize,
    nodes: usize,
}

impl<'s> Parser<'s> {
    fn current(&self) -> &Token {
        // The token list always ends with `End`, and `advance` never moves past it.
        &self.tokens[self.position.min(self.tokens.len() - 1)]
    }

    fn peek(&self) -> &TokenKind {
        &self.current().kind
    }

    fn peek_second(&self) -> &TokenKind {
        &self.tokens[(self.position + 1).min(self.tokens.len() - 1)].kind
    }

    fn advance(&mut self) -> Token {
        let token = self.current().clone();
        if self.position < self.tokens.len() - 1 {
            self.position += 1;
        }
        token
    }

    fn error_here(&self, message: impl Into<String>) -> RuleError {
        RuleError::new(
            RuleErrorKind::Syntax,
            self.source,
            self.current().span,
            message,
        )
    }

    fn node(&mut self, kind: ExprKind, span: Span) -> Result<Expr, RuleError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(RuleError::new(
                RuleErrorKind::TooLarge,
                self.source,
                span,
                format!("rule has more than {MAX_NODES} terms; split it into segments"),
            ));
        }
        Ok(Expr { kind, span })
    }

    /// Runs `inner` one nesting level deeper, refusing to go past the limit.
    fn nested<T>(
        &mut self,
        span: Span,
        inner: impl FnOnce(&mut Self) -> Result<T, RuleError>,
    ) -> Result<T, RuleError> {
        if self.depth >= MAX_NESTING_DEPTH {
            return Err(RuleError::new(
                RuleErrorKind::TooDeep,
                self.source,
                span,
                format!("rule is nested more than {MAX_NESTING_DEPTH} levels deep"),
            ));
        }
        self.depth += 1;
        let result = inner(self);
        self.depth -= 1;
        result
    }

    fn parse_or(&mut self) -> Result<Expr, RuleError> {
        self.parse_chain(TokenKind::Or, Self::parse_and, ExprKind::Or)
    }

    fn parse_and(&mut self) -> Result<Expr, RuleError> {
        self.parse_chain(TokenKind::And, Self::parse_not, ExprKind::And)
    }

    fn parse_chain(
        &mut self,
        separator: TokenKind,
        mut operand: impl FnMut(&mut Self) -> Result<Expr, RuleError>,
        build: fn(Vec<Expr>) -> ExprKind,
    ) -> Result<Expr, RuleError> {
        let first = operand(self)?;
        if self.peek() != &separator {
            return Ok(first);
        }
        let mut operands = vec![first];
        while self.peek() == &separator {
            self.advance();
            operands.push(operand(self)?);
        }
        let span = operands[0].span.to(operands[operands.len() - 1].span);
        self.node(build(operands), span)
    }

    fn parse_not(&mut self) -> Result<Expr, RuleError> {
        if self.peek() != &TokenKind::Not {
            return self.parse_comparison();
        }
        let not_token = self.advance();
        let operand = self.nested(not_token.span, Self::parse_not)?;
        let span = not_token.span.to(operand.span);
        self.node(ExprKind::Not(Box::new(operand)), span)
    }

    fn parse_comparison(&mut self) -> Result<Expr, RuleError> {
        let left = self.parse_operand()?;
        let op = match self.peek() {
            TokenKind::Equal => CompareOp::Equal,
            TokenKind::NotEqual => CompareOp::NotEqual,
            TokenKind::Less => CompareOp::Less,
            TokenKind::LessEqual => CompareOp::LessEqual,
            TokenKind::Greater => CompareOp::Greater,
            TokenKind::GreaterEqual => CompareOp::GreaterEqual,
            TokenKind::In => {
                self.advance();
                return self.parse_in(left, false);
            }
            TokenKind::Not if self.peek_second() == &TokenKind::In => {
                self.advance();
                self.advance();
                return self.parse_in(left, true);
            }
            _ => return Ok(left),
        };
        self.advance();
        let right = self.parse_operand()?;
        if let Some(chained) = comparison_operator(self.peek()) {
            return Err(self.error_here(format!(
                "comparisons cannot be chained; write `a {} b and b {} c` instead",
                op.symbol(),
                chained.symbol()
            )));
        }
        let span = left.span.to(right.span);
        self.node(
            ExprKind::Compare {
                op,
                left: Box::new(left),
                right: Box::new(right),
            },
            span,
        )
    }

    fn parse_in(&mut self, operand: Expr, negated: bool) -> Result<Expr, RuleError> {
        if self.peek() != &TokenKind::LeftBracket {
            return Err(self.error_here(format!(
                "expected a list like [\"a\", \"b\"] after `in`, found {}",
                self.peek().describe()
            )));
        }
        let open = self.advance();
        let mut items = Vec::new();
        loop {
            if self.peek() == &TokenKind::RightBracket {
                break;
            }
            items.push(self.nested(open.span, Self::parse_operand)?);
            match self.peek() {
                TokenKind::Comma => {
                    self.advance();
                }
                TokenKind::RightBracket => break,
                other => {
                    let message =
                        format!("expected `,` or `]` in list, found {}", other.describe());
                    return Err(self.error_here(message));
                }
            }
        }
        let close = self.advance();
        let span = operand.span.to(close.span);
        self.node(
            ExprKind::In {
                operand: Box::new(operand),
                items,
                negated,
            },
            span,
        )
    }

    fn parse_operand(&mut self) -> Result<Expr, RuleError> {
        let token = self.advance();
        match token.kind {
            TokenKind::Number(value) => {
                self.node(ExprKind::Literal(Literal::Number(value)), token.span)
            }
            TokenKind::Minus => match self.peek().clone() {
                TokenKind::Number(value) => {
                    let number = self.advance();
                    self.node(
                        ExprKind::Literal(Literal::Number(-value)),
                        token.span.to(number.span),
                    )
                }
                other => Err(self.error_here(format!(
                    "`-` must be followed by a number, found {}",
                    other.describe()
                ))),
            },
            TokenKind::String(text) => {
                self.node(ExprKind::Literal(Literal::String(text)), token.span)
            }
            TokenKind::True => self.node(ExprKind::Literal(Literal::Bool(true)), token.span),
            TokenKind::False => self.node(ExprKind::Literal(Literal::Bool(false)), token.span),
            TokenKind::Identifier(name) => {
                if self.peek() == &TokenKind::LeftParen {
                    self.parse_call(name, token.span)
                } else {
                    self.node(ExprKind::Identifier(name), token.span)
                }
            }
            TokenKind::LeftParen => {
                let inner = self.nested(token.span, Self::parse_or)?;
                if self.peek() != &TokenKind::RightParen {
                    let message = format!(
                        "expected `)` to close the `(` at {}, found {}",
                        crate::error::Position::of_offset(self.source, token.span.start),
                        self.peek().describe()
                    );
                    return Err(self.error_here(message));
                }
                let close = self.advance();
                Ok(Expr {
                    kind: inner.kind,
                    span: token.span.to(close.span),
                })
            }
            other => Err(RuleError::new(
                RuleErrorKind::Syntax,
                self.source,
                token.span,
                format!("expected a value or condition, found {}", other.describe()),
            )),
        }
    }

    fn parse_call(&mut self, name: String, name_span: Span) -> Result<Expr, RuleError> {
        let open = self.advance();
        let mut arguments = Vec::new();
        if self.peek() != &TokenKind::RightParen {
            loop {
                arguments.push(self.nested(open.span, Self::parse_or)?);
                match self.peek() {
                    TokenKind::Comma => {
                        self.advance();
                    }
                    TokenKind::RightParen => break,
                    other => {
                        let message = format!(
                            "expected `,` or `)` in arguments of {name}, found {}",
                            other.describe()
                        );
                        return Err(self.error_here(message));
                    }
                }
            }
        }
        let close = self.advance();
        self.node(
            ExprKind::Call {
                name,
                name_span,
                arguments,
            },
            name_span.to(close.span),
        )
    }
}

fn comparison_operator(kind: &TokenKind) -> Option<CompareOp> {
    match kind {
        TokenKind::Equal => Some(CompareOp::Equal),
        TokenKind::NotEqual => Some(CompareOp::NotEqual),
        TokenKind::Less => Some(CompareOp::Less),
        TokenKind::LessEqual => Some(CompareOp::LessEqual),
        TokenKind::Greater => Some(CompareOp::Greater),
        TokenKind::GreaterEqual => Some(CompareOp::GreaterEqual),
        _ => None,
    }
}
