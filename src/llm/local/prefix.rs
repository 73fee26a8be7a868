//! Prompt-prefix reuse in the local model's KV cache: a sequence whose prompt starts with tokens
//! that another slot holds (an active sequence, or a finished one whose cells are kept) takes
//! those cells (llama.cpp's sequence copy) and decodes only the rest of its prompt.
//!
//! Every slot has its own KV stream (llama.cpp's per-sequence cache), so cells kept for reuse
//! never take room that an active sequence needs: a finished sequence's cells stay in its slot
//! only until a new row is placed there, and a new row goes to the free slot that holds the
//! longest prefix of its prompt, else to an empty one, else to the one used longest ago.

use llama_cpp_2::token::LlamaToken;

/// Shared prefixes shorter than this are decoded again: a copy between slots moves the whole
/// stream's buffer, which costs more than decoding a few tokens.
pub(super) const MIN_SHARED: usize = 32;

/// What a slot's KV cells hold.
#[derive(Debug, Default)]
pub(super) struct Held {
    /// The tokens at positions `0..` of the slot's cells.
    pub tokens: Vec<LlamaToken>,
    /// When the slot last took or finished a row (a counter): of the free slots holding no
    /// useful prefix, the one used longest ago is overwritten first.
    pub used_at: u64,
}

/// The length of the common prefix of `a` and `b`.
pub(super) fn shared(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The prefix of `prompt` that may be taken from cells holding `tokens`: at least its last
/// token is decoded again, for its logits.
fn usable(prompt: &[LlamaToken], tokens: &[LlamaToken]) -> usize {
    shared(prompt, tokens).min(prompt.len().saturating_sub(1))
}

/// The free slot (of `free`, indexes into `held`) for a row with `prompt`: the one whose cells
/// share the longest prefix with it (at least [`MIN_SHARED`] tokens), else an empty one, else
/// the one used longest ago. `None` when `free` is empty.
pub(super) fn place(prompt: &[LlamaToken], free: &[usize], held: &[Held]) -> Option<usize> {
    let best = free
        .iter()
        .map(|&s| (usable(prompt, &held[s].tokens), s))
        .filter(|&(n, _)| n >= MIN_SHARED)
        .max_by_key(|&(n, s)| (n, std::cmp::Reverse(s)));
    if let Some((_, s)) = best {
        return Some(s);
    }
    free.iter()
        .copied()
        .find(|&s| held[s].tokens.is_empty())
        .or_else(|| free.iter().copied().min_by_key(|&s| (held[s].used_at, s)))
}

/// What a sequence that has not started does in this step.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// Decode the whole prompt.
    Fresh,
    /// Take the first `len` cells of slot `from` (its own slot or another one) and decode the
    /// rest of the prompt.
    Take {
        /// The slot whose cells are taken.
        from: usize,
        /// How many (positions `0..len`).
        len: usize,
    },
    /// A started sequence is decoding a longer shared prefix: take it once it is there.
    Wait,
}

/// The plan of the sequence in slot `me` with `prompt`: `held[j]` is what slot `j`'s cells hold
/// now (slot `me`'s own included: a finished row's kept cells); `coming[j]`, for a sequence that
/// has started and is still decoding its prompt, is that prompt (what its cells will hold).
pub(super) fn plan(
    me: usize,
    prompt: &[LlamaToken],
    held: &[&[LlamaToken]],
    coming: &[Option<&[LlamaToken]>],
) -> Plan {
    let now = held
        .iter()
        .enumerate()
        .map(|(j, t)| (usable(prompt, t), j))
        .filter(|&(n, _)| n >= MIN_SHARED)
        // The longest; of equals, its own slot (no copy), then the lowest.
        .max_by_key(|&(n, j)| (n, j == me, std::cmp::Reverse(j)));
    let have = now.map_or(0, |(n, _)| n);
    let later = coming
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != me)
        .filter_map(|(_, c)| c.map(|c| usable(prompt, c)))
        .max()
        .unwrap_or(0);
    if later >= MIN_SHARED && later >= have + MIN_SHARED {
        return Plan::Wait;
    }
    match now {
        Some((len, from)) => Plan::Take { from, len },
        None => Plan::Fresh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(v: impl IntoIterator<Item = i32>) -> Vec<LlamaToken> {
        v.into_iter().map(LlamaToken).collect()
    }

    fn held(tokens: Vec<LlamaToken>, used_at: u64) -> Held {
        Held { tokens, used_at }
    }

    #[test]
    fn a_row_goes_where_its_prefix_is_kept_else_to_an_empty_slot_else_the_oldest() {
        let passage = toks(0..100);
        let mut prompt = passage.clone();
        prompt.extend(toks([500, 501]));
        let slots = vec![
            held(toks(1000..1100), 1),
            held(passage.clone(), 5),
            held(vec![], 0),
            held(toks(2000..2100), 3),
        ];
        assert_eq!(place(&prompt, &[0, 1, 2, 3], &slots), Some(1));
        assert_eq!(place(&prompt, &[0, 2, 3], &slots), Some(2));
        assert_eq!(place(&prompt, &[0, 3], &slots), Some(0), "used longest ago");
        assert_eq!(place(&prompt, &[], &slots), None);
        // A shared prefix shorter than MIN_SHARED does not count.
        let short = toks((0..10).chain(3000..3100));
        assert_eq!(place(&short, &[1, 3], &slots), Some(3));
    }

    #[test]
    fn a_sequence_takes_the_longest_held_prefix_and_decodes_its_last_token() {
        let passage = toks(0..100);
        let mut prompt = passage.clone();
        prompt.extend(toks([7, 8, 9]));
        let other = toks(0..60);
        let held = [&other[..], &passage[..], &[][..]];
        assert_eq!(
            plan(2, &prompt, &held, &[None, None, None]),
            Plan::Take { from: 1, len: 100 }
        );
        // The same prompt held whole: all but its last token.
        let same = prompt.clone();
        let held = [&[][..], &same[..], &[][..]];
        assert_eq!(
            plan(2, &prompt, &held, &[None, None, None]),
            Plan::Take { from: 1, len: 102 }
        );
        // Its own slot wins a tie: no copy.
        let held = [&passage[..], &passage[..]];
        assert_eq!(
            plan(1, &prompt, &held, &[None, None]),
            Plan::Take { from: 1, len: 100 }
        );
        assert_eq!(plan(0, &toks(500..600), &held, &[None, None]), Plan::Fresh);
    }

    #[test]
    fn a_sequence_waits_for_a_longer_prefix_being_decoded_but_not_for_itself() {
        let passage = toks(0..100);
        let mut prompt = passage.clone();
        prompt.push(LlamaToken(7));
        let mut theirs = passage.clone();
        theirs.push(LlamaToken(8));
        let nothing: [&[LlamaToken]; 2] = [&[], &[]];
        assert_eq!(
            plan(1, &prompt, &nothing, &[Some(&theirs[..]), None]),
            Plan::Wait
        );
        assert_eq!(
            plan(0, &prompt, &nothing, &[Some(&theirs[..]), None]),
            Plan::Fresh
        );
        // Already held almost as long as what is coming: take it now.
        let most = toks(0..90);
        let held = [&[][..], &most[..]];
        assert_eq!(
            plan(1, &prompt, &held, &[Some(&theirs[..]), None]),
            Plan::Take { from: 1, len: 90 }
        );
    }
}
