//! What a model endpoint is to the dispatcher: a [`Provider`] makes one attempt per call, and
//! [`SetupError`] says why one cannot serve.

use std::fmt;

use async_trait::async_trait;

use super::response::malformed;
use crate::types::{LlmError, LlmRequest, LlmResponse, OutputSchema};

/// Why a model cannot be set up, or cannot serve a function.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SetupError {
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
    /// The tokenizer that `sluice explain` counts with cannot be had.
    #[error("{0}")]
    Tokenizer(String),
    /// The provider cannot return values of the function's output schema.
    #[error("{0}")]
    Output(String),
    /// The provider's kind is not in this build, or does not match its settings.
    #[error("{0}")]
    Unavailable(String),
}

/// A model endpoint. Implementations make exactly one attempt per call; retrying, pacing and
/// validation belong to the [`Dispatcher`].
#[async_trait]
pub trait Provider: Send + Sync + fmt::Debug {
    /// Identifies the endpoint and model (part of the cache key; never contains secrets).
    fn endpoint(&self) -> String;
    /// Sends one request.
    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError>;

    /// Most prompts one request may carry (1: one prompt per request).
    fn max_prompts_per_request(&self) -> usize {
        1
    }

    /// Sends several prompts (of the same function and parameters) in one request: one result
    /// per prompt, in order, or one error for the whole request.
    async fn complete_list(
        &self,
        reqs: &[LlmRequest],
    ) -> Result<Vec<Result<LlmResponse, LlmError>>, LlmError> {
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            out.push(self.complete(r).await);
        }
        Ok(out)
    }

    /// Whether it returns embeddings (for functions of `kind = "embedding"`) rather than
    /// completions.
    fn embeds(&self) -> bool {
        false
    }

    /// Whether it gives an answer's confidence (its tokens' log-probabilities) when a request
    /// asks for it ([`LlmRequest::confidence`]): a model a cascade may pass rows on from.
    fn gives_confidence(&self) -> bool {
        false
    }

    /// Whether this provider can return values of `schema`; checked when the engine starts.
    fn check_schema(&self, _schema: Option<&OutputSchema>) -> Result<(), SetupError> {
        Ok(())
    }
}

/// One prompt sent as a list of one, for providers whose protocol takes lists.
pub async fn complete_as_list<P: Provider + ?Sized>(
    provider: &P,
    req: &LlmRequest,
) -> Result<LlmResponse, LlmError> {
    let mut out = provider.complete_list(std::slice::from_ref(req)).await?;
    out.pop().unwrap_or_else(|| {
        Err(malformed(
            "the response has no answer for the prompt".into(),
        ))
    })
}
