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

mod batch;
mod cluster;
mod kinds;
mod model;
mod raw;
mod values;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use batch::BatchConfig;
pub use cluster::{ClusterConfig, ClusterTls, DEFAULT_TOKEN_ENV};
pub use kinds::{ANTHROPIC_VERSION, DEFAULT_AZURE_API_VERSION};
pub use model::{LocalConfig, ModelConfig, ModelPart, ReplicaConfig, ServerConfig};
use raw::{RawCache, RawConfig, RawDispatcher, RawExecution};
pub use values::Secret;
pub use values::{BatchRetry, ModelMode, Prices, ProviderKind, StructuredOutput, parse_size};

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
    /// When a request still unanswered is sent a second time (`hedge_after_ms`).
    pub hedge: Hedge,
}

/// When a request that has not answered is sent a second time (the first valid answer wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hedge {
    /// After three times the function's p99 latency, at least 250 ms (default).
    #[default]
    Adaptive,
    /// After this long (`hedge_after_ms = N`).
    After(Duration),
    /// Never (`hedge_after_ms = 0`).
    Off,
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
            hedge: Hedge::Adaptive,
        }
    }
}

impl DispatcherConfig {
    /// One of `workers` equal shares of the in-flight budget (rounded down, at least 1) and of
    /// the run's budgets: what each machine of a cluster gets.
    pub fn share(&self, workers: usize) -> DispatcherConfig {
        let n = workers.max(1);
        DispatcherConfig {
            concurrency: (self.concurrency / n).max(1),
            budget_tokens: self.budget_tokens.map(|t| t / n as u64),
            budget_usd: self.budget_usd.map(|u| u / n as f64),
            ..self.clone()
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
    /// Rows per Arrow record batch between operators. Text pipelines carry kilobytes per row, so this
    /// is smaller than DataFusion's 8,192: less memory in flight, same speed.
    pub rows_per_record_batch: usize,
    /// Most LLM calls a join condition may make (the pairs that survive its other parts); a
    /// join over it is refused before any call.
    pub max_join_calls: u64,
}

/// Row group size in bytes by default. The writer holds a row group, and about three copies of
/// it while it is flushed (DataFusion's write buffer, the bytes handed to the object store, the
/// upload part), so this bounds its memory: on the 1 GB benchmark 4 MB peaks ~27 MB lower than
/// 16 MB. 4 MB of compressed pages is still tens of thousands of rows, large enough for scans.
pub const DEFAULT_ROW_GROUP_BYTES: u64 = 4 << 20;
/// Rows per batch by default.
pub const DEFAULT_ROWS_PER_RECORD_BATCH: usize = 1024;

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            memory_limit: None,
            parquet_row_group_bytes: DEFAULT_ROW_GROUP_BYTES,
            rows_per_record_batch: DEFAULT_ROWS_PER_RECORD_BATCH,
            max_join_calls: 10_000,
        }
    }
}

/// The GGUF the default model runs (fetched by `scripts/fetch-model.sh`).
pub const DEFAULT_LOCAL_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

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
    /// The workers statements run on (`[cluster]`; none: in this process).
    pub cluster: ClusterConfig,
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
            cluster: ClusterConfig::default(),
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

    /// Parses configuration text; `path` is used in messages and to resolve `udf_dir`, the
    /// cache directory and local model files. Every value is checked here, once: what comes
    /// out is valid.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        Self::from_raw(raw, path, env).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    fn from_raw(
        raw: RawConfig,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, String> {
        let base_dir = path.parent().unwrap_or(Path::new("."));
        let mut cfg = Config {
            source: Some(path.to_path_buf()),
            udf_dir: base_dir.join(raw.udf_dir.unwrap_or_else(|| PathBuf::from("udfs"))),
            cache: cache(raw.cache, base_dir),
            execution: execution(&raw.execution)?,
            dispatcher: dispatcher(&raw.dispatcher)?,
            cluster: cluster::cluster(&raw.cluster, base_dir, env)?,
            ..Config::default()
        };
        // A file that names no `default` model keeps the embedded one, found beside the file.
        if let Some(m) = cfg.models.get_mut("default") {
            m.model = base_dir
                .join(DEFAULT_LOCAL_MODEL)
                .to_string_lossy()
                .to_string();
        }
        for (name, m) in raw.models {
            let model = model::model_from_raw(&name, m, base_dir, env, cfg.dispatcher.concurrency)?;
            cfg.models.insert(name, model);
        }
        Ok(cfg)
    }
}

impl Config {
    /// `sluice run --batch`: every model that has a batch API uses it. Returns the names of the
    /// models left live (they have none).
    pub fn use_batch_mode(&mut self) -> Vec<String> {
        let mut live = Vec::new();
        for (name, m) in &mut self.models {
            if m.supports_batch() {
                m.mode = ModelMode::Batch;
            } else {
                live.push(name.clone());
            }
        }
        live
    }
}

fn cache(raw: RawCache, base_dir: &Path) -> CacheConfig {
    let d = CacheConfig::default();
    CacheConfig {
        dir: base_dir.join(raw.dir.unwrap_or(d.dir)),
        enabled: raw.enabled.unwrap_or(d.enabled),
        refresh: false,
    }
}

fn execution(raw: &RawExecution) -> Result<ExecutionConfig, String> {
    let mut e = ExecutionConfig::default();
    if raw.renamed_batch_rows.is_some() {
        return Err("execution.batch_rows is now called execution.rows_per_record_batch".into());
    }
    if let Some(limit) = &raw.memory_limit {
        e.memory_limit =
            Some(parse_size(limit).map_err(|m| format!("execution.memory_limit: {m}"))?);
    }
    if let Some(size) = &raw.parquet_row_group_bytes {
        e.parquet_row_group_bytes =
            parse_size(size).map_err(|m| format!("execution.parquet_row_group_bytes: {m}"))?;
    }
    match raw.rows_per_record_batch {
        Some(0) => return Err("execution.rows_per_record_batch must be at least 1".into()),
        Some(rows) => e.rows_per_record_batch = rows,
        None => {}
    }
    if let Some(n) = raw.max_join_calls {
        e.max_join_calls = n;
    }
    Ok(e)
}

fn dispatcher(raw: &RawDispatcher) -> Result<DispatcherConfig, String> {
    let d = DispatcherConfig::default();
    if raw.concurrency == Some(0) {
        return Err("dispatcher.concurrency must be at least 1".into());
    }
    if raw.max_attempts == Some(0) {
        return Err("dispatcher.max_attempts must be at least 1".into());
    }
    let ms = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_millis);
    Ok(DispatcherConfig {
        concurrency: raw.concurrency.unwrap_or(d.concurrency),
        max_attempts: raw.max_attempts.unwrap_or(d.max_attempts),
        backoff_base: ms(raw.backoff_base_ms, d.backoff_base),
        backoff_max: ms(raw.backoff_max_ms, d.backoff_max),
        row_deadline: ms(raw.deadline_ms, d.row_deadline),
        hedge: match raw.hedge_after_ms {
            None => Hedge::Adaptive,
            Some(0) => Hedge::Off,
            Some(n) => Hedge::After(Duration::from_millis(n)),
        },
        ..d
    })
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
        let server = m.server().unwrap();
        assert_eq!(server.base_url, "http://127.0.0.1:1/v1");
        assert_eq!(server.api_key.as_ref().unwrap().expose(), "sk-secret");
        assert_eq!(m.concurrency, 8);
        assert!(!format!("{cfg:?}").contains("sk-secret"));
    }

    #[test]
    fn execution_limits_parse_with_units() {
        let cfg = parse(
            "[execution]\nmemory_limit = \"2GB\"\nparquet_row_group_bytes = \"16MB\"\n\
             rows_per_record_batch = 256\n",
        )
        .unwrap();
        assert_eq!(cfg.execution.memory_limit, Some(2 << 30));
        assert_eq!(cfg.execution.parquet_row_group_bytes, 16 << 20);
        assert_eq!(cfg.execution.rows_per_record_batch, 256);
        let e = parse("[execution]\nmemory_limit = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("execution.memory_limit"), "{e}");
        assert_eq!(parse("").unwrap().execution, ExecutionConfig::default());
    }

    #[test]
    fn renamed_keys_name_their_new_names() {
        let e = parse("[execution]\nbatch_rows = 256\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("execution.rows_per_record_batch"), "{e}");
        let e = parse(
            "[models.m]\nkind = \"openai_completions\"\nbase_url = \"http://x/v1\"\n\
             model = \"m\"\nbatch_size = 8\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("models.m.prompts_per_request"), "{e}");
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
    fn cached_input_is_priced_with_the_input_and_output_prices() {
        let base = "[models.m]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\nmodel = \"m\"\n";
        let priced = "input_usd_per_mtok = 2\noutput_usd_per_mtok = 8\n";
        let p = parse(&format!("{base}{priced}")).unwrap().models["m"]
            .prices
            .unwrap();
        assert_eq!(p.cached_input, 2.0, "default: no discount");
        let cfg = parse(&format!("{base}{priced}cached_input_usd_per_mtok = 0.5\n")).unwrap();
        let p = cfg.models["m"].prices.unwrap();
        // 1M prompt tokens of which 600k cached, 100k completion tokens.
        let cost = p.cost_cached(1_000_000, 600_000, 100_000);
        assert!((cost - (0.8 + 0.3 + 0.8)).abs() < 1e-9, "{cost}");
        assert!((p.cost_cached(10, 99, 0) - p.cost_cached(10, 10, 0)).abs() < 1e-15);
        // Batch mode defaults to half of each live price, the cached one too.
        assert_eq!(cfg.models["m"].batch.prices.unwrap().cached_input, 0.25);
        let e = parse(&format!("{base}cached_input_usd_per_mtok = 0.5\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("models.m.cached_input_usd_per_mtok"), "{e}");
        assert!(
            e.contains("input_usd_per_mtok and output_usd_per_mtok"),
            "{e}"
        );
        let e = parse(&format!("{base}{priced}cached_input_usd_per_mtok = -0.1\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cached_input_usd_per_mtok") && e.contains(">= 0"),
            "{e}"
        );
        let e = parse(&format!("{base}batch_cached_input_usd_per_mtok = 0.1\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("models.m.batch_cached_input_usd_per_mtok"),
            "{e}"
        );
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
