//! Cleaning whole lines in place: lone surrogate escapes, and malformed lines blanked (skip)
//! or emptied (null), every byte offset kept.

/// What reading does with a malformed line of a JSON-lines table (`OPTIONS ('bad_rows' ...)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadRows {
    /// The statement fails, naming the file and line (the default).
    #[default]
    Fail,
    /// The line is left out and counted.
    Skip,
    /// The line becomes a row of NULLs and is counted.
    Null,
}

impl BadRows {
    /// `fail`, `skip` or `null`.
    pub fn parse(s: &str) -> Option<BadRows> {
        match s.to_ascii_lowercase().as_str() {
            "fail" => Some(BadRows::Fail),
            "skip" => Some(BadRows::Skip),
            "null" => Some(BadRows::Null),
            _ => None,
        }
    }

    /// The option's value as written.
    pub fn as_str(self) -> &'static str {
        match self {
            BadRows::Fail => "fail",
            BadRows::Skip => "skip",
            BadRows::Null => "null",
        }
    }
}

/// What the lines are.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    /// JSON objects.
    Json,
    /// CSV records of `fields` fields.
    Csv {
        delimiter: u8,
        quote: u8,
        fields: usize,
    },
}

/// Whole lines in, the same bytes cleaned out.
pub(super) struct Cleaner {
    pub(super) mode: BadRows,
    kind: Kind,
    carry: Vec<u8>,
    /// Offset of `carry[0]` in the object.
    pub(super) at: u64,
    /// Offsets of the bad lines found since last taken.
    pub(super) bad: Vec<u64>,
}

impl Cleaner {
    pub(super) fn new(mode: BadRows, at: u64, kind: Kind) -> Cleaner {
        Cleaner {
            mode,
            kind,
            carry: Vec::new(),
            at,
            bad: Vec::new(),
        }
    }

    /// Adds bytes; returns the lines they complete, cleaned, with their offset.
    pub(super) fn push(&mut self, chunk: &[u8]) -> Option<(u64, Vec<u8>)> {
        let searched = self.carry.len();
        self.carry.extend_from_slice(chunk);
        let end = searched + memchr::memrchr(b'\n', &self.carry[searched..])? + 1;
        let rest = self.carry.split_off(end);
        let lines = std::mem::replace(&mut self.carry, rest);
        Some(self.clean(lines))
    }

    /// The last line, which has no newline, at the end of the object.
    pub(super) fn finish(&mut self) -> Option<(u64, Vec<u8>)> {
        if self.carry.is_empty() {
            return None;
        }
        let lines = std::mem::take(&mut self.carry);
        Some(self.clean(lines))
    }

    fn clean(&mut self, mut lines: Vec<u8>) -> (u64, Vec<u8>) {
        let start = self.at;
        let mut pos = start;
        for line in lines.split_mut(|b| *b == b'\n') {
            match self.kind {
                Kind::Json => {
                    fix_lone_surrogates(line);
                    if self.mode != BadRows::Fail && is_malformed(line) {
                        self.bad.push(pos);
                        blank(line, self.mode);
                    }
                }
                Kind::Csv {
                    delimiter,
                    quote,
                    fields,
                } => {
                    let blank_line = line.iter().all(|b| *b == b'\r');
                    if !blank_line && csv_field_count(line, delimiter, quote) != fields {
                        self.bad.push(pos);
                        blank_csv(line, self.mode, delimiter, fields);
                    }
                }
            }
            pos += line.len() as u64 + 1;
        }
        self.at += lines.len() as u64;
        (start, lines)
    }
}

/// Not one JSON object (blank lines are not malformed: the reader passes over them).
fn is_malformed(line: &[u8]) -> bool {
    let t = line.trim_ascii();
    if t.is_empty() {
        return false;
    }
    t[0] != b'{' || serde_json::from_slice::<serde::de::IgnoredAny>(t).is_err()
}

/// Blanks (skip) or `{}` then blanks (null), same length.
fn blank(line: &mut [u8], mode: BadRows) {
    line.fill(b' ');
    if mode == BadRows::Null && line.len() >= 2 {
        line[..2].copy_from_slice(b"{}");
    }
}

fn hex4(b: &[u8]) -> Option<u16> {
    let s = std::str::from_utf8(b.get(..4)?).ok()?;
    u16::from_str_radix(s, 16).ok()
}

/// Rewrites each `\uD800`–`\uDFFF` escape that is not part of a pair as `\ufffd`.
fn fix_lone_surrogates(line: &mut [u8]) {
    fix_from(line, 0, line.len());
}

/// [`fix_lone_surrogates`] for the escapes that start in `from..limit` (they may look at the
/// bytes after `limit`); returns where the next scan resumes (at or past `limit`).
pub(super) fn fix_from(buf: &mut [u8], from: usize, limit: usize) -> usize {
    let limit = limit.min(buf.len());
    let mut i = from;
    while i < limit {
        let Some(found) = memchr::memchr(b'\\', &buf[i..limit]) else {
            return limit;
        };
        let at = i + found;
        if buf.get(at + 1) != Some(&b'u') {
            i = at + 2;
            continue;
        }
        let Some(unit) = hex4(&buf[(at + 2).min(buf.len())..]) else {
            i = at + 2;
            continue;
        };
        let paired = (0xD800..0xDC00).contains(&unit)
            && buf.get(at + 6..at + 8) == Some(b"\\u")
            && hex4(&buf[(at + 8).min(buf.len())..]).is_some_and(|u| (0xDC00..0xE000).contains(&u));
        if paired {
            i = at + 12;
        } else {
            if (0xD800..0xE000).contains(&unit) {
                buf[at..at + 6].copy_from_slice(b"\\ufffd");
            }
            i = at + 6;
        }
    }
    i
}

/// The fields of one CSV line (delimiters outside quotes, plus one).
pub(super) fn csv_field_count(line: &[u8], delimiter: u8, quote: u8) -> usize {
    let mut quoted = false;
    let mut n = 1;
    for &b in line {
        if b == quote {
            quoted = !quoted;
        } else if b == delimiter && !quoted {
            n += 1;
        }
    }
    n
}

/// Newlines (skip: empty lines, which the CSV reader passes over), or `fields - 1` delimiters
/// then newlines (null: a record of empty fields), same length.
fn blank_csv(line: &mut [u8], mode: BadRows, delimiter: u8, fields: usize) {
    line.fill(b'\n');
    let commas = fields.saturating_sub(1);
    if mode == BadRows::Null && commas > 0 && line.len() > commas {
        line[..commas].fill(delimiter);
    }
}
