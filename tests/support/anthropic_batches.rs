//! Anthropic's Message Batches API for the test server, as Anthropic's public reference
//! documents it: `POST /v1/messages/batches` with `{"requests": [{"custom_id", "params"}]}`
//! (custom ids of 1 to 64 letters, digits, `_` or `-`, unique in the batch; at most
//! `max_file_lines` requests and `max_file_bytes` of body), `GET /v1/messages/batches/{id}`
//! (`processing_status` `in_progress` | `canceling` | `ended`, `request_counts`,
//! `results_url` once ended), `GET .../results` (JSON lines, not in request order, each
//! `{"custom_id", "result": {"type": "succeeded" | "errored" | "canceled" | "expired"}}`) and
//! `POST .../cancel`; the headers of the Messages API (`x-api-key`, `anthropic-version`).
//!
//! Timing, as OpenAI's mock batches (the same [`BatchConfig`]), with `T = completion_time`:
//! the requests run in order, linearly in time from creation, each answered as the live
//! endpoint answers it (the same attempt counter, fault draw, prompt cache and billing); at `T`
//! the batch ends. An expiring batch (`expire_jobs`, counting from the first) runs half its
//! requests and ends at `T` with the rest `expired`. A cancelled batch is `canceling` until
//! the next poll, then ends with the requests not yet run `canceled`. An invalid request is an
//! `errored` result, as Anthropic validates `params` while it processes the batch.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::anthropic_api::{Refusal, answer, check_headers, error_json, parse_body, rfc3339_in};
use super::{After, MockServer, Request, State, response};

const BATCHES: &str = "/v1/messages/batches";

/// The batches of a server, in creation order.
#[derive(Default)]
pub(super) struct Store {
    jobs: Mutex<Vec<Job>>,
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, Vec<Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Job {
    id: String,
    started: Instant,
    created_at: String,
    expires: bool,
    requests: Vec<(String, Value)>,
    /// The results of the requests run so far, in order.
    results: Vec<Value>,
    cancel_initiated_at: Option<String>,
    ended_at: Option<String>,
    results_url: String,
}

impl Job {
    fn to_json(&self) -> Value {
        let kind = |k: &str| {
            (self.results.iter())
                .filter(|r| r["result"]["type"] == k)
                .count()
        };
        let status = match (&self.ended_at, &self.cancel_initiated_at) {
            (Some(_), _) => "ended",
            (None, Some(_)) => "canceling",
            (None, None) => "in_progress",
        };
        json!({
            "id": self.id, "type": "message_batch", "processing_status": status,
            "request_counts": {
                "processing": self.requests.len() - self.results.len(),
                "succeeded": kind("succeeded"), "errored": kind("errored"),
                "canceled": kind("canceled"), "expired": kind("expired"),
            },
            "ended_at": self.ended_at, "created_at": self.created_at,
            "expires_at": rfc3339_in(Duration::from_secs(86_400)),
            "archived_at": null, "cancel_initiated_at": self.cancel_initiated_at,
            "results_url": self.ended_at.as_ref().map(|_| &self.results_url),
        })
    }

    /// Runs the requests due by `now`; ends the batch at its end.
    fn advance(&mut self, st: &State, now: Instant) {
        if self.ended_at.is_some() || self.cancel_initiated_at.is_some() {
            return;
        }
        let total = st.cfg.batch.completion_time;
        let elapsed = now.saturating_duration_since(self.started);
        let n = self.requests.len();
        let due = if elapsed >= total {
            n
        } else {
            ((n as f64 * elapsed.as_secs_f64() / total.as_secs_f64()) as usize).min(n)
        };
        let due = if self.expires { due.min(n / 2) } else { due };
        let todo = self.requests[self.results.len().min(due)..due].to_vec();
        for (custom_id, params) in &todo {
            let result = run(st, params);
            self.results
                .push(json!({"custom_id": custom_id, "result": result}));
        }
        if elapsed >= total {
            self.end("expired");
        }
    }

    /// Ends the batch: the requests not run get `unrun` results.
    fn end(&mut self, unrun: &str) {
        let ids: Vec<String> = (self.requests[self.results.len()..].iter())
            .map(|(c, _)| c.clone())
            .collect();
        for custom_id in ids {
            self.results
                .push(json!({"custom_id": custom_id, "result": {"type": unrun}}));
        }
        self.ended_at = rfc3339_in(Duration::ZERO);
    }
}

/// One request answered as the live endpoint answers it: its result.
fn run(st: &State, params: &Value) -> Value {
    let outcome = parse_body(params).and_then(|parsed| answer(st, params, &parsed));
    match outcome {
        Ok(message) => json!({"type": "succeeded", "message": message}),
        Err((_, kind, message)) => json!({"type": "errored", "error": error_json(kind, &message)}),
    }
}

impl MockServer {
    /// The Message Batches created, in creation order: id and number of requests.
    pub fn anthropic_batches(&self) -> Vec<(String, u64)> {
        let jobs = self.state.anthropic_batches.lock();
        (jobs.iter())
            .map(|j| (j.id.clone(), j.requests.len() as u64))
            .collect()
    }

    /// Whether every Message Batch created has ended by now (as a poll would see it, without
    /// counting as one).
    pub fn anthropic_batches_ended(&self) -> bool {
        let mut jobs = self.state.anthropic_batches.lock();
        let now = Instant::now();
        jobs.iter_mut().all(|j| {
            j.advance(&self.state, now);
            j.ended_at.is_some()
        })
    }
}

/// Whether `path` belongs to the API.
pub(super) fn routed(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or("");
    path == BATCHES || path.starts_with("/v1/messages/batches/")
}

/// Answers a request of the API.
pub(super) async fn serve(
    sock: &mut TcpStream,
    st: &State,
    req: &Request,
) -> std::io::Result<After> {
    let path = req.path.split('?').next().unwrap_or("");
    let rest = path.strip_prefix(BATCHES).unwrap_or("");
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let reply =
        check_headers(st, req).and_then(|()| match (req.method.as_str(), segments.as_slice()) {
            ("POST", []) => create(st, req).map(|v| v.to_string().into_bytes()),
            ("GET", [id]) => poll(st, id).map(|v| v.to_string().into_bytes()),
            ("GET", [id, "results"]) => results(st, id),
            ("POST", [id, "cancel"]) => cancel(st, id).map(|v| v.to_string().into_bytes()),
            _ => Err((
                404,
                "not_found_error",
                format!("Not found: {} {}", req.method, req.path),
            )),
        });
    let bytes = match reply {
        Ok(body) => response(200, &[], &body),
        Err((status, kind, message)) => response(
            status,
            &[],
            error_json(kind, &message).to_string().as_bytes(),
        ),
    };
    sock.write_all(&bytes).await?;
    Ok(After::KeepAlive)
}

fn bad(message: impl Into<String>) -> Refusal {
    (400, "invalid_request_error", message.into())
}

/// `POST /v1/messages/batches`.
fn create(st: &State, req: &Request) -> Result<Value, Refusal> {
    let cfg = &st.cfg.batch;
    if req.body.len() > cfg.max_file_bytes {
        let m = format!(
            "Request exceeds the maximum allowed size of {} bytes",
            cfg.max_file_bytes
        );
        return Err((413, "request_too_large", m));
    }
    let v: Value =
        serde_json::from_slice(&req.body).map_err(|e| bad(format!("invalid JSON body: {e}")))?;
    let items = (v.get("requests").and_then(Value::as_array))
        .ok_or_else(|| bad("requests: Field required"))?;
    if items.is_empty() || items.len() > cfg.max_file_lines {
        return Err(bad(format!(
            "requests: a batch holds 1 to {} requests, got {}",
            cfg.max_file_lines,
            items.len()
        )));
    }
    let mut requests: Vec<(String, Value)> = Vec::with_capacity(items.len());
    for (i, r) in items.iter().enumerate() {
        let id = r.get("custom_id").and_then(Value::as_str).unwrap_or("");
        let valid = (1..=64).contains(&id.len())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(bad(format!(
                "requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$"
            )));
        }
        if requests.iter().any(|(c, _)| c == id) {
            return Err(bad(format!(
                "requests.{i}.custom_id: duplicate custom_id {id}"
            )));
        }
        let params = (r.get("params").filter(|p| p.is_object()))
            .ok_or_else(|| bad(format!("requests.{i}.params: Field required")))?;
        requests.push((id.to_string(), params.clone()));
    }
    let mut jobs = st.anthropic_batches.lock();
    let n = st.ids.fetch_add(1, Ordering::Relaxed);
    let id = format!("msgbatch_mock{n:08}");
    let host = req.header("host").unwrap_or("localhost");
    let job = Job {
        results_url: format!("http://{host}{BATCHES}/{id}/results"),
        id,
        started: Instant::now(),
        created_at: rfc3339_in(Duration::ZERO).unwrap_or_default(),
        expires: (jobs.len() as u64) < cfg.expire_jobs,
        requests,
        results: vec![],
        cancel_initiated_at: None,
        ended_at: None,
    };
    let object = job.to_json();
    jobs.push(job);
    st.stats.batches_created.fetch_add(1, Ordering::Relaxed);
    (st.stats.batch_lines).fetch_add(
        object["request_counts"]["processing"].as_u64().unwrap_or(0),
        Ordering::Relaxed,
    );
    Ok(object)
}

fn with_job<T>(st: &State, id: &str, f: impl FnOnce(&mut Job) -> T) -> Result<T, Refusal> {
    let mut jobs = st.anthropic_batches.lock();
    let job = (jobs.iter_mut().find(|j| j.id == id)).ok_or_else(|| {
        (
            404,
            "not_found_error",
            format!("No message batch with id {id}"),
        )
    })?;
    Ok(f(job))
}

/// `GET /v1/messages/batches/{id}`: a `canceling` batch ends at this poll.
fn poll(st: &State, id: &str) -> Result<Value, Refusal> {
    st.stats.batch_polls.fetch_add(1, Ordering::Relaxed);
    with_job(st, id, |j| {
        j.advance(st, Instant::now());
        if j.ended_at.is_none() && j.cancel_initiated_at.is_some() {
            j.end("canceled");
        }
        j.to_json()
    })
}

/// `POST /v1/messages/batches/{id}/cancel`.
fn cancel(st: &State, id: &str) -> Result<Value, Refusal> {
    with_job(st, id, |j| {
        j.advance(st, Instant::now());
        if j.ended_at.is_none() && j.cancel_initiated_at.is_none() {
            j.cancel_initiated_at = rfc3339_in(Duration::ZERO);
            st.stats.batch_cancels.fetch_add(1, Ordering::Relaxed);
        }
        j.to_json()
    })
}

/// `GET /v1/messages/batches/{id}/results`: the results, last request first (Anthropic
/// promises no order).
fn results(st: &State, id: &str) -> Result<Vec<u8>, Refusal> {
    let lines = with_job(st, id, |j| {
        j.advance(st, Instant::now());
        j.ended_at.is_some().then(|| {
            let mut out = String::new();
            for r in j.results.iter().rev() {
                out.push_str(&r.to_string());
                out.push('\n');
            }
            out
        })
    })?;
    let lines = lines.ok_or_else(|| bad(format!("Message Batch {id} has not ended yet")))?;
    st.stats
        .batch_results_fetched
        .fetch_add(1, Ordering::Relaxed);
    Ok(lines.into_bytes())
}
