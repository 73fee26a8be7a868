//! The dispatcher's shared state, which every concern of a call (budget, sending, hedging,
//! retries, packing) works on; and the persistent cache's read of a slice's keys.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::Value;
use tokio::sync::Semaphore;

use super::dedup::Dedup;
use super::lists::ListCollectors;
use super::metrics::{FunctionMetrics, Metrics};
use crate::cache::{CacheMode, CachedResponse, RequestKey, ResponseCache, SharedCache};
use crate::config::DispatcherConfig;

/// What the dispatcher's clones share.
#[derive(Debug)]
pub(super) struct Inner {
    pub(super) cfg: DispatcherConfig,
    pub(super) global: Arc<Semaphore>,
    pub(super) dedup: Dedup,
    pub(super) metrics: Arc<Metrics>,
    pub(super) cache: Option<Arc<ResponseCache>>,
    /// The coordinator's cache, on a cluster's worker: asked for what `cache` lacks, and sent
    /// every answer.
    pub(super) shared: Option<Arc<SharedCache>>,
    pub(super) cache_mode: CacheMode,
    pub(super) list_collectors: ListCollectors,
    /// The counters last reported to the coordinator (on a cluster's worker).
    pub(super) reported: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Inner {
    /// Counts one prompt of `fm` per key and answers from the persistent cache what it can, in
    /// one read (then one request to the shared tier for the rest, on a worker): a value per
    /// key, or `None` where the call must be made.
    pub(super) async fn lookup_cache(
        &self,
        fm: &FunctionMetrics,
        keys: &[RequestKey],
    ) -> Vec<Option<Arc<Value>>> {
        fm.prompts.fetch_add(keys.len() as u64, Ordering::Relaxed);
        if !self.cache_mode.reads() || keys.is_empty() {
            return vec![None; keys.len()];
        }
        let mut found = match self.cache.as_ref().map(|c| c.get_many(keys)) {
            Some(Ok(found)) => found,
            Some(Err(e)) => {
                tracing::warn!("{e}");
                vec![None; keys.len()]
            }
            None => vec![None; keys.len()],
        };
        if let Some(shared) = &self.shared {
            let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
            let asked: Vec<RequestKey> = missing.iter().map(|&i| keys[i]).collect();
            for (i, got) in missing.into_iter().zip(shared.get_many(&asked).await) {
                if let (Some(resp), Some(cache)) = (&got, &self.cache) {
                    cache.put(keys[i], resp);
                }
                found[i] = got;
            }
        }
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

    /// On a cluster's worker, reports the change of the run's counters since the last report
    /// to the coordinator (after each batch of calls, so that the last batch's counts reach it
    /// before its rows do).
    pub(super) async fn report(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let delta: std::collections::BTreeMap<String, u64> = {
            let now = self.metrics.counters();
            let mut last = self.reported.lock().unwrap_or_else(|p| p.into_inner());
            let delta = now
                .iter()
                .filter_map(|(k, &v)| {
                    let d = v.saturating_sub(last.get(k).copied().unwrap_or(0));
                    (d > 0).then(|| (k.clone(), d))
                })
                .collect();
            *last = now;
            delta
        };
        if !delta.is_empty() {
            shared.report(&delta).await;
        }
    }

    /// Stores answers in the persistent cache and, on a worker, sends them to the shared tier
    /// (returns once the coordinator has queued them for its cache, so a row never reaches the
    /// coordinator before its answer).
    pub(super) async fn store(&self, answers: Vec<(RequestKey, CachedResponse)>) {
        if !self.cache_mode.writes() || answers.is_empty() {
            return;
        }
        if let Some(cache) = &self.cache {
            for (key, resp) in &answers {
                cache.put(*key, resp);
            }
        }
        if let Some(shared) = &self.shared {
            shared.put_many(&answers).await;
        }
    }
}
