//! What the dispatcher counts: per run ([`Metrics`]) and per function ([`FunctionMetrics`]),
//! lock-free to record, copied into typed snapshots ([`MetricsSnapshot`], [`FunctionSnapshot`])
//! for the summary, `--metrics-json` and the progress display.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::llm::governor::LimitKind;
use crate::llm::replicas::ReplicaSnapshot;
use crate::types::ErrorKind;

pub use super::tally::{CascadeSnapshot, CascadeTally};

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

    /// Durations recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
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
    /// The part of `tokens_in` the servers took from their prompt caches.
    pub tokens_cached: AtomicU64,
    /// Highest number of this function's requests on the wire at once.
    pub max_in_flight: AtomicU64,
    /// Requests sent a second time because the first had not answered (hedges).
    pub hedges: AtomicU64,
    /// Calls that waited for an earlier call sharing a long prefix of their prompt to be
    /// answered, so that the server computes that prefix once.
    pub prefix_waits: AtomicU64,
    /// The adaptive hedging threshold in µs (0: not known yet), and the requests count when
    /// it was computed (it is recomputed every [`HEDGE_REFRESH`] requests, not per request).
    pub(crate) hedge_after_us: AtomicU64,
    pub(crate) hedge_after_at: AtomicU64,
    /// Rows handed to the function by the plan so far (for progress).
    pub rows_queued: AtomicU64,
    /// Rows whose value or error is known (cached, shared, failed before a call included).
    pub rows_finished: AtomicU64,
    /// Plan nodes calling the function whose input is not yet exhausted: while this is 0 the
    /// number of rows queued is final (for the ETA).
    pub open_inputs: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    /// Latency of each request on the wire.
    pub latency: LatencyHistogram,
    pub(crate) retries: Mutex<BTreeMap<ErrorKind, u64>>,
    pub(crate) errors: Mutex<BTreeMap<ErrorKind, u64>>,
    /// With a cascade: what each of its models did, in the cascade's order.
    pub(crate) cascade: Mutex<Vec<Arc<CascadeTally>>>,
}

impl FunctionMetrics {
    /// The counters of `model` (name, place) in the function's cascade (created on first use),
    /// its tokens also priced at `reference` (the cascade's last model's prices).
    pub(crate) fn cascade_tally(
        &self,
        model: (&str, usize),
        reference: Option<crate::config::Prices>,
    ) -> Arc<CascadeTally> {
        super::tally::tally_of(&self.cascade, model, reference)
    }

    /// The additive counters by name (see [`Metrics::counters`]).
    fn counters(&self) -> [(&'static str, &AtomicU64); 13] {
        [
            ("prompts", &self.prompts),
            ("requests", &self.requests),
            ("cache_hits", &self.cache_hits),
            ("succeeded", &self.succeeded),
            ("failed", &self.failed),
            ("tokens_in", &self.tokens_in),
            ("tokens_out", &self.tokens_out),
            ("tokens_cached", &self.tokens_cached),
            ("max_in_flight", &self.max_in_flight),
            ("hedges", &self.hedges),
            ("prefix_waits", &self.prefix_waits),
            ("rows_queued", &self.rows_queued),
            ("rows_finished", &self.rows_finished),
        ]
    }

    /// Retries of every cause.
    pub fn retries_total(&self) -> u64 {
        self.retries.lock().map(|m| m.values().sum()).unwrap_or(0)
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> FunctionSnapshot {
        let q = |x| {
            self.latency
                .quantile_ms(x)
                .map(|v| (v * 100.0).round() / 100.0)
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FunctionSnapshot {
            prompts: load(&self.prompts),
            requests: load(&self.requests),
            cache_hits: load(&self.cache_hits),
            succeeded: load(&self.succeeded),
            failed: load(&self.failed),
            tokens_in: load(&self.tokens_in),
            tokens_out: load(&self.tokens_out),
            tokens_cached: load(&self.tokens_cached),
            max_in_flight: load(&self.max_in_flight),
            hedges: load(&self.hedges),
            prefix_waits: load(&self.prefix_waits),
            latency_ms: LatencySnapshot {
                p50: q(0.5),
                p95: q(0.95),
                p99: q(0.99),
            },
            retries: Metrics::names(&self.retries),
            errors: Metrics::names(&self.errors),
            cascade: super::tally::snapshot(&self.cascade),
        }
    }
}

/// Latency quantiles in milliseconds (None before the first request).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencySnapshot {
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
}

/// A point-in-time copy of one function's [`FunctionMetrics`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FunctionSnapshot {
    /// Rows that asked for a value.
    pub prompts: u64,
    /// Requests sent.
    pub requests: u64,
    /// Calls answered from the persistent cache.
    pub cache_hits: u64,
    /// Calls that ended with a value.
    pub succeeded: u64,
    /// Calls that ended with an error.
    pub failed: u64,
    /// Prompt tokens reported.
    pub tokens_in: u64,
    /// Completion tokens reported.
    pub tokens_out: u64,
    /// The part of `tokens_in` the servers took from their prompt caches.
    pub tokens_cached: u64,
    /// Highest number of requests on the wire at once.
    pub max_in_flight: u64,
    /// Requests sent a second time because the first had not answered.
    pub hedges: u64,
    /// Calls that waited for an earlier call sharing a long prefix of their prompt.
    pub prefix_waits: u64,
    /// Latency of the requests on the wire.
    pub latency_ms: LatencySnapshot,
    /// Retries by the failure that caused them.
    pub retries: BTreeMap<String, u64>,
    /// Final errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// With a cascade: what each of its models did, in order.
    pub cascade: Vec<CascadeSnapshot>,
}

impl FunctionSnapshot {
    /// With a cascade: what asking its last model alone would have cost (the first model's
    /// tokens — it is asked every row — at the last model's prices), and what the cascade
    /// cost; none without a cascade or without prices.
    pub fn cascade_costs(&self) -> Option<(f64, f64)> {
        super::tally::costs(&self.cascade)
    }

    /// The snapshot as JSON (the `functions` entries of `--metrics-json`).
    pub fn to_json(&self) -> Value {
        let l = &self.latency_ms;
        serde_json::json!({
            "prompts": self.prompts,
            "requests": self.requests,
            "cache_hits": self.cache_hits,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "tokens_cached": self.tokens_cached,
            "max_in_flight": self.max_in_flight,
            "hedges": self.hedges,
            "prefix_waits": self.prefix_waits,
            "latency_ms": {"p50": l.p50, "p95": l.p95, "p99": l.p99},
            "retries": self.retries,
            "errors": self.errors,
            "cascade": super::tally::to_json(&self.cascade),
        })
    }
}

/// How many requests an adaptive hedging threshold serves before it is computed again.
pub(crate) const HEDGE_REFRESH: u64 = 64;

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
    /// The part of `tokens_in` the providers took from their prompt caches.
    pub tokens_cached: AtomicU64,
    /// Highest number of requests on the wire at once.
    pub max_in_flight: AtomicU64,
    /// Requests sent a second time because the first had not answered (hedges).
    pub hedges: AtomicU64,
    /// Estimated tokens of the requests on the wire (counted against the budget).
    pub(crate) reserved_tokens: AtomicU64,
    /// Cost of the responses received, in nano-dollars (at the models' prices).
    pub spent_nano_usd: AtomicU64,
    /// Estimated cost of the requests on the wire, in nano-dollars.
    pub(crate) reserved_nano_usd: AtomicU64,
    /// Set when a request was refused because the token budget would be exceeded.
    pub budget_exhausted: AtomicBool,
    /// Calls answered from the persistent cache.
    pub cache_hits: AtomicU64,
    /// Calls looked up in the persistent cache and not found.
    pub cache_misses: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) retries: Mutex<BTreeMap<ErrorKind, u64>>,
    pub(crate) errors: Mutex<BTreeMap<ErrorKind, u64>>,
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
    /// The part of `tokens_in` the providers took from their prompt caches.
    pub tokens_cached: u64,
    /// Cost of the responses received in USD, at the models' prices (0 without prices).
    pub cost_usd: f64,
    /// Highest number of requests on the wire at once.
    pub max_in_flight: u64,
    /// Requests sent a second time because the first had not answered.
    pub hedges: u64,
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
    pub functions: BTreeMap<String, FunctionSnapshot>,
    /// Per model: what its governor learned.
    pub models: BTreeMap<String, ModelSnapshot>,
    /// Per model served by several replicas: each replica's requests, failures and state.
    pub replicas: BTreeMap<String, Vec<ReplicaSnapshot>>,
}

/// What a model's governor learned of the provider's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ModelSnapshot {
    /// The in-flight limit now.
    pub limit: usize,
    /// The learned pace in requests per second, if the provider's refusals taught one.
    pub pace_rps: Option<f64>,
    /// The kind of limit the refusals showed: a concurrency cap (kept by `limit`) or a rate
    /// (kept by `pace_rps`).
    pub kind: Option<LimitKind>,
    /// Round trips in which the provider refused in a burst.
    pub saturations: u64,
}

impl MetricsSnapshot {
    /// Model `name`'s part of the JSON: what its governor learned, and its replicas if it
    /// has several.
    fn model_json(&self, name: &str, m: &ModelSnapshot) -> Value {
        let mut v = serde_json::json!({
            "limit": m.limit, "pace_rps": m.pace_rps, "saturations": m.saturations,
            "learned": m.kind.map(|k| k.to_string()),
        });
        if let Some(rs) = self.replicas.get(name) {
            v["replicas"] = rs.iter().map(ReplicaSnapshot::to_json).collect();
        }
        v
    }

    /// The snapshot as JSON.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "calls": self.calls, "deduplicated": self.deduplicated, "requests": self.requests,
            "succeeded": self.succeeded, "failed": self.failed, "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out, "tokens_cached": self.tokens_cached,
            "cost_usd": self.cost_usd, "max_in_flight": self.max_in_flight,
            "cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
            "hedges": self.hedges,
            "retries": self.retries, "errors": self.errors,
            "models": self.models.iter().map(|(k, m)| (k.clone(), self.model_json(k, m)))
                .collect::<serde_json::Map<_, _>>(),
            "functions": self.functions.iter().map(|(k, f)| (k.clone(), f.to_json()))
                .collect::<serde_json::Map<_, _>>(),
        })
    }
}

impl Metrics {
    pub(crate) fn names(m: &Mutex<BTreeMap<ErrorKind, u64>>) -> BTreeMap<String, u64> {
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
            .map(|f| f.iter().map(|(k, v)| (k.clone(), v.snapshot())).collect())
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
            tokens_cached: self.tokens_cached.load(Ordering::Relaxed),
            cost_usd: self.spent_nano_usd.load(Ordering::Relaxed) as f64 / 1e9,
            max_in_flight: self.max_in_flight.load(Ordering::Relaxed),
            hedges: self.hedges.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.cache_misses.load(Ordering::Relaxed),
            retries: names(&self.retries),
            errors: names(&self.errors),
            models: BTreeMap::new(),
            replicas: BTreeMap::new(),
        }
    }

    /// Every counter that adds up across machines, by name: the run's (`calls`,
    /// `retry:KIND`, ...) and each function's (`f:NAME:requests`, `f:NAME:lat:BUCKET`, ...).
    /// A cluster's worker ships the change of these to its coordinator, which
    /// [`Metrics::absorb`]s it, so that its summary, progress and `--metrics-json` count every
    /// worker's calls. `max_in_flight` ships as the change of the worker's peak: the
    /// coordinator's is the sum of the workers' peaks.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (name, a) in self.run_counters() {
            out.insert(name.to_string(), a.load(Ordering::Relaxed));
        }
        for (kind, n) in Self::names(&self.retries) {
            out.insert(format!("retry:{kind}"), n);
        }
        for (kind, n) in Self::names(&self.errors) {
            out.insert(format!("error:{kind}"), n);
        }
        for (f, fm) in self.functions() {
            for (name, a) in fm.counters() {
                out.insert(format!("f:{f}:{name}"), a.load(Ordering::Relaxed));
            }
            for (kind, n) in Self::names(&fm.retries) {
                out.insert(format!("f:{f}:retry:{kind}"), n);
            }
            for (kind, n) in Self::names(&fm.errors) {
                out.insert(format!("f:{f}:error:{kind}"), n);
            }
            for (i, b) in fm.latency.buckets.iter().enumerate() {
                let n = b.load(Ordering::Relaxed);
                if n > 0 {
                    out.insert(format!("f:{f}:lat:{i}"), n);
                }
            }
            super::tally::counters(&f, &fm.cascade, &mut out);
        }
        out
    }

    /// Adds counters named as [`Metrics::counters`] names them (a worker's change since its
    /// last report); names it does not know are ignored.
    pub fn absorb(&self, delta: &BTreeMap<String, u64>) {
        let add = |a: &AtomicU64, n: u64| {
            a.fetch_add(n, Ordering::Relaxed);
        };
        let bump_by = |map: &Mutex<BTreeMap<ErrorKind, u64>>, kind: &str, n: u64| {
            if let (Some(kind), Ok(mut m)) = (ErrorKind::from_name(kind), map.lock()) {
                *m.entry(kind).or_default() += n;
            }
        };
        let run = self.run_counters();
        for (name, &n) in delta {
            let mut parts = name.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("retry"), Some(kind), None) => bump_by(&self.retries, kind, n),
                (Some("error"), Some(kind), None) => bump_by(&self.errors, kind, n),
                (Some("f"), Some(f), Some(rest)) => {
                    let fm = self.function(f);
                    match rest.split_once(':') {
                        Some(("retry", kind)) => bump_by(&fm.retries, kind, n),
                        Some(("error", kind)) => bump_by(&fm.errors, kind, n),
                        Some(("cascade", tail)) => super::tally::absorb(&fm.cascade, tail, n),
                        Some(("lat", i)) => {
                            if let Some(b) = i
                                .parse::<usize>()
                                .ok()
                                .and_then(|i| fm.latency.buckets.get(i))
                            {
                                add(b, n);
                            }
                        }
                        _ => {
                            if let Some((_, a)) =
                                fm.counters().into_iter().find(|(k, _)| *k == rest)
                            {
                                add(a, n);
                            }
                        }
                    }
                }
                (Some(counter), None, None) => {
                    if let Some((_, a)) = run.iter().find(|(k, _)| *k == counter) {
                        add(a, n);
                    }
                }
                _ => {}
            }
        }
    }

    /// The run's additive counters by name.
    fn run_counters(&self) -> [(&'static str, &AtomicU64); 13] {
        [
            ("calls", &self.calls),
            ("deduplicated", &self.deduplicated),
            ("requests", &self.requests),
            ("succeeded", &self.succeeded),
            ("failed", &self.failed),
            ("tokens_in", &self.tokens_in),
            ("tokens_out", &self.tokens_out),
            ("tokens_cached", &self.tokens_cached),
            ("max_in_flight", &self.max_in_flight),
            ("hedges", &self.hedges),
            ("spent_nano_usd", &self.spent_nano_usd),
            ("cache_hits", &self.cache_hits),
            ("cache_misses", &self.cache_misses),
        ]
    }

    pub(crate) fn bump(map: &Mutex<BTreeMap<ErrorKind, u64>>, kind: ErrorKind) {
        if let Ok(mut m) = map.lock() {
            *m.entry(kind).or_default() += 1;
        }
    }
}

/// One request on the wire, counted globally and for its function while it lives: the count
/// drops when the request ends or is cancelled.
pub(crate) struct OnTheWire<'a> {
    metrics: &'a Metrics,
    function: &'a FunctionMetrics,
}

impl<'a> OnTheWire<'a> {
    /// Counts a request that is about to be sent.
    pub(crate) fn start(metrics: &'a Metrics, function: &'a FunctionMetrics) -> Self {
        metrics.requests.fetch_add(1, Ordering::Relaxed);
        function.requests.fetch_add(1, Ordering::Relaxed);
        let now = metrics.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        metrics.max_in_flight.fetch_max(now, Ordering::Relaxed);
        let now = function.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        function.max_in_flight.fetch_max(now, Ordering::Relaxed);
        OnTheWire { metrics, function }
    }
}

impl Drop for OnTheWire<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.function.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
