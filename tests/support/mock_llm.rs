//! The project's own OpenAI-compatible test server: real HTTP/1.1 on 127.0.0.1 with configurable
//! latency and seeded fault injection. Every answer is derived from the prompt — strings carry
//! the tag `[h]` where `h = prompt_hash(system, user)` — so tests can prove that each output
//! belongs to its row.
//!
//! Faults are decided per request from `(seed, prompt hash, attempt)`, where `attempt` counts
//! the earlier requests with the same prompt: a prompt's fault sequence is reproducible whatever
//! the interleaving of concurrent requests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[path = "clock.rs"]
mod clock;
#[path = "confidence.rs"]
pub mod confidence;
#[path = "limits.rs"]
mod limits;

#[path = "anthropic_api.rs"]
mod anthropic_api;
#[path = "anthropic_batches.rs"]
mod anthropic_batches;
#[path = "azure_api.rs"]
mod azure_api;
#[path = "batch_api.rs"]
mod batch_api;
#[path = "embeddings_api.rs"]
mod embeddings_api;
#[path = "gemini_api.rs"]
mod gemini_api;
#[path = "gemini_batches.rs"]
mod gemini_batches;
#[path = "prefix_cache.rs"]
mod prefix_cache;

#[allow(unused_imports)]
pub use anthropic_api::{AnthropicConfig, AnthropicPrices, Bill, Hostile, SONNET_4_5};
pub use batch_api::BatchConfig;
#[allow(unused_imports)]
pub use confidence::ConfidenceConfig;
#[allow(unused_imports)]
pub use embeddings_api::{DEFAULT_DIM, embedding_of};
#[allow(unused_imports)]
pub use gemini_api::{GeminiBill, GeminiConfig, GeminiHostile};
pub use limits::Limits;
use limits::{Buckets, Verdict};
use prefix_cache::PrefixCache;
pub use prefix_cache::PrefixCacheConfig;

/// A fault the server can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// HTTP 429 with `Retry-After` and `retry-after-ms`.
    RateLimit,
    /// HTTP 500.
    Server500,
    /// HTTP 503.
    Server503,
    /// No answer: hang for `hang`, then close.
    Timeout,
    /// Headers with the full Content-Length, half the body, then close.
    DroppedConnection,
    /// HTTP 200 with a body that is not JSON.
    MalformedJson,
    /// HTTP 200 with the first 60% of a valid body (Content-Length matches what is sent).
    TruncatedBody,
    /// HTTP 200, valid envelope, content that violates the requested schema.
    InvalidSchema,
    /// HTTP 200, half the content, `finish_reason = "length"`.
    FinishLength,
    /// HTTP 200; a packed prompt's answer has one item too few (other prompts: no fault).
    WrongCount,
}

impl Fault {
    /// snake_case name used in stats.
    pub fn name(self) -> &'static str {
        match self {
            Fault::RateLimit => "rate_limit",
            Fault::Server500 => "server_500",
            Fault::Server503 => "server_503",
            Fault::Timeout => "timeout",
            Fault::DroppedConnection => "dropped_connection",
            Fault::MalformedJson => "malformed_json",
            Fault::TruncatedBody => "truncated_body",
            Fault::InvalidSchema => "invalid_schema",
            Fault::FinishLength => "finish_length",
            Fault::WrongCount => "wrong_count",
        }
    }
}

/// Probability of each random fault per request.
#[derive(Debug, Clone, Default)]
pub struct FaultRates {
    /// HTTP 429.
    pub rate_limit: f64,
    /// HTTP 500.
    pub server_500: f64,
    /// HTTP 503.
    pub server_503: f64,
    /// Hang past the client timeout.
    pub timeout: f64,
    /// Connection closed mid-body.
    pub dropped_connection: f64,
    /// Body not JSON.
    pub malformed_json: f64,
    /// Body cut short.
    pub truncated_body: f64,
    /// Content violating the schema.
    pub invalid_schema: f64,
    /// `finish_reason = length`.
    pub finish_length: f64,
    /// A packed prompt answered with one item too few.
    pub wrong_count: f64,
}

impl FaultRates {
    fn table(&self) -> [(f64, Fault); 10] {
        [
            (self.rate_limit, Fault::RateLimit),
            (self.server_500, Fault::Server500),
            (self.server_503, Fault::Server503),
            (self.timeout, Fault::Timeout),
            (self.dropped_connection, Fault::DroppedConnection),
            (self.malformed_json, Fault::MalformedJson),
            (self.truncated_body, Fault::TruncatedBody),
            (self.invalid_schema, Fault::InvalidSchema),
            (self.finish_length, Fault::FinishLength),
            (self.wrong_count, Fault::WrongCount),
        ]
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Base latency before answering.
    pub latency: Duration,
    /// Extra uniform latency in `0..jitter`, seeded.
    pub jitter: Duration,
    /// Seed of the fault and jitter draws.
    pub seed: u64,
    /// Random faults.
    pub faults: FaultRates,
    /// If the user prompt contains the marker, always answer with that fault.
    pub permanent: Vec<(String, Fault)>,
    /// If the user prompt contains the marker, its nth request gets the nth entry (`None`:
    /// answered normally), and its requests past the list are answered normally.
    pub scripted: Vec<(String, Vec<Option<Fault>>)>,
    /// Delay requested by 429 responses.
    pub retry_after_ms: u64,
    /// If set, injected 429s send this `Retry-After` verbatim (and no `retry-after-ms`): for
    /// servers that send odd values.
    pub retry_after_raw: Option<String>,
    /// How long a Timeout fault hangs.
    pub hang: Duration,
    /// If set, requests must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Bill usage as OpenAI does (tiktoken `o200k_base`; chat messages by the cookbook's rule,
    /// plus the `response_format` schema) instead of characters / 4 (cheap, for benchmarks).
    pub tiktoken_usage: bool,
    /// A provider's limits: a concurrency cap, request and token buckets (none by default).
    pub limits: Limits,
    /// The Files and Batches API (`/v1/files`, `/v1/batches`): timing, limits, job faults.
    pub batch: BatchConfig,
    /// A prefix cache on the chat and completions endpoints (off by default): answers then
    /// report `usage.prompt_tokens_details.cached_tokens`. Blocks are made of the tokens
    /// `prompt_tokens` counts (tiktoken's with `tiktoken_usage`, else four characters each).
    pub prefix_cache: Option<PrefixCacheConfig>,
    /// If set, answers report this as `usage.prompt_tokens_details.cached_tokens` verbatim
    /// (for servers that send odd values).
    pub cached_tokens_raw: Option<Value>,
    /// Azure OpenAI's paths accept only this `api-version` (any when unset).
    pub azure_api_version: Option<String>,
    /// Anthropic's Messages API (`/v1/messages`): its prompt cache, 529s, hostile answers.
    pub anthropic: AnthropicConfig,
    /// Google's Gemini API (`/v1beta/models/...`): thinking tokens, implicit caching,
    /// `retryDelay`, hostile answers.
    pub gemini: GeminiConfig,
    /// Chat answers' token log-probabilities, and a small model that is sometimes wrong.
    pub confidence: ConfidenceConfig,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            seed: 42,
            faults: FaultRates::default(),
            permanent: vec![],
            scripted: vec![],
            retry_after_ms: 20,
            retry_after_raw: None,
            hang: Duration::from_secs(10),
            api_key: None,
            tiktoken_usage: false,
            limits: Limits::default(),
            batch: BatchConfig::default(),
            prefix_cache: None,
            cached_tokens_raw: None,
            azure_api_version: None,
            anthropic: AnthropicConfig::default(),
            gemini: GeminiConfig::default(),
            confidence: ConfidenceConfig::default(),
        }
    }
}

/// Counters of what the server saw.
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    /// Every POST to a completions endpoint.
    pub requests: u64,
    /// Prompts in those requests (a list-prompt request carries several).
    pub prompts: u64,
    /// Prompts answered 200 with a valid answer.
    pub ok: u64,
    /// Injected faults by name.
    pub faults: HashMap<String, u64>,
    /// Requests per prompt hash.
    pub by_prompt: HashMap<String, u64>,
    /// Chat requests per `model` named.
    pub by_model: HashMap<String, u64>,
    /// Most requests being processed at once.
    pub max_in_flight: u64,
    /// Requests being processed now (received, not yet answered; not zeroed by a reset).
    pub in_flight: u64,
    /// Tokens of the requests the limits let through, as the token bucket counts them.
    pub tokens_admitted: u64,
    /// Successful `POST /v1/files` and Gemini uploads (`POST /upload/v1beta/files`).
    pub files_uploaded: u64,
    /// Lines in those files, and requests in Message Batches created.
    pub batch_lines: u64,
    /// Successful `POST /v1/batches`, `POST /v1/messages/batches` and Gemini's
    /// `:batchGenerateContent`.
    pub batches_created: u64,
    /// `GET /v1/batches/{id}`, `GET /v1/messages/batches/{id}` and `GET /v1beta/batches/{id}`.
    pub batch_polls: u64,
    /// `POST /v1/batches/{id}/cancel` of a known batch (and of a Message Batch or a Gemini
    /// batch still open).
    pub batch_cancels: u64,
    /// Results of ended Message Batches read (`GET /v1/messages/batches/{id}/results`), and
    /// Gemini files downloaded (`GET /download/v1beta/files/{id}:download`).
    pub batch_results_fetched: u64,
    /// Prompt tokens of the answered requests that the prefix cache did not hold (computed).
    pub prefill_computed: u64,
    /// Prompt tokens of the answered requests taken from the prefix cache (reported as
    /// `cached_tokens`).
    pub prefill_cached: u64,
    /// Requests that came by an Azure OpenAI path and passed its checks.
    pub azure_requests: u64,
    /// The deployments Azure paths named.
    pub azure_deployments: Vec<String>,
    /// What the Messages API billed.
    pub anthropic: Bill,
    /// What the Gemini API billed, and its early retries.
    pub gemini: GeminiBill,
}

impl StatsSnapshot {
    /// The snapshot as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "requests": self.requests, "prompts": self.prompts, "ok": self.ok, "faults": self.faults,
            "distinct_prompts": self.by_prompt.len(), "max_in_flight": self.max_in_flight,
            "tokens_admitted": self.tokens_admitted, "files_uploaded": self.files_uploaded,
            "batch_lines": self.batch_lines, "batches_created": self.batches_created,
            "batch_polls": self.batch_polls, "batch_cancels": self.batch_cancels,
            "prefill_computed": self.prefill_computed, "prefill_cached": self.prefill_cached,
            "azure_requests": self.azure_requests,
            "anthropic": {
                "requests": self.anthropic.requests, "input_tokens": self.anthropic.input,
                "cache_creation_input_tokens": self.anthropic.cache_write,
                "cache_read_input_tokens": self.anthropic.cache_read,
                "output_tokens": self.anthropic.output,
            },
            "gemini": {
                "requests": self.gemini.requests, "prompt_token_count": self.gemini.prompt,
                "cached_content_token_count": self.gemini.cached,
                "candidates_token_count": self.gemini.candidates,
                "thoughts_token_count": self.gemini.thoughts, "embedded": self.gemini.embedded,
                "rate_limited": self.gemini.rate_limited,
                "early_retries": self.gemini.early_retries,
            },
        })
    }
}

#[derive(Debug, Default)]
struct Stats {
    requests: AtomicU64,
    prompts: AtomicU64,
    ok: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    tokens_admitted: AtomicU64,
    files_uploaded: AtomicU64,
    batch_lines: AtomicU64,
    batches_created: AtomicU64,
    batch_polls: AtomicU64,
    batch_cancels: AtomicU64,
    batch_results_fetched: AtomicU64,
    prefill_computed: AtomicU64,
    prefill_cached: AtomicU64,
    azure_requests: AtomicU64,
    azure_deployments: Mutex<Vec<String>>,
    faults: Mutex<HashMap<String, u64>>,
    by_prompt: Mutex<HashMap<String, u64>>,
    by_model: Mutex<HashMap<String, u64>>,
}

impl Stats {
    /// Runs `serve` counted as one request on the wire (in flight, and the peak of it).
    async fn counted<T>(&self, serve: impl std::future::Future<Output = T>) -> T {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_in_flight.fetch_max(now, Ordering::Relaxed);
        let result = serve.await;
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        result
    }
}

struct State {
    cfg: MockConfig,
    stats: Stats,
    ids: AtomicU64,
    buckets: Buckets,
    batches: batch_api::Store,
    prefix: PrefixCache,
    anthropic: anthropic_api::Store,
    anthropic_batches: anthropic_batches::Store,
    gemini: gemini_api::Store,
    gemini_batches: gemini_batches::Store,
    /// Set by [`MockServer::stop`]: every connection closes.
    stopped: tokio::sync::watch::Sender<bool>,
    /// Set by [`MockServer::hold`]: requests wait before they are answered, until released.
    held: tokio::sync::watch::Sender<bool>,
}

/// A running server; dropping it stops accepting connections.
pub struct MockServer {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// First 12 hex characters of sha256(system + "\u{1f}" + user).
pub fn prompt_hash(system: Option<&str>, user: &str) -> String {
    let mut h = Sha256::new();
    h.update(system.unwrap_or("").as_bytes());
    h.update("\u{1f}".as_bytes());
    h.update(user.as_bytes());
    let digest = h.finalize();
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

impl MockServer {
    /// Starts on a random port of 127.0.0.1.
    pub async fn start(cfg: MockConfig) -> std::io::Result<MockServer> {
        Self::start_on(cfg, 0).await
    }

    /// Starts on the given port of 127.0.0.1 (0: random).
    pub async fn start_on(cfg: MockConfig, port: u16) -> std::io::Result<MockServer> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            cfg,
            stats: Stats::default(),
            ids: AtomicU64::new(0),
            buckets: Buckets::default(),
            batches: batch_api::Store::default(),
            prefix: PrefixCache::default(),
            anthropic: anthropic_api::Store::default(),
            anthropic_batches: anthropic_batches::Store::default(),
            gemini: gemini_api::Store::default(),
            gemini_batches: gemini_batches::Store::default(),
            stopped: tokio::sync::watch::Sender::new(false),
            held: tokio::sync::watch::Sender::new(false),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let _ = sock.set_nodelay(true);
                let st = st.clone();
                let mut stopped = st.stopped.subscribe();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve_connection(sock, st) => {}
                        _ = stopped.wait_for(|s| *s) => {}
                    }
                });
            }
        });
        Ok(MockServer {
            addr,
            state,
            accept,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Current counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.state.snapshot()
    }

    /// The counters, readable from another thread while the server runs.
    pub fn clone_stats_handle(&self) -> impl Fn() -> StatsSnapshot + Clone + Send + 'static {
        let state = self.state.clone();
        move || state.snapshot()
    }

    /// Stops the server as a crashed one: it accepts no more connections (they are refused)
    /// and closes those it has, requests in flight unanswered.
    pub fn stop(&self) {
        self.accept.abort();
        self.state.stopped.send_replace(true);
    }

    /// From now on, requests are received (and counted) but not answered until
    /// [`MockServer::release`]: a machine that is slower than any other, as long as the test
    /// needs it to be.
    pub fn hold(&self) {
        self.state.held.send_replace(true);
    }

    /// Answers the requests held, and those after them, again.
    pub fn release(&self) {
        self.state.held.send_replace(false);
    }

    /// Zeroes the counters (per-prompt attempt counts too).
    pub fn reset_stats(&self) {
        self.state.reset();
    }
}

impl State {
    fn snapshot(&self) -> StatsSnapshot {
        let s = &self.stats;
        StatsSnapshot {
            requests: s.requests.load(Ordering::Relaxed),
            prompts: s.prompts.load(Ordering::Relaxed),
            ok: s.ok.load(Ordering::Relaxed),
            faults: s.faults.lock().map(|m| m.clone()).unwrap_or_default(),
            by_prompt: s.by_prompt.lock().map(|m| m.clone()).unwrap_or_default(),
            by_model: s.by_model.lock().map(|m| m.clone()).unwrap_or_default(),
            max_in_flight: s.max_in_flight.load(Ordering::Relaxed),
            in_flight: s.in_flight.load(Ordering::Relaxed),
            tokens_admitted: s.tokens_admitted.load(Ordering::Relaxed),
            files_uploaded: s.files_uploaded.load(Ordering::Relaxed),
            batch_lines: s.batch_lines.load(Ordering::Relaxed),
            batches_created: s.batches_created.load(Ordering::Relaxed),
            batch_polls: s.batch_polls.load(Ordering::Relaxed),
            batch_cancels: s.batch_cancels.load(Ordering::Relaxed),
            batch_results_fetched: s.batch_results_fetched.load(Ordering::Relaxed),
            prefill_computed: s.prefill_computed.load(Ordering::Relaxed),
            prefill_cached: s.prefill_cached.load(Ordering::Relaxed),
            azure_requests: s.azure_requests.load(Ordering::Relaxed),
            azure_deployments: (s.azure_deployments.lock())
                .map(|d| d.clone())
                .unwrap_or_default(),
            anthropic: self.anthropic.bill(),
            gemini: self.gemini.bill(),
        }
    }

    fn reset(&self) {
        let s = &self.stats;
        s.requests.store(0, Ordering::Relaxed);
        s.prompts.store(0, Ordering::Relaxed);
        s.ok.store(0, Ordering::Relaxed);
        s.max_in_flight.store(0, Ordering::Relaxed);
        s.tokens_admitted.store(0, Ordering::Relaxed);
        for c in [
            &s.files_uploaded,
            &s.batch_lines,
            &s.batches_created,
            &s.batch_polls,
            &s.batch_cancels,
            &s.batch_results_fetched,
            &s.prefill_computed,
            &s.prefill_cached,
            &s.azure_requests,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.anthropic.reset();
        self.gemini.reset();
        if let Ok(mut m) = s.faults.lock() {
            m.clear();
        }
        if let Ok(mut m) = s.by_model.lock() {
            m.clear();
        }
        if let Ok(mut m) = s.by_prompt.lock() {
            m.clear();
        }
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one request of at most `max_body` bytes of body; Ok(None) at a clean end of the
/// connection.
async fn read_request(
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
    max_body: usize,
) -> std::io::Result<Option<Request>> {
    const MAX_HEAD: usize = 64 * 1024;
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too large"));
        }
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if len > max_body {
        return Err(std::io::Error::other("request body too large"));
    }
    let body_start = head_end + 4;
    buf.reserve((body_start + len).saturating_sub(buf.len()));
    while buf.len() < body_start + len {
        let mut chunk = vec![0u8; (body_start + len - buf.len()).min(64 * 1024)];
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[body_start..body_start + len].to_vec();
    buf.drain(..body_start + len);
    Ok(Some(Request {
        method,
        path,
        headers,
        body,
    }))
}

fn response(status: u16, extra_headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in extra_headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn error_body(message: &str, kind: &str) -> Vec<u8> {
    json!({"error": {"message": message, "type": kind}})
        .to_string()
        .into_bytes()
}

/// What to do with the connection after answering.
enum After {
    KeepAlive,
    Close,
}

async fn serve_connection(mut sock: TcpStream, st: Arc<State>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8192);
    loop {
        let Some(req) = read_request(&mut sock, &mut buf, st.cfg.batch.max_body()).await? else {
            return Ok(());
        };
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        match handle(&mut sock, &st, req).await? {
            After::Close => {
                let _ = sock.shutdown().await;
                return Ok(());
            }
            After::KeepAlive if close => return Ok(()),
            After::KeepAlive => {}
        }
    }
}

async fn handle(sock: &mut TcpStream, st: &Arc<State>, req: Request) -> std::io::Result<After> {
    let azure = req.path.starts_with("/openai/");
    let req = match azure_api::front(&st.cfg, req) {
        Ok((req, deployment)) => {
            if azure {
                st.stats.azure_requests.fetch_add(1, Ordering::Relaxed);
            }
            if let (Some(d), Ok(mut seen)) = (deployment, st.stats.azure_deployments.lock())
                && !seen.contains(&d)
            {
                seen.push(d);
            }
            req
        }
        Err(refusal) => {
            sock.write_all(&refusal).await?;
            return Ok(After::KeepAlive);
        }
    };
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/v1/models") => {
            let body = json!({"object": "list", "data": [{"id": "mock", "object": "model"}]});
            sock.write_all(&response(200, &[], body.to_string().as_bytes()))
                .await?;
            Ok(After::KeepAlive)
        }
        ("GET", "/stats") => {
            let body = st.snapshot().to_json().to_string();
            sock.write_all(&response(200, &[], body.as_bytes())).await?;
            Ok(After::KeepAlive)
        }
        ("POST", "/stats/reset") => {
            st.reset();
            sock.write_all(&response(200, &[], b"{}")).await?;
            Ok(After::KeepAlive)
        }
        ("POST", "/v1/embeddings") => embeddings_api::serve_embeddings(sock, st, &req).await,
        (_, path) if anthropic_batches::routed(path) => {
            anthropic_batches::serve(sock, st, &req).await
        }
        ("POST", "/v1/messages") => {
            st.stats
                .counted(anthropic_api::serve_messages(sock, st, &req))
                .await
        }
        (_, path) if gemini_batches::routed(path) => gemini_batches::serve(sock, st, &req).await,
        ("POST", path) if path.starts_with("/v1beta/models/") => {
            st.stats.counted(gemini_api::serve(sock, st, &req)).await
        }
        ("POST", "/v1/chat/completions") | ("POST", "/v1/completions") => {
            let proto = if req.path == "/v1/chat/completions" {
                Proto::Chat
            } else if serde_json::from_slice::<Value>(&req.body)
                .is_ok_and(|v| v.get("model_name").is_some())
            {
                Proto::Lamini
            } else {
                Proto::Completions
            };
            let s = &st.stats;
            s.requests.fetch_add(1, Ordering::Relaxed);
            let now = s.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            s.max_in_flight.fetch_max(now, Ordering::Relaxed);
            let mut released = false;
            let result = serve_llm(sock, st, &req, proto, &mut released).await;
            if !released {
                s.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            result
        }
        (_, path) if batch_api::routed(path) => batch_api::serve(sock, st, &req).await,
        _ => {
            sock.write_all(&response(
                404,
                &[],
                &error_body("no such endpoint", "invalid_request_error"),
            ))
            .await?;
            Ok(After::KeepAlive)
        }
    }
}

fn seeded(seed: u64, hash: &str, attempt: u64) -> fastrand::Rng {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut h);
    hash.hash(&mut h);
    attempt.hash(&mut h);
    fastrand::Rng::with_seed(h.finish())
}

fn count_fault(st: &State, f: Fault) {
    if let Ok(mut m) = st.stats.faults.lock() {
        *m.entry(f.name().to_string()).or_default() += 1;
    }
}

/// The wire protocol of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    /// `POST /v1/chat/completions`: one prompt as messages.
    Chat,
    /// `POST /v1/completions` (OpenAI-compatible): `prompt` is a string or a list of strings.
    Completions,
    /// `POST /v1/completions` with `model_name` (Lamini): list prompts and `output_type`.
    Lamini,
}

/// One prompt of a request.
struct Prompt {
    system: Option<String>,
    user: String,
    hash: String,
}

/// Lamini's flat `output_type` as a JSON schema.
fn lamini_schema(output_type: &Map<String, Value>) -> Value {
    let props: Map<String, Value> = output_type
        .iter()
        .map(|(k, t)| {
            let ty = match t.as_str() {
                Some("int") => "integer",
                Some("float") => "number",
                Some("bool") => "boolean",
                _ => "string",
            };
            (k.clone(), json!({"type": ty}))
        })
        .collect();
    json!({"type": "object", "properties": props})
}

/// The provider's limits applied to a request: the headers of its answer, or the whole 429
/// answer of a refusal (counted in the faults as `over_concurrency`, `over_rpm`, `over_tpm`).
fn admit(
    st: &State,
    parsed: &Value,
    prompts: &[Prompt],
) -> Result<Vec<(&'static str, String)>, Vec<u8>> {
    let cfg = &st.cfg;
    let max_tokens = parsed
        .get("max_tokens")
        .or_else(|| parsed.get("max_completion_tokens"))
        .or_else(|| parsed.get("max_new_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(256);
    let tokens: u64 = prompts
        .iter()
        .map(|p| {
            (p.system.as_ref().map_or(0, String::len) + p.user.len()).div_ceil(4) as u64
                + max_tokens
        })
        .sum();
    let in_flight = st.stats.in_flight.load(Ordering::Relaxed);
    let concurrency_wait = Duration::from_millis(cfg.retry_after_ms);
    match cfg
        .limits
        .admit(&st.buckets, in_flight, tokens as f64, concurrency_wait)
    {
        Verdict::Serve(headers) => {
            st.stats
                .tokens_admitted
                .fetch_add(tokens, Ordering::Relaxed);
            Ok(headers)
        }
        Verdict::Refuse {
            reason,
            wait,
            mut headers,
        } => {
            if let Ok(mut m) = st.stats.faults.lock() {
                *m.entry(reason.to_string()).or_default() += 1;
            }
            let ms = wait.as_millis() as u64 + 1;
            headers.push(("retry-after", ms.div_ceil(1000).to_string()));
            headers.push(("retry-after-ms", ms.to_string()));
            let body = error_body("Rate limit reached for requests", "rate_limit_error");
            Err(response(429, &headers, &body))
        }
    }
}

async fn bad_request(sock: &mut TcpStream, message: &str) -> std::io::Result<After> {
    let body = error_body(message, "invalid_request_error");
    sock.write_all(&response(400, &[], &body)).await?;
    Ok(After::KeepAlive)
}

/// Whether the request carries the configured API key (always, when none is configured).
fn authorized(cfg: &MockConfig, req: &Request) -> bool {
    cfg.api_key
        .as_ref()
        .is_none_or(|key| req.header("authorization") == Some(format!("Bearer {key}").as_str()))
}

async fn serve_llm(
    sock: &mut TcpStream,
    st: &Arc<State>,
    req: &Request,
    proto: Proto,
    released: &mut bool,
) -> std::io::Result<After> {
    // The latency counts from when the request was read.
    let received = Instant::now();
    let cfg = &st.cfg;
    if !authorized(cfg, req) {
        let body = error_body("Incorrect API key provided", "invalid_request_error");
        sock.write_all(&response(401, &[], &body)).await?;
        return Ok(After::KeepAlive);
    }
    let parsed: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return bad_request(sock, &format!("invalid JSON body: {e}")).await,
    };
    let (prompts, listed) = match request_prompts(proto, &parsed) {
        Ok(p) => p,
        Err(message) => return bad_request(sock, message).await,
    };
    let s = &st.stats;
    s.prompts.fetch_add(prompts.len() as u64, Ordering::Relaxed);
    if let Some(model) = parsed.get("model").and_then(Value::as_str) {
        let mut m = s.by_model.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(model.to_string()).or_default() += 1;
    }
    let rate_headers = match admit(st, &parsed, &prompts) {
        Ok(headers) => headers,
        Err(refusal) => {
            // A refused request holds no slot: it stops counting before its 429 is sent, or
            // the request the client sends in its place could be refused for it.
            s.in_flight.fetch_sub(1, Ordering::Relaxed);
            *released = true;
            sock.write_all(&refusal).await?;
            return Ok(After::KeepAlive);
        }
    };
    let attempt = next_attempt(st, &prompts);
    let (fault, mut rng) = draw_fault(cfg, &prompts, attempt);
    // The prefix held when the request arrives; what it computes is held once it is answered
    // (or, with a compute-bound prefill, once computed).
    let prefill = Prefill::lookup(st, proto, &prompts);
    let computed = match &prefill {
        Some(p) => p.compute(st, fault).await,
        None => None,
    };
    let jitter = if cfg.jitter.is_zero() {
        Duration::ZERO
    } else {
        cfg.jitter.mul_f64(rng.f64())
    };
    let delay = cfg.latency + jitter;
    if !delay.is_zero() {
        clock::sleep_until(computed.unwrap_or(received) + delay).await;
    }
    let _ = st.held.subscribe().wait_for(|held| !*held).await;
    let mut answer = Answer::new(proto, &parsed, &prompts, listed);
    answer.judge(&cfg.confidence);
    answer.cached_tokens = prefill.as_ref().map(|p| p.cached);
    let Some(fault) = fault else {
        s.ok.fetch_add(prompts.len() as u64, Ordering::Relaxed);
        let body = answer.body(st, None);
        Prefill::answered(st, prefill, &body);
        let body = body.to_string();
        let answer = response(200, &rate_headers, body.as_bytes());
        // The request stops counting against the concurrency cap once its answer is ready,
        // before it is sent, as a server frees a slot when generation ends.
        s.in_flight.fetch_sub(1, Ordering::Relaxed);
        *released = true;
        sock.write_all(&answer).await?;
        return Ok(After::KeepAlive);
    };
    count_fault(st, fault);
    if matches!(
        fault,
        Fault::InvalidSchema | Fault::FinishLength | Fault::WrongCount
    ) {
        // Answered in full, with usage: its prefix was computed.
        Prefill::answered(st, prefill, &answer.body(st, Some(fault)));
    }
    serve_fault(sock, st, &answer, fault).await
}

/// A request's use of the prefix cache: its prompts' blocks and the tokens the cache held.
struct Prefill {
    blocks: Vec<Vec<u64>>,
    cached: u64,
    /// Its prompts' tokens as the cache counts them.
    tokens: u64,
}

impl Prefill {
    /// Looks the prompts of a chat or completions request up in the prefix cache (None when
    /// the server has none).
    fn lookup(st: &State, proto: Proto, prompts: &[Prompt]) -> Option<Prefill> {
        let cfg = st.cfg.prefix_cache.as_ref()?;
        if proto == Proto::Lamini {
            return None;
        }
        let blocks: Vec<Vec<u64>> = prompts
            .iter()
            .map(|p| prefix_cache::block_hashes(&cache_tokens(&st.cfg, p), cfg.block_tokens))
            .collect();
        let tokens = prompts
            .iter()
            .map(|p| cache_tokens(&st.cfg, p).len() as u64)
            .sum();
        let hits: usize = blocks.iter().map(|b| st.prefix.lookup(b)).sum();
        Some(Prefill {
            cached: (hits * cfg.block_tokens) as u64,
            blocks,
            tokens,
        })
    }

    /// With a compute-bound prefill: waits until the tokens the cache did not hold are
    /// computed (after those of the requests that came before), holds the blocks of a request
    /// that will be answered in full, and says when that was. None without one.
    async fn compute(&self, st: &State, fault: Option<Fault>) -> Option<Instant> {
        let cfg = st.cfg.prefix_cache.as_ref()?;
        let rate = cfg.prefill_tokens_per_s?;
        let done = st
            .prefix
            .schedule_prefill(self.tokens.saturating_sub(self.cached), rate);
        clock::sleep_until(done).await;
        let answered = matches!(
            fault,
            None | Some(Fault::InvalidSchema | Fault::FinishLength | Fault::WrongCount)
        );
        if answered {
            for b in &self.blocks {
                st.prefix.insert(b, cfg.capacity_blocks);
            }
        }
        Some(done)
    }

    /// Counts the prompt tokens of an answered request (`body`) as computed or cached, and
    /// holds its blocks.
    fn answered(st: &State, prefill: Option<Prefill>, body: &Value) {
        let (Some(p), Some(cfg)) = (prefill, &st.cfg.prefix_cache) else {
            return;
        };
        let prompt = body.pointer("/usage/prompt_tokens").and_then(Value::as_u64);
        let prompt = prompt.unwrap_or(0);
        let cached = p.cached.min(prompt);
        let s = &st.stats;
        s.prefill_cached.fetch_add(cached, Ordering::Relaxed);
        s.prefill_computed
            .fetch_add(prompt - cached, Ordering::Relaxed);
        for b in &p.blocks {
            st.prefix.insert(b, cfg.capacity_blocks);
        }
    }
}

/// The tokens of a prompt as the prefix cache blocks them: tiktoken's (with `tiktoken_usage`)
/// or four characters each, of the system text then the user text.
fn cache_tokens(cfg: &MockConfig, p: &Prompt) -> Vec<u64> {
    let text = format!("{}{}", p.system.as_deref().unwrap_or(""), p.user);
    if cfg.tiktoken_usage {
        let bpe = tiktoken_rs::o200k_base_singleton();
        return (bpe.encode_ordinary(&text).into_iter())
            .map(u64::from)
            .collect();
    }
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks_exact(4)
        .map(|c| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            c.hash(&mut h);
            h.finish()
        })
        .collect()
}

/// Answers a request with an injected fault.
async fn serve_fault(
    sock: &mut TcpStream,
    st: &State,
    answer: &Answer<'_>,
    fault: Fault,
) -> std::io::Result<After> {
    let cfg = &st.cfg;
    match fault {
        Fault::RateLimit => {
            let secs = cfg.retry_after_ms.div_ceil(1000);
            let headers = match &cfg.retry_after_raw {
                Some(raw) => vec![("retry-after", raw.clone())],
                None => vec![
                    ("retry-after", secs.to_string()),
                    ("retry-after-ms", cfg.retry_after_ms.to_string()),
                ],
            };
            let body = error_body("Rate limit reached", "rate_limit_error");
            sock.write_all(&response(429, &headers, &body)).await?;
            Ok(After::KeepAlive)
        }
        Fault::Server500 | Fault::Server503 => {
            let status = if fault == Fault::Server500 { 500 } else { 503 };
            let body = error_body("The server had an error", "server_error");
            sock.write_all(&response(status, &[], &body)).await?;
            Ok(After::KeepAlive)
        }
        Fault::Timeout => {
            tokio::time::sleep(cfg.hang).await;
            Ok(After::Close)
        }
        Fault::DroppedConnection => {
            let body = answer.body(st, None).to_string().into_bytes();
            let full = response(200, &[], &body);
            let cut = full.len() - body.len() / 2;
            sock.write_all(&full[..cut]).await?;
            sock.flush().await?;
            Ok(After::Close)
        }
        Fault::MalformedJson => {
            let body = b"{\"id\": \"chatcmpl-mock\", \"choices\": [ {not json";
            sock.write_all(&response(200, &[], body)).await?;
            Ok(After::KeepAlive)
        }
        Fault::TruncatedBody => {
            let body = answer.body(st, None).to_string().into_bytes();
            let cut = &body[..body.len() * 6 / 10];
            sock.write_all(&response(200, &[], cut)).await?;
            Ok(After::KeepAlive)
        }
        Fault::InvalidSchema | Fault::FinishLength | Fault::WrongCount => {
            let body = answer.body(st, Some(fault)).to_string();
            sock.write_all(&response(200, &[], body.as_bytes())).await?;
            Ok(After::KeepAlive)
        }
    }
}

/// The prompts of a request and whether they came as a list, or the message of its 400.
fn request_prompts(proto: Proto, parsed: &Value) -> Result<(Vec<Prompt>, bool), &'static str> {
    match proto {
        Proto::Chat => {
            let messages = parsed
                .get("messages")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let content_of =
                |m: &Value| m.get("content").and_then(Value::as_str).map(str::to_string);
            let system = messages
                .iter()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("system"))
                .and_then(content_of);
            let user = messages
                .iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
                .and_then(content_of)
                .ok_or("messages must contain a user message")?;
            let hash = prompt_hash(system.as_deref(), &user);
            Ok((vec![Prompt { system, user, hash }], false))
        }
        Proto::Completions | Proto::Lamini => {
            let (list, listed) = match parsed.get("prompt") {
                Some(Value::String(s)) => Some((vec![s.clone()], false)),
                Some(Value::Array(a)) if !a.is_empty() => a
                    .iter()
                    .map(|p| p.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .map(|l| (l, true)),
                _ => None,
            }
            .ok_or("prompt must be a string or a list of strings")?;
            let prompts = list
                .into_iter()
                .map(|user| Prompt {
                    hash: prompt_hash(None, &user),
                    system: None,
                    user,
                })
                .collect();
            Ok((prompts, listed))
        }
    }
}

/// Counts one more request of each prompt (live or batched alike); returns how many requests
/// the first prompt had before: faults and jitter are drawn from that history.
fn next_attempt(st: &State, prompts: &[Prompt]) -> u64 {
    let mut m = st.stats.by_prompt.lock().unwrap_or_else(|p| p.into_inner());
    let mut first = 0;
    for (i, p) in prompts.iter().enumerate() {
        let e = m.entry(p.hash.clone()).or_default();
        *e += 1;
        if i == 0 {
            first = *e - 1;
        }
    }
    first
}

/// The fault of a request's `attempt` (None: answer normally): a permanent marker in a prompt,
/// else a seeded draw; with the generator, whose next value is the jitter's.
fn draw_fault(
    cfg: &MockConfig,
    prompts: &[Prompt],
    attempt: u64,
) -> (Option<Fault>, fastrand::Rng) {
    let mut rng = seeded(cfg.seed, &prompts[0].hash, attempt);
    let marked = |marker: &str| prompts.iter().any(|p| p.user.contains(marker));
    if let Some((_, faults)) = cfg.scripted.iter().find(|(marker, _)| marked(marker)) {
        let fault = usize::try_from(attempt)
            .ok()
            .and_then(|i| faults.get(i).copied());
        return (fault.flatten(), rng);
    }
    let fault = cfg
        .permanent
        .iter()
        .find(|(marker, _)| prompts.iter().any(|p| p.user.contains(marker.as_str())))
        .map(|(_, f)| *f)
        .or_else(|| {
            let u = rng.f64();
            let mut acc = 0.0;
            cfg.faults.table().into_iter().find_map(|(p, f)| {
                acc += p;
                (u < acc).then_some(f)
            })
        });
    (fault, rng)
}

/// What the server answers to a request's prompts: the live endpoint and a batch line alike.
struct Answer<'a> {
    proto: Proto,
    parsed: &'a Value,
    prompts: &'a [Prompt],
    listed: bool,
    /// The schema each prompt's answer follows.
    schema: Option<Value>,
    /// The generated value of each prompt (with a schema).
    values: Vec<Option<Value>>,
    /// The answer text of each prompt.
    contents: Vec<String>,
    /// The prompt tokens the prefix cache held (reported when set).
    cached_tokens: Option<u64>,
    /// The confidence of each answer (its least likely token's probability).
    confidences: Vec<f64>,
}

impl<'a> Answer<'a> {
    fn new(proto: Proto, parsed: &'a Value, prompts: &'a [Prompt], listed: bool) -> Self {
        // The schema each prompt's answer follows, and whether the answer is a JSON object.
        let (schema, json_object) = match proto {
            Proto::Lamini => (
                parsed
                    .get("output_type")
                    .and_then(Value::as_object)
                    .map(lamini_schema),
                false,
            ),
            _ => (
                parsed
                    .pointer("/response_format/json_schema/schema")
                    .cloned(),
                parsed
                    .pointer("/response_format/type")
                    .and_then(Value::as_str)
                    == Some("json_object"),
            ),
        };
        let values: Vec<Option<Value>> = prompts
            .iter()
            .map(|p| {
                let s = schema.as_ref()?;
                Some(packed_value(s, &p.user).unwrap_or_else(|| generate(s, &p.hash, None, None)))
            })
            .collect();
        let contents: Vec<String> = prompts
            .iter()
            .zip(&values)
            .map(|(p, v)| match (v, json_object) {
                (Some(v), _) => v.to_string(),
                (None, true) => json!({"answer": format!("[{}]", p.hash)}).to_string(),
                (None, false) => format!("Answer [{}]: the passage reports the figure.", p.hash),
            })
            .collect();
        Answer {
            proto,
            parsed,
            prompts,
            listed,
            schema,
            confidences: vec![0.999; prompts.len()],
            values,
            contents,
            cached_tokens: None,
        }
    }

    /// Answers as the request's model does: the small model of a cascade is sometimes wrong,
    /// and sometimes unsure.
    fn judge(&mut self, cfg: &ConfidenceConfig) {
        let model = self
            .parsed
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("");
        for (i, p) in self.prompts.iter().enumerate() {
            let (right, confidence) = confidence::judge(cfg, model, &p.hash);
            self.confidences[i] = confidence;
            if right {
                continue;
            }
            match &self.values[i] {
                Some(v) => {
                    let w = confidence::wrong(v);
                    self.contents[i] = w.to_string();
                    self.values[i] = Some(w);
                }
                None => {
                    self.contents[i] = confidence::wrong(&json!(self.contents[i]))
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                }
            }
        }
    }

    /// The body of a 200 answer: the answers, or with `fault`'s content (`InvalidSchema`:
    /// values of the wrong type; `FinishLength`: half of each, `finish_reason = length`).
    fn body(&self, st: &State, fault: Option<Fault>) -> Value {
        match fault {
            Some(Fault::InvalidSchema) => {
                let bad: Vec<String> = self
                    .values
                    .iter()
                    .map(|v| match v {
                        Some(Value::Object(_)) => json!(["wrong"]).to_string(),
                        Some(Value::Array(_)) => json!("wrong").to_string(),
                        Some(Value::String(_)) => json!(42).to_string(),
                        Some(_) => json!("wrong").to_string(),
                        None => String::new(),
                    })
                    .collect();
                self.envelope(st, &bad, "stop")
            }
            Some(Fault::WrongCount) => {
                let short: Vec<String> = (self.values.iter().zip(&self.contents))
                    .map(|(v, c)| match v.as_ref().and_then(one_item_less) {
                        Some(v) => v.to_string(),
                        None => c.clone(),
                    })
                    .collect();
                self.envelope(st, &short, "stop")
            }
            Some(Fault::FinishLength) => {
                let half: Vec<String> = (self.contents.iter())
                    .map(|c| c.chars().take(c.chars().count() / 2).collect())
                    .collect();
                self.envelope(st, &half, "length")
            }
            _ => self.envelope(st, &self.contents, "stop"),
        }
    }

    /// The protocol's answer carrying `contents`, with usage.
    fn envelope(&self, st: &State, contents: &[String], finish: &str) -> Value {
        let (proto, parsed, prompts) = (self.proto, self.parsed, self.prompts);
        let model = (parsed.get("model"))
            .or_else(|| parsed.get("model_name"))
            .and_then(Value::as_str)
            .unwrap_or("mock");
        let id = st.ids.fetch_add(1, Ordering::Relaxed);
        let (pt, ct) = if st.cfg.tiktoken_usage {
            billed_tokens(proto, parsed, prompts, contents)
        } else {
            let prompt_chars: usize = prompts
                .iter()
                .map(|p| {
                    p.system.as_deref().map_or(0, |s| s.chars().count()) + p.user.chars().count()
                })
                .sum();
            let pt = prompt_chars / 4 + 1;
            (
                pt,
                contents.iter().map(|c| c.chars().count()).sum::<usize>() / 4 + 1,
            )
        };
        let mut usage =
            json!({"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct});
        let cached = (st.cfg.cached_tokens_raw.clone())
            .or_else(|| self.cached_tokens.map(|c| json!(c.min(pt as u64))));
        if let Some(cached) = cached {
            usage["prompt_tokens_details"] = json!({ "cached_tokens": cached });
        }
        match proto {
            Proto::Chat => {
                let mut choice = json!({"index": 0,
                    "message": {"role": "assistant", "content": contents[0]},
                    "finish_reason": finish, "logprobs": null});
                if parsed.get("logprobs") == Some(&json!(true)) {
                    choice["logprobs"] = confidence::logprobs(&contents[0], self.confidences[0]);
                }
                json!({
                    "id": format!("chatcmpl-mock-{id}"), "object": "chat.completion", "created": 0,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                })
            }
            Proto::Completions => json!({
                "id": format!("cmpl-mock-{id}"), "object": "text_completion", "created": 0,
                "model": model,
                "choices": contents.iter().enumerate().map(|(i, c)| json!({
                    "index": i, "text": c, "finish_reason": finish, "logprobs": null,
                })).collect::<Vec<_>>(),
                "usage": usage,
            }),
            Proto::Lamini => {
                // Lamini answers the parsed objects (or {"output": text}); a list for a list.
                let items: Vec<Value> = contents
                    .iter()
                    .map(|c| match serde_json::from_str::<Value>(c) {
                        Ok(v @ Value::Object(_)) if self.schema.is_some() => v,
                        _ if self.schema.is_some() => json!({"broken": c}),
                        _ => json!({"output": c}),
                    })
                    .collect();
                if self.listed {
                    Value::Array(items)
                } else {
                    items.into_iter().next().unwrap_or(Value::Null)
                }
            }
        }
    }
}

/// The items of a packed prompt (`rows_per_prompt`), by the tests' convention: each under a
/// `### Item k` line.
pub fn packed_items(user: &str) -> Vec<String> {
    let mut items: Vec<String> = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in user.lines() {
        if line.starts_with("### Item ") {
            items.extend(current.take().map(|l| l.join("\n").trim().to_string()));
            current = Some(Vec::new());
        } else if let Some(c) = current.as_mut() {
            c.push(line);
        }
    }
    items.extend(current.map(|l| l.join("\n").trim().to_string()));
    items
}

/// The answer to a prompt with packed items: for an array of exactly that many (a packed
/// request), one value per item tagged with the item's own hash `prompt_hash(None, item)`;
/// for one item asked alone, that item's value. `None` for other prompts.
fn packed_value(schema: &Value, user: &str) -> Option<Value> {
    let items = packed_items(user);
    let first = items.first()?;
    let wrapped = schema.pointer("/properties/value").is_some();
    let inner = schema.pointer("/properties/value").unwrap_or(schema);
    let n = items.len() as u64;
    let packed = inner.get("type").and_then(Value::as_str) == Some("array")
        && inner.get("minItems").and_then(Value::as_u64) == Some(n)
        && inner.get("maxItems").and_then(Value::as_u64) == Some(n);
    if !packed {
        return Some(generate(schema, &prompt_hash(None, first), None, None));
    }
    let item_schema = inner.get("items").cloned().unwrap_or(Value::Null);
    // Scalars are what a row alone gets wrapped as `{"value": ...}`.
    let name =
        (item_schema.get("type").and_then(Value::as_str) != Some("object")).then_some("value");
    let values: Vec<Value> = items
        .iter()
        .map(|item| generate(&item_schema, &prompt_hash(None, item), name, None))
        .collect();
    Some(if wrapped {
        json!({ "value": values })
    } else {
        Value::Array(values)
    })
}

/// A packed answer with its last item dropped (`Fault::WrongCount`).
fn one_item_less(v: &Value) -> Option<Value> {
    let mut v = v.clone();
    let list = match v.get_mut("value") {
        Some(Value::Array(a)) => a,
        _ => v.as_array_mut()?,
    };
    if list.len() < 2 {
        return None;
    }
    list.pop();
    Some(v)
}

/// A deterministic value matching `schema`, with strings tagged `[h]`.
/// Prompt and completion tokens as OpenAI bills them: tiktoken's implementation of the
/// cookbook's chat rule for messages (plus the structured-output schema), the plain text of list
/// prompts, and the text of every answer.
fn billed_tokens(
    proto: Proto,
    parsed: &Value,
    prompts: &[Prompt],
    contents: &[String],
) -> (usize, usize) {
    let bpe = tiktoken_rs::o200k_base_singleton();
    let count = |s: &str| bpe.encode_ordinary(s).len();
    let pt = match proto {
        Proto::Chat => {
            let messages: Vec<tiktoken_rs::ChatCompletionRequestMessage> = prompts
                .iter()
                .flat_map(|p| {
                    let system = p.system.clone().map(|c| ("system", c));
                    system.into_iter().chain([("user", p.user.clone())])
                })
                .map(
                    |(role, content)| tiktoken_rs::ChatCompletionRequestMessage {
                        role: role.into(),
                        content: Some(content),
                        ..Default::default()
                    },
                )
                .collect();
            let schema = parsed
                .pointer("/response_format/json_schema/schema")
                .map_or(0, |s| count(&s.to_string()));
            tiktoken_rs::num_tokens_from_messages("gpt-4o", &messages).unwrap_or(0) + schema
        }
        _ => prompts.iter().map(|p| count(&p.user)).sum(),
    };
    (pt, contents.iter().map(|c| count(c)).sum())
}

fn generate(schema: &Value, h: &str, name: Option<&str>, index: Option<usize>) -> Value {
    let num = |salt: u64| -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        h.hash(&mut hasher);
        salt.hash(&mut hasher);
        name.hash(&mut hasher);
        hasher.finish()
    };
    let ty = match schema.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ => "null",
    };
    let int = |k: &str| schema.get(k).and_then(Value::as_u64);
    let float = |k: &str| schema.get(k).and_then(Value::as_f64);
    match ty {
        "object" => {
            let mut out = Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, s) in props {
                    out.insert(k.clone(), generate(s, h, Some(k), None));
                }
            }
            Value::Object(out)
        }
        "array" => {
            let mut n = int("minItems").unwrap_or(3).max(1);
            if let Some(max) = int("maxItems") {
                n = n.min(max);
            }
            let items = schema.get("items").cloned().unwrap_or(Value::Null);
            Value::Array(
                (0..n as usize)
                    .map(|i| generate(&items, h, name, Some(i)))
                    .collect(),
            )
        }
        "string" => {
            if let Some(e) = schema
                .get("enum")
                .and_then(Value::as_array)
                .filter(|e| !e.is_empty())
            {
                return e[(num(1) % e.len() as u64) as usize].clone();
            }
            Value::String(match (index, name) {
                (Some(i), _) => format!("What was the figure for item {} [{h}]?", i + 1),
                // Lamini's flat fields of a list (`item_1`...): a question, as the flagship's are.
                (None, Some(p)) if p.starts_with("item_") => {
                    format!("What was the figure for {p} [{h}]?")
                }
                (None, Some(p)) if p != "value" => format!("{p} [{h}]"),
                _ => format!("Answer [{h}]: the passage reports it."),
            })
        }
        "integer" => {
            let lo = schema.get("minimum").and_then(Value::as_i64).unwrap_or(0);
            let hi = schema
                .get("maximum")
                .and_then(Value::as_i64)
                .unwrap_or(lo + 1000);
            let span = (hi - lo).max(0) as u64 + 1;
            json!(lo + (num(2) % span) as i64)
        }
        "number" => {
            let lo = float("minimum").unwrap_or(0.0);
            let hi = float("maximum").unwrap_or(lo + 1000.0);
            let f = lo + (num(3) % 10_000) as f64 / 10_000.0 * (hi - lo);
            json!((f * 100.0).round() / 100.0)
        }
        "boolean" => json!(num(4) % 2 == 0),
        _ => Value::Null,
    }
}
