//! What a provider says about its rate limits on an answer (OpenAI's `x-ratelimit-*`,
//! Anthropic's `anthropic-ratelimit-*` headers), as the governor paces by it.

use std::time::Duration;

/// One limit the provider advertises: its size, what is left of it now, and when it is whole
/// again.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateWindow {
    /// The limit per minute (`x-ratelimit-limit-*`).
    pub limit: Option<u64>,
    /// What is left now (`x-ratelimit-remaining-*`).
    pub remaining: Option<u64>,
    /// Time until the limit is fully replenished (`x-ratelimit-reset-*`).
    pub reset: Option<Duration>,
}

impl RateWindow {
    /// Whether the answer carried anything of this window.
    pub fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset.is_none()
    }
}

/// The request and token limits an answer advertised.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimits {
    /// Requests per minute.
    pub requests: RateWindow,
    /// Tokens per minute.
    pub tokens: RateWindow,
}

impl RateLimits {
    /// Whether the answer advertised no limit at all.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.tokens.is_empty()
    }
}
