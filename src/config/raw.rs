//! `sluice.toml` as serde reads it: one typed section per table, every key optional, unknown
//! keys refused. [`super::Config::parse`] turns it into the configuration in one validation
//! pass.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::values::{BatchRetry, ModelMode, ProviderKind, StructuredOutput};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub udf_dir: Option<PathBuf>,
    #[serde(default)]
    pub dispatcher: RawDispatcher,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub execution: RawExecution,
    #[serde(default)]
    pub models: BTreeMap<String, RawModel>,
    #[serde(default)]
    pub cluster: RawCluster,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    #[serde(default)]
    pub workers: Vec<String>,
    pub token_env: Option<String>,
    pub tls_ca: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExecution {
    pub memory_limit: Option<String>,
    pub parquet_row_group_bytes: Option<String>,
    pub rows_per_record_batch: Option<usize>,
    pub max_join_calls: Option<u64>,
    /// The former name of `rows_per_record_batch`, refused with a message naming the new one.
    #[serde(rename = "batch_rows")]
    pub renamed_batch_rows: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDispatcher {
    pub concurrency: Option<usize>,
    pub max_attempts: Option<u32>,
    pub backoff_base_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
    pub deadline_ms: Option<u64>,
    pub hedge_after_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub dir: Option<PathBuf>,
    pub enabled: Option<bool>,
}

/// A `[models.NAME]` table. Server and local keys share the table (so that a key given to the
/// wrong kind gets a message saying so, not serde's "unknown field").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    pub kind: ProviderKind,
    pub model: String,
    pub concurrency: Option<usize>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub adaptive_concurrency: Option<bool>,
    pub input_usd_per_mtok: Option<f64>,
    pub output_usd_per_mtok: Option<f64>,
    pub cached_input_usd_per_mtok: Option<f64>,
    pub cache_write_usd_per_mtok: Option<f64>,
    pub mode: Option<ModelMode>,
    pub batch_input_usd_per_mtok: Option<f64>,
    pub batch_output_usd_per_mtok: Option<f64>,
    pub batch_cached_input_usd_per_mtok: Option<f64>,
    pub batch: Option<RawBatch>,
    // Servers only.
    pub base_url: Option<BaseUrls>,
    pub replicas: Option<Vec<RawReplica>>,
    pub api_key_env: Option<String>,
    pub timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub structured_output: Option<StructuredOutput>,
    pub max_response_bytes: Option<usize>,
    pub prompts_per_request: Option<usize>,
    /// The former name of `prompts_per_request`, refused with a message naming the new one.
    #[serde(rename = "batch_size")]
    pub renamed_batch_size: Option<serde::de::IgnoredAny>,
    pub tokenizer: Option<String>,
    pub share_prefixes: Option<bool>,
    pub per_worker: Option<bool>,
    /// `azure_openai` only.
    pub api_version: Option<String>,
    /// `anthropic` only.
    pub prompt_cache_min_tokens: Option<u64>,
    // The local model only.
    pub context_size: Option<u32>,
}

impl RawModel {
    /// The server-only keys that are set.
    pub fn server_keys(&self) -> Vec<&'static str> {
        let set = [
            ("base_url", self.base_url.is_some()),
            ("replicas", self.replicas.is_some()),
            ("api_key_env", self.api_key_env.is_some()),
            ("timeout_ms", self.timeout_ms.is_some()),
            ("connect_timeout_ms", self.connect_timeout_ms.is_some()),
            ("structured_output", self.structured_output.is_some()),
            ("max_response_bytes", self.max_response_bytes.is_some()),
            ("prompts_per_request", self.prompts_per_request.is_some()),
            ("tokenizer", self.tokenizer.is_some()),
            ("share_prefixes", self.share_prefixes.is_some()),
            ("per_worker", self.per_worker.is_some()),
            ("api_version", self.api_version.is_some()),
            (
                "prompt_cache_min_tokens",
                self.prompt_cache_min_tokens.is_some(),
            ),
        ];
        set.iter().filter(|(_, s)| *s).map(|(k, _)| *k).collect()
    }
}

/// `base_url` as written: one URL, or the URLs of several replicas of the model.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a URL, or a list of the URLs of the model's replicas"
)]
pub(super) enum BaseUrls {
    One(String),
    Many(Vec<String>),
}

/// One entry of `replicas = [{ base_url = "...", api_key_env = "..." }]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReplica {
    pub base_url: String,
    pub api_key_env: Option<String>,
}

/// `[models.NAME.batch]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBatch {
    pub max_requests: Option<usize>,
    pub max_bytes: Option<String>,
    pub poll_ms: Option<u64>,
    pub collect_ms: Option<u64>,
    pub retry: Option<BatchRetry>,
    pub completion_window: Option<String>,
}
