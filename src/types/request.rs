//! A request to a model and its answer.

use std::sync::Arc;

use super::rate::RateLimits;
use super::schema::OutputSchema;

/// A rendered request: system and user message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RenderedPrompt {
    /// System message, if any.
    pub system: Option<String>,
    /// User message.
    pub user: String,
    /// Where the user message may be cut for a provider's prompt cache (none: zeros).
    pub cuts: PromptCuts,
}

/// Byte offsets into a prompt's user message where what its calls share ends, for providers
/// whose prompt cache is marked by the client (Anthropic's `cache_control`); 0 where unknown.
/// Set for templates that are plain text and `{{ arg }}` substitutions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PromptCuts {
    /// The end of the opening every call of the function shares: the template's text before
    /// its first argument.
    pub common: usize,
    /// The start of the function's last argument (its first substitution): the opening a
    /// row shares with the rows whose other arguments are the same — a passage asked several
    /// questions, the question last.
    pub row: usize,
}

/// One request to a model.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    /// Function name (names the schema for providers that want one).
    pub function: String,
    /// Rendered messages.
    pub prompt: RenderedPrompt,
    /// Generation limit.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Structured output, if declared.
    pub schema: Option<Arc<OutputSchema>>,
    /// Whether the answer's confidence is asked for (its tokens' log-probabilities): a stage
    /// of a model cascade that may pass the row on.
    pub confidence: bool,
}

impl LlmRequest {
    /// Tokens this request may cost before the provider reports usage: prompt length (system
    /// and user) and the completion limit; see [`estimate_tokens`].
    pub fn estimated_tokens(&self) -> u64 {
        let u = self.estimated_usage();
        u.prompt_tokens + u.completion_tokens
    }

    /// The prompt and completion parts of [`LlmRequest::estimated_tokens`].
    pub fn estimated_usage(&self) -> Usage {
        let chars = self.prompt.user.len() + self.prompt.system.as_ref().map_or(0, String::len);
        let total = estimate_tokens(chars, self.max_tokens);
        let completion = u64::from(self.max_tokens.unwrap_or(256));
        Usage {
            prompt_tokens: total - completion,
            completion_tokens: completion,
            cached_prompt_tokens: 0,
            cache_write_tokens: 0,
        }
    }
}

/// Estimated tokens of a request: about four characters per token for the prompt, plus the
/// completion limit.
pub fn estimate_tokens(prompt_chars: usize, max_tokens: Option<u32>) -> u64 {
    (prompt_chars as u64).div_ceil(4) + u64::from(max_tokens.unwrap_or(256))
}

/// Token usage reported by a provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// The part of `prompt_tokens` the server did not compute because it held their prefix
    /// (its prompt cache); never more than `prompt_tokens`.
    pub cached_prompt_tokens: u64,
    /// The part of `prompt_tokens` written to the server's prompt cache, billed at the cache
    /// write price (Anthropic's `cache_creation_input_tokens`); never more than the uncached
    /// prompt tokens.
    pub cache_write_tokens: u64,
}

impl Usage {
    /// Usage of `prompt` tokens (of which `cached` came from the server's prompt cache, clamped
    /// to `prompt`) and `completion` tokens.
    pub fn new(prompt: u64, completion: u64, cached: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_prompt_tokens: cached.min(prompt),
            cache_write_tokens: 0,
        }
    }

    /// This usage with `written` of its uncached prompt tokens written to the server's prompt
    /// cache (clamped to them).
    pub fn with_cache_writes(mut self, written: u64) -> Usage {
        self.cache_write_tokens = written.min(self.uncached_prompt_tokens());
        self
    }

    /// The prompt tokens the server computed (not taken from its prompt cache).
    pub fn uncached_prompt_tokens(&self) -> u64 {
        self.prompt_tokens - self.cached_prompt_tokens.min(self.prompt_tokens)
    }

    /// This usage split evenly over `n` requests (at least 1), the cached part kept within
    /// each share's prompt tokens.
    pub fn share(&self, n: u64) -> Usage {
        let n = n.max(1);
        Usage::new(
            self.prompt_tokens / n,
            self.completion_tokens / n,
            self.cached_prompt_tokens / n,
        )
        .with_cache_writes(self.cache_write_tokens / n)
    }
}

/// A provider's answer before validation.
#[derive(Debug, Clone, Default)]
pub struct LlmResponse {
    /// Message content.
    pub content: String,
    /// `finish_reason` (`stop`, `length`, ...).
    pub finish_reason: Option<String>,
    /// Token usage, if reported.
    pub usage: Option<Usage>,
    /// The rate limits the answer advertised (empty when it advertised none).
    pub rate: RateLimits,
    /// The answer's confidence when it was asked for and the server gave its tokens'
    /// log-probabilities: the probability of its least likely token, in [0, 1].
    pub confidence: Option<f64>,
}

/// The confidence of an answer whose tokens had log-probabilities `logprobs`: the probability
/// of the least likely one (1 for an answer of no tokens); NaN or positive values count as 0 and
/// 1.
pub fn confidence_of(logprobs: impl IntoIterator<Item = f64>) -> f64 {
    logprobs
        .into_iter()
        .map(|l| if l.is_nan() { 0.0 } else { l.min(0.0).exp() })
        .fold(1.0, f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_tokens_stay_within_prompt_tokens() {
        let u = Usage::new(100, 10, 250);
        assert_eq!(u.cached_prompt_tokens, 100);
        assert_eq!(u.uncached_prompt_tokens(), 0);
        let u = Usage::new(100, 10, 64).share(3);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens),
            (33, 3, 21)
        );
        assert_eq!(Usage::new(7, 1, 3).share(0), Usage::new(7, 1, 3));
    }

    #[test]
    fn confidence_is_the_least_likely_token() {
        let c = confidence_of([-0.01, (0.6f64).ln(), -0.2]);
        assert!((c - 0.6).abs() < 1e-12);
        assert_eq!(confidence_of([]), 1.0);
        assert_eq!(confidence_of([f64::NAN, -0.1]), 0.0);
        assert_eq!(confidence_of([0.5]), 1.0);
        assert_eq!(confidence_of([f64::NEG_INFINITY]), 0.0);
    }

    #[test]
    fn estimates_tokens_from_prompt_and_limit() {
        assert_eq!(estimate_tokens(400, Some(50)), 150);
        assert_eq!(estimate_tokens(0, None), 256);
    }
}
