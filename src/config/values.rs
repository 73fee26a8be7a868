//! The typed values a key of `sluice.toml` takes: the enums serde reads as they are (a
//! provider's kind, structured output, a model's mode, where batch failures retry), prices and
//! sizes. Both the serde layer ([`super::raw`]) and the checked configuration use them.

use std::fmt;

use serde::Deserialize;

use crate::types::Usage;

/// Provider kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Any OpenAI-compatible chat completions server (OpenAI, vLLM, Ollama, llama.cpp server).
    Openai,
    /// An OpenAI-compatible text completions server taking list prompts (vLLM, llama.cpp
    /// server): `prompts_per_request` prompts per request.
    OpenaiCompletions,
    /// Lamini's API: list prompts and `output_type`.
    Lamini,
    /// An OpenAI-compatible embeddings endpoint (`POST {base_url}/embeddings`): `prompts_per_request`
    /// inputs per request (default 64), for functions of `kind = "embedding"`.
    OpenaiEmbeddings,
    /// The embedded local model: a GGUF file run in-process with llama.cpp.
    Local,
    /// Azure OpenAI: chat completions of a deployment
    /// (`{base_url}/openai/deployments/{model}/chat/completions?api-version=...`, `api-key`).
    AzureOpenai,
    /// Anthropic's Messages API (`POST {base_url}/v1/messages`, `x-api-key`), with prompt
    /// caching.
    Anthropic,
    /// Google's Gemini API (`POST {base_url}/v1beta/models/{model}:generateContent`,
    /// `x-goog-api-key`), with embeddings (`:batchEmbedContents`) for embedding functions.
    Gemini,
}

/// How structured output is requested from an OpenAI-compatible server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StructuredOutput {
    /// `response_format = {type: "json_schema", ...}` (OpenAI, vLLM, llama.cpp server, Ollama).
    #[default]
    JsonSchema,
    /// `response_format = {type: "json_object"}`; the schema is still validated by sluice.
    JsonObject,
    /// No `response_format`; the schema is described in the prompt and validated by sluice.
    None,
}

/// What a model's tokens cost, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prices {
    /// USD per million prompt tokens (`input_usd_per_mtok`).
    pub input: f64,
    /// USD per million completion tokens (`output_usd_per_mtok`).
    pub output: f64,
    /// USD per million prompt tokens the server took from its prompt cache
    /// (`cached_input_usd_per_mtok`; default: the input price, Anthropic's 0.1 × it).
    pub cached_input: f64,
    /// USD per million prompt tokens written to the server's prompt cache
    /// (`cache_write_usd_per_mtok`; default: the input price, Anthropic's 1.25 × it).
    pub cache_write: f64,
}

impl Prices {
    /// Input and output prices, cached input at the input price.
    pub fn new(input: f64, output: f64) -> Prices {
        Prices {
            input,
            output,
            cached_input: input,
            cache_write: input,
        }
    }

    /// The cost of `prompt` + `completion` tokens in USD, none of them cached.
    pub fn cost(&self, prompt: u64, completion: u64) -> f64 {
        self.cost_cached(prompt, 0, completion)
    }

    /// The cost in USD of `prompt` tokens, `cached` of them (at most `prompt`) from the
    /// server's prompt cache, and `completion` tokens.
    pub fn cost_cached(&self, prompt: u64, cached: u64, completion: u64) -> f64 {
        self.cost_of(&Usage::new(prompt, completion, cached))
    }

    /// The cost in USD of `usage`: its prompt tokens read from the server's prompt cache at
    /// the cached price, those written to it at the cache write price, the rest at the input
    /// price, and its completion tokens.
    pub fn cost_of(&self, usage: &Usage) -> f64 {
        let cached = usage.cached_prompt_tokens.min(usage.prompt_tokens);
        let written = usage.cache_write_tokens.min(usage.prompt_tokens - cached);
        ((usage.prompt_tokens - cached - written) as f64 * self.input
            + cached as f64 * self.cached_input
            + written as f64 * self.cache_write
            + usage.completion_tokens as f64 * self.output)
            / 1e6
    }
}

/// How a model's calls are sent (`mode` of `[models.NAME]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ModelMode {
    /// One request per call (default).
    #[default]
    Live,
    /// Gathered into files for the provider's batch API (OpenAI Files + Batches).
    Batch,
}

/// Where a call whose batch result failed is tried again (`retry` of `[models.NAME.batch]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BatchRetry {
    /// In a follow-up batch (default).
    #[default]
    Batch,
    /// As a live request.
    Live,
}

/// Parses sizes such as `1GB`, `100MB`, `512KB` or a byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [
        ("GB", 1u64 << 30),
        ("MB", 1 << 20),
        ("KB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.trim().to_string(), *m)))
    .unwrap_or((t.clone(), 1));
    num.parse::<f64>()
        .ok()
        .filter(|n| *n > 0.0)
        .map(|n| (n * mult as f64) as u64)
        .ok_or_else(|| format!("{s:?} is not a size such as 100MB or 1GB"))
}

/// A secret string (an API key, the cluster token). Its `Debug` and `Display` never show the value, so it cannot leak
/// through logs or error messages by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret value; call only where it is sent to the provider.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `Bearer SECRET`: the value of an `authorization` header that carries it.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether `presented` is [`Secret::bearer`] (an `authorization` header's value), compared
    /// in time that does not depend on where the two differ.
    pub fn is_bearer(&self, presented: &[u8]) -> bool {
        let expected = self.bearer();
        let expected = expected.as_bytes();
        let mut diff = u8::from(expected.len() != presented.len());
        for (i, e) in expected.iter().enumerate() {
            diff |= e ^ presented.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}
