//! SQL text → statements: the one lexer that the script runner and the `sluice sql` shell
//! share. It knows quotes (`'…'`, `"…"`, `` `…` ``, with doubled quotes inside), line comments
//! (`-- …`) and block comments (`/* … */`), and nothing else of SQL.

use datafusion::common::DataFusionError;
use datafusion::sql::parser::{DFParser, Statement};

/// One statement of a script, with where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptStatement {
    /// 1-based line of the statement's first non-blank character.
    pub line: usize,
    /// The statement text, without the terminating `;`.
    pub text: String,
}

/// A piece of SQL text as the lexer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// A `;` outside quotes and comments.
    End,
    /// A quoted string or identifier.
    Quoted,
    /// A line or block comment.
    Comment,
    /// A quote or block comment that the text ends inside.
    Unterminated,
    /// Whitespace.
    Blank,
    /// Anything else.
    Code,
}

/// Reads `sql` as tokens, calling `f(token, text, line)` with the 1-based line where each
/// starts. An unterminated quote or comment runs to the end of the text.
fn lex(sql: &str, mut f: impl FnMut(Token, &str, usize)) {
    let bytes = sql.as_bytes();
    let mut i = 0;
    let mut line = 1;
    while i < bytes.len() {
        let start = i;
        let start_line = line;
        let c = bytes[i];
        let token = match c {
            b'\'' | b'"' | b'`' => {
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => break Token::Unterminated,
                        Some(&d) if d == c && bytes.get(i + 1) == Some(&c) => i += 2,
                        Some(&d) if d == c => {
                            i += 1;
                            break Token::Quoted;
                        }
                        Some(_) => i += 1,
                    }
                }
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = sql[i..].find('\n').map_or(bytes.len(), |n| i + n);
                Token::Comment
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => match sql[i + 2..].find("*/") {
                Some(n) => {
                    i += 2 + n + 2;
                    Token::Comment
                }
                None => {
                    i = bytes.len();
                    Token::Unterminated
                }
            },
            b';' => {
                i += 1;
                Token::End
            }
            c if c.is_ascii_whitespace() => {
                i += 1;
                Token::Blank
            }
            _ => {
                // One character (whole, for UTF-8).
                i += sql[i..].chars().next().map_or(1, char::len_utf8);
                Token::Code
            }
        };
        let text = &sql[start..i];
        line += text.matches('\n').count();
        f(token, text, start_line);
    }
}

/// Splits SQL text into statements at `;`, ignoring semicolons inside quotes and comments.
/// Pieces that hold only comments and blanks are not statements.
pub fn split_statements(sql: &str) -> Vec<ScriptStatement> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut start_line: Option<usize> = None;
    let mut has_code = false;
    let mut flush = |cur: &mut String, start: &mut Option<usize>, has_code: &mut bool| {
        let text = cur.trim().to_string();
        if *has_code && !text.is_empty() {
            out.push(ScriptStatement {
                line: start.unwrap_or(1),
                text,
            });
        }
        cur.clear();
        *start = None;
        *has_code = false;
    };
    lex(sql, |token, text, line| match token {
        Token::End => flush(&mut cur, &mut start_line, &mut has_code),
        Token::Quoted | Token::Code | Token::Unterminated => {
            start_line.get_or_insert(line);
            has_code = true;
            cur.push_str(text);
        }
        Token::Comment | Token::Blank => cur.push_str(text),
    });
    flush(&mut cur, &mut start_line, &mut has_code);
    out
}

/// Whether `sql` ends a statement: its last token other than blanks and comments is a `;`
/// outside quotes and comments (what the shell waits for before running what was typed).
pub fn ends_statement(sql: &str) -> bool {
    let mut last = None;
    lex(sql, |token, _, _| {
        if !matches!(token, Token::Blank | Token::Comment) {
            last = Some(token);
        }
    });
    last == Some(Token::End)
}

/// The statement's first words (up to 60 characters, line comments left out), for messages.
pub fn summary(text: &str) -> String {
    let flat: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("--"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut s: String = flat.chars().take(60).collect();
    if s.len() < flat.len() {
        s.push('…');
    }
    s
}

/// The one statement of `text` (the script runner has already split the file).
pub(crate) fn parse_one(text: &str) -> Result<Statement, DataFusionError> {
    let mut statements = DFParser::parse_sql(text)?;
    match (statements.pop_front(), statements.len()) {
        (Some(statement), 0) => Ok(statement),
        (first, rest) => Err(DataFusionError::Plan(format!(
            "expected one statement, found {}",
            usize::from(first.is_some()) + rest
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_statements_with_lines() {
        let sql = "-- intro\nSELECT 1;\n\nSELECT ';' AS x, \"a;b\"\n  FROM t; /* c; */ SELECT 3\n-- end;\n";
        let s = split_statements(sql);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].line, 2);
        assert_eq!(s[1].line, 4);
        assert!(s[1].text.contains("';'"));
        assert_eq!(s[2].line, 5);
        assert_eq!(split_statements("-- only\n/* comments; */\n;\n"), vec![]);
        assert_eq!(
            split_statements("SELECT 'it''s; fine';")[0].text,
            "SELECT 'it''s; fine'"
        );
    }

    #[test]
    fn statements_end_at_a_semicolon_outside_quotes_and_comments() {
        assert!(ends_statement("SELECT 1;"));
        assert!(ends_statement("SELECT 1;  -- done\n"));
        assert!(!ends_statement("SELECT 'a;"));
        assert!(!ends_statement("SELECT 1 -- not yet;\n"));
        assert!(ends_statement("SELECT ';' AS x;\n"));
        assert!(!ends_statement("SELECT 1\n"));
        // Block comments: a `;` inside one does not end the statement (the shell used to run
        // `SELECT 1 /* ;` and fail).
        assert!(!ends_statement("SELECT 1 /* ;\n"));
        assert!(!ends_statement("SELECT 1 /* ; */\n"));
        assert!(ends_statement("SELECT 1 /* ; */;\n"));
        assert!(ends_statement("SELECT 1; /* done */\n"));
    }

    #[test]
    fn summaries_are_the_first_words_without_line_comments() {
        assert_eq!(
            summary("-- why\nSELECT a,\n  b FROM t"),
            "SELECT a, b FROM t"
        );
        let long = format!("SELECT {}", "x, ".repeat(40));
        assert!(summary(&long).ends_with('…'));
    }
}
