//! One request for one prompt on the wire: the model's governor, the global concurrency budget
//! and the budget reservation are taken in that order, held while it is out, and given back
//! on drop; the answer (or error) is told to the governor.

use tokio::time::Instant;

use super::call::{ModelHandle, error_outcome};
use super::inner::Inner;
use super::metrics::{FunctionMetrics, OnTheWire};
use super::orphan::OnWire;
use super::route::routed;
use crate::llm::governor::Outcome;
use crate::types::{LlmError, LlmRequest, LlmResponse};

impl Inner {
    /// One request for one prompt: governor, global budget, the run's budgets, provider. Each
    /// is held while the request is on the wire and given back on drop. `sent` is set when the
    /// request goes on the wire.
    pub(super) async fn send_one(
        &self,
        model: &ModelHandle,
        req: &LlmRequest,
        fm: &FunctionMetrics,
        sent: &std::sync::OnceLock<Instant>,
    ) -> Result<LlmResponse, LlmError> {
        routed(model, req, |m| async move {
            self.send_on(&m, req, fm, sent).await
        })
        .await
    }

    /// [`Inner::send_one`] on one server of the model: its governor, the global budget, the
    /// run's budgets, its provider.
    async fn send_on(
        &self,
        model: &ModelHandle,
        req: &LlmRequest,
        fm: &FunctionMetrics,
        sent: &std::sync::OnceLock<Instant>,
    ) -> Result<LlmResponse, LlmError> {
        // The model's governor first (pauses, buckets, adaptive limit), then the global budget,
        // so that a paused model never holds permits other models could use; then the run's
        // budgets, which only requests about to go on the wire hold (not those waiting).
        let usage = req.estimated_usage();
        let admission = model
            .governor
            .admit(usage.prompt_tokens + usage.completion_tokens)
            .await;
        let Ok(_global) = self.global.acquire().await else {
            // Stopped (Ctrl-C): nothing more is sent, and nothing fails because of it.
            return std::future::pending().await;
        };
        let _reservation = self.reserve_budget(model, usage).await?;
        self.waiting.sent();
        let _ = sent.set(Instant::now());
        let result = {
            let _wire = (OnTheWire::start(&self.metrics, fm), OnWire::enter());
            model.provider.complete(req).await
        };
        fm.latency.record(admission.started().elapsed());
        admission.finish(match &result {
            Ok(r) => Outcome::Done {
                tokens: r.usage.map(|u| u.prompt_tokens + u.completion_tokens),
                rate: r.rate,
            },
            Err(e) => error_outcome(e),
        });
        result
    }
}
