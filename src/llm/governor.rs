//! Per-model pacing: adaptive concurrency (AIMD), requests-per-minute and tokens-per-minute
//! buckets, and a shared pause when the provider says to wait.
//!
//! Every request to a model passes [`Governor::admit`] before it is sent. The governor lets it
//! through when
//! - fewer requests than the current *adaptive limit* are in flight (the limit starts at the
//!   configured concurrency, shrinks multiplicatively on a 429 and grows back by about one per
//!   round trip on success — TCP's AIMD, so a rate-limited provider is not hammered and a
//!   recovered one is filled again);
//! - the RPM and TPM buckets hold enough (tokens are estimated from the prompt length and
//!   `max_tokens` and corrected when the response reports its usage);
//! - the model is not paused: a 429 with Retry-After, or rate-limit headers saying the quota is
//!   spent, pause *every* request to that model until then, not only the one that was refused.

use std::sync::Mutex;
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
    /// Lowest limit since the last 429 decrease, to decrease at most once per round trip.
    last_decrease: Option<Instant>,
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

/// Permission to have one request in flight; give it back with [`Governor::release`].
#[derive(Debug)]
#[must_use]
pub struct Admission {
    estimated_tokens: f64,
    started: Instant,
}

impl Admission {
    /// When the request was admitted.
    pub fn started(&self) -> Instant {
        self.started
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
                last_decrease: None,
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
    pub fn limit(&self) -> usize {
        self.lock().limit as usize
    }

    /// The lowest adaptive limit reached so far.
    pub fn min_limit(&self) -> usize {
        self.lock().min_limit as usize
    }

    /// Waits until a request estimated at `estimated_tokens` may be sent.
    pub async fn admit(&self, estimated_tokens: u64) -> Admission {
        let tokens = estimated_tokens as f64;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = {
                let mut st = self.lock();
                let now = Instant::now();
                let mut wait = Duration::ZERO;
                if let Some(until) = st.paused_until {
                    if until > now {
                        wait = until - now;
                    } else {
                        st.paused_until = None;
                    }
                }
                if wait.is_zero()
                    && let Some(b) = st.rpm.as_mut()
                {
                    wait = b.wait_for(1.0, now);
                }
                if wait.is_zero()
                    && let Some(b) = st.tpm.as_mut()
                {
                    wait = b.wait_for(tokens, now);
                }
                if wait.is_zero() && st.in_flight < (st.limit as usize).max(1) {
                    st.in_flight += 1;
                    if let Some(b) = st.rpm.as_mut() {
                        b.level -= 1.0;
                    }
                    if let Some(b) = st.tpm.as_mut() {
                        b.level -= tokens.min(b.capacity);
                    }
                    return Admission {
                        estimated_tokens: tokens,
                        started: now,
                    };
                }
                wait
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

    /// Gives back an admission and adapts to how the request ended.
    pub fn release(&self, adm: Admission, outcome: Outcome) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        let now = Instant::now();
        let max = self.cfg.max_concurrency.max(1) as f64;
        match outcome {
            Outcome::Done { tokens } => {
                if let (Some(b), Some(t)) = (st.tpm.as_mut(), tokens) {
                    // Correct the estimate with the reported usage.
                    b.level =
                        (b.level + adm.estimated_tokens.min(b.capacity) - t as f64).min(b.capacity);
                }
                if self.cfg.adaptive && st.limit < max {
                    st.limit = (st.limit + 1.0 / st.limit.max(1.0)).min(max);
                }
            }
            Outcome::RateLimited { retry_after } => {
                if self.cfg.adaptive {
                    // Decrease at most once per round trip: 429s of requests sent before the
                    // last decrease say nothing new.
                    let fresh = st.last_decrease.is_none_or(|t| adm.started > t);
                    if fresh {
                        st.limit = (st.limit * 0.7).max(1.0);
                        st.min_limit = st.min_limit.min(st.limit);
                        st.last_decrease = Some(now);
                    }
                }
                if let Some(d) = retry_after {
                    let until = now + d;
                    if st.paused_until.is_none_or(|p| p < until) {
                        st.paused_until = Some(until);
                    }
                }
            }
            Outcome::Failed => {}
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Pauses the model until `until` (rate-limit headers said the quota is spent).
    pub fn pause_until(&self, until: Instant) {
        let mut st = self.lock();
        if st.paused_until.is_none_or(|p| p < until) {
            st.paused_until = Some(until);
        }
    }
}

/// Estimated tokens of a request: about four characters per token for the prompt, plus the
/// completion limit.
pub fn estimate_tokens(prompt_chars: usize, max_tokens: Option<u32>) -> u64 {
    (prompt_chars as u64).div_ceil(4) + u64::from(max_tokens.unwrap_or(256))
}

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
        g.release(a, Outcome::Done { tokens: None });
        let c = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
        g.release(b, Outcome::Failed);
        g.release(c, Outcome::Failed);
    }

    #[tokio::test]
    async fn rate_limits_shrink_once_per_round_trip_and_recover() {
        let g = Governor::new(cfg(100));
        let mut adms = vec![];
        for _ in 0..10 {
            adms.push(g.admit(1).await);
        }
        // Ten 429s of requests sent together count as one signal.
        for a in adms {
            g.release(a, Outcome::RateLimited { retry_after: None });
        }
        assert_eq!(g.limit(), 70);
        let a = g.admit(1).await;
        g.release(a, Outcome::RateLimited { retry_after: None });
        assert_eq!(g.limit(), 49);
        // About one step per round trip of `limit` requests: (100² - 49²) / 2 ≈ 3,800.
        for _ in 0..4000 {
            let a = g.admit(1).await;
            g.release(a, Outcome::Done { tokens: None });
        }
        assert_eq!(g.limit(), 100, "recovers to the configured maximum");
        assert_eq!(g.min_limit(), 49);
    }

    #[tokio::test]
    async fn retry_after_pauses_every_request_of_the_model() {
        let g = Governor::new(cfg(8));
        let a = g.admit(1).await;
        g.release(
            a,
            Outcome::RateLimited {
                retry_after: Some(Duration::from_millis(150)),
            },
        );
        let t = Instant::now();
        let b = g.admit(1).await;
        assert!(
            t.elapsed() >= Duration::from_millis(140),
            "{:?}",
            t.elapsed()
        );
        g.release(b, Outcome::Done { tokens: None });
    }

    #[tokio::test]
    async fn rpm_and_tpm_buckets_pace_requests() {
        // 600 requests per minute = one per 100 ms once the bucket is empty.
        let g = Governor::new(GovernorConfig {
            rpm: Some(600),
            ..cfg(1000)
        });
        for _ in 0..600 {
            let a = g.admit(1).await;
            g.release(a, Outcome::Done { tokens: None });
        }
        let t = Instant::now();
        let a = g.admit(1).await;
        g.release(a, Outcome::Done { tokens: None });
        assert!(
            t.elapsed() >= Duration::from_millis(80),
            "{:?}",
            t.elapsed()
        );

        // 6,000 tokens per minute: a 500-token request after the bucket is spent waits ~5 s;
        // reported usage smaller than the estimate gives the difference back.
        let g = Governor::new(GovernorConfig {
            tpm: Some(6000),
            ..cfg(1000)
        });
        let a = g.admit(6000).await;
        g.release(a, Outcome::Done { tokens: Some(5900) });
        let t = Instant::now();
        let a = g.admit(100).await;
        assert!(t.elapsed() < Duration::from_millis(50), "refund made room");
        g.release(a, Outcome::Done { tokens: Some(100) });
    }

    #[test]
    fn estimates_tokens_from_prompt_and_limit() {
        assert_eq!(estimate_tokens(400, Some(50)), 150);
        assert_eq!(estimate_tokens(0, None), 256);
    }
}
