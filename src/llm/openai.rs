//! OpenAI-compatible servers (OpenAI, vLLM, Ollama, llama.cpp server, the project's test server):
//! chat completions (`POST {base_url}/chat/completions`, one prompt per request) and text
//! completions (`POST {base_url}/completions` with a list prompt, several prompts per request).
//! Azure OpenAI speaks the same chat protocol at a deployment's URL
//! (`{base_url}/openai/deployments/{model}/chat/completions?api-version=...`, key in `api-key`);
//! its Files and Batches API sits beside it under `/openai` with the same `api-version`.

use async_trait::async_trait;
use serde_json::{Value, json};

use super::http::{HttpEndpoint, KeyHeader};
use super::response::malformed;
use super::{Provider, SetupError, preview};
use crate::config::{ServerConfig, StructuredOutput};
use crate::types::{LlmError, LlmRequest, LlmResponse, Usage, confidence_of};

/// A provider speaking the OpenAI chat completions protocol.
#[derive(Debug)]
pub struct OpenAiProvider {
    http: HttpEndpoint,
    base_url: String,
    model: String,
    structured: StructuredOutput,
    /// Azure OpenAI's `api-version` (`None`: OpenAI's own URLs).
    azure: Option<String>,
}

impl OpenAiProvider {
    /// Builds a provider (and its connection pool) for `model` on one configured server: an
    /// Azure OpenAI deployment named `model` when the server has an `api_version`.
    pub fn new(model: &str, cfg: &ServerConfig, pool_size: usize) -> Result<Self, SetupError> {
        let url = match &cfg.api_version {
            Some(v) => format!(
                "{}/openai/deployments/{model}/chat/completions?api-version={v}",
                cfg.base_url
            ),
            None => format!("{}/chat/completions", cfg.base_url),
        };
        let http = HttpEndpoint::new(cfg, url, pool_size)?;
        Ok(OpenAiProvider {
            http: match cfg.api_version {
                Some(_) => http.with_key_header(KeyHeader::Named("api-key")),
                None => http,
            },
            base_url: cfg.base_url.clone(),
            model: model.to_string(),
            structured: cfg.structured_output,
            azure: cfg.api_version.clone(),
        })
    }

    /// The URL of another endpoint of the server (`/files`, `/batches/ID`): beside the chat
    /// endpoint, or on Azure under `/openai` with the `api-version`.
    pub fn api_url(&self, path: &str) -> String {
        match &self.azure {
            Some(v) => format!("{}/openai{path}?api-version={v}", self.base_url),
            None => format!("{}{path}", self.base_url),
        }
    }

    /// The endpoint a batch job's lines are sent to, as the batch API names it.
    pub fn batch_endpoint(&self) -> &'static str {
        match self.azure {
            Some(_) => "/chat/completions",
            None => "/v1/chat/completions",
        }
    }

    /// The HTTP endpoint (client, key, body cap) requests go through.
    pub fn http(&self) -> &HttpEndpoint {
        &self.http
    }

    /// A chat completion answer as a response.
    pub fn parse_chat(v: &Value, rate: crate::types::RateLimits) -> Result<LlmResponse, LlmError> {
        let choice = v
            .pointer("/choices/0")
            .ok_or_else(|| malformed("response has no choices[0]".into()))?;
        Ok(LlmResponse {
            content: text_field(choice, "/message/content")?,
            finish_reason: finish_reason_of(choice),
            usage: usage_of(v),
            rate,
            confidence: confidence_of_choice(choice),
        })
    }

    /// The JSON body of `req` (a live request's, and a batch line's `body`).
    pub fn body(&self, req: &LlmRequest) -> Value {
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = &req.prompt.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": req.prompt.user}));
        let mut body = json!({"model": self.model, "messages": messages});
        add_generation_params(&mut body, req, self.structured);
        body
    }
}

/// `max_tokens`, `temperature` and `response_format` as the OpenAI protocols name them.
fn add_generation_params(body: &mut Value, req: &LlmRequest, structured: StructuredOutput) {
    if let Some(m) = req.max_tokens {
        body["max_tokens"] = json!(m);
    }
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    if req.confidence {
        body["logprobs"] = json!(true);
    }
    if let Some(schema) = &req.schema {
        match structured {
            StructuredOutput::JsonSchema => {
                body["response_format"] = json!({
                    "type": "json_schema",
                    "json_schema": {
                        "name": req.function,
                        "schema": schema.provider_schema(),
                        "strict": schema.strict_compatible(),
                    }
                });
            }
            StructuredOutput::JsonObject => {
                body["response_format"] = json!({"type": "json_object"});
            }
            StructuredOutput::None => {}
        }
    }
}

/// The `usage` of an answer: prompt and completion tokens, and the prompt tokens the server
/// took from its prompt cache (`prompt_tokens_details.cached_tokens`, as OpenAI, vLLM and
/// llama.cpp server report them, or `cache_read_input_tokens`), clamped to the prompt tokens;
/// a count that is missing or not a non-negative integer is 0.
fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    let count = |p: &str| u.pointer(p).and_then(Value::as_u64);
    let cached = count("/prompt_tokens_details/cached_tokens")
        .or_else(|| count("/cache_read_input_tokens"))
        .unwrap_or(0);
    Some(Usage::new(
        count("/prompt_tokens").unwrap_or(0),
        count("/completion_tokens").unwrap_or(0),
        cached,
    ))
}

/// The confidence of a choice from its tokens' log-probabilities (`logprobs.content[].logprob`,
/// as OpenAI, vLLM and llama.cpp server give them when asked with `logprobs: true`); none when
/// the choice has none, or an entry has no numeric `logprob`.
fn confidence_of_choice(choice: &Value) -> Option<f64> {
    let tokens = choice.pointer("/logprobs/content")?.as_array()?;
    let logprobs: Option<Vec<f64>> = tokens
        .iter()
        .map(|t| t.get("logprob").and_then(Value::as_f64))
        .collect();
    Some(confidence_of(logprobs?))
}

fn finish_reason_of(choice: &Value) -> Option<String> {
    choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// A string field of a choice; null or missing is empty content.
fn text_field(choice: &Value, pointer: &str) -> Result<String, LlmError> {
    match choice.pointer(pointer) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) | None => Ok(String::new()),
        Some(other) => Err(malformed(format!(
            "{} is not a string: {}",
            pointer.trim_start_matches('/').replace('/', "."),
            preview(&other.to_string())
        ))),
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    fn endpoint(&self) -> String {
        let kind = match self.azure {
            Some(_) => "azure_openai",
            None => "openai",
        };
        format!("{kind}:{}#{}", self.http.identity(), self.model)
    }

    fn gives_confidence(&self) -> bool {
        true
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        let (v, rate) = self.http.post_json(&self.body(req)).await?;
        Self::parse_chat(&v, rate)
    }
}

/// A provider speaking the OpenAI text completions protocol with list prompts (vLLM, llama.cpp
/// server, SGLang): up to `prompts_per_request` prompts per request. There are no chat messages: the
/// prompt sent is the system text, a blank line, then the user text, so a model that needs its
/// chat template should have it written into the function's template.
#[derive(Debug)]
pub struct CompletionsProvider {
    http: HttpEndpoint,
    model: String,
    structured: StructuredOutput,
    prompts_per_request: usize,
}

impl CompletionsProvider {
    /// Builds a provider for `model` on one configured server.
    pub fn new(model: &str, cfg: &ServerConfig, pool_size: usize) -> Result<Self, SetupError> {
        Ok(CompletionsProvider {
            http: HttpEndpoint::new(cfg, format!("{}/completions", cfg.base_url), pool_size)?,
            model: model.to_string(),
            structured: cfg.structured_output,
            prompts_per_request: cfg.prompts_per_request,
        })
    }
}

/// The text of a request as one raw prompt.
pub fn flat_prompt(req: &LlmRequest) -> String {
    match &req.prompt.system {
        Some(s) => format!("{s}\n\n{}", req.prompt.user),
        None => req.prompt.user.clone(),
    }
}

#[async_trait]
impl Provider for CompletionsProvider {
    fn endpoint(&self) -> String {
        format!("openai-completions:{}#{}", self.http.identity(), self.model)
    }

    fn max_prompts_per_request(&self) -> usize {
        self.prompts_per_request
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        super::complete_as_list(self, req).await
    }

    async fn complete_list(
        &self,
        reqs: &[LlmRequest],
    ) -> Result<Vec<Result<LlmResponse, LlmError>>, LlmError> {
        let Some(first) = reqs.first() else {
            return Ok(vec![]);
        };
        let prompts: Vec<String> = reqs.iter().map(flat_prompt).collect();
        let mut body = json!({"model": self.model, "prompt": prompts});
        add_generation_params(&mut body, first, self.structured);
        let (v, rate) = self.http.post_json(&body).await?;
        let choices = v
            .get("choices")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed("response has no choices".into()))?;
        // Choices carry the index of their prompt; fill by index.
        let mut out: Vec<Option<Result<LlmResponse, LlmError>>> = vec![None; reqs.len()];
        let total = usage_of(&v);
        let n = reqs.len() as u64;
        for (pos, c) in choices.iter().enumerate() {
            let i = c
                .get("index")
                .and_then(Value::as_u64)
                .map_or(pos, |i| i as usize);
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(text_field(c, "/text").map(|content| LlmResponse {
                    confidence: None,
                    content,
                    finish_reason: finish_reason_of(c),
                    // Usage is reported per request: share it evenly.
                    usage: total.map(|u| u.share(n)),
                    rate,
                }));
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(malformed("no choice for this prompt".into()))))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(u: Value) -> Usage {
        usage_of(&json!({ "usage": u })).expect("usage")
    }

    #[test]
    fn reads_cached_prompt_tokens_in_either_place() {
        let details = json!({"prompt_tokens": 100, "completion_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 64}});
        assert_eq!(usage(details), Usage::new(100, 7, 64));
        let top = json!({"prompt_tokens": 100, "completion_tokens": 7,
                         "cache_read_input_tokens": 32});
        assert_eq!(usage(top).cached_prompt_tokens, 32);
        let none = json!({"prompt_tokens": 100, "completion_tokens": 7});
        assert_eq!(usage(none).cached_prompt_tokens, 0);
        assert_eq!(usage_of(&json!({"choices": []})), None);
    }

    #[test]
    fn a_chat_answer_carries_its_cached_tokens() {
        let v = json!({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 40, "completion_tokens": 2,
                                 "prompt_tokens_details": {"cached_tokens": 32}}});
        let r = OpenAiProvider::parse_chat(&v, Default::default()).unwrap();
        assert_eq!(r.usage, Some(Usage::new(40, 2, 32)));
    }

    #[test]
    fn odd_cached_counts_are_clamped_or_zero() {
        let with = |cached: Value| {
            usage(json!({"prompt_tokens": 50, "completion_tokens": 5,
                         "prompt_tokens_details": {"cached_tokens": cached}}))
            .cached_prompt_tokens
        };
        assert_eq!(with(json!(80)), 50, "more than the prompt: clamped");
        assert_eq!(with(json!(u64::MAX)), 50);
        assert_eq!(with(json!(-3)), 0);
        assert_eq!(with(json!("12")), 0);
        assert_eq!(with(json!(12.5)), 0);
        assert_eq!(with(json!(1e300)), 0);
        assert_eq!(with(Value::Null), 0);
        let odd_details = json!({"prompt_tokens": 50, "prompt_tokens_details": "cached"});
        assert_eq!(usage(odd_details), Usage::new(50, 0, 0));
        assert_eq!(usage(json!("usage")), Usage::default());
    }
}
