//! Provider limits for the test server, as real providers enforce them: a cap on requests in
//! flight, and request and token buckets refilled per minute. Each refuses with 429 and a
//! Retry-After; `x-ratelimit-*` headers (OpenAI's names) go on every answer unless `headers`
//! is off (servers like vLLM behind a proxy send none).
#![allow(dead_code)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limits of a server (none by default).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most requests being processed at once; beyond it, 429 with `retry_after_ms`.
    pub max_in_flight: Option<u64>,
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute, counted when a request arrives: its prompt (bytes / 4) and its
    /// `max_tokens` (256 if unset), as OpenAI counts them.
    pub tpm: Option<u64>,
    /// Seconds of refill a full bucket holds: the burst a fresh client gets.
    pub burst_secs: f64,
    /// Send `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` on every answer.
    pub headers: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_in_flight: None,
            rpm: None,
            tpm: None,
            burst_secs: 1.0,
            headers: true,
        }
    }
}

/// The buckets' levels.
#[derive(Debug)]
pub(crate) struct Buckets {
    state: Mutex<Option<(f64, f64, Instant)>>,
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets {
            state: Mutex::new(None),
        }
    }
}

/// Whether a request may be served, with the headers its answer carries.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Serve it.
    Serve(Vec<(&'static str, String)>),
    /// Refuse it with 429.
    Refuse {
        /// `over_concurrency`, `over_rpm` or `over_tpm` (counted in the stats' faults).
        reason: &'static str,
        /// Retry-After.
        wait: Duration,
        /// Headers of the refusal.
        headers: Vec<(&'static str, String)>,
    },
}

/// A duration as OpenAI writes one: `20ms`, `1.5s`, `6m0s`.
fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}s", (ms as f64 / 1000.0 * 1000.0).round() / 1000.0)
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

impl Limits {
    /// Capacity of a bucket for `per_minute`.
    fn capacity(&self, per_minute: u64) -> f64 {
        (per_minute as f64 / 60.0 * self.burst_secs).max(1.0)
    }

    fn headers_for(&self, req: f64, tok: f64) -> Vec<(&'static str, String)> {
        if !self.headers {
            return vec![];
        }
        let mut h = vec![];
        let mut window = |limit: Option<u64>, level: f64, names: [&'static str; 3]| {
            if let Some(l) = limit {
                let cap = self.capacity(l);
                let reset = Duration::from_secs_f64(((cap - level).max(0.0)) * 60.0 / l as f64);
                h.push((names[0], l.to_string()));
                h.push((names[1], (level.max(0.0) as u64).to_string()));
                h.push((names[2], go_duration(reset)));
            }
        };
        window(
            self.rpm,
            req,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
        );
        window(
            self.tpm,
            tok,
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
        );
        h
    }

    /// Judges a request carrying `tokens` that arrives with `in_flight` being processed
    /// (itself included); `concurrency_wait` is the Retry-After of a concurrency refusal.
    pub(crate) fn admit(
        &self,
        buckets: &Buckets,
        in_flight: u64,
        tokens: f64,
        concurrency_wait: Duration,
    ) -> Verdict {
        let now = Instant::now();
        let mut st = buckets.state.lock().unwrap_or_else(|p| p.into_inner());
        let (req, tok, at) = st.get_or_insert_with(|| {
            (
                self.rpm.map_or(0.0, |r| self.capacity(r)),
                self.tpm.map_or(0.0, |t| self.capacity(t)),
                now,
            )
        });
        let dt = now.duration_since(*at).as_secs_f64();
        *at = now;
        if let Some(r) = self.rpm {
            *req = (*req + dt * r as f64 / 60.0).min(self.capacity(r));
        }
        if let Some(t) = self.tpm {
            *tok = (*tok + dt * t as f64 / 60.0).min(self.capacity(t));
        }
        let refuse = |reason, wait: Duration, req: f64, tok: f64| Verdict::Refuse {
            reason,
            wait,
            headers: self.headers_for(req, tok),
        };
        if self.max_in_flight.is_some_and(|m| in_flight > m) {
            return refuse("over_concurrency", concurrency_wait, *req, *tok);
        }
        if let Some(r) = self.rpm
            && *req < 1.0
        {
            let wait = Duration::from_secs_f64((1.0 - *req) * 60.0 / r as f64);
            return refuse("over_rpm", wait, *req, *tok);
        }
        if let Some(t) = self.tpm {
            let need = tokens.min(self.capacity(t));
            if *tok < need {
                let wait = Duration::from_secs_f64((need - *tok) * 60.0 / t as f64);
                return refuse("over_tpm", wait, *req, *tok);
            }
            *tok -= need;
        }
        if self.rpm.is_some() {
            *req -= 1.0;
        }
        Verdict::Serve(self.headers_for(*req, *tok))
    }
}
