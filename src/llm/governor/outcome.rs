//! How a request ended, as far as pacing is concerned, and its wire form (a cluster's worker
//! tells the coordinator's governor how each request it admitted ended).

use std::time::Duration;

use serde_json::{Value, json};

use crate::types::{RateLimits, RateWindow};

/// How a request ended, as far as pacing is concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Answered.
    Done {
        /// Prompt + completion tokens reported.
        tokens: Option<u64>,
        /// What the answer advertised.
        rate: RateLimits,
    },
    /// Refused with 429.
    RateLimited {
        /// Server-requested wait.
        retry_after: Option<Duration>,
        /// What the refusal advertised.
        rate: RateLimits,
    },
    /// Any other failure.
    Failed,
}

fn window_wire(w: &RateWindow) -> Value {
    json!({
        "limit": w.limit,
        "remaining": w.remaining,
        "reset_ms": w.reset.map(|d| d.as_millis() as u64),
    })
}

fn window_from(v: &Value) -> RateWindow {
    RateWindow {
        limit: v["limit"].as_u64(),
        remaining: v["remaining"].as_u64(),
        reset: v["reset_ms"].as_u64().map(Duration::from_millis),
    }
}

fn rate_wire(rate: &RateLimits) -> Value {
    json!({ "requests": window_wire(&rate.requests), "tokens": window_wire(&rate.tokens) })
}

fn rate_from(v: &Value) -> RateLimits {
    RateLimits {
        requests: window_from(&v["requests"]),
        tokens: window_from(&v["tokens"]),
    }
}

impl Outcome {
    /// The wire form (JSON).
    pub fn to_wire(self) -> Value {
        match self {
            Outcome::Done { tokens, rate } => {
                json!({ "done": { "tokens": tokens, "rate": rate_wire(&rate) } })
            }
            Outcome::RateLimited { retry_after, rate } => json!({
                "rate_limited": {
                    "retry_after_ms": retry_after.map(|d| d.as_millis() as u64),
                    "rate": rate_wire(&rate),
                }
            }),
            Outcome::Failed => json!("failed"),
        }
    }

    /// From the wire form; anything else reads as [`Outcome::Failed`] (it teaches nothing).
    pub fn from_wire(v: &Value) -> Outcome {
        if let Some(d) = v.get("done") {
            return Outcome::Done {
                tokens: d["tokens"].as_u64(),
                rate: rate_from(&d["rate"]),
            };
        }
        if let Some(r) = v.get("rate_limited") {
            return Outcome::RateLimited {
                retry_after: r["retry_after_ms"].as_u64().map(Duration::from_millis),
                rate: rate_from(&r["rate"]),
            };
        }
        Outcome::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_cross_the_wire_unchanged() {
        let rate = RateLimits {
            requests: RateWindow {
                limit: Some(500),
                remaining: Some(12),
                reset: Some(Duration::from_millis(1500)),
            },
            tokens: RateWindow::default(),
        };
        for o in [
            Outcome::Done {
                tokens: Some(42),
                rate,
            },
            Outcome::RateLimited {
                retry_after: Some(Duration::from_millis(250)),
                rate,
            },
            Outcome::RateLimited {
                retry_after: None,
                rate: RateLimits::default(),
            },
            Outcome::Failed,
        ] {
            assert_eq!(Outcome::from_wire(&o.to_wire()), o);
        }
        assert_eq!(Outcome::from_wire(&json!({"odd": 1})), Outcome::Failed);
    }
}
