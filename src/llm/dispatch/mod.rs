//! The one shared scheduler for every LLM call of a run, and the only code that talks to the
//! response cache.
//!
//! The SQL layer hands a [`FunctionCaller`] the rendered prompts of a slice of rows and gets one
//! result per prompt back. On the way, in this order (one file each):
//! 1. the persistent [`ResponseCache`] answers what it holds, in one read (here);
//! 2. [`dedup`]: a call identical to one already running or done in this run shares its result;
//! 3. [`retry`]: the rest are sent with retries — exponential backoff with full jitter,
//!    honouring Retry-After — and every response is validated against the function's output
//!    schema, invalid ones retried; every validated response is stored in the cache as it
//!    arrives;
//! 4. each attempt is admitted by [`budget`] (the run's token and dollar budgets), the model's
//!    [`Governor`](super::governor::Governor) (adaptive concurrency, RPM/TPM) and the global
//!    concurrency budget — all three held as values that give themselves back on drop, so a
//!    cancelled statement leaves nothing taken — and goes out alone or, for providers that take
//!    lists, in a list-prompt request formed by [`lists`];
//! 5. [`metrics`] counts what happened.

mod budget;
mod call;
mod dedup;
mod hedge;
mod inner;
mod lists;
pub mod metrics;
mod order;
mod orphan;
mod pack;
mod pool;
mod retry;
mod route;
mod send;
mod tally;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Semaphore;

use crate::cache::{CacheMode, KeyPrefix, RequestKey, ResponseCache, SharedCache};
use crate::config::DispatcherConfig;
use crate::types::RenderedPrompt;
#[cfg(test)]
use crate::types::{ErrorKind, LlmRequest, RowError};

pub(crate) use call::{CallResult, CallSpec, ModelHandle, Packer, split_confident};
use inner::{Inner, Miss as MissWhy, Open};
pub(crate) use order::PrefixOrder;
use pool::BudgetPool;

pub use metrics::{
    CascadeSnapshot, CascadeTally, FunctionMetrics, FunctionSnapshot, LatencyHistogram,
    LatencySnapshot, Metrics, MetricsSnapshot, ModelSnapshot,
};

/// A prompt the cache does not answer: its place among the prompts, itself, its key, and why.
type Miss = (usize, RenderedPrompt, RequestKey, MissWhy);

/// The shared scheduler. Cheap to clone (all state is behind `Arc`s).
#[derive(Debug, Clone)]
pub(crate) struct Dispatcher {
    inner: Arc<Inner>,
}

impl Dispatcher {
    /// A dispatcher with the given budget and retry policy.
    #[cfg(test)]
    pub fn new(cfg: DispatcherConfig) -> Self {
        Self::with_cache(cfg, None, CacheMode::Off)
    }

    /// A dispatcher that answers from and stores into `cache` as `mode` says.
    pub fn with_cache(
        cfg: DispatcherConfig,
        cache: Option<Arc<ResponseCache>>,
        cache_mode: CacheMode,
    ) -> Self {
        Self::with_shared_cache(cfg, cache, None, cache_mode)
    }

    /// A cluster worker's dispatcher: `cache` first, then the coordinator's `shared` tier,
    /// as `mode` says.
    pub fn with_shared_cache(
        cfg: DispatcherConfig,
        cache: Option<Arc<ResponseCache>>,
        shared: Option<Arc<SharedCache>>,
        cache_mode: CacheMode,
    ) -> Self {
        let cache = cache.filter(|_| cache_mode != CacheMode::Off);
        let shared = shared.filter(|_| cache_mode != CacheMode::Off);
        Dispatcher {
            inner: Arc::new(Inner {
                global: Arc::new(Semaphore::new(cfg.concurrency)),
                cfg,
                dedup: Default::default(),
                metrics: Arc::new(Metrics::default()),
                cache,
                shared,
                cache_mode,
                list_collectors: Default::default(),
                reported: Default::default(),
                waiting: Default::default(),
                pooled: Default::default(),
            }),
        }
    }

    /// Sends nothing more: a request not yet on the wire waits until its statement is dropped,
    /// and those on the wire finish (the first Ctrl-C). Nothing fails because of it, so no
    /// statement completes with rows it did not answer.
    pub fn stop_sending(&self) {
        self.inner.global.close();
    }

    /// Returns once this dispatcher may take more input, for one of its readers: what it has
    /// taken on and not yet sent (waiting for the cache, an identical call, a shared prefix,
    /// their model's governor or the global budget) is at most 1 / `share` of what is on the
    /// wire (at least one prompt), and what was let in last reached it (or, with none open,
    /// nothing did for 50 ms). Its work is then about to run out, whatever pace its models
    /// allow (a cluster's worker asks for more input).
    pub async fn until_ready_for_input(&self, share: u64) {
        let on_wire = &self.inner.metrics.in_flight;
        self.inner.waiting.let_in(share, on_wire).await
    }

    /// A cluster coordinator's pool of the run's budgets `budget` (tokens, dollars) for
    /// `workers` workers, over this dispatcher's counters (where the workers' reports are
    /// added); this dispatcher's own calls draw on it once [`Dispatcher::draw_on`] says so.
    pub fn budget_pool(
        &self,
        budget: (Option<u64>, Option<f64>),
        workers: usize,
    ) -> Arc<BudgetPool> {
        Arc::new(BudgetPool::new(self.inner.metrics.clone(), budget, workers))
    }

    /// This dispatcher's own calls check the budgets of `pool` (the coordinator's, which
    /// grants them to its workers) instead of its settings' (once; later calls are ignored).
    pub fn draw_on(&self, pool: Arc<BudgetPool>) {
        let _ = self.inner.pooled.set(pool::Pooled::Pool(pool));
    }

    /// A cluster worker's budgets are granted by its `coordinator` as it spends; should the
    /// coordinator not answer, it takes 1 / `workers` of its settings' budgets (once).
    pub fn budgets_granted_by(&self, coordinator: Arc<SharedCache>, workers: usize) {
        let share = self.inner.cfg.share(workers);
        let (tokens, nano_usd) = pool::budgets(share.budget_tokens, share.budget_usd);
        let fallback = crate::cache::Allowance {
            tokens: tokens.unwrap_or(0),
            nano_usd: nano_usd.unwrap_or(0),
        };
        let granted = pool::Granted::new(coordinator, fallback);
        let _ = self.inner.pooled.set(pool::Pooled::Granted(granted));
    }

    /// Requests on the wire now.
    pub fn in_flight(&self) -> u64 {
        self.inner
            .metrics
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
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

    /// The caller of one function on one model: the constant part of its request keys is
    /// hashed here, once.
    pub fn caller(&self, model: &ModelHandle, spec: CallSpec) -> FunctionCaller {
        let mut prefix = KeyPrefix::new(
            &model.provider.endpoint(),
            spec.max_tokens,
            spec.temperature,
            spec.schema.as_deref(),
        );
        if spec.confidence {
            prefix = prefix.with_confidence();
        }
        FunctionCaller {
            inner: self.inner.clone(),
            model: model.clone(),
            metrics: self.inner.metrics.function(&spec.function),
            spec,
            prefix,
        }
    }

    /// Makes one call: the validated value, or the error after all attempts.
    #[cfg(test)]
    pub async fn call(&self, model: &ModelHandle, req: LlmRequest) -> CallResult {
        let spec = CallSpec {
            function: req.function,
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            schema: req.schema,
            pack: None,
            confidence: req.confidence,
            in_cascade: false,
        };
        let progress = AtomicUsize::new(0);
        let caller = self.caller(model, spec);
        let mut results = caller.call_all(vec![req.prompt], &progress).await;
        results.pop().unwrap_or_else(|| {
            Err(Arc::new(RowError::without_call(
                ErrorKind::Connection,
                "no result".into(),
            )))
        })
    }
}

/// Makes the calls of one function on one model ([`Dispatcher::caller`]).
#[derive(Debug)]
pub(crate) struct FunctionCaller {
    inner: Arc<Inner>,
    model: ModelHandle,
    spec: CallSpec,
    prefix: KeyPrefix,
    metrics: Arc<FunctionMetrics>,
}

impl FunctionCaller {
    /// Counts `n` rows whose result is known (not by a cascade's model that may pass rows
    /// on: the cascade counts those it answers).
    fn finished(&self, open: &Open<'_>, n: usize) {
        open.done(n);
        if !self.spec.confidence {
            self.metrics
                .rows_finished
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// On a cluster's worker, sends the coordinator what its counters gained since the last
    /// report (the calls report by themselves; this is for counts made around them).
    pub async fn report(&self) {
        self.inner.report().await;
    }

    /// The function's counters.
    pub fn metrics(&self) -> &Arc<FunctionMetrics> {
        &self.metrics
    }

    /// Prompt tokens of `prompt` sent as this function's request, counted with the model's
    /// tokenizer (characters / 4 where it has none).
    pub fn prompt_tokens(&self, prompt: &RenderedPrompt) -> u64 {
        let counted = self
            .model
            .tokens
            .as_ref()
            .and_then(|t| t.prompt(&self.spec.request(prompt.clone())));
        counted.unwrap_or_else(|| {
            let chars = prompt.system.as_ref().map_or(0, |s| s.chars().count())
                + prompt.user.chars().count();
            (chars as u64).div_ceil(4)
        })
    }

    /// The cache's answers to `prompts` (one read for all), counted as known in `progress`,
    /// and the prompts it does not answer, with their places, keys and why (`claim`: claim
    /// them in the cluster's shared tier).
    async fn answer_from_cache(
        &self,
        prompts: Vec<RenderedPrompt>,
        (progress, open): (&AtomicUsize, &Open<'_>),
        claim: bool,
    ) -> (Vec<Option<CallResult>>, Vec<Miss>) {
        let fm = &self.metrics;
        let keys = self.prefix.keys(&prompts);
        if !self.spec.in_cascade {
            fm.prompts.fetch_add(keys.len() as u64, Ordering::Relaxed);
        }
        let cached = self.inner.lookup_cache(fm, &keys, claim).await;
        let mut results: Vec<Option<CallResult>> = Vec::with_capacity(prompts.len());
        let mut misses = Vec::new();
        for (i, ((prompt, key), hit)) in prompts.into_iter().zip(keys).zip(cached).enumerate() {
            match hit {
                Ok(value) => results.push(Some(Ok(value))),
                Err(why) => {
                    results.push(None);
                    misses.push((i, prompt, key, why));
                }
            }
        }
        let answered = results.len() - misses.len();
        progress.fetch_add(answered, Ordering::Relaxed);
        self.finished(open, answered);
        (results, misses)
    }

    /// One result per prompt, in order: answered from the cache (one read for all), shared
    /// with an identical call (of this process, or of another worker of the cluster), or sent.
    /// `progress` counts the prompts whose result is known, as they become known.
    pub async fn call_all(
        &self,
        prompts: Vec<RenderedPrompt>,
        progress: &AtomicUsize,
    ) -> Vec<CallResult> {
        let fm = &self.metrics;
        let open = self.inner.waiting.open(prompts.len());
        let open = &open;
        let (mut results, sends) = self
            .answer_from_cache(prompts, (progress, open), true)
            .await;
        let sent = sends.into_iter().map(|(i, prompt, key, why)| {
            let req = self.spec.request(prompt);
            async move {
                let shared = match why {
                    MissWhy::Wait => self.inner.answer_of_other_worker(key).await,
                    MissWhy::Call { .. } => None,
                };
                let r = match shared {
                    Some(value) => Ok(value),
                    None => {
                        let claimed = matches!(why, MissWhy::Call { claimed: true });
                        let call = (req, key, claimed);
                        self.inner
                            .call_uncached(&self.model, call, fm.clone())
                            .await
                    }
                };
                progress.fetch_add(1, Ordering::Relaxed);
                self.finished(open, 1);
                (i, r)
            }
        });
        for (i, r) in futures::future::join_all(sent).await {
            results[i] = Some(r);
        }
        self.inner.report().await;
        results
            .into_iter()
            .map(|r| r.expect("every prompt has its result"))
            .collect()
    }
}

impl FunctionCaller {
    /// [`FunctionCaller::call_all`] for a packed function (`rows_per_prompt`): `prompts[i]` is
    /// row i alone (its key) and `items[i]` its rendered item; the rows the cache does not
    /// answer go out N at a time (identical rows once).
    pub async fn call_all_packed(
        &self,
        prompts: Vec<RenderedPrompt>,
        items: Vec<String>,
        progress: &AtomicUsize,
    ) -> Vec<CallResult> {
        let Some(pack) = self.spec.pack.clone() else {
            return self.call_all(prompts, progress).await;
        };
        let fm = &self.metrics;
        let open = self.inner.waiting.open(prompts.len());
        let open = &open;
        let (mut results, misses) = self
            .answer_from_cache(prompts, (progress, open), false)
            .await;
        let mut items: Vec<Option<String>> = items.into_iter().map(Some).collect();
        let mut first: std::collections::HashMap<RequestKey, usize> = Default::default();
        let mut copies = Vec::new();
        let mut rows = Vec::new();
        let mut indices = Vec::new();
        for (i, prompt, key, _) in misses {
            match first.get(&key) {
                Some(&j) => copies.push((i, j)),
                None => {
                    first.insert(key, i);
                    indices.push(i);
                    let item = items[i].take().unwrap_or_default();
                    rows.push(pack::PackRow { prompt, key, item });
                }
            }
        }
        let per = pack.rows().max(1);
        let mut chunks = Vec::new();
        while !rows.is_empty() {
            let rest = rows.split_off(per.min(rows.len()));
            chunks.push(std::mem::replace(&mut rows, rest));
        }
        let sent = chunks.into_iter().map(|chunk| {
            let n = chunk.len();
            let call = self
                .inner
                .call_pack((&self.model, &self.spec, &pack), chunk, fm);
            async move {
                let r = call.await;
                progress.fetch_add(n, Ordering::Relaxed);
                self.finished(open, n);
                r
            }
        });
        let done: Vec<CallResult> = futures::future::join_all(sent)
            .await
            .into_iter()
            .flatten()
            .collect();
        for (i, r) in indices.into_iter().zip(done) {
            results[i] = Some(r);
        }
        for (i, j) in copies {
            results[i] = results[j].clone();
            progress.fetch_add(1, Ordering::Relaxed);
            self.finished(open, 1);
        }
        self.inner.report().await;
        results
            .into_iter()
            .map(|r| r.expect("every prompt has its result"))
            .collect()
    }
}

#[cfg(test)]
mod tests;
