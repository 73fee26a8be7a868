//! One model a function can name (`[models.NAME]`): what every model has, then the part only a
//! server has (URL, key, timeouts, structured output, prompts per request, tokenizer) or only the embedded
//! local model has (its context size).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::batch::{BatchConfig, batch_from_raw};
use super::kinds;
use super::raw::{BaseUrls, RawModel};
use super::values::{ModelMode, Prices, ProviderKind, Secret, StructuredOutput};

/// One model a function can name.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The name functions use (`model = "default"`).
    pub name: String,
    /// Provider kind.
    pub kind: ProviderKind,
    /// Model id sent to a server, or the GGUF path of the local model.
    pub model: String,
    /// Requests in flight for this model (never more than the global budget); rows decoded
    /// together for the local model.
    pub concurrency: usize,
    /// Requests per minute allowed by the provider, if limited.
    pub rpm: Option<u64>,
    /// Tokens per minute allowed by the provider, if limited.
    pub tpm: Option<u64>,
    /// Shrink concurrency on 429s and grow it back on success (default true for servers).
    pub adaptive_concurrency: bool,
    /// Prices for `sluice explain` and `--budget-usd` (a local model costs nothing).
    pub prices: Option<Prices>,
    /// Live requests or the provider's batch API (`mode`).
    pub mode: ModelMode,
    /// The settings of batch mode (`[models.NAME.batch]`; defaults when absent).
    pub batch: BatchConfig,
    /// The settings only a server or only the local model has.
    pub part: ModelPart,
}

/// The settings of one kind of model.
// One per configured model, built once: the size of the server variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ModelPart {
    /// A model behind an HTTP API.
    Server(ServerConfig),
    /// The embedded local model.
    Local(LocalConfig),
}

/// One server of a model: its base URL and its own key.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Base URL (no trailing `/`).
    pub base_url: String,
    /// Name of the environment variable that held its key (for messages).
    pub api_key_env: Option<String>,
    /// Its key, sent to this server only.
    pub api_key: Option<Secret>,
}

/// What only a model behind an HTTP API has.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Base URL, e.g. `https://api.openai.com/v1` (no trailing `/`): the first replica's.
    pub base_url: String,
    /// Name of the environment variable that held the key (for messages): the first replica's.
    pub api_key_env: Option<String>,
    /// The key, read from `api_key_env` at load time: the first replica's.
    pub api_key: Option<Secret>,
    /// Every server of the model in the configured order (one for a single `base_url`).
    pub replicas: Vec<ReplicaConfig>,
    /// What the response cache knows the server as: the base URL of a single server, or
    /// `replicas:NAME` for a model served by several (so a cached answer does not depend on
    /// which replica gave it, and the cache survives replicas added, removed or moved).
    pub endpoint_id: String,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// How to ask for structured output.
    pub structured_output: StructuredOutput,
    /// Largest response body accepted.
    pub max_response_bytes: usize,
    /// Prompts per request for providers that take several (`openai_completions`, `lamini`;
    /// default 8); always 1 for chat completions.
    pub prompts_per_request: usize,
    /// How `sluice explain` counts tokens: a tiktoken encoding (`o200k_base`, `cl100k_base`) or
    /// a GGUF file whose vocabulary to use; default: the encoding OpenAI uses for the model,
    /// else `o200k_base`.
    pub tokenizer: Option<String>,
    /// Whether a prompt that shares a long prefix with one on the wire waits for it to be
    /// answered, so the server computes the prefix once (default true).
    pub share_prefixes: bool,
    /// Azure OpenAI's `api-version` (`azure_openai` only).
    pub api_version: Option<String>,
    /// The shortest prefix, in tokens, that Anthropic caches for this model: shorter shared
    /// openings are not marked with `cache_control` (`anthropic` only; 0 for other kinds).
    pub prompt_cache_min_tokens: u64,
    /// Whether each machine of a cluster calls a server of its own for this model (a GPU box
    /// serving it): a worker then uses its own `base_url` and limits in full, and the
    /// coordinator's are not shared out (`per_worker`; default false).
    pub per_worker: bool,
}

/// What only the embedded local model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalConfig {
    /// Context tokens per row (prompt and output; default 2048).
    pub context_size: u32,
}

impl ServerConfig {
    /// Whether several servers (replicas) serve the model.
    pub fn replicated(&self) -> bool {
        self.replicas.len() > 1
    }

    /// The settings of replica `i` alone: its URL and its key; the other replicas are kept
    /// without their keys (so no key can reach a server it was not configured for).
    pub fn replica(&self, i: usize) -> Option<ServerConfig> {
        let r = self.replicas.get(i)?;
        Some(ServerConfig {
            base_url: r.base_url.clone(),
            api_key_env: r.api_key_env.clone(),
            api_key: r.api_key.clone(),
            replicas: self
                .replicas
                .iter()
                .map(|o| ReplicaConfig {
                    api_key: None,
                    ..o.clone()
                })
                .collect(),
            ..self.clone()
        })
    }
}

impl ModelConfig {
    /// The settings that decide what this model answers and how hard it may be driven, as one
    /// line of text without secrets (no API key, no key variable): what a worker compares with
    /// the coordinator's before it runs a task. The local model is named by its file name
    /// (its directory may differ between machines); a model each machine answers itself
    /// ([`ModelConfig::per_worker`]) leaves out its servers and limits, which are each
    /// machine's own.
    pub fn fingerprint(&self) -> String {
        let model = match self.part {
            ModelPart::Local(_) => std::path::Path::new(&self.model)
                .file_name()
                .map_or_else(|| self.model.clone(), |n| n.to_string_lossy().into()),
            ModelPart::Server(_) => self.model.clone(),
        };
        // Where each machine answers the model itself, its server and limits are its own.
        let servers = match &self.part {
            ModelPart::Server(s) if !s.per_worker => s
                .replicas
                .iter()
                .map(|r| r.base_url.as_str())
                .collect::<Vec<_>>()
                .join(","),
            _ => "each machine's own".to_string(),
        };
        let part = match &self.part {
            ModelPart::Server(s) => format!(
                "server base_url={servers} structured_output={:?} max_response_bytes={} prompts_per_request={:?} api_version={:?} prompt_cache_min_tokens={}",
                s.structured_output,
                s.max_response_bytes,
                s.prompts_per_request,
                s.api_version,
                s.prompt_cache_min_tokens
            ),
            ModelPart::Local(l) => format!("local context_size={}", l.context_size),
        };
        let limits = if self.per_worker() {
            "limits of each machine's own".to_string()
        } else {
            format!(
                "concurrency={} rpm={:?} tpm={:?} adaptive={}",
                self.concurrency, self.rpm, self.tpm, self.adaptive_concurrency
            )
        };
        format!(
            "kind={:?} model={model:?} {limits} mode={:?} {part}",
            self.kind, self.mode
        )
    }

    /// Whether each machine of a cluster answers this model itself, with its own server (or
    /// the embedded model) and limits: `per_worker = true`, or the local model.
    pub fn per_worker(&self) -> bool {
        match &self.part {
            ModelPart::Server(s) => s.per_worker,
            ModelPart::Local(_) => true,
        }
    }

    /// The embedded local model reading `path`, decoding `parallel` rows together.
    pub fn local(name: &str, path: PathBuf, parallel: usize) -> ModelConfig {
        ModelConfig {
            name: name.to_string(),
            kind: ProviderKind::Local,
            model: path.to_string_lossy().to_string(),
            concurrency: parallel,
            rpm: None,
            tpm: None,
            adaptive_concurrency: false,
            prices: Some(Prices::new(0.0, 0.0)),
            mode: ModelMode::Live,
            batch: BatchConfig::default(),
            part: ModelPart::Local(LocalConfig { context_size: 2048 }),
        }
    }

    /// Whether this model can run in batch mode (an OpenAI, Azure OpenAI, Anthropic or Gemini
    /// chat model with one server: a model with several replicas stays live under `--batch`).
    pub fn supports_batch(&self) -> bool {
        kinds::has_batch_api(self.kind) && self.server().is_none_or(|s| !s.replicated())
    }

    /// The prices its calls are charged at: the batch prices in batch mode.
    pub fn effective_prices(&self) -> Option<Prices> {
        match self.mode {
            ModelMode::Live => self.prices,
            ModelMode::Batch => self.batch.prices,
        }
    }

    /// The server settings, for a model behind an HTTP API.
    pub fn server(&self) -> Option<&ServerConfig> {
        match &self.part {
            ModelPart::Server(s) => Some(s),
            ModelPart::Local(_) => None,
        }
    }
}

/// Checks `[models.NAME]` and builds the model; `base_dir` resolves a local model's path and
/// `env` reads the API key; `default_concurrency` is the dispatcher's.
pub(super) fn model_from_raw(
    name: &str,
    m: RawModel,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    default_concurrency: usize,
) -> Result<ModelConfig, String> {
    if m.concurrency == Some(0) {
        return Err(format!("models.{name}.concurrency must be at least 1"));
    }
    if m.renamed_batch_size.is_some() {
        return Err(format!(
            "models.{name}.batch_size is now called models.{name}.prompts_per_request"
        ));
    }
    if m.kind == ProviderKind::Local {
        return local_from_raw(name, m, base_dir);
    }
    kinds::check_kind_keys(name, &m)?;
    let positive = |v: Option<u64>, key: &str| match v {
        Some(0) => Err(format!(
            "models.{name}.{key} must be at least 1 (leave it out for no limit)"
        )),
        other => Ok(other),
    };
    let rpm = positive(m.rpm, "rpm")?;
    let tpm = positive(m.tpm, "tpm")?;
    let multiples = kinds::cache_price_multiples(m.kind);
    let prices = prices_named(
        name,
        [
            m.input_usd_per_mtok,
            m.output_usd_per_mtok,
            m.cached_input_usd_per_mtok,
            m.cache_write_usd_per_mtok,
        ],
        ("", multiples),
    )?;
    let batch_prices = prices_named(
        name,
        [
            m.batch_input_usd_per_mtok,
            m.batch_output_usd_per_mtok,
            m.batch_cached_input_usd_per_mtok,
            None,
        ],
        ("batch_", multiples),
    )?;
    let mode = m.mode.unwrap_or_default();
    if mode == ModelMode::Batch && !kinds::has_batch_api(m.kind) {
        return Err(format!(
            "models.{name}: mode = \"batch\" needs kind = \"openai\", \"azure_openai\" (the \
             OpenAI Files and Batches API of a chat completions server), \"anthropic\" \
             (Message Batches) or \"gemini\" (the Gemini Batch API)"
        ));
    }
    let batch = batch_from_raw(name, m.batch.as_ref(), prices, batch_prices)?;
    let server = server_from_raw(name, &m, env)?;
    if mode == ModelMode::Batch && server.replicated() {
        return Err(format!(
            "models.{name}: mode = \"batch\" sends to one server; give one base_url (the \
             batch API is not spread over replicas)"
        ));
    }
    Ok(ModelConfig {
        mode,
        batch,
        name: name.to_string(),
        kind: m.kind,
        concurrency: m.concurrency.unwrap_or(default_concurrency),
        rpm,
        tpm,
        adaptive_concurrency: m.adaptive_concurrency.unwrap_or(true),
        prices,
        part: ModelPart::Server(server),
        model: m.model,
    })
}

fn local_from_raw(name: &str, m: RawModel, base_dir: &Path) -> Result<ModelConfig, String> {
    let mut lm = ModelConfig::local(name, base_dir.join(&m.model), 8);
    if let Some(c) = m.concurrency {
        lm.concurrency = c;
    }
    if let Some(c) = m.context_size {
        if c < 256 {
            return Err(format!(
                "models.{name}.context_size must be at least 256 tokens"
            ));
        }
        lm.part = ModelPart::Local(LocalConfig { context_size: c });
    }
    if m.mode == Some(ModelMode::Batch) || m.batch.is_some() {
        return Err(format!(
            "models.{name}: the local model has no batch API; mode = \"batch\" is for \
             the kinds of a hosted chat API"
        ));
    }
    let misplaced = m.server_keys();
    if [
        "base_url",
        "replicas",
        "api_key_env",
        "prompts_per_request",
        "tokenizer",
        "share_prefixes",
        "api_version",
        "prompt_cache_min_tokens",
        "per_worker",
    ]
    .iter()
    .any(|k| misplaced.contains(k))
    {
        return Err(format!(
            "models.{name}: a local model takes model (the GGUF path), concurrency (rows \
             decoded together) and context_size, and counts tokens with its own vocabulary; \
             base_url, api_key_env, prompts_per_request, tokenizer, share_prefixes and \
             per_worker belong to servers (the local model is each machine's own)"
        ));
    }
    Ok(lm)
}

fn server_from_raw(
    name: &str,
    m: &RawModel,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ServerConfig, String> {
    let urls = replica_urls(name, m)?;
    for (url, _) in &urls {
        check_url(name, url)?;
    }
    let prompts_per_request = match (m.kind, m.prompts_per_request) {
        (kind, Some(b)) if kinds::is_chat(kind) && b != 1 => {
            return Err(format!(
                "models.{name}.prompts_per_request: chat completions take one prompt per request; \
                 use kind = \"openai_completions\" for list prompts"
            ));
        }
        (kind, _) if kinds::is_chat(kind) => 1,
        (_, Some(0)) => {
            return Err(format!(
                "models.{name}.prompts_per_request must be at least 1"
            ));
        }
        (ProviderKind::OpenaiEmbeddings, b) => b.unwrap_or(64),
        (_, b) => b.unwrap_or(8),
    };
    let mut replicas = Vec::with_capacity(urls.len());
    for (url, var) in urls {
        let base_url = url.trim_end_matches('/').to_string();
        if replicas
            .iter()
            .any(|r: &ReplicaConfig| r.base_url == base_url)
        {
            return Err(format!(
                "models.{name}: the replica {base_url:?} is listed twice"
            ));
        }
        let var = var.or_else(|| m.api_key_env.clone());
        let api_key = api_key(name, var.as_deref(), env)?;
        replicas.push(ReplicaConfig {
            base_url,
            api_key_env: var,
            api_key,
        });
    }
    let first = replicas[0].clone();
    let per_worker = m.per_worker.unwrap_or(false);
    // A model each machine serves itself is one model wherever it is answered.
    let endpoint_id = if per_worker {
        format!("per_worker:{name}")
    } else if replicas.len() > 1 {
        format!("replicas:{name}")
    } else {
        first.base_url.clone()
    };
    Ok(ServerConfig {
        base_url: first.base_url,
        api_key_env: first.api_key_env,
        api_key: first.api_key,
        replicas,
        endpoint_id,
        timeout: Duration::from_millis(m.timeout_ms.unwrap_or(120_000)),
        connect_timeout: Duration::from_millis(m.connect_timeout_ms.unwrap_or(10_000)),
        structured_output: m.structured_output.unwrap_or_default(),
        max_response_bytes: m.max_response_bytes.unwrap_or(16 << 20),
        prompts_per_request,
        tokenizer: m.tokenizer.clone(),
        share_prefixes: m.share_prefixes.unwrap_or(true),
        api_version: kinds::api_version(name, m)?,
        prompt_cache_min_tokens: kinds::prompt_cache_min_tokens(m),
        per_worker,
    })
}

/// The servers of a model as written, each with its own key variable if it names one:
/// `base_url` (one URL or a list) or `replicas` (tables), not both.
fn replica_urls(name: &str, m: &RawModel) -> Result<Vec<(String, Option<String>)>, String> {
    let urls: Vec<(String, Option<String>)> = match (&m.base_url, &m.replicas, m.kind) {
        (Some(_), Some(_), _) => {
            return Err(format!(
                "models.{name}: give base_url or replicas, not both"
            ));
        }
        (Some(BaseUrls::One(u)), None, _) => vec![(u.clone(), None)],
        (Some(BaseUrls::Many(us)), None, _) => us.iter().map(|u| (u.clone(), None)).collect(),
        (None, Some(rs), _) => rs
            .iter()
            .map(|r| (r.base_url.clone(), r.api_key_env.clone()))
            .collect(),
        (None, None, kind) if kinds::default_base_url(kind).is_some() => {
            vec![(
                kinds::default_base_url(kind)
                    .unwrap_or_default()
                    .to_string(),
                None,
            )]
        }
        (None, None, ProviderKind::AzureOpenai) => {
            return Err(format!(
                "models.{name}.base_url is missing: give the Azure OpenAI resource's endpoint \
                 (e.g. \"https://NAME.openai.azure.com\"); model is the deployment's name"
            ));
        }
        (None, None, _) => {
            return Err(format!(
                "models.{name}.base_url is missing (e.g. \"https://api.openai.com/v1\" \
                 or \"http://127.0.0.1:8000/v1\")"
            ));
        }
    };
    if urls.is_empty() {
        return Err(format!(
            "models.{name}: the list of servers is empty; give at least one base_url"
        ));
    }
    Ok(urls)
}

/// An http(s) URL.
fn check_url(name: &str, base_url: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(base_url)
        .map_err(|e| format!("models.{name}.base_url = {base_url:?} is not a valid URL ({e})"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!(
            "models.{name}.base_url must start with http:// or https://, got {base_url:?}"
        ));
    }
    Ok(())
}

/// The key held by the variable `var`, if one is named.
fn api_key(
    name: &str,
    var: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, String> {
    let Some(var) = var else {
        return Ok(None);
    };
    match env(var) {
        Some(v) if !v.is_empty() => Ok(Some(Secret::new(v))),
        _ => Err(format!(
            "models.{name}: environment variable {var} (api_key_env) is not set; export it \
             with the API key, or remove api_key_env for servers without authentication"
        )),
    }
}

/// The prices of the keys `{pre}input_usd_per_mtok`, `{pre}output_usd_per_mtok`,
/// `{pre}cached_input_usd_per_mtok` and `cache_write_usd_per_mtok` (given as `[input, output,
/// cached, write]`): input and output both or neither, the cache prices only with them
/// (default: the input price times the kind's `multiples`); non-negative and finite.
fn prices_named(
    name: &str,
    [input, output, cached, write]: [Option<f64>; 4],
    (pre, (cached_times, write_times)): (&str, (f64, f64)),
) -> Result<Option<Prices>, String> {
    match (input, output) {
        (None, None) if cached.is_some() || write.is_some() => Err(format!(
            "models.{name}.{} needs {pre}input_usd_per_mtok and {pre}output_usd_per_mtok (the \
             price of the prompt tokens that are not cached, and of the completion tokens)",
            if cached.is_some() {
                format!("{pre}cached_input_usd_per_mtok")
            } else {
                "cache_write_usd_per_mtok".to_string()
            }
        )),
        (None, None) => Ok(None),
        (Some(input), Some(output)) => {
            let cached_input = cached.unwrap_or(input * cached_times);
            let cache_write = write.unwrap_or(input * write_times);
            for (key, v) in [
                ("input", input),
                ("output", output),
                ("cached_input", cached_input),
                ("cache_write", cache_write),
            ] {
                if !v.is_finite() || v < 0.0 {
                    return Err(format!(
                        "models.{name}.{pre}{key}_usd_per_mtok must be a price in USD per \
                         million tokens (>= 0), got {v}"
                    ));
                }
            }
            Ok(Some(Prices {
                input,
                output,
                cached_input,
                cache_write,
            }))
        }
        _ => Err(format!(
            "models.{name}: give both {pre}input_usd_per_mtok and {pre}output_usd_per_mtok (USD \
             per million prompt and completion tokens), or neither"
        )),
    }
}
