//! The engine: a DataFusion session with sluice's functions, planner and dispatcher, and the
//! runner that executes a `.sql` file statement by statement.
//!
//! - [`statements`]: SQL text → statements (shared with the shell);
//! - `build`: a session from configuration — models and their providers (`models`), the
//!   response cache, the planner with the LLM rule, the functions;
//! - `run`: one statement (tables, views, queries printed); `copy`: `COPY ... TO`, staged by
//!   [`crate::sink`] so that it is all or nothing;
//! - [`explain`](Engine::explain_script): the estimate of a script without calling a model.

mod batches;
mod build;
mod cluster;
mod copy;
mod explain;
mod models;
mod named;
mod run;
pub mod statements;
pub mod worker;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::DataFusionError;
use datafusion::prelude::SessionContext;

use crate::cache::CacheError;
use crate::llm::dispatch::ModelSnapshot;
use crate::llm::{Metrics, MetricsSnapshot, SetupError};
use crate::sink::tidy_store_message;
use crate::source::find_malformed_json_line;
use crate::udf::def::{DefError, FunctionDef};
use crate::udf::exec::LlmRuntime;

pub use batches::{BatchListing, cancel_batches, list_batches};
pub use explain::{Explanation, FunctionEstimate, StatementEstimate};
use statements::summary;
pub use statements::{ScriptStatement, split_statements};

/// Errors that stop the engine from starting.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A function definition is invalid.
    #[error(transparent)]
    Definition(#[from] DefError),
    /// A model could not be set up.
    #[error("model {model:?}: {source}")]
    Model {
        /// The model name.
        model: String,
        /// What went wrong.
        source: SetupError,
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

/// Options for running scripts.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Rows of a SELECT result printed as a table (the rest are counted).
    pub max_rows: usize,
    /// How SELECT results are printed.
    pub format: OutputFormat,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            max_rows: 20,
            format: OutputFormat::Table,
        }
    }
}

/// How the rows of a SELECT are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// A table of the first `max_rows` rows, then the row count; statements print what they did.
    #[default]
    Table,
    /// Every row as CSV with a header line, nothing else on stdout (what statements did goes to
    /// stderr).
    Csv,
    /// Every row as one JSON object per line, nothing else on stdout.
    Json,
}

/// A sluice session: SQL with LLM functions.
pub struct Engine {
    ctx: SessionContext,
    runtime: Arc<LlmRuntime>,
    functions: Vec<Arc<FunctionDef>>,
    json_locations: std::sync::Mutex<BTreeMap<String, PathBuf>>,
    /// The `bad_rows` mode of each JSON-lines location, and the lines skipped or nulled.
    lines: Arc<crate::source::lines::LineRules>,
    token_counters: BTreeMap<String, String>,
    batch_plans: BTreeMap<String, models::BatchPlan>,
    /// The workers statements run on (none: here).
    cluster: crate::config::ClusterConfig,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("functions", &self.functions.len())
            .finish()
    }
}

/// Whether `e` is (or was caused by) Arrow's JSON reader refusing its input.
fn is_json_error(e: &DataFusionError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        let arrow = match c.downcast_ref::<DataFusionError>() {
            Some(DataFusionError::ArrowError(a, _)) => Some(a.as_ref()),
            _ => c.downcast_ref::<ArrowError>(),
        };
        if matches!(arrow, Some(ArrowError::JsonError(_))) {
            return true;
        }
        cause = c.source();
    }
    false
}

impl Engine {
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

    /// On a cluster, how many workers statements run on.
    pub fn workers(&self) -> Option<usize> {
        self.cluster
            .distributed()
            .then_some(self.cluster.workers.len())
    }

    /// Whether a request was refused because the token budget would be exceeded.
    pub fn budget_exhausted(&self) -> bool {
        self.runtime
            .dispatcher
            .metrics()
            .budget_exhausted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The JSON-lines files whose malformed lines were skipped or read as NULLs
    /// (`OPTIONS ('bad_rows' 'skip' | 'null')`), with the first line numbers.
    pub async fn bad_rows(&self) -> Vec<crate::source::lines::BadLines> {
        self.lines.report().await
    }

    /// Stops sending requests (the first Ctrl-C): those on the wire finish and are cached, the
    /// others wait until the statement is dropped.
    pub fn stop_sending(&self) {
        self.runtime.dispatcher.stop_sending();
        for q in self.batch_queues() {
            q.stop();
        }
    }

    fn batch_queues(&self) -> impl Iterator<Item = &Arc<crate::llm::batch::BatchQueue>> {
        self.runtime
            .models
            .values()
            .filter_map(|h| h.batch.as_ref())
    }

    /// The provider batch jobs this run submitted or picked up, with their models.
    pub fn batch_jobs(&self) -> Vec<(String, crate::llm::batch::JobView)> {
        (self.batch_watch())()
    }

    /// [`Engine::batch_jobs`] as a function that outlives the borrow (for progress displays).
    pub fn batch_watch(
        &self,
    ) -> impl Fn() -> Vec<(String, crate::llm::batch::JobView)> + Send + Sync + 'static {
        let queues: Vec<(String, Arc<crate::llm::batch::BatchQueue>)> = self
            .runtime
            .models
            .iter()
            .filter_map(|(name, h)| h.batch.clone().map(|q| (name.clone(), q)))
            .collect();
        move || {
            queues
                .iter()
                .flat_map(|(name, q)| q.jobs().into_iter().map(|j| (name.clone(), j)))
                .collect()
        }
    }

    /// Whether the run only waits for batch jobs left running (`--wait false`): nothing on the
    /// wire, nothing being gathered, uploaded or polled, and some job parked.
    pub fn only_parked_batches(&self) -> bool {
        self.requests_in_flight() == 0
            && self.batch_queues().any(|q| q.only_parked())
            && self.batch_queues().all(|q| q.idle())
    }

    /// Requests on the wire now.
    pub fn requests_in_flight(&self) -> u64 {
        self.runtime.dispatcher.in_flight()
    }

    /// The live counters of the LLM calls (for progress displays).
    pub fn live_metrics(&self) -> Arc<Metrics> {
        self.runtime.dispatcher.metrics().clone()
    }

    /// Counters of the LLM calls made so far.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mut m = self.runtime.dispatcher.metrics().snapshot();
        for (name, h) in &self.runtime.models {
            let g = &h.governor;
            m.models.insert(
                name.clone(),
                ModelSnapshot {
                    limit: g.limit(),
                    pace_rps: g.pace(),
                    kind: g.limit_kind(),
                    saturations: g.saturations(),
                },
            );
        }
        m
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
            message: cluster::name_failed_workers(&self.cluster, self.explain_error(e)),
        }
    }

    /// Runs a statement and collects a query's result (for tests and embedding).
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>, DataFusionError> {
        self.ctx.sql(sql).await?.collect().await
    }

    /// A failed statement's cause on one line: object-store noise shortened, staged names shown
    /// as the names the user wrote, and a JSON decoding error located in its file and line.
    fn explain_error(&self, e: DataFusionError) -> String {
        let mut msg = tidy_store_message(&e.to_string().replace('\n', " "));
        if is_json_error(&e) {
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
}
