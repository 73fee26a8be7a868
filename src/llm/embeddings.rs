//! OpenAI-compatible embeddings (`POST {base_url}/embeddings`, OpenAI, vLLM, Ollama, llama.cpp
//! server): up to `prompts_per_request` inputs per request, one vector per input, in order.
//!
//! A vector goes through the dispatcher like any answer: its content is the JSON array of
//! numbers, validated against the function's schema (an array of exactly `dim` numbers) and
//! cached under the input's key.

use async_trait::async_trait;
use serde_json::{Value, json};

use super::http::HttpEndpoint;
use super::response::malformed;
use super::{Provider, SetupError, preview};
use crate::config::ServerConfig;
use crate::types::{
    LlmError, LlmRequest, LlmResponse, OutputSchema, RateLimits, SchemaKind, Usage,
};

/// A provider of the OpenAI embeddings protocol.
#[derive(Debug)]
pub struct EmbeddingsProvider {
    http: HttpEndpoint,
    model: String,
    prompts_per_request: usize,
}

impl EmbeddingsProvider {
    /// Builds a provider for `model` on one configured server.
    pub fn new(model: &str, cfg: &ServerConfig, pool_size: usize) -> Result<Self, SetupError> {
        Ok(EmbeddingsProvider {
            http: HttpEndpoint::new(cfg, format!("{}/embeddings", cfg.base_url), pool_size)?,
            model: model.to_string(),
            prompts_per_request: cfg.prompts_per_request,
        })
    }
}

/// Whether `schema` is what an embedding function returns: an array of numbers.
pub fn is_vector_schema(schema: Option<&OutputSchema>) -> bool {
    schema.is_some_and(|s| match &s.root.kind {
        SchemaKind::Array { items, .. } => matches!(items.kind, SchemaKind::Number(_)),
        _ => false,
    })
}

/// The schema check of an embeddings provider: only a vector's schema passes; `refusal` says
/// why any other cannot.
pub fn check_vector_schema(schema: Option<&OutputSchema>, refusal: &str) -> Result<(), SetupError> {
    if is_vector_schema(schema) {
        Ok(())
    } else {
        Err(SetupError::Output(refusal.to_string()))
    }
}

/// One answer per input of an embeddings request of `n` inputs, in order, from the elements
/// of the response paired with their input's index: an element's `field` (a JSON array) is its
/// input's answer; an input with no element, or one whose element has no such array, is a
/// malformed answer.
pub fn vectors_by_input<'a>(
    elements: impl IntoIterator<Item = (usize, &'a Value)>,
    field: &str,
    n: usize,
    usage: Option<Usage>,
    rate: RateLimits,
) -> Vec<Result<LlmResponse, LlmError>> {
    let mut out: Vec<Option<Result<LlmResponse, LlmError>>> = vec![None; n];
    for (i, e) in elements {
        let Some(slot) = out.get_mut(i) else { continue };
        *slot = Some(match e.get(field) {
            Some(v @ Value::Array(_)) => Ok(LlmResponse {
                confidence: None,
                content: v.to_string(),
                finish_reason: Some("stop".into()),
                usage,
                rate,
            }),
            _ => Err(malformed(format!(
                "answer {i} has no {field} array: {}",
                preview(&e.to_string())
            ))),
        });
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(malformed("no embedding for this input".into()))))
        .collect()
}

#[async_trait]
impl Provider for EmbeddingsProvider {
    fn endpoint(&self) -> String {
        format!("openai-embeddings:{}#{}", self.http.identity(), self.model)
    }

    fn max_prompts_per_request(&self) -> usize {
        self.prompts_per_request
    }

    fn embeds(&self) -> bool {
        true
    }

    fn check_schema(&self, schema: Option<&OutputSchema>) -> Result<(), SetupError> {
        check_vector_schema(
            schema,
            "it serves embeddings (kind = \"openai_embeddings\"): only functions of kind = \
             \"embedding\" can use it",
        )
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        super::complete_as_list(self, req).await
    }

    async fn complete_list(
        &self,
        reqs: &[LlmRequest],
    ) -> Result<Vec<Result<LlmResponse, LlmError>>, LlmError> {
        let inputs: Vec<&str> = reqs.iter().map(|r| r.prompt.user.as_str()).collect();
        let body = json!({"model": self.model, "input": inputs, "encoding_format": "float"});
        let (v, rate) = self.http.post_json(&body).await?;
        let data = v
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed(format!("no data in {}", preview(&v.to_string()))))?;
        let n = reqs.len() as u64;
        let usage = v.get("usage").map(|u| Usage {
            // Usage is reported per request: share it evenly.
            prompt_tokens: u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0) / n,
            completion_tokens: 0,
            cached_prompt_tokens: 0,
            cache_write_tokens: 0,
        });
        let elements = data.iter().enumerate().map(|(pos, d)| {
            let i = d.get("index").and_then(Value::as_u64);
            (i.map_or(pos, |i| i as usize), d)
        });
        Ok(vectors_by_input(
            elements,
            "embedding",
            reqs.len(),
            usage,
            rate,
        ))
    }
}
