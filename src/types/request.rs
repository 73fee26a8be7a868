//! A request to a model and its answer.

use std::sync::Arc;

use super::rate::RateLimits;
use super::schema::OutputSchema;

/// A rendered request: system and user message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RenderedPrompt {
    /// System message, if any.
    pub system: Option<String>,
    /// User message.
    pub user: String,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_tokens_from_prompt_and_limit() {
        assert_eq!(estimate_tokens(400, Some(50)), 150);
        assert_eq!(estimate_tokens(0, None), 256);
    }
}
