//! Per-model pacing: what the provider advertises, what it was configured to allow, and what
//! the governor learned from its refusals.
//!
//! Every request to a model passes [`Governor::admit`] before it is sent. The governor lets it
//! through when
//! - the model is not paused. A pause concerns the whole model only when the provider says the
//!   whole key is spent (`x-ratelimit-remaining-* = 0`: until the advertised reset), or after a
//!   burst of refusals in one round trip (for a round trip or two). Any other 429 delays only
//!   the refused request, by its own Retry-After;
//! - the request and token buckets hold enough: configured `rpm` / `tpm`, or the limits the
//!   provider advertises (`x-ratelimit-limit-*`), their level kept at what it says remains
//!   (`x-ratelimit-remaining-*`, less half of what is in flight and not yet counted), so the
//!   run is paced under the limit before any refusal;
//! - fewer requests than the limit are in flight, and the learned pace allows one
//!   ([`learn`]: a concurrency cap or a rate the provider enforces without saying so).
//!
//! Token estimates (prompt length and `max_tokens`) are corrected with the reported usage.
//!
//! Time is tokio's clock (`tokio::time::Instant`; waits are tokio timers): in a run it is the
//! monotonic clock, and tests pause it (`start_paused`) to assert every wait exactly.

mod bucket;
mod learn;
mod outcome;
mod remote;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::types::{RateLimits, RateWindow};
use bucket::Bucket;
pub use learn::Kind as LimitKind;
use learn::Learner;
pub use outcome::Outcome;
pub(crate) use remote::RemotePacing;

/// Limits for one model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GovernorConfig {
    /// Most requests in flight (the learned limit never exceeds it).
    pub max_concurrency: usize,
    /// Requests per minute, if limited.
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute, if limited.
    pub tpm: Option<u64>,
    /// Whether the governor learns limits from refusals.
    pub adaptive: bool,
}

/// The longest a model is paused on the provider's word.
const MAX_PAUSE: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct State {
    in_flight: usize,
    paused_until: Option<Instant>,
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    /// Whether the provider advertises its token limit (then its word corrects the level,
    /// not the reported usage).
    tokens_advertised: bool,
    /// Slots of requests refused before any was answered, kept from new requests until the
    /// refusals are judged (they are counted in `in_flight`).
    held: usize,
    learner: Learner,
}

/// The pacing state of one model.
#[derive(Debug)]
pub struct Governor {
    cfg: GovernorConfig,
    state: Mutex<State>,
    changed: Notify,
    /// On a cluster's worker: the coordinator admits this model's requests (its governor is
    /// the cluster's); this one paces only if the coordinator cannot be reached.
    remote: Option<RemotePacing>,
}

/// Permission to have one request in flight. It is given back when dropped: with the outcome
/// set by [`Admission::finish`], or as a request that ended without one (cancelled, failed)
/// that teaches the governor nothing. No code path can keep a slot it no longer uses.
#[derive(Debug)]
#[must_use]
pub struct Admission {
    governor: Arc<Governor>,
    estimated_tokens: f64,
    started: Instant,
    /// Requests in flight when it was admitted, itself included.
    level: usize,
    outcome: Option<Outcome>,
    /// The coordinator's lease, for a request it admitted.
    lease: Option<u64>,
}

impl Admission {
    /// When the request was admitted.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Gives the slot back, learning from how the request ended.
    pub fn finish(mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let outcome = self.outcome.take().unwrap_or(Outcome::Failed);
        match (self.lease, &self.governor.remote) {
            (Some(lease), Some(remote)) => remote.finish(lease, outcome),
            _ => self.governor.release(self, outcome),
        }
    }
}

impl Governor {
    /// A governor with all of `cfg.max_concurrency` available.
    pub fn new(cfg: GovernorConfig) -> Governor {
        let now = Instant::now();
        Governor {
            state: Mutex::new(State {
                in_flight: 0,
                paused_until: None,
                rpm: cfg.rpm.map(|r| Bucket::per_minute(r, now)),
                tpm: cfg.tpm.map(|t| Bucket::per_minute(t, now)),
                tokens_advertised: false,
                held: 0,
                learner: Learner::new(now),
            }),
            cfg,
            changed: Notify::new(),
            remote: None,
        }
    }

    /// A governor whose requests the coordinator of a cluster admits (`remote`), pacing by
    /// `cfg` only if the coordinator cannot be reached.
    pub(crate) fn paced_by(cfg: GovernorConfig, remote: RemotePacing) -> Governor {
        Governor {
            remote: Some(remote),
            ..Governor::new(cfg)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn max(&self) -> usize {
        self.cfg.max_concurrency.max(1)
    }

    /// The in-flight limit now (the learned ceiling under the configured concurrency).
    pub fn limit(&self) -> usize {
        self.lock().learner.limit(self.max())
    }

    /// The learned pace in requests per second, if the provider's refusals taught one.
    pub fn pace(&self) -> Option<f64> {
        self.lock().learner.pace.as_ref().map(|p| p.rate)
    }

    /// The kind of limit the provider's refusals showed, if they showed one.
    pub fn limit_kind(&self) -> Option<LimitKind> {
        self.lock().learner.kind
    }

    /// Saturated round trips so far.
    pub fn saturations(&self) -> u64 {
        self.lock().learner.saturations
    }

    /// In flight now (admissions not yet given back).
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Tries to admit now; otherwise returns how long to wait (zero: until a release).
    fn try_admit(self: &Arc<Self>, tokens: f64) -> Result<Admission, Duration> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let now = Instant::now();
        if let Some(until) = st.paused_until {
            if until > now {
                return Err(until - now);
            }
            st.paused_until = None;
        }
        let limit = st.learner.limit(self.max());
        if st.in_flight >= limit {
            return Err(Duration::ZERO);
        }
        let waits = [
            st.rpm.as_mut().map(|b| b.wait_for(1.0, now)),
            st.tpm.as_mut().map(|b| b.wait_for(tokens, now)),
            st.learner.pace.as_mut().map(|b| b.wait_for(1.0, now)),
        ];
        if let Some(w) = waits.into_iter().flatten().max().filter(|w| !w.is_zero()) {
            return Err(w);
        }
        st.in_flight += 1;
        st.learner.sent();
        for b in [st.rpm.as_mut(), st.learner.pace.as_mut()]
            .into_iter()
            .flatten()
        {
            b.take(1.0);
        }
        if let Some(b) = st.tpm.as_mut() {
            b.take(tokens);
        }
        // Room is left: pass the wake-up on, so that waiters fill every free slot.
        if st.in_flight < limit {
            self.changed.notify_one();
        }
        Ok(Admission {
            governor: self.clone(),
            estimated_tokens: tokens,
            started: now,
            level: st.in_flight,
            outcome: None,
            lease: None,
        })
    }

    /// Waits until a request estimated at `estimated_tokens` may be sent.
    pub async fn admit(self: &Arc<Self>, estimated_tokens: u64) -> Admission {
        if let Some(remote) = &self.remote
            && let Some(lease) = remote.admit(estimated_tokens).await
        {
            return Admission {
                governor: self.clone(),
                estimated_tokens: estimated_tokens as f64,
                started: Instant::now(),
                level: 0,
                outcome: None,
                lease: Some(lease),
            };
        }
        let tokens = estimated_tokens as f64;
        loop {
            // Fast path: no waiting, no registration.
            if let Ok(a) = self.try_admit(tokens) {
                return a;
            }
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Check again now that a release cannot be missed.
            let wait = match self.try_admit(tokens) {
                Ok(a) => return a,
                Err(w) => w,
            };
            if wait.is_zero() {
                // Full: wait for a release.
                notified.await;
            } else {
                // Paused or out of budget: wait for the time, or an earlier change.
                let _ = tokio::time::timeout(wait, notified).await;
            }
        }
    }

    /// Gives back an admission's slot and learns from how the request ended.
    fn release(&self, adm: &Admission, outcome: Outcome) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let now = Instant::now();
        // Before the provider has answered anything, a refused request's slot is not given
        // to another request until the refusals are judged: at a cap every such request is
        // refused too (traced: 14 more refusals over a 32-in-flight cap from 64).
        let hold = self.cfg.adaptive
            && !st.learner.answered()
            && matches!(outcome, Outcome::RateLimited { .. });
        if hold {
            st.held += 1;
        } else {
            st.in_flight = st.in_flight.saturating_sub(1);
        }
        let mut judged = false;
        match outcome {
            Outcome::Done { tokens, rate } => {
                if let (Some(b), Some(t), false) = (st.tpm.as_mut(), tokens, st.tokens_advertised) {
                    // Correct the estimate with the reported usage.
                    b.give(adm.estimated_tokens.min(b.capacity) - t as f64);
                }
                self.heed(st, &rate, now);
                st.learner.ok(adm.started, now);
            }
            Outcome::RateLimited { retry_after, rate } => {
                self.heed(st, &rate, now);
                st.learner.refused(adm.started, adm.level, retry_after, now);
            }
            Outcome::Failed => {}
        }
        if self.cfg.adaptive {
            let window = st.learner.limit(self.max());
            if let Some(pause) = st.learner.judge(window, now) {
                pause_until(st, now + pause);
                judged = true;
            }
            st.learner.probe(self.max(), now);
        }
        // Held slots come back once the refusals are judged, once anything is answered, or
        // when nothing else is in flight to answer.
        if st.held > 0 && (judged || st.learner.answered() || st.in_flight == st.held) {
            st.in_flight = st.in_flight.saturating_sub(st.held);
            st.held = 0;
        }
        drop(guard);
        // One slot is free: wake one waiter (it passes the wake-up on while room is left).
        self.changed.notify_one();
    }

    /// Takes in what the provider advertised: its limits size the buckets, what remains
    /// keeps their level, and a spent limit pauses the model until it resets.
    fn heed(&self, st: &mut State, rate: &RateLimits, now: Instant) {
        let uncounted = st.in_flight as f64 / 2.0;
        heed_window(&mut st.rpm, &rate.requests, self.cfg.rpm, uncounted, now);
        heed_window(&mut st.tpm, &rate.tokens, self.cfg.tpm, 0.0, now);
        if rate.tokens.limit.is_some() || rate.tokens.remaining.is_some() {
            st.tokens_advertised = true;
        }
        for w in [&rate.requests, &rate.tokens] {
            if w.remaining == Some(0) {
                let reset = w.reset.unwrap_or(Duration::from_secs(1)).min(MAX_PAUSE);
                pause_until(st, now + reset);
            }
        }
    }
}

fn pause_until(st: &mut State, until: Instant) {
    if st.paused_until.is_none_or(|p| p < until) {
        st.paused_until = Some(until);
    }
}

/// One advertised window applied to its bucket: created or resized from the advertised
/// limit (never above a configured one), its level kept at what remains less `uncounted`.
fn heed_window(
    bucket: &mut Option<Bucket>,
    w: &RateWindow,
    configured: Option<u64>,
    uncounted: f64,
    now: Instant,
) {
    if let Some(limit) = w.limit.filter(|l| *l > 0) {
        let limit = configured.map_or(limit, |c| c.min(limit));
        match bucket.as_mut() {
            Some(b) if (b.capacity - limit as f64).abs() >= 1.0 => b.set_per_minute(limit, now),
            Some(_) => {}
            None => *bucket = Some(Bucket::per_minute(limit, now)),
        }
    }
    if let (Some(b), Some(remaining)) = (bucket.as_mut(), w.remaining) {
        b.sync(remaining as f64 - uncounted, now);
    }
}

#[cfg(test)]
pub(crate) mod tests;
