//! What a provider says of a batch job, in the words every protocol shares: its phase, its
//! request counts, and where its results are.

use serde_json::Value;

use crate::llm::preview;
use crate::llm::response::malformed;
use crate::types::LlmError;

/// Where a job is, whatever its provider calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JobPhase {
    /// Validating, running, finalizing or being cancelled: it will change.
    #[default]
    Open,
    /// Ended with its results (OpenAI `completed`, Anthropic `ended`, Gemini
    /// `BATCH_STATE_SUCCEEDED`).
    Completed,
    /// Failed as a whole (OpenAI `failed`).
    Failed,
    /// Its completion window passed (OpenAI `expired`).
    Expired,
    /// Cancelled (OpenAI `cancelled`, Anthropic `ended` after a cancel).
    Cancelled,
}

/// What the provider says of a job.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobStatus {
    /// `batch_...` (OpenAI), `msgbatch_...` (Anthropic), `batches/...` (Gemini).
    pub id: String,
    /// The provider's own name of its state (`in_progress`, `completed`, `ended`...).
    pub status: String,
    /// What the state means.
    pub phase: JobPhase,
    /// Requests in the job.
    pub total: u64,
    /// Requests answered.
    pub completed: u64,
    /// Requests failed (errored, cancelled or expired).
    pub failed: u64,
    /// Where its results are once it has ended: the output and error file ids (OpenAI), the
    /// results URL (Anthropic), the responses file `files/...` (Gemini).
    pub results: Vec<String>,
    /// Why a job failed as a whole.
    pub errors: Option<String>,
}

impl JobStatus {
    /// Whether the job will change no more.
    pub fn is_final(&self) -> bool {
        self.phase != JobPhase::Open
    }
}

/// The JSON answer of `method path`.
pub(super) fn parse_json(method: &str, path: &str, bytes: &[u8]) -> Result<Value, LlmError> {
    serde_json::from_slice(bytes).map_err(|e| {
        malformed(format!(
            "{method} {path}: the answer is not JSON ({e}): {}",
            preview(&String::from_utf8_lossy(bytes))
        ))
    })
}

/// The string field `k` of `v`.
pub(super) fn text(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

/// The count `request_counts.k` of `v` (0 when missing).
pub(super) fn count(v: &Value, k: &str) -> u64 {
    v.pointer(&format!("/request_counts/{k}"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}
