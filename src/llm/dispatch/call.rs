//! What a call is: its result, the model it goes to, the function's parameters, and how a
//! failed request is told to the model's governor.

use std::sync::Arc;

use serde_json::Value;

use crate::config::Prices;
use crate::llm::Provider;
use crate::llm::batch::BatchQueue;
use crate::llm::estimate::LazyCounter;
use crate::llm::governor::{Governor, Outcome};
use crate::llm::replicas::{Replica, ReplicaSet};

use super::metrics::CascadeTally;
use super::order::PrefixOrder;
use crate::types::{ErrorKind, LlmError, LlmRequest, OutputSchema, RenderedPrompt, RowError};

/// The result of one row's call: the validated value or the final error.
pub(crate) type CallResult = Result<Arc<Value>, Arc<RowError>>;

/// A model as the dispatcher sees it: a provider and the governor that paces it, or (a model
/// served by several replicas) a provider and governor per replica.
#[derive(Debug, Clone)]
pub(crate) struct ModelHandle {
    /// The endpoint.
    pub provider: Arc<dyn Provider>,
    /// Adaptive concurrency, RPM/TPM buckets and pauses for this model.
    pub governor: Arc<Governor>,
    /// What its tokens cost (for `--budget-usd`), if known: the batch prices in batch mode.
    pub prices: Option<Prices>,
    /// In batch mode, the queue its calls go to instead of the provider.
    pub batch: Option<Arc<BatchQueue>>,
    /// For a model that completes and also embeds (the local model): the provider of its
    /// embeddings.
    pub embedder: Option<Arc<dyn Provider>>,
    /// Its tokenizer, for budgets counted in its tokens (an aggregate's `max_input_tokens`).
    pub tokens: Option<Arc<LazyCounter>>,
    /// For a model served by several replicas: each with its provider and governor, and the
    /// routing between them (`provider` and `governor` are then the first replica's).
    pub replicas: Option<Arc<ReplicaSet>>,
    /// For a server whose prompt cache is fed in order (`share_prefixes`): which of its
    /// prompts on the wire lead which prefixes.
    pub prefixes: Option<Arc<PrefixOrder>>,
    /// For a stage of a model cascade: where what its answers cost is also counted.
    pub tally: Option<Arc<CascadeTally>>,
}

/// The value stored and returned for a call that asked for its answer's confidence (a stage of
/// a cascade that may pass the row on): the answer's value and its confidence (null when the
/// server gave none).
pub(crate) fn confident_value(value: Value, confidence: Option<f64>) -> Value {
    serde_json::json!({"value": value, "confidence": confidence})
}

/// The value and confidence of a [`confident_value`] (confidence 0 when it has none).
pub(crate) fn split_confident(v: &Value) -> (Value, f64) {
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    let confidence = v.get("confidence").and_then(Value::as_f64).unwrap_or(0.0);
    (value, confidence)
}

impl ModelHandle {
    /// Whether functions of `kind = "embedding"` can use it.
    pub fn embeds(&self) -> bool {
        self.provider.embeds() || self.embedder.is_some()
    }

    /// The handle of one replica's attempts: its provider and governor.
    pub fn on_replica(&self, r: &Replica) -> ModelHandle {
        ModelHandle {
            provider: r.provider.clone(),
            governor: r.governor.clone(),
            replicas: None,
            ..self.clone()
        }
    }

    /// The handle a function's calls go through: its embedder for an embedding function.
    pub fn for_kind(&self, embedding: bool) -> ModelHandle {
        match (&self.embedder, embedding) {
            (Some(e), true) => ModelHandle {
                provider: e.clone(),
                embedder: None,
                ..self.clone()
            },
            _ => self.clone(),
        }
    }
}

/// What every call of one function shares: its name, generation parameters and output schema.
#[derive(Debug, Clone)]
pub(crate) struct CallSpec {
    /// The function's SQL name.
    pub function: String,
    /// Generation limit.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Structured output, if declared.
    pub schema: Option<Arc<OutputSchema>>,
    /// With `rows_per_prompt`: how the rows' items are packed into one prompt.
    pub pack: Option<Arc<dyn Packer>>,
    /// Whether each answer's confidence is asked for and returned with its value (see
    /// [`confident_value`]): a stage of a cascade that may pass rows on.
    pub confidence: bool,
    /// A model of a cascade: the cascade counts the function's prompts (once per row).
    pub in_cascade: bool,
}

/// Renders the shared prompt of a packed request from its rows' items
/// (`rows_per_prompt`; the SQL layer implements it from the function's templates).
pub(crate) trait Packer: Send + Sync + std::fmt::Debug {
    /// Most rows in one request.
    fn rows(&self) -> usize;
    /// The prompt carrying `items`, in order.
    fn render(&self, items: &[&str]) -> Result<RenderedPrompt, String>;
}

impl CallSpec {
    pub(super) fn request(&self, prompt: RenderedPrompt) -> LlmRequest {
        LlmRequest {
            function: self.function.clone(),
            prompt,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            schema: self.schema.clone(),
            confidence: self.confidence,
        }
    }
}

/// How a failed request ended, for its model's governor.
pub(super) fn error_outcome(e: &LlmError) -> Outcome {
    match e.kind {
        ErrorKind::RateLimited => Outcome::RateLimited {
            retry_after: e.retry_after,
            rate: e.rate.as_deref().copied().unwrap_or_default(),
        },
        _ => Outcome::Failed,
    }
}
