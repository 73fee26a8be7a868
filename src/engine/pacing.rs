//! On a cluster's coordinator: its governors admit every worker's requests, so each model has
//! one limit for the cluster — configured, advertised by the provider, or learned from its
//! refusals by one learner that sees every worker's outcomes.
//!
//! A worker asks for each request it sends ([`crate::cache::Pacing`], served by the
//! coordinator's [`crate::cache::CacheServer`]); the coordinator admits it with the model's
//! governor and keeps the admission as a lease until the worker says how the request ended.
//! A lease a worker never ends (it died, or its answer was lost with its connection) is ended
//! as a failure when the statement runs again, or after [`LEASE_TTL`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;

use crate::cache::{Pacing, held_by_dead};
use crate::config::Config;
use crate::llm::governor::{Admission, Governor, Outcome};
use crate::udf::exec::LlmRuntime;

/// The longest a lease is kept without the worker ending it.
pub(super) const LEASE_TTL: Duration = Duration::from_secs(15 * 60);

/// The keys a worker asks under for model `name` served by `replicas` servers: the model's
/// name, or `NAME#i` for its replica i.
pub(crate) fn pacing_keys(name: &str, replicas: usize) -> Vec<String> {
    if replicas > 1 {
        (0..replicas).map(|i| format!("{name}#{i}")).collect()
    } else {
        vec![name.to_string()]
    }
}

type Lease = (Admission, Instant, Option<String>);

#[derive(Debug, Default)]
struct Leases {
    /// Each lease's admission, when it was given, and to which worker (its URL in the
    /// coordinator's list, when it said).
    held: Mutex<HashMap<u64, Lease>>,
    next: AtomicU64,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Lease>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The coordinator's governors, by the key workers ask under, and the leases they hold.
#[derive(Debug)]
pub(super) struct ClusterPacing {
    governors: BTreeMap<String, Arc<Governor>>,
    leases: Arc<Leases>,
}

impl ClusterPacing {
    /// The governors of `runtime`'s models that the workers share: every model behind a
    /// server that is not each machine's own (`per_worker`).
    pub(super) fn new(config: &Config, runtime: &LlmRuntime) -> ClusterPacing {
        let mut governors = BTreeMap::new();
        for (name, handle) in &runtime.models {
            let Some(m) = config.models.get(name) else {
                continue;
            };
            if m.per_worker() {
                continue;
            }
            match &handle.replicas {
                Some(set) => {
                    let keys = pacing_keys(name, set.replicas().len());
                    for (key, r) in keys.into_iter().zip(set.replicas()) {
                        governors.insert(key, r.governor.clone());
                    }
                }
                None => {
                    governors.insert(name.clone(), handle.governor.clone());
                }
            }
        }
        ClusterPacing {
            governors,
            leases: Arc::default(),
        }
    }

    /// Leases held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.leases.lock().len()
    }
}

impl Pacing for ClusterPacing {
    fn admit(
        &self,
        model: &str,
        tokens: u64,
        (by, patience): (Option<&str>, Duration),
    ) -> BoxFuture<'static, Result<Option<u64>, String>> {
        let Some(governor) = self.governors.get(model).cloned() else {
            let e = format!("the coordinator paces no model {model:?}");
            return futures::future::ready(Err(e)).boxed();
        };
        let leases = self.leases.clone();
        let by = by.map(str::to_string);
        async move {
            // Leases never ended are ended now, as failures.
            leases
                .lock()
                .retain(|_, (_, since, _)| since.elapsed() < LEASE_TTL);
            let Ok(admission) = tokio::time::timeout(patience, governor.admit(tokens)).await else {
                return Ok(None);
            };
            let lease = leases.next.fetch_add(1, Ordering::Relaxed);
            leases.lock().insert(lease, (admission, Instant::now(), by));
            Ok(Some(lease))
        }
        .boxed()
    }

    fn finish(&self, lease: u64, outcome: &Value) {
        let taken = self.leases.lock().remove(&lease);
        if let Some((admission, ..)) = taken {
            admission.finish(Outcome::from_wire(outcome));
        }
    }

    fn end_of(&self, dead: &[&str]) {
        // Dropped outside the lock: an admission ends in its governor.
        let ended: Vec<(u64, Lease)> = self
            .leases
            .lock()
            .extract_if(|_, (.., by)| held_by_dead(by.as_deref(), dead))
            .collect();
        drop(ended);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::governor::GovernorConfig;

    fn pacing(max: usize) -> (ClusterPacing, Arc<Governor>) {
        let g = Arc::new(Governor::new(GovernorConfig {
            max_concurrency: max,
            rpm: None,
            tpm: None,
            adaptive: false,
        }));
        let mut governors = BTreeMap::new();
        governors.insert("m".to_string(), g.clone());
        let p = ClusterPacing {
            governors,
            leases: Arc::default(),
        };
        (p, g)
    }

    #[tokio::test(start_paused = true)]
    async fn workers_share_one_limit_and_a_lease_ends_with_its_request() {
        let (p, g) = pacing(2);
        let a = p
            .admit("m", 10, (None, Duration::from_secs(5)))
            .await
            .unwrap();
        let b = p
            .admit("m", 10, (None, Duration::from_secs(5)))
            .await
            .unwrap();
        assert!(a.is_some() && b.is_some());
        assert_eq!(g.in_flight(), 2);
        // A third waits out its patience (on the paused clock) and is told to ask again.
        let c = p
            .admit("m", 10, (None, Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(c, None);
        p.finish(a.unwrap(), &Outcome::Failed.to_wire());
        assert_eq!(g.in_flight(), 1);
        let d = p
            .admit("m", 10, (None, Duration::from_secs(5)))
            .await
            .unwrap();
        assert!(d.is_some());
        // A statement run again ends the leases of the dead workers and of those that did
        // not say who they are; a live worker's request on the wire keeps its own.
        let live = p
            .admit("m", 10, (Some("http://w2:1/"), Duration::ZERO))
            .await;
        assert_eq!(live.map(|l| l.is_some()), Ok(false), "no room yet");
        p.finish(b.unwrap(), &Outcome::Failed.to_wire());
        let live = p
            .admit("m", 10, (Some("http://w2:1/"), Duration::ZERO))
            .await;
        assert!(live.unwrap().is_some());
        p.end_of(&["http://w1:1/"]);
        assert_eq!((p.held(), g.in_flight()), (1, 1));
        p.end_of(&["http://w2:1/"]);
        assert_eq!((p.held(), g.in_flight()), (0, 0));
        // An unknown model is an error.
        assert!(p.admit("other", 1, (None, Duration::ZERO)).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_never_ended_is_dropped_after_its_time() {
        let (p, g) = pacing(1);
        let lease = p
            .admit("m", 1, (None, Duration::from_secs(1)))
            .await
            .unwrap();
        assert!(lease.is_some());
        assert_eq!(
            p.admit("m", 1, (None, Duration::from_secs(1)))
                .await
                .unwrap(),
            None
        );
        tokio::time::advance(LEASE_TTL).await;
        // The worker never ended it: the next admission ends it, as a failure, and gets its slot.
        let next = p
            .admit("m", 1, (None, Duration::from_secs(1)))
            .await
            .unwrap();
        assert!(next.is_some() && next != lease);
        assert_eq!((p.held(), g.in_flight()), (1, 1));
    }
}
