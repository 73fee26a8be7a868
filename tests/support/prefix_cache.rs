//! The test server's optional prefix cache, like vLLM's automatic prefix caching: a prompt's
//! tokens are cut into blocks, each named by a hash of its tokens and of the block before it (so
//! a block stands for the whole prefix up to its end); a request reuses the leading blocks the
//! cache holds and computes the rest. A request's blocks become reusable only once it has been
//! processed (a request arriving while another computes the same prefix computes it too), and
//! the least recently used blocks are evicted beyond the capacity.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

/// Settings of the prefix cache (`MockConfig::prefix_cache`).
#[derive(Debug, Clone)]
pub struct PrefixCacheConfig {
    /// Tokens per block (vLLM's default: 16). Only full blocks are cached.
    pub block_tokens: usize,
    /// Blocks the cache holds; beyond it the least recently used are evicted.
    pub capacity_blocks: usize,
    /// A compute-bound prefill: the prompt tokens a request does not find in the cache are
    /// computed at this rate, one request at a time in arrival order (the server's one
    /// accelerator); its blocks are held once computed, and its answer follows after the
    /// server's latency. None: prefill takes no time, blocks are held once answered.
    pub prefill_tokens_per_s: Option<f64>,
}

impl Default for PrefixCacheConfig {
    fn default() -> Self {
        PrefixCacheConfig {
            block_tokens: 16,
            capacity_blocks: 4096,
            prefill_tokens_per_s: None,
        }
    }
}

/// The blocks held: each block's hash and when it was last used.
#[derive(Debug, Default)]
pub(super) struct PrefixCache {
    held: Mutex<Held>,
    /// With a compute-bound prefill: when the accelerator is free again.
    busy_until: Mutex<Option<std::time::Instant>>,
}

#[derive(Debug, Default)]
struct Held {
    tick: u64,
    /// Block hash → its last use.
    last_use: HashMap<u64, u64>,
    /// Last use → block hash (the oldest first, for eviction).
    by_use: BTreeMap<u64, u64>,
}

impl Held {
    fn touch(&mut self, block: u64) {
        self.tick += 1;
        if let Some(old) = self.last_use.insert(block, self.tick) {
            self.by_use.remove(&old);
        }
        self.by_use.insert(self.tick, block);
    }
}

/// The hashes of the full blocks of `tokens`, each chained to the one before it.
pub(super) fn block_hashes(tokens: &[u64], block_tokens: usize) -> Vec<u64> {
    let mut prev = 0u64;
    tokens
        .chunks_exact(block_tokens.max(1))
        .map(|block| {
            let mut h = DefaultHasher::new();
            (prev, block).hash(&mut h);
            prev = h.finish();
            prev
        })
        .collect()
}

impl PrefixCache {
    /// How many leading `blocks` the cache holds; those are used now (they move to the back of
    /// the eviction order).
    pub(super) fn lookup(&self, blocks: &[u64]) -> usize {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let hits = blocks
            .iter()
            .take_while(|b| held.last_use.contains_key(b))
            .count();
        for b in &blocks[..hits] {
            held.touch(*b);
        }
        hits
    }

    /// Holds the blocks of a processed request, evicting the least recently used beyond
    /// `capacity` blocks.
    pub(super) fn insert(&self, blocks: &[u64], capacity: usize) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for b in blocks {
            held.touch(*b);
        }
        while held.last_use.len() > capacity {
            let Some((_, oldest)) = held.by_use.pop_first() else {
                break;
            };
            held.last_use.remove(&oldest);
        }
    }

    /// When a request arriving now with `computed` tokens to compute at `rate` tokens/s has
    /// them computed: after every request that arrived before it (one accelerator, in order).
    pub(super) fn schedule_prefill(&self, computed: u64, rate: f64) -> std::time::Instant {
        let mut busy = self.busy_until.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let start = busy.map_or(now, |b| b.max(now));
        let done = start + std::time::Duration::from_secs_f64(computed as f64 / rate.max(1.0));
        *busy = Some(done);
        done
    }

    /// Blocks held now.
    pub(super) fn len(&self) -> usize {
        self.held.lock().map(|h| h.last_use.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_leading_blocks_and_evicts_the_least_recently_used() {
        let a: Vec<u64> = (0..40).collect();
        let mut b = a.clone();
        b[20] = 999;
        let (ha, hb) = (block_hashes(&a, 16), block_hashes(&b, 16));
        assert_eq!(ha.len(), 2, "only full blocks");
        assert_eq!((ha[0] == hb[0], ha[1] == hb[1]), (true, false));
        let c = PrefixCache::default();
        assert_eq!(c.lookup(&ha), 0);
        c.insert(&ha, 3);
        assert_eq!(c.lookup(&hb), 1);
        c.insert(&hb, 3);
        assert_eq!(c.len(), 3);
        // ha[1] is the least recently used: a fourth block evicts it.
        c.insert(&[42], 3);
        assert_eq!((c.len(), c.lookup(&ha), c.lookup(&hb)), (3, 1, 2));
    }
}
