//! Google's Gemini Batch API for the test server, as Google's public reference documents it:
//!
//! - `POST /upload/v1beta/files` (`X-Goog-Upload-Protocol: multipart`, a `multipart/related`
//!   body: the file's JSON metadata, then its bytes) answers `{"file": {"name": "files/ID",
//!   ...}}`; the file is JSON lines of `{"key", "request": GenerateContentRequest}`.
//! - `POST /v1beta/models/{model}:batchGenerateContent` with `{"batch": {"displayName",
//!   "inputConfig": {"fileName"}}}` (or inlined requests, `"inputConfig": {"requests":
//!   {"requests": [{"request", "metadata": {"key"}}]}}`; snake_case names are taken too)
//!   answers a long-running operation `{"name": "batches/ID", "metadata": GenerateContentBatch}`.
//! - `GET /v1beta/batches/{id}`: the operation, `metadata.state` `BATCH_STATE_PENDING` |
//!   `RUNNING` | `SUCCEEDED` | `FAILED` | `CANCELLED` | `EXPIRED`, `metadata.batchStats` (int64
//!   counts as strings), `done`, and once done `response` (`responsesFile`, or
//!   `inlinedResponses.inlinedResponses` in request order for inlined requests) or `error`.
//! - `POST /v1beta/batches/{id}:cancel` answers `{}`.
//! - `GET /download/v1beta/files/{id}:download?alt=media`: the responses file, JSON lines in
//!   request order, each `{"key", "response": GenerateContentResponse}` or `{"key", "error":
//!   google.rpc.Status}` (`{"code": gRPC code, "message", "status"}`).
//!
//! The key in `x-goog-api-key` on every path; no query but `alt=media` on a download.
//!
//! Timing, as OpenAI's mock batches (the same [`super::BatchConfig`]), with
//! `T = completion_time`: `PENDING` until `T/10`, then `RUNNING`, the requests answered in
//! order, linearly in time, each as the live endpoint answers it (the same attempt counter,
//! fault draw, hostile answers and billing, without the live limits or latency); at `T` the
//! batch `SUCCEEDED`. A failing batch (`fail_jobs`) ends `FAILED` at `T/10` with an
//! operation `error` and no responses; an expiring one (`expire_jobs`) runs half its requests
//! and ends `EXPIRED` at `T` with their responses. A cancelled batch ends `CANCELLED` at the
//! next poll with the responses of what ran. Prompts holding a marker of
//! [`super::GeminiConfig::batch_dropped`] get no line in the responses, those of
//! `batch_empty` a line with neither `response` nor `error`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::anthropic_api::rfc3339_in;
use super::gemini_api::{Answered, answer, error, key_refusal, query_refusal};
use super::{After, MockServer, Request, State, response};

const UPLOAD: &str = "/upload/v1beta/files";
const BATCH_TYPE: &str =
    "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch";
const OUTPUT_TYPE: &str =
    "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatchOutput";

/// The files and batches of a server.
#[derive(Default)]
pub(super) struct Store {
    inner: Mutex<Inner>,
    /// Held while requests are run, so that two polls never run the same request.
    advancing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Inner {
    /// Uploaded and responses files by name.
    files: HashMap<String, Vec<u8>>,
    /// In creation order.
    jobs: Vec<Job>,
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    Succeed,
    Fail,
    Expire,
}

struct Job {
    name: String,
    model: String,
    display_name: String,
    input_file: Option<String>,
    started: Instant,
    create_time: String,
    fate: Fate,
    requests: Vec<(String, Value)>,
    /// The results of the requests run so far, in order: `{"key", "response" | "error"}`.
    results: Vec<Value>,
    cancel_asked: bool,
    /// The final state, once the batch is done.
    state: Option<&'static str>,
    responses_file: Option<String>,
}

impl Job {
    fn batch_json(&self, now: Instant, total: Duration) -> Value {
        let state = self.state.unwrap_or(
            if now.saturating_duration_since(self.started) < total / 10 {
                "BATCH_STATE_PENDING"
            } else {
                "BATCH_STATE_RUNNING"
            },
        );
        let failed = (self.results.iter())
            .filter(|r| r.get("error").is_some())
            .count();
        let n = self.requests.len();
        let mut batch = json!({
            "@type": BATCH_TYPE, "name": self.name, "model": format!("models/{}", self.model),
            "displayName": self.display_name, "createTime": self.create_time,
            "updateTime": rfc3339_in(Duration::ZERO), "state": state,
            "batchStats": {
                "requestCount": n.to_string(),
                "successfulRequestCount": (self.results.len() - failed).to_string(),
                "failedRequestCount": failed.to_string(),
                "pendingRequestCount": (n - self.results.len()).to_string(),
            },
        });
        if let Some(f) = &self.input_file {
            batch["inputConfig"] = json!({"fileName": f});
        }
        let mut op = json!({"name": self.name, "metadata": batch, "done": self.state.is_some()});
        match (self.state, &self.responses_file) {
            (Some("BATCH_STATE_FAILED"), _) => {
                op["error"] = json!({"code": 13, "message": "The batch failed: internal error."});
            }
            (Some(_), Some(file)) => {
                op["response"] = json!({"@type": OUTPUT_TYPE, "responsesFile": file});
                op["metadata"]["output"] = json!({"responsesFile": file});
            }
            (Some(_), None) => {
                let inlined: Vec<Value> = (self.results.iter())
                    .filter_map(|r| {
                        let mut r = r.clone();
                        let fields = r.as_object_mut()?;
                        fields.remove("prompt");
                        let key = fields.remove("key")?;
                        r["metadata"] = json!({"key": key});
                        Some(r)
                    })
                    .collect();
                op["response"] = json!({"@type": OUTPUT_TYPE,
                                        "inlinedResponses": {"inlinedResponses": inlined}});
            }
            (None, _) => {}
        }
        op
    }

    /// Whether the batch is still to run or running.
    fn open(&self) -> bool {
        self.state.is_none()
    }
}

/// The batches' work due by `now`: requests run, batches ended (their responses written).
async fn advance(st: &State, now: Instant) {
    let _one = st.gemini_batches.advancing.lock().await;
    let total = st.cfg.batch.completion_time;
    // Take the requests due out of the lock (answering one awaits), then put the results back.
    let due: Vec<(usize, Vec<(String, Value)>)> = {
        let store = st.gemini_batches.lock();
        (store.jobs.iter().enumerate())
            .filter(|(_, j)| j.open() && !j.cancel_asked && j.fate != Fate::Fail)
            .map(|(i, j)| {
                let elapsed = now.saturating_duration_since(j.started);
                let n = j.requests.len();
                let mut k = if elapsed >= total {
                    n
                } else if elapsed < total / 10 {
                    0
                } else {
                    ((n as f64 * elapsed.as_secs_f64() / total.as_secs_f64()) as usize).min(n)
                };
                if j.fate == Fate::Expire {
                    k = k.min(n / 2);
                }
                (i, j.requests[j.results.len().min(k)..k].to_vec())
            })
            .collect()
    };
    let mut results = Vec::with_capacity(due.len());
    for (i, todo) in due {
        let mut lines = Vec::with_capacity(todo.len());
        for (key, request) in todo {
            lines.push(run(st, &key, &request).await);
        }
        results.push((i, lines));
    }
    let mut store = st.gemini_batches.lock();
    for (i, lines) in results {
        store.jobs[i].results.extend(lines);
    }
    let mut written = Vec::new();
    for j in store.jobs.iter_mut().filter(|j| j.open()) {
        let elapsed = now.saturating_duration_since(j.started);
        let end = match j.fate {
            Fate::Fail if elapsed >= total / 10 => Some("BATCH_STATE_FAILED"),
            Fate::Expire if elapsed >= total => Some("BATCH_STATE_EXPIRED"),
            Fate::Succeed if elapsed >= total && j.results.len() == j.requests.len() => {
                Some("BATCH_STATE_SUCCEEDED")
            }
            _ => None,
        };
        if let Some(state) = end {
            j.state = Some(state);
            if state != "BATCH_STATE_FAILED" && j.input_file.is_some() {
                let file = format!("files/batch-{}", j.name.trim_start_matches("batches/"));
                written.push((file.clone(), responses(st, &j.results)));
                j.responses_file = Some(file);
            }
        }
    }
    store.files.extend(written);
}

/// The responses file of `results`, in request order, with the configured oddities.
fn responses(st: &State, results: &[Value]) -> Vec<u8> {
    let g = &st.cfg.gemini;
    let mut out = Vec::new();
    for r in results {
        let text = r.get("prompt").and_then(Value::as_str).unwrap_or("");
        if g.batch_dropped.iter().any(|m| text.contains(m.as_str())) {
            continue;
        }
        let mut line = json!({"key": r["key"]});
        if !g.batch_empty.iter().any(|m| text.contains(m.as_str())) {
            for k in ["response", "error"] {
                if let Some(v) = r.get(k) {
                    line[k] = v.clone();
                }
            }
        }
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// One request answered as the live endpoint answers it: its result (with its user text in
/// `prompt`, for the oddities; not written out).
async fn run(st: &State, key: &str, request: &Value) -> Value {
    let prompt = request
        .pointer("/contents/0/parts/0/text")
        .cloned()
        .unwrap_or(Value::Null);
    let mut line = json!({"key": key, "prompt": prompt});
    match answer(st, request, (false, "")).await {
        Answered::Body(v) => line["response"] = v,
        // A `google.rpc.Status`: the gRPC code of the live answer's status.
        Answered::Refused(_, status, message, _) => {
            line["error"] = json!({"code": grpc_code(status), "message": message,
                                   "status": status});
        }
        Answered::Garbage(_) => {
            line["error"] = json!({"code": 13, "message": "Internal error encountered.",
                                   "status": "INTERNAL"});
        }
    }
    line
}

/// The gRPC code of a Google status name.
fn grpc_code(status: &str) -> u64 {
    match status {
        "INVALID_ARGUMENT" => 3,
        "DEADLINE_EXCEEDED" => 4,
        "PERMISSION_DENIED" => 7,
        "RESOURCE_EXHAUSTED" => 8,
        "UNAVAILABLE" => 14,
        _ => 13,
    }
}

impl MockServer {
    /// The Gemini batches created, in creation order: name and number of requests.
    pub fn gemini_batches(&self) -> Vec<(String, u64)> {
        let store = self.state.gemini_batches.lock();
        (store.jobs.iter())
            .map(|j| (j.name.clone(), j.requests.len() as u64))
            .collect()
    }
}

/// Whether `path` belongs to the API.
pub(super) fn routed(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or("");
    path == UPLOAD
        || path.starts_with("/v1beta/batches/")
        || path.starts_with("/download/v1beta/files/")
        || (path.starts_with("/v1beta/models/") && path.ends_with(":batchGenerateContent"))
}

type Refusal = (u16, &'static str, String);

fn bad(message: impl Into<String>) -> Refusal {
    (400, "INVALID_ARGUMENT", message.into())
}

fn not_found(what: &str) -> Refusal {
    (404, "NOT_FOUND", format!("{what} not found."))
}

/// Answers a request of the API.
pub(super) async fn serve(
    sock: &mut TcpStream,
    st: &State,
    req: &Request,
) -> std::io::Result<After> {
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let download = path.starts_with("/download/");
    let refusal = if (download && query != "alt=media") || (!download && !query.is_empty()) {
        Some(query_refusal())
    } else {
        key_refusal(st, req)
    };
    if let Some(refusal) = refusal {
        sock.write_all(&refusal).await?;
        return Ok(After::KeepAlive);
    }
    let reply = if !st.cfg.batch.enabled {
        Err(not_found(path))
    } else if path == UPLOAD && req.method == "POST" {
        upload(st, req).map(|v| v.to_string().into_bytes())
    } else if let Some(rest) = path.strip_prefix("/v1beta/models/") {
        match (
            req.method.as_str(),
            rest.strip_suffix(":batchGenerateContent"),
        ) {
            ("POST", Some(model)) => create(st, req, model).map(|v| v.to_string().into_bytes()),
            _ => Err(not_found(path)),
        }
    } else if let Some(rest) = path.strip_prefix("/v1beta/batches/") {
        match (req.method.as_str(), rest.strip_suffix(":cancel")) {
            ("POST", Some(id)) => cancel(st, id).map(|()| b"{}".to_vec()),
            ("GET", None) => poll(st, rest).await.map(|v| v.to_string().into_bytes()),
            _ => Err(not_found(path)),
        }
    } else if let Some(rest) = path.strip_prefix("/download/v1beta/files/") {
        match (req.method.as_str(), rest.strip_suffix(":download")) {
            ("GET", Some(id)) => download_file(st, id),
            _ => Err(not_found(path)),
        }
    } else {
        Err(not_found(path))
    };
    let bytes = match reply {
        Ok(body) => response(200, &[], &body),
        Err((status, code, message)) => error(status, code, &message, json!([])),
    };
    sock.write_all(&bytes).await?;
    Ok(After::KeepAlive)
}

/// The parts of a `multipart/related` body: each part's headers (lowercase names) and bytes.
fn multipart<'a>(content_type: &str, body: &'a [u8]) -> Result<Vec<(String, &'a [u8])>, String> {
    let (kind, params) = content_type.split_once(';').unwrap_or((content_type, ""));
    if !kind.trim().eq_ignore_ascii_case("multipart/related") {
        return Err("a multipart upload is multipart/related".into());
    }
    let boundary = (params.split(';').filter_map(|p| p.trim().split_once('=')))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .ok_or("the Content-Type names no boundary")?;
    let delimiter = format!("--{boundary}");
    let d = delimiter.as_bytes();
    let find = |from: usize| {
        (body[from..].windows(d.len()))
            .position(|w| w == d)
            .map(|p| p + from)
    };
    let mut parts = Vec::new();
    let mut at = find(0).ok_or("no first boundary")? + d.len();
    loop {
        if body[at..].starts_with(b"--") {
            return Ok(parts);
        }
        let start = at + 2; // CRLF after the boundary
        let next = find(start).ok_or("an unterminated part")?;
        let part = &body[start..next.saturating_sub(2)];
        let split =
            (part.windows(4).position(|w| w == b"\r\n\r\n")).ok_or("a part without headers")?;
        let headers = String::from_utf8_lossy(&part[..split]).to_ascii_lowercase();
        parts.push((headers, &part[split + 4..]));
        at = next + d.len();
    }
}

/// `POST /upload/v1beta/files`.
fn upload(st: &State, req: &Request) -> Result<Value, Refusal> {
    if !(req.header("x-goog-upload-protocol")).is_some_and(|p| p.eq_ignore_ascii_case("multipart"))
    {
        return Err(bad("X-Goog-Upload-Protocol must be multipart"));
    }
    let content_type = req.header("content-type").unwrap_or("");
    let parts = multipart(content_type, &req.body).map_err(bad)?;
    let [(meta_headers, meta), (_, data)] = parts.as_slice() else {
        return Err(bad("a multipart upload has two parts: metadata and media"));
    };
    if !meta_headers.contains("application/json") {
        return Err(bad("the first part is the file's JSON metadata"));
    }
    let meta: Value = serde_json::from_slice(meta).map_err(|e| bad(format!("metadata: {e}")))?;
    if data.len() > st.cfg.batch.max_file_bytes {
        return Err(bad(format!(
            "the file is over {} bytes",
            st.cfg.batch.max_file_bytes
        )));
    }
    let lines = std::str::from_utf8(data)
        .map_err(|_| bad("the file is not UTF-8"))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    let n = st.ids.fetch_add(1, Ordering::Relaxed);
    let name = format!("files/upload{n:08}");
    st.gemini_batches
        .lock()
        .files
        .insert(name.clone(), data.to_vec());
    st.stats.files_uploaded.fetch_add(1, Ordering::Relaxed);
    st.stats
        .batch_lines
        .fetch_add(lines as u64, Ordering::Relaxed);
    let display = meta
        .pointer("/file/displayName")
        .cloned()
        .unwrap_or(Value::Null);
    Ok(json!({"file": {
        "name": name, "displayName": display, "mimeType": "application/jsonl",
        "sizeBytes": data.len().to_string(), "createTime": rfc3339_in(Duration::ZERO),
        "expirationTime": rfc3339_in(Duration::from_secs(48 * 3600)),
        "uri": format!("https://generativelanguage.googleapis.com/v1beta/{name}"),
        "state": "ACTIVE", "source": "UPLOADED",
    }}))
}

/// A field by its camelCase or snake_case name.
fn field<'a>(v: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    v.get(camel).or_else(|| v.get(snake))
}

/// The requests of an input file: `{"key", "request"}` lines, unique keys.
fn file_requests(data: &[u8]) -> Result<Vec<(String, Value)>, Refusal> {
    let text = std::str::from_utf8(data).map_err(|_| bad("the input file is not UTF-8"))?;
    let mut out: Vec<(String, Value)> = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| bad(format!("input file line {}: invalid JSON: {e}", i + 1)))?;
        let key = v.get("key").and_then(Value::as_str);
        let request = v.get("request").filter(|r| r.is_object());
        let (Some(key), Some(request)) = (key, request) else {
            return Err(bad(format!(
                "input file line {}: each line is {{\"key\", \"request\"}}",
                i + 1
            )));
        };
        if out.iter().any(|(k, _)| k == key) {
            return Err(bad(format!(
                "input file line {}: duplicate key {key}",
                i + 1
            )));
        }
        out.push((key.to_string(), request.clone()));
    }
    Ok(out)
}

/// `POST /v1beta/models/{model}:batchGenerateContent`.
fn create(st: &State, req: &Request, model: &str) -> Result<Value, Refusal> {
    let v: Value =
        serde_json::from_slice(&req.body).map_err(|e| bad(format!("Invalid JSON payload: {e}")))?;
    let batch = v.get("batch").ok_or_else(|| bad("batch is required"))?;
    let display_name = field(batch, "displayName", "display_name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("batch.display_name is required"))?;
    let input = field(batch, "inputConfig", "input_config")
        .ok_or_else(|| bad("batch.input_config is required"))?;
    let mut store = st.gemini_batches.lock();
    let (input_file, requests) = match field(input, "fileName", "file_name").and_then(Value::as_str)
    {
        Some(file) => {
            let data = (store.files.get(file)).ok_or_else(|| not_found(file))?;
            (Some(file.to_string()), file_requests(data)?)
        }
        None => {
            let inlined = input
                .pointer("/requests/requests")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("batch.input_config needs file_name or requests"))?;
            let mut requests = Vec::with_capacity(inlined.len());
            for (i, r) in inlined.iter().enumerate() {
                let request = (r.get("request").filter(|r| r.is_object()))
                    .ok_or_else(|| bad(format!("requests[{i}].request is required")))?;
                let key = r.pointer("/metadata/key").and_then(Value::as_str);
                requests.push((key.unwrap_or_default().to_string(), request.clone()));
            }
            (None, requests)
        }
    };
    let cfg = &st.cfg.batch;
    if requests.is_empty() || requests.len() > cfg.max_file_lines {
        return Err(bad(format!(
            "a batch holds 1 to {} requests, got {}",
            cfg.max_file_lines,
            requests.len()
        )));
    }
    let k = store.jobs.len() as u64;
    let fate = if k < cfg.fail_jobs {
        Fate::Fail
    } else if k < cfg.fail_jobs + cfg.expire_jobs {
        Fate::Expire
    } else {
        Fate::Succeed
    };
    let n = st.ids.fetch_add(1, Ordering::Relaxed);
    let job = Job {
        name: format!("batches/mock{n:08}"),
        model: model.to_string(),
        display_name: display_name.to_string(),
        input_file,
        started: Instant::now(),
        create_time: rfc3339_in(Duration::ZERO).unwrap_or_default(),
        fate,
        requests,
        results: vec![],
        cancel_asked: false,
        state: None,
        responses_file: None,
    };
    let op = job.batch_json(Instant::now(), cfg.completion_time);
    store.jobs.push(job);
    st.stats.batches_created.fetch_add(1, Ordering::Relaxed);
    Ok(op)
}

/// `GET /v1beta/batches/{id}`: a cancelled batch ends at this poll.
async fn poll(st: &State, id: &str) -> Result<Value, Refusal> {
    st.stats.batch_polls.fetch_add(1, Ordering::Relaxed);
    let now = Instant::now();
    advance(st, now).await;
    let mut store = st.gemini_batches.lock();
    let name = format!("batches/{id}");
    let mut written = None;
    let op = {
        let job =
            (store.jobs.iter_mut().find(|j| j.name == name)).ok_or_else(|| not_found(&name))?;
        if job.open() && job.cancel_asked {
            job.state = Some("BATCH_STATE_CANCELLED");
            if job.input_file.is_some() {
                let file = format!("files/batch-{id}");
                written = Some((file.clone(), responses(st, &job.results)));
                job.responses_file = Some(file);
            }
        }
        job.batch_json(now, st.cfg.batch.completion_time)
    };
    store.files.extend(written);
    Ok(op)
}

/// `POST /v1beta/batches/{id}:cancel`.
fn cancel(st: &State, id: &str) -> Result<(), Refusal> {
    let mut store = st.gemini_batches.lock();
    let name = format!("batches/{id}");
    let job = (store.jobs.iter_mut().find(|j| j.name == name)).ok_or_else(|| not_found(&name))?;
    if job.open() && !job.cancel_asked {
        job.cancel_asked = true;
        st.stats.batch_cancels.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// `GET /download/v1beta/files/{id}:download?alt=media`.
fn download_file(st: &State, id: &str) -> Result<Vec<u8>, Refusal> {
    let name = format!("files/{id}");
    let data =
        (st.gemini_batches.lock().files.get(&name).cloned()).ok_or_else(|| not_found(&name))?;
    st.stats
        .batch_results_fetched
        .fetch_add(1, Ordering::Relaxed);
    Ok(data)
}
