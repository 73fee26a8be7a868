//! The batch queue of one model: the calls that reach it wait in a file being gathered; the file
//! goes out when no call has arrived for `collect` (or it is full), is stored durably as a job
//! the moment the provider accepts it, and is polled until its results are in; each result goes
//! back to the call that waits for it, which validates it like a live answer.
//!
//! A stored job of an earlier run (killed while waiting) answers the calls it holds: the first
//! call of one of its keys starts polling it, nothing is uploaded again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::job::{JobPhase, JobStatus};
use super::protocol::BatchApi;
use crate::cache::{RequestKey, ResponseCache, StoredJob, key_hex};
use crate::config::{BatchConfig, BatchRetry};
use crate::types::{ErrorKind, LlmError, LlmRequest, LlmResponse};

type Answer = Result<LlmResponse, LlmError>;

/// Consecutive failed polls after which a job's calls fail.
const MAX_POLL_FAILURES: u32 = 10;

/// One job as the progress display and `sluice batches` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobView {
    /// The provider's state of the job.
    pub status: JobStatus,
    /// Requests it holds.
    pub lines: u64,
    /// When it was submitted (Unix seconds).
    pub created_at: u64,
    /// Submitted by an earlier run and picked up by this one.
    pub resumed: bool,
    /// Left running without waiting (`--wait false`).
    pub parked: bool,
}

#[derive(Default)]
struct State {
    /// Request lines gathered for the next file, in arrival order: each key with the end of
    /// its line in `buf`, which holds the lines one after another (the file's body as it
    /// will be uploaded, so it is not copied again).
    pending: Vec<(RequestKey, usize)>,
    buf: Vec<u8>,
    last_added: Option<Instant>,
    /// A flusher task is running.
    flushing: bool,
    /// Calls waiting for their key's result (gathered or in a job).
    waiters: HashMap<RequestKey, Vec<oneshot::Sender<Answer>>>,
    /// Keys of stored jobs nobody has asked for yet, and those jobs.
    resumable: HashMap<RequestKey, String>,
    stored: HashMap<String, StoredJob>,
    /// Results that arrived before their call (a resumed job collected early).
    ready: HashMap<RequestKey, Answer>,
    jobs: BTreeMap<String, JobView>,
    polling: usize,
}

/// The batch queue of one model.
#[derive(Debug)]
pub struct BatchQueue {
    name: String,
    endpoint: String,
    api: BatchApi,
    cfg: BatchConfig,
    cache: Option<Arc<ResponseCache>>,
    wait: bool,
    stopped: AtomicBool,
    files: AtomicU64,
    state: Mutex<State>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("pending", &self.pending.len())
            .field("jobs", &self.jobs.len())
            .finish()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl BatchQueue {
    /// The queue of model `name` (whose request keys name `endpoint`), picking up the jobs of
    /// earlier runs stored in `cache`; with `wait` false, a job not finished at its first poll
    /// is left running.
    pub fn new(
        name: &str,
        endpoint: String,
        api: BatchApi,
        cfg: BatchConfig,
        cache: Option<Arc<ResponseCache>>,
        wait: bool,
    ) -> BatchQueue {
        let mut state = State::default();
        let stored = cache.as_ref().map(|c| c.jobs()).transpose();
        match stored {
            Ok(jobs) => {
                for job in jobs.unwrap_or_default() {
                    if job.endpoint != endpoint {
                        continue;
                    }
                    for key in job.request_keys() {
                        state.resumable.insert(key, job.id.clone());
                    }
                    state.stored.insert(job.id.clone(), job);
                }
            }
            Err(e) => tracing::warn!("cannot read the stored batch jobs: {e}"),
        }
        BatchQueue {
            name: name.to_string(),
            endpoint,
            api,
            cfg,
            cache,
            wait,
            stopped: AtomicBool::new(false),
            files: AtomicU64::new(0),
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Most requests in one file: how many rows a statement should keep waiting at once.
    pub fn max_requests(&self) -> usize {
        self.cfg.max_requests
    }

    /// Whether a call whose batch result failed is tried again live.
    pub fn retries_live(&self) -> bool {
        self.cfg.retry == BatchRetry::Live
    }

    /// Uploads nothing more (Ctrl-C); jobs already submitted keep running at the provider.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// The jobs this run submitted or picked up.
    pub fn jobs(&self) -> Vec<JobView> {
        self.lock().jobs.values().cloned().collect()
    }

    /// Whether every call of this model waits on a job left running (`--wait false`): nothing
    /// is gathered, uploaded or polled, and some job is parked.
    pub fn only_parked(&self) -> bool {
        self.idle() && self.lock().jobs.values().any(|j| j.parked)
    }

    /// Whether nothing is gathered, uploaded or polled.
    pub fn idle(&self) -> bool {
        let st = self.lock();
        !st.flushing && st.pending.is_empty() && st.polling == 0
    }

    /// The result of `req` (key `key`) from the batch API: from a stored job that holds it,
    /// or from the next file.
    pub async fn call(self: &Arc<Self>, key: RequestKey, req: &LlmRequest) -> Answer {
        let rx = {
            let mut st = self.lock();
            if let Some(r) = st.ready.remove(&key) {
                return r;
            }
            let (tx, rx) = oneshot::channel();
            let waiting = st.waiters.get(&key).is_some_and(|w| !w.is_empty());
            if let Some(job) = st.resumable.remove(&key) {
                st.waiters.entry(key).or_default().push(tx);
                if let Some(job) = st.stored.remove(&job) {
                    self.resume(&mut st, job);
                }
            } else if waiting {
                st.waiters.entry(key).or_default().push(tx);
            } else {
                let line = self.api.request_line(&key, req);
                if line.len() as u64 > self.cfg.max_bytes {
                    return Err(LlmError::new(
                        ErrorKind::TooLarge,
                        format!(
                            "the request is {} bytes, over models.{}.batch.max_bytes ({})",
                            line.len(),
                            self.name,
                            self.cfg.max_bytes
                        ),
                    ));
                }
                st.waiters.entry(key).or_default().push(tx);
                st.buf.extend_from_slice(&line);
                let end = st.buf.len();
                st.pending.push((key, end));
                st.last_added = Some(Instant::now());
                if !st.flushing {
                    st.flushing = true;
                    tokio::spawn(self.clone().flush_loop());
                }
            }
            rx
        };
        rx.await.unwrap_or_else(|_| {
            Err(LlmError::new(
                ErrorKind::Connection,
                "the batch queue stopped before the result arrived",
            ))
        })
    }

    fn resume(self: &Arc<Self>, st: &mut State, job: StoredJob) {
        let keys = job.request_keys();
        let status = JobStatus {
            id: job.id.clone(),
            status: "submitted".into(),
            total: keys.len() as u64,
            ..JobStatus::default()
        };
        self.watch(st, &job, keys, status, true);
    }

    /// Shows job `job` (holding `keys`, in state `status`) and polls it until its end.
    fn watch(
        self: &Arc<Self>,
        st: &mut State,
        job: &StoredJob,
        keys: Vec<RequestKey>,
        status: JobStatus,
        resumed: bool,
    ) {
        let view = JobView {
            status,
            lines: keys.len() as u64,
            created_at: job.created_at,
            resumed,
            parked: false,
        };
        st.jobs.insert(job.id.clone(), view);
        st.polling += 1;
        tokio::spawn(self.clone().poll_loop(job.id.clone(), keys));
    }

    /// Sends files while calls are gathered; ends when none are left.
    async fn flush_loop(self: Arc<Self>) {
        loop {
            loop {
                let wait = {
                    let st = self.lock();
                    let full = st.pending.len() >= self.cfg.max_requests
                        || st.buf.len() as u64 >= self.cfg.max_bytes;
                    let quiet = st.last_added.map_or(Duration::ZERO, |t| t.elapsed());
                    if full {
                        Duration::ZERO
                    } else {
                        self.cfg.collect.saturating_sub(quiet)
                    }
                };
                if wait.is_zero() {
                    break;
                }
                tokio::time::sleep(wait).await;
            }
            let (keys, body) = {
                let mut st = self.lock();
                if self.stopped.load(Ordering::Relaxed) {
                    // Ctrl-C: nothing more goes out; the calls wait until the run ends.
                    st.flushing = false;
                    return;
                }
                let file = self.take_file(&mut st);
                if file.0.is_empty() && st.pending.is_empty() {
                    st.flushing = false;
                    return;
                }
                file
            };
            if !keys.is_empty() {
                self.send_file(keys, body).await;
            }
        }
    }

    /// The next file's lines: as many as the limits allow, skipping calls nobody waits for
    /// any more (their statement was dropped).
    fn take_file(&self, st: &mut State) -> (Vec<RequestKey>, Vec<u8>) {
        let (mut taken, mut end) = (0, 0);
        for (_, e) in &st.pending {
            if taken >= self.cfg.max_requests || (*e as u64 > self.cfg.max_bytes && taken > 0) {
                break;
            }
            taken += 1;
            end = *e;
        }
        let rest = st.buf.split_off(end);
        let head = std::mem::replace(&mut st.buf, rest);
        let lines: Vec<(RequestKey, usize)> = st.pending.drain(..taken).collect();
        for (_, e) in &mut st.pending {
            *e -= end;
        }
        let live = |st: &State, key: &RequestKey| {
            st.waiters
                .get(key)
                .is_some_and(|w| w.iter().any(|tx| !tx.is_closed()))
        };
        if lines.iter().all(|(k, _)| live(st, k)) {
            return (lines.into_iter().map(|(k, _)| k).collect(), head);
        }
        // Some statements were dropped while their lines waited: leave their lines out.
        let (mut keys, mut body, mut start) = (Vec::new(), Vec::with_capacity(head.len()), 0);
        for (key, e) in lines {
            if live(st, &key) {
                keys.push(key);
                body.extend_from_slice(&head[start..e]);
            } else {
                st.waiters.remove(&key);
            }
            start = e;
        }
        (keys, body)
    }

    /// Uploads and submits one file, stores the job, and starts polling it.
    async fn send_file(self: &Arc<Self>, keys: Vec<RequestKey>, body: Vec<u8>) {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        let name = format!("sluice-{}-{}-{n}.jsonl", self.name, unix_now());
        let (file, status) = match self.api.submit(&name, body).await {
            Ok(s) => s,
            Err(e) => {
                self.deliver(keys.into_iter().map(|k| (k, Err(e.clone()))).collect());
                return;
            }
        };
        let job = StoredJob {
            id: status.id.clone(),
            model: self.name.clone(),
            endpoint: self.endpoint.clone(),
            created_at: unix_now(),
            input_file_id: file,
            keys: keys.iter().map(key_hex).collect(),
        };
        if let Some(cache) = self.cache.clone() {
            let stored = job.clone();
            let put = tokio::task::spawn_blocking(move || cache.put_job(&stored)).await;
            if let Ok(Err(e)) = put {
                tracing::warn!(
                    "batch job {} is not stored (a rerun cannot resume it): {e}",
                    job.id
                );
            }
        }
        let mut st = self.lock();
        self.watch(&mut st, &job, keys, status, false);
    }

    /// Polls job `id` until it is final, then collects it; without `wait`, polls once.
    async fn poll_loop(self: Arc<Self>, id: String, keys: Vec<RequestKey>) {
        let mut failures = 0;
        loop {
            match self.api.status(&id).await {
                Ok(status) => {
                    failures = 0;
                    let done = status.is_final();
                    self.update(&id, |v| v.status = status.clone());
                    if done {
                        self.collect(&id, &keys, &status).await;
                        break;
                    }
                    if !self.wait {
                        self.update(&id, |v| v.parked = true);
                        break;
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!("polling batch job {id}: {}", e.message);
                    if e.kind.is_systemic() || failures >= MAX_POLL_FAILURES {
                        self.deliver(keys.iter().map(|k| (*k, Err(e.clone()))).collect());
                        break;
                    }
                }
            }
            tokio::time::sleep(self.cfg.poll).await;
        }
        self.lock().polling -= 1;
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut JobView)) {
        if let Some(v) = self.lock().jobs.get_mut(id) {
            f(v);
        }
    }

    /// Downloads a final job's results and hands each to its call; a request without a result
    /// gets the error its job's end stands for. The job is forgotten once its results are read.
    async fn collect(&self, id: &str, keys: &[RequestKey], status: &JobStatus) {
        let mut results: HashMap<RequestKey, Answer> = HashMap::with_capacity(keys.len());
        let mut unread = None;
        for at in &status.results {
            match self.download(at).await {
                Ok(bytes) => {
                    for line in bytes.split(|b| *b == b'\n') {
                        if let Some((k, r)) = self.api.result_line(line) {
                            results.insert(k, r);
                        }
                    }
                }
                Err(e) => unread = Some(e),
            }
        }
        // A result file that could not be read keeps the job stored: a later run reads it.
        let forget = unread.is_none();
        let missing = unread.unwrap_or_else(|| self.missing(id, status));
        let answers = keys
            .iter()
            .map(|k| {
                (
                    *k,
                    results.remove(k).unwrap_or_else(|| Err(missing.clone())),
                )
            })
            .collect();
        if let Some(cache) = self.cache.clone().filter(|_| forget) {
            let id = id.to_string();
            let removed = tokio::task::spawn_blocking(move || cache.remove_job(&id)).await;
            if let Ok(Err(e)) = removed {
                tracing::warn!("{e}");
            }
        }
        self.deliver(answers);
    }

    /// A job's results at `at` (a file, a URL), with a few tries.
    async fn download(&self, at: &str) -> Result<Vec<u8>, LlmError> {
        let mut tries = 0;
        loop {
            match self.api.content(at).await {
                Ok(b) => return Ok(b),
                Err(e) if tries >= 3 || e.kind.is_systemic() => return Err(e),
                Err(_) => tries += 1,
            }
            tokio::time::sleep(self.cfg.poll.min(Duration::from_secs(5))).await;
        }
    }

    /// The error of a request its final job has no result for.
    fn missing(&self, id: &str, status: &JobStatus) -> LlmError {
        match status.phase {
            JobPhase::Expired => LlmError::new(
                ErrorKind::Timeout,
                format!(
                    "batch job {id} expired before it ran this request (completion window {})",
                    self.cfg.completion_window
                ),
            ),
            JobPhase::Cancelled => LlmError::new(
                ErrorKind::Batch,
                format!(
                    "batch job {id} of model {} was cancelled before it ran this request; the \
                     same command submits what was not answered anew",
                    self.name
                ),
            ),
            JobPhase::Failed => LlmError::new(
                ErrorKind::ServerError,
                format!(
                    "batch job {id} failed: {}",
                    status.errors.as_deref().unwrap_or("no reason given")
                ),
            ),
            JobPhase::Completed | JobPhase::Open => LlmError::new(
                ErrorKind::MalformedResponse,
                format!("batch job {id} ended without a result for this request"),
            ),
        }
    }

    /// Hands results to their calls; a result nobody waits for yet is kept for its call.
    fn deliver(&self, answers: Vec<(RequestKey, Answer)>) {
        let mut st = self.lock();
        for (key, answer) in answers {
            st.resumable.remove(&key);
            match st.waiters.remove(&key) {
                Some(txs) if !txs.is_empty() => {
                    for tx in txs {
                        let _ = tx.send(answer.clone());
                    }
                }
                _ => {
                    st.ready.insert(key, answer);
                }
            }
        }
    }
}
