//! Cleaning whole lines in place: lone surrogate escapes, and malformed lines blanked (skip)
//! or emptied (null), every byte offset kept.

use super::BadRows;

/// Whole lines in, the same bytes cleaned out.
pub(super) struct Cleaner {
    pub(super) mode: BadRows,
    carry: Vec<u8>,
    /// Offset of `carry[0]` in the object.
    pub(super) at: u64,
    /// Offsets of the bad lines found since last taken.
    pub(super) bad: Vec<u64>,
}

impl Cleaner {
    pub(super) fn new(mode: BadRows, at: u64) -> Cleaner {
        Cleaner {
            mode,
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
            fix_lone_surrogates(line);
            if self.mode != BadRows::Fail && is_malformed(line) {
                self.bad.push(pos);
                blank(line, self.mode);
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
    let mut i = 0;
    while let Some(found) = memchr::memchr(b'\\', &line[i..]) {
        let at = i + found;
        if line.get(at + 1) != Some(&b'u') {
            i = at + 2;
            continue;
        }
        let Some(unit) = hex4(&line[(at + 2).min(line.len())..]) else {
            i = at + 2;
            continue;
        };
        let paired = (0xD800..0xDC00).contains(&unit)
            && line.get(at + 6..at + 8) == Some(b"\\u")
            && hex4(&line[(at + 8).min(line.len())..])
                .is_some_and(|u| (0xDC00..0xE000).contains(&u));
        if paired {
            i = at + 12;
        } else if (0xD800..0xE000).contains(&unit) {
            line[at..at + 6].copy_from_slice(b"\\ufffd");
            i = at + 6;
        } else {
            i = at + 6;
        }
        if i >= line.len() {
            break;
        }
    }
}
