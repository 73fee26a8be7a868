//! `sluice.toml`: providers, models, dispatcher settings.
//!
//! The file is optional. It names the models that LLM functions refer to (`model = "default"` in a
//! `udfs/*.toml` file), and for each model the provider kind, endpoint, the *name* of the environment
//! variable holding the API key (never the key itself), concurrency and timeouts.
//!
//! ```toml
//! udf_dir = "udfs"
//!
//! [dispatcher]
//! concurrency = 64        # global budget shared by every function, partition and stage
//! max_attempts = 6        # per row, including the first try
//!
//! [cache]
//! dir = ".sluice/cache"   # persistent response cache (relative to this file)
//! enabled = true
//!
//! [models.default]
//! kind = "openai"                         # any OpenAI-compatible server
//! base_url = "http://127.0.0.1:8000/v1"
//! model = "gpt-4o-mini"
//! api_key_env = "OPENAI_API_KEY"
//! concurrency = 64                        # most requests in flight for this model
//! rpm = 5000                              # optional requests-per-minute limit
//! tpm = 2000000                           # optional tokens-per-minute limit
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors raised while loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown/ill-typed keys.
    #[error("{path}: {message}")]
    Parse {
        /// File that failed.
        path: PathBuf,
        /// Parser message (includes line and column).
        message: String,
    },
    /// A semantic problem with a value.
    #[error("{path}: {message}")]
    Invalid {
        /// File that failed.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// A secret string (API key). Its `Debug` and `Display` never show the value, so it cannot leak
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

/// Provider kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Any OpenAI-compatible chat completions server (OpenAI, vLLM, Ollama, llama.cpp server).
    Openai,
    /// An OpenAI-compatible text completions server taking list prompts (vLLM, llama.cpp
    /// server): `batch_size` prompts per request.
    OpenaiCompletions,
    /// Lamini's API: list prompts and `output_type`.
    Lamini,
    /// The embedded local model: a GGUF file run in-process with llama.cpp.
    Local,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    udf_dir: Option<PathBuf>,
    #[serde(default)]
    dispatcher: RawDispatcher,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    execution: RawExecution,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawExecution {
    memory_limit: Option<String>,
    parquet_row_group_bytes: Option<String>,
    batch_rows: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDispatcher {
    concurrency: Option<usize>,
    max_attempts: Option<u32>,
    backoff_base_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    deadline_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    dir: Option<PathBuf>,
    enabled: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    kind: ProviderKind,
    base_url: Option<String>,
    model: String,
    api_key_env: Option<String>,
    concurrency: Option<usize>,
    timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    structured_output: Option<StructuredOutput>,
    max_response_bytes: Option<usize>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    adaptive_concurrency: Option<bool>,
    batch_size: Option<usize>,
    context_size: Option<u32>,
    input_usd_per_mtok: Option<f64>,
    output_usd_per_mtok: Option<f64>,
    tokenizer: Option<String>,
}

/// Dispatcher settings: the global budget and the retry policy.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Requests in flight at once, over every model and function.
    pub concurrency: usize,
    /// Attempts per row, including the first (≥ 1).
    pub max_attempts: u32,
    /// First backoff delay; doubles per attempt, with full jitter.
    pub backoff_base: Duration,
    /// Upper bound of one backoff delay (also caps Retry-After).
    pub backoff_max: Duration,
    /// Total time one row may spend on its attempts and waits; no retry starts after it.
    pub row_deadline: Duration,
    /// Most tokens (prompt + completion) the run may spend; `--budget-tokens`.
    pub budget_tokens: Option<u64>,
    /// Most US dollars the run may spend at the models' prices; `--budget-usd`.
    pub budget_usd: Option<f64>,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            concurrency: 64,
            max_attempts: 6,
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            row_deadline: Duration::from_secs(600),
            budget_tokens: None,
            budget_usd: None,
        }
    }
}

/// Where the persistent response cache lives and whether it is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// The cache directory (default `.sluice/cache`, relative to the config file's directory or
    /// to the working directory without one).
    pub dir: PathBuf,
    /// Whether runs read and write the cache (`--no-cache` turns it off for one run).
    pub enabled: bool,
    /// Ignore stored responses but store new ones (`--refresh`; not a file setting).
    pub refresh: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: PathBuf::from(".sluice").join("cache"),
            enabled: true,
            refresh: false,
        }
    }
}

/// Query execution settings (`[execution]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionConfig {
    /// Memory the query engine may hold (sorts, joins and aggregations spill to disk beyond it;
    /// other operators fail with a clear error). `None`: no limit.
    pub memory_limit: Option<u64>,
    /// Most bytes per Parquet row group that COPY writes: a row group is held in memory until
    /// it is complete, so this bounds the writer's memory whatever the row width or the
    /// compression.
    pub parquet_row_group_bytes: u64,
    /// Rows per Arrow batch between operators. Text pipelines carry kilobytes per row, so this
    /// is smaller than DataFusion's 8,192: less memory in flight, same speed.
    pub batch_rows: usize,
}

/// Row group size in bytes by default. The writer holds a row group, and about three copies of
/// it while it is flushed (DataFusion's write buffer, the bytes handed to the object store, the
/// upload part), so this bounds its memory: on the 1 GB benchmark 4 MB peaks ~27 MB lower than
/// 16 MB. 4 MB of compressed pages is still tens of thousands of rows, large enough for scans.
pub const DEFAULT_ROW_GROUP_BYTES: u64 = 4 << 20;
/// Rows per batch by default.
pub const DEFAULT_BATCH_ROWS: usize = 1024;

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            memory_limit: None,
            parquet_row_group_bytes: DEFAULT_ROW_GROUP_BYTES,
            batch_rows: DEFAULT_BATCH_ROWS,
        }
    }
}

/// One model a function can name.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The name functions use (`model = "default"`).
    pub name: String,
    /// Provider kind.
    pub kind: ProviderKind,
    /// Base URL, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Model id sent to the provider.
    pub model: String,
    /// Name of the environment variable that held the key (for messages).
    pub api_key_env: Option<String>,
    /// The key, read from `api_key_env` at load time.
    pub api_key: Option<Secret>,
    /// Requests in flight for this model (never more than the global budget).
    pub concurrency: usize,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// How to ask for structured output.
    pub structured_output: StructuredOutput,
    /// Largest response body accepted.
    pub max_response_bytes: usize,
    /// Requests per minute allowed by the provider, if limited.
    pub rpm: Option<u64>,
    /// Tokens per minute allowed by the provider, if limited.
    pub tpm: Option<u64>,
    /// Shrink concurrency on 429s and grow it back on success (default true).
    pub adaptive_concurrency: bool,
    /// Prompts per request for providers that take several (`openai_completions`, `lamini`;
    /// default 8); always 1 for chat completions.
    pub batch_size: usize,
    /// Context tokens per row for the local model (prompt and output; default 2048).
    pub context_size: u32,
    /// Prices for `sluice explain` and `--budget-usd` (a local model costs nothing).
    pub prices: Option<Prices>,
    /// How `sluice explain` counts tokens: a tiktoken encoding (`o200k_base`, `cl100k_base`) or
    /// a GGUF file whose vocabulary to use; default: the encoding OpenAI uses for `model`, else
    /// `o200k_base`. Local models always use their own vocabulary.
    pub tokenizer: Option<String>,
}

/// What a model's tokens cost, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prices {
    /// USD per million prompt tokens (`input_usd_per_mtok`).
    pub input: f64,
    /// USD per million completion tokens (`output_usd_per_mtok`).
    pub output: f64,
}

impl Prices {
    /// The cost of `prompt` + `completion` tokens in USD.
    pub fn cost(&self, prompt: u64, completion: u64) -> f64 {
        (prompt as f64 * self.input + completion as f64 * self.output) / 1e6
    }
}

/// The GGUF the default model runs (fetched by `scripts/fetch-model.sh`).
pub const DEFAULT_LOCAL_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

impl ModelConfig {
    /// The embedded local model reading `path`, decoding `parallel` rows together.
    pub fn local(name: &str, path: PathBuf, parallel: usize) -> ModelConfig {
        ModelConfig {
            name: name.to_string(),
            kind: ProviderKind::Local,
            base_url: String::new(),
            model: path.to_string_lossy().to_string(),
            api_key_env: None,
            api_key: None,
            concurrency: parallel,
            timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(10),
            structured_output: StructuredOutput::JsonSchema,
            max_response_bytes: 16 << 20,
            rpm: None,
            tpm: None,
            adaptive_concurrency: false,
            batch_size: 1,
            context_size: 2048,
            prices: Some(Prices {
                input: 0.0,
                output: 0.0,
            }),
            tokenizer: None,
        }
    }
}

/// The loaded configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where `*.toml` function definitions live (relative to the config file's directory).
    pub udf_dir: PathBuf,
    /// Dispatcher settings.
    pub dispatcher: DispatcherConfig,
    /// Persistent response cache.
    pub cache: CacheConfig,
    /// Query execution (memory).
    pub execution: ExecutionConfig,
    /// Models by name.
    pub models: BTreeMap<String, ModelConfig>,
    /// The file this came from, if any.
    pub source: Option<PathBuf>,
}

impl Default for Config {
    /// No file: functions in `./udfs`, the cache in `./.sluice/cache`, and the `default` model is
    /// the embedded SmolLM2-135M-Instruct in `./models/`.
    fn default() -> Self {
        let mut models = BTreeMap::new();
        if cfg!(feature = "local") {
            models.insert(
                "default".to_string(),
                ModelConfig::local("default", PathBuf::from(DEFAULT_LOCAL_MODEL), 8),
            );
        }
        Config {
            udf_dir: PathBuf::from("udfs"),
            dispatcher: DispatcherConfig::default(),
            cache: CacheConfig::default(),
            execution: ExecutionConfig::default(),
            models,
            source: None,
        }
    }
}

impl Config {
    /// Loads `path`. Environment lookups for API keys go through `env`, so tests can supply
    /// variables without touching the process environment.
    pub fn load_with_env(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path, env)
    }

    /// Loads `path`, reading API keys from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, &|k| std::env::var(k).ok())
    }

    /// Parses configuration text; `path` is used in messages and to resolve `udf_dir`.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let base_dir = path.parent().unwrap_or(Path::new("."));
        let mut cfg = Config {
            source: Some(path.to_path_buf()),
            ..Config::default()
        };
        // A file that names no `default` model keeps the embedded one, found beside the file.
        if let Some(m) = cfg.models.get_mut("default") {
            m.model = base_dir
                .join(DEFAULT_LOCAL_MODEL)
                .to_string_lossy()
                .to_string();
        }
        if let Some(dir) = raw.udf_dir {
            cfg.udf_dir = base_dir.join(dir);
        } else {
            cfg.udf_dir = base_dir.join("udfs");
        }
        cfg.cache.dir = base_dir.join(raw.cache.dir.unwrap_or(cfg.cache.dir));
        if let Some(e) = raw.cache.enabled {
            cfg.cache.enabled = e;
        }
        if let Some(limit) = &raw.execution.memory_limit {
            let bytes =
                parse_size(limit).map_err(|e| invalid(format!("execution.memory_limit: {e}")))?;
            cfg.execution.memory_limit = Some(bytes);
        }
        if let Some(size) = &raw.execution.parquet_row_group_bytes {
            cfg.execution.parquet_row_group_bytes = parse_size(size)
                .map_err(|e| invalid(format!("execution.parquet_row_group_bytes: {e}")))?;
        }
        if let Some(rows) = raw.execution.batch_rows {
            if rows == 0 {
                return Err(invalid("execution.batch_rows must be at least 1".into()));
            }
            cfg.execution.batch_rows = rows;
        }
        let d = raw.dispatcher;
        if let Some(c) = d.concurrency {
            if c == 0 {
                return Err(invalid("dispatcher.concurrency must be at least 1".into()));
            }
            cfg.dispatcher.concurrency = c;
        }
        if let Some(a) = d.max_attempts {
            if a == 0 {
                return Err(invalid("dispatcher.max_attempts must be at least 1".into()));
            }
            cfg.dispatcher.max_attempts = a;
        }
        if let Some(ms) = d.backoff_base_ms {
            cfg.dispatcher.backoff_base = Duration::from_millis(ms);
        }
        if let Some(ms) = d.backoff_max_ms {
            cfg.dispatcher.backoff_max = Duration::from_millis(ms);
        }
        if let Some(ms) = d.deadline_ms {
            cfg.dispatcher.row_deadline = Duration::from_millis(ms);
        }
        for (name, m) in raw.models {
            if m.kind == ProviderKind::Local {
                let mut lm = ModelConfig::local(&name, base_dir.join(&m.model), 8);
                if let Some(c) = m.concurrency {
                    if c == 0 {
                        return Err(invalid(format!(
                            "models.{name}.concurrency must be at least 1"
                        )));
                    }
                    lm.concurrency = c;
                }
                if let Some(c) = m.context_size {
                    if c < 256 {
                        return Err(invalid(format!(
                            "models.{name}.context_size must be at least 256 tokens"
                        )));
                    }
                    lm.context_size = c;
                }
                if m.base_url.is_some()
                    || m.api_key_env.is_some()
                    || m.batch_size.is_some()
                    || m.tokenizer.is_some()
                {
                    return Err(invalid(format!(
                        "models.{name}: a local model takes model (the GGUF path), concurrency \
                         (rows decoded together) and context_size, and counts tokens with its \
                         own vocabulary; base_url, api_key_env, batch_size and tokenizer belong \
                         to servers"
                    )));
                }
                cfg.models.insert(name, lm);
                continue;
            }
            let base_url = match (&m.base_url, m.kind) {
                (Some(u), _) => u.clone(),
                (None, ProviderKind::Lamini) => "https://api.lamini.ai".to_string(),
                (None, _) => {
                    return Err(invalid(format!(
                        "models.{name}.base_url is missing (e.g. \"https://api.openai.com/v1\" \
                         or \"http://127.0.0.1:8000/v1\")"
                    )));
                }
            };
            let url = reqwest::Url::parse(&base_url).map_err(|e| {
                invalid(format!(
                    "models.{name}.base_url = {base_url:?} is not a valid URL ({e})"
                ))
            })?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(invalid(format!(
                    "models.{name}.base_url must start with http:// or https://, got {base_url:?}"
                )));
            }
            let batch_size = match (m.kind, m.batch_size) {
                (ProviderKind::Openai, Some(b)) if b != 1 => {
                    return Err(invalid(format!(
                        "models.{name}.batch_size: chat completions take one prompt per request; \
                         use kind = \"openai_completions\" for list prompts"
                    )));
                }
                (ProviderKind::Openai, _) => 1,
                (_, Some(0)) => {
                    return Err(invalid(format!(
                        "models.{name}.batch_size must be at least 1"
                    )));
                }
                (_, b) => b.unwrap_or(8),
            };
            let api_key = match &m.api_key_env {
                None => None,
                Some(var) => match env(var) {
                    Some(v) if !v.is_empty() => Some(Secret::new(v)),
                    _ => {
                        return Err(invalid(format!(
                            "models.{name}: environment variable {var} (api_key_env) is not set; \
                             export it with the API key, or remove api_key_env for servers \
                             without authentication"
                        )));
                    }
                },
            };
            let positive = |v: Option<u64>, key: &str| match v {
                Some(0) => Err(invalid(format!(
                    "models.{name}.{key} must be at least 1 (leave it out for no limit)"
                ))),
                other => Ok(other),
            };
            let rpm = positive(m.rpm, "rpm")?;
            let tpm = positive(m.tpm, "tpm")?;
            let concurrency = m.concurrency.unwrap_or(cfg.dispatcher.concurrency);
            if concurrency == 0 {
                return Err(invalid(format!(
                    "models.{name}.concurrency must be at least 1"
                )));
            }
            let prices =
                prices(&name, m.input_usd_per_mtok, m.output_usd_per_mtok).map_err(invalid)?;
            cfg.models.insert(
                name.clone(),
                ModelConfig {
                    name,
                    kind: m.kind,
                    base_url: base_url.trim_end_matches('/').to_string(),
                    model: m.model,
                    api_key_env: m.api_key_env,
                    api_key,
                    concurrency,
                    timeout: Duration::from_millis(m.timeout_ms.unwrap_or(120_000)),
                    connect_timeout: Duration::from_millis(m.connect_timeout_ms.unwrap_or(10_000)),
                    structured_output: m.structured_output.unwrap_or_default(),
                    max_response_bytes: m.max_response_bytes.unwrap_or(16 << 20),
                    rpm,
                    tpm,
                    adaptive_concurrency: m.adaptive_concurrency.unwrap_or(true),
                    batch_size,
                    context_size: m.context_size.unwrap_or(2048),
                    prices,
                    tokenizer: m.tokenizer,
                },
            );
        }
        Ok(cfg)
    }
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

/// Both prices or neither; non-negative and finite.
fn prices(name: &str, input: Option<f64>, output: Option<f64>) -> Result<Option<Prices>, String> {
    match (input, output) {
        (None, None) => Ok(None),
        (Some(input), Some(output)) => {
            for (key, v) in [
                ("input_usd_per_mtok", input),
                ("output_usd_per_mtok", output),
            ] {
                if !v.is_finite() || v < 0.0 {
                    return Err(format!(
                        "models.{name}.{key} must be a price in USD per million tokens (>= 0), \
                         got {v}"
                    ));
                }
            }
            Ok(Some(Prices { input, output }))
        }
        _ => Err(format!(
            "models.{name}: give both input_usd_per_mtok and output_usd_per_mtok (USD per \
             million prompt and completion tokens), or neither"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("sluice.toml"), &|k| {
            (k == "KEY").then(|| "sk-secret".to_string())
        })
    }

    #[test]
    fn parses_models_and_reads_key_from_env() {
        let cfg = parse(
            "[dispatcher]\nconcurrency = 8\n[models.default]\nkind = \"openai\"\n\
             base_url = \"http://127.0.0.1:1/v1/\"\nmodel = \"m\"\napi_key_env = \"KEY\"\n",
        )
        .unwrap();
        let m = &cfg.models["default"];
        assert_eq!(m.base_url, "http://127.0.0.1:1/v1");
        assert_eq!(m.api_key.as_ref().unwrap().expose(), "sk-secret");
        assert_eq!(m.concurrency, 8);
        assert!(!format!("{cfg:?}").contains("sk-secret"));
    }

    #[test]
    fn execution_limits_parse_with_units() {
        let cfg = parse(
            "[execution]\nmemory_limit = \"2GB\"\nparquet_row_group_bytes = \"16MB\"\n\
             batch_rows = 256\n",
        )
        .unwrap();
        assert_eq!(cfg.execution.memory_limit, Some(2 << 30));
        assert_eq!(cfg.execution.parquet_row_group_bytes, 16 << 20);
        assert_eq!(cfg.execution.batch_rows, 256);
        let e = parse("[execution]\nmemory_limit = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("execution.memory_limit"), "{e}");
        assert_eq!(parse("").unwrap().execution, ExecutionConfig::default());
    }

    #[test]
    fn prices_come_in_pairs() {
        let base = "[models.m]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\nmodel = \"m\"\n";
        let cfg = parse(&format!(
            "{base}input_usd_per_mtok = 0.15\noutput_usd_per_mtok = 0.6\n"
        ))
        .unwrap();
        let p = cfg.models["m"].prices.unwrap();
        assert!((p.cost(1_000_000, 1_000_000) - 0.75).abs() < 1e-12);
        let e = parse(&format!("{base}input_usd_per_mtok = 0.15\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("output_usd_per_mtok"), "{e}");
        let e = parse(&format!(
            "{base}input_usd_per_mtok = -1\noutput_usd_per_mtok = 1\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains(">= 0"), "{e}");
    }

    #[test]
    fn missing_key_variable_is_an_error_naming_it() {
        let e = parse(
            "[models.default]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\nmodel = \"m\"\n\
             api_key_env = \"NOPE\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("NOPE") && e.contains("not set"), "{e}");
    }

    #[test]
    fn unknown_kind_and_bad_url_are_errors() {
        let e = parse("[models.a]\nkind = \"magic\"\nbase_url = \"http://x\"\nmodel = \"m\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("magic") || e.contains("unknown variant"), "{e}");
        let e = parse("[models.a]\nkind = \"openai\"\nbase_url = \"not a url\"\nmodel = \"m\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("base_url"), "{e}");
    }
}
