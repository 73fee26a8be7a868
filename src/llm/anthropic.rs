//! Anthropic's Messages API (`POST {base_url}/v1/messages`, `x-api-key`, `anthropic-version`):
//! the system text as the top-level `system`, one user message, `max_tokens` always sent.
//!
//! **Structured output** goes through a forced tool: the request declares one tool whose
//! `input_schema` is the function's schema (wrapped as `{"value": ...}` for a non-object, as
//! for OpenAI) and `tool_choice` names it; the answer is the `tool_use` block's `input`.
//! Anthropic's JSON outputs (`output_config.format`) would also do, but only on recent models
//! and for a subset of JSON Schema that leaves out what functions use (`minItems` above 1,
//! `pattern`, numeric bounds); a tool's input schema takes any schema, on every model, and
//! sluice validates the value either way.
//!
//! **Prompt caching.** Anthropic caches a prompt's prefix (tools, then system, then messages)
//! up to a content block marked with `cache_control`; a later request with the same prefix up
//! to a marked block reads it (`cache_read_input_tokens`, 0.1 × the input price) instead of
//! computing it; the first writes it (`cache_creation_input_tokens`, 1.25 ×). Up to three
//! blocks are marked, each when the prefix it ends is at least the model's minimum
//! (`prompt_cache_min_tokens`, estimated generously at three bytes a token: a prefix the
//! model finds too short is simply not cached):
//! 1. the system text, shared by every call of the function;
//! 2. the user text before the template's first argument ([`PromptCuts::common`]);
//! 3. the user text before the function's last argument ([`PromptCuts::row`]): what a row
//!    shares with the rows that differ only in it — the flagship's three questions about one
//!    passage share everything up to the question.
//!
//! The user text is sent as text blocks cut at the marked points; together they are exactly
//! the rendered prompt. Usage: `input_tokens` counts only the tokens after the last cache
//! hit or write, so the prompt tokens are `input + cache_creation + cache_read`.

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::http::{HttpEndpoint, KeyHeader};
use super::response::malformed;
use super::{Provider, SetupError, preview};
use crate::config::{ANTHROPIC_VERSION, ServerConfig, StructuredOutput};
use crate::types::{ErrorKind, LlmError, LlmRequest, LlmResponse, PromptCuts, Usage};

/// `max_tokens` of a function that gives none (Anthropic requires one).
const DEFAULT_MAX_TOKENS: u32 = 4096;

/// Bytes a token, for deciding whether a prefix is long enough to mark: fewer than most text
/// has, so a prefix near the minimum is marked rather than missed.
const BYTES_PER_TOKEN: usize = 3;

/// The `stop_reason`s of an answer that is complete.
const COMPLETE: [&str; 3] = ["end_turn", "tool_use", "stop_sequence"];

/// A provider for Anthropic's Messages API.
#[derive(Debug)]
pub struct AnthropicProvider {
    http: HttpEndpoint,
    base_url: String,
    model: String,
    structured: StructuredOutput,
    cache_min_tokens: u64,
}

impl AnthropicProvider {
    /// Builds a provider for `model` on one configured server.
    pub fn new(model: &str, cfg: &ServerConfig, pool_size: usize) -> Result<Self, SetupError> {
        let http = HttpEndpoint::new(cfg, format!("{}/v1/messages", cfg.base_url), pool_size)?
            .with_key_header(KeyHeader::Named("x-api-key"))
            .with_header("anthropic-version", ANTHROPIC_VERSION);
        Ok(AnthropicProvider {
            http,
            base_url: cfg.base_url.clone(),
            model: model.to_string(),
            structured: cfg.structured_output,
            cache_min_tokens: cfg.prompt_cache_min_tokens,
        })
    }

    /// The HTTP endpoint (client, key, `anthropic-version`) requests go through.
    pub(crate) fn http(&self) -> &HttpEndpoint {
        &self.http
    }

    /// The URL of another endpoint of the server (`/v1/messages/batches`).
    pub(crate) fn api_url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The forced tool of a structured request (none without a schema or with
    /// `structured_output = "none"`).
    fn tool(&self, req: &LlmRequest) -> Option<Value> {
        let schema = req.schema.as_ref()?;
        if self.structured == StructuredOutput::None {
            return None;
        }
        Some(json!({
            "name": tool_name(&req.function),
            "description": format!("Gives the answer of {} in its required structure.", req.function),
            "input_schema": schema.provider_schema(),
        }))
    }

    /// The JSON body of `req`.
    pub fn body(&self, req: &LlmRequest) -> Value {
        let tool = self.tool(req);
        let mut body = Map::new();
        body.insert("model".into(), json!(self.model));
        body.insert(
            "max_tokens".into(),
            json!(req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
        );
        if let Some(t) = req.temperature {
            body.insert("temperature".into(), json!(t));
        }
        // The prefix so far, in bytes: what decides whether a block is worth marking.
        let mut prefix = tool.as_ref().map_or(0, |t| t.to_string().len());
        let long_enough = |bytes: usize| {
            self.cache_min_tokens > 0 && (bytes / BYTES_PER_TOKEN) as u64 >= self.cache_min_tokens
        };
        if let Some(t) = tool {
            let name = t["name"].clone();
            body.insert("tools".into(), json!([t]));
            body.insert("tool_choice".into(), json!({"type": "tool", "name": name}));
        }
        if let Some(system) = &req.prompt.system {
            prefix += system.len();
            let value = if long_enough(prefix) && !system.is_empty() {
                json!([marked(text_block(system))])
            } else {
                json!(system)
            };
            body.insert("system".into(), value);
        }
        let user = &req.prompt.user;
        let cuts: Vec<usize> = cut_points(user, req.prompt.cuts)
            .into_iter()
            .filter(|&c| long_enough(prefix + c))
            .collect();
        let content = if cuts.is_empty() {
            json!(user)
        } else {
            let mut blocks = Vec::with_capacity(cuts.len() + 1);
            let mut start = 0;
            for c in cuts {
                blocks.push(marked(text_block(&user[start..c])));
                start = c;
            }
            blocks.push(text_block(&user[start..]));
            Value::Array(blocks)
        };
        body.insert(
            "messages".into(),
            json!([{"role": "user", "content": content}]),
        );
        Value::Object(body)
    }

    /// An answer as a response: the forced tool's input (as JSON text) or the text blocks,
    /// the stop reason (`max_tokens` as `length`, so it reads as truncated), and the usage.
    pub fn parse_message(
        v: &Value,
        rate: crate::types::RateLimits,
        tool: Option<&str>,
    ) -> Result<LlmResponse, LlmError> {
        let blocks = v
            .get("content")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed(format!("no content in {}", preview(&v.to_string()))))?;
        let stop = v.get("stop_reason").and_then(Value::as_str).unwrap_or("");
        let finish_reason = match stop {
            "max_tokens" | "model_context_window_exceeded" => "length".to_string(),
            other => other.to_string(),
        };
        if finish_reason != "length" && !COMPLETE.contains(&stop) {
            return Err(LlmError {
                finish_reason: Some(stop.to_string()),
                ..malformed(format!(
                    "the model stopped for a reason sluice does not take as an answer \
                     (stop_reason = {})",
                    preview(&v.get("stop_reason").unwrap_or(&Value::Null).to_string())
                ))
            });
        }
        let content = match tool {
            Some(name) => match tool_input(blocks, name) {
                Some(input) => input.to_string(),
                None if finish_reason == "length" => String::new(),
                None => {
                    return Err(LlmError {
                        http_status: Some(200),
                        finish_reason: Some(finish_reason),
                        ..LlmError::new(
                            ErrorKind::InvalidOutput,
                            format!(
                                "the answer has no tool_use block of {name}: {}",
                                preview(&texts(blocks))
                            ),
                        )
                    });
                }
            },
            None => texts(blocks),
        };
        Ok(LlmResponse {
            confidence: None,
            content,
            finish_reason: Some(finish_reason),
            usage: usage_of(v),
            rate,
        })
    }
}

/// A tool name Anthropic accepts (`[a-zA-Z0-9_-]{1,64}`) for function `f`.
fn tool_name(f: &str) -> String {
    let name: String = f
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        "answer".into()
    } else {
        name
    }
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

fn marked(mut block: Value) -> Value {
    block["cache_control"] = json!({"type": "ephemeral"});
    block
}

/// The cuts of `user` a block may end at: inside the text, on character boundaries,
/// increasing.
fn cut_points(user: &str, cuts: PromptCuts) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::with_capacity(2);
    for c in [cuts.common, cuts.row] {
        let inside = c > 0 && c < user.len() && user.is_char_boundary(c);
        if inside && out.last().is_none_or(|&l| c > l) {
            out.push(c);
        }
    }
    out
}

/// The `input` of the `tool_use` block of tool `name`.
fn tool_input<'a>(blocks: &'a [Value], name: &str) -> Option<&'a Value> {
    blocks
        .iter()
        .find(|b| {
            b.get("type").and_then(Value::as_str) == Some("tool_use")
                && b.get("name").and_then(Value::as_str) == Some(name)
        })?
        .get("input")
}

/// The text blocks of an answer, joined.
fn texts(blocks: &[Value]) -> String {
    blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect()
}

/// The usage of an answer: prompt tokens are the uncached input, the tokens written to the
/// cache and those read from it; a count that is missing or not a non-negative integer is 0.
fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    let count = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (input, written, read) = (
        count("input_tokens"),
        count("cache_creation_input_tokens"),
        count("cache_read_input_tokens"),
    );
    let prompt = input.saturating_add(written).saturating_add(read);
    Some(Usage::new(prompt, count("output_tokens"), read).with_cache_writes(written))
}

#[async_trait]
impl Provider for AnthropicProvider {
    fn endpoint(&self) -> String {
        format!("anthropic:{}#{}", self.http.identity(), self.model)
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        let body = self.body(req);
        let (v, rate) = self.http.post_json(&body).await?;
        let tool = body.pointer("/tool_choice/name").and_then(Value::as_str);
        Self::parse_message(&v, rate, tool)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::types::{OutputSchema, RenderedPrompt};

    fn provider(min: u64, structured: StructuredOutput) -> AnthropicProvider {
        let text = format!(
            "[models.c]\nkind = \"anthropic\"\nmodel = \"claude-x\"\n\
             prompt_cache_min_tokens = {min}\n"
        );
        let cfg =
            crate::config::Config::parse(&text, std::path::Path::new("s.toml"), &|_| None).unwrap();
        let mut server = cfg.models["c"].server().unwrap().clone();
        server.structured_output = structured;
        AnthropicProvider::new("claude-x", &server, 1).unwrap()
    }

    fn request(system: &str, user: &str, cuts: PromptCuts, schema: Option<Value>) -> LlmRequest {
        LlmRequest {
            confidence: false,
            function: "answer_question".into(),
            prompt: RenderedPrompt {
                system: Some(system.into()),
                user: user.into(),
                cuts,
            },
            max_tokens: None,
            temperature: Some(0.0),
            schema: schema.map(|s| Arc::new(OutputSchema::new(s).unwrap())),
        }
    }

    #[test]
    fn marks_the_shared_openings_that_are_long_enough() {
        let passage = "p".repeat(300);
        let user = format!("Passage: {passage}\nQuestion: why?");
        let cuts = PromptCuts {
            common: "Passage: ".len(),
            row: user.find("\nQuestion").unwrap() + 1,
        };
        let req = request("Be brief.", &user, cuts, None);
        // 100 tokens at 3 bytes each: only the prefix through the passage is long enough.
        let body = provider(100, StructuredOutput::JsonSchema).body(&req);
        assert_eq!(body["system"], json!("Be brief."));
        assert_eq!(body["max_tokens"], json!(DEFAULT_MAX_TOKENS));
        let blocks = body["messages"][0]["content"].as_array().unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0]["cache_control"], json!({"type": "ephemeral"}));
        assert!(blocks[1].get("cache_control").is_none());
        let joined: String = blocks.iter().map(|b| b["text"].as_str().unwrap()).collect();
        assert_eq!(joined, user, "the blocks are the prompt");
        // A low minimum marks the system text and every cut; none marks nothing.
        let body = provider(1, StructuredOutput::JsonSchema).body(&req);
        assert!(body["system"][0]["cache_control"].is_object());
        assert_eq!(body["messages"][0]["content"].as_array().unwrap().len(), 3);
        let body = provider(0, StructuredOutput::JsonSchema).body(&req);
        assert_eq!(body["messages"][0]["content"], json!(user));
        // Cuts outside the text or not on a character boundary are ignored.
        let odd = PromptCuts {
            common: 10_000,
            row: 0,
        };
        assert_eq!(
            cut_points("é", PromptCuts { common: 1, row: 1 }),
            Vec::<usize>::new()
        );
        assert!(cut_points(&user, odd).is_empty());
    }

    #[test]
    fn structured_output_is_a_forced_tool() {
        let schema = json!({"type": "string"});
        let req = request("s", "u", PromptCuts::default(), Some(schema));
        let body = provider(1024, StructuredOutput::JsonSchema).body(&req);
        assert_eq!(
            body["tool_choice"],
            json!({"type": "tool", "name": "answer_question"})
        );
        assert_eq!(
            body["tools"][0]["input_schema"]["properties"]["value"]["type"],
            "string"
        );
        let body = provider(1024, StructuredOutput::None).body(&req);
        assert!(body.get("tools").is_none());
        assert_eq!(tool_name("a.b c"), "a_b_c");
    }

    #[test]
    fn reads_answers_stop_reasons_and_usage() {
        let answer = |content: Value, stop: Value| {
            json!({"type": "message", "content": content, "stop_reason": stop,
                   "usage": {"input_tokens": 50, "cache_creation_input_tokens": 1000,
                             "cache_read_input_tokens": 2000, "output_tokens": 7}})
        };
        let tool_use = json!([{"type": "tool_use", "id": "t", "name": "f",
                               "input": {"value": "x"}}]);
        let r = AnthropicProvider::parse_message(
            &answer(tool_use.clone(), json!("tool_use")),
            Default::default(),
            Some("f"),
        )
        .unwrap();
        assert_eq!(r.content, r#"{"value":"x"}"#);
        let u = r.usage.unwrap();
        assert_eq!((u.prompt_tokens, u.cached_prompt_tokens), (3050, 2000));
        assert_eq!((u.cache_write_tokens, u.completion_tokens), (1000, 7));
        let text = json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        let r = AnthropicProvider::parse_message(
            &answer(text.clone(), json!("end_turn")),
            Default::default(),
            None,
        )
        .unwrap();
        assert_eq!(r.content, "ab");
        let kind = |content: &Value, stop: Value, tool: Option<&str>| {
            let r = AnthropicProvider::parse_message(
                &answer(content.clone(), stop),
                Default::default(),
                tool,
            );
            match r {
                Ok(r) => crate::llm::parse_response(None, &r).err().map(|e| e.kind),
                Err(e) => Some(e.kind),
            }
        };
        assert_eq!(
            kind(&text, json!("max_tokens"), None),
            Some(ErrorKind::Truncated)
        );
        assert_eq!(
            kind(&text, json!("refusal"), None),
            Some(ErrorKind::MalformedResponse)
        );
        assert_eq!(
            kind(&text, json!(42), None),
            Some(ErrorKind::MalformedResponse)
        );
        assert_eq!(
            kind(&json!([]), json!("end_turn"), None),
            Some(ErrorKind::Empty)
        );
        assert_eq!(
            kind(&text, json!("end_turn"), Some("f")),
            Some(ErrorKind::InvalidOutput)
        );
        assert_eq!(
            kind(&tool_use, json!("max_tokens"), Some("f")),
            Some(ErrorKind::Truncated)
        );
        let no_content = AnthropicProvider::parse_message(&json!({}), Default::default(), None);
        assert_eq!(no_content.unwrap_err().kind, ErrorKind::MalformedResponse);
    }
}
