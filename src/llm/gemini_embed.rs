//! Gemini's embeddings (`POST {base_url}/v1beta/models/{model}:batchEmbedContents`), for the
//! functions of `kind = "embedding"` that name a Gemini model: up to [`MAX_INPUTS`] inputs per
//! request, each `{model: "models/{id}", content: {parts: [{text}]}, outputDimensionality}`
//! with the function's `dim`, answered by one `{values: [...]}` per input, in order.

use async_trait::async_trait;
use serde_json::{Value, json};

use super::embeddings::{check_vector_schema, vectors_by_input};
use super::gemini::{gemini_endpoint, model_id};
use super::http::HttpEndpoint;
use super::response::malformed;
use super::{Provider, SetupError, preview};
use crate::config::ServerConfig;
use crate::types::{LlmError, LlmRequest, LlmResponse, OutputSchema, SchemaKind, Usage};

/// Most inputs one `batchEmbedContents` request takes.
pub const MAX_INPUTS: usize = 100;

/// The embeddings of a Gemini model.
#[derive(Debug)]
pub struct GeminiEmbedder {
    http: HttpEndpoint,
    model: String,
}

impl GeminiEmbedder {
    /// Builds the embedder of `model` on one configured server.
    pub fn new(model: &str, cfg: &ServerConfig, pool_size: usize) -> Result<Self, SetupError> {
        Ok(GeminiEmbedder {
            http: gemini_endpoint(model, "batchEmbedContents", cfg, pool_size)?,
            model: model_id(model).to_string(),
        })
    }

    /// The JSON body of `reqs`: each input with its function's vector length.
    pub fn body(&self, reqs: &[LlmRequest]) -> Value {
        let name = format!("models/{}", self.model);
        let requests: Vec<Value> = reqs
            .iter()
            .map(|r| {
                let mut one = json!({"model": name,
                                     "content": {"parts": [{"text": r.prompt.user}]}});
                if let Some(dim) = r.schema.as_deref().and_then(dimension) {
                    one["outputDimensionality"] = json!(dim);
                }
                one
            })
            .collect();
        json!({ "requests": requests })
    }
}

/// The vector length an embedding function's schema fixes (`minItems` = `maxItems`).
fn dimension(schema: &OutputSchema) -> Option<u64> {
    match &schema.root.kind {
        SchemaKind::Array {
            min_items: Some(n),
            max_items: Some(m),
            ..
        } if n == m => Some(*n),
        _ => None,
    }
}

#[async_trait]
impl Provider for GeminiEmbedder {
    fn endpoint(&self) -> String {
        format!("gemini-embeddings:{}#{}", self.http.identity(), self.model)
    }

    fn max_prompts_per_request(&self) -> usize {
        MAX_INPUTS
    }

    fn embeds(&self) -> bool {
        true
    }

    fn check_schema(&self, schema: Option<&OutputSchema>) -> Result<(), SetupError> {
        check_vector_schema(
            schema,
            "Gemini's batchEmbedContents serves only functions of kind = \"embedding\"",
        )
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        super::complete_as_list(self, req).await
    }

    async fn complete_list(
        &self,
        reqs: &[LlmRequest],
    ) -> Result<Vec<Result<LlmResponse, LlmError>>, LlmError> {
        let (v, rate) = self.http.post_json(&self.body(reqs)).await?;
        let embeddings = v
            .get("embeddings")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed(format!("no embeddings in {}", preview(&v.to_string()))))?;
        // Tokens are reported per request, when they are: shared evenly.
        let usage = v
            .pointer("/usageMetadata/promptTokenCount")
            .and_then(Value::as_u64)
            .map(|t| Usage::new(t / reqs.len().max(1) as u64, 0, 0));
        let elements = embeddings.iter().enumerate();
        Ok(vectors_by_input(
            elements,
            "values",
            reqs.len(),
            usage,
            rate,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::types::{PromptCuts, RenderedPrompt};

    #[test]
    fn each_input_asks_for_its_functions_dimension() {
        let text = "[models.g]\nkind = \"gemini\"\nmodel = \"gemini-embedding-001\"\n\
                    base_url = \"http://127.0.0.1:9\"\n";
        let cfg =
            crate::config::Config::parse(text, std::path::Path::new("s.toml"), &|_| None).unwrap();
        let e = GeminiEmbedder::new("gemini-embedding-001", cfg.models["g"].server().unwrap(), 1)
            .unwrap();
        assert_eq!(
            e.http.url(),
            "http://127.0.0.1:9/v1beta/models/gemini-embedding-001:batchEmbedContents"
        );
        let schema = json!({"type": "array", "items": {"type": "number"},
                            "minItems": 768, "maxItems": 768});
        let req = LlmRequest {
            confidence: false,
            function: "embed".into(),
            prompt: RenderedPrompt {
                system: None,
                user: "hello".into(),
                cuts: PromptCuts::default(),
            },
            max_tokens: None,
            temperature: None,
            schema: Some(Arc::new(OutputSchema::new(schema).unwrap())),
        };
        let body = e.body(&[req]);
        let one = &body["requests"][0];
        assert_eq!(one["model"], "models/gemini-embedding-001");
        assert_eq!(one["content"]["parts"][0]["text"], "hello");
        assert_eq!(one["outputDimensionality"], 768);
        assert!(e.check_schema(None).is_err());
    }
}
