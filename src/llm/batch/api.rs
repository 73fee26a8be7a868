//! The OpenAI Files + Batches API of one chat model's server (and Azure OpenAI's, beside its
//! deployments): upload a JSONL file of requests (`POST /files`, purpose `batch`), submit it
//! (`POST /batches`), poll it (`GET /batches/{id}`), download its results
//! (`GET /files/{id}/content`), cancel it (`POST /batches/{id}/cancel`).

use std::sync::Arc;

use reqwest::Method;
use serde_json::{Value, json};

use super::job::{JobPhase, JobStatus, count, parse_json, text};
use super::wire::{TRANSFER_TIMEOUT, Wire};
use crate::llm::openai::OpenAiProvider;
use crate::llm::preview;
use crate::llm::response::malformed;
use crate::types::LlmError;

/// A batch object as a [`JobStatus`].
fn job_status(v: &Value) -> Result<JobStatus, LlmError> {
    let (Some(id), Some(status)) = (text(v, "id"), text(v, "status")) else {
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
    let phase = match status.as_str() {
        "completed" => JobPhase::Completed,
        "failed" => JobPhase::Failed,
        "expired" => JobPhase::Expired,
        "cancelled" => JobPhase::Cancelled,
        _ => JobPhase::Open,
    };
    Ok(JobStatus {
        id,
        status,
        phase,
        total: count(v, "total"),
        completed: count(v, "completed"),
        failed: count(v, "failed"),
        results: [text(v, "output_file_id"), text(v, "error_file_id")]
            .into_iter()
            .flatten()
            .collect(),
        errors,
    })
}

/// The Files + Batches API of one model's server.
#[derive(Debug, Clone)]
pub struct OpenAiBatches {
    chat: Arc<OpenAiProvider>,
    model: String,
    window: String,
}

impl OpenAiBatches {
    /// The API beside `chat`'s endpoint; `model` names it in messages, `window` is the jobs'
    /// completion window.
    pub fn new(chat: Arc<OpenAiProvider>, model: &str, window: &str) -> OpenAiBatches {
        OpenAiBatches {
            chat,
            model: model.to_string(),
            window: window.to_string(),
        }
    }

    /// The chat provider whose requests the files carry.
    pub fn chat(&self) -> &Arc<OpenAiProvider> {
        &self.chat
    }

    fn wire(&self) -> Wire<'_> {
        Wire {
            http: self.chat.http(),
            model: &self.model,
            api: "Files + Batches",
        }
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, LlmError> {
        self.wire()
            .json_value(method, &self.chat.api_url(path), body)
            .await
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
        let url = self.chat.api_url("/files");
        let bytes = self
            .wire()
            .send((Method::POST, &url), 16 << 20, |b| {
                b.timeout(TRANSFER_TIMEOUT)
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .body(jsonl)
            })
            .await?;
        let v = parse_json("POST", "/files", &bytes)?;
        text(&v, "id").ok_or_else(|| {
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
        job_status(&self.json(Method::POST, "/batches", Some(body)).await?)
    }

    /// The job's state now.
    pub async fn status(&self, id: &str) -> Result<JobStatus, LlmError> {
        job_status(
            &self
                .json(Method::GET, &format!("/batches/{id}"), None)
                .await?,
        )
    }

    /// Asks the provider to cancel the job.
    pub async fn cancel(&self, id: &str) -> Result<JobStatus, LlmError> {
        job_status(
            &self
                .json(Method::POST, &format!("/batches/{id}/cancel"), None)
                .await?,
        )
    }

    /// The bytes of a result file.
    pub async fn content(&self, file_id: &str) -> Result<Vec<u8>, LlmError> {
        let url = self.chat.api_url(&format!("/files/{file_id}/content"));
        self.wire().download(&url).await
    }
}
