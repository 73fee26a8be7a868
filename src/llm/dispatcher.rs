//! The one shared scheduler for every LLM call of a run.
//!
//! Every function, partition and stage submits here. The dispatcher:
//! - keeps one global concurrency budget (and a per-model one) — a permit is held only while a
//!   request is on the wire, never during backoff;
//! - retries retryable failures with exponential backoff and full jitter, honouring Retry-After;
//! - validates each response against the function's output schema, retrying invalid ones;
//! - answers from the persistent [`ResponseCache`] before queuing a request, and stores every
//!   validated response there the moment it arrives;
//! - sends identical requests (same [`request_key`]) once per run and shares the result;
//! - counts what happened ([`Metrics`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::governor::{Governor, Outcome};
use super::{
    ErrorKind, LlmError, LlmRequest, LlmResponse, Provider, RowError, Usage, parse_response,
};
use crate::cache::{CacheMode, CachedResponse, RequestKey, ResponseCache, request_key};
use crate::config::{DispatcherConfig, Prices};

/// The result of one row's call: the validated value or the final error.
pub type CallResult = Result<Arc<Value>, Arc<RowError>>;

type SharedCall = Shared<BoxFuture<'static, CallResult>>;

/// Entries of the in-run dedup map; when it is full, completed calls are forgotten (a later
/// identical call is answered by the persistent cache, or sent again without one), so memory
/// stays flat however long the run.
const MEMO_CAPACITY: usize = 20_000;

/// A model as the dispatcher sees it: a provider and the governor that paces it.
#[derive(Debug, Clone)]
pub struct ModelHandle {
    /// The endpoint.
    pub provider: Arc<dyn Provider>,
    /// Adaptive concurrency, RPM/TPM buckets and pauses for this model.
    pub governor: Arc<Governor>,
    /// What its tokens cost (for `--budget-usd`), if known.
    pub prices: Option<Prices>,
}

impl ModelHandle {
    /// Nano-dollars (1e-9 USD) that `usage` costs at this model's prices (0 without prices).
    fn nano_usd(&self, usage: Usage) -> u64 {
        self.prices.map_or(0, |p| {
            (p.cost(usage.prompt_tokens, usage.completion_tokens) * 1e9).ceil() as u64
        })
    }
}

/// Latency histogram with logarithmic buckets (5% wide, from 50 µs), lock-free to record.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
}

const HIST_BUCKETS: usize = 420;
const HIST_FIRST_US: f64 = 50.0;
const HIST_GROWTH: f64 = 1.05;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..HIST_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn record(&self, d: Duration) {
        let us = d.as_secs_f64() * 1e6;
        let i = if us <= HIST_FIRST_US {
            0
        } else {
            ((us / HIST_FIRST_US).ln() / HIST_GROWTH.ln()).ceil() as usize
        };
        self.buckets[i.min(HIST_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    /// The `q` quantile (0..=1) in milliseconds: the upper edge of its bucket (within 5%).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(HIST_FIRST_US * HIST_GROWTH.powi(i as i32) / 1000.0);
            }
        }
        None
    }
}

/// Counters of one LLM function.
#[derive(Debug, Default)]
pub struct FunctionMetrics {
    /// Rows that asked for a value (calls, shared calls and cache hits).
    pub prompts: AtomicU64,
    /// Requests sent (attempts).
    pub requests: AtomicU64,
    /// Calls answered from the persistent cache.
    pub cache_hits: AtomicU64,
    /// Calls that ended with a value.
    pub succeeded: AtomicU64,
    /// Calls that ended with an error.
    pub failed: AtomicU64,
    /// Prompt tokens reported.
    pub tokens_in: AtomicU64,
    /// Completion tokens reported.
    pub tokens_out: AtomicU64,
    /// Highest number of this function's requests on the wire at once.
    pub max_in_flight: AtomicU64,
    /// Rows handed to the function by the plan so far (for progress).
    pub rows_queued: AtomicU64,
    /// Rows whose value or error is known (cached, shared, failed before a call included).
    pub rows_finished: AtomicU64,
    /// Plan nodes calling the function whose input is not yet exhausted: while this is 0 the
    /// number of rows queued is final (for the ETA).
    pub open_inputs: AtomicU64,
    in_flight: AtomicU64,
    /// Latency of each request on the wire.
    pub latency: LatencyHistogram,
    retries: Mutex<BTreeMap<ErrorKind, u64>>,
    errors: Mutex<BTreeMap<ErrorKind, u64>>,
}

impl FunctionMetrics {
    /// Retries of every cause.
    pub fn retries_total(&self) -> u64 {
        self.retries.lock().map(|m| m.values().sum()).unwrap_or(0)
    }

    fn to_json(&self) -> Value {
        let q = |x| {
            self.latency
                .quantile_ms(x)
                .map(|v| (v * 100.0).round() / 100.0)
        };
        serde_json::json!({
            "prompts": self.prompts.load(Ordering::Relaxed),
            "requests": self.requests.load(Ordering::Relaxed),
            "cache_hits": self.cache_hits.load(Ordering::Relaxed),
            "succeeded": self.succeeded.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
            "tokens_in": self.tokens_in.load(Ordering::Relaxed),
            "tokens_out": self.tokens_out.load(Ordering::Relaxed),
            "max_in_flight": self.max_in_flight.load(Ordering::Relaxed),
            "latency_ms": {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99)},
            "retries": Metrics::names(&self.retries),
            "errors": Metrics::names(&self.errors),
        })
    }
}

/// Counters for one run, shared by all calls.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Distinct calls started (after dedup).
    pub calls: AtomicU64,
    /// Calls answered by an identical call of the same run.
    pub deduplicated: AtomicU64,
    /// HTTP requests sent (attempts).
    pub requests: AtomicU64,
    /// Calls that ended with a value.
    pub succeeded: AtomicU64,
    /// Calls that ended with an error.
    pub failed: AtomicU64,
    /// Prompt tokens reported by providers.
    pub tokens_in: AtomicU64,
    /// Completion tokens reported by providers.
    pub tokens_out: AtomicU64,
    /// Highest number of requests on the wire at once.
    pub max_in_flight: AtomicU64,
    /// Estimated tokens of the requests on the wire (counted against the budget).
    reserved_tokens: AtomicU64,
    /// Cost of the responses received, in nano-dollars (at the models' prices).
    pub spent_nano_usd: AtomicU64,
    /// Estimated cost of the requests on the wire, in nano-dollars.
    reserved_nano_usd: AtomicU64,
    /// Set when a request was refused because the token budget would be exceeded.
    pub budget_exhausted: std::sync::atomic::AtomicBool,
    /// Calls answered from the persistent cache.
    pub cache_hits: AtomicU64,
    /// Calls looked up in the persistent cache and not found.
    pub cache_misses: AtomicU64,
    in_flight: AtomicU64,
    retries: Mutex<BTreeMap<ErrorKind, u64>>,
    errors: Mutex<BTreeMap<ErrorKind, u64>>,
    functions: Mutex<BTreeMap<String, Arc<FunctionMetrics>>>,
}

/// A point-in-time copy of [`Metrics`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// Distinct calls started.
    pub calls: u64,
    /// Calls answered by an identical call of the same run.
    pub deduplicated: u64,
    /// HTTP requests sent.
    pub requests: u64,
    /// Calls that ended with a value.
    pub succeeded: u64,
    /// Calls that ended with an error.
    pub failed: u64,
    /// Prompt tokens.
    pub tokens_in: u64,
    /// Completion tokens.
    pub tokens_out: u64,
    /// Highest number of requests on the wire at once.
    pub max_in_flight: u64,
    /// Calls answered from the persistent cache.
    pub cache_hits: u64,
    /// Calls looked up in the persistent cache and not found.
    pub cache_misses: u64,
    /// Retries by the failure that caused them.
    pub retries: BTreeMap<String, u64>,
    /// Final errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Per function: prompts, requests, cache hits, retries and errors by kind, tokens, latency
    /// p50/p95/p99 (ms), in-flight high-water mark.
    pub functions: BTreeMap<String, Value>,
}

impl MetricsSnapshot {
    /// The snapshot as JSON.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "calls": self.calls, "deduplicated": self.deduplicated, "requests": self.requests,
            "succeeded": self.succeeded, "failed": self.failed, "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out, "max_in_flight": self.max_in_flight,
            "cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
            "retries": self.retries, "errors": self.errors, "functions": self.functions,
        })
    }
}

impl Metrics {
    fn names(m: &Mutex<BTreeMap<ErrorKind, u64>>) -> BTreeMap<String, u64> {
        m.lock()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.as_str().to_string(), *v))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every function's counters, in name order.
    pub fn functions(&self) -> Vec<(String, Arc<FunctionMetrics>)> {
        self.functions
            .lock()
            .map(|f| f.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// The counters of `function`, created on first use.
    pub fn function(&self, function: &str) -> Arc<FunctionMetrics> {
        let mut f = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = f.get(function) {
            return m.clone();
        }
        let m = Arc::new(FunctionMetrics::default());
        f.insert(function.to_string(), m.clone());
        m
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let names = Self::names;
        let functions = self
            .functions
            .lock()
            .map(|f| f.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            .unwrap_or_default();
        MetricsSnapshot {
            functions,
            calls: self.calls.load(Ordering::Relaxed),
            deduplicated: self.deduplicated.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            tokens_in: self.tokens_in.load(Ordering::Relaxed),
            tokens_out: self.tokens_out.load(Ordering::Relaxed),
            max_in_flight: self.max_in_flight.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.cache_misses.load(Ordering::Relaxed),
            retries: names(&self.retries),
            errors: names(&self.errors),
        }
    }

    fn bump(map: &Mutex<BTreeMap<ErrorKind, u64>>, kind: ErrorKind) {
        if let Ok(mut m) = map.lock() {
            *m.entry(kind).or_default() += 1;
        }
    }
}

/// The shared scheduler. Cheap to clone (all state is behind `Arc`s).
#[derive(Debug, Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: DispatcherConfig,
    global: Arc<Semaphore>,
    memo: Mutex<HashMap<RequestKey, SharedCall>>,
    metrics: Arc<Metrics>,
    cache: Option<Arc<ResponseCache>>,
    cache_mode: CacheMode,
    batchers: Mutex<HashMap<BatchKey, mpsc::UnboundedSender<Pending>>>,
}

/// Prompts batched together share a model, a function and a completion limit.
type BatchKey = (usize, String, Option<u32>);

/// A prompt waiting for a place in a list-prompt request.
struct Pending {
    req: LlmRequest,
    done: oneshot::Sender<Result<LlmResponse, LlmError>>,
}

/// Forms list-prompt requests for one model, function and completion limit: a batch is taken
/// from the queue only once the model's governor and the global budget admit a request, so under
/// load every request leaves full and no prompt waits for a batch to fill.
async fn collect_batches(
    model: ModelHandle,
    global: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    fm: Arc<FunctionMetrics>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    let max = model.provider.max_batch().max(1);
    while let Some(first) = rx.recv().await {
        let estimate = first.req.estimated_tokens() * max as u64;
        let admission = model.governor.admit(estimate).await;
        let Ok(permit) = global.clone().acquire_owned().await else {
            model.governor.release(admission, Outcome::Failed);
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let (model, metrics, fm) = (model.clone(), metrics.clone(), fm.clone());
        tokio::spawn(async move {
            let (reqs, dones): (Vec<LlmRequest>, Vec<_>) =
                batch.into_iter().map(|p| (p.req, p.done)).unzip();
            let result = on_the_wire(&metrics, &fm, || model.provider.complete_batch(&reqs)).await;
            drop(permit);
            fm.latency.record(admission.started().elapsed());
            let outcome = match &result {
                Ok(_) => Outcome::Done { tokens: None },
                Err(e) if e.kind == ErrorKind::RateLimited => Outcome::RateLimited {
                    retry_after: e.retry_after,
                },
                Err(_) => Outcome::Failed,
            };
            model.governor.release(admission, outcome);
            match result {
                Ok(results) if results.len() == dones.len() => {
                    for (done, r) in dones.into_iter().zip(results) {
                        let _ = done.send(r);
                    }
                }
                Ok(results) => {
                    let e = LlmError::new(
                        ErrorKind::MalformedResponse,
                        format!("{} answers for {} prompts", results.len(), dones.len()),
                    );
                    for done in dones {
                        let _ = done.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for done in dones {
                        let _ = done.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

/// Tokens and dollars held against the budgets while a request is on the wire.
struct BudgetReservation<'a> {
    metrics: &'a Metrics,
    tokens: u64,
    nano_usd: u64,
}

impl Drop for BudgetReservation<'_> {
    fn drop(&mut self) {
        self.metrics
            .reserved_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
        self.metrics
            .reserved_nano_usd
            .fetch_sub(self.nano_usd, Ordering::Relaxed);
    }
}

/// Counts one request on the wire (globally and for its function) around `send`.
async fn on_the_wire<T, F: std::future::Future<Output = T>>(
    m: &Metrics,
    fm: &FunctionMetrics,
    send: impl FnOnce() -> F,
) -> T {
    m.requests.fetch_add(1, Ordering::Relaxed);
    fm.requests.fetch_add(1, Ordering::Relaxed);
    let now = m.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    m.max_in_flight.fetch_max(now, Ordering::Relaxed);
    let now = fm.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    fm.max_in_flight.fetch_max(now, Ordering::Relaxed);
    let out = send().await;
    m.in_flight.fetch_sub(1, Ordering::Relaxed);
    fm.in_flight.fetch_sub(1, Ordering::Relaxed);
    out
}

impl Dispatcher {
    /// A dispatcher with the given budget and retry policy.
    pub fn new(cfg: DispatcherConfig) -> Self {
        Self::with_cache(cfg, None, CacheMode::Off)
    }

    /// A dispatcher that answers from and stores into `cache` as `mode` says.
    pub fn with_cache(
        cfg: DispatcherConfig,
        cache: Option<Arc<ResponseCache>>,
        cache_mode: CacheMode,
    ) -> Self {
        let cache = cache.filter(|_| cache_mode != CacheMode::Off);
        Dispatcher {
            inner: Arc::new(Inner {
                global: Arc::new(Semaphore::new(cfg.concurrency)),
                cfg,
                memo: Mutex::new(HashMap::new()),
                metrics: Arc::new(Metrics::default()),
                cache,
                cache_mode,
                batchers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The persistent cache in use, if any.
    pub fn cache(&self) -> Option<&Arc<ResponseCache>> {
        self.inner.cache.as_ref()
    }

    /// The run's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The settings in force.
    pub fn config(&self) -> &DispatcherConfig {
        &self.inner.cfg
    }

    /// Makes one row's call: the validated value, or the error after all attempts.
    pub async fn call(&self, model: &ModelHandle, req: LlmRequest) -> CallResult {
        let key = request_key(&model.provider.endpoint(), &req);
        let fm = self.inner.metrics.function(&req.function);
        if let Some(Some(hit)) = self.from_cache(&fm, &[key]).pop() {
            return Ok(hit);
        }
        self.call_uncached(model, req, key, fm).await
    }

    /// Counts one prompt of `fm` per key and answers from the persistent cache what it can, in
    /// one read: a value per key, or `None` where the call must be made
    /// ([`Dispatcher::call_uncached`]).
    pub fn from_cache(&self, fm: &FunctionMetrics, keys: &[RequestKey]) -> Vec<Option<Arc<Value>>> {
        fm.prompts.fetch_add(keys.len() as u64, Ordering::Relaxed);
        let Some(cache) = self
            .inner
            .cache
            .as_ref()
            .filter(|_| self.inner.cache_mode.reads() && !keys.is_empty())
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
        let m = &self.inner.metrics;
        m.cache_hits.fetch_add(hits, Ordering::Relaxed);
        m.cache_misses
            .fetch_add(keys.len() as u64 - hits, Ordering::Relaxed);
        fm.cache_hits.fetch_add(hits, Ordering::Relaxed);
        found
            .into_iter()
            .map(|f| f.map(|hit| Arc::new(hit.value)))
            .collect()
    }

    /// Makes a call that [`Dispatcher::from_cache`] did not answer: shared with an identical
    /// call already running, or sent (with retries) and stored.
    pub async fn call_uncached(
        &self,
        model: &ModelHandle,
        req: LlmRequest,
        key: RequestKey,
        fm: Arc<FunctionMetrics>,
    ) -> CallResult {
        let fut = {
            let mut memo = self
                .inner
                .memo
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match memo.get(&key) {
                Some(f) => {
                    self.inner
                        .metrics
                        .deduplicated
                        .fetch_add(1, Ordering::Relaxed);
                    f.clone()
                }
                None => {
                    let inner = self.inner.clone();
                    let model = model.clone();
                    let f = async move { inner.run(&model, req, key, &fm).await }
                        .boxed()
                        .shared();
                    if memo.len() >= MEMO_CAPACITY {
                        memo.retain(|_, call| call.peek().is_none());
                    }
                    if memo.len() < MEMO_CAPACITY {
                        memo.insert(key, f.clone());
                    }
                    f
                }
            }
        };
        fut.await
    }
}

impl Inner {
    /// One request for one prompt: governor, global budget, provider.
    async fn send_one(
        &self,
        model: &ModelHandle,
        req: &LlmRequest,
        fm: &FunctionMetrics,
    ) -> Result<LlmResponse, LlmError> {
        let estimate = req.estimated_usage();
        let _reservation = self.reserve_budget(model, estimate)?;
        let estimate = estimate.prompt_tokens + estimate.completion_tokens;
        // The model's governor first (pauses, buckets, adaptive limit), then the global budget,
        // so that a paused model never holds permits other models could use.
        let admission = model.governor.admit(estimate).await;
        let Ok(_global) = self.global.acquire().await else {
            model.governor.release(admission, Outcome::Failed);
            return Err(LlmError::new(ErrorKind::Connection, "dispatcher shut down"));
        };
        let result = on_the_wire(&self.metrics, fm, || model.provider.complete(req)).await;
        fm.latency.record(admission.started().elapsed());
        let outcome = match &result {
            Ok(r) => Outcome::Done {
                tokens: r.usage.map(|u| u.prompt_tokens + u.completion_tokens),
            },
            Err(e) if e.kind == ErrorKind::RateLimited => Outcome::RateLimited {
                retry_after: e.retry_after,
            },
            Err(_) => Outcome::Failed,
        };
        model.governor.release(admission, outcome);
        result
    }

    /// Counts a request's estimated usage (tokens and cost) against the run's budgets while it
    /// is on the wire, or refuses it when a budget would be exceeded.
    fn reserve_budget(
        &self,
        model: &ModelHandle,
        estimate: Usage,
    ) -> Result<Option<BudgetReservation<'_>>, LlmError> {
        if self.cfg.budget_tokens.is_none() && self.cfg.budget_usd.is_none() {
            return Ok(None);
        }
        let m = &self.metrics;
        let tokens = estimate.prompt_tokens + estimate.completion_tokens;
        let nano_usd = model.nano_usd(estimate);
        let used = m.tokens_in.load(Ordering::Relaxed) + m.tokens_out.load(Ordering::Relaxed);
        let reserved = m.reserved_tokens.fetch_add(tokens, Ordering::Relaxed) + tokens;
        let spent = m.spent_nano_usd.load(Ordering::Relaxed);
        let reserved_usd = m.reserved_nano_usd.fetch_add(nano_usd, Ordering::Relaxed) + nano_usd;
        let reservation = BudgetReservation {
            metrics: m,
            tokens,
            nano_usd,
        };
        let kept = if self.cache.is_some() && self.cache_mode.writes() {
            "every response received is in the cache: re-run with a larger"
        } else {
            "the cache is off, so a re-run starts over: re-run with a larger"
        };
        let refuse = |message: String| {
            m.budget_exhausted.store(true, Ordering::Relaxed);
            Err(LlmError::new(ErrorKind::Budget, message))
        };
        if let Some(budget) = self.cfg.budget_tokens
            && used + reserved > budget
        {
            return refuse(format!(
                "token budget of {budget} reached ({used} tokens used, {} held by requests in \
                 flight); {kept} --budget-tokens (or none)",
                reserved - tokens
            ));
        }
        if let Some(budget) = self.cfg.budget_usd
            && (spent + reserved_usd) as f64 > budget * 1e9
        {
            return refuse(format!(
                "cost budget of ${budget} reached (${:.4} spent, ${:.4} held by requests in \
                 flight); {kept} --budget-usd (or none)",
                spent as f64 / 1e9,
                (reserved_usd - nano_usd) as f64 / 1e9
            ));
        }
        Ok(Some(reservation))
    }

    /// Queues the prompt for a list-prompt request of its model, function and limit.
    async fn send_batched(
        &self,
        model: &ModelHandle,
        req: &LlmRequest,
        fm: &Arc<FunctionMetrics>,
    ) -> Result<LlmResponse, LlmError> {
        let key: BatchKey = (
            Arc::as_ptr(&model.governor) as usize,
            req.function.clone(),
            req.max_tokens,
        );
        let tx = {
            let mut b = self.batchers.lock().unwrap_or_else(|p| p.into_inner());
            b.entry(key)
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(collect_batches(
                        model.clone(),
                        self.global.clone(),
                        self.metrics.clone(),
                        fm.clone(),
                        rx,
                    ));
                    tx
                })
                .clone()
        };
        let _reservation = self.reserve_budget(model, req.estimated_usage())?;
        let (done, answer) = oneshot::channel();
        let closed = || LlmError::new(ErrorKind::Connection, "dispatcher shut down");
        tx.send(Pending {
            req: req.clone(),
            done,
        })
        .map_err(|_| closed())?;
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.cfg.backoff_base.as_secs_f64();
        let cap = self.cfg.backoff_max.as_secs_f64();
        let exp = (base * 2f64.powi(attempt.saturating_sub(1).min(30) as i32)).min(cap);
        // Full jitter: uniform in [exp/2, exp] keeps a floor so retries do not stampede.
        Duration::from_secs_f64(exp * (0.5 + fastrand::f64() * 0.5))
    }

    async fn attempt(
        &self,
        model: &ModelHandle,
        req: &LlmRequest,
        fm: &Arc<FunctionMetrics>,
    ) -> Result<CachedResponse, LlmError> {
        let result = if model.provider.max_batch() > 1 {
            self.send_batched(model, req, fm).await
        } else {
            self.send_one(model, req, fm).await
        };
        let m = &self.metrics;
        let resp = result?;
        if let Some(u) = resp.usage {
            m.spent_nano_usd
                .fetch_add(model.nano_usd(u), Ordering::Relaxed);
            m.tokens_in.fetch_add(u.prompt_tokens, Ordering::Relaxed);
            m.tokens_out
                .fetch_add(u.completion_tokens, Ordering::Relaxed);
            fm.tokens_in.fetch_add(u.prompt_tokens, Ordering::Relaxed);
            fm.tokens_out
                .fetch_add(u.completion_tokens, Ordering::Relaxed);
        }
        let value = parse_response(req.schema.as_deref(), &resp).map_err(|mut e| {
            e.http_status = Some(200);
            e
        })?;
        Ok(CachedResponse {
            value,
            usage: resp.usage,
            finish_reason: resp.finish_reason,
        })
    }

    async fn run(
        &self,
        model: &ModelHandle,
        mut req: LlmRequest,
        key: RequestKey,
        fm: &Arc<FunctionMetrics>,
    ) -> CallResult {
        let m = &self.metrics;
        m.calls.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut attempt = 0;
        let mut raised_max_tokens = false;
        loop {
            attempt += 1;
            match self.attempt(model, &req, fm).await {
                Ok(resp) => {
                    m.succeeded.fetch_add(1, Ordering::Relaxed);
                    fm.succeeded.fetch_add(1, Ordering::Relaxed);
                    if let Some(cache) = &self.cache
                        && self.cache_mode.writes()
                    {
                        cache.put(key, &resp);
                    }
                    return Ok(Arc::new(resp.value));
                }
                Err(mut e) => {
                    let delay = match e.retry_after {
                        Some(d) => d.min(self.cfg.backoff_max),
                        None => self.backoff(attempt),
                    };
                    // The row's total deadline: no retry that would start after it.
                    let past_deadline = started.elapsed() + delay > self.cfg.row_deadline;
                    if past_deadline && e.kind.is_retryable() && attempt < self.cfg.max_attempts {
                        e.message = format!(
                            "{} (row deadline of {:?} reached; deadline_ms in [dispatcher])",
                            e.message, self.cfg.row_deadline
                        );
                    }
                    let last =
                        attempt >= self.cfg.max_attempts || !e.kind.is_retryable() || past_deadline;
                    tracing::debug!(
                        function = %req.function, attempt, kind = %e.kind,
                        status = ?e.http_status, "attempt failed: {}", e.message
                    );
                    if last {
                        m.failed.fetch_add(1, Ordering::Relaxed);
                        fm.failed.fetch_add(1, Ordering::Relaxed);
                        Metrics::bump(&m.errors, e.kind);
                        Metrics::bump(&fm.errors, e.kind);
                        tracing::debug!(
                            function = %req.function, elapsed = ?started.elapsed(),
                            "call failed after {attempt} attempt(s)"
                        );
                        return Err(Arc::new(RowError::from_attempt(e, attempt)));
                    }
                    Metrics::bump(&m.retries, e.kind);
                    Metrics::bump(&fm.retries, e.kind);
                    if e.kind == ErrorKind::Truncated && !raised_max_tokens {
                        // Repeating the same call would stop at the same place: double the
                        // completion limit, once. The response is still stored under the
                        // original request's key.
                        raised_max_tokens = true;
                        let max = req.max_tokens.unwrap_or(256);
                        req.max_tokens = Some(max.saturating_mul(2));
                        continue;
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::governor::GovernorConfig;
    use crate::udf::def::RenderedPrompt;

    /// Answers every prompt with its own text.
    #[derive(Debug)]
    struct Echo;

    #[async_trait::async_trait]
    impl Provider for Echo {
        fn endpoint(&self) -> String {
            "echo".into()
        }

        async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
            Ok(LlmResponse {
                content: req.prompt.user.clone(),
                finish_reason: Some("stop".into()),
                usage: None,
            })
        }
    }

    fn request(i: usize) -> LlmRequest {
        LlmRequest {
            function: "f".into(),
            prompt: RenderedPrompt {
                system: None,
                user: format!("prompt {i}"),
            },
            max_tokens: None,
            temperature: None,
            schema: None,
        }
    }

    #[tokio::test]
    async fn the_dedup_map_forgets_completed_calls_when_full() {
        let d = Dispatcher::new(DispatcherConfig::default());
        let model = ModelHandle {
            provider: Arc::new(Echo),
            governor: Arc::new(Governor::new(GovernorConfig {
                max_concurrency: 8,
                rpm: None,
                tpm: None,
                adaptive: false,
            })),
            prices: None,
        };
        for i in 0..MEMO_CAPACITY + 100 {
            d.call(&model, request(i)).await.unwrap();
        }
        let remembered = d.inner.memo.lock().unwrap().len();
        assert!(
            remembered <= 101,
            "completed calls forgotten: {remembered} kept"
        );
        // A recent identical call is still shared; a forgotten one is made again.
        d.call(&model, request(MEMO_CAPACITY + 99)).await.unwrap();
        assert_eq!(d.metrics().deduplicated.load(Ordering::Relaxed), 1);
        d.call(&model, request(0)).await.unwrap();
        assert_eq!(
            d.metrics().requests.load(Ordering::Relaxed),
            (MEMO_CAPACITY + 101) as u64
        );
    }
}
