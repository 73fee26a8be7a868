//! Google's Gemini API (`POST {base_url}/v1beta/models/{model}:generateContent`, the key in
//! the `x-goog-api-key` header — never in the URL, so it cannot reach a log line): the system
//! text as `systemInstruction`, one user turn in `contents`, `generationConfig` with
//! `maxOutputTokens`, `temperature` and structured output.
//!
//! **Structured output** is `responseMimeType: "application/json"` with `responseJsonSchema`,
//! the JSON Schema form Gemini takes on every current model (the older `responseSchema` is an
//! OpenAPI 3.0 subset without `additionalProperties` or `["T", "null"]` types). Of the
//! keywords sluice's schemas use, `responseJsonSchema` leaves out `minLength`, `maxLength`
//! and `pattern`: they are moved into the node's `description` as words, so the model still
//! reads them, and sluice validates every answer against the full schema as for any provider.
//! Annotations Gemini does not take (`examples`, `default`, `$comment`) are left out.
//!
//! **Answers.** The text parts of the first candidate (thought summaries left out).
//! `finishReason`: `STOP` is an answer; `MAX_TOKENS` reads as truncated (`length`); a safety
//! or policy stop (`SAFETY`, `RECITATION`, `BLOCKLIST`, `PROHIBITED_CONTENT`, `SPII`, ...)
//! and a blocked prompt (`promptFeedback.blockReason`) are refusals of the request as written:
//! `bad_request`, not retried; any other reason, and an answer without candidates, is a
//! `malformed_response` (retried).
//!
//! **Usage.** `promptTokenCount` counts the whole prompt, `cachedContentTokenCount` the part
//! read from Google's implicit cache (priced at `cached_input_usd_per_mtok`), and the output is
//! `candidatesTokenCount` plus `thoughtsTokenCount` (Google bills thinking as output).

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::http::{ErrorBodies, HttpEndpoint, KeyHeader};
use super::response::malformed;
use super::{Provider, SetupError, preview};
use crate::config::{ServerConfig, StructuredOutput};
use crate::types::{ErrorKind, LlmError, LlmRequest, LlmResponse, Usage};

/// The `finishReason`s of safety and policy filters: the request is refused as written.
const FILTERED: [&str; 10] = [
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "LANGUAGE",
    "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_RECITATION",
    "MODEL_ARMOR",
];

/// The keywords of a schema node `responseJsonSchema` takes, besides the node's own.
const TAKEN: [&str; 10] = [
    "type",
    "title",
    "description",
    "enum",
    "items",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "required",
];

/// The model id as it goes in a URL path: without a leading `models/`.
pub fn model_id(model: &str) -> &str {
    model.strip_prefix("models/").unwrap_or(model)
}

/// The HTTP endpoint of `model`'s `method` (`generateContent`, `batchEmbedContents`).
pub fn gemini_endpoint(
    model: &str,
    method: &str,
    cfg: &ServerConfig,
    pool_size: usize,
) -> Result<HttpEndpoint, SetupError> {
    let url = format!(
        "{}/v1beta/models/{}:{method}",
        cfg.base_url,
        model_id(model)
    );
    Ok(HttpEndpoint::new(cfg, url, pool_size)?
        .with_key_header(KeyHeader::Named("x-goog-api-key"))
        .with_error_bodies(ErrorBodies::Google))
}

/// A provider for Gemini's `generateContent`.
#[derive(Debug)]
pub struct GeminiProvider {
    http: HttpEndpoint,
    base_url: String,
    model: String,
    structured: StructuredOutput,
}

impl GeminiProvider {
    /// Builds a provider for `model` on one configured server.
    pub fn new(model: &str, cfg: &ServerConfig, pool_size: usize) -> Result<Self, SetupError> {
        Ok(GeminiProvider {
            http: gemini_endpoint(model, "generateContent", cfg, pool_size)?,
            base_url: cfg.base_url.clone(),
            model: model_id(model).to_string(),
            structured: cfg.structured_output,
        })
    }

    /// The HTTP endpoint (client, key in `x-goog-api-key`, Google's error bodies) requests
    /// go through.
    pub(crate) fn http(&self) -> &HttpEndpoint {
        &self.http
    }

    /// The URL of another endpoint of the server (`/v1beta/batches/...`).
    pub(crate) fn api_url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The model id, as it goes in a URL path (without `models/`).
    pub(crate) fn model(&self) -> &str {
        &self.model
    }

    /// The JSON body of `req`.
    pub fn body(&self, req: &LlmRequest) -> Value {
        let mut generation = Map::new();
        if let Some(m) = req.max_tokens {
            generation.insert("maxOutputTokens".into(), json!(m));
        }
        if let Some(t) = req.temperature {
            generation.insert("temperature".into(), json!(t));
        }
        if req.confidence {
            generation.insert("responseLogprobs".into(), json!(true));
        }
        if let Some(schema) = &req.schema {
            match self.structured {
                StructuredOutput::JsonSchema => {
                    generation.insert("responseMimeType".into(), json!("application/json"));
                    let converted = response_json_schema(&schema.provider_schema());
                    generation.insert("responseJsonSchema".into(), converted);
                }
                StructuredOutput::JsonObject => {
                    generation.insert("responseMimeType".into(), json!("application/json"));
                }
                StructuredOutput::None => {}
            }
        }
        let mut body = json!({
            "contents": [{"role": "user", "parts": [{"text": req.prompt.user}]}],
        });
        if let Some(system) = &req.prompt.system {
            body["systemInstruction"] = json!({"parts": [{"text": system}]});
        }
        if !generation.is_empty() {
            body["generationConfig"] = Value::Object(generation);
        }
        body
    }

    /// An answer as a response, or the typed failure a blocked or odd answer is.
    pub fn parse_answer(
        v: &Value,
        rate: crate::types::RateLimits,
    ) -> Result<LlmResponse, LlmError> {
        let candidate = match v.pointer("/candidates/0") {
            Some(c) => c,
            None => return Err(no_candidate(v)),
        };
        let reason = candidate
            .get("finishReason")
            .and_then(Value::as_str)
            .unwrap_or("");
        let finish_reason = match reason {
            "STOP" => "stop",
            "MAX_TOKENS" => "length",
            other => return Err(stopped(other, candidate)),
        };
        let parts = candidate
            .pointer("/content/parts")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let content = parts
            .iter()
            .filter(|p| p.get("thought").and_then(Value::as_bool) != Some(true))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect();
        Ok(LlmResponse {
            confidence: confidence_of_candidate(candidate),
            content,
            finish_reason: Some(finish_reason.into()),
            usage: usage_of(v),
            rate,
        })
    }
}

/// The confidence of a candidate from its chosen tokens' log-probabilities
/// (`logprobsResult.chosenCandidates[].logProbability`, given with `responseLogprobs`); none
/// when it has none, or an entry has no numeric `logProbability`.
fn confidence_of_candidate(candidate: &Value) -> Option<f64> {
    let chosen = candidate
        .pointer("/logprobsResult/chosenCandidates")?
        .as_array()?;
    let logprobs: Option<Vec<f64>> = chosen
        .iter()
        .map(|c| c.get("logProbability").and_then(Value::as_f64))
        .collect();
    Some(crate::types::confidence_of(logprobs?))
}

/// The failure of an answer without candidates: a blocked prompt, else a malformed answer.
fn no_candidate(v: &Value) -> LlmError {
    match v
        .pointer("/promptFeedback/blockReason")
        .and_then(Value::as_str)
    {
        Some(block) => LlmError {
            http_status: Some(200),
            finish_reason: Some(block.to_string()),
            ..LlmError::new(
                ErrorKind::BadRequest,
                format!("Gemini blocked the prompt (promptFeedback.blockReason = {block})"),
            )
        },
        None => malformed(format!(
            "the answer has no candidates: {}",
            preview(&v.to_string())
        )),
    }
}

/// The failure of a candidate that stopped for `reason` (neither `STOP` nor `MAX_TOKENS`).
fn stopped(reason: &str, candidate: &Value) -> LlmError {
    let shown = preview(
        &candidate
            .get("finishReason")
            .unwrap_or(&Value::Null)
            .to_string(),
    );
    let (kind, message) = if FILTERED.contains(&reason) {
        (
            ErrorKind::BadRequest,
            format!("Gemini filtered the answer (finishReason = {shown})"),
        )
    } else {
        (
            ErrorKind::MalformedResponse,
            format!(
                "the model stopped for a reason sluice does not take as an answer \
                 (finishReason = {shown})"
            ),
        )
    };
    LlmError {
        http_status: Some(200),
        finish_reason: Some(reason.to_string()),
        ..LlmError::new(kind, message)
    }
}

/// The `usageMetadata` of an answer; a count that is missing or not a non-negative integer
/// is 0.
fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usageMetadata")?;
    let count = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let output = count("candidatesTokenCount").saturating_add(count("thoughtsTokenCount"));
    Some(Usage::new(
        count("promptTokenCount"),
        output,
        count("cachedContentTokenCount"),
    ))
}

/// A schema (sluice's provider schema: JSON Schema) as `responseJsonSchema` takes it: the
/// keywords it documents kept, `minLength`, `maxLength` and `pattern` put into words in the
/// `description`, other annotations left out.
pub fn response_json_schema(schema: &Value) -> Value {
    let Some(node) = schema.as_object() else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (k, v) in node {
        match k.as_str() {
            "properties" => {
                let props = v.as_object().map(|p| {
                    p.iter()
                        .map(|(name, s)| (name.clone(), response_json_schema(s)))
                        .collect::<Map<String, Value>>()
                });
                let order: Vec<&String> = props.iter().flat_map(|p| p.keys()).collect();
                out.insert("propertyOrdering".into(), json!(order));
                out.insert(k.clone(), props.map_or(Value::Null, Value::Object));
            }
            "items" => {
                out.insert(k.clone(), response_json_schema(v));
            }
            "additionalProperties" if v.is_boolean() => {
                out.insert(k.clone(), v.clone());
            }
            key if TAKEN.contains(&key) => {
                out.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
    let mut words = Vec::new();
    if let Some(n) = node.get("minLength").and_then(Value::as_u64) {
        words.push(format!("at least {n} characters"));
    }
    if let Some(n) = node.get("maxLength").and_then(Value::as_u64) {
        words.push(format!("at most {n} characters"));
    }
    if let Some(p) = node.get("pattern").and_then(Value::as_str) {
        words.push(format!("matches the regular expression {p}"));
    }
    if !words.is_empty() {
        let said = out.get("description").and_then(Value::as_str);
        let rule = format!("Constraints: {}.", words.join("; "));
        let description = match said {
            Some(d) if !d.is_empty() => format!("{d} ({rule})"),
            _ => rule,
        };
        out.insert("description".into(), json!(description));
    }
    Value::Object(out)
}

#[async_trait]
impl Provider for GeminiProvider {
    fn endpoint(&self) -> String {
        format!("gemini:{}#{}", self.http.identity(), self.model)
    }

    fn gives_confidence(&self) -> bool {
        true
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        let (v, rate) = self.http.post_json(&self.body(req)).await?;
        Self::parse_answer(&v, rate)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::types::{OutputSchema, PromptCuts, RenderedPrompt};

    fn provider(structured: StructuredOutput) -> GeminiProvider {
        let text = "[models.g]\nkind = \"gemini\"\nmodel = \"models/gemini-2.5-flash\"\n";
        let cfg =
            crate::config::Config::parse(text, std::path::Path::new("s.toml"), &|_| None).unwrap();
        let mut server = cfg.models["g"].server().unwrap().clone();
        server.structured_output = structured;
        GeminiProvider::new(&cfg.models["g"].model, &server, 1).unwrap()
    }

    fn request(schema: Option<Value>) -> LlmRequest {
        LlmRequest {
            confidence: false,
            function: "f".into(),
            prompt: RenderedPrompt {
                system: Some("Be brief.".into()),
                user: "Why?".into(),
                cuts: PromptCuts::default(),
            },
            max_tokens: Some(64),
            temperature: Some(0.0),
            schema: schema.map(|s| Arc::new(OutputSchema::new(s).unwrap())),
        }
    }

    #[test]
    fn the_request_names_the_model_in_its_url_and_carries_the_prompt() {
        let p = provider(StructuredOutput::JsonSchema);
        assert_eq!(
            p.http.url(),
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
        );
        assert!(p.endpoint().starts_with("gemini:"));
        let body = p.body(&request(None));
        assert_eq!(body["systemInstruction"]["parts"][0]["text"], "Be brief.");
        assert_eq!(body["contents"][0]["parts"][0]["text"], "Why?");
        assert_eq!(body["contents"][0]["role"], "user");
        assert_eq!(body["generationConfig"]["maxOutputTokens"], 64);
        assert!(body["generationConfig"].get("responseMimeType").is_none());
        assert!(body["generationConfig"].get("responseLogprobs").is_none());
        let asked = LlmRequest {
            confidence: true,
            ..request(None)
        };
        assert_eq!(p.body(&asked)["generationConfig"]["responseLogprobs"], true);
    }

    #[test]
    fn confidence_is_read_from_the_chosen_tokens() {
        let answer = |lp: Value| {
            json!({"candidates": [{"content": {"parts": [{"text": "true"}]},
                "finishReason": "STOP", "logprobsResult": {"chosenCandidates": lp}}]})
        };
        let c = |v: Value| {
            GeminiProvider::parse_answer(&v, Default::default())
                .unwrap()
                .confidence
        };
        let two = json!([{"token": "tr", "logProbability": -0.01},
                         {"token": "ue", "logProbability": (0.5f64).ln()}]);
        assert!((c(answer(two)).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(c(answer(json!([{"token": "x"}]))), None);
        let none = json!({"candidates": [{"content": {"parts": [{"text": "true"}]},
                                          "finishReason": "STOP"}]});
        assert_eq!(c(none), None);
    }

    #[test]
    fn structured_output_is_a_json_schema_with_the_rest_in_words() {
        let schema = json!({"type": "object", "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "A ticker",
                     "examples": ["ABC"]},
            "names": {"type": "array", "items": {"type": ["string", "null"], "maxLength": 9},
                      "minItems": 1},
            "n": {"type": "integer", "minimum": 0}},
            "required": ["code"]});
        let p = provider(StructuredOutput::JsonSchema);
        let body = p.body(&request(Some(schema.clone())));
        let g = &body["generationConfig"];
        assert_eq!(g["responseMimeType"], "application/json");
        let s = &g["responseJsonSchema"];
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["propertyOrdering"], json!(["code", "names", "n"]));
        let code = &s["properties"]["code"];
        assert_eq!(
            code["description"],
            "A ticker (Constraints: matches the regular expression ^[A-Z]{3}$.)"
        );
        assert!(code.get("pattern").is_none() && code.get("examples").is_none());
        let item = &s["properties"]["names"]["items"];
        assert_eq!(item["type"], json!(["string", "null"]));
        assert_eq!(item["description"], "Constraints: at most 9 characters.");
        assert_eq!(s["properties"]["names"]["minItems"], 1);
        assert_eq!(s["properties"]["n"]["minimum"], 0);
        // A scalar is wrapped as for every provider.
        let body = p.body(&request(Some(json!({"type": "integer"}))));
        let s = &body["generationConfig"]["responseJsonSchema"];
        assert_eq!(s["properties"]["value"]["type"], "integer");
        let body = provider(StructuredOutput::JsonObject).body(&request(Some(schema.clone())));
        assert_eq!(
            body["generationConfig"]["responseMimeType"],
            "application/json"
        );
        assert!(body["generationConfig"].get("responseJsonSchema").is_none());
        let body = provider(StructuredOutput::None).body(&request(Some(schema)));
        assert!(body["generationConfig"].get("responseMimeType").is_none());
    }

    fn answer(reason: Value, parts: Value) -> Value {
        json!({"candidates": [{"content": {"role": "model", "parts": parts},
                               "finishReason": reason}],
               "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 7,
                                 "cachedContentTokenCount": 64, "thoughtsTokenCount": 20}})
    }

    #[test]
    fn reads_answers_finish_reasons_and_usage() {
        let parts = json!([{"text": "thinking", "thought": true}, {"text": "a"}, {"text": "b"}]);
        let r =
            GeminiProvider::parse_answer(&answer(json!("STOP"), parts.clone()), Default::default())
                .unwrap();
        assert_eq!(r.content, "ab");
        assert_eq!(r.usage, Some(Usage::new(100, 27, 64)));
        let kind = |v: Value| match GeminiProvider::parse_answer(&v, Default::default()) {
            Ok(r) => crate::llm::parse_response(None, &r).err().map(|e| e.kind),
            Err(e) => Some(e.kind),
        };
        let with = |reason: &str| kind(answer(json!(reason), parts.clone()));
        assert_eq!(with("MAX_TOKENS"), Some(ErrorKind::Truncated));
        for filtered in [
            "SAFETY",
            "RECITATION",
            "BLOCKLIST",
            "PROHIBITED_CONTENT",
            "SPII",
        ] {
            assert_eq!(with(filtered), Some(ErrorKind::BadRequest), "{filtered}");
        }
        for odd in ["OTHER", "MALFORMED_FUNCTION_CALL", "SOMETHING_NEW", ""] {
            assert_eq!(with(odd), Some(ErrorKind::MalformedResponse), "{odd}");
        }
        assert_eq!(
            kind(answer(json!(7), parts)),
            Some(ErrorKind::MalformedResponse)
        );
        assert_eq!(
            kind(answer(json!("STOP"), json!([]))),
            Some(ErrorKind::Empty)
        );
        assert_eq!(
            kind(json!({"candidates": []})),
            Some(ErrorKind::MalformedResponse)
        );
        let blocked = json!({"promptFeedback": {"blockReason": "SAFETY"}});
        let e = GeminiProvider::parse_answer(&blocked, Default::default()).unwrap_err();
        assert_eq!(
            (e.kind, e.finish_reason.as_deref()),
            (ErrorKind::BadRequest, Some("SAFETY"))
        );
        let odd = json!({"candidates": [{"finishReason": "STOP"}],
                         "usageMetadata": {"promptTokenCount": "12", "cachedContentTokenCount": 50}});
        let r = GeminiProvider::parse_answer(&odd, Default::default()).unwrap();
        assert_eq!(
            r.usage,
            Some(Usage::new(0, 0, 0)),
            "cached clamped to the prompt"
        );
    }
}
