//! How a call fails: the class of a failure, one failed attempt, and the final error of a row.

use std::fmt;
use std::time::Duration;

use super::rate::RateLimits;

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
    /// The provider's batch API refused a file or job, or a job was cancelled before it ran
    /// the request: systemic, fails the statement.
    Batch,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 17] = [
        ErrorKind::RateLimited,
        ErrorKind::ServerError,
        ErrorKind::Timeout,
        ErrorKind::Connection,
        ErrorKind::Connect,
        ErrorKind::MalformedResponse,
        ErrorKind::InvalidOutput,
        ErrorKind::Truncated,
        ErrorKind::Empty,
        ErrorKind::Auth,
        ErrorKind::NotFound,
        ErrorKind::BadRequest,
        ErrorKind::TooLarge,
        ErrorKind::NullInput,
        ErrorKind::Template,
        ErrorKind::Budget,
        ErrorKind::Batch,
    ];

    /// The kind named `name` ([`ErrorKind::as_str`]).
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

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
            ErrorKind::Batch => "batch",
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
            ErrorKind::Connect
                | ErrorKind::Auth
                | ErrorKind::NotFound
                | ErrorKind::Budget
                | ErrorKind::Batch
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
    /// The rate limits the refusal advertised (a 429's headers; boxed: errors stay small).
    pub rate: Option<Box<RateLimits>>,
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
            rate: None,
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
    /// The error of a row for which no call was made (a NULL argument, a template error).
    pub fn without_call(kind: ErrorKind, message: String) -> Self {
        RowError {
            kind,
            message,
            attempts: 0,
            http_status: None,
            finish_reason: None,
        }
    }

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
