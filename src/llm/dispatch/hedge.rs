//! Hedging: a request still unanswered long after its function's requests usually answer is
//! sent a second time, and the first valid answer wins; the other is dropped (and with it its
//! connection, governor slot and permit). A hung server connection then costs one hedge, not a
//! slot for the whole `timeout_ms`. Should the hedge fail (a 5xx, a dropped connection), the
//! attempt fails with it at once — the first is overdue, likely hung, and is dropped — and the
//! row's retries take over; should the first fail, the hedge goes on alone and is hedged in
//! its turn if it becomes overdue. No attempt waits on an overdue request alone.
//!
//! When: after `hedge_after_ms`, or by default after three times the function's p99 latency
//! (at least [`FLOOR`]) once [`MIN_SAMPLES`] requests have answered. Hedges are at most
//! [`BUDGET`] of the requests sent, so a provider that is slow for everyone is not sent
//! everything twice. The call stays one call: one result, one cache entry.
//!
//! Time on the wire and the waits are tokio's clock (`tokio::time::Instant`, `sleep`), so
//! tests pause it and see a hedge sent at its threshold exactly.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::{Either, select};
use tokio::time::Instant;

use super::call::ModelHandle;
use super::inner::Inner;
use super::metrics::FunctionMetrics;
use super::metrics::HEDGE_REFRESH;
use crate::config::Hedge;
use crate::types::{LlmError, LlmRequest, LlmResponse};

/// Latency samples the adaptive threshold needs.
const MIN_SAMPLES: u64 = 20;
/// The adaptive threshold is this many times the p99 latency...
const P99_FACTOR: f64 = 3.0;
/// ...and never shorter than this.
const FLOOR: Duration = Duration::from_millis(250);
/// Most hedges, as a share of the requests sent.
const BUDGET: f64 = 0.02;
/// How often a request waiting for a threshold (or for budget) looks again.
const RECHECK: Duration = Duration::from_millis(50);

impl Inner {
    /// How long a request of `fm` may go unanswered before it is hedged, if that is known.
    fn hedge_after(&self, fm: &FunctionMetrics) -> Option<Duration> {
        match self.cfg.hedge {
            Hedge::Off => None,
            Hedge::After(d) => Some(d),
            Hedge::Adaptive => {
                let requests = fm.requests.load(Ordering::Relaxed);
                let cached = fm.hedge_after_us.load(Ordering::Relaxed);
                let at = fm.hedge_after_at.load(Ordering::Relaxed);
                if cached > 0 && requests.saturating_sub(at) < HEDGE_REFRESH {
                    return Some(Duration::from_micros(cached));
                }
                if fm.latency.count() < MIN_SAMPLES {
                    return None;
                }
                let p99_ms = fm.latency.quantile_ms(0.99)?;
                let t = Duration::try_from_secs_f64(p99_ms * P99_FACTOR / 1000.0)
                    .ok()?
                    .max(FLOOR);
                fm.hedge_after_us
                    .store(t.as_micros().max(1) as u64, Ordering::Relaxed);
                fm.hedge_after_at.store(requests, Ordering::Relaxed);
                Some(t)
            }
        }
    }

    /// Whether one more hedge stays within the budget.
    fn hedge_allowed(&self) -> bool {
        let hedges = self.metrics.hedges.load(Ordering::Relaxed) as f64;
        let requests = self.metrics.requests.load(Ordering::Relaxed) as f64;
        hedges < (requests * BUDGET).max(1.0)
    }

    /// Sends `req`, hedged as the module says.
    pub(super) async fn send_hedged(
        &self,
        model: &ModelHandle,
        req: &LlmRequest,
        fm: &FunctionMetrics,
    ) -> Result<LlmResponse, LlmError> {
        if self.cfg.hedge == Hedge::Off {
            return self.send_one(model, req, fm, &OnceLock::new()).await;
        }
        // One request, with the instant it went on the wire (time on the wire, not waiting
        // for admission, is what a threshold is compared with).
        let send = |sent: Arc<OnceLock<Instant>>| {
            Box::pin(async move { self.send_one(model, req, fm, &sent).await })
        };
        let mut sent = Arc::new(OnceLock::new());
        let mut first = send(sent.clone());
        loop {
            // Until the first is due for a hedge (sent, threshold known and passed, budget
            // left), wait for it, looking again at the threshold or now and then.
            loop {
                let on_wire = sent.get().map_or(Duration::ZERO, Instant::elapsed);
                if super::orphan::orphaned() {
                    // Its statement is gone: the request on the wire finishes, nothing more.
                    return first.await;
                }
                let wait = match (self.hedge_after(fm), sent.get()) {
                    (Some(t), Some(_)) if on_wire < t => t.saturating_sub(on_wire),
                    (Some(_), Some(_)) if self.hedge_allowed() => break,
                    _ => RECHECK,
                }
                .max(Duration::from_millis(1));
                match select(first, Box::pin(tokio::time::sleep(wait))).await {
                    Either::Left((result, _)) => return result,
                    Either::Right(((), pending)) => first = pending,
                }
            }
            self.metrics.hedges.fetch_add(1, Ordering::Relaxed);
            fm.hedges.fetch_add(1, Ordering::Relaxed);
            let hedge_sent = Arc::new(OnceLock::new());
            let hedge = send(hedge_sent.clone());
            match select(first, hedge).await {
                Either::Left((Ok(r), _)) | Either::Right((Ok(r), _)) => return Ok(r),
                // The hedge failed while the first is overdue (that is why it was hedged; a
                // hung connection, most likely): the failure stands and the row's retries
                // take over, instead of waiting for the first until its `timeout_ms`.
                Either::Right((Err(e), _)) => {
                    tracing::debug!(
                        function = %req.function, kind = %e.kind,
                        "the hedge failed; its overdue first is dropped"
                    );
                    return Err(e);
                }
                // The first failed: the hedge is the request now, hedged in its turn if it
                // becomes overdue.
                Either::Left((Err(_), hedge)) => {
                    first = hedge;
                    sent = hedge_sent;
                }
            }
        }
    }
}
