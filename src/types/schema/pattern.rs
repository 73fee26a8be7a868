//! A string's `pattern`: compiled once, matched against whole strings, and able to make an
//! example string that matches it (explain's placeholder for a patterned string).

use regex_syntax::hir::{Class, Hir, HirKind};

/// A string's `pattern`, compiled once (compared by its text).
#[derive(Debug, Clone)]
pub struct Pattern(regex::Regex);

impl Pattern {
    /// Compiles `source`, which must be anchored (`^...$`): the local model's grammar is made
    /// from whole-string patterns, so validation matches whole strings too.
    pub fn new(source: &str) -> Result<Pattern, String> {
        if !(source.starts_with('^') && source.ends_with('$')) || source.ends_with("\\$") {
            return Err(format!(
                "pattern {source:?} must match the whole string: start it with ^ and end it with $"
            ));
        }
        regex::Regex::new(source)
            .map(Pattern)
            .map_err(|e| format!("pattern {source:?} is not a valid regular expression: {e}"))
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        self.0.as_str()
    }

    /// Whether `s` matches.
    pub fn is_match(&self, s: &str) -> bool {
        self.0.is_match(s)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source() == other.source()
    }
}

impl Pattern {
    /// A string that matches, about `chars` long where the pattern lets it choose, its free text
    /// drawn from `filler`; `None` for patterns it cannot follow.
    pub fn example(&self, chars: usize, filler: &str) -> Option<String> {
        let hir = regex_syntax::Parser::new().parse(self.source()).ok()?;
        let mut out = String::new();
        let mut fill = filler.chars().cycle();
        example_of(&hir, chars, &mut fill, &mut out);
        self.is_match(&out).then_some(out)
    }
}

fn example_of(h: &Hir, chars: usize, fill: &mut impl Iterator<Item = char>, out: &mut String) {
    match h.kind() {
        HirKind::Empty | HirKind::Look(_) => {}
        HirKind::Literal(l) => out.push_str(&String::from_utf8_lossy(&l.0)),
        HirKind::Class(c) => out.push(pick(c, fill)),
        HirKind::Capture(c) => example_of(&c.sub, chars, fill, out),
        HirKind::Concat(parts) => parts.iter().for_each(|p| example_of(p, chars, fill, out)),
        HirKind::Alternation(branches) => example_of(&branches[0], chars, fill, out),
        HirKind::Repetition(r) => {
            let single = matches!(r.sub.kind(), HirKind::Class(_) | HirKind::Literal(_));
            let max = r.max.unwrap_or(r.min.saturating_add(chars as u32)) as usize;
            let n = if single {
                chars
                    .saturating_sub(out.chars().count())
                    .clamp(r.min as usize, max)
            } else {
                (r.min as usize).max(1).min(max)
            };
            for _ in 0..n {
                example_of(&r.sub, chars, fill, out);
            }
        }
    }
}

/// The next filler character if the class has it, else a letter or a space it has, else its
/// first printable character.
fn pick(c: &Class, fill: &mut impl Iterator<Item = char>) -> char {
    let has = |ch: char| match c {
        Class::Unicode(u) => u.ranges().iter().any(|r| r.start() <= ch && ch <= r.end()),
        Class::Bytes(b) => {
            ch.is_ascii()
                && b.ranges()
                    .iter()
                    .any(|r| r.start() <= ch as u8 && ch as u8 <= r.end())
        }
    };
    if let Some(ch) = fill.next().filter(|ch| has(*ch)) {
        return ch;
    }
    ('a'..='z')
        .chain([' '])
        .chain('A'..='Z')
        .chain('0'..='9')
        .find(|ch| has(*ch))
        .or_else(|| match c {
            Class::Unicode(u) => u
                .ranges()
                .iter()
                .map(|r| r.start().max(' '))
                .find(|ch| has(*ch)),
            Class::Bytes(b) => b.ranges().first().map(|r| r.start() as char),
        })
        .unwrap_or(' ')
}
