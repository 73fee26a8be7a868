//! One call to its end: attempts until a valid value or a final error, with exponential
//! backoff and full jitter between them (a server's Retry-After wins, capped at
//! `backoff_max_ms`), within the row's deadline; each valid response is stored in the cache the
//! moment it arrives.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use futures::FutureExt;

use super::call::{CallResult, ModelHandle};
use super::inner::Inner;
use super::metrics::{FunctionMetrics, Metrics};
use super::orphan::detachable;
use super::route::routed;
use crate::cache::{CachedResponse, RequestKey};
use crate::llm::batch::BatchQueue;
use crate::llm::parse_response;
use crate::types::{ErrorKind, LlmError, LlmRequest, LlmResponse, RowError};

/// The longest a prompt waits for the leader of its prefix: four times the function's median
/// latency (within [`PREFIX_WAIT_MIN`], [`PREFIX_WAIT_MAX`]), [`PREFIX_WAIT_MAX`] before a
/// latency is known.
fn prefix_wait(fm: &FunctionMetrics) -> Duration {
    fm.latency
        .quantile_ms(0.5)
        .and_then(|ms| Duration::try_from_secs_f64(ms * 4.0 / 1000.0).ok())
        .map_or(PREFIX_WAIT_MAX, |d| {
            d.clamp(PREFIX_WAIT_MIN, PREFIX_WAIT_MAX)
        })
}

/// The shortest bound of a prompt's wait for the leader of its prefix.
const PREFIX_WAIT_MIN: Duration = Duration::from_millis(250);
/// The longest.
const PREFIX_WAIT_MAX: Duration = Duration::from_secs(10);

impl Inner {
    /// How long to wait before attempt `attempt + 1` after `e`: the server's Retry-After
    /// (capped at `backoff_max_ms`), else the backoff.
    pub(super) fn retry_delay(&self, e: &LlmError, attempt: u32) -> Duration {
        match e.retry_after {
            Some(d) => d.min(self.cfg.backoff_max),
            None => self.backoff(attempt),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.cfg.backoff_base.as_secs_f64();
        let cap = self.cfg.backoff_max.as_secs_f64();
        let exp = (base * 2f64.powi(attempt.saturating_sub(1).min(30) as i32)).min(cap);
        // Full jitter: uniform in [exp/2, exp] keeps a floor so retries do not stampede.
        Duration::from_secs_f64(exp * (0.5 + fastrand::f64() * 0.5))
    }

    /// One attempt through the model's batch API: held by a budget reservation while it
    /// waits (no governor or global permit: nothing is on the wire).
    async fn send_to_batch(
        &self,
        model: &ModelHandle,
        queue: &Arc<BatchQueue>,
        req: &LlmRequest,
        key: RequestKey,
    ) -> Result<LlmResponse, LlmError> {
        let _reservation = self.reserve_budget(model, req.estimated_usage()).await?;
        if self.global.is_closed() {
            // Stopped (Ctrl-C): nothing more is submitted, and nothing fails because of it.
            return std::future::pending().await;
        }
        let _parked = self.waiting.park();
        queue.call(key, req).await
    }

    /// One attempt (the `n`th of the call whose key is `key`): the response, counted and
    /// validated.
    pub(super) async fn attempt(
        &self,
        model: &ModelHandle,
        req: &LlmRequest,
        (key, n): (RequestKey, u32),
        fm: &Arc<FunctionMetrics>,
    ) -> Result<CachedResponse, LlmError> {
        let result = match &model.batch {
            Some(q) if n == 1 || !q.retries_live() => self.send_to_batch(model, q, req, key).await,
            _ if model.provider.max_prompts_per_request() > 1 => {
                let _reservation = self.reserve_budget(model, req.estimated_usage()).await?;
                let shared = (&self.global, &self.metrics, fm);
                routed(model, req, |m| async move {
                    self.list_collectors.send(&m, req, shared).await
                })
                .await
            }
            _ => {
                // A prompt sharing a long prefix with one on the wire waits for it (`order`).
                let _turn = match &model.prefixes {
                    Some(order) => {
                        let turn = order.turn(req, prefix_wait(fm)).await;
                        if turn.followed() {
                            fm.prefix_waits.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(turn)
                    }
                    None => None,
                };
                self.send_hedged(model, req, fm).await
            }
        };
        let m = &self.metrics;
        let resp = result?;
        if let Some(u) = resp.usage {
            let nano_usd = model.nano_usd(u);
            m.spent_nano_usd.fetch_add(nano_usd, Ordering::Relaxed);
            if let Some(t) = &model.tally {
                t.spent(u, nano_usd);
            }
            for (total, n) in [
                (&m.tokens_in, u.prompt_tokens),
                (&m.tokens_out, u.completion_tokens),
                (&m.tokens_cached, u.cached_prompt_tokens),
                (&fm.tokens_in, u.prompt_tokens),
                (&fm.tokens_out, u.completion_tokens),
                (&fm.tokens_cached, u.cached_prompt_tokens),
            ] {
                total.fetch_add(n, Ordering::Relaxed);
            }
        }
        let mut value = parse_response(req.schema.as_deref(), &resp).map_err(|mut e| {
            e.http_status = Some(200);
            e
        })?;
        if req.confidence {
            value = super::call::confident_value(value, resp.confidence);
        }
        Ok(CachedResponse {
            value,
            usage: resp.usage,
            finish_reason: resp.finish_reason,
        })
    }

    /// Attempts `req` until it has a value or a final error.
    pub(super) async fn run(
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
            match self.attempt(model, &req, (key, attempt), fm).await {
                Ok(resp) => {
                    m.succeeded.fetch_add(1, Ordering::Relaxed);
                    fm.succeeded.fetch_add(1, Ordering::Relaxed);
                    let value = Arc::new(resp.value.clone());
                    self.store(vec![(key, resp)]).await;
                    return Ok(value);
                }
                Err(e) if super::orphan::orphaned() => {
                    // Its statement is gone: no row waits for the error, and nothing more is
                    // sent for it.
                    return Err(Arc::new(RowError::from_attempt(e, attempt)));
                }
                Err(mut e) => {
                    let delay = self.retry_delay(&e, attempt);
                    // The row's total deadline: no retry that would start after it (a batch
                    // waits for its provider's completion window instead).
                    let past_deadline =
                        model.batch.is_none() && started.elapsed() + delay > self.cfg.row_deadline;
                    if past_deadline && e.kind.is_retryable() && attempt < self.cfg.max_attempts {
                        e.message = format!(
                            "{} (row deadline of {:?} reached; deadline_ms in [dispatcher])",
                            e.message, self.cfg.row_deadline
                        );
                    }
                    // A model whose replicas are all ejected fails its calls at once.
                    let down = model.replicas.as_ref().is_some_and(|r| r.is_down());
                    let last = attempt >= self.cfg.max_attempts
                        || !e.kind.is_retryable()
                        || past_deadline
                        || down;
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

impl Inner {
    /// Makes a call the persistent cache did not answer: shared with an identical call of the
    /// run, or sent (with retries) and stored. `claimed`: this worker holds the key's claim in
    /// the cluster's shared tier, given up unless the call is answered. On a cluster's worker
    /// the call is [`detachable`]: one dropped with its request on the wire still keeps its
    /// answer.
    pub(super) async fn call_uncached(
        self: &Arc<Self>,
        model: &ModelHandle,
        (req, key, claimed): (LlmRequest, RequestKey, bool),
        fm: Arc<FunctionMetrics>,
    ) -> CallResult {
        let inner = self.clone();
        let model = model.clone();
        let detach = self.shared.is_some() && self.cache_mode.writes();
        // Taken now: a call shared with an identical one drops it unused, which gives it up.
        let claim = self.claim(key, claimed);
        let call = async move {
            let r = inner.run(&model, req, key, &fm).await;
            if r.is_ok() {
                claim.answered();
            }
            if super::orphan::orphaned() {
                // Nothing else reports what it counted for the statement that dropped it.
                inner.report().await;
            }
            r
        };
        let run = move || {
            if !detach {
                return call.boxed();
            }
            detachable(call).boxed()
        };
        self.dedup.share(key, &self.metrics.deduplicated, run).await
    }
}
