//! The dispatcher's shared state, which every concern of a call (budget, sending, hedging,
//! retries, packing) works on; and the persistent cache's read of a slice's keys.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::Value;
use tokio::sync::Semaphore;

use super::dedup::Dedup;
use super::lists::ListCollectors;
use super::metrics::{FunctionMetrics, Metrics};
use crate::cache::{CacheMode, CachedResponse, Lookup, RequestKey, ResponseCache, SharedCache};
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
    /// Requests waiting for their model's governor or the global budget.
    pub(super) waiting: Waiting,
}

/// Requests waiting to be sent: how many, and a wake-up each time one leaves the wait.
#[derive(Debug, Default)]
pub(super) struct Waiting {
    count: std::sync::atomic::AtomicU64,
    left: tokio::sync::Notify,
}

/// One request waiting; it leaves the wait when dropped (sent, or cancelled).
#[derive(Debug)]
pub(super) struct WaitGuard<'a>(&'a Waiting);

impl Waiting {
    /// A request starts waiting.
    pub(super) fn enter(&self) -> WaitGuard<'_> {
        self.count.fetch_add(1, Ordering::Relaxed);
        WaitGuard(self)
    }

    pub(super) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Returns once at most `max` requests wait.
    pub(super) async fn until_at_most(&self, max: u64) {
        loop {
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            if self.count() <= max {
                return;
            }
            left.await;
        }
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::Relaxed);
        self.0.left.notify_waiters();
    }
}

impl Inner {
    /// Counts one prompt of `fm` per key and answers from the persistent cache what it can, in
    /// one read (then one request to the shared tier for the rest, on a worker; with `claim`,
    /// the keys it misses are claimed for this worker there): per key, a value, or `None`
    /// where the call must be made — [`Miss::Wait`] where another worker is making it now.
    pub(super) async fn lookup_cache(
        &self,
        fm: &FunctionMetrics,
        keys: &[RequestKey],
        claim: bool,
    ) -> Vec<Result<Arc<Value>, Miss>> {
        let unknown = Miss::Call { claimed: false };
        if !self.cache_mode.reads() || keys.is_empty() {
            return vec![Err(unknown); keys.len()];
        }
        let local = match self.cache.as_ref().map(|c| c.get_many(keys)) {
            Some(Ok(found)) => found,
            Some(Err(e)) => {
                tracing::warn!("{e}");
                vec![None; keys.len()]
            }
            None => vec![None; keys.len()],
        };
        let mut found: Vec<Result<CachedResponse, Miss>> =
            local.into_iter().map(|f| f.ok_or(unknown)).collect();
        if let Some(shared) = &self.shared {
            let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_err()).collect();
            let asked: Vec<RequestKey> = missing.iter().map(|&i| keys[i]).collect();
            for (i, got) in missing
                .into_iter()
                .zip(shared.get_many(&asked, claim).await)
            {
                found[i] = match got {
                    Lookup::Hit(resp) => {
                        if let Some(cache) = &self.cache {
                            cache.put(keys[i], &resp);
                        }
                        Ok(resp)
                    }
                    Lookup::Miss => Err(Miss::Call { claimed: claim }),
                    Lookup::Pending => Err(Miss::Wait),
                };
            }
        }
        let hits = found.iter().filter(|f| f.is_ok()).count() as u64;
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

    /// Another worker's answer to `key`, which it claimed (counted as a call shared with an
    /// identical one); `None` when that call failed or took too long: make it here.
    pub(super) async fn answer_of_other_worker(&self, key: RequestKey) -> Option<Arc<Value>> {
        let resp = self.shared.as_ref()?.wait(key).await?;
        if let Some(cache) = &self.cache {
            cache.put(key, &resp);
        }
        self.metrics.deduplicated.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(resp.value))
    }

    /// A claim on `key` in the shared tier, given up unless [`Claim::answered`] (a call that
    /// failed or was cancelled lets the waiting workers make it).
    pub(super) fn claim(&self, key: RequestKey, claimed: bool) -> Claim {
        Claim {
            shared: self.shared.clone().filter(|_| claimed),
            key,
            puts: self.cache_mode.writes(),
        }
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

/// Why the cache did not answer a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Miss {
    /// Make the call (`claimed`: this worker holds the key's claim in the shared tier).
    Call { claimed: bool },
    /// Another worker is making it: wait for its answer.
    Wait,
}

/// This worker's claim on a key in the shared tier (see [`Inner::claim`]).
pub(super) struct Claim {
    shared: Option<Arc<SharedCache>>,
    key: RequestKey,
    /// Whether answers are put in the tier (which ends the claim).
    puts: bool,
}

impl Claim {
    /// The call was answered (its answer, put in the tier, ended the claim).
    pub(super) fn answered(mut self) {
        if self.puts {
            self.shared = None;
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let (Some(shared), Ok(rt)) = (self.shared.take(), tokio::runtime::Handle::try_current())
        {
            let key = self.key;
            rt.spawn(async move { shared.release(&[key]).await });
        }
    }
}
