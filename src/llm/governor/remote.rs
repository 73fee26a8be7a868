//! On a cluster's worker: a model's pacing done by the coordinator, so that the model's limit
//! is one limit for the cluster.
//!
//! Every request the worker sends to the model is admitted by the coordinator's governor of
//! that model (`POST /v1/admit`; the coordinator waits up to a few seconds for room, then the
//! worker asks again), and the worker tells it how the request ended (`POST /v1/finish`). So the
//! configured and advertised limits, the pauses and the learned ceiling and pace are those of
//! one governor that sees every worker's requests — not N learners that each find 1/N. A
//! coordinator that cannot be reached is logged once, and the worker paces by its own share
//! of the limits for the rest of the run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::outcome::Outcome;
use crate::cache::SharedCache;

/// Where a worker's governor of one model (or one replica) asks for admissions.
#[derive(Debug)]
pub(crate) struct RemotePacing {
    client: Arc<SharedCache>,
    /// The model's name, `NAME#i` for its replica i.
    key: String,
    /// Set when the coordinator failed: local pacing from then on.
    failed: AtomicBool,
}

impl RemotePacing {
    /// Pacing of `key` by the coordinator behind `client`.
    pub(crate) fn new(client: Arc<SharedCache>, key: String) -> RemotePacing {
        RemotePacing {
            client,
            key,
            failed: AtomicBool::new(false),
        }
    }

    /// Waits until the coordinator admits a request of `tokens`: its lease, or `None` once the
    /// coordinator failed (the caller paces locally).
    pub(super) async fn admit(&self, tokens: u64) -> Option<u64> {
        while !self.failed.load(Ordering::Relaxed) {
            match self.client.admit(&self.key, tokens).await {
                Ok(Some(lease)) => return Some(lease),
                Ok(None) => continue,
                Err(e) => {
                    if !self.failed.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "model {}: {e}; this worker paces it by its own share of the \
                             limits for the rest of the run",
                            self.key
                        );
                    }
                }
            }
        }
        None
    }

    /// Tells the coordinator how the request of `lease` ended, without waiting for it.
    pub(super) fn finish(&self, lease: u64, outcome: Outcome) {
        let client = self.client.clone();
        let outcome = outcome.to_wire();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { client.finish(lease, outcome).await });
        }
    }
}
