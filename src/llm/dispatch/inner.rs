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
    /// Prompts taken on and not yet answered.
    pub(super) waiting: Waiting,
    /// On a cluster, where the run's budgets are held (see [`super::pool`]).
    pub(super) pooled: std::sync::OnceLock<super::pool::Pooled>,
}

/// Prompts the dispatcher has taken on and not yet answered, and a wake-up each time one is
/// answered or goes on the wire: those not on the wire are the work a machine has waiting.
#[derive(Debug, Default)]
pub(super) struct Waiting {
    open: std::sync::atomic::AtomicU64,
    /// Prompts ever taken on.
    taken: std::sync::atomic::AtomicU64,
    /// `taken` when more input was last let in (by any of this dispatcher's readers).
    let_in_at: std::sync::atomic::AtomicU64,
    /// Prompts submitted to a batch queue: sent, as far as more input is concerned (a batch
    /// collects as many as it can).
    parked: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

/// Prompts of one call taken on: each counts until [`Open::done`] or until this is dropped
/// (the call cancelled).
#[derive(Debug)]
pub(super) struct Open<'a> {
    gauge: &'a Waiting,
    left: std::sync::atomic::AtomicU64,
}

impl Waiting {
    /// `n` prompts are taken on.
    pub(super) fn open(&self, n: usize) -> Open<'_> {
        self.open.fetch_add(n as u64, Ordering::Relaxed);
        self.taken.fetch_add(n as u64, Ordering::Relaxed);
        self.changed.notify_waiters();
        Open {
            gauge: self,
            left: std::sync::atomic::AtomicU64::new(n as u64),
        }
    }

    /// A prompt is submitted to a batch queue, until the guard is dropped.
    pub(super) fn park(&self) -> Parked<'_> {
        self.parked.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
        Parked(self)
    }

    /// A request went on the wire.
    pub(super) fn sent(&self) {
        self.changed.notify_waiters();
    }

    /// Returns once more input may be let in, and lets it in: at most 1 / `share` of the
    /// prompts on the wire (`on_wire`; at least one prompt) are taken on and not on the wire,
    /// and prompts were taken on since input was last let in — by any reader, so that readers
    /// woken together let in one chunk, not one each — or none was for [`QUIET`] with none
    /// open (what was read produced no prompt: filtered out).
    pub(super) async fn let_in(&self, share: u64, on_wire: &std::sync::atomic::AtomicU64) {
        let mut quiet_since: Option<tokio::time::Instant> = None;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let open = self.open.load(Ordering::Relaxed);
            let taken = self.taken.load(Ordering::Relaxed);
            let last = self.let_in_at.load(Ordering::Relaxed);
            let sent = on_wire.load(Ordering::Relaxed) + self.parked.load(Ordering::Relaxed);
            let waiting = open.saturating_sub(sent);
            if waiting <= (sent / share.max(1)).max(1) && taken > last {
                let won = self.let_in_at.compare_exchange(
                    last,
                    taken,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                if won.is_ok() {
                    return;
                }
                continue;
            }
            if open > 0 || taken > last {
                quiet_since = None;
                changed.await;
                continue;
            }
            let since = *quiet_since.get_or_insert_with(tokio::time::Instant::now);
            let left = QUIET.saturating_sub(since.elapsed());
            if left.is_zero() {
                return;
            }
            let _ = tokio::time::timeout(left, changed).await;
        }
    }
}

/// How long a dispatcher with nothing open waits for what was read last to reach it, before
/// it takes the reading as having produced no prompt.
pub(super) const QUIET: std::time::Duration = std::time::Duration::from_millis(50);

impl Open<'_> {
    /// `n` of its prompts are answered.
    pub(super) fn done(&self, n: usize) {
        let n = n as u64;
        let taken = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some(l.saturating_sub(n))
            })
            .unwrap_or(0)
            .min(n);
        self.gauge.open.fetch_sub(taken, Ordering::Relaxed);
        self.gauge.changed.notify_waiters();
    }
}

/// A prompt in a batch queue; it leaves when dropped (answered, or cancelled).
#[derive(Debug)]
pub(super) struct Parked<'a>(&'a Waiting);

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        let left = self.left.swap(0, Ordering::Relaxed);
        self.gauge.open.fetch_sub(left, Ordering::Relaxed);
        self.gauge.changed.notify_waiters();
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
            let answers = match claim {
                true => shared.claim_many(&asked).await,
                false => shared.get_many(&asked, false).await,
            };
            for (i, got) in missing.into_iter().zip(answers) {
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
            // Read under the lock: a report that read its counters before another one's could
            // otherwise set `last` back, and the difference would be reported twice.
            let mut last = self.reported.lock().unwrap_or_else(|p| p.into_inner());
            let now = self.metrics.counters();
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
    /// coordinator before its answer). The sending is a task of its own: a statement dropped
    /// meanwhile (an attempt run again around a dead worker, a LIMIT) must not leave an answer
    /// in this worker's cache that the coordinator's lacks, since a later run may ask another
    /// worker for it.
    pub(super) async fn store(&self, answers: Vec<(RequestKey, CachedResponse)>) {
        if !self.cache_mode.writes() || answers.is_empty() {
            return;
        }
        if let Some(cache) = &self.cache {
            for (key, resp) in &answers {
                cache.put(*key, resp);
            }
        }
        if let Some(shared) = self.shared.clone() {
            let put = tokio::spawn(async move { shared.put_many(&answers).await });
            let _ = put.await;
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

#[cfg(test)]
mod waiting_tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use super::*;

    /// Whether `let_in` returns within `within` (on the paused clock).
    async fn lets_in(w: &Waiting, on_wire: &AtomicU64, within: Duration) -> bool {
        tokio::time::timeout(within, w.let_in(8, on_wire))
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn input_is_let_in_once_per_intake_while_little_waits() {
        let w = Waiting::default();
        let on_wire = AtomicU64::new(0);
        // 16 prompts taken on, all on the wire: room, and something was taken since.
        let open = w.open(16);
        on_wire.store(16, Ordering::Relaxed);
        assert!(lets_in(&w, &on_wire, Duration::ZERO).await);
        // A second reader woken at the same time waits: nothing was taken since.
        assert!(!lets_in(&w, &on_wire, Duration::from_secs(1)).await);
        // 8 more taken on, 6 of them waiting (16 on the wire allow 2): no room.
        let more = w.open(8);
        on_wire.store(18, Ordering::Relaxed);
        assert!(!lets_in(&w, &on_wire, Duration::from_secs(1)).await);
        // 6 answers: 6 of the waiting go on the wire (10 + 6), 2 still wait, and 16 on the
        // wire allow 2: input is let in.
        open.done(6);
        on_wire.store(16, Ordering::Relaxed);
        assert!(lets_in(&w, &on_wire, Duration::ZERO).await);
        drop((open, more));
    }

    #[tokio::test(start_paused = true)]
    async fn input_that_makes_no_prompt_lets_the_next_in_after_a_quiet_while() {
        let w = Waiting::default();
        let on_wire = AtomicU64::new(0);
        let once = w.open(1);
        once.done(1);
        assert!(lets_in(&w, &on_wire, Duration::ZERO).await);
        // What was let in produced no prompt (filtered out): nothing open, nothing taken.
        let started = tokio::time::Instant::now();
        assert!(lets_in(&w, &on_wire, Duration::from_secs(1)).await);
        assert_eq!(started.elapsed(), QUIET);
        // A call cancelled with prompts open leaves none counted (its guard gives them back).
        let cancelled = w.open(5);
        drop(cancelled);
        assert_eq!(w.open.load(Ordering::Relaxed), 0);
    }
}
