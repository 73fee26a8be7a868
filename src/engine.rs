//! The engine: a DataFusion session with sluice's functions, planner and dispatcher, and the
//! runner that executes a `.sql` file statement by statement.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::catalog::Session;
use datafusion::common::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::QueryPlanner;
use datafusion::logical_expr::registry::FunctionRegistry;
use datafusion::logical_expr::{DdlStatement, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_planner::{DefaultPhysicalPlanner, PhysicalPlanner};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement};
use futures::StreamExt;

use crate::cache::{CacheError, CacheMode, ResponseCache};
use crate::config::{Config, ProviderKind};
use crate::llm::dispatcher::ModelHandle;
use crate::llm::estimate::{EstimateProvider, TokenCounter};
use crate::llm::governor::{Governor, GovernorConfig};
use crate::llm::lamini::LaminiProvider;
use crate::llm::openai::{CompletionsProvider, OpenAiProvider};
use crate::llm::{Dispatcher, MetricsSnapshot, Provider};
use crate::sink::store::ObjectStores;
use crate::sink::{StagedOutput, is_local};
use crate::source::{ChunkText, find_malformed_json_line};
use crate::udf::def::{DefError, FunctionDef};
use crate::udf::exec::{LlmPlanner, LlmRuntime};
use crate::udf::plan::LiftLlmCalls;
use crate::udf::{LlmUdf, generic_llm_def};

mod explain;
pub use explain::{Explanation, FunctionEstimate, StatementEstimate};

/// Errors that stop the engine from starting.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A function definition is invalid.
    #[error(transparent)]
    Definition(#[from] DefError),
    /// A model could not be set up.
    #[error("model {model:?}: {message}")]
    Model {
        /// The model name.
        model: String,
        /// What went wrong.
        message: String,
    },
    /// The response cache could not be opened.
    #[error(transparent)]
    Cache(CacheError),
    /// DataFusion refused a registration.
    #[error("{0}")]
    DataFusion(#[from] DataFusionError),
}

/// A statement of a script that failed.
#[derive(Debug, thiserror::Error)]
#[error("{origin}:{line}: statement {index} ({summary}): {message}")]
pub struct StatementError {
    /// The script (file path or `<sql>`).
    pub origin: String,
    /// 1-based line where the statement starts.
    pub line: usize,
    /// 1-based statement number.
    pub index: usize,
    /// The statement's first words.
    pub summary: String,
    /// What failed, on one line.
    pub message: String,
}

/// One statement of a script, with where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptStatement {
    /// 1-based line of the statement's first non-blank character.
    pub line: usize,
    /// The statement text, without the terminating `;`.
    pub text: String,
}

/// Splits SQL text into statements at `;`, ignoring semicolons inside quotes and comments.
pub fn split_statements(sql: &str) -> Vec<ScriptStatement> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut line = 1;
    let mut start_line = None;
    let mut chars = sql.chars().peekable();
    let push = |cur: &mut String, start: &mut Option<usize>, out: &mut Vec<ScriptStatement>| {
        let text = cur.trim().to_string();
        if !text.is_empty() && !is_only_comments(&text) {
            out.push(ScriptStatement {
                line: start.unwrap_or(1),
                text,
            });
        }
        cur.clear();
        *start = None;
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' | '`' => {
                start_line.get_or_insert(line);
                cur.push(c);
                while let Some(d) = chars.next() {
                    cur.push(d);
                    if d == '\n' {
                        line += 1;
                    }
                    if d == c {
                        if chars.peek() == Some(&c) {
                            cur.push(c);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                cur.push(c);
                for d in chars.by_ref() {
                    if d == '\n' {
                        cur.push('\n');
                        line += 1;
                        break;
                    }
                    cur.push(d);
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                cur.push(c);
                let mut prev = ' ';
                for d in chars.by_ref() {
                    cur.push(d);
                    if d == '\n' {
                        line += 1;
                    }
                    if prev == '*' && d == '/' {
                        break;
                    }
                    prev = d;
                }
            }
            ';' => push(&mut cur, &mut start_line, &mut out),
            '\n' => {
                cur.push(c);
                line += 1;
            }
            c => {
                if !c.is_whitespace() {
                    start_line.get_or_insert(line);
                }
                cur.push(c);
            }
        }
    }
    push(&mut cur, &mut start_line, &mut out);
    out
}

fn is_only_comments(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with("--"))
        && !text.contains("/*")
}

fn summary(text: &str) -> String {
    let flat: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("--"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut s: String = flat.chars().take(60).collect();
    if s.len() < flat.len() {
        s.push('…');
    }
    s
}

#[derive(Debug)]
struct SluiceQueryPlanner {
    runtime: Arc<LlmRuntime>,
}

#[async_trait]
impl QueryPlanner for SluiceQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn Session,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let planner = DefaultPhysicalPlanner::with_extension_planners(vec![Arc::new(LlmPlanner {
            runtime: self.runtime.clone(),
        })]);
        planner.create_physical_plan(logical_plan, session).await
    }
}

/// Shortens object-store errors: an S3 XML error body becomes `Code: Message`, and staged names
/// (`.name.sluice-tmp-PID-N.ext`) become the name the user wrote.
pub fn tidy_store_message(msg: &str) -> String {
    let mut out = msg.to_string();
    if let Some(start) = out.find("<?xml") {
        let tag = |t: &str| {
            let open = format!("<{t}>");
            let close = format!("</{t}>");
            let a = out[start..].find(&open)? + start + open.len();
            let b = out[a..].find(&close)? + a;
            Some(out[a..b].to_string())
        };
        let summary = match (tag("Code"), tag("Message")) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c,
            _ => String::new(),
        };
        let end = out[start..]
            .find("</Error>")
            .map_or(out.len(), |e| start + e + "</Error>".len());
        out.replace_range(start..end, &summary);
    }
    // `.qa.sluice-tmp-123-0.parquet` -> `qa.parquet`; `.parts.sluice-tmp-123-0` -> `parts`.
    while let Some(i) = out.find(".sluice-tmp-") {
        let begin = out[..i].rfind(['/', ' ', '\'', '"']).map_or(0, |b| b + 1);
        let after = &out[i + ".sluice-tmp-".len()..];
        let digits = after
            .find(|c: char| !(c.is_ascii_digit() || c == '-'))
            .unwrap_or(after.len());
        let end = i + ".sluice-tmp-".len() + digits;
        let stem = out[begin..i].trim_start_matches('.').to_string();
        out.replace_range(begin..end, &stem);
    }
    out
}

/// Options for running scripts.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Rows of a SELECT result printed (the rest are counted).
    pub max_rows: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { max_rows: 20 }
    }
}

/// A sluice session: SQL with LLM functions.
pub struct Engine {
    ctx: SessionContext,
    runtime: Arc<LlmRuntime>,
    functions: Vec<Arc<FunctionDef>>,
    json_locations: std::sync::Mutex<BTreeMap<String, PathBuf>>,
    token_counters: BTreeMap<String, String>,
}

/// Who answers an engine's LLM calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answers {
    /// The configured models.
    Models,
    /// Placeholders with counted tokens (`sluice explain`).
    Estimates,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("functions", &self.functions.len())
            .finish()
    }
}

impl Engine {
    /// Builds an engine from configuration, loading function definitions from `config.udf_dir`.
    pub fn new(config: &Config) -> Result<Engine, EngineError> {
        let defs = FunctionDef::load_dir(&config.udf_dir)?;
        Self::with_functions(config, defs)
    }

    /// Builds an engine with explicit function definitions.
    pub fn with_functions(config: &Config, defs: Vec<FunctionDef>) -> Result<Engine, EngineError> {
        Self::build(config, defs, Answers::Models)
    }

    /// Builds an engine whose LLM functions call no model: every call is answered with a
    /// placeholder shaped by its output schema and its tokens are counted with the model's
    /// tokenizer (see [`crate::llm::estimate`]); the response cache is only read. For
    /// `sluice explain`.
    pub fn for_estimates(config: &Config) -> Result<Engine, EngineError> {
        let defs = FunctionDef::load_dir(&config.udf_dir)?;
        Self::build(config, defs, Answers::Estimates)
    }

    /// How each model's tokens are counted, for engines that estimate.
    pub fn token_counters(&self) -> &BTreeMap<String, String> {
        &self.token_counters
    }

    fn build(
        config: &Config,
        defs: Vec<FunctionDef>,
        answers: Answers,
    ) -> Result<Engine, EngineError> {
        let estimating = answers == Answers::Estimates;
        let cache = if config.cache.enabled {
            match ResponseCache::open(&config.cache.dir) {
                Ok(c) => Some(Arc::new(c)),
                // An estimate does without the cache while a run holds it.
                Err(CacheError::Busy(_)) if estimating => None,
                Err(e) => return Err(EngineError::Cache(e)),
            }
        } else {
            None
        };
        let mode = if estimating {
            CacheMode::ReadOnly
        } else if config.cache.refresh {
            CacheMode::Refresh
        } else {
            CacheMode::ReadWrite
        };
        let mut dispatch = config.dispatcher.clone();
        if estimating {
            dispatch.max_attempts = 1;
            dispatch.budget_tokens = None;
            dispatch.budget_usd = None;
        }
        let dispatcher = Dispatcher::with_cache(dispatch, cache, mode);
        let mut models = BTreeMap::new();
        let mut token_counters = BTreeMap::new();
        for (name, m) in &config.models {
            let pool = m.concurrency.min(config.dispatcher.concurrency);
            let model_err = |message| EngineError::Model {
                model: name.clone(),
                message,
            };
            let provider: Arc<dyn Provider> = match m.kind {
                ProviderKind::Openai => Arc::new(OpenAiProvider::new(m, pool).map_err(model_err)?),
                ProviderKind::OpenaiCompletions => {
                    Arc::new(CompletionsProvider::new(m, pool).map_err(model_err)?)
                }
                ProviderKind::Lamini => Arc::new(LaminiProvider::new(m, pool).map_err(model_err)?),
                #[cfg(feature = "local")]
                ProviderKind::Local => Arc::new(crate::llm::local::LocalProvider::new(m)),
                #[cfg(not(feature = "local"))]
                ProviderKind::Local => {
                    return Err(model_err(
                        "this sluice was built without the local model (cargo feature `local`)"
                            .to_string(),
                    ));
                }
            };
            let (provider, governor): (Arc<dyn Provider>, _) = if estimating {
                // Nothing is sent: no pacing, the whole budget in flight.
                let counter = TokenCounter::for_model(m).map_err(model_err)?;
                token_counters.insert(name.clone(), counter.describe());
                let governor = GovernorConfig {
                    max_concurrency: config.dispatcher.concurrency,
                    rpm: None,
                    tpm: None,
                    adaptive: false,
                };
                (Arc::new(EstimateProvider::new(provider, counter)), governor)
            } else {
                let governor = GovernorConfig {
                    max_concurrency: pool,
                    rpm: m.rpm,
                    tpm: m.tpm,
                    adaptive: m.adaptive_concurrency,
                };
                (provider, governor)
            };
            models.insert(
                name.clone(),
                ModelHandle {
                    provider,
                    governor: Arc::new(Governor::new(governor)),
                    prices: m.prices,
                },
            );
        }
        let runtime = Arc::new(LlmRuntime { dispatcher, models });
        let mut session_config = SessionConfig::new()
            .with_information_schema(true)
            .with_target_partitions(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .with_batch_size(config.execution.batch_rows);
        {
            // Row groups bounded in bytes (honoured by the serial writer only): the writer's
            // memory stays flat in the output size. Column encoding in parallel buys little on
            // a machine whose cores already run the pipeline.
            let exec = &mut session_config.options_mut().execution;
            exec.parquet.allow_single_file_parallelism = false;
            // zstd level 1: on LLM outputs (passages repeated per question) it is as small as
            // level 3 and faster; `OPTIONS ('format.compression' ...)` chooses per statement.
            exec.parquet.compression = Some("zstd(1)".into());
            exec.parquet.max_row_group_bytes = Some(
                datafusion::config::MaxRowGroupBytes::try_new(
                    config.execution.parquet_row_group_bytes.max(1) as usize,
                )
                .map_err(EngineError::DataFusion)?,
            );
        }
        let mut runtime_env = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_object_store_registry(Arc::new(ObjectStores::new()));
        if let Some(limit) = config.execution.memory_limit {
            runtime_env = runtime_env.with_memory_pool(Arc::new(
                datafusion::execution::memory_pool::FairSpillPool::new(limit as usize),
            ));
        }
        let runtime_env = runtime_env.build_arc()?;
        let state = SessionStateBuilder::new()
            .with_config(session_config)
            .with_runtime_env(runtime_env)
            .with_default_features()
            .with_query_planner(Arc::new(SluiceQueryPlanner {
                runtime: runtime.clone(),
            }))
            .with_optimizer_rule(Arc::new(LiftLlmCalls))
            .build();
        let ctx = SessionContext::new_with_state(state);
        ctx.register_udf(ChunkText::udf());
        let mut functions = Vec::with_capacity(defs.len() + 1);
        let builtin = generic_llm_def();
        for def in std::iter::once(builtin).chain(defs) {
            let def = Arc::new(def);
            if let Some(handle) = runtime.models.get(&def.model)
                && let Err(message) = handle.provider.check_schema(def.output.as_ref())
            {
                return Err(EngineError::Definition(DefError::Invalid {
                    path: def.source.clone(),
                    message: format!(
                        "function {}: model {:?} cannot return this output: {message}",
                        def.name, def.model
                    ),
                }));
            }
            for udf in LlmUdf::pair(def.clone()) {
                if ctx.udf(udf.name()).is_ok() {
                    return Err(EngineError::Definition(DefError::Invalid {
                        path: def.source.clone(),
                        message: format!(
                            "function name {:?} is already a SQL function; choose another name",
                            udf.name()
                        ),
                    }));
                }
                ctx.register_udf(udf);
            }
            functions.push(def);
        }
        Ok(Engine {
            ctx,
            runtime,
            functions,
            json_locations: Default::default(),
            token_counters,
        })
    }

    /// The DataFusion session (for registering more tables or functions).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// The LLM functions available in SQL (the built-in `llm` first).
    pub fn functions(&self) -> &[Arc<FunctionDef>] {
        &self.functions
    }

    /// The function named `name`.
    pub fn function(&self, name: &str) -> Option<&Arc<FunctionDef>> {
        self.functions.iter().find(|f| f.name == name)
    }

    /// Waits until every response received so far is stored durably in the cache.
    pub async fn flush_cache(&self) -> Result<(), CacheError> {
        match self.runtime.dispatcher.cache() {
            Some(c) => c.flush().await,
            None => Ok(()),
        }
    }

    /// A model that an LLM function uses but that has no prices (so `--budget-usd` cannot be
    /// enforced for it).
    pub fn unpriced_model(&self) -> Option<String> {
        self.functions
            .iter()
            .map(|f| &f.model)
            .find(|m| {
                self.runtime
                    .models
                    .get(*m)
                    .is_some_and(|h| h.prices.is_none())
            })
            .cloned()
    }

    /// Whether a request was refused because the token budget would be exceeded.
    pub fn budget_exhausted(&self) -> bool {
        self.runtime
            .dispatcher
            .metrics()
            .budget_exhausted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The live counters of the LLM calls (for progress displays).
    pub fn live_metrics(&self) -> Arc<crate::llm::Metrics> {
        self.runtime.dispatcher.metrics().clone()
    }

    /// Counters of the LLM calls made so far.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.runtime.dispatcher.metrics().snapshot()
    }

    /// Runs a `.sql` file; output of SELECTs and progress lines go to `out`.
    pub async fn run_file(
        &self,
        path: &Path,
        opts: &RunOptions,
        out: &mut dyn Write,
    ) -> Result<(), StatementError> {
        let sql = std::fs::read_to_string(path).map_err(|e| StatementError {
            origin: path.display().to_string(),
            line: 0,
            index: 0,
            summary: "reading the file".into(),
            message: e.to_string(),
        })?;
        self.run_script(&sql, &path.display().to_string(), opts, out)
            .await
    }

    /// Runs every statement of `sql` in order; stops at the first failure.
    pub async fn run_script(
        &self,
        sql: &str,
        origin: &str,
        opts: &RunOptions,
        out: &mut dyn Write,
    ) -> Result<(), StatementError> {
        for (i, stmt) in split_statements(sql).into_iter().enumerate() {
            self.run_statement(&stmt.text, opts, out)
                .await
                .map_err(|e| self.statement_error(origin, i + 1, &stmt, e))?;
        }
        Ok(())
    }

    /// The failure of the `index`-th statement of a script, with its place and a readable cause.
    fn statement_error(
        &self,
        origin: &str,
        index: usize,
        stmt: &ScriptStatement,
        e: DataFusionError,
    ) -> StatementError {
        StatementError {
            origin: origin.to_string(),
            line: stmt.line,
            index,
            summary: summary(&stmt.text),
            message: self.explain_error(e),
        }
    }

    /// Runs a statement and collects a query's result (for tests and embedding).
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>, DataFusionError> {
        self.ctx.sql(sql).await?.collect().await
    }

    fn explain_error(&self, e: DataFusionError) -> String {
        let mut msg = tidy_store_message(&e.to_string().replace('\n', " "));
        if msg.contains("Json error") || msg.contains("JSON") {
            let locations = self
                .json_locations
                .lock()
                .map(|m| m.values().cloned().collect::<Vec<_>>())
                .unwrap_or_default();
            if let Some(found) = locations.iter().find_map(|l| find_malformed_json_line(l)) {
                msg = format!("{found} — {msg}");
            }
        }
        msg
    }

    /// The object store holding `url` (built from the environment on first use).
    fn store_for(
        &self,
        url: &url::Url,
    ) -> Result<Arc<dyn object_store::ObjectStore>, DataFusionError> {
        self.ctx.runtime_env().object_store(
            datafusion::execution::object_store::ObjectStoreUrl::parse(format!(
                "{}://{}",
                url.scheme(),
                url.host_str().unwrap_or_default()
            ))?,
        )
    }

    /// The JSON-lines files of an object-store prefix. DataFusion's JSON reader takes every
    /// file of a prefix, but globs only on local paths: when the prefix also holds other files,
    /// the `.jsonl` / `.ndjson` objects are listed (the first 10,000) and named one by one.
    async fn remote_json_lines(&self, location: &str) -> Result<Vec<String>, DataFusionError> {
        use futures::TryStreamExt;
        if !location.ends_with('/') {
            return Ok(vec![location.to_string()]);
        }
        let url = url::Url::parse(location)
            .map_err(|e| DataFusionError::Plan(format!("{location} is not a valid URL: {e}")))?;
        let store = self.store_for(&url)?;
        let prefix = object_store::path::Path::from_url_path(url.path())
            .map_err(|e| DataFusionError::Plan(format!("{location}: {e}")))?;
        let keys: Vec<object_store::path::Path> = store
            .list(Some(&prefix))
            .take(10_000)
            .map_ok(|o| o.location)
            .try_collect()
            .await
            .map_err(|e| DataFusionError::Execution(format!("cannot list {location}: {e}")))?;
        let is_lines = |k: &object_store::path::Path| {
            matches!(k.extension(), Some("jsonl" | "ndjson" | "json"))
        };
        if keys.iter().all(is_lines) {
            return Ok(vec![location.to_string()]);
        }
        let root = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
        Ok(keys
            .iter()
            .filter(|k| is_lines(k))
            .map(|k| format!("{root}/{k}"))
            .collect())
    }

    async fn run_statement(
        &self,
        text: &str,
        opts: &RunOptions,
        out: &mut dyn Write,
    ) -> Result<(), DataFusionError> {
        match parse_one(text)? {
            Statement::CopyTo(mut copy) => {
                let target = copy.target.clone();
                if let Some(format) = &copy.stored_as
                    && !["PARQUET", "CSV", "JSON", "ARROW"]
                        .contains(&format.to_ascii_uppercase().as_str())
                {
                    return Err(DataFusionError::Plan(format!(
                        "COPY ... STORED AS {format}: sluice writes PARQUET, CSV, JSON or ARROW"
                    )));
                }
                let is_dir = !copy.partitioned_by.is_empty();
                let staged = if is_local(&target) {
                    StagedOutput::local(&target, is_dir)
                } else {
                    let url = url::Url::parse(&target).map_err(|e| {
                        DataFusionError::Plan(format!("{target} is not a valid URL: {e}"))
                    })?;
                    let store = self.store_for(&url)?;
                    // Fail on a missing bucket or bad credentials before any LLM call is made.
                    let parent = object_store::path::Path::from_url_path(url.path())
                        .ok()
                        .and_then(|p| {
                            let parts: Vec<_> = p.parts().collect();
                            let n = parts.len().saturating_sub(1);
                            (n > 0)
                                .then(|| object_store::path::Path::from_iter(parts[..n].to_vec()))
                        });
                    store
                        .list_with_delimiter(parent.as_ref())
                        .await
                        .map_err(|e| {
                            DataFusionError::Execution(format!("cannot write {target}: {e}"))
                        })?;
                    StagedOutput::in_store(&target, &url, store, is_dir)
                };
                if let Some(s) = &staged {
                    s.prepare().map_err(|e| {
                        DataFusionError::Execution(format!(
                            "cannot create the directory of {target}: {e}"
                        ))
                    })?;
                    copy.target = s.staging_sql.clone();
                }
                let state = self.ctx.state();
                let result = async {
                    let plan = state.statement_to_plan(Statement::CopyTo(copy)).await?;
                    self.ctx.execute_logical_plan(plan).await?.collect().await
                }
                .await;
                match (result, staged) {
                    (Ok(batches), Some(s)) => {
                        s.commit().await.map_err(|e| {
                            DataFusionError::Execution(format!(
                                "cannot move the output to {target}: {e}"
                            ))
                        })?;
                        writeln!(out, "COPY {} rows to {target}", count_rows(&batches)).ok();
                    }
                    (Ok(batches), None) => {
                        writeln!(out, "COPY {} rows to {target}", count_rows(&batches)).ok();
                    }
                    (Err(e), staged) => {
                        if let Some(s) = staged {
                            s.abort().await;
                        }
                        return Err(e);
                    }
                }
            }
            Statement::CreateExternalTable(mut cet) => {
                if cet.file_type.eq_ignore_ascii_case("json") {
                    if let Ok(mut m) = self.json_locations.lock() {
                        for (i, location) in cet.locations.iter().enumerate() {
                            if crate::sink::is_local(location) {
                                let loc = location.trim_start_matches("file://");
                                m.insert(format!("{}#{i}", cet.name), PathBuf::from(loc));
                            }
                        }
                    }
                    let mut locations = Vec::with_capacity(cet.locations.len());
                    for location in std::mem::take(&mut cet.locations) {
                        if is_local(&location) {
                            locations.push(
                                crate::source::json_lines_glob(&location).unwrap_or(location),
                            );
                        } else {
                            locations.extend(self.remote_json_lines(&location).await?);
                        }
                    }
                    cet.locations = locations;
                }
                let name = cet.name.to_string();
                let locations = cet.locations.join(", ");
                let state = self.ctx.state();
                let plan = state
                    .statement_to_plan(Statement::CreateExternalTable(cet))
                    .await?;
                self.ctx.execute_logical_plan(plan).await?.collect().await?;
                // Empty files give a table without columns; say so here rather than as a
                // "no field named ..." in a later statement.
                if self
                    .ctx
                    .table(name.as_str())
                    .await
                    .is_ok_and(|t| t.schema().fields().is_empty())
                {
                    let _ = self.ctx.deregister_table(name.as_str());
                    return Err(DataFusionError::Plan(format!(
                        "{name}: no columns could be read from {locations} (the files are empty)"
                    )));
                }
                writeln!(out, "CREATE EXTERNAL TABLE {name}").ok();
            }
            other => {
                let state = self.ctx.state();
                let plan = state.statement_to_plan(other).await?;
                let is_query = !matches!(
                    plan,
                    LogicalPlan::Ddl(_)
                        | LogicalPlan::Dml(_)
                        | LogicalPlan::Statement(_)
                        | LogicalPlan::Copy(_)
                );
                let label = match &plan {
                    LogicalPlan::Ddl(DdlStatement::CreateView(v)) => {
                        format!("CREATE VIEW {}", v.name)
                    }
                    LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(t)) => {
                        format!("CREATE TABLE {}", t.name)
                    }
                    LogicalPlan::Ddl(d) => d.name().to_string(),
                    _ => String::new(),
                };
                let df = self.ctx.execute_logical_plan(plan).await?;
                if is_query {
                    let mut stream = df.execute_stream().await?;
                    let mut shown = vec![];
                    let mut shown_rows = 0;
                    let mut total = 0;
                    while let Some(batch) = stream.next().await {
                        let batch = batch?;
                        total += batch.num_rows();
                        if shown_rows < opts.max_rows {
                            let take = (opts.max_rows - shown_rows).min(batch.num_rows());
                            shown.push(batch.slice(0, take));
                            shown_rows += take;
                        }
                    }
                    let table = pretty_format_batches(&shown)?;
                    writeln!(out, "{table}").ok();
                    let plural = if total == 1 { "" } else { "s" };
                    if total > shown_rows {
                        writeln!(out, "({total} row{plural}, {shown_rows} shown)").ok();
                    } else {
                        writeln!(out, "({total} row{plural})").ok();
                    }
                } else {
                    df.collect().await?;
                    if !label.is_empty() {
                        writeln!(out, "{label}").ok();
                    }
                }
            }
        }
        Ok(())
    }
}

/// The one statement of `text` (the script runner has already split the file).
fn parse_one(text: &str) -> Result<Statement, DataFusionError> {
    let mut statements = DFParser::parse_sql(text)?;
    match (statements.pop_front(), statements.len()) {
        (Some(statement), 0) => Ok(statement),
        (first, rest) => Err(DataFusionError::Plan(format!(
            "expected one statement, found {}",
            usize::from(first.is_some()) + rest
        ))),
    }
}

fn count_rows(batches: &[RecordBatch]) -> u64 {
    // COPY returns one row with the count of rows written.
    batches
        .first()
        .and_then(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::UInt64Array>()
                .map(|a| a.value(0))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_statements_with_lines() {
        let sql = "-- intro\nSELECT 1;\n\nSELECT ';' AS x, \"a;b\"\n  FROM t; /* c; */ SELECT 3\n-- end;\n";
        let s = split_statements(sql);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].line, 2);
        assert_eq!(s[1].line, 4);
        assert!(s[1].text.contains("';'"));
        assert_eq!(s[2].line, 5);
    }

    #[test]
    fn s3_errors_are_shortened_and_staged_names_hidden() {
        let m = "IO error: Object at location .qa.sluice-tmp-10488-0.parquet not found: Error \
                 performing PUT http://h/no-such-bucket/.qa.sluice-tmp-10488-0.parquet - 404: \
                 <?xml version=\"1.0\"?> <Error><Code>NoSuchBucket</Code><Message>The bucket \
                 does not exist</Message><RequestId>x</RequestId></Error>";
        assert_eq!(
            tidy_store_message(m),
            "IO error: Object at location qa.parquet not found: Error performing PUT \
             http://h/no-such-bucket/qa.parquet - 404: NoSuchBucket: The bucket does not exist"
        );
        assert_eq!(
            tidy_store_message("out/.parts.sluice-tmp-1-2/x"),
            "out/parts/x"
        );
    }
}
