//! Lexer: turns rule source into tokens with byte spans. Keywords (`and`, `or`, `not`, `in`,
//! `true`, `false`) are case-insensitive; identifiers are ASCII `[A-Za-z_][A-Za-z0-9_]*`.

use crate::error::{RuleError, RuleErrorKind, Span};

/// A token kind with its payload.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TokenKind {
    Identifier(String),
    Number(f64),
    String(String),
    True,
    False,
    And,
    Or,
    Not,
    In,
    LeftParen,
    RightParen,
    LeftBracket,
    RightBracket,
    Comma,
    Minus,
    Equal,
    NotEqual,
    Less,
    LessEqual,
    Greater,
    GreaterEqual,
    End,
}

impl TokenKind {
    /// How the token is named in error messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            TokenKind::Identifier(name) => format!("name \"{name}\""),
            TokenKind::Number(value) => format!("number {value}"),
            TokenKind::String(text) => format!("string {text:?}"),
            TokenKind::True => "`true`".into(),
            TokenKind::False => "`false`".into(),
            TokenKind::And => "`and`".into(),
            TokenKind::Or => "`or`".into(),
            TokenKind::Not => "`not`".into(),
            TokenKind::In => "`in`".into(),
            TokenKind::LeftParen => "`(`".into(),
            TokenKind::RightParen => "`)`".into(),
            TokenKind::LeftBracket => "`[`".into(),
            TokenKind::RightBracket => "`]`".into(),
            TokenKind::Comma => "`,`".into(),
            TokenKind::Minus => "`-`".into(),
            TokenKind::Equal => "`==`".into(),
            TokenKind::NotEqual => "`!=`".into(),
            TokenKind::Less => "`<`".into(),
            TokenKind::LessEqual => "`<=`".into(),
            TokenKind::Greater => "`>`".into(),
            TokenKind::GreaterEqual => "`>=`".into(),
            TokenKind::End => "end of rule".into(),
        }
    }
}

/// A token and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub kind: TokenKind,
    pub span: Span,
}

/// Splits `source` into tokens, ending with a [`TokenKind::End`] token.
pub(crate) fn tokenize(source: &str) -> Result<Vec<Token>, RuleError> {
    let bytes = source.as_bytes();
    let mut tokens = Vec::new();
    let mut index = 0;
    let syntax = |start: usize, end: usize, message: String| {
        RuleError::new(
            RuleErrorKind::Syntax,
            source,
            Span::new(start, end),
            message,
        )
    };
    while index < bytes.len() {
        let start = index;
        let byte = bytes[index];
        let single = |kind: TokenKind| Token {
            kind,
            span: Span::new(start, start + 1),
        };
        let double = |kind: TokenKind| Token {
            kind,
            span: Span::new(start, start + 2),
        };
        let next = bytes.get(index + 1).copied();
        let token = match byte {
            b' ' | b'\t' | b'\r' | b'\n' => {
                index += 1;
                continue;
            }
            b'(' => single(TokenKind::LeftParen),
            b')' => single(TokenKind::RightParen),
            b'[' => single(TokenKind::LeftBracket),
            b']' => single(TokenKind::RightBracket),
            b',' => single(TokenKind::Comma),
            b'-' => single(TokenKind::Minus),
            b'=' if next == Some(b'=') => double(TokenKind::Equal),
            b'=' => {
                return Err(syntax(
                    start,
                    start + 1,
                    "unexpected `=`; use `==` to compare".into(),
                ));
            }
            b'!' if next == Some(b'=') => double(TokenKind::NotEqual),
            b'!' => {
                return Err(syntax(
                    start,
                    start + 1,
                    "unexpected `!`; use `not` to negate".into(),
                ));
            }
            b'<' if next == Some(b'=') => double(TokenKind::LessEqual),
            b'<' => single(TokenKind::Less),
            b'>' if next == Some(b'=') => double(TokenKind::GreaterEqual),
            b'>' => single(TokenKind::Greater),
            b'&' if next == Some(b'&') => {
                return Err(syntax(
                    start,
                    start + 2,
                    "unexpected `&&`; use `and`".into(),
                ));
            }
            b'|' if next == Some(b'|') => {
                return Err(syntax(start, start + 2, "unexpected `||`; use `or`".into()));
            }
            b'"' | b'\'' => lex_string(source, start)?,
            b'0'..=b'9' => lex_number(source, start)?,
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => lex_word(source, start),
            _ => {
                let character = source[start..].chars().next().unwrap_or('?');
                let end = start + character.len_utf8();
                return Err(syntax(
                    start,
                    end,
                    format!("unexpected character {character:?}"),
                ));
            }
        };
        index = token.span.end;
        tokens.push(token);
    }
    tokens.push(Token {
        kind: TokenKind::End,
        span: Span::new(source.len(), source.len()),
    });
    Ok(tokens)
}

fn lex_word(source: &str, start: usize) -> Token {
    let bytes = source.as_bytes();
    let mut end = start;
    while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
        end += 1;
    }
    let word = &source[start..end];
    let kind = match word.to_ascii_lowercase().as_str() {
        "and" => TokenKind::And,
        "or" => TokenKind::Or,
        "not" => TokenKind::Not,
        "in" => TokenKind::In,
        "true" => TokenKind::True,
        "false" => TokenKind::False,
        _ => TokenKind::Identifier(word.to_string()),
    };
    Token {
        kind,
        span: Span::new(start, end),
    }
}

fn lex_number(source: &str, start: usize) -> Result<Token, RuleError> {
    let bytes = source.as_bytes();
    let digits_from = |mut at: usize| {
        while at < bytes.len() && bytes[at].is_ascii_digit() {
            at += 1;
        }
        at
    };
    let mut end = digits_from(start);
    if bytes.get(end) == Some(&b'.') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit) {
        end = digits_from(end + 1);
    }
    if matches!(bytes.get(end), Some(b'e' | b'E')) {
        let mut exponent = end + 1;
        if matches!(bytes.get(exponent), Some(b'+' | b'-')) {
            exponent += 1;
        }
        if bytes.get(exponent).is_some_and(u8::is_ascii_digit) {
            end = digits_from(exponent);
        }
    }
    let trailing_word = bytes
        .get(end)
        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.');
    if trailing_word {
        let mut bad_end = end;
        while bad_end < bytes.len()
            && (bytes[bad_end].is_ascii_alphanumeric() || matches!(bytes[bad_end], b'_' | b'.'))
        {
            bad_end += 1;
        }
        return Err(RuleError::new(
            RuleErrorKind::Syntax,
            source,
            Span::new(start, bad_end),
            format!("invalid number `{}`", &source[start..bad_end]),
        ));
    }
    let text = &source[start..end];
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() => Ok(Token {
            kind: TokenKind::Number(value),
            span: Span::new(start, end),
        }),
        _ => Err(RuleError::new(
            RuleErrorKind::Syntax,
            source,
            Span::new(start, end),
            format!("number `{text}` is out of range"),
        )),
    }
}

fn lex_string(source: &str, start: usize) -> Result<Token, RuleError> {
    let quote = source.as_bytes()[start] as char;
    let mut text = String::new();
    let mut characters = source[start + 1..].char_indices();
    while let Some((offset, character)) = characters.next() {
        let at = start + 1 + offset;
        match character {
            c if c == quote => {
                return Ok(Token {
                    kind: TokenKind::String(text),
                    span: Span::new(start, at + 1),
                });
            }
            '\\' => {
                let escaped = match characters.next() {
                    Some((_, 'n')) => '\n',
                    Some((_, 't')) => '\t',
                    Some((_, '\\')) => '\\',
                    Some((_, '"')) => '"',
                    Some((_, '\'')) => '\'',
                    Some((_, other)) => {
                        return Err(RuleError::new(
                            RuleErrorKind::Syntax,
                            source,
                            Span::new(at, at + 1 + other.len_utf8()),
                            format!("unknown escape `\\{other}` in string"),
                        ));
                    }
                    None => break,
                };
                text.push(escaped);
            }
            c => text.push(c),
        }
    }
    Err(RuleError::new(
        RuleErrorKind::Syntax,
        source,
        Span::new(start, source.len()),
        "unterminated string",
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn kinds(source: &str) -> Vec<TokenKind> {
        tokenize(source)
            .unwrap()
            .into_iter()
            .map(|token| token.kind)
            .collect()
    }

    #[test]
    fn tokenize_recognises_operators_keywords_and_literals() {
        assert_eq!(
            kinds(r#"orders >= 3 AND tier in ['gold', "v\"ip"] or not x != -1.5e2"#),
            vec![
                TokenKind::Identifier("orders".into()),
                TokenKind::GreaterEqual,
                TokenKind::Number(3.0),
                TokenKind::And,
                TokenKind::Identifier("tier".into()),
                TokenKind::In,
                TokenKind::LeftBracket,
                TokenKind::String("gold".into()),
                TokenKind::Comma,
                TokenKind::String("v\"ip".into()),
                TokenKind::RightBracket,
                TokenKind::Or,
                TokenKind::Not,
                TokenKind::Identifier("x".into()),
                TokenKind::NotEqual,
                TokenKind::Minus,
                TokenKind::Number(150.0),
                TokenKind::End,
            ]
        );
    }

    #[test]
    fn tokenize_records_byte_spans() {
        let tokens = tokenize("a <= \"é\"").unwrap();
        assert_eq!(tokens[1].span, Span::new(2, 4));
        assert_eq!(tokens[2].span, Span::new(5, 9));
        assert_eq!(tokens[3].span, Span::new(9, 9));
    }

    #[test]
    fn tokenize_rejects_single_equals_with_a_hint() {
        let error = tokenize("orders = 3").unwrap_err();
        assert_eq!(error.span, Span::new(7, 8));
        assert!(error.message.contains("=="), "{error}");
    }

    #[test]
    fn tokenize_rejects_unterminated_strings_at_their_opening_quote() {
        let error = tokenize("tier == \"gold").unwrap_err();
        assert_eq!(error.span.start, 8);
        assert_eq!(error.message, "unterminated string");
    }

    #[test]
    fn tokenize_rejects_numbers_glued_to_words() {
        assert!(tokenize("orders > 3days").is_err());
        assert!(tokenize("orders > 1.2.3").is_err());
        assert!(tokenize("orders > 1e999").is_err());
    }
}
