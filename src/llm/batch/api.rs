//! The OpenAI Files + Batches API of one chat model's server: upload a JSONL file of requests
//! (`POST /files`, purpose `batch`), submit it (`POST /batches`), poll it
//! (`GET /batches/{id}`), download its results (`GET /files/{id}/content`), cancel it
//! (`POST /batches/{id}/cancel`). Every failure is a classified [`LlmError`]; a server without
//! the API (404) or one that refuses a file is an [`ErrorKind::Batch`] error that names the
//! setting to change.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::llm::openai::OpenAiProvider;
use crate::llm::preview;
use crate::llm::response::malformed;
use crate::types::{ErrorKind, LlmError};

/// Uploads and downloads may take minutes where a completion takes seconds.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// Largest result file read (results of one file of at most 200 MB of requests).
const MAX_RESULT_BYTES: usize = 2 << 30;

/// The JSON answer of `method path`.
fn parse_json(method: &Method, path: &str, bytes: &[u8]) -> Result<Value, LlmError> {
    serde_json::from_slice(bytes).map_err(|e| {
        malformed(format!(
            "{method} {path}: the answer is not JSON ({e}): {}",
            preview(&String::from_utf8_lossy(bytes))
        ))
    })
}

/// What the provider says of a job.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobStatus {
    /// `batch_...`.
    pub id: String,
    /// `validating`, `in_progress`, `finalizing`, `completed`, `failed`, `expired`,
    /// `cancelling`, `cancelled`.
    pub status: String,
    /// Requests in the job.
    pub total: u64,
    /// Requests answered.
    pub completed: u64,
    /// Requests failed.
    pub failed: u64,
    /// The file of answers, once there is one.
    pub output_file_id: Option<String>,
    /// The file of failed requests, once there is one.
    pub error_file_id: Option<String>,
    /// Why a job failed as a whole (`errors.data[*]`).
    pub errors: Option<String>,
}

impl JobStatus {
    /// Whether the job will change no more.
    pub fn is_final(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        )
    }

    fn from_json(v: &Value) -> Result<JobStatus, LlmError> {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let count = |k: &str| {
            v.pointer(&format!("/request_counts/{k}"))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        let (Some(id), Some(status)) = (text("id"), text("status")) else {
            return Err(malformed(format!(
                "a batch object needs id and status: {}",
                preview(&v.to_string())
            )));
        };
        let errors = v
            .pointer("/errors/data")
            .and_then(Value::as_array)
            .filter(|d| !d.is_empty())
            .map(|d| {
                d.iter()
                    .map(|e| {
                        let part = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("");
                        format!("{}: {}", part("code"), part("message"))
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            });
        Ok(JobStatus {
            id,
            status,
            total: count("total"),
            completed: count("completed"),
            failed: count("failed"),
            output_file_id: text("output_file_id"),
            error_file_id: text("error_file_id"),
            errors,
        })
    }
}

/// The batch API of one model's server.
#[derive(Debug, Clone)]
pub struct BatchApi {
    chat: Arc<OpenAiProvider>,
    model: String,
    window: String,
}

impl BatchApi {
    /// The API beside `chat`'s endpoint; `model` names it in messages, `window` is the jobs'
    /// completion window.
    pub fn new(chat: Arc<OpenAiProvider>, model: &str, window: &str) -> BatchApi {
        BatchApi {
            chat,
            model: model.to_string(),
            window: window.to_string(),
        }
    }

    /// The chat provider whose requests the files carry.
    pub fn chat(&self) -> &Arc<OpenAiProvider> {
        &self.chat
    }

    fn url(&self, path: &str) -> String {
        self.chat.api_url(path)
    }

    /// Sends `method path` (with `setup` adding the rest of the request) and the key; the body
    /// of a 200 answer of at most `cap` bytes. A 404 or a refusal of the batch API itself
    /// becomes an [`ErrorKind::Batch`] error that says what to change.
    async fn send(
        &self,
        (method, path): (Method, &str),
        cap: usize,
        setup: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, LlmError> {
        let url = self.url(path);
        let b = setup(self.chat.http().request(method.clone(), &url));
        let (bytes, _) = self
            .chat
            .http()
            .send(b, &url, cap)
            .await
            .map_err(|e| self.refused(&method, path, e))?;
        Ok(bytes)
    }

    /// [`BatchApi::send`] with an optional JSON body, reading a JSON answer.
    async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, LlmError> {
        let bytes = self
            .send((method.clone(), path), 16 << 20, |b| match body {
                Some(body) => b
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_string()),
                None => b,
            })
            .await?;
        parse_json(&method, path, &bytes)
    }

    fn refused(&self, method: &Method, path: &str, mut e: LlmError) -> LlmError {
        let name = &self.model;
        match e.kind {
            ErrorKind::NotFound => {
                e.kind = ErrorKind::Batch;
                e.message = format!(
                    "{method} {} answered 404: this server has no batch API (Files + \
                     Batches); set mode = \"live\" for models.{name} or run without --batch",
                    self.url(path)
                );
            }
            ErrorKind::BadRequest | ErrorKind::TooLarge => {
                e.kind = ErrorKind::Batch;
                e.message = format!(
                    "{method} {path} refused: {} (models.{name}.batch.max_bytes and \
                     max_requests set the file limits)",
                    e.message
                );
            }
            _ => e.message = format!("{method} {path}: {}", e.message),
        }
        e
    }

    /// Uploads `jsonl` as a batch input file named `name`; its file id. The multipart body is
    /// `jsonl` with its part header put in front (one move of the bytes, no second copy).
    pub async fn upload(&self, name: &str, mut jsonl: Vec<u8>) -> Result<String, LlmError> {
        let boundary = format!("sluice-{:016x}", fastrand::u64(..));
        let head = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; \
             filename=\"{name}\"\r\nContent-Type: application/jsonl\r\n\r\n"
        );
        jsonl.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        jsonl.splice(0..0, head.into_bytes());
        let content_type = format!("multipart/form-data; boundary={boundary}");
        let bytes = self
            .send((Method::POST, "/files"), 16 << 20, |b| {
                b.timeout(TRANSFER_TIMEOUT)
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .body(jsonl)
            })
            .await?;
        let v = parse_json(&Method::POST, "/files", &bytes)?;
        v.get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                malformed(format!(
                    "POST /files: no file id in {}",
                    preview(&v.to_string())
                ))
            })
    }

    /// Submits the uploaded file `file_id` as a job of chat completions.
    pub async fn create(&self, file_id: &str) -> Result<JobStatus, LlmError> {
        let body = json!({
            "input_file_id": file_id,
            "endpoint": self.chat.batch_endpoint(),
            "completion_window": self.window,
            "metadata": {"created_by": "sluice"},
        });
        let v = self.json(Method::POST, "/batches", Some(body)).await?;
        JobStatus::from_json(&v)
    }

    /// The job's state now.
    pub async fn status(&self, id: &str) -> Result<JobStatus, LlmError> {
        let v = self
            .json(Method::GET, &format!("/batches/{id}"), None)
            .await?;
        JobStatus::from_json(&v)
    }

    /// Asks the provider to cancel the job.
    pub async fn cancel(&self, id: &str) -> Result<JobStatus, LlmError> {
        let v = self
            .json(Method::POST, &format!("/batches/{id}/cancel"), None)
            .await?;
        JobStatus::from_json(&v)
    }

    /// The bytes of a result file.
    pub async fn content(&self, file_id: &str) -> Result<Vec<u8>, LlmError> {
        let path = format!("/files/{file_id}/content");
        let bytes = self
            .send((Method::GET, &path), MAX_RESULT_BYTES, |b| {
                b.timeout(TRANSFER_TIMEOUT)
            })
            .await?;
        Ok(bytes)
    }
}
