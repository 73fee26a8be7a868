//! Google's Gemini API for the test server, as Google's public reference documents it:
//! `POST /v1beta/models/{model}:generateContent` and `:batchEmbedContents`.
//!
//! - The key in `x-goog-api-key`: without it, 403 `PERMISSION_DENIED`; a wrong one, 400
//!   `INVALID_ARGUMENT` with a `google.rpc.ErrorInfo` detail of reason `API_KEY_INVALID`. A key
//!   in the URL's query is refused (400), so a client that puts it there fails its tests.
//! - `systemInstruction` and one user turn of `contents` (text parts); `generationConfig` with
//!   `maxOutputTokens`, `temperature`, `responseMimeType` and `responseJsonSchema` (which needs
//!   `responseMimeType: "application/json"` and may use only the keywords Google documents
//!   for it; anything else is a 400 naming the keyword).
//! - Answers tagged `[h]`, `h = prompt_hash(system, user)`; with a schema, the value
//!   `generate` draws from it; `finishReason` `STOP` (`MAX_TOKENS` for a `FinishLength`
//!   fault); `usageMetadata` with `promptTokenCount` (characters / 4 + 1),
//!   `candidatesTokenCount`, `thoughtsTokenCount` ([`GeminiConfig::thoughts_tokens`]) and
//!   `cachedContentTokenCount` (implicit caching: the prompt tokens the server's prefix cache
//!   held, when it has one, and the prompt is at least [`GeminiConfig::min_cache_tokens`]).
//! - Errors as `{"error": {"code", "message", "status", "details"}}`: a 429
//!   `RESOURCE_EXHAUSTED` with `QuotaFailure` and `RetryInfo` (`retryDelay`, no `retry-after`
//!   header); 500 `INTERNAL` and 503 `UNAVAILABLE`.
//! - Hostile answers for prompts holding a marker ([`GeminiHostile`]).
//!
//! The server bills every answered request ([`GeminiBill`]) and counts the retries that came
//! before the `retryDelay` their 429 asked for (`early_retries`), by its own clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::confidence::ConfidenceConfig;
use super::{
    After, Fault, Prefill, Prompt, Proto, Request, State, count_fault, draw_fault, embedding_of,
    generate, next_attempt, prompt_hash, response,
};

/// A hostile answer the server gives to a prompt holding a marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeminiHostile {
    /// `candidates: []` and no `promptFeedback`.
    NoCandidates,
    /// A `finishReason` no client knows.
    UnknownFinish,
    /// `finishReason: "SAFETY"` with no content.
    Safety,
    /// No candidates, `promptFeedback.blockReason: "PROHIBITED_CONTENT"`.
    BlockedPrompt,
    /// A text part of `huge_bytes` bytes.
    Huge,
}

/// Settings of the Gemini API.
#[derive(Debug, Clone)]
pub struct GeminiConfig {
    /// `thoughtsTokenCount` of every answer (thinking billed as output).
    pub thoughts_tokens: u64,
    /// The shortest prompt, in tokens, whose prefix the implicit cache serves.
    pub min_cache_tokens: u64,
    /// The `retryDelay` of a 429, in milliseconds.
    pub retry_delay_ms: u64,
    /// Prompts holding the marker get the hostile answer.
    pub hostile: Vec<(String, GeminiHostile)>,
    /// Size of a [`GeminiHostile::Huge`] answer.
    pub huge_bytes: usize,
    /// Batch requests whose prompt holds one of these get no line in the responses file.
    pub batch_dropped: Vec<String>,
    /// Batch requests whose prompt holds one of these get a line with neither `response`
    /// nor `error`.
    pub batch_empty: Vec<String>,
}

impl Default for GeminiConfig {
    fn default() -> Self {
        GeminiConfig {
            thoughts_tokens: 0,
            min_cache_tokens: 0,
            retry_delay_ms: 20,
            hostile: vec![],
            huge_bytes: 1 << 20,
            batch_dropped: vec![],
            batch_empty: vec![],
        }
    }
}

/// What the server billed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GeminiBill {
    /// Answered `generateContent` requests.
    pub requests: u64,
    /// `promptTokenCount` (cached tokens included).
    pub prompt: u64,
    /// `cachedContentTokenCount`.
    pub cached: u64,
    /// `candidatesTokenCount`.
    pub candidates: u64,
    /// `thoughtsTokenCount`.
    pub thoughts: u64,
    /// Inputs embedded by `batchEmbedContents`.
    pub embedded: u64,
    /// Requests that came before the `retryDelay` of their prompt's last 429 had passed.
    pub early_retries: u64,
    /// 429s sent.
    pub rate_limited: u64,
}

impl GeminiBill {
    /// What the tokens cost, in USD, at `input`, `cached` and `output` USD per million.
    pub fn usd(&self, input: f64, cached: f64, output: f64) -> f64 {
        ((self.prompt - self.cached) as f64 * input
            + self.cached as f64 * cached
            + (self.candidates + self.thoughts) as f64 * output)
            / 1e6
    }
}

/// The billing counters, and when each rate-limited prompt may come back.
#[derive(Debug, Default)]
pub(super) struct Store {
    counters: [AtomicU64; 8],
    due: Mutex<HashMap<String, Instant>>,
}

const REQUESTS: usize = 0;
const PROMPT: usize = 1;
const CACHED: usize = 2;
const CANDIDATES: usize = 3;
const THOUGHTS: usize = 4;
const EMBEDDED: usize = 5;
const EARLY: usize = 6;
const LIMITED: usize = 7;

impl Store {
    pub(super) fn bill(&self) -> GeminiBill {
        let l = |i: usize| self.counters[i].load(Ordering::Relaxed);
        GeminiBill {
            requests: l(REQUESTS),
            prompt: l(PROMPT),
            cached: l(CACHED),
            candidates: l(CANDIDATES),
            thoughts: l(THOUGHTS),
            embedded: l(EMBEDDED),
            early_retries: l(EARLY),
            rate_limited: l(LIMITED),
        }
    }

    pub(super) fn reset(&self) {
        for c in &self.counters {
            c.store(0, Ordering::Relaxed);
        }
    }

    fn add(&self, i: usize, n: u64) {
        self.counters[i].fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a request of prompt `hash` that came before its 429's delay was over.
    fn arrived(&self, hash: &str) {
        let due = self.due.lock().unwrap_or_else(|p| p.into_inner());
        if due.get(hash).is_some_and(|d| Instant::now() < *d) {
            self.add(EARLY, 1);
        }
    }

    fn limited(&self, hash: &str, delay: Duration) {
        self.add(LIMITED, 1);
        let mut due = self.due.lock().unwrap_or_else(|p| p.into_inner());
        due.insert(hash.to_string(), Instant::now() + delay);
    }
}

/// Google's error body as a response.
pub(super) fn error(status: u16, code: &str, message: &str, details: Value) -> Vec<u8> {
    let body = json!({"error": {"code": status, "message": message, "status": code,
                                "details": details}});
    response(status, &[], body.to_string().as_bytes())
}

/// A 429 with its `RetryInfo`.
fn rate_limited(st: &State, hash: &str) -> Vec<u8> {
    rate_limit_refusal(st, hash).into_response()
}

/// The refusal of a request with a query or without the configured key, if it is one.
fn unauthorized(st: &State, req: &Request) -> Option<Vec<u8>> {
    if req.path.contains('?') {
        return Some(query_refusal());
    }
    key_refusal(st, req)
}

/// The refusal of a query string, where a client could put a key.
pub(super) fn query_refusal() -> Vec<u8> {
    error(
        400,
        "INVALID_ARGUMENT",
        "this test server refuses query strings: keys go in x-goog-api-key",
        json!([]),
    )
}

/// The refusal of a request without the configured key in `x-goog-api-key`, if it is one.
pub(super) fn key_refusal(st: &State, req: &Request) -> Option<Vec<u8>> {
    let key = st.cfg.api_key.as_ref()?;
    match req.header("x-goog-api-key") {
        Some(k) if k == key => None,
        Some(_) => Some(error(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID", "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"}}]),
        )),
        None => Some(error(
            403,
            "PERMISSION_DENIED",
            "Method doesn't allow unregistered callers (callers without established \
             identity). Please use API Key or other form of API consumer identity to call \
             this API.",
            json!([]),
        )),
    }
}

/// The keywords `responseJsonSchema` takes.
const KEYWORDS: [&str; 21] = [
    "$id",
    "$defs",
    "$ref",
    "$anchor",
    "type",
    "format",
    "title",
    "description",
    "enum",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "anyOf",
    "oneOf",
    "properties",
    "additionalProperties",
    "required",
    "propertyOrdering",
];

/// The first keyword of `schema` that `responseJsonSchema` does not take, with its path.
fn unknown_keyword(schema: &Value, path: &str) -> Option<String> {
    let node = schema.as_object()?;
    for (k, v) in node {
        if !KEYWORDS.contains(&k.as_str()) {
            return Some(format!("{path}.{k}"));
        }
        let inner = match k.as_str() {
            "properties" => v.as_object().and_then(|props| {
                props
                    .iter()
                    .find_map(|(n, s)| unknown_keyword(s, &format!("{path}.properties.{n}")))
            }),
            "items" => unknown_keyword(v, &format!("{path}.items")),
            _ => None,
        };
        if inner.is_some() {
            return inner;
        }
    }
    None
}

/// A parsed `generateContent` request: the prompt and the schema of the answer.
struct Parsed {
    system: Option<String>,
    user: String,
    schema: Option<Value>,
}

fn texts(parts: Option<&Value>) -> Option<String> {
    parts?
        .as_array()?
        .iter()
        .map(|p| p.get("text").and_then(Value::as_str))
        .collect()
}

fn parse(v: &Value) -> Result<Parsed, String> {
    let contents = v
        .get("contents")
        .and_then(Value::as_array)
        .ok_or("* GenerateContentRequest.contents: contents is not specified")?;
    let [turn] = contents.as_slice() else {
        return Err("this test server takes one user turn".into());
    };
    if turn.get("role").and_then(Value::as_str).unwrap_or("user") != "user" {
        return Err("* GenerateContentRequest.contents[0].role: must be user".into());
    }
    let user = texts(turn.get("parts")).ok_or("contents[0].parts: text parts only")?;
    let system = match v.get("systemInstruction") {
        Some(s) => Some(texts(s.get("parts")).ok_or("systemInstruction.parts: text parts only")?),
        None => None,
    };
    let config = v.get("generationConfig");
    let schema = config.and_then(|c| c.get("responseJsonSchema")).cloned();
    let json_mime = config
        .and_then(|c| c.get("responseMimeType"))
        .and_then(Value::as_str)
        == Some("application/json");
    if let Some(s) = &schema {
        if !json_mime {
            return Err("responseJsonSchema requires responseMimeType application/json".into());
        }
        if let Some(k) = unknown_keyword(s, "generation_config.response_json_schema") {
            return Err(format!(
                "Invalid JSON payload received. Unknown name \"{k}\""
            ));
        }
    }
    Ok(Parsed {
        system,
        user,
        schema,
    })
}

/// The candidate of an answer, or the body of a hostile one.
fn candidate(
    st: &State,
    parsed: &Parsed,
    hash: &str,
    fault: Option<Fault>,
) -> Result<Value, Value> {
    let hostile = (st.cfg.gemini.hostile.iter())
        .find(|(m, _)| parsed.user.contains(m.as_str()))
        .map(|(_, h)| *h);
    let text = |t: String| json!({"role": "model", "parts": [{"text": t}]});
    let answer = match &parsed.schema {
        Some(schema) => {
            let mut value = generate(schema, hash, None, None);
            if fault == Some(Fault::InvalidSchema) {
                value = json!({"value": ["wrong"], "other": 42});
            }
            value.to_string()
        }
        None => format!("Answer [{hash}]: the passage reports the figure."),
    };
    let one = |content: Value, reason: &str| json!({"content": content, "finishReason": reason, "index": 0});
    match (hostile, fault) {
        (Some(GeminiHostile::NoCandidates), _) => Err(json!({"candidates": []})),
        (Some(GeminiHostile::BlockedPrompt), _) => {
            Err(json!({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}}))
        }
        (Some(GeminiHostile::UnknownFinish), _) => Ok(one(text(answer), "NEW_REASON_2031")),
        (Some(GeminiHostile::Safety), _) => Ok(json!({"finishReason": "SAFETY", "index": 0,
            "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                               "probability": "HIGH", "blocked": true}]})),
        (Some(GeminiHostile::Huge), _) => {
            Ok(one(text("x".repeat(st.cfg.gemini.huge_bytes)), "STOP"))
        }
        (None, Some(Fault::FinishLength)) => Ok(one(
            text(answer[..answer.len() / 2].to_string()),
            "MAX_TOKENS",
        )),
        (None, _) => Ok(one(text(answer), "STOP")),
    }
}

/// Answers one `POST /v1beta/models/{model}:{method}`.
pub(super) async fn serve(
    sock: &mut TcpStream,
    st: &State,
    req: &Request,
) -> std::io::Result<After> {
    if let Some(refusal) = unauthorized(st, req) {
        sock.write_all(&refusal).await?;
        return Ok(After::KeepAlive);
    }
    let rest = req.path.trim_start_matches("/v1beta/models/");
    let answer = match rest.split_once(':') {
        Some((_, "generateContent")) => generate_content(st, req).await,
        Some((model, "batchEmbedContents")) => embed(st, req, model),
        _ => error(404, "NOT_FOUND", "no such method", json!([])),
    };
    sock.write_all(&answer).await?;
    Ok(After::KeepAlive)
}

/// What the `generateContent` endpoint answers to one request body.
pub(super) enum Answered {
    /// 200 with this body: an answer, or a hostile one.
    Body(Value),
    /// An error: its HTTP status, Google's status name, message and details.
    Refused(u16, &'static str, String, Value),
    /// 200 with a body that is not JSON.
    Garbage(&'static [u8]),
}

impl Answered {
    fn invalid(message: String) -> Answered {
        Answered::Refused(400, "INVALID_ARGUMENT", message, json!([]))
    }

    /// The HTTP response of a live request.
    fn into_response(self) -> Vec<u8> {
        match self {
            Answered::Body(v) => response(200, &[], v.to_string().as_bytes()),
            Answered::Refused(status, code, message, details) => {
                error(status, code, &message, details)
            }
            Answered::Garbage(bytes) => response(200, &[], bytes),
        }
    }
}

/// A 429 with its `RetryInfo`, as an [`Answered`].
fn rate_limit_refusal(st: &State, hash: &str) -> Answered {
    let ms = st.cfg.gemini.retry_delay_ms;
    st.gemini.limited(hash, Duration::from_millis(ms));
    let delay = format!("{}.{:03}s", ms / 1000, ms % 1000);
    Answered::Refused(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.".into(),
        json!([
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
             "violations": [{"quotaMetric":
                 "generativelanguage.googleapis.com/generate_content_paid_tier_input_token_count",
                 "quotaId": "GenerateContentPaidTierInputTokensPerModelPerMinute"}]},
            {"@type": "type.googleapis.com/google.rpc.Help",
             "links": [{"description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay},
        ]),
    )
}

/// `candidate` as `model` answers: the small model of a cascade is sometimes wrong; with
/// `logprobs`, its `logprobsResult` (the first token at the answer's confidence).
fn judged(
    candidate: &mut Value,
    (cfg, model, hash): (&ConfidenceConfig, &str, &str),
    logprobs: bool,
) {
    let Some(Value::String(text)) = candidate.pointer_mut("/content/parts/0/text") else {
        return;
    };
    let (right, confidence) = super::confidence::judge(cfg, model, hash);
    if !right {
        let wrong = match serde_json::from_str::<Value>(text) {
            Ok(v) => super::confidence::wrong(&v).to_string(),
            Err(_) => format!("{text} (wrong)"),
        };
        *text = wrong;
    }
    if logprobs {
        let openai = super::confidence::logprobs(text, confidence);
        let chosen: Vec<Value> = openai["content"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .map(
                |(i, t)| json!({"token": t["token"], "tokenId": i, "logProbability": t["logprob"]}),
            )
            .collect();
        candidate["logprobsResult"] = json!({"topCandidates": [], "chosenCandidates": chosen});
    }
}

/// The answer to a `generateContent` (after the server's latency; a `Timeout` fault hangs).
async fn generate_content(st: &State, req: &Request) -> Vec<u8> {
    let model = req.path.trim_start_matches("/v1beta/models/");
    let model = model.split_once(':').map_or(model, |(m, _)| m);
    let answered = match serde_json::from_slice::<Value>(&req.body) {
        Ok(body) => answer(st, &body, (true, model)).await,
        Err(e) => Answered::invalid(format!("Invalid JSON payload received. {e}")),
    };
    answered.into_response()
}

/// What the endpoint answers to the request `body`, billed; `live` as a request on the wire
/// (its limits, latency and hanging timeouts), else as a line of a batch (none of those).
pub(super) async fn answer(st: &State, body: &Value, (live, model): (bool, &str)) -> Answered {
    let parsed = match parse(body) {
        Ok(p) => p,
        Err(m) => return Answered::invalid(m),
    };
    let hash = prompt_hash(parsed.system.as_deref(), &parsed.user);
    let prompts = [Prompt {
        system: parsed.system.clone(),
        user: parsed.user.clone(),
        hash: hash.clone(),
    }];
    st.stats.prompts.fetch_add(1, Ordering::Relaxed);
    if live {
        st.gemini.arrived(&hash);
        if super::admit(st, body, &prompts).is_err() {
            return rate_limit_refusal(st, &hash);
        }
    }
    let attempt = next_attempt(st, &prompts);
    let (fault, _) = draw_fault(&st.cfg, &prompts, attempt);
    match fault {
        Some(f @ Fault::RateLimit) => {
            count_fault(st, f);
            return rate_limit_refusal(st, &hash);
        }
        Some(f @ Fault::Server500) => {
            count_fault(st, f);
            let m = "An internal error has occurred.".into();
            return Answered::Refused(500, "INTERNAL", m, json!([]));
        }
        Some(f @ Fault::Server503) => {
            count_fault(st, f);
            let m = "The model is overloaded. Please try again later.".into();
            return Answered::Refused(503, "UNAVAILABLE", m, json!([]));
        }
        Some(f @ Fault::Timeout) => {
            count_fault(st, f);
            if live {
                tokio::time::sleep(st.cfg.hang).await;
            }
            let m = "Deadline expired".into();
            return Answered::Refused(504, "DEADLINE_EXCEEDED", m, json!([]));
        }
        Some(f @ Fault::MalformedJson) => {
            count_fault(st, f);
            return Answered::Garbage(b"{\"candidates\": [ {not json");
        }
        Some(f) => count_fault(st, f),
        None => {}
    }
    if live && !st.cfg.latency.is_zero() {
        tokio::time::sleep(st.cfg.latency).await;
    }
    let prefill = Prefill::lookup(st, Proto::Chat, &prompts);
    let chars =
        parsed.system.as_deref().map_or(0, |s| s.chars().count()) + parsed.user.chars().count();
    let prompt_tokens = (chars / 4 + 1) as u64;
    let g = &st.cfg.gemini;
    let cached = match &prefill {
        Some(p) if prompt_tokens >= g.min_cache_tokens => p.cached.min(prompt_tokens),
        _ => 0,
    };
    Prefill::answered(
        st,
        prefill,
        &json!({"usage": {"prompt_tokens": prompt_tokens}}),
    );
    let mut candidate = match candidate(st, &parsed, &hash, fault) {
        Ok(c) => c,
        Err(hostile) => return Answered::Body(hostile),
    };
    let logprobs = body.pointer("/generationConfig/responseLogprobs") == Some(&json!(true));
    judged(&mut candidate, (&st.cfg.confidence, model, &hash), logprobs);
    let output = texts(candidate.pointer("/content/parts")).map_or(0, |t| t.len() / 4 + 1) as u64;
    let mut usage = json!({"promptTokenCount": prompt_tokens, "candidatesTokenCount": output,
                           "totalTokenCount": prompt_tokens + output + g.thoughts_tokens});
    if cached > 0 {
        usage["cachedContentTokenCount"] = json!(cached);
    }
    if g.thoughts_tokens > 0 {
        usage["thoughtsTokenCount"] = json!(g.thoughts_tokens);
    }
    let s = &st.gemini;
    for (i, n) in [
        (REQUESTS, 1),
        (PROMPT, prompt_tokens),
        (CACHED, cached),
        (CANDIDATES, output),
        (THOUGHTS, g.thoughts_tokens),
    ] {
        s.add(i, n);
    }
    if fault.is_none() {
        st.stats.ok.fetch_add(1, Ordering::Relaxed);
    }
    let id = st.ids.fetch_add(1, Ordering::Relaxed);
    Answered::Body(json!({"candidates": [candidate], "usageMetadata": usage,
                          "modelVersion": "gemini-mock", "responseId": format!("mock-{id}")}))
}

/// The answer to a `batchEmbedContents`.
fn embed(st: &State, req: &Request, model: &str) -> Vec<u8> {
    let parsed: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let Some(requests) = parsed.get("requests").and_then(Value::as_array) else {
        return error(400, "INVALID_ARGUMENT", "requests is required", json!([]));
    };
    let name = format!("models/{model}");
    let mut inputs = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        if r.get("model").and_then(Value::as_str) != Some(name.as_str()) {
            let m = format!("requests[{i}].model must be {name}, the model of the URL");
            return error(400, "INVALID_ARGUMENT", &m, json!([]));
        }
        let Some(text) = texts(r.pointer("/content/parts")) else {
            return error(
                400,
                "INVALID_ARGUMENT",
                "content.parts: text parts only",
                json!([]),
            );
        };
        let dim = r.get("outputDimensionality").and_then(Value::as_u64);
        inputs.push((text, dim.map_or(super::DEFAULT_DIM, |d| d as usize)));
    }
    if inputs.is_empty() || inputs.len() > 100 {
        return error(
            400,
            "INVALID_ARGUMENT",
            "between 1 and 100 requests",
            json!([]),
        );
    }
    let prompts: Vec<Prompt> = (inputs.iter())
        .map(|(t, _)| Prompt {
            system: None,
            user: t.clone(),
            hash: prompt_hash(None, t),
        })
        .collect();
    st.stats
        .prompts
        .fetch_add(prompts.len() as u64, Ordering::Relaxed);
    st.gemini.arrived(&prompts[0].hash);
    let attempt = next_attempt(st, &prompts);
    match draw_fault(&st.cfg, &prompts, attempt).0 {
        Some(f @ Fault::RateLimit) => {
            count_fault(st, f);
            return rate_limited(st, &prompts[0].hash);
        }
        Some(f @ (Fault::Server500 | Fault::Server503)) => {
            count_fault(st, f);
            let m = "The model is overloaded. Please try again later.";
            return error(503, "UNAVAILABLE", m, json!([]));
        }
        _ => {}
    }
    let embeddings: Vec<Value> = (inputs.iter())
        .map(|(t, dim)| json!({"values": embedding_of(t, *dim)}))
        .collect();
    st.gemini.add(EMBEDDED, inputs.len() as u64);
    st.stats
        .ok
        .fetch_add(inputs.len() as u64, Ordering::Relaxed);
    response(
        200,
        &[],
        json!({ "embeddings": embeddings }).to_string().as_bytes(),
    )
}
