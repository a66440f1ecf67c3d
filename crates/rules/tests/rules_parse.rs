//! Parsing: precedence and associativity, literals, and syntax-error positions.

#![allow(clippy::unwrap_used)]

use clientele_rules::{
    CompareOp, Expr, ExprKind, Literal, MAX_NESTING_DEPTH, MAX_NODES, MAX_SOURCE_BYTES, Position,
    RuleErrorKind, Span, parse,
};

/// Renders a tree fully parenthesised, to assert on structure compactly.
fn render(expression: &Expr) -> String {
    match &expression.kind {
        ExprKind::Literal(Literal::Number(number)) => number.to_string(),
        ExprKind::Literal(Literal::String(text)) => format!("{text:?}"),
        ExprKind::Literal(Literal::Bool(flag)) => flag.to_string(),
        ExprKind::Identifier(name) => name.clone(),
        ExprKind::Call {
            name, arguments, ..
        } => format!(
            "{name}({})",
            arguments.iter().map(render).collect::<Vec<_>>().join(", ")
        ),
        ExprKind::Compare { op, left, right } => {
            format!("({} {} {})", render(left), op.symbol(), render(right))
        }
        ExprKind::In {
            operand,
            items,
            negated,
        } => format!(
            "({} {}in [{}])",
            render(operand),
            if *negated { "not " } else { "" },
            items.iter().map(render).collect::<Vec<_>>().join(", ")
        ),
        ExprKind::Not(inner) => format!("(not {})", render(inner)),
        ExprKind::And(operands) => format!(
            "({})",
            operands
                .iter()
                .map(render)
                .collect::<Vec<_>>()
                .join(" and ")
        ),
        ExprKind::Or(operands) => format!(
            "({})",
            operands.iter().map(render).collect::<Vec<_>>().join(" or ")
        ),
    }
}

fn parsed(source: &str) -> String {
    render(&parse(source).unwrap())
}

#[test]
fn and_binds_tighter_than_or() {
    assert_eq!(parsed("a or b and c"), "(a or (b and c))");
    assert_eq!(parsed("a and b or c"), "((a and b) or c)");
}

#[test]
fn not_binds_tighter_than_and_but_looser_than_comparison() {
    assert_eq!(parsed("not a and b"), "((not a) and b)");
    assert_eq!(parsed("not orders > 3"), "(not (orders > 3))");
    assert_eq!(parsed("not not a"), "(not (not a))");
}

#[test]
fn parentheses_override_precedence() {
    assert_eq!(parsed("(a or b) and c"), "((a or b) and c)");
}

#[test]
fn and_or_chains_are_flattened() {
    assert_eq!(parsed("a and b and c and d"), "(a and b and c and d)");
    assert_eq!(parsed("a or b or c"), "(a or b or c)");
}

#[test]
fn example_rules_parse_to_the_expected_structure() {
    assert_eq!(
        parsed(r#"recency_days <= 30 and orders >= 3 and category_share("books") > 0.5"#),
        r#"((recency_days <= 30) and (orders >= 3) and (category_share("books") > 0.5))"#
    );
    assert_eq!(
        parsed(r#"trait("vip") == true or (tier in ["gold", "vip"] and not consent("email"))"#),
        r#"((trait("vip") == true) or ((tier in ["gold", "vip"]) and (not consent("email"))))"#
    );
}

#[test]
fn literals_cover_negative_numbers_exponents_and_both_quote_styles() {
    assert_eq!(parsed("x > -2.5"), "(x > -2.5)");
    assert_eq!(parsed("x < 1e3"), "(x < 1000)");
    assert_eq!(parsed(r#"t == 'it\'s' "#), r#"(t == "it's")"#);
    assert_eq!(parsed("x not in [1, 2,]"), "(x not in [1, 2])");
    assert_eq!(parsed("x in []"), "(x in [])");
}

#[test]
fn keywords_are_case_insensitive() {
    assert_eq!(
        parsed("a AND NOT b Or c == TRUE"),
        "((a and (not b)) or (c == true))"
    );
}

#[test]
fn every_comparison_operator_parses() {
    for op in [
        CompareOp::Equal,
        CompareOp::NotEqual,
        CompareOp::Less,
        CompareOp::LessEqual,
        CompareOp::Greater,
        CompareOp::GreaterEqual,
    ] {
        let source = format!("x {} 1", op.symbol());
        let ExprKind::Compare { op: found, .. } = parse(&source).unwrap().kind else {
            panic!("{source} did not parse to a comparison");
        };
        assert_eq!(found, op);
    }
}

#[test]
fn spans_cover_the_source_of_each_node() {
    let source = "orders >= 3 and (tier == 'gold')";
    let ExprKind::And(operands) = parse(source).unwrap().kind else {
        panic!("expected and");
    };
    assert_eq!(operands[0].span, Span::new(0, 11));
    assert_eq!(
        &source[operands[1].span.start..operands[1].span.end],
        "(tier == 'gold')"
    );
}

fn syntax_error(source: &str) -> (RuleErrorKind, usize, Position, String) {
    let error = parse(source).unwrap_err();
    (
        error.kind,
        error.span.start,
        error.position,
        error.to_string(),
    )
}

#[test]
fn chained_comparisons_are_rejected_at_the_second_operator() {
    let (kind, offset, position, message) = syntax_error("1 < x < 3");
    assert_eq!(kind, RuleErrorKind::Syntax);
    assert_eq!(offset, 6);
    assert_eq!(position, Position { line: 1, column: 7 });
    assert!(message.contains("cannot be chained"), "{message}");
}

#[test]
fn missing_operand_is_reported_at_end_of_input_on_the_right_line() {
    let (kind, offset, position, message) = syntax_error("orders > 3 and\n  recency_days <=");
    assert_eq!(kind, RuleErrorKind::Syntax);
    assert_eq!(offset, 32);
    assert_eq!(
        position,
        Position {
            line: 2,
            column: 18
        }
    );
    assert_eq!(
        message,
        "expected a value or condition, found end of rule at 2:18"
    );
}

#[test]
fn unclosed_parenthesis_names_where_it_was_opened() {
    let (_, offset, _, message) = syntax_error("(a or b and c");
    assert_eq!(offset, 13);
    assert!(message.contains("close the `(` at 1:1"), "{message}");
}

#[test]
fn unmatched_closing_parenthesis_is_reported() {
    let (_, offset, _, message) = syntax_error("a or b)");
    assert_eq!(offset, 6);
    assert!(message.starts_with("unmatched `)`"), "{message}");
}

#[test]
fn c_style_operators_get_a_hint() {
    assert!(syntax_error("a && b").3.contains("use `and`"));
    assert!(syntax_error("a || b").3.contains("use `or`"));
    assert!(syntax_error("!a").3.contains("use `not`"));
    assert!(syntax_error("a = 1").3.contains("use `==`"));
}

#[test]
fn in_requires_a_list() {
    let (_, offset, _, message) = syntax_error("tier in 'gold'");
    assert_eq!(offset, 8);
    assert!(message.contains("expected a list"), "{message}");
}

#[test]
fn empty_rule_is_rejected() {
    let (kind, _, _, message) = syntax_error("   ");
    assert_eq!(kind, RuleErrorKind::Syntax);
    assert!(message.starts_with("empty rule"), "{message}");
}

#[test]
fn non_ascii_input_reports_character_columns() {
    let error = parse("tier == \"café\" and ☃").unwrap_err();
    assert_eq!(error.span.start, 20);
    assert_eq!(
        error.position,
        Position {
            line: 1,
            column: 20
        }
    );
    assert_eq!(error.message, "unexpected character '☃'");
}

#[test]
fn nesting_beyond_the_limit_is_an_error_not_a_stack_overflow() {
    let depth = MAX_NESTING_DEPTH;
    let allowed = format!("{}a{}", "(".repeat(depth), ")".repeat(depth));
    assert!(parse(&allowed).is_ok());
    let too_deep = format!("{}a{}", "(".repeat(depth + 1), ")".repeat(depth + 1));
    let error = parse(&too_deep).unwrap_err();
    assert_eq!(error.kind, RuleErrorKind::TooDeep);
    assert_eq!(error.span.start, depth);

    let nots = format!("{}a", "not ".repeat(1_000));
    assert_eq!(parse(&nots).unwrap_err().kind, RuleErrorKind::TooDeep);
    let parens = "(".repeat(MAX_SOURCE_BYTES);
    assert_eq!(parse(&parens).unwrap_err().kind, RuleErrorKind::TooDeep);
}

#[test]
fn oversized_rules_are_rejected() {
    let long = format!("a == \"{}\"", "x".repeat(MAX_SOURCE_BYTES));
    assert_eq!(parse(&long).unwrap_err().kind, RuleErrorKind::TooLarge);
    let many_terms = vec!["a"; MAX_NODES + 1].join(" or ");
    assert_eq!(
        parse(&many_terms).unwrap_err().kind,
        RuleErrorKind::TooLarge
    );
}
