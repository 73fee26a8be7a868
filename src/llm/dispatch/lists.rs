//! List-prompt requests for providers whose protocol takes several prompts per request
//! (`openai_completions`, Lamini, embeddings): prompts of one model, function and completion
//! limit queue for one collector, which forms a request only once the model's governor and
//! the global budget admit one — so under load every request leaves full, and no prompt waits
//! for a list to fill.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::error_outcome;
use super::metrics::OnTheWire;
use super::{FunctionMetrics, Inner, Metrics, ModelHandle};
use crate::llm::governor::Outcome;
use crate::types::{ErrorKind, LlmError, LlmRequest, LlmResponse};

/// Prompts sent in one list share a model, a function and a completion limit.
type ListKey = (usize, String, Option<u32>);

/// The queue of each list key's collector.
pub(super) type ListCollectors = Mutex<HashMap<ListKey, mpsc::UnboundedSender<Pending>>>;

/// A prompt waiting for a place in a list-prompt request.
pub(super) struct Pending {
    req: LlmRequest,
    done: oneshot::Sender<Result<LlmResponse, LlmError>>,
}

/// The next prompt whose caller still waits (a cancelled caller's prompt is not sent).
async fn next_wanted(rx: &mut mpsc::UnboundedReceiver<Pending>) -> Option<Pending> {
    loop {
        let p = rx.recv().await?;
        if !p.done.is_closed() {
            return Some(p);
        }
    }
}

/// Forms and sends the list-prompt requests of one list key.
async fn collect_lists(
    model: ModelHandle,
    global: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    fm: Arc<FunctionMetrics>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    let max = model.provider.max_prompts_per_request().max(1);
    while let Some(first) = next_wanted(&mut rx).await {
        let estimate = first.req.estimated_tokens() * max as u64;
        let admission = model.governor.admit(estimate).await;
        let Ok(permit) = global.clone().acquire_owned().await else {
            // Stopped (Ctrl-C): the waiting prompts are held, not failed, until dropped.
            let _held = (first, rx);
            return std::future::pending().await;
        };
        let mut list = vec![first];
        while list.len() < max {
            match rx.try_recv() {
                Ok(p) if p.done.is_closed() => {}
                Ok(p) => list.push(p),
                Err(_) => break,
            }
        }
        let (model, metrics, fm) = (model.clone(), metrics.clone(), fm.clone());
        tokio::spawn(async move {
            let (reqs, dones): (Vec<LlmRequest>, Vec<_>) =
                list.into_iter().map(|p| (p.req, p.done)).unzip();
            let result = {
                let _wire = OnTheWire::start(&metrics, &fm);
                model.provider.complete_list(&reqs).await
            };
            drop(permit);
            fm.latency.record(admission.started().elapsed());
            admission.finish(match &result {
                Ok(results) => Outcome::Done {
                    tokens: None,
                    rate: results
                        .iter()
                        .find_map(|r| r.as_ref().ok().map(|r| r.rate))
                        .unwrap_or_default(),
                },
                Err(e) => error_outcome(e),
            });
            let results = match result {
                Ok(results) if results.len() == dones.len() => results,
                Ok(results) => {
                    let e = LlmError::new(
                        ErrorKind::MalformedResponse,
                        format!("{} answers for {} prompts", results.len(), dones.len()),
                    );
                    vec![Err(e); dones.len()]
                }
                Err(e) => vec![Err(e); dones.len()],
            };
            for (done, r) in dones.into_iter().zip(results) {
                let _ = done.send(r);
            }
        });
    }
}

impl Inner {
    /// Queues the prompt for a list-prompt request of its model, function and limit.
    pub(super) async fn send_listed(
        &self,
        model: &ModelHandle,
        req: &LlmRequest,
        fm: &Arc<FunctionMetrics>,
    ) -> Result<LlmResponse, LlmError> {
        let key: ListKey = (
            Arc::as_ptr(&model.governor) as usize,
            req.function.clone(),
            req.max_tokens,
        );
        let tx = {
            let mut b = self.list_collectors.lock().unwrap_or_else(|p| p.into_inner());
            b.entry(key)
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(collect_lists(
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
}
