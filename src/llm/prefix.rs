//! The prefixes of a prompt, as the dispatcher and the replicas' routing see them: its text
//! (the system text, a separator, the user text) cut into blocks of [`BLOCK_BYTES`] bytes, each
//! named by a hash of its bytes and of the block before it, so a block's hash stands for the
//! whole prefix up to its end (as an inference server's prefix cache names its blocks of
//! tokens). Two prompts share their first `n` blocks exactly when their texts share the first
//! `n × BLOCK_BYTES` bytes (up to a hash collision, which costs a misrouted request, never a
//! wrong answer). The replicas' routing remembers which replicas were sent which blocks
//! ([`PrefixHolders`]).

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::types::LlmRequest;

/// Bytes of prompt text per block.
pub(crate) const BLOCK_BYTES: usize = 64;
/// Prefix blocks whose replicas the routing remembers.
pub(crate) const ROUTE_MEMORY: usize = 1 << 18;

/// The hashes of the full blocks of `req`'s prompt, each chained to the one before it.
pub(crate) fn prefix_blocks(req: &LlmRequest) -> Vec<u64> {
    let system = req.prompt.system.as_deref().unwrap_or("");
    let mut text = Vec::with_capacity(system.len() + 1 + req.prompt.user.len());
    text.extend_from_slice(system.as_bytes());
    // The system text and the user text are separate messages: "ab" + "c" is not "a" + "bc".
    text.push(0x1f);
    text.extend_from_slice(req.prompt.user.as_bytes());
    let mut prev = 0u64;
    text.chunks_exact(BLOCK_BYTES)
        .map(|block| {
            let mut h = DefaultHasher::new();
            (prev, block).hash(&mut h);
            prev = h.finish();
            prev
        })
        .collect()
}

/// Which replicas were sent which prefix blocks: a block → a mask of replicas (bit `i % 64`
/// for replica `i`), the oldest blocks forgotten beyond [`ROUTE_MEMORY`].
#[derive(Debug, Default)]
pub(crate) struct PrefixHolders {
    masks: HashMap<u64, u64>,
    order: VecDeque<u64>,
}

pub(crate) fn bit(i: usize) -> u64 {
    1 << (i % 64)
}

impl PrefixHolders {
    /// The replicas sent the longest prefix of `blocks` among those `eligible` (a mask), if
    /// that prefix is at least `min_blocks` long.
    pub(crate) fn deepest(&self, blocks: &[u64], eligible: u64, min_blocks: usize) -> u64 {
        blocks
            .iter()
            .enumerate()
            .rev()
            .take_while(|(i, _)| i + 1 >= min_blocks)
            .map(|(_, b)| self.masks.get(b).copied().unwrap_or(0) & eligible)
            .find(|m| *m != 0)
            .unwrap_or(0)
    }

    /// Remembers that replica `i` was sent `blocks`.
    pub(crate) fn record(&mut self, blocks: &[u64], i: usize) {
        for b in blocks {
            let mask = self.masks.entry(*b).or_insert_with(|| {
                self.order.push_back(*b);
                0
            });
            *mask |= bit(i);
        }
        while self.order.len() > ROUTE_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.masks.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::RenderedPrompt;

    fn req(system: Option<&str>, user: &str) -> LlmRequest {
        LlmRequest {
            confidence: false,
            function: "f".into(),
            prompt: RenderedPrompt {
                system: system.map(str::to_string),
                user: user.into(),
                cuts: Default::default(),
            },
            max_tokens: None,
            temperature: None,
            schema: None,
        }
    }

    #[test]
    fn prompts_share_exactly_the_blocks_of_their_common_opening() {
        let passage = "p".repeat(300);
        let a = prefix_blocks(&req(Some("sys"), &format!("{passage} question one?")));
        let b = prefix_blocks(&req(Some("sys"), &format!("{passage} another question?")));
        // 4 + 301 bytes in common: 4 full blocks of 64.
        let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        assert_eq!(common, (4 + 301) / BLOCK_BYTES);
        assert_eq!(a.len(), (4 + 300 + 14) / BLOCK_BYTES, "only full blocks");
        let other_system = prefix_blocks(&req(Some("sys2"), &format!("{passage} question one?")));
        assert_ne!(a[0], other_system[0]);
        let moved = prefix_blocks(&req(Some("sy"), &format!("s{passage} question one?")));
        assert_ne!(a[0], moved[0], "the separator keeps system and user apart");
        assert!(prefix_blocks(&req(None, "short")).is_empty());
    }
}
