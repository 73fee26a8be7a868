//! OpenAI's Files and Batches API for the test server: JSONL uploads (`POST /v1/files`), batch
//! jobs (`POST /v1/batches`) whose state is a function of the time since their creation, and
//! their output and error files. Each line is answered as the live endpoint answers its body —
//! the same per-prompt attempt counter, fault draw, answer and usage — when the job reaches it.
//!
//! Timing, with `T = completion_time`: `validating` until `T/10`; then `in_progress`, the lines
//! run in file order, linearly in time; at `T` the job ends. A failed job (`fail_jobs`) ends
//! `failed` at `T/10`; an expired one (`expire_jobs`) runs half its lines and ends `expired` at
//! `T`. A cancelled job stops where its progress is and ends `cancelled` at the next poll.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{
    After, Answer, Fault, MockServer, Proto, Request, State, authorized, count_fault, draw_fault,
    next_attempt, request_prompts, response,
};

#[path = "batch_files.rs"]
mod files;

use files::{delete_file, file_content, upload, with_file};

/// Settings of the Files and Batches API.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Serve the API; off, every path of it answers 404 (a server without a batch API).
    pub enabled: bool,
    /// Time from a job's creation to its end.
    pub completion_time: Duration,
    /// Largest file an upload may carry, in bytes (OpenAI: 200 MB).
    pub max_file_bytes: usize,
    /// Most lines a file may have (OpenAI: 50,000).
    pub max_file_lines: usize,
    /// The first N jobs created end `failed`, with no output file.
    pub fail_jobs: u64,
    /// The N jobs created after the failed ones end `expired`: the first half of their lines
    /// answered, the rest `batch_expired` in the error file.
    pub expire_jobs: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            enabled: true,
            completion_time: Duration::from_millis(300),
            max_file_bytes: 200 * 1024 * 1024,
            max_file_lines: 50_000,
            fail_jobs: 0,
            expire_jobs: 0,
        }
    }
}

impl BatchConfig {
    /// The largest request body the server reads: room for the largest upload and its
    /// multipart framing (a larger one closes the connection).
    pub(super) fn max_body(&self) -> usize {
        (256usize << 20).max(self.max_file_bytes.saturating_add(16 << 20))
    }
}

/// The files and jobs of a server.
#[derive(Default)]
pub(super) struct Store {
    /// The numbers in ids (`file-N`, `batch_N`, `batch_req_N`).
    ids: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    files: HashMap<String, StoredFile>,
    /// In creation order.
    jobs: Vec<Job>,
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.ids.fetch_add(1, Ordering::Relaxed))
    }
}

struct StoredFile {
    filename: String,
    purpose: &'static str,
    created_at: u64,
    bytes: Arc<Vec<u8>>,
    /// The requests of an uploaded file (None for output files).
    lines: Option<Arc<Vec<Line>>>,
}

impl StoredFile {
    fn to_json(&self, id: &str) -> Value {
        json!({
            "id": id, "object": "file", "bytes": self.bytes.len(), "created_at": self.created_at,
            "filename": self.filename, "purpose": self.purpose,
        })
    }
}

/// One request of an uploaded file.
struct Line {
    custom_id: String,
    body: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Complete,
    Fail,
    Expire,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Validating,
    InProgress,
    Failed,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::InProgress => "in_progress",
            Status::Failed => "failed",
            Status::Completed => "completed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }

    fn running(self) -> bool {
        matches!(self, Status::Validating | Status::InProgress)
    }
}

struct Job {
    id: String,
    input_file_id: String,
    metadata: Value,
    started: Instant,
    created_at: u64,
    lines: Arc<Vec<Line>>,
    fate: Fate,
    status: Status,
    /// The lines run so far, in file order: whether each succeeded, and its output line.
    done: Vec<(bool, String)>,
    /// Lines left unrun when the job expired.
    expired: usize,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    /// Unix seconds of the transitions (`in_progress_at`...).
    times: Vec<(&'static str, u64)>,
}

const EXPIRED: &str = "This request could not be executed before the completion window expired.";

impl Job {
    fn to_json(&self) -> Value {
        let time = |name: &str| self.times.iter().find(|(n, _)| *n == name).map(|(_, t)| *t);
        let completed = self.done.iter().filter(|(ok, _)| *ok).count();
        let errors = (self.status == Status::Failed).then(|| {
            json!({"object": "list", "data": [{
                "code": "invalid_request", "line": null, "param": null,
                "message": "The batch failed validation (the test server's injected job failure).",
            }]})
        });
        json!({
            "id": self.id, "object": "batch", "endpoint": "/v1/chat/completions",
            "errors": errors, "input_file_id": self.input_file_id, "completion_window": "24h",
            "status": self.status.name(), "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "created_at": self.created_at,
            "in_progress_at": time("in_progress_at"), "expires_at": self.created_at + 86_400,
            "finalizing_at": time("finalizing_at"), "completed_at": time("completed_at"),
            "failed_at": time("failed_at"), "expired_at": time("expired_at"),
            "cancelling_at": time("cancelling_at"), "cancelled_at": time("cancelled_at"),
            "request_counts": {
                "total": self.lines.len(), "completed": completed,
                "failed": self.done.len() - completed + self.expired,
            },
            "metadata": self.metadata,
        })
    }

    fn stamp(&mut self, name: &'static str, at: u64) {
        self.times.push((name, at));
    }

    /// Runs the lines up to `due` (exclusive).
    fn run_to(&mut self, st: &State, due: usize) {
        let lines = self.lines.clone();
        for line in &lines[self.done.len().min(due)..due] {
            self.done.push(run_line(st, line));
        }
    }

    /// Ends the job in `status` at unix second `at`, with its output and error files (returned,
    /// for the store).
    fn finish(&mut self, st: &State, status: Status, at: u64) -> Vec<(String, StoredFile)> {
        self.status = status;
        if status == Status::Completed {
            self.stamp("finalizing_at", at);
        }
        self.stamp(
            match status {
                Status::Expired => "expired_at",
                Status::Cancelled => "cancelled_at",
                _ => "completed_at",
            },
            at,
        );
        let (mut out, mut err) = (String::new(), String::new());
        for (ok, line) in &self.done {
            let file = if *ok { &mut out } else { &mut err };
            file.push_str(line);
            file.push('\n');
        }
        if status == Status::Expired {
            for line in &self.lines[self.done.len()..] {
                let n = st.batches.id("");
                let v = json!({
                    "id": format!("batch_req_{n}"), "custom_id": line.custom_id, "response": null,
                    "error": {"code": "batch_expired", "message": EXPIRED},
                });
                err.push_str(&v.to_string());
                err.push('\n');
                self.expired += 1;
            }
        }
        let mut files = vec![];
        let mut file = |kind: &str, text: String| {
            let id = st.batches.id("file-");
            files.push((
                id.clone(),
                StoredFile {
                    filename: format!("{}_{kind}.jsonl", self.id),
                    purpose: "batch_output",
                    created_at: at,
                    bytes: Arc::new(text.into_bytes()),
                    lines: None,
                },
            ));
            id
        };
        self.output_file_id = Some(file("output", out));
        self.error_file_id = (!err.is_empty()).then(|| file("error", err));
        files
    }
}

/// One line answered as the live endpoint answers its body: whether it succeeded, and its line
/// of the output or error file.
fn run_line(st: &State, line: &Line) -> (bool, String) {
    let n = st.batches.id("");
    let error = |message: &str, kind: &str| json!({"error": {"message": message, "type": kind}});
    let (status, body) = match request_prompts(Proto::Chat, &line.body) {
        Err(message) => (400, error(message, "invalid_request_error")),
        Ok((prompts, listed)) => {
            let attempt = next_attempt(st, &prompts);
            let (fault, _) = draw_fault(&st.cfg, &prompts, attempt);
            if let Some(f) = fault {
                count_fault(st, f);
            }
            match fault {
                None | Some(Fault::InvalidSchema | Fault::FinishLength | Fault::WrongCount) => {
                    let answer = Answer::new(Proto::Chat, &line.body, &prompts, listed);
                    (200, answer.body(st, fault))
                }
                Some(Fault::RateLimit) => (429, error("Rate limit reached", "rate_limit_error")),
                Some(_) => (500, error("The server had an error", "server_error")),
            }
        }
    };
    let v = json!({
        "id": format!("batch_req_{n}"), "custom_id": line.custom_id,
        "response": {"status_code": status, "request_id": format!("req_{n}"), "body": body},
        "error": null,
    });
    (status == 200, v.to_string())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Brings job `j` to its state at `now`, running the lines due by then. `poll`: a `cancelling`
/// job becomes `cancelled` (one poll after the cancel, as OpenAI's do).
fn advance(st: &State, inner: &mut Inner, j: usize, now: Instant, poll: bool) {
    let job = &mut inner.jobs[j];
    if job.status == Status::Cancelling && poll {
        let files = job.finish(st, Status::Cancelled, unix_now());
        inner.files.extend(files);
        return;
    }
    if !job.status.running() {
        return;
    }
    let total = st.cfg.batch.completion_time;
    let validation = total / 10;
    let elapsed = now.saturating_duration_since(job.started);
    let created_at = job.created_at;
    let at = move |d: Duration| created_at + d.as_secs();
    if elapsed < validation {
        return;
    }
    if job.fate == Fate::Fail {
        job.status = Status::Failed;
        job.stamp("failed_at", at(validation));
        return;
    }
    if job.status == Status::Validating {
        job.status = Status::InProgress;
        job.stamp("in_progress_at", at(validation));
    }
    let n = job.lines.len();
    let due = if elapsed >= total {
        n
    } else {
        let share = (elapsed - validation).as_secs_f64() / (total - validation).as_secs_f64();
        ((n as f64 * share) as usize).min(n)
    };
    let cap = if job.fate == Fate::Expire { n / 2 } else { n };
    job.run_to(st, due.min(cap));
    if elapsed >= total {
        let end = if job.fate == Fate::Expire {
            Status::Expired
        } else {
            Status::Completed
        };
        let files = job.finish(st, end, at(total));
        inner.files.extend(files);
    }
}

/// Cancels job `j` where its progress is now; a finished job stays as it is.
fn cancel_job(st: &State, inner: &mut Inner, j: usize) -> Value {
    advance(st, inner, j, Instant::now(), false);
    let job = &mut inner.jobs[j];
    if job.status.running() {
        job.status = Status::Cancelling;
        job.stamp("cancelling_at", unix_now());
    }
    job.to_json()
}

impl MockServer {
    /// The batches created, in creation order: id and number of lines.
    pub fn batches(&self) -> Vec<(String, u64)> {
        let inner = self.state.batches.lock();
        (inner.jobs.iter())
            .map(|j| (j.id.clone(), j.lines.len() as u64))
            .collect()
    }

    /// The state of batch `id` now, as a poll would show it (without counting as one): its
    /// status (`validating`, `in_progress`, `completed`...) and the lines completed.
    pub fn batch_state(&self, id: &str) -> Option<(&'static str, u64)> {
        let st = &self.state;
        let mut inner = st.batches.lock();
        let j = inner.jobs.iter().position(|j| j.id == id)?;
        advance(st, &mut inner, j, Instant::now(), false);
        let job = &inner.jobs[j];
        let completed = job.done.iter().filter(|(ok, _)| *ok).count() as u64;
        Some((job.status.name(), completed))
    }

    /// Whether every batch created has ended (completed, failed, expired or cancelled) by now.
    pub fn batches_ended(&self) -> bool {
        let ids: Vec<String> = self.batches().into_iter().map(|(id, _)| id).collect();
        ids.iter().all(|id| {
            self.batch_state(id).is_some_and(|(status, _)| {
                !["validating", "in_progress", "cancelling"].contains(&status)
            })
        })
    }

    /// Cancels a batch from the provider's side (as from its dashboard): it stops where its
    /// progress is, `cancelling` until the next poll. False if there is no such batch.
    pub fn cancel_batch(&self, id: &str) -> bool {
        let st = &self.state;
        let mut inner = st.batches.lock();
        let Some(j) = inner.jobs.iter().position(|j| j.id == id) else {
            return false;
        };
        cancel_job(st, &mut inner, j);
        true
    }
}

/// Whether `path` belongs to the API.
pub(super) fn routed(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or("");
    ["/v1/files", "/v1/batches"]
        .iter()
        .any(|p| path == *p || path.strip_prefix(p).is_some_and(|r| r.starts_with('/')))
}

/// Answers a request of the API.
pub(super) async fn serve(
    sock: &mut TcpStream,
    st: &Arc<State>,
    req: &Request,
) -> std::io::Result<After> {
    let answer = answer(st, req);
    sock.write_all(&answer).await?;
    Ok(After::KeepAlive)
}

type Reply = Result<Value, (u16, String)>;

fn answer(st: &State, req: &Request) -> Vec<u8> {
    let path = req.path.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    let invalid = || (404, format!("Invalid URL ({} {})", req.method, req.path));
    let reply: Reply = if !st.cfg.batch.enabled {
        Err(invalid())
    } else if !authorized(&st.cfg, req) {
        Err((401, "Incorrect API key provided".to_string()))
    } else {
        match (req.method.as_str(), segments.as_slice()) {
            ("POST", ["files"]) => upload(st, req),
            ("GET", ["files", id]) => with_file(st, id, |f| f.to_json(id)),
            ("GET", ["files", id, "content"]) => return file_content(st, id),
            ("DELETE", ["files", id]) => delete_file(st, id),
            ("POST", ["batches"]) => create(st, req),
            ("GET", ["batches"]) => Ok(list(st)),
            ("GET", ["batches", id]) => poll(st, id),
            ("POST", ["batches", id, "cancel"]) => cancel(st, id),
            _ => Err(invalid()),
        }
    };
    let (status, body) = match reply {
        Ok(v) => (200, v),
        Err((status, message)) => (
            status,
            json!({"error": {"message": message, "type": "invalid_request_error",
                             "param": null, "code": null}}),
        ),
    };
    response(status, &[], body.to_string().as_bytes())
}

fn bad(message: impl Into<String>) -> (u16, String) {
    (400, message.into())
}

/// `POST /v1/batches`.
fn create(st: &State, req: &Request) -> Reply {
    let v: Value = serde_json::from_slice(&req.body).map_err(|e| {
        bad(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })?;
    let field = |k: &str| v.get(k).and_then(Value::as_str);
    let input = field("input_file_id").ok_or_else(|| bad("'input_file_id' is required."))?;
    let endpoint = field("endpoint");
    // OpenAI names the endpoint with its version, Azure OpenAI without.
    if !matches!(endpoint, Some("/v1/chat/completions" | "/chat/completions")) {
        return Err(bad(format!(
            "Invalid value for 'endpoint': {endpoint:?}; this server batches '/v1/chat/completions'."
        )));
    }
    if field("completion_window") != Some("24h") {
        return Err(bad(
            "Invalid value for 'completion_window': it must be '24h'.",
        ));
    }
    let mut inner = st.batches.lock();
    let file =
        (inner.files.get(input)).ok_or_else(|| (404, format!("No such File object: {input}")))?;
    let lines = (file.lines.clone())
        .ok_or_else(|| bad(format!("File {input} does not have purpose 'batch'.")))?;
    let k = inner.jobs.len() as u64;
    let cfg = &st.cfg.batch;
    let fate = match k {
        k if k < cfg.fail_jobs => Fate::Fail,
        k if k < cfg.fail_jobs + cfg.expire_jobs => Fate::Expire,
        _ => Fate::Complete,
    };
    let job = Job {
        id: st.batches.id("batch_"),
        input_file_id: input.to_string(),
        metadata: v.get("metadata").cloned().unwrap_or(Value::Null),
        started: Instant::now(),
        created_at: unix_now(),
        lines,
        fate,
        status: Status::Validating,
        done: vec![],
        expired: 0,
        output_file_id: None,
        error_file_id: None,
        times: vec![],
    };
    let object = job.to_json();
    inner.jobs.push(job);
    st.stats.batches_created.fetch_add(1, Ordering::Relaxed);
    Ok(object)
}

fn find(inner: &Inner, id: &str) -> Result<usize, (u16, String)> {
    (inner.jobs.iter().position(|j| j.id == id))
        .ok_or_else(|| (404, format!("No batch found with id '{id}'.")))
}

/// `GET /v1/batches/{id}`.
fn poll(st: &State, id: &str) -> Reply {
    st.stats.batch_polls.fetch_add(1, Ordering::Relaxed);
    let mut inner = st.batches.lock();
    let j = find(&inner, id)?;
    advance(st, &mut inner, j, Instant::now(), true);
    Ok(inner.jobs[j].to_json())
}

/// `GET /v1/batches`: every batch, newest first.
fn list(st: &State) -> Value {
    let mut inner = st.batches.lock();
    let now = Instant::now();
    for j in 0..inner.jobs.len() {
        advance(st, &mut inner, j, now, true);
    }
    let data: Vec<Value> = inner.jobs.iter().rev().map(Job::to_json).collect();
    let id = |b: Option<&Value>| b.map_or(Value::Null, |b| b["id"].clone());
    let (first, last) = (id(data.first()), id(data.last()));
    json!({"object": "list", "first_id": first, "last_id": last, "has_more": false, "data": data})
}

/// `POST /v1/batches/{id}/cancel`.
fn cancel(st: &State, id: &str) -> Reply {
    let mut inner = st.batches.lock();
    let j = find(&inner, id)?;
    st.stats.batch_cancels.fetch_add(1, Ordering::Relaxed);
    Ok(cancel_job(st, &mut inner, j))
}
