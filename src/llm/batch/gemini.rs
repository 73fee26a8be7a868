//! Google's Gemini Batch API (the key in `x-goog-api-key`, as for live `generateContent`):
//! the requests go in a JSONL file uploaded through the Files API
//! (`POST /upload/v1beta/files`, a `multipart/related` upload of the file's metadata and its
//! bytes), each line `{"key", "request"}` with `request` the live `GenerateContentRequest`; the
//! job is created with `POST /v1beta/models/{model}:batchGenerateContent` and
//! `{"batch": {"displayName", "inputConfig": {"fileName"}}}`, which answers a long-running
//! operation named `batches/{id}`; it is polled with `GET /v1beta/batches/{id}` (the state in
//! `metadata.state`: `BATCH_STATE_PENDING`, `RUNNING`, `SUCCEEDED`, `FAILED`, `CANCELLED`,
//! `EXPIRED`, or the older `JOB_STATE_*` names), cancelled with
//! `POST /v1beta/batches/{id}:cancel`, and its results are the file named by
//! `response.responsesFile`, read with `GET /download/v1beta/{file}:download?alt=media`:
//! JSON lines of `{"key", "response": GenerateContentResponse}` or `{"key", "error": Status}`.
//!
//! A file rather than inlined requests: the queue's files go up to `max_bytes` (200 MB by
//! default) where inlined requests stop at 20 MB, and each result line names its request by
//! `key`, so results are matched by key and never by position.

use std::sync::Arc;

use reqwest::Method;
use serde_json::{Value, json};

use super::job::{JobPhase, JobStatus, parse_json, text};
use super::wire::{TRANSFER_TIMEOUT, Wire};
use crate::cache::{RequestKey, key_from_hex, key_hex};
use crate::llm::gemini::GeminiProvider;
use crate::llm::preview;
use crate::llm::response::malformed;
use crate::types::{ErrorKind, LlmError, LlmRequest, LlmResponse};

/// Whether `name` is a resource name `{collection}/{id}` whose id is letters, digits, `-` and
/// `_` only: what may go into a URL path with the key.
fn resource(name: &str, collection: &str) -> bool {
    name.strip_prefix(collection)
        .and_then(|id| id.strip_prefix('/'))
        .is_some_and(|id| {
            !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// A count of `batchStats` (an int64: a JSON string, or a number), 0 when missing.
fn stat(batch: &Value, k: &str) -> u64 {
    match batch.pointer(&format!("/batchStats/{k}")) {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(v) => v.as_u64().unwrap_or(0),
        None => 0,
    }
}

/// A `google.rpc.Status` (an operation's `error`) in words: `code: message`.
fn status_words(e: &Value) -> String {
    let code = e.get("code").map_or_else(String::new, Value::to_string);
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("no message");
    format!("{code}: {}", preview(message))
}

/// A batch operation (or the batch itself) as a [`JobStatus`].
fn job_status(v: &Value) -> Result<JobStatus, LlmError> {
    // An operation carries the batch in `metadata`; a batch object has its fields on top.
    let batch = v.get("metadata").filter(|m| m.is_object()).unwrap_or(v);
    let id = text(v, "name").or_else(|| text(batch, "name"));
    let Some(id) = id.filter(|id| resource(id, "batches")) else {
        return Err(malformed(format!(
            "a batch operation needs a name batches/ID: {}",
            preview(&v.to_string())
        )));
    };
    let status = text(batch, "state").unwrap_or_default();
    let done = v.get("done").and_then(Value::as_bool) == Some(true);
    let words = (status.strip_prefix("BATCH_STATE_"))
        .or_else(|| status.strip_prefix("JOB_STATE_"))
        .unwrap_or("");
    let failure = v.get("error").filter(|e| e.is_object()).map(status_words);
    let (phase, errors) =
        match words {
            "SUCCEEDED" => (JobPhase::Completed, None),
            "FAILED" => (JobPhase::Failed, failure),
            "CANCELLED" => (JobPhase::Cancelled, None),
            "EXPIRED" => (JobPhase::Expired, None),
            "PENDING" | "RUNNING" => (JobPhase::Open, None),
            // Done in a state sluice does not know: nothing more will come.
            _ if done => (
                JobPhase::Failed,
                Some(failure.unwrap_or_else(|| {
                    format!("the operation is done in state {}", preview(&status))
                })),
            ),
            _ => (JobPhase::Open, None),
        };
    let file = (v.pointer("/response/responsesFile"))
        .or_else(|| batch.pointer("/output/responsesFile"))
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(JobStatus {
        id,
        status,
        phase,
        total: stat(batch, "requestCount"),
        completed: stat(batch, "successfulRequestCount"),
        failed: stat(batch, "failedRequestCount"),
        results: file.into_iter().collect(),
        errors,
    })
}

/// The HTTP status a `google.rpc.Status` of one result stands for: by its `status` name, else
/// its `code` (a gRPC code, or an HTTP status).
fn http_status(e: &Value) -> u16 {
    let named = match e.get("status").and_then(Value::as_str) {
        Some("INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE") => Some(400),
        Some("UNAUTHENTICATED") => Some(401),
        Some("PERMISSION_DENIED") => Some(403),
        Some("NOT_FOUND") => Some(404),
        Some("RESOURCE_EXHAUSTED") => Some(429),
        Some("UNAVAILABLE") => Some(503),
        Some("DEADLINE_EXCEEDED") => Some(504),
        Some(_) => Some(500),
        None => None,
    };
    named.unwrap_or_else(|| match e.get("code").and_then(Value::as_u64) {
        Some(c @ 100..=599) => c as u16,
        Some(3 | 9 | 11) => 400,
        Some(16) => 401,
        Some(7) => 403,
        Some(5) => 404,
        Some(8) => 429,
        Some(14) => 503,
        Some(4) => 504,
        _ => 500,
    })
}

/// The multipart body of an upload: the file's metadata, then its bytes (`jsonl` with the
/// parts' framing put around it, no second copy).
fn upload_body(name: &str, mut jsonl: Vec<u8>) -> (String, Vec<u8>) {
    let boundary = format!("sluice-{:016x}", fastrand::u64(..));
    let metadata = json!({"file": {"displayName": name, "mimeType": "application/jsonl"}});
    let head = format!(
        "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{metadata}\r\n\
         --{boundary}\r\nContent-Type: application/jsonl\r\n\r\n"
    );
    jsonl.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    jsonl.splice(0..0, head.into_bytes());
    (format!("multipart/related; boundary={boundary}"), jsonl)
}

/// The Batch API of one Gemini model.
#[derive(Debug, Clone)]
pub struct GeminiBatches {
    chat: Arc<GeminiProvider>,
    model: String,
}

impl GeminiBatches {
    /// The API of `chat`'s server; `model` names it in messages.
    pub fn new(chat: Arc<GeminiProvider>, model: &str) -> GeminiBatches {
        GeminiBatches {
            chat,
            model: model.to_string(),
        }
    }

    fn wire(&self) -> Wire<'_> {
        Wire {
            http: self.chat.http(),
            model: &self.model,
            api: "Gemini Batch",
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

    /// The refusal of a resource name that is not `{collection}/{id}`.
    fn odd_name(&self, name: &str, collection: &str) -> LlmError {
        LlmError::new(
            ErrorKind::Batch,
            format!(
                "{} is not a Gemini {collection}/ID name (model {}): it is not asked for",
                preview(name),
                self.model
            ),
        )
    }

    /// The JSON line (with its newline) asking for `req` under `key`.
    pub(super) fn request_line(&self, key: &RequestKey, req: &LlmRequest) -> Vec<u8> {
        let line = json!({"key": key_hex(key), "request": self.chat.body(req)});
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        bytes
    }

    /// Uploads `jsonl` through the Files API as a file named `name`; its name `files/ID`.
    pub async fn upload(&self, name: &str, jsonl: Vec<u8>) -> Result<String, LlmError> {
        let (content_type, body) = upload_body(name, jsonl);
        let url = self.chat.api_url("/upload/v1beta/files");
        let bytes = self
            .wire()
            .send((Method::POST, &url), 16 << 20, |b| {
                b.timeout(TRANSFER_TIMEOUT)
                    .header("X-Goog-Upload-Protocol", "multipart")
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .body(body)
            })
            .await?;
        let v = parse_json("POST", &url, &bytes)?;
        v.pointer("/file/name")
            .and_then(Value::as_str)
            .filter(|n| resource(n, "files"))
            .map(str::to_string)
            .ok_or_else(|| {
                malformed(format!(
                    "POST {url}: no file name files/ID in {}",
                    preview(&v.to_string())
                ))
            })
    }

    /// Creates a job of the uploaded file `file`, named `name`.
    pub async fn create(&self, name: &str, file: &str) -> Result<JobStatus, LlmError> {
        let path = format!("/v1beta/models/{}:batchGenerateContent", self.chat.model());
        let body = json!({"batch": {"displayName": name, "inputConfig": {"fileName": file}}});
        job_status(&self.json(Method::POST, &path, Some(body)).await?)
    }

    /// The job's state now.
    pub async fn status(&self, id: &str) -> Result<JobStatus, LlmError> {
        if !resource(id, "batches") {
            return Err(self.odd_name(id, "batches"));
        }
        job_status(
            &self
                .json(Method::GET, &format!("/v1beta/{id}"), None)
                .await?,
        )
    }

    /// Asks the provider to cancel the job (the answer is empty), then reads its state.
    pub async fn cancel(&self, id: &str) -> Result<JobStatus, LlmError> {
        if !resource(id, "batches") {
            return Err(self.odd_name(id, "batches"));
        }
        let path = format!("/v1beta/{id}:cancel");
        self.json(Method::POST, &path, Some(json!({}))).await?;
        self.status(id).await
    }

    /// The bytes of the responses file `file` (`files/ID`, on the model's server).
    pub async fn content(&self, file: &str) -> Result<Vec<u8>, LlmError> {
        if !resource(file, "files") {
            return Err(self.odd_name(file, "files"));
        }
        let url = self
            .chat
            .api_url(&format!("/download/v1beta/{file}:download?alt=media"));
        self.wire().download(&url).await
    }

    /// A result line: whose it is and what it says, or `None` for a line that names no request.
    pub(super) fn result_line(
        &self,
        line: &[u8],
    ) -> Option<(RequestKey, Result<LlmResponse, LlmError>)> {
        let v: Value = serde_json::from_slice(line).ok()?;
        let key = v.get("key").or_else(|| v.pointer("/metadata/key"))?;
        let key = key_from_hex(key.as_str()?)?;
        Some((key, self.outcome(&v)))
    }

    fn outcome(&self, v: &Value) -> Result<LlmResponse, LlmError> {
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            return Err(self.errored(e));
        }
        match v.get("response") {
            Some(r) if r.is_object() => GeminiProvider::parse_answer(r, Default::default()),
            _ => Err(malformed(format!(
                "a Gemini batch result has neither response nor error: {}",
                preview(&v.to_string())
            ))),
        }
    }

    /// The row error of a result's `error` (a `google.rpc.Status`): classified as the live
    /// answer's HTTP status would be, never systemic.
    fn errored(&self, e: &Value) -> LlmError {
        let body = json!({"error": e}).to_string();
        self.wire().row_error(http_status(e), body.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> GeminiBatches {
        let text = "[models.g]\nkind = \"gemini\"\nmodel = \"gemini-2.5-flash\"\n\
                    base_url = \"http://127.0.0.1:9\"\nmode = \"batch\"\n";
        let cfg =
            crate::config::Config::parse(text, std::path::Path::new("s.toml"), &|_| None).unwrap();
        let server = cfg.models["g"].server().unwrap().clone();
        GeminiBatches::new(
            Arc::new(GeminiProvider::new("gemini-2.5-flash", &server, 1).unwrap()),
            "g",
        )
    }

    fn operation(state: &str, done: bool) -> Value {
        json!({"name": "batches/abc-1", "done": done,
               "metadata": {"@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
                            "name": "batches/abc-1", "state": state,
                            "batchStats": {"requestCount": "10", "successfulRequestCount": "6",
                                           "failedRequestCount": 2, "pendingRequestCount": "2"}},
               "response": {"responsesFile": "files/out-1"}})
    }

    #[test]
    fn operations_read_as_job_phases_in_both_state_namings() {
        let s = job_status(&operation("BATCH_STATE_RUNNING", false)).unwrap();
        assert_eq!(
            (s.id.as_str(), s.phase, s.total, s.completed, s.failed),
            ("batches/abc-1", JobPhase::Open, 10, 6, 2)
        );
        for (state, phase) in [
            ("BATCH_STATE_PENDING", JobPhase::Open),
            ("JOB_STATE_RUNNING", JobPhase::Open),
            ("BATCH_STATE_SUCCEEDED", JobPhase::Completed),
            ("JOB_STATE_SUCCEEDED", JobPhase::Completed),
            ("BATCH_STATE_FAILED", JobPhase::Failed),
            ("JOB_STATE_CANCELLED", JobPhase::Cancelled),
            ("BATCH_STATE_EXPIRED", JobPhase::Expired),
        ] {
            assert_eq!(
                job_status(&operation(state, true)).unwrap().phase,
                phase,
                "{state}"
            );
        }
        let s = job_status(&operation("BATCH_STATE_SUCCEEDED", true)).unwrap();
        assert_eq!(s.results, vec!["files/out-1".to_string()]);
        // Done in a state nobody knows: final, failed.
        let s = job_status(&operation("BATCH_STATE_NEW_2031", false)).unwrap();
        assert_eq!(s.phase, JobPhase::Open, "not done: it may still change");
        let s = job_status(&operation("BATCH_STATE_NEW_2031", true)).unwrap();
        assert_eq!(s.phase, JobPhase::Failed);
        assert!(s.errors.unwrap().contains("BATCH_STATE_NEW_2031"));
        let mut failed = operation("BATCH_STATE_FAILED", true);
        failed["error"] = json!({"code": 13, "message": "internal"});
        assert_eq!(
            job_status(&failed).unwrap().errors.as_deref(),
            Some("13: internal")
        );
        assert!(job_status(&json!({"name": "elsewhere/x"})).is_err());
        assert!(job_status(&json!({"metadata": {}})).is_err());
    }

    #[test]
    fn results_are_answers_or_typed_errors() {
        let api = api();
        let key = [7u8; 32];
        let line = |v: Value| {
            let mut v = v;
            v["key"] = json!(key_hex(&key));
            v.to_string().into_bytes()
        };
        let answer = json!({"candidates": [{"content": {"parts": [{"text": "hi"}]},
                                            "finishReason": "STOP"}],
                            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1,
                                              "cachedContentTokenCount": 2}});
        let (k, r) = api.result_line(&line(json!({"response": answer}))).unwrap();
        assert_eq!(k, key);
        let r = r.unwrap();
        assert_eq!(r.content, "hi");
        assert_eq!(r.usage.unwrap().cached_prompt_tokens, 2);
        let kind = |v: Value| api.result_line(&line(v)).unwrap().1.unwrap_err().kind;
        let error = |e: Value| json!({"error": e});
        assert_eq!(
            kind(error(json!({"code": 3, "message": "bad"}))),
            ErrorKind::BadRequest
        );
        assert_eq!(
            kind(error(
                json!({"code": 500, "message": "m", "status": "INTERNAL"})
            )),
            ErrorKind::ServerError
        );
        assert_eq!(kind(error(json!({"code": 14}))), ErrorKind::ServerError);
        assert_eq!(kind(error(json!({"code": 8}))), ErrorKind::RateLimited);
        assert_eq!(
            kind(error(json!({"code": 16, "message": "m"}))),
            ErrorKind::BadRequest,
            "never systemic"
        );
        let odd = json!({"candidates": [{"content": {"parts": [{"text": "x"}]},
                                         "finishReason": "NEW_REASON"}]});
        assert_eq!(kind(json!({"response": odd})), ErrorKind::MalformedResponse);
        assert_eq!(
            kind(json!({"response": {"candidates": []}})),
            ErrorKind::MalformedResponse
        );
        assert_eq!(kind(json!({})), ErrorKind::MalformedResponse);
        assert_eq!(
            kind(json!({"response": "text"})),
            ErrorKind::MalformedResponse
        );
        assert!(api.result_line(b"{\"key\": \"nope\"}").is_none());
        assert!(api.result_line(b"not json").is_none());
        let meta = json!({"metadata": {"key": key_hex(&key)}, "response": answer}).to_string();
        assert_eq!(api.result_line(meta.as_bytes()).unwrap().0, key);
    }

    #[test]
    fn requests_are_keyed_lines_and_only_resource_names_reach_a_url() {
        let api = api();
        let req = LlmRequest {
            function: "f".into(),
            prompt: crate::types::RenderedPrompt {
                system: None,
                user: "Why?".into(),
                cuts: Default::default(),
            },
            max_tokens: Some(5),
            temperature: None,
            schema: None,
            confidence: false,
        };
        let line = api.request_line(&[1u8; 32], &req);
        assert!(line.ends_with(b"\n"));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["key"], key_hex(&[1u8; 32]));
        assert_eq!(v["request"]["contents"][0]["parts"][0]["text"], "Why?");
        let (content_type, body) = upload_body("f.jsonl", b"{\"a\":1}\n".to_vec());
        let boundary = content_type
            .strip_prefix("multipart/related; boundary=")
            .unwrap();
        let text = String::from_utf8(body).unwrap();
        assert!(text.starts_with(&format!("--{boundary}\r\n")));
        assert!(text.contains("\"displayName\":\"f.jsonl\""));
        assert!(text.ends_with(&format!("{{\"a\":1}}\n\r\n--{boundary}--\r\n")));
        assert!(resource("files/abc-1_2", "files"));
        for odd in [
            "files/",
            "files/../x",
            "files/a?b",
            "batches/x",
            "files/a/b",
        ] {
            assert!(!resource(odd, "files"), "{odd}");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for odd in ["files/../../v1beta/x", "https://elsewhere.example/f"] {
            let e = rt.block_on(api.content(odd)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Batch);
        }
        assert_eq!(
            rt.block_on(api.status("batches/a?x")).unwrap_err().kind,
            ErrorKind::Batch
        );
    }
}
