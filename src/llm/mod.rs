//! LLM providers, the shared dispatcher, and the classified errors they produce.
//!
//! A row's call goes: rendered prompt → [`LlmRequest`] → [`Dispatcher::call`] (global and per-model
//! concurrency, retries with backoff honouring Retry-After, validation of the response against the
//! output schema, in-run dedup) → a [`Provider`] (one HTTP request) → a validated JSON value or a
//! [`RowError`] that SQL can select.

pub(crate) mod batch;
pub mod dispatch;
pub(crate) mod embeddings;
pub(crate) mod estimate;
pub(crate) mod governor;
pub(crate) mod http;
pub(crate) mod lamini;
pub(crate) mod limits;
#[cfg(feature = "local")]
pub(crate) mod local;
pub(crate) mod openai;

use std::fmt;

use async_trait::async_trait;
use serde_json::Value;

use crate::types::{ErrorKind, LlmError, LlmRequest, LlmResponse, OutputSchema};

pub(crate) use dispatch::Dispatcher;
pub use dispatch::{Metrics, MetricsSnapshot};
pub use governor::LimitKind;

/// Why a model cannot be set up, or cannot serve a function.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SetupError {
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
    /// The tokenizer that `sluice explain` counts with cannot be had.
    #[error("{0}")]
    Tokenizer(String),
    /// The provider cannot return values of the function's output schema.
    #[error("{0}")]
    Output(String),
    /// The provider's kind is not in this build, or does not match its settings.
    #[error("{0}")]
    Unavailable(String),
}

/// A model endpoint. Implementations make exactly one attempt per call; retrying, pacing and
/// validation belong to the [`Dispatcher`].
#[async_trait]
pub trait Provider: Send + Sync + fmt::Debug {
    /// Identifies the endpoint and model (part of the cache key; never contains secrets).
    fn endpoint(&self) -> String;
    /// Sends one request.
    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError>;

    /// Most prompts one request may carry (1: one prompt per request).
    fn max_prompts_per_request(&self) -> usize {
        1
    }

    /// Sends several prompts (of the same function and parameters) in one request: one result
    /// per prompt, in order, or one error for the whole request.
    async fn complete_list(
        &self,
        reqs: &[LlmRequest],
    ) -> Result<Vec<Result<LlmResponse, LlmError>>, LlmError> {
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            out.push(self.complete(r).await);
        }
        Ok(out)
    }

    /// Whether it returns embeddings (for functions of `kind = "embedding"`) rather than
    /// completions.
    fn embeds(&self) -> bool {
        false
    }

    /// Whether this provider can return values of `schema`; checked when the engine starts.
    fn check_schema(&self, _schema: Option<&OutputSchema>) -> Result<(), SetupError> {
        Ok(())
    }
}

/// One prompt sent as a list of one, for providers whose protocol takes lists.
pub async fn complete_as_list<P: Provider + ?Sized>(
    provider: &P,
    req: &LlmRequest,
) -> Result<LlmResponse, LlmError> {
    let mut out = provider.complete_list(std::slice::from_ref(req)).await?;
    out.pop().unwrap_or_else(|| {
        Err(http::malformed(
            "the response has no answer for the prompt".into(),
        ))
    })
}

/// Turns a response into the function's value: JSON parsed, unwrapped and validated against the
/// schema, or the non-empty text for functions without a schema.
pub fn parse_response(
    schema: Option<&OutputSchema>,
    resp: &LlmResponse,
) -> Result<Value, LlmError> {
    let with_reason = |kind, message: String| LlmError {
        finish_reason: resp.finish_reason.clone(),
        ..LlmError::new(kind, message)
    };
    if resp.finish_reason.as_deref() == Some("length") {
        return Err(with_reason(
            ErrorKind::Truncated,
            "the model stopped at max_tokens (finish_reason = length)".into(),
        ));
    }
    let content = resp.content.trim();
    if content.is_empty() {
        return Err(with_reason(ErrorKind::Empty, "empty content".into()));
    }
    let Some(schema) = schema else {
        return Ok(Value::String(resp.content.clone()));
    };
    let json_text = strip_code_fence(content);
    let parsed: Value = serde_json::from_str(json_text).map_err(|e| {
        with_reason(
            ErrorKind::InvalidOutput,
            format!("content is not JSON ({e}): {}", preview(content)),
        )
    })?;
    let value = match parsed {
        Value::Object(mut m) if schema.is_wrapped() && m.len() == 1 && m.contains_key("value") => {
            m.remove("value").unwrap_or(Value::Null)
        }
        other => other,
    };
    schema.validate(&value).map_err(|e| {
        with_reason(
            ErrorKind::InvalidOutput,
            format!("does not match the output schema: {e}"),
        )
    })?;
    Ok(value)
}

fn strip_code_fence(s: &str) -> &str {
    let Some(rest) = s.strip_prefix("```") else {
        return s;
    };
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    rest.strip_suffix("```").unwrap_or(rest).trim()
}

/// The first 120 characters of `s`, for messages.
pub fn preview(s: &str) -> String {
    let mut out: String = s.chars().take(120).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resp(content: &str, finish: &str) -> LlmResponse {
        LlmResponse {
            content: content.into(),
            finish_reason: Some(finish.into()),
            usage: None,
            rate: Default::default(),
        }
    }

    #[test]
    fn parses_wrapped_and_direct_values() {
        let s = OutputSchema::new(json!({"type": "array", "items": {"type": "string"}})).unwrap();
        let v = parse_response(Some(&s), &resp(r#"{"value": ["a"]}"#, "stop")).unwrap();
        assert_eq!(v, json!(["a"]));
        let v = parse_response(Some(&s), &resp("```json\n[\"b\"]\n```", "stop")).unwrap();
        assert_eq!(v, json!(["b"]));
    }

    #[test]
    fn classifies_bad_responses() {
        let s = OutputSchema::new(json!({"type": "integer"})).unwrap();
        let kind = |c: &str, f: &str| parse_response(Some(&s), &resp(c, f)).unwrap_err().kind;
        assert_eq!(kind(r#"{"value": "x"}"#, "stop"), ErrorKind::InvalidOutput);
        assert_eq!(kind("{\"value\": 1", "stop"), ErrorKind::InvalidOutput);
        assert_eq!(kind(r#"{"value": 1}"#, "length"), ErrorKind::Truncated);
        assert_eq!(kind("  ", "stop"), ErrorKind::Empty);
        assert_eq!(
            parse_response(None, &resp("hello", "stop")).unwrap(),
            json!("hello")
        );
    }
}
