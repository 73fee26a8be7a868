//! A sluice session ([`Engine`]): SQL with LLM functions, and what it tells of its run (its
//! functions, budget, metrics, batch jobs); how its scripts run and print ([`RunOptions`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::prelude::SessionContext;

use super::models::BatchPlan;
use crate::cache::CacheError;
use crate::config::ClusterConfig;
use crate::llm::dispatch::ModelSnapshot;
use crate::llm::{Metrics, MetricsSnapshot};
use crate::source::lines::LineRules;
use crate::udf::def::FunctionDef;
use crate::udf::exec::LlmRuntime;

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
    pub(super) ctx: SessionContext,
    pub(super) runtime: Arc<LlmRuntime>,
    pub(super) functions: Vec<Arc<FunctionDef>>,
    pub(super) json_locations: std::sync::Mutex<BTreeMap<String, PathBuf>>,
    /// The `bad_rows` mode of each JSON-lines location, and the lines skipped or nulled.
    pub(super) lines: Arc<LineRules>,
    pub(super) token_counters: BTreeMap<String, String>,
    pub(super) batch_plans: BTreeMap<String, BatchPlan>,
    /// The workers statements run on (none: here).
    pub(super) cluster: ClusterConfig,
    /// On a cluster's coordinator, its response cache served to the workers (until dropped).
    pub(super) cache_server: Option<crate::cache::CacheServer>,
    /// Which workers the next statement uses (a statement run again passes over dead ones).
    pub(super) live: std::sync::Arc<super::live::LiveWorkers>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("functions", &self.functions.len())
            .finish()
    }
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
            if let Some(r) = &h.replicas {
                m.replicas.insert(name.clone(), r.snapshot());
            }
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
}
