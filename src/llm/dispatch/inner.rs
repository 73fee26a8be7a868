//! The dispatcher's shared state, which every concern of a call (budget, sending, hedging,
//! retries, packing) works on; and the persistent cache's read of a slice's keys.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::Value;
use tokio::sync::Semaphore;

use super::dedup::Dedup;
use super::lists::ListCollectors;
use super::metrics::{FunctionMetrics, Metrics};
use crate::cache::{CacheMode, RequestKey, ResponseCache};
use crate::config::DispatcherConfig;

/// What the dispatcher's clones share.
#[derive(Debug)]
pub(super) struct Inner {
    pub(super) cfg: DispatcherConfig,
    pub(super) global: Arc<Semaphore>,
    pub(super) dedup: Dedup,
    pub(super) metrics: Arc<Metrics>,
    pub(super) cache: Option<Arc<ResponseCache>>,
    pub(super) cache_mode: CacheMode,
    pub(super) list_collectors: ListCollectors,
}

impl Inner {
    /// Counts one prompt of `fm` per key and answers from the persistent cache what it can, in
    /// one read: a value per key, or `None` where the call must be made.
    pub(super) fn lookup_cache(
        &self,
        fm: &FunctionMetrics,
        keys: &[RequestKey],
    ) -> Vec<Option<Arc<Value>>> {
        fm.prompts.fetch_add(keys.len() as u64, Ordering::Relaxed);
        let Some(cache) = self
            .cache
            .as_ref()
            .filter(|_| self.cache_mode.reads() && !keys.is_empty())
        else {
            return vec![None; keys.len()];
        };
        let found = match cache.get_many(keys) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!("{e}");
                return vec![None; keys.len()];
            }
        };
        let hits = found.iter().filter(|f| f.is_some()).count() as u64;
        let m = &self.metrics;
        m.cache_hits.fetch_add(hits, Ordering::Relaxed);
        m.cache_misses
            .fetch_add(keys.len() as u64 - hits, Ordering::Relaxed);
        fm.cache_hits.fetch_add(hits, Ordering::Relaxed);
        found
            .into_iter()
            .map(|f| f.map(|hit| Arc::new(hit.value)))
            .collect()
    }
}
