//! Anthropic's Message Batches API (`x-api-key`, `anthropic-version` as for live messages):
//! the requests go inline in the job (`POST /v1/messages/batches` with
//! `{"requests": [{"custom_id", "params"}]}`, no file), the job is polled
//! (`GET /v1/messages/batches/{id}`: `processing_status` `in_progress`, `canceling`, `ended`),
//! its results are read from its `results_url` (JSON lines of `{"custom_id", "result": {"type":
//! "succeeded" | "errored" | "canceled" | "expired"}}`), and it is cancelled with
//! `POST /v1/messages/batches/{id}/cancel`.
//!
//! The queue gathers the requests as JSON lines, as for OpenAI; they become the `requests`
//! array when the job is created. The key goes only to the model's own server: a results URL
//! elsewhere is refused.

use std::sync::Arc;

use reqwest::Method;
use serde_json::{Value, json};

use super::job::{JobPhase, JobStatus, count, text};
use super::wire::Wire;
use crate::cache::{RequestKey, key_from_hex, key_hex};
use crate::llm::anthropic::AnthropicProvider;
use crate::llm::preview;
use crate::llm::response::malformed;
use crate::types::{ErrorKind, LlmError, LlmRequest, LlmResponse};

const BATCHES: &str = "/v1/messages/batches";

/// A Message Batch object as a [`JobStatus`]: `ended` is completed, or cancelled when a cancel
/// was asked for.
fn job_status(v: &Value) -> Result<JobStatus, LlmError> {
    let (Some(id), Some(status)) = (text(v, "id"), text(v, "processing_status")) else {
        return Err(malformed(format!(
            "a message batch object needs id and processing_status: {}",
            preview(&v.to_string())
        )));
    };
    let cancelled = v.get("cancel_initiated_at").is_some_and(|c| !c.is_null());
    let phase = match status.as_str() {
        "ended" if cancelled => JobPhase::Cancelled,
        "ended" => JobPhase::Completed,
        _ => JobPhase::Open,
    };
    let [processing, succeeded, errored, canceled, expired] =
        ["processing", "succeeded", "errored", "canceled", "expired"].map(|k| count(v, k));
    Ok(JobStatus {
        id,
        status,
        phase,
        total: processing + succeeded + errored + canceled + expired,
        completed: succeeded,
        failed: errored + canceled + expired,
        results: text(v, "results_url").into_iter().collect(),
        errors: None,
    })
}

/// `{"requests": [...]}` of the JSON lines `lines` (each one object; their string escapes hold
/// no raw line break).
fn requests_body(lines: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(lines.len() + 16);
    body.extend_from_slice(b"{\"requests\":[");
    for (i, line) in lines
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(line);
    }
    body.extend_from_slice(b"]}");
    body
}

/// The Message Batches API of one Anthropic model.
#[derive(Debug, Clone)]
pub struct AnthropicBatches {
    chat: Arc<AnthropicProvider>,
    model: String,
}

impl AnthropicBatches {
    /// The API of `chat`'s server; `model` names it in messages.
    pub fn new(chat: Arc<AnthropicProvider>, model: &str) -> AnthropicBatches {
        AnthropicBatches {
            chat,
            model: model.to_string(),
        }
    }

    fn wire(&self) -> Wire<'_> {
        Wire {
            http: self.chat.http(),
            model: &self.model,
            api: "Message Batches",
        }
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Value, LlmError> {
        self.wire()
            .json(method, &self.chat.api_url(path), body)
            .await
    }

    /// The JSON line (with its newline) asking for `req` under `key`.
    pub(super) fn request_line(&self, key: &RequestKey, req: &LlmRequest) -> Vec<u8> {
        let line = json!({"custom_id": key_hex(key), "params": self.chat.body(req)});
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        bytes
    }

    /// Creates a job of the gathered request lines `lines`.
    pub async fn create(&self, lines: Vec<u8>) -> Result<JobStatus, LlmError> {
        let body = requests_body(&lines);
        job_status(&self.json(Method::POST, BATCHES, Some(body)).await?)
    }

    /// The job's state now.
    pub async fn status(&self, id: &str) -> Result<JobStatus, LlmError> {
        job_status(
            &self
                .json(Method::GET, &format!("{BATCHES}/{id}"), None)
                .await?,
        )
    }

    /// Asks the provider to cancel the job.
    pub async fn cancel(&self, id: &str) -> Result<JobStatus, LlmError> {
        let path = format!("{BATCHES}/{id}/cancel");
        job_status(&self.json(Method::POST, &path, None).await?)
    }

    /// The results at `url` (a job's `results_url`), which must be on the model's server.
    pub async fn content(&self, url: &str) -> Result<Vec<u8>, LlmError> {
        let base = self.chat.api_url("/");
        if !url.starts_with(&base) {
            return Err(LlmError::new(
                ErrorKind::Batch,
                format!(
                    "the results of a batch of model {} are at {url}, not on its server {base}: \
                     the key is not sent there",
                    self.model
                ),
            ));
        }
        self.wire().download(url).await
    }

    /// A result line: whose it is and what it says, or `None` for a line that names no request.
    pub(super) fn result_line(
        &self,
        line: &[u8],
    ) -> Option<(RequestKey, Result<LlmResponse, LlmError>)> {
        let v: Value = serde_json::from_slice(line).ok()?;
        let key = key_from_hex(v.get("custom_id")?.as_str()?)?;
        Some((key, self.outcome(v.get("result").unwrap_or(&Value::Null))))
    }

    fn outcome(&self, r: &Value) -> Result<LlmResponse, LlmError> {
        match r.get("type").and_then(Value::as_str) {
            Some("succeeded") => {
                let message = r.get("message").unwrap_or(&Value::Null);
                // The forced tool is the one the answer used (the request is not at hand).
                let tool = message
                    .get("content")
                    .and_then(Value::as_array)
                    .and_then(|c| {
                        c.iter()
                            .find(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
                    })
                    .and_then(|b| b.get("name"))
                    .and_then(Value::as_str);
                AnthropicProvider::parse_message(message, Default::default(), tool)
            }
            Some("errored") => Err(self.errored(r.get("error").unwrap_or(&Value::Null))),
            Some("canceled") => Err(LlmError::new(
                ErrorKind::Batch,
                format!(
                    "a batch of model {} was cancelled before it ran this request; the same \
                     command submits what was not answered anew",
                    self.model
                ),
            )),
            Some("expired") => Err(LlmError::new(
                ErrorKind::Timeout,
                "the batch expired (24 hours) before it ran this request",
            )),
            _ => Err(malformed(format!(
                "a message batch result of an unknown type: {}",
                preview(&r.to_string())
            ))),
        }
    }

    /// The row error of an `errored` result (an error response as the live API sends it):
    /// classified by its error type as the live answer's status would be, never systemic.
    fn errored(&self, e: &Value) -> LlmError {
        let status = match e.pointer("/error/type").and_then(Value::as_str) {
            Some("invalid_request_error") => 400,
            Some("authentication_error") => 401,
            Some("permission_error") => 403,
            Some("not_found_error") => 404,
            Some("request_too_large") => 413,
            Some("rate_limit_error") => 429,
            Some("overloaded_error") => 529,
            _ => 500,
        };
        self.wire().row_error(status, e.to_string().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> AnthropicBatches {
        let text = "[models.c]\nkind = \"anthropic\"\nmodel = \"claude-x\"\n\
                    base_url = \"http://127.0.0.1:9\"\nmode = \"batch\"\n";
        let cfg =
            crate::config::Config::parse(text, std::path::Path::new("s.toml"), &|_| None).unwrap();
        let server = cfg.models["c"].server().unwrap().clone();
        AnthropicBatches::new(
            Arc::new(AnthropicProvider::new("claude-x", &server, 1).unwrap()),
            "c",
        )
    }

    #[test]
    fn batch_objects_read_as_job_phases() {
        let batch = |status: &str, cancel: Value| {
            json!({"id": "msgbatch_1", "type": "message_batch", "processing_status": status,
                   "request_counts": {"processing": 1, "succeeded": 2, "errored": 3,
                                      "canceled": 4, "expired": 5},
                   "cancel_initiated_at": cancel, "results_url": "http://x/r"})
        };
        let s = job_status(&batch("in_progress", Value::Null)).unwrap();
        assert_eq!(
            (s.phase, s.total, s.completed, s.failed),
            (JobPhase::Open, 15, 2, 12)
        );
        assert_eq!(
            job_status(&batch("canceling", json!("t"))).unwrap().phase,
            JobPhase::Open
        );
        let s = job_status(&batch("ended", Value::Null)).unwrap();
        assert_eq!(
            (s.phase, s.results),
            (JobPhase::Completed, vec!["http://x/r".to_string()])
        );
        assert_eq!(
            job_status(&batch("ended", json!("t"))).unwrap().phase,
            JobPhase::Cancelled
        );
        assert!(job_status(&json!({"id": "x"})).is_err());
    }

    #[test]
    fn results_are_answers_or_typed_errors() {
        let api = api();
        let key = [3u8; 32];
        let line = |result: Value| {
            json!({"custom_id": key_hex(&key), "result": result})
                .to_string()
                .into_bytes()
        };
        let message = json!({"type": "message", "stop_reason": "tool_use",
            "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"value": 1}}],
            "usage": {"input_tokens": 5, "cache_read_input_tokens": 10, "output_tokens": 2}});
        let (k, r) = api
            .result_line(&line(json!({"type": "succeeded", "message": message})))
            .unwrap();
        assert_eq!(k, key);
        let r = r.unwrap();
        assert_eq!(r.content, r#"{"value":1}"#);
        assert_eq!(r.usage.unwrap().cached_prompt_tokens, 10);
        let kind = |result: Value| api.result_line(&line(result)).unwrap().1.unwrap_err().kind;
        let error = |t: &str| {
            json!({"type": "errored", "error": {"type": "error",
                                     "error": {"type": t, "message": "m"}}})
        };
        assert_eq!(kind(error("invalid_request_error")), ErrorKind::BadRequest);
        assert_eq!(kind(error("overloaded_error")), ErrorKind::ServerError);
        assert_eq!(
            kind(error("authentication_error")),
            ErrorKind::BadRequest,
            "never systemic"
        );
        assert_eq!(kind(json!({"type": "expired"})), ErrorKind::Timeout);
        assert_eq!(kind(json!({"type": "canceled"})), ErrorKind::Batch);
        assert_eq!(
            kind(json!({"type": "mystery"})),
            ErrorKind::MalformedResponse
        );
        assert!(api.result_line(b"{\"custom_id\": \"nope\"}").is_none());
    }

    #[test]
    fn the_requests_go_inline_and_results_only_from_the_models_server() {
        let body = requests_body(b"{\"a\":1}\n{\"b\":\"x\\ny\"}\n");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, json!({"requests": [{"a": 1}, {"b": "x\ny"}]}));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = rt
            .block_on(api().content("http://elsewhere.example/v1/messages/batches/b/results"))
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Batch);
    }
}
