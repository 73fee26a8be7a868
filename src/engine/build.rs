//! An engine from configuration: the response cache, the models, the DataFusion session with
//! sluice's planner, optimizer rule and functions.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::QueryPlanner;
use datafusion::logical_expr::LogicalPlan;
use datafusion::logical_expr::registry::FunctionRegistry;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_planner::{DefaultPhysicalPlanner, PhysicalPlanner};
use datafusion::prelude::{SessionConfig, SessionContext};

use super::error::EngineError;
use super::live::LiveWorkers;
use super::models::{Answers, build_models};
use super::session::Engine;
use crate::cache::{CacheError, CacheMode, CacheServer, ResponseCache};
use crate::config::Config;
use crate::llm::Dispatcher;
use crate::sink::store::ObjectStores;
use crate::source::ChunkText;
use crate::source::lines::{CleanLines, LineRules};
use crate::udf::def::{DefError, FunctionDef, FunctionKind};
use crate::udf::exec::{LlmPlanner, LlmRuntime};
use crate::udf::plan::LiftLlmCalls;
use crate::udf::{LlmUdf, NullSafeFields, NullSafeGetField};

/// DataFusion's planner with sluice's extension planner for LLM nodes.
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

/// The dispatcher with the response cache as configured: read-only for estimates (which do
/// without the cache while another process's run holds it); `open` is a cache this process
/// has open already (an engine's that is being replaced or estimated), used instead of opening
/// the file again.
fn dispatcher(
    config: &Config,
    answers: Answers,
    open: Option<Arc<ResponseCache>>,
) -> Result<Dispatcher, EngineError> {
    let estimating = answers == Answers::Estimates;
    let cache = if config.cache.enabled {
        match open.map_or_else(|| ResponseCache::open(&config.cache.dir).map(Arc::new), Ok) {
            Ok(c) => Some(c),
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
    // On a cluster, the coordinator's own calls get one worker's share.
    let mut settings = config.dispatcher.share(config.cluster.workers.len());
    if estimating {
        settings.max_attempts = 1;
        settings.budget_tokens = None;
        settings.budget_usd = None;
    }
    Ok(Dispatcher::with_cache(settings, cache, mode))
}

/// The DataFusion session: sluice's planner and rule, object stores, memory and Parquet
/// settings.
fn session(
    config: &Config,
    runtime: &Arc<LlmRuntime>,
    lines: Arc<LineRules>,
    answers: Answers,
    (served, live): (Option<&CacheServer>, &Arc<LiveWorkers>),
) -> Result<SessionContext, EngineError> {
    let mut session_config = SessionConfig::new()
        .with_information_schema(true)
        .with_target_partitions(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .with_batch_size(config.execution.rows_per_record_batch);
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
        .with_object_store_registry(Arc::new(ObjectStores::wrapped(Arc::new(
            move |url, store| Arc::new(CleanLines::new(store, store_root(url), lines.clone())),
        ))));
    if let Some(limit) = config.execution.memory_limit {
        runtime_env = runtime_env.with_memory_pool(Arc::new(
            datafusion::execution::memory_pool::FairSpillPool::new(limit as usize),
        ));
    }
    let runtime_env = runtime_env.build_arc()?;
    let mut state = SessionStateBuilder::new()
        .with_config(session_config)
        .with_runtime_env(runtime_env)
        .with_default_features()
        .with_query_planner(Arc::new(SluiceQueryPlanner {
            runtime: runtime.clone(),
        }))
        .with_analyzer_rule(Arc::new(NullSafeFields))
        .with_optimizer_rule(Arc::new(LiftLlmCalls));
    // Estimates run here (they must not reach a worker's models); explain shows the stages.
    if config.cluster.distributed() && answers == Answers::Models {
        state = super::cluster::distribute(state, config, served, live);
    }
    Ok(SessionContext::new_with_state(state.build()))
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

    pub(super) fn build(
        config: &Config,
        defs: Vec<FunctionDef>,
        answers: Answers,
    ) -> Result<Engine, EngineError> {
        Self::build_on(config, defs, answers, None)
    }

    /// [`Engine::build`] on a response cache already open (that of an engine being replaced),
    /// when the configuration enables one.
    pub(super) fn build_on(
        config: &Config,
        defs: Vec<FunctionDef>,
        answers: Answers,
        cache: Option<Arc<ResponseCache>>,
    ) -> Result<Engine, EngineError> {
        let dispatcher = dispatcher(config, answers, cache)?;
        let cache_server = match answers {
            Answers::Models => super::cluster::serve_cache(config, &dispatcher),
            Answers::Estimates => None,
        };
        // With the workers paced by this coordinator, its governors are the cluster's (all of
        // each limit); otherwise its own calls (an LLM node its head stage keeps) get one
        // worker's share, as every worker does.
        let share = match cache_server {
            Some(_) => 1,
            None => config.cluster.workers.len().max(1),
        };
        let models = build_models(config, answers, dispatcher.cache(), share)?;
        let runtime = Arc::new(LlmRuntime {
            dispatcher,
            models: models.handles,
            max_join_calls: config.execution.max_join_calls,
        });
        let lines = Arc::new(LineRules::default());
        if let Some(server) = &cache_server {
            // The workers' requests are admitted by this engine's governors.
            let pacing = super::pacing::ClusterPacing::new(config, &runtime);
            server.pace_with(Arc::new(pacing));
        }
        let live = LiveWorkers::new(&config.cluster);
        let ctx = session(
            config,
            &runtime,
            lines.clone(),
            answers,
            (cache_server.as_ref(), &live),
        )?;
        let functions = register_functions(&ctx, &runtime, defs)?;
        Ok(Engine {
            ctx,
            runtime,
            functions,
            json_locations: Default::default(),
            lines,
            token_counters: models.token_counters,
            batch_plans: models.batch_plans,
            cluster: config.cluster.clone(),
            cache_server,
            live,
        })
    }
}

/// Every model of `def`'s cascade that may pass rows on gives its answers' confidence, and
/// every one can return its output (models sluice.toml does not define are named when a
/// statement uses the function).
fn check_cascade(def: &FunctionDef, runtime: &LlmRuntime) -> Result<(), EngineError> {
    let invalid = |message: String| {
        EngineError::Definition(DefError::Invalid {
            path: def.source.clone(),
            message,
        })
    };
    for stage in &def.cascade {
        let Some(handle) = runtime.models.get(&stage.model) else {
            continue;
        };
        if stage.min_confidence.is_some() && !handle.provider.gives_confidence() {
            return Err(invalid(format!(
                "function {}: model {:?} gives no token log-probabilities, so its answers have \
                 no confidence to pass rows on by; put it last in the cascade, or use a model \
                 of kind openai, azure_openai, gemini or local there",
                def.name, stage.model
            )));
        }
        if let Err(message) = handle.provider.check_schema(def.output.as_ref()) {
            return Err(invalid(format!(
                "function {}: model {:?} cannot return this output: {message}",
                def.name, stage.model
            )));
        }
    }
    Ok(())
}

/// Registers `chunk_text`, the built-in `llm` and every definition (value and error faces),
/// checking that each function's model can return its output.
fn register_functions(
    ctx: &SessionContext,
    runtime: &LlmRuntime,
    defs: Vec<FunctionDef>,
) -> Result<Vec<Arc<FunctionDef>>, EngineError> {
    ctx.register_udf(ChunkText::udf());
    ctx.register_udf(NullSafeGetField::udf());
    for f in crate::udf::vector::VectorFn::udfs() {
        ctx.register_udf(f);
    }
    let builtin = FunctionDef::generic();
    std::iter::once(builtin)
        .chain(defs)
        .map(|def| register_function(ctx, runtime, Arc::new(def)))
        .collect()
}

/// Registers one definition (its value and error faces, or its aggregate pair), checking that
/// its models can return its output and that its name is not already a SQL function.
pub(super) fn register_function(
    ctx: &SessionContext,
    runtime: &LlmRuntime,
    def: Arc<FunctionDef>,
) -> Result<Arc<FunctionDef>, EngineError> {
    let handle = runtime.models.get(&def.model);
    if let Some(handle) = handle {
        check_kind(&def, handle.embeds(), handle.provider.embeds())?;
    }
    if let Some(handle) = handle
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
    check_cascade(&def, runtime)?;
    let taken = |name: &str| {
        EngineError::Definition(DefError::Invalid {
            path: def.source.clone(),
            message: format!(
                "function name {name:?} is already a SQL function; choose another name"
            ),
        })
    };
    if def.kind.is_aggregate() {
        for udaf in crate::udf::aggregate::LlmAggregate::pair(def.clone()) {
            if ctx.udaf(udaf.name()).is_ok() {
                return Err(taken(udaf.name()));
            }
            ctx.register_udaf(udaf);
        }
        return Ok(def);
    }
    for udf in LlmUdf::faces(def.clone()) {
        if ctx.udf(udf.name()).is_ok() {
            return Err(taken(udf.name()));
        }
        ctx.register_udf(udf);
    }
    Ok(def)
}

/// An embedding function needs a model that embeds, and a completion one a model that
/// completes (`only_embeds`: embeddings are all it does).
fn check_kind(def: &FunctionDef, embeds: bool, only_embeds: bool) -> Result<(), EngineError> {
    let message = match (&def.kind, embeds, only_embeds) {
        (FunctionKind::Embedding { .. }, false, _) => format!(
            "function {} is kind = \"embedding\", but model {:?} has no embeddings endpoint; \
             give it a model of kind = \"openai_embeddings\"",
            def.name, def.model
        ),
        (FunctionKind::Completion { .. } | FunctionKind::Aggregate { .. }, _, true) => format!(
            "function {}: model {:?} serves embeddings (kind = \"openai_embeddings\"); make the \
             function kind = \"embedding\" with its dim, or use a completion model",
            def.name, def.model
        ),
        _ => return Ok(()),
    };
    Err(EngineError::Definition(DefError::Invalid {
        path: def.source.clone(),
        message,
    }))
}

/// `scheme://host` of a store's URL (`file://` for local files), as [`LineRules`] names stores.
pub(super) fn store_root(url: &url::Url) -> String {
    format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default())
}
