//! Per-model pacing: adaptive concurrency (AIMD), requests-per-minute and tokens-per-minute
//! buckets, and a shared pause when the provider says to wait.
//!
//! Every request to a model passes [`Governor::admit`] before it is sent. The governor lets it
//! through when
//! - fewer requests than the current *adaptive limit* are in flight. The limit starts at the
//!   configured concurrency and is judged once per round trip (a window of as many responses as
//!   the limit): when more than a fifth of the window was refused with 429 the provider is
//!   saturated, so the limit shrinks by 30% and the whole model pauses for the longest
//!   Retry-After of the window; otherwise it grows back by about one per round trip (TCP's AIMD).
//!   A scattering of 429s — a provider refusing a few requests at random — costs only those
//!   requests their own Retry-After, not the whole model's throughput;
//! - the RPM and TPM buckets hold enough (tokens are estimated from the prompt length and
//!   `max_tokens` and corrected when the response reports its usage);
//! - the model is not paused.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Limits for one model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GovernorConfig {
    /// Most requests in flight (the adaptive limit never exceeds it).
    pub max_concurrency: usize,
    /// Requests per minute, if limited.
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute, if limited.
    pub tpm: Option<u64>,
    /// Whether 429s shrink the concurrency limit.
    pub adaptive: bool,
}

#[derive(Debug)]
struct State {
    in_flight: usize,
    /// Current adaptive limit (fractional so that additive increase can be smooth).
    limit: f64,
    /// Responses answered and refused with 429 in the current window (one round trip).
    window_ok: usize,
    window_limited: usize,
    /// Longest Retry-After of the window's 429s.
    window_retry_after: Option<Duration>,
    paused_until: Option<Instant>,
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    /// Lowest adaptive limit reached (reported in metrics).
    min_limit: f64,
}

/// A token bucket refilled continuously at `capacity` per minute.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u64, now: Instant) -> Bucket {
        Bucket {
            capacity: per_minute as f64,
            level: per_minute as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.capacity / 60.0).min(self.capacity);
        self.at = now;
    }

    /// Time until `amount` is available (zero if it is now).
    fn wait_for(&mut self, amount: f64, now: Instant) -> Duration {
        self.refill(now);
        // A request larger than the whole bucket waits for a full bucket, not forever.
        let amount = amount.min(self.capacity);
        if self.level >= amount {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((amount - self.level) * 60.0 / self.capacity)
        }
    }
}

/// The pacing state of one model.
#[derive(Debug)]
pub struct Governor {
    cfg: GovernorConfig,
    state: Mutex<State>,
    changed: Notify,
}

/// Permission to have one request in flight. It is given back when dropped: with the outcome
/// set by [`Admission::finish`], or as a request that ended without one (cancelled, failed)
/// that neither grows nor cuts the limit. No code path can keep a slot it no longer uses.
#[derive(Debug)]
#[must_use]
pub struct Admission {
    governor: Arc<Governor>,
    estimated_tokens: f64,
    started: Instant,
    outcome: Option<Outcome>,
}

impl Admission {
    /// When the request was admitted.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Gives the slot back, adapting the limit to how the request ended.
    pub fn finish(mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let outcome = self.outcome.take().unwrap_or(Outcome::Failed);
        self.governor.release(self.estimated_tokens, outcome);
    }
}

/// How a request ended, as far as pacing is concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Answered; `tokens` is the reported usage if any.
    Done {
        /// Prompt + completion tokens reported.
        tokens: Option<u64>,
    },
    /// Refused with 429; `retry_after` as the provider asked.
    RateLimited {
        /// Server-requested wait.
        retry_after: Option<Duration>,
    },
    /// Any other failure.
    Failed,
}

impl Governor {
    /// A governor with all of `cfg.max_concurrency` available.
    pub fn new(cfg: GovernorConfig) -> Governor {
        let now = Instant::now();
        let max = cfg.max_concurrency.max(1) as f64;
        Governor {
            state: Mutex::new(State {
                in_flight: 0,
                limit: max,
                window_ok: 0,
                window_limited: 0,
                window_retry_after: None,
                paused_until: None,
                rpm: cfg.rpm.map(|r| Bucket::new(r, now)),
                tpm: cfg.tpm.map(|t| Bucket::new(t, now)),
                min_limit: max,
            }),
            cfg,
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current adaptive concurrency limit.
    #[cfg(test)]
    pub fn limit(&self) -> usize {
        self.lock().limit as usize
    }

    /// The lowest adaptive limit reached so far.
    #[cfg(test)]
    pub fn min_limit(&self) -> usize {
        self.lock().min_limit as usize
    }

    /// In flight now (admissions not yet given back).
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Tries to admit now; otherwise returns how long to wait (zero: until a release).
    fn try_admit(self: &Arc<Self>, tokens: f64) -> Result<Admission, Duration> {
        let mut st = self.lock();
        let now = Instant::now();
        if let Some(until) = st.paused_until {
            if until > now {
                return Err(until - now);
            }
            st.paused_until = None;
        }
        if let Some(b) = st.rpm.as_mut() {
            let w = b.wait_for(1.0, now);
            if !w.is_zero() {
                return Err(w);
            }
        }
        if let Some(b) = st.tpm.as_mut() {
            let w = b.wait_for(tokens, now);
            if !w.is_zero() {
                return Err(w);
            }
        }
        if st.in_flight >= (st.limit as usize).max(1) {
            return Err(Duration::ZERO);
        }
        st.in_flight += 1;
        if let Some(b) = st.rpm.as_mut() {
            b.level -= 1.0;
        }
        if let Some(b) = st.tpm.as_mut() {
            b.level -= tokens.min(b.capacity);
        }
        // Room is left: pass the wake-up on, so that waiters fill every free slot.
        if st.in_flight < (st.limit as usize).max(1) {
            self.changed.notify_one();
        }
        Ok(Admission {
            governor: self.clone(),
            estimated_tokens: tokens,
            started: now,
            outcome: None,
        })
    }

    /// Waits until a request estimated at `estimated_tokens` may be sent.
    pub async fn admit(self: &Arc<Self>, estimated_tokens: u64) -> Admission {
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

    /// Gives back an admission's slot and adapts to how the request ended.
    fn release(&self, estimated_tokens: f64, outcome: Outcome) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        let max = self.cfg.max_concurrency.max(1) as f64;
        match outcome {
            Outcome::Done { tokens } => {
                if let (Some(b), Some(t)) = (st.tpm.as_mut(), tokens) {
                    // Correct the estimate with the reported usage.
                    b.level =
                        (b.level + estimated_tokens.min(b.capacity) - t as f64).min(b.capacity);
                }
                st.window_ok += 1;
                if self.cfg.adaptive && st.limit < max {
                    st.limit = (st.limit + 1.0 / st.limit.max(1.0)).min(max);
                }
            }
            Outcome::RateLimited { retry_after } => {
                st.window_limited += 1;
                st.window_retry_after = st.window_retry_after.max(retry_after);
            }
            Outcome::Failed => {}
        }
        // Judge the window once it spans a round trip of the current limit.
        let seen = st.window_ok + st.window_limited;
        if seen >= (st.limit as usize).max(WINDOW_MIN) {
            if st.window_limited as f64 > SATURATED * seen as f64 {
                if self.cfg.adaptive {
                    st.limit = (st.limit * 0.7).max(1.0);
                    st.min_limit = st.min_limit.min(st.limit);
                }
                if let Some(d) = st.window_retry_after {
                    let until = Instant::now() + d;
                    if st.paused_until.is_none_or(|p| p < until) {
                        st.paused_until = Some(until);
                    }
                }
            }
            st.window_ok = 0;
            st.window_limited = 0;
            st.window_retry_after = None;
        }
        drop(st);
        // One slot is free: wake one waiter (it passes the wake-up on while room is left).
        self.changed.notify_one();
    }
}

/// Fewest responses a window judges.
const WINDOW_MIN: usize = 8;

/// Share of 429s in a window above which the provider is saturated.
const SATURATED: f64 = 0.2;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn cfg(max: usize) -> GovernorConfig {
        GovernorConfig {
            max_concurrency: max,
            rpm: None,
            tpm: None,
            adaptive: true,
        }
    }

    #[tokio::test]
    async fn limits_in_flight_and_wakes_waiters() {
        let g = Arc::new(Governor::new(cfg(2)));
        let a = g.admit(1).await;
        let b = g.admit(1).await;
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.admit(1).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "a third request waits");
        a.finish(Outcome::Done { tokens: None });
        let c = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
        b.finish(Outcome::Failed);
        c.finish(Outcome::Failed);
    }

    async fn window(g: &Arc<Governor>, n: usize, limited: usize, retry_after: Option<Duration>) {
        let mut adms = vec![];
        for _ in 0..n {
            adms.push(g.admit(1).await);
        }
        for (i, a) in adms.into_iter().enumerate() {
            let outcome = if i < limited {
                Outcome::RateLimited { retry_after }
            } else {
                Outcome::Done { tokens: None }
            };
            a.finish(outcome);
        }
    }

    #[tokio::test]
    async fn saturation_shrinks_once_per_round_trip_scattered_429s_do_not() {
        let g = Arc::new(Governor::new(cfg(100)));
        // A round trip with 30% refused: saturated, cut by 30%.
        window(&g, 100, 30, None).await;
        assert_eq!(g.limit(), 70);
        // 5% refused at random: not saturation, the limit keeps growing.
        window(&g, 70, 3, None).await;
        assert!(g.limit() >= 70, "not cut: {}", g.limit());
        // About one step per round trip of `limit` requests: back to the maximum.
        for _ in 0..4000 {
            let a = g.admit(1).await;
            a.finish(Outcome::Done { tokens: None });
        }
        assert_eq!(g.limit(), 100, "recovers to the configured maximum");
        assert_eq!(g.min_limit(), 70);
    }

    #[tokio::test]
    async fn saturated_windows_pause_the_model_for_retry_after() {
        let g = Arc::new(Governor::new(cfg(8)));
        window(&g, 8, 8, Some(Duration::from_millis(150))).await;
        let t = Instant::now();
        let b = g.admit(1).await;
        assert!(
            t.elapsed() >= Duration::from_millis(140),
            "{:?}",
            t.elapsed()
        );
        b.finish(Outcome::Done { tokens: None });
        // One 429 in eight pauses nobody.
        let g = Arc::new(Governor::new(cfg(8)));
        window(&g, 8, 1, Some(Duration::from_millis(500))).await;
        let t = Instant::now();
        let b = g.admit(1).await;
        assert!(t.elapsed() < Duration::from_millis(50));
        b.finish(Outcome::Done { tokens: None });
    }

    #[tokio::test]
    async fn rpm_and_tpm_buckets_pace_requests() {
        // 600 requests per minute = one per 100 ms once the bucket is empty.
        let g = Arc::new(Governor::new(GovernorConfig {
            rpm: Some(600),
            ..cfg(1000)
        }));
        for _ in 0..600 {
            let a = g.admit(1).await;
            a.finish(Outcome::Done { tokens: None });
        }
        let t = Instant::now();
        let a = g.admit(1).await;
        a.finish(Outcome::Done { tokens: None });
        assert!(
            t.elapsed() >= Duration::from_millis(80),
            "{:?}",
            t.elapsed()
        );

        // 6,000 tokens per minute: a 500-token request after the bucket is spent waits ~5 s;
        // reported usage smaller than the estimate gives the difference back.
        let g = Arc::new(Governor::new(GovernorConfig {
            tpm: Some(6000),
            ..cfg(1000)
        }));
        let a = g.admit(6000).await;
        a.finish(Outcome::Done { tokens: Some(5900) });
        let t = Instant::now();
        let a = g.admit(100).await;
        assert!(t.elapsed() < Duration::from_millis(50), "refund made room");
        a.finish(Outcome::Done { tokens: Some(100) });
    }

    #[tokio::test]
    async fn a_dropped_admission_gives_its_slot_back() {
        let g = Arc::new(Governor::new(cfg(1)));
        let a = g.admit(1).await;
        assert_eq!(g.in_flight(), 1);
        drop(a);
        assert_eq!(g.in_flight(), 0);
        // A request cancelled while it waits for admission takes nothing.
        let held = g.admit(1).await;
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.admit(1).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiter.abort();
        let _ = waiter.await;
        held.finish(Outcome::Done { tokens: None });
        assert_eq!(g.in_flight(), 0);
        let again = tokio::time::timeout(Duration::from_secs(1), g.admit(1)).await;
        assert!(again.is_ok(), "the slot is free");
    }
}
