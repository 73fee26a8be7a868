//! Several servers (replicas) of one model: each with its own provider and [`Governor`], so
//! each has its own learned limits, and the model's capacity is theirs together.
//!
//! **Routing.** Each attempt goes to one replica, chosen by [`ReplicaSet::pick`] from the
//! request, with prefix affinity: the set remembers which replicas were sent which prompt
//! prefixes (the blocks of [`crate::llm::prefix`], the most recent [`ROUTE_MEMORY`](super::prefix::ROUTE_MEMORY)), and an
//! attempt goes to the least loaded of the replicas sent the longest prefix of its prompt (of
//! [`AFFINITY_MIN_BYTES`] at least) —
//! the ones whose prefix caches most likely hold it — unless that replica's load is over
//! [`AFFINITY_SLACK`] times the mean; otherwise (or when no replica was sent any of it) to the
//! least loaded. Prompts that share only what every replica was sent (a function's fixed
//! instructions) are so spread by load, and siblings that share a passage meet where it was
//! computed. A replica's load is its outstanding attempts (routed to it and not yet done)
//! over its governor's in-flight limit.
//!
//! **Ejection.** A replica whose server refuses connections, resets them, times out or
//! answers 5xx [`EJECT_AFTER`] times in a row is ejected: no attempt is routed to it, and the
//! attempts it holds are abandoned ([`Lease::ejected`]) and sent to the others. After
//! [`PROBE_FIRST`] (doubled after each failed probe, at most [`PROBE_MAX`], on tokio's clock)
//! one attempt probes it; an answer puts it back. With every replica ejected the model is
//! down: [`ReplicaSet::pick`] answers one systemic error naming them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::governor::Governor;
use super::prefix::{BLOCK_BYTES, PrefixHolders, bit, prefix_blocks};
use super::provider::Provider;
use crate::types::{ErrorKind, LlmError, LlmRequest};

/// Failures in a row that eject a replica.
pub(crate) const EJECT_AFTER: u32 = 3;
/// How long an ejected replica rests before it is first probed.
pub(crate) const PROBE_FIRST: Duration = Duration::from_secs(1);
/// The longest rest between probes.
pub(crate) const PROBE_MAX: Duration = Duration::from_secs(60);
/// The preferred replica is passed over when its load exceeds the mean load this many times.
/// A sibling sent elsewhere computes its whole prompt again, which costs more than a few
/// requests' wait: on four compute-bound servers, 1.25 left 1.11 × the prefill work of every
/// distinct prefix computed once, 2.0 (with [`AFFINITY_MIN_BYTES`]) 1.04 ×.
pub(crate) const AFFINITY_SLACK: f64 = 2.0;
/// The shortest prefix a replica must have been sent for a prompt to prefer it (shorter ones,
/// a function's brief fixed opening, are cheap to compute anywhere and would pull every prompt
/// to the first replica that was sent one).
pub(crate) const AFFINITY_MIN_BYTES: usize = 512;

/// Whether a failure is the server's rather than the request's: it counts toward ejection
/// and the attempt is sent to another replica.
pub(crate) fn replica_failure(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Connect | ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::ServerError
    )
}

/// Where a replica stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Takes attempts.
    Up,
    /// Takes none until `until`, then one probe.
    Ejected { until: Instant },
    /// One attempt is probing it.
    Probing,
}

#[derive(Debug)]
struct Health {
    state: State,
    /// Replica failures since its last answer.
    in_a_row: u32,
    /// The rest before the next probe.
    rest: Duration,
}

/// One server of a model.
#[derive(Debug)]
pub(crate) struct Replica {
    /// Its provider (its URL, its key).
    pub provider: Arc<dyn Provider>,
    /// Its governor.
    pub governor: Arc<Governor>,
    /// Its base URL without credentials, query or fragment (for summaries and messages).
    url: String,
    health: Mutex<Health>,
    /// Attempts routed to it and not yet done.
    outstanding: AtomicUsize,
    requests: AtomicU64,
    failures: AtomicU64,
    ejections: AtomicU64,
    /// Bumped at each ejection, to abandon the attempts it holds.
    ejected: watch::Sender<u64>,
}

/// What a summary shows of one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSnapshot {
    /// Its base URL without credentials.
    pub url: String,
    /// Attempts that ended on it (answered or failed; not those abandoned at its ejection).
    pub requests: u64,
    /// Of those, the ones its server failed (connection, timeout, 5xx).
    pub failures: u64,
    /// Times it was ejected.
    pub ejections: u64,
    /// `up`, `ejected` or `probing`.
    pub state: &'static str,
}

impl ReplicaSnapshot {
    /// The snapshot as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "url": self.url, "requests": self.requests, "failures": self.failures,
            "ejected": self.ejections, "state": self.state,
        })
    }
}

/// `url` without user, password, query or fragment.
fn public_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string().trim_end_matches('/').to_string()
        }
        Err(_) => "(invalid URL)".to_string(),
    }
}

impl Replica {
    /// A replica at `base_url` answering through `provider`, paced by `governor`.
    pub fn new(base_url: &str, provider: Arc<dyn Provider>, governor: Arc<Governor>) -> Self {
        Replica {
            provider,
            governor,
            url: public_url(base_url),
            health: Mutex::new(Health {
                state: State::Up,
                in_a_row: 0,
                rest: PROBE_FIRST,
            }),
            outstanding: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            ejected: watch::Sender::new(0),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Outstanding attempts over the in-flight limit.
    fn load(&self) -> f64 {
        self.outstanding.load(Ordering::Relaxed) as f64 / self.governor.limit().max(1) as f64
    }

    /// Rests the replica before its next probe: the first rest, or (`again`, a failed probe)
    /// twice the last.
    fn eject(&self, h: &mut Health, again: bool) {
        h.rest = if again {
            (h.rest * 2).min(PROBE_MAX)
        } else {
            PROBE_FIRST
        };
        h.state = State::Ejected {
            until: Instant::now() + h.rest,
        };
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.ejected.send_modify(|n| *n += 1);
        tracing::warn!(
            "replica {} ejected after {} failures in a row; probed again in {:?}",
            self.url,
            h.in_a_row,
            h.rest
        );
    }

    /// Its snapshot.
    pub fn snapshot(&self) -> ReplicaSnapshot {
        let state = match self.health().state {
            State::Up => "up",
            State::Ejected { .. } => "ejected",
            State::Probing => "probing",
        };
        ReplicaSnapshot {
            url: self.url.clone(),
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            ejections: self.ejections.load(Ordering::Relaxed),
            state,
        }
    }
}

/// The servers of one model.
#[derive(Debug)]
pub(crate) struct ReplicaSet {
    /// The model's name (for messages).
    model: String,
    replicas: Vec<Replica>,
    holders: Mutex<PrefixHolders>,
}

/// What [`ReplicaSet::pick`] found.
#[derive(Debug)]
pub(crate) enum Pick<'a> {
    /// The replica the attempt goes to.
    To(Lease<'a>),
    /// Every replica that is up was tried by this attempt.
    AllTried,
}

/// An attempt routed to one replica: counted in its outstanding work until dropped.
#[derive(Debug)]
pub(crate) struct Lease<'a> {
    replica: &'a Replica,
    index: usize,
    ejected: watch::Receiver<u64>,
    probe: bool,
    reported: bool,
}

/// What became of an attempt's result on its replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The result is the attempt's.
    Stands,
    /// The server failed: send the attempt to another replica.
    Reroute,
}

impl Lease<'_> {
    /// The replica.
    pub fn replica(&self) -> &Replica {
        self.replica
    }

    /// Its index in the model's list.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Waits until the replica is ejected (by other attempts' failures).
    pub async fn ejected(&mut self) {
        if self.ejected.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Tells the replica how the attempt ended.
    pub fn report(&mut self, result: Result<(), &LlmError>) -> Verdict {
        self.reported = true;
        let r = self.replica;
        r.requests.fetch_add(1, Ordering::Relaxed);
        let mut h = r.health();
        match result {
            Err(e) if replica_failure(e.kind) => {
                r.failures.fetch_add(1, Ordering::Relaxed);
                h.in_a_row += 1;
                match h.state {
                    State::Probing => r.eject(&mut h, true),
                    State::Up if h.in_a_row >= EJECT_AFTER => r.eject(&mut h, false),
                    _ => {}
                }
                Verdict::Reroute
            }
            _ => {
                // The server answered: it is up.
                h.in_a_row = 0;
                if h.state == State::Probing {
                    tracing::info!("replica {} answers again", r.url);
                    h.state = State::Up;
                    h.rest = PROBE_FIRST;
                }
                Verdict::Stands
            }
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.replica.outstanding.fetch_sub(1, Ordering::Relaxed);
        if self.probe && !self.reported {
            // A probe abandoned before its answer says nothing: the next attempt probes.
            let mut h = self.replica.health();
            if h.state == State::Probing {
                h.state = State::Ejected {
                    until: Instant::now(),
                };
            }
        }
    }
}

impl ReplicaSet {
    /// The replicas of model `model`, in the configured order.
    pub fn new(model: &str, replicas: Vec<Replica>) -> Self {
        ReplicaSet {
            model: model.to_string(),
            replicas,
            holders: Mutex::default(),
        }
    }

    /// The replicas.
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// The same servers with fresh health and governors made by `governor` (a worker's share
    /// of a cluster run).
    pub fn with_governors(&self, mut governor: impl FnMut() -> Governor) -> ReplicaSet {
        let replicas = self
            .replicas
            .iter()
            .map(|r| Replica::new(&r.url, r.provider.clone(), Arc::new(governor())))
            .collect();
        ReplicaSet::new(&self.model, replicas)
    }

    /// What a summary shows of each replica.
    pub fn snapshot(&self) -> Vec<ReplicaSnapshot> {
        self.replicas.iter().map(Replica::snapshot).collect()
    }

    fn lease(&self, index: usize, probe: bool) -> Lease<'_> {
        let replica = &self.replicas[index];
        replica.outstanding.fetch_add(1, Ordering::Relaxed);
        Lease {
            replica,
            index,
            ejected: replica.ejected.subscribe(),
            probe,
            reported: false,
        }
    }

    /// The replica for an attempt of `req` that has not been to those in `tried`: a replica
    /// due for a probe, else the least loaded of those sent the longest prefix of its prompt
    /// unless it is loaded over [`AFFINITY_SLACK`] times the mean, else the least loaded. With
    /// every replica ejected, the systemic error that names them.
    pub fn pick(&self, req: &LlmRequest, tried: &[usize]) -> Result<Pick<'_>, LlmError> {
        let now = Instant::now();
        let mut up = Vec::with_capacity(self.replicas.len());
        let mut any_up = false;
        for (i, r) in self.replicas.iter().enumerate() {
            let mut h = r.health();
            let fresh = !tried.contains(&i);
            match h.state {
                State::Ejected { until } if until <= now && fresh => {
                    h.state = State::Probing;
                    drop(h);
                    return Ok(Pick::To(self.lease(i, true)));
                }
                State::Up => {
                    any_up = true;
                    if fresh {
                        up.push((i, r.load()));
                    }
                }
                _ => {}
            }
        }
        if !any_up {
            return Err(self.down_error());
        }
        if up.is_empty() {
            return Ok(Pick::AllTried);
        }
        let mean = up.iter().map(|(_, l)| l).sum::<f64>() / up.len() as f64;
        let blocks = prefix_blocks(req);
        let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        let eligible = up.iter().fold(0, |m, (i, _)| m | bit(*i));
        let min_blocks = AFFINITY_MIN_BYTES.div_ceil(BLOCK_BYTES);
        let held = holders.deepest(&blocks, eligible, min_blocks);
        let least_of = |among: &mut dyn Iterator<Item = &(usize, f64)>| {
            let among: Vec<(usize, f64)> = among.copied().collect();
            let least = among.iter().map(|(_, l)| *l).fold(f64::INFINITY, f64::min);
            let ties: Vec<usize> = among
                .iter()
                .filter(|(_, l)| *l <= least)
                .map(|(i, _)| *i)
                .collect();
            (!ties.is_empty()).then(|| (ties[fastrand::usize(..ties.len())], least))
        };
        let preferred = least_of(&mut up.iter().filter(|(i, _)| held & bit(*i) != 0))
            .filter(|(_, load)| *load <= mean * AFFINITY_SLACK);
        let (i, _) = match preferred {
            Some(p) => p,
            None => least_of(&mut up.iter()).unwrap_or((up[0].0, 0.0)),
        };
        holders.record(&blocks, i);
        drop(holders);
        Ok(Pick::To(self.lease(i, false)))
    }

    /// Whether every replica is ejected and none is due for a probe: the model is down, and
    /// retrying a call now cannot reach it.
    pub fn is_down(&self) -> bool {
        let now = Instant::now();
        self.replicas.iter().all(|r| match r.health().state {
            State::Up => false,
            State::Ejected { until } => until > now,
            State::Probing => true,
        })
    }

    /// The error of a model whose replicas are all ejected: systemic, naming them.
    fn down_error(&self) -> LlmError {
        let urls: Vec<&str> = self.replicas.iter().map(|r| r.url.as_str()).collect();
        LlmError::new(
            ErrorKind::Connect,
            format!(
                "every replica of model {:?} is down (ejected after {EJECT_AFTER} failures in \
                 a row: connection refused or reset, timeout or 5xx): {}",
                self.model,
                urls.join(", ")
            ),
        )
    }
}

#[cfg(test)]
mod tests;
