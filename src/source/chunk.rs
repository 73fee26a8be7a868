//! Cutting text into passages: `chunk_text(text, max_chars, overlap_chars)`.
//!
//! Each chunk is as long as possible (at most `max_chars` characters — Unicode scalar values, not
//! bytes) and ends at the strongest boundary available in its window:
//!
//! 1. a paragraph break (a blank line), then a line break,
//! 2. a sentence end (`.`, `!`, `?` followed by whitespace, or `。！？`),
//! 3. whitespace between words,
//! 4. otherwise (one word longer than `max_chars`) a hard cut at a character boundary.
//!
//! Levels 1 and 2 are used only if they leave a chunk of at least half of `max_chars`, so a
//! paragraph break early in the window does not produce a tiny chunk. Chunks are trimmed and
//! never empty. With `overlap_chars > 0`, each chunk after the first starts up to that many
//! characters before the end of the previous one, at the start of a word.

use std::fmt;

/// Invalid chunking parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkError {
    /// `max_chars` was 0.
    ZeroMax,
    /// `overlap_chars` was not smaller than `max_chars`.
    OverlapTooLarge {
        /// The overlap asked for.
        overlap: usize,
        /// The chunk size.
        max: usize,
    },
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkError::ZeroMax => write!(f, "max_chars must be at least 1"),
            ChunkError::OverlapTooLarge { overlap, max } => write!(
                f,
                "overlap_chars ({overlap}) must be smaller than max_chars ({max})"
            ),
        }
    }
}

impl std::error::Error for ChunkError {}

/// Byte index after advancing `n` characters from byte `from` (or `s.len()`), and whether the
/// end of `s` was reached before `n` characters.
fn advance(s: &str, from: usize, n: usize) -> (usize, bool) {
    match s[from..].char_indices().nth(n) {
        Some((i, _)) => (from + i, false),
        None => (s.len(), true),
    }
}

/// Splits `text` into chunks of at most `max_chars` characters; see the module documentation.
pub fn chunk_text(
    text: &str,
    max_chars: usize,
    overlap_chars: usize,
) -> Result<Vec<String>, ChunkError> {
    if max_chars == 0 {
        return Err(ChunkError::ZeroMax);
    }
    if overlap_chars >= max_chars {
        return Err(ChunkError::OverlapTooLarge {
            overlap: overlap_chars,
            max: max_chars,
        });
    }
    let mut chunks = Vec::new();
    let mut start = 0;
    loop {
        // Skip whitespace at the start of the chunk.
        start += text[start..].len() - text[start..].trim_start().len();
        if start >= text.len() {
            break;
        }
        let (window_end, fits) = advance(text, start, max_chars);
        if fits {
            push(&mut chunks, &text[start..]);
            break;
        }
        let (min_end, _) = advance(text, start, max_chars / 2);
        let cut = best_cut(text, start, min_end, window_end);
        push(&mut chunks, &text[start..cut]);
        let next = if overlap_chars == 0 {
            cut
        } else {
            overlap_start(text, start, cut, overlap_chars)
        };
        debug_assert!(next > start);
        start = next;
    }
    Ok(chunks)
}

fn push(chunks: &mut Vec<String>, s: &str) {
    let t = s.trim();
    if !t.is_empty() {
        chunks.push(t.to_string());
    }
}

/// The byte index to cut at in `text[start..window_end]` (exclusive end of the chunk).
fn best_cut(text: &str, start: usize, min_end: usize, window_end: usize) -> usize {
    let window = &text[start..window_end];
    let bytes = window.as_bytes();
    // The character right after the window decides whether the window ends at a boundary.
    let next_is_space = text[window_end..]
        .chars()
        .next()
        .is_some_and(char::is_whitespace);
    if next_is_space {
        return window_end;
    }
    let min_rel = min_end - start;
    // 1. Paragraph break: "\n" + optional spaces + "\n". Cut before the break.
    let mut line_break = None;
    for i in (0..bytes.len()).rev() {
        if bytes[i] != b'\n' {
            continue;
        }
        if i < min_rel {
            break;
        }
        line_break.get_or_insert(i);
        let before = window[..i].trim_end_matches([' ', '\t', '\r']);
        if before.ends_with('\n') {
            return start + before.len() - 1;
        }
    }
    if let Some(i) = line_break {
        return start + i;
    }
    // 2. Sentence end: cut after the punctuation.
    let mut following_space = false;
    for (i, c) in window.char_indices().rev() {
        if i < min_rel {
            break;
        }
        let end = i + c.len_utf8();
        let ascii_end = matches!(c, '.' | '!' | '?') && following_space;
        let cjk_end = matches!(c, '。' | '！' | '？');
        if ascii_end || cjk_end {
            return start + end;
        }
        following_space = c.is_whitespace();
    }
    // 3. Whitespace between words, anywhere in the window after the first character.
    if let Some((i, _)) = window
        .char_indices()
        .rev()
        .find(|(i, c)| *i > 0 && c.is_whitespace())
    {
        return start + i;
    }
    // 4. Hard cut at a character boundary.
    window_end
}

/// Where the chunk after `text[start..cut]` begins: up to `overlap` characters before `cut`, moved
/// forward to a word start; `cut` itself if no word start lies in that range.
fn overlap_start(text: &str, start: usize, cut: usize, overlap: usize) -> usize {
    let region = &text[start..cut];
    let back = region
        .char_indices()
        .rev()
        .nth(overlap.saturating_sub(1))
        .map(|(i, _)| start + i)
        .unwrap_or(start);
    let mut p = back;
    // Inside a word: move to its end.
    let prev_is_word = text[..p]
        .chars()
        .next_back()
        .is_some_and(|c| !c.is_whitespace());
    if prev_is_word {
        p += text[p..cut].find(char::is_whitespace).unwrap_or(cut - p);
    }
    // Then past the whitespace, to the start of the next word.
    p += text[p..cut].len() - text[p..cut].trim_start().len();
    if p <= start || p >= cut { cut } else { p }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(t: &str, max: usize, overlap: usize) -> Vec<String> {
        chunk_text(t, max, overlap).unwrap()
    }

    fn squash(s: &str) -> String {
        s.chars().filter(|c| !c.is_whitespace()).collect()
    }

    #[test]
    fn short_text_is_one_trimmed_chunk_and_empty_is_none() {
        assert_eq!(chunks("  hello world \n", 100, 0), vec!["hello world"]);
        assert!(chunks("", 10, 0).is_empty());
        assert!(chunks(" \n\t ", 10, 0).is_empty());
    }

    #[test]
    fn prefers_paragraphs_then_lines() {
        let t = "First paragraph has words.\n\nSecond paragraph is here. More text follows on.";
        let c = chunks(t, 40, 0);
        assert_eq!(c[0], "First paragraph has words.");
        let t = "Line one is fairly long\nline two goes on and on and on";
        assert_eq!(chunks(t, 30, 0)[0], "Line one is fairly long");
    }

    #[test]
    fn falls_back_to_sentences_then_words() {
        let t = "One sentence here. Another sentence there and it keeps going";
        assert_eq!(chunks(t, 30, 0)[0], "One sentence here.");
        let t = "alpha beta gamma delta epsilon zeta eta theta";
        let c = chunks(t, 12, 0);
        assert!(c.iter().all(|x| x.chars().count() <= 12), "{c:?}");
        assert_eq!(c[0], "alpha beta");
        assert_eq!(squash(&c.concat()), squash(t));
    }

    #[test]
    fn avoids_tiny_chunks_from_an_early_break() {
        let t = "Hi.\n\nThis is a much longer paragraph that goes well beyond the limit";
        let c = chunks(t, 40, 0);
        assert!(c[0].chars().count() >= 20, "{c:?}");
    }

    #[test]
    fn hard_cuts_a_long_word_at_char_boundaries() {
        let t = "ééééééééééééééééééééé";
        let c = chunks(t, 5, 0);
        assert!(c.iter().all(|x| x.chars().count() <= 5));
        assert_eq!(c.concat(), t);
    }

    #[test]
    fn multibyte_text_is_never_split_inside_a_char() {
        let t =
            "收入增长了百分之十二。利润率提高到百分之三十。😀 emoji 😀 and ünïcödé wörds. 好的！";
        for max in 1..20 {
            let c = chunks(t, max, 0);
            assert!(c.iter().all(|x| x.chars().count() <= max), "{max}: {c:?}");
            assert_eq!(squash(&c.concat()), squash(t), "{max}");
        }
        assert_eq!(chunks(t, 12, 0)[0], "收入增长了百分之十二。");
    }

    #[test]
    fn overlap_starts_at_a_word_and_progresses() {
        let t = "one two three four five six seven eight nine ten eleven twelve";
        let c = chunks(t, 20, 8);
        assert!(c.len() > 3);
        for w in c.windows(2) {
            let first_word = w[1].split_whitespace().next().unwrap();
            assert!(w[0].contains(first_word), "{w:?} should overlap");
        }
        assert!(c.iter().all(|x| x.chars().count() <= 20));
        assert!(
            t.split_whitespace()
                .all(|w| c.iter().any(|x| x.contains(w)))
        );
    }

    #[test]
    fn rejects_bad_parameters() {
        assert_eq!(chunk_text("x", 0, 0), Err(ChunkError::ZeroMax));
        assert!(matches!(
            chunk_text("x", 5, 5),
            Err(ChunkError::OverlapTooLarge { .. })
        ));
    }

    #[test]
    fn random_texts_keep_the_invariants() {
        let alphabet: Vec<char> = "ab cd.\n!é😀字 ".chars().collect();
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as usize
        };
        for _ in 0..400 {
            let len = next() % 300;
            let t: String = (0..len)
                .map(|_| alphabet[next() % alphabet.len()])
                .collect();
            let max = 1 + next() % 40;
            let c = chunks(&t, max, 0);
            for x in &c {
                assert!(!x.is_empty() && x.trim() == x && x.chars().count() <= max);
            }
            assert_eq!(squash(&c.concat()), squash(&t), "{t:?} {max}");
            if max > 1 {
                let o = chunks(&t, max, next() % max);
                assert!(o.iter().all(|x| x.chars().count() <= max));
                assert!(o.len() >= c.len().min(1));
            }
        }
    }
}
