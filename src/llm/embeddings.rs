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
use crate::types::{LlmError, LlmRequest, LlmResponse, OutputSchema, SchemaKind, Usage};

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
        if is_vector_schema(schema) {
            Ok(())
        } else {
            Err(SetupError::Output(
                "it serves embeddings (kind = \"openai_embeddings\"): only functions of kind = \
                 \"embedding\" can use it"
                    .into(),
            ))
        }
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
        let mut out: Vec<Option<Result<LlmResponse, LlmError>>> = vec![None; reqs.len()];
        for (pos, d) in data.iter().enumerate() {
            let i = d
                .get("index")
                .and_then(Value::as_u64)
                .map_or(pos, |i| i as usize);
            let Some(slot) = out.get_mut(i) else { continue };
            *slot = Some(match d.get("embedding") {
                Some(e @ Value::Array(_)) => Ok(LlmResponse {
                    content: e.to_string(),
                    finish_reason: Some("stop".into()),
                    usage,
                    rate,
                }),
                _ => Err(malformed(format!(
                    "data[{i}] has no embedding array: {}",
                    preview(&d.to_string())
                ))),
            });
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(malformed("no embedding for this input".into()))))
            .collect())
    }
}
