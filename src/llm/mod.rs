//! LLM providers, the shared dispatcher, and the classified errors they produce.
//!
//! A row's call goes: rendered prompt → [`LlmRequest`] → [`Dispatcher::call`] (global and per-model
//! concurrency, retries with backoff honouring Retry-After, validation of the response against the
//! output schema, in-run dedup) → a [`Provider`] (one HTTP request) → a validated JSON value or a
//! [`RowError`] that SQL can select.

pub mod dispatcher;
pub mod estimate;
pub mod governor;
pub mod http;
pub mod lamini;
#[cfg(feature = "local")]
pub mod local;
pub mod openai;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::udf::def::RenderedPrompt;
use crate::udf::schema::OutputSchema;

pub use dispatcher::{Dispatcher, Metrics, MetricsSnapshot};

/// The class of a failure. Decides retrying and appears as `kind` in the `<name>_error` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// HTTP 429.
    RateLimited,
    /// HTTP 5xx.
    ServerError,
    /// No complete answer within the request timeout.
    Timeout,
    /// The connection broke while sending or receiving.
    Connection,
    /// Could not connect at all (refused, DNS): systemic, fails the statement.
    Connect,
    /// The body was not the provider's JSON envelope (malformed or cut off).
    MalformedResponse,
    /// The content did not parse or did not match the output schema.
    InvalidOutput,
    /// The model stopped at max_tokens (`finish_reason = length`).
    Truncated,
    /// The model returned no content.
    Empty,
    /// HTTP 401/403: systemic, fails the statement.
    Auth,
    /// HTTP 404 (wrong base URL or model): systemic, fails the statement.
    NotFound,
    /// Other HTTP 4xx: the request itself was refused; not retried.
    BadRequest,
    /// The body exceeded the configured size cap.
    TooLarge,
    /// An argument was NULL, so no call was made.
    NullInput,
    /// The prompt could not be rendered for this row.
    Template,
    /// The run's token budget would be exceeded: systemic, ends the statement.
    Budget,
}

impl ErrorKind {
    /// Stable snake_case name, as stored in the error column.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::ServerError => "server_error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection",
            ErrorKind::Connect => "connect",
            ErrorKind::MalformedResponse => "malformed_response",
            ErrorKind::InvalidOutput => "invalid_output",
            ErrorKind::Truncated => "truncated",
            ErrorKind::Empty => "empty",
            ErrorKind::Auth => "auth",
            ErrorKind::NotFound => "not_found",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::NullInput => "null_input",
            ErrorKind::Template => "template",
            ErrorKind::Budget => "budget",
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::RateLimited
                | ErrorKind::ServerError
                | ErrorKind::Timeout
                | ErrorKind::Connection
                | ErrorKind::Connect
                | ErrorKind::MalformedResponse
                | ErrorKind::InvalidOutput
                | ErrorKind::Truncated
                | ErrorKind::Empty
        )
    }

    /// Whether the failure concerns the whole provider rather than one row; such failures end
    /// the statement even with `on_error = "null"`.
    pub fn is_systemic(self) -> bool {
        matches!(
            self,
            ErrorKind::Connect | ErrorKind::Auth | ErrorKind::NotFound | ErrorKind::Budget
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One failed attempt, as classified by a provider or by response validation.
#[derive(Debug, Clone)]
pub struct LlmError {
    /// Class.
    pub kind: ErrorKind,
    /// Human message (never contains credentials).
    pub message: String,
    /// HTTP status, when there was a response.
    pub http_status: Option<u16>,
    /// Server-requested delay before retrying.
    pub retry_after: Option<Duration>,
    /// `finish_reason` of the response, when there was one.
    pub finish_reason: Option<String>,
}

impl LlmError {
    /// An error with only a kind and a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        LlmError {
            kind,
            message: message.into(),
            http_status: None,
            retry_after: None,
            finish_reason: None,
        }
    }
}

/// The final failure of one row's call, after all attempts: the value of `<name>_error(...)`.
#[derive(Debug, Clone, PartialEq)]
pub struct RowError {
    /// Class of the last failure.
    pub kind: ErrorKind,
    /// Message of the last failure.
    pub message: String,
    /// Attempts made (0 when no call was made).
    pub attempts: u32,
    /// HTTP status of the last response, if any.
    pub http_status: Option<u16>,
    /// `finish_reason` of the last response, if any.
    pub finish_reason: Option<String>,
}

impl RowError {
    /// Builds the final error from the last attempt's error.
    pub fn from_attempt(e: LlmError, attempts: u32) -> Self {
        RowError {
            kind: e.kind,
            message: e.message,
            attempts,
            http_status: e.http_status,
            finish_reason: e.finish_reason,
        }
    }
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(s) = self.http_status {
            write!(f, " (HTTP {s})")?;
        }
        write!(f, " after {} attempt(s)", self.attempts)
    }
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
    /// and user) and the completion limit; see [`governor::estimate_tokens`].
    pub fn estimated_tokens(&self) -> u64 {
        let u = self.estimated_usage();
        u.prompt_tokens + u.completion_tokens
    }

    /// The prompt and completion parts of [`LlmRequest::estimated_tokens`].
    pub fn estimated_usage(&self) -> Usage {
        let chars = self.prompt.user.len() + self.prompt.system.as_ref().map_or(0, String::len);
        let total = governor::estimate_tokens(chars, self.max_tokens);
        let completion = u64::from(self.max_tokens.unwrap_or(256));
        Usage {
            prompt_tokens: total - completion,
            completion_tokens: completion,
        }
    }
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
#[derive(Debug, Clone)]
pub struct LlmResponse {
    /// Message content.
    pub content: String,
    /// `finish_reason` (`stop`, `length`, ...).
    pub finish_reason: Option<String>,
    /// Token usage, if reported.
    pub usage: Option<Usage>,
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
    fn max_batch(&self) -> usize {
        1
    }

    /// Sends several prompts (of the same function and parameters) in one request: one result
    /// per prompt, in order, or one error for the whole request.
    async fn complete_batch(
        &self,
        reqs: &[LlmRequest],
    ) -> Result<Vec<Result<LlmResponse, LlmError>>, LlmError> {
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            out.push(self.complete(r).await);
        }
        Ok(out)
    }

    /// Whether this provider can return values of `schema`; checked when the engine starts.
    fn check_schema(&self, _schema: Option<&OutputSchema>) -> Result<(), String> {
        Ok(())
    }
}

/// One prompt sent as a list of one, for providers whose protocol takes lists.
pub async fn complete_as_batch<P: Provider + ?Sized>(
    provider: &P,
    req: &LlmRequest,
) -> Result<LlmResponse, LlmError> {
    let mut out = provider.complete_batch(std::slice::from_ref(req)).await?;
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
