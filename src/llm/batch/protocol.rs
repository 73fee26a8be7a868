//! The batch protocol of a model's provider: OpenAI's (and Azure OpenAI's) Files + Batches,
//! where the requests are uploaded as a file and the results are files, Anthropic's Message
//! Batches, where the requests go inline and the results are read from a URL, or Gemini's
//! Batch API, where the requests are uploaded as a file and the results are a file. The queue
//! gathers JSON lines, submits them, polls and reads results through this one type; what
//! differs is here.

use std::sync::Arc;

use super::anthropic::AnthropicBatches;
use super::api::OpenAiBatches;
use super::gemini::GeminiBatches;
use super::job::JobStatus;
use super::line::{request_line, result_line};
use crate::cache::RequestKey;
use crate::config::{ModelConfig, ProviderKind, ServerConfig};
use crate::llm::anthropic::AnthropicProvider;
use crate::llm::gemini::GeminiProvider;
use crate::llm::openai::OpenAiProvider;
use crate::llm::{Provider, SetupError};
use crate::types::{LlmError, LlmRequest, LlmResponse};

/// The batch API of one model's server.
#[derive(Debug, Clone)]
pub enum BatchApi {
    /// OpenAI's or Azure OpenAI's Files + Batches API.
    OpenAi(OpenAiBatches),
    /// Anthropic's Message Batches API.
    Anthropic(AnthropicBatches),
    /// Gemini's Batch API (`batchGenerateContent` of an uploaded file).
    Gemini(GeminiBatches),
}

impl BatchApi {
    /// The batch API of model `m` on server `s` (a kind with one, see
    /// [`ModelConfig::supports_batch`]) with `pool` connections, and its chat provider (for
    /// live retries).
    pub fn of_model(
        m: &ModelConfig,
        s: &ServerConfig,
        pool: usize,
    ) -> Result<(Arc<dyn Provider>, BatchApi), SetupError> {
        Ok(match m.kind {
            ProviderKind::Anthropic => {
                let chat = Arc::new(AnthropicProvider::new(&m.model, s, pool)?);
                let api = BatchApi::Anthropic(AnthropicBatches::new(chat.clone(), &m.name));
                (chat, api)
            }
            ProviderKind::Gemini => {
                let chat = Arc::new(GeminiProvider::new(&m.model, s, pool)?);
                let api = BatchApi::Gemini(GeminiBatches::new(chat.clone(), &m.name));
                (chat, api)
            }
            _ => {
                let chat = Arc::new(OpenAiProvider::new(&m.model, s, pool)?);
                let api = OpenAiBatches::new(chat.clone(), &m.name, &m.batch.completion_window);
                (chat, BatchApi::OpenAi(api))
            }
        })
    }

    /// The JSON line (with its newline) asking for `req` under `key`.
    pub(super) fn request_line(&self, key: &RequestKey, req: &LlmRequest) -> Vec<u8> {
        match self {
            BatchApi::OpenAi(a) => request_line(a.chat(), key, req),
            BatchApi::Anthropic(a) => a.request_line(key, req),
            BatchApi::Gemini(a) => a.request_line(key, req),
        }
    }

    /// Submits the gathered lines `body` (named `name` where they are uploaded as a file): the
    /// uploaded file's id (empty when the requests go inline) and the job.
    pub(super) async fn submit(
        &self,
        name: &str,
        body: Vec<u8>,
    ) -> Result<(String, JobStatus), LlmError> {
        match self {
            BatchApi::OpenAi(a) => {
                let file = a.upload(name, body).await?;
                let job = a.create(&file).await?;
                Ok((file, job))
            }
            BatchApi::Anthropic(a) => Ok((String::new(), a.create(body).await?)),
            BatchApi::Gemini(a) => {
                let file = a.upload(name, body).await?;
                let job = a.create(name, &file).await?;
                Ok((file, job))
            }
        }
    }

    /// The job's state now.
    pub async fn status(&self, id: &str) -> Result<JobStatus, LlmError> {
        match self {
            BatchApi::OpenAi(a) => a.status(id).await,
            BatchApi::Anthropic(a) => a.status(id).await,
            BatchApi::Gemini(a) => a.status(id).await,
        }
    }

    /// Asks the provider to cancel the job.
    pub async fn cancel(&self, id: &str) -> Result<JobStatus, LlmError> {
        match self {
            BatchApi::OpenAi(a) => a.cancel(id).await,
            BatchApi::Anthropic(a) => a.cancel(id).await,
            BatchApi::Gemini(a) => a.cancel(id).await,
        }
    }

    /// The results at `at`, one of a final job's [`JobStatus::results`].
    pub(super) async fn content(&self, at: &str) -> Result<Vec<u8>, LlmError> {
        match self {
            BatchApi::OpenAi(a) => a.content(at).await,
            BatchApi::Anthropic(a) => a.content(at).await,
            BatchApi::Gemini(a) => a.content(at).await,
        }
    }

    /// A result line: whose it is and what it says, or `None` for a line that names no request.
    pub(super) fn result_line(
        &self,
        line: &[u8],
    ) -> Option<(RequestKey, Result<LlmResponse, LlmError>)> {
        match self {
            BatchApi::OpenAi(a) => result_line(a.chat(), line),
            BatchApi::Anthropic(a) => a.result_line(line),
            BatchApi::Gemini(a) => a.result_line(line),
        }
    }
}
