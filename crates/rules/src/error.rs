//! Errors for rule compilation: every error points at the offending source text by byte
//! offset and by 1-based line:column, and carries a message written for the marketer who
//! typed the rule.

use std::fmt;

/// A half-open byte range `start..end` into the rule source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Span {
    /// Byte offset of the first byte.
    pub start: usize,
    /// Byte offset one past the last byte (`== start` for an end-of-input position).
    pub end: usize,
}

impl Span {
    /// The span `start..end`.
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// The smallest span covering both `self` and `other`.
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

/// A human position in the source: 1-based line and 1-based column counted in characters
/// (Unicode scalar values), so it matches what an editor shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl Position {
    /// The position of byte `offset` in `source` (clamped to the end of the source).
    pub fn of_offset(source: &str, offset: usize) -> Self {
        let mut offset = offset.min(source.len());
        while !source.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &source[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        let column = before[line_start..].chars().count() + 1;
        Self { line, column }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// What kind of problem a [`RuleError`] reports; stable for programmatic handling (the
/// message text is for people and may change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleErrorKind {
    /// The text is not a well-formed expression (bad token, missing operand, unbalanced
    /// parenthesis, …).
    Syntax,
    /// An identifier that is not a declared feature.
    UnknownFeature,
    /// A call to a function the language does not have.
    UnknownFunction,
    /// A function called with the wrong number or kind of arguments.
    BadArguments,
    /// Operands or conditions of incompatible types, e.g. a string compared with a number.
    Type,
    /// A name passed to `consent(..)` or `segment(..)` that the schema does not know.
    UnknownName,
    /// Parentheses/`not` nested deeper than [`crate::MAX_NESTING_DEPTH`].
    TooDeep,
    /// Source longer than [`crate::MAX_SOURCE_BYTES`] or more than [`crate::MAX_NODES`] nodes.
    TooLarge,
}

/// A problem found while parsing or checking a rule.
///
/// Displays as `{message} at {line}:{column}` followed by `; did you mean "{suggestion}"?`
/// when a close match exists, e.g.
/// `unknown feature "recncy_days" at 1:1; did you mean "recency_days"?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// Category of the problem.
    pub kind: RuleErrorKind,
    /// Where in the source the problem is (bytes).
    pub span: Span,
    /// Line and column of `span.start`.
    pub position: Position,
    /// Human-readable description, without the position.
    pub message: String,
    /// A close, valid alternative to what was written, if any.
    pub suggestion: Option<String>,
}

impl RuleError {
    pub(crate) fn new(
        kind: RuleErrorKind,
        source: &str,
        span: Span,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            span,
            position: Position::of_offset(source, span.start),
            message: message.into(),
            suggestion: None,
        }
    }

    pub(crate) fn with_suggestion(mut self, suggestion: Option<String>) -> Self {
        self.suggestion = suggestion;
        self
    }
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.message, self.position)?;
        if let Some(suggestion) = &self.suggestion {
            write!(f, "; did you mean \"{suggestion}\"?")?;
        }
        Ok(())
    }
}

impl std::error::Error for RuleError {}

/// Edit distance between two strings in characters, counting an insertion, deletion,
/// substitution or swap of adjacent characters as one edit (optimal string alignment):
/// swapped letters are the commonest typo.
fn edit_distance(left: &str, right: &str) -> usize {
    let left: Vec<char> = left.chars().collect();
    let right: Vec<char> = right.chars().collect();
    let width = right.len() + 1;
    // rows[i][j] = distance between left[..i] and right[..j], kept for the last three i.
    let mut two_back: Vec<usize> = vec![0; width];
    let mut previous: Vec<usize> = (0..width).collect();
    let mut current: Vec<usize> = vec![0; width];
    for i in 1..=left.len() {
        current[0] = i;
        for j in 1..width {
            let cost = usize::from(left[i - 1] != right[j - 1]);
            let mut distance = (previous[j - 1] + cost)
                .min(previous[j] + 1)
                .min(current[j - 1] + 1);
            if i > 1 && j > 1 && left[i - 1] == right[j - 2] && left[i - 2] == right[j - 1] {
                distance = distance.min(two_back[j - 2] + 1);
            }
            current[j] = distance;
        }
        std::mem::swap(&mut two_back, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[right.len()]
}

/// The candidate closest to `name` by edit distance, if it is close enough to be a likely
/// typo: at most a third of the name's length (at least 1, at most 3 edits). Ties go to the
/// first candidate in iteration order.
pub(crate) fn closest_match<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let allowed = (name.chars().count() / 3).clamp(1, 3);
    let lowercase = name.to_lowercase();
    candidates
        .into_iter()
        .map(|candidate| {
            (
                edit_distance(&lowercase, &candidate.to_lowercase()),
                candidate,
            )
        })
        .filter(|(distance, _)| *distance <= allowed)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_counts_lines_and_characters() {
        let source = "a and\n  é == b";
        assert_eq!(
            Position::of_offset(source, 0),
            Position { line: 1, column: 1 }
        );
        assert_eq!(
            Position::of_offset(source, 8),
            Position { line: 2, column: 3 }
        );
        // Byte 11 is after the two-byte 'é': column counts it as one character.
        assert_eq!(
            Position::of_offset(source, 11),
            Position { line: 2, column: 5 }
        );
        assert_eq!(
            Position::of_offset(source, 999),
            Position { line: 2, column: 9 }
        );
    }

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("recncy_days", "recency_days"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("emial", "email"), 1);
    }

    #[test]
    fn closest_match_suggests_only_plausible_typos() {
        let features = ["recency_days", "orders", "tier"];
        assert_eq!(
            closest_match("recncy_days", features),
            Some("recency_days".to_string())
        );
        assert_eq!(
            closest_match("Orders", features),
            Some("orders".to_string())
        );
        assert_eq!(closest_match("zebra", features), None);
    }
}
