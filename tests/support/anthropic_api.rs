//! Anthropic's Messages API for the test server (`POST /v1/messages`), as Anthropic's public
//! reference documents it: `x-api-key` (401 `authentication_error` without the right one) and
//! `anthropic-version` (400 without it) headers; `system` as a string or text blocks; one
//! user message as a string or text blocks; `max_tokens` required; a forced tool
//! (`tool_choice: {type: "tool", name}`) answered with a `tool_use` block whose `input` follows
//! the tool's `input_schema`; `stop_reason`; errors as `{"type": "error", "error": {"type",
//! "message"}}`; 429 `rate_limit_error` and 529 `overloaded_error` with `retry-after`;
//! `anthropic-ratelimit-*` headers when the server has limits.
//!
//! **Prompt cache.** The prompt is the tools (their JSON), the system blocks, then the user
//! blocks, each `chars / 4` tokens (rounded up). A block marked with `cache_control` is a
//! breakpoint: its prefix (everything up to and including it) is cached when it is at least
//! `min_cache_tokens` long. A request reads the longest prefix held at one of its breakpoints
//! (`cache_read_input_tokens`), writes the rest up to its last cacheable breakpoint
//! (`cache_creation_input_tokens`), and `input_tokens` counts the tokens after that. A prefix
//! is held once its request is answered (as Anthropic's: available once the first response
//! begins).
//!
//! **Billing.** Every answered request's tokens are counted by class, and [`Bill::usd`]
//! prices them as Anthropic bills: uncached input, cache writes, cache reads and output, each
//! at its own price.
//!
//! Answers stay tagged with `[h]`, `h = prompt_hash(system, user)` of the joined texts.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{
    After, Fault, Prompt, Request, State, count_fault, draw_fault, generate, next_attempt,
    prompt_hash, response,
};

/// A hostile answer the server gives to a prompt holding a marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// `content: []`.
    Empty,
    /// A `stop_reason` no client knows.
    UnknownStop,
    /// Text instead of the forced tool's `tool_use` block.
    NoToolUse,
    /// A text block of `huge_bytes` bytes.
    Huge,
}

/// Settings of the Messages API.
#[derive(Debug, Clone)]
pub struct AnthropicConfig {
    /// The shortest prefix the cache holds, in tokens (Claude Sonnet 4.5's: 1,024).
    pub min_cache_tokens: u64,
    /// Probability of a 529 `overloaded_error` per request (drawn after the other faults).
    pub overloaded: f64,
    /// Prompts holding the marker get the hostile answer.
    pub hostile: Vec<(String, Hostile)>,
    /// Size of a [`Hostile::Huge`] answer.
    pub huge_bytes: usize,
}

impl Default for AnthropicConfig {
    fn default() -> Self {
        AnthropicConfig {
            min_cache_tokens: 1024,
            overloaded: 0.0,
            hostile: vec![],
            huge_bytes: 1 << 20,
        }
    }
}

/// Prices in USD per million tokens, for [`Bill::usd`].
#[derive(Debug, Clone, Copy)]
pub struct AnthropicPrices {
    /// Uncached input.
    pub input: f64,
    /// Cache writes.
    pub cache_write: f64,
    /// Cache reads.
    pub cache_read: f64,
    /// Output.
    pub output: f64,
}

/// Claude Sonnet 4.5's live prices (cache reads at 0.1 × and writes at 1.25 × the input
/// price, sluice's defaults for Anthropic).
pub const SONNET_4_5: AnthropicPrices = AnthropicPrices {
    input: 3.0,
    cache_write: 3.75,
    cache_read: 0.3,
    output: 15.0,
};

/// The tokens the server billed, by class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bill {
    /// Answered requests.
    pub requests: u64,
    /// `input_tokens`.
    pub input: u64,
    /// `cache_creation_input_tokens`.
    pub cache_write: u64,
    /// `cache_read_input_tokens`.
    pub cache_read: u64,
    /// `output_tokens`.
    pub output: u64,
}

impl Bill {
    /// What the tokens cost at `p`, in USD.
    pub fn usd(&self, p: AnthropicPrices) -> f64 {
        (self.input as f64 * p.input
            + self.cache_write as f64 * p.cache_write
            + self.cache_read as f64 * p.cache_read
            + self.output as f64 * p.output)
            / 1e6
    }

    /// All prompt tokens (input, written, read).
    pub fn prompt(&self) -> u64 {
        self.input + self.cache_write + self.cache_read
    }
}

/// The cache and the billing counters.
#[derive(Debug, Default)]
pub(super) struct Store {
    held: Mutex<HashSet<u64>>,
    requests: AtomicU64,
    input: AtomicU64,
    cache_write: AtomicU64,
    cache_read: AtomicU64,
    output: AtomicU64,
}

impl Store {
    pub(super) fn bill(&self) -> Bill {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Bill {
            requests: l(&self.requests),
            input: l(&self.input),
            cache_write: l(&self.cache_write),
            cache_read: l(&self.cache_read),
            output: l(&self.output),
        }
    }

    pub(super) fn reset(&self) {
        for a in [
            &self.requests,
            &self.input,
            &self.cache_write,
            &self.cache_read,
            &self.output,
        ] {
            a.store(0, Ordering::Relaxed);
        }
    }
}

fn error(status: u16, kind: &str, message: &str, headers: &[(&str, String)]) -> Vec<u8> {
    response(
        status,
        headers,
        error_json(kind, message).to_string().as_bytes(),
    )
}

fn tokens(text: &str) -> u64 {
    text.chars().count().div_ceil(4) as u64
}

/// One piece of the prompt as the cache sees it: its text, tokens, and whether it is marked.
struct Segment {
    text: String,
    marked: bool,
}

/// The text blocks of `v` (a string, or a list of `{type: "text", text, cache_control?}`), or
/// the message of a 400.
fn blocks(v: Option<&Value>, what: &str) -> Result<Vec<Segment>, String> {
    match v {
        None => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![Segment {
            text: s.clone(),
            marked: false,
        }]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|b| {
                let text = b
                    .get("text")
                    .and_then(Value::as_str)
                    .filter(|_| b.get("type").and_then(Value::as_str) == Some("text"))
                    .ok_or_else(|| format!("{what}: each block must be a text block"))?;
                if text.is_empty() {
                    return Err(format!("{what}: text content blocks must be non-empty"));
                }
                Ok(Segment {
                    text: text.to_string(),
                    marked: b.get("cache_control").is_some(),
                })
            })
            .collect(),
        Some(_) => Err(format!("{what}: must be a string or a list of blocks")),
    }
}

/// A parsed request: the prompt's segments, the forced tool's name and input schema, and
/// `max_tokens`.
pub(super) struct Parsed {
    system: Option<String>,
    user: String,
    segments: Vec<Segment>,
    tool: Option<(String, Value)>,
}

fn parse(v: &Value) -> Result<Parsed, String> {
    v.get("model")
        .and_then(Value::as_str)
        .ok_or("model: Field required")?;
    v.get("max_tokens")
        .and_then(Value::as_u64)
        .ok_or("max_tokens: Field required")?;
    let messages = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("messages: Field required")?;
    let [message] = messages.as_slice() else {
        return Err("this server takes one user message".into());
    };
    if message.get("role").and_then(Value::as_str) != Some("user") {
        return Err("messages.0.role: the first message must be the user's".into());
    }
    let system = blocks(v.get("system"), "system")?;
    let user = blocks(message.get("content"), "messages.0.content")?;
    let tools = v
        .get("tools")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let tool = match v.pointer("/tool_choice/type").and_then(Value::as_str) {
        Some("tool") => {
            let name = v.pointer("/tool_choice/name").and_then(Value::as_str);
            let found = tools
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == name)
                .ok_or("tool_choice.name: no tool of that name")?;
            let schema = found
                .get("input_schema")
                .filter(|s| s.get("type").and_then(Value::as_str) == Some("object"))
                .ok_or("tools.0.input_schema: must be an object schema")?;
            Some((name.unwrap_or_default().to_string(), schema.clone()))
        }
        _ => None,
    };
    let mut segments = Vec::new();
    if !tools.is_empty() {
        segments.push(Segment {
            text: Value::Array(tools).to_string(),
            marked: false,
        });
    }
    let marks = system.iter().chain(&user).filter(|s| s.marked).count();
    if marks > 4 {
        return Err(format!(
            "A maximum of 4 blocks with cache_control may be provided. Found {marks}."
        ));
    }
    let join = |s: &[Segment]| s.iter().map(|b| b.text.as_str()).collect::<String>();
    let system_text = (!system.is_empty()).then(|| join(&system));
    let user_text = join(&user);
    segments.extend(system);
    segments.extend(user);
    Ok(Parsed {
        system: system_text,
        user: user_text,
        segments,
        tool,
    })
}

/// The prompt's tokens read from the cache, written to it, and left: (read, written, input),
/// and the prefixes to hold once answered.
fn cache_use(st: &State, segments: &[Segment]) -> ((u64, u64, u64), Vec<u64>) {
    let min = st.cfg.anthropic.min_cache_tokens;
    let mut total = 0;
    let mut chain = 0u64;
    let mut points = Vec::new();
    for s in segments {
        total += tokens(&s.text);
        let mut h = DefaultHasher::new();
        (chain, &s.text).hash(&mut h);
        chain = h.finish();
        if s.marked && total >= min {
            points.push((total, chain));
        }
    }
    let held = st.anthropic.held.lock().unwrap_or_else(|p| p.into_inner());
    let read = (points.iter().rev())
        .find(|(_, h)| held.contains(h))
        .map_or(0, |(t, _)| *t);
    let last = points.last().map_or(0, |(t, _)| *t);
    let written = last.saturating_sub(read);
    let hold = points.iter().map(|(_, h)| *h).collect();
    ((read, written, total - read - written), hold)
}

/// The value of a forced tool, or the text of an answer, and the stop reason.
fn content(st: &State, parsed: &Parsed, hash: &str, fault: Option<Fault>) -> (Value, &'static str) {
    let hostile = st
        .cfg
        .anthropic
        .hostile
        .iter()
        .find(|(m, _)| parsed.user.contains(m.as_str()))
        .map(|(_, h)| *h);
    let text = |t: String| json!([{"type": "text", "text": t}]);
    let answer = format!("Answer [{hash}]: the passage reports the figure.");
    match (hostile, fault, &parsed.tool) {
        (Some(Hostile::Empty), _, _) => (json!([]), "end_turn"),
        (Some(Hostile::UnknownStop), _, _) => (text(answer), "mystery_reason"),
        (Some(Hostile::NoToolUse), _, _) => (text(answer), "end_turn"),
        (Some(Hostile::Huge), _, _) => (text("x".repeat(st.cfg.anthropic.huge_bytes)), "end_turn"),
        (None, Some(Fault::FinishLength), _) => {
            (text(answer[..answer.len() / 2].into()), "max_tokens")
        }
        (None, _, Some((name, schema))) => {
            let mut input = generate(schema, hash, None, None);
            if fault == Some(Fault::InvalidSchema) {
                input = json!({"value": 42, "other": ["wrong"]});
            }
            let block = json!({"type": "tool_use", "id": format!("toolu_{hash}"), "name": name,
                               "input": input});
            (json!([block]), "tool_use")
        }
        (None, _, None) => (text(answer), "end_turn"),
    }
}

/// The server's `x-ratelimit-*` headers under Anthropic's names, resets as RFC 3339 times.
fn anthropic_headers(headers: Vec<(&'static str, String)>) -> Vec<(&'static str, String)> {
    headers
        .into_iter()
        .filter_map(|(name, value)| {
            let renamed = match name {
                "x-ratelimit-limit-requests" => "anthropic-ratelimit-requests-limit",
                "x-ratelimit-remaining-requests" => "anthropic-ratelimit-requests-remaining",
                "x-ratelimit-reset-requests" => "anthropic-ratelimit-requests-reset",
                "x-ratelimit-limit-tokens" => "anthropic-ratelimit-tokens-limit",
                "x-ratelimit-remaining-tokens" => "anthropic-ratelimit-tokens-remaining",
                "x-ratelimit-reset-tokens" => "anthropic-ratelimit-tokens-reset",
                other => return Some((other, value)),
            };
            let value = if renamed.ends_with("-reset") {
                rfc3339_in(go_duration(&value)?)?
            } else {
                value
            };
            Some((renamed, value))
        })
        .collect()
}

/// A duration as the limits write one (`20ms`, `1.5s`, `6m0s`).
fn go_duration(s: &str) -> Option<std::time::Duration> {
    let secs = if let Some(ms) = s.strip_suffix("ms") {
        ms.parse::<f64>().ok()? / 1000.0
    } else if let Some((m, rest)) = s.split_once('m') {
        m.parse::<f64>().ok()? * 60.0 + rest.strip_suffix('s')?.parse::<f64>().ok()?
    } else {
        s.strip_suffix('s')?.parse().ok()?
    };
    Some(std::time::Duration::from_secs_f64(secs))
}

/// The RFC 3339 UTC time `d` from now (whole seconds, rounded up).
pub(super) fn rfc3339_in(d: std::time::Duration) -> Option<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    let secs = (now + d).as_secs() + u64::from((now + d).subsec_nanos() > 0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
}

/// Why a request is not answered: its status, error type and message.
pub(super) type Refusal = (u16, &'static str, String);

/// The error response of a refusal (as a body, and as a batch result's `error`).
pub(super) fn error_json(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// Whether a request carries the right `x-api-key` and an `anthropic-version`; the refusal
/// otherwise.
pub(super) fn check_headers(st: &State, req: &Request) -> Result<(), Refusal> {
    if (st.cfg.api_key.as_ref()).is_some_and(|key| req.header("x-api-key") != Some(key.as_str())) {
        return Err((401, "authentication_error", "invalid x-api-key".into()));
    }
    if req.header("anthropic-version").is_none() {
        let m = "anthropic-version: header is required";
        return Err((400, "invalid_request_error", m.into()));
    }
    Ok(())
}

/// A Messages request's body, checked: its JSON and what it asks.
pub(super) fn parse_body(body: &Value) -> Result<Parsed, Refusal> {
    parse(body).map_err(|m| (400, "invalid_request_error", m))
}

/// The prompt of a parsed request.
pub(super) fn prompt_of(parsed: &Parsed) -> Prompt {
    Prompt {
        system: parsed.system.clone(),
        user: parsed.user.clone(),
        hash: prompt_hash(parsed.system.as_deref(), &parsed.user),
    }
}

/// Answers a request that passed the headers and the limits (live, or a batch's request):
/// the fault draw, the prompt cache, the answer and its billing; the message, or the refusal.
pub(super) fn answer(st: &State, body: &Value, parsed: &Parsed) -> Result<Value, Refusal> {
    let cfg = &st.cfg;
    let prompts = [prompt_of(parsed)];
    let hash = prompts[0].hash.clone();
    let attempt = next_attempt(st, &prompts);
    let (fault, mut rng) = draw_fault(cfg, &prompts, attempt);
    let overloaded = fault.is_none() && rng.f64() < cfg.anthropic.overloaded;
    match fault {
        _ if overloaded => {
            if let Ok(mut m) = st.stats.faults.lock() {
                *m.entry("overloaded".into()).or_default() += 1;
            }
            return Err((529, "overloaded_error", "Overloaded".into()));
        }
        Some(f @ Fault::RateLimit) => {
            count_fault(st, f);
            let m = "Number of request tokens has exceeded your rate limit";
            return Err((429, "rate_limit_error", m.into()));
        }
        Some(f @ (Fault::Server500 | Fault::Server503)) => {
            count_fault(st, f);
            return Err((500, "api_error", "Internal server error".into()));
        }
        Some(f) => count_fault(st, f),
        None => {}
    }
    let ((read, written, input), hold) = cache_use(st, &parsed.segments);
    let (content, stop) = content(st, parsed, &hash, fault);
    let output = tokens(&content.to_string());
    let id = st.ids.fetch_add(1, Ordering::Relaxed);
    let answer = json!({
        "id": format!("msg_mock_{id}"), "type": "message", "role": "assistant",
        "model": body["model"], "content": content, "stop_reason": stop, "stop_sequence": null,
        "usage": {"input_tokens": input, "cache_creation_input_tokens": written,
                  "cache_read_input_tokens": read, "output_tokens": output},
    });
    let a = &st.anthropic;
    for (counter, n) in [
        (&a.requests, 1),
        (&a.input, input),
        (&a.cache_write, written),
        (&a.cache_read, read),
        (&a.output, output),
    ] {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    if fault.is_none() {
        st.stats.ok.fetch_add(1, Ordering::Relaxed);
    }
    a.held
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(hold);
    Ok(answer)
}

/// Answers one `POST /v1/messages`.
pub(super) async fn serve_messages(
    sock: &mut TcpStream,
    st: &State,
    req: &Request,
) -> std::io::Result<After> {
    let cfg = &st.cfg;
    // Whole seconds, as Anthropic sends them.
    let retry_after = || ("retry-after", cfg.retry_after_ms.div_ceil(1000).to_string());
    let refused = |(status, kind, message): Refusal| {
        let wait: Vec<_> = matches!(status, 429 | 529)
            .then(retry_after)
            .into_iter()
            .collect();
        error(status, kind, &message, &wait)
    };
    let parsed = check_headers(st, req).and_then(|()| {
        let body = serde_json::from_slice::<Value>(&req.body).map_err(|e| {
            (
                400,
                "invalid_request_error",
                format!("invalid JSON body: {e}"),
            )
        })?;
        parse_body(&body).map(|p| (body, p))
    });
    let (body, parsed) = match parsed {
        Ok(p) => p,
        Err(r) => {
            sock.write_all(&refused(r)).await?;
            return Ok(After::KeepAlive);
        }
    };
    st.stats.prompts.fetch_add(1, Ordering::Relaxed);
    let rate_headers = match super::admit(st, &body, &[prompt_of(&parsed)]) {
        Ok(h) => anthropic_headers(h),
        Err(_) => {
            // Refused by the limits: Anthropic's 429 (its own retry-after).
            let m = "Number of requests has exceeded your rate limit";
            sock.write_all(&refused((429, "rate_limit_error", m.into())))
                .await?;
            return Ok(After::KeepAlive);
        }
    };
    if !cfg.latency.is_zero() {
        tokio::time::sleep(cfg.latency).await;
    }
    match answer(st, &body, &parsed) {
        Ok(answer) => {
            let mut headers = rate_headers;
            let id = answer["id"]
                .as_str()
                .unwrap_or_default()
                .replace("msg_", "req_");
            headers.push(("request-id", id));
            sock.write_all(&response(200, &headers, answer.to_string().as_bytes()))
                .await?;
        }
        Err(r) => sock.write_all(&refused(r)).await?,
    }
    Ok(After::KeepAlive)
}
