//! A `sluice worker`: datafusion-distributed's gRPC worker service with sluice's functions,
//! models and response cache.
//!
//! A worker loads the same `sluice.toml` and `udfs/` as the coordinator and builds its own
//! engine from them: providers (the embedded model too), governors and its own cache. The
//! plan stages it is sent hold LLM nodes that [`LlmCodec`] rebuilds with this worker's
//! definitions, after checking they are the coordinator's.
//!
//! The tasks of one coordinator run ([`RunShare`]) share one dispatcher here, made at the
//! run's first task. With a coordinator that serves its workers, the shared models' requests
//! are admitted by its governors and the run's budgets are granted by it as this worker
//! spends; otherwise the dispatcher gets the run's share of every limit: `concurrency`, `rpm`
//! and `tpm` of each model and of the dispatcher, and the run's budgets, divided by the number
//! of workers (rounded down, at least 1), and AIMD and the learned limits work per worker on
//! that share.
//! A model each machine answers itself (`per_worker`, the embedded model) keeps this worker's
//! own server and limits in full, and the dispatcher's share is at least their concurrency.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::common::Result;
use datafusion::common::tree_node::TreeNode;
use datafusion::execution::SessionState;
use datafusion_distributed::{
    DistributedExt, Worker, WorkerPlanRewriteEvent, WorkerPlanRewriteEventResponse,
    WorkerQueryContext,
};
use tokio::net::TcpListener;

use super::cluster::TableRules;
use super::error::EngineError;
use super::session::Engine;
use super::transport::{TokenCheck, WorkerChannels, listed_as, server_tls};
use crate::cache::{CacheMode, SharedCache};
use crate::config::{Config, ModelPart};
use crate::llm::{Dispatcher, Metrics};
use crate::udf::codec::{LlmCodec, RunShare, WorkerSide};
use crate::udf::def::FunctionDef;
use crate::udf::exec::LlmExec;
use crate::udf::exec::LlmRuntime;

/// A run's dispatcher is forgotten after this long without a task.
const RUN_IDLE: Duration = Duration::from_secs(30 * 60);

/// One coordinator run on this worker.
#[derive(Debug)]
struct Run {
    share: RunShare,
    runtime: Arc<LlmRuntime>,
    /// The client to the run's coordinator (its cache, counters, chunks and admissions): one
    /// per run, so that what one run's client learned (a coordinator gone) never outlives it.
    coordinator: Option<Arc<SharedCache>>,
    last_task: Instant,
}

/// What a worker serves with: its engine (cache, models, functions) and the runs it takes
/// part in.
#[derive(Debug)]
pub struct WorkerHost {
    name: String,
    config: Config,
    engine: Engine,
    runs: Mutex<Vec<Run>>,
    /// The counters of every run so far, for [`WorkerHost::requests`].
    metrics: Mutex<Vec<Arc<Metrics>>>,
}

impl WorkerHost {
    /// A worker with `config` (of its `[cluster]` table only the token and the TLS files count:
    /// a worker runs what it is sent), named `name` in the errors it returns (its listen
    /// address).
    pub fn new(config: &Config, name: &str) -> Result<Arc<WorkerHost>, EngineError> {
        let mut config = config.clone();
        config.cluster.workers.clear();
        let engine = Engine::new(&config)?;
        Ok(Arc::new(WorkerHost {
            name: format!("worker {name}"),
            config,
            engine,
            runs: Mutex::new(Vec::new()),
            metrics: Mutex::new(Vec::new()),
        }))
    }

    /// Requests this worker has sent to models, over every run.
    pub fn requests(&self) -> u64 {
        self.all_metrics()
            .iter()
            .map(|m| m.snapshot().requests)
            .sum()
    }

    /// Calls this worker answered from its response cache, over every run.
    pub fn cache_hits(&self) -> u64 {
        self.all_metrics()
            .iter()
            .map(|m| m.snapshot().cache_hits)
            .sum()
    }

    fn all_metrics(&self) -> Vec<Arc<Metrics>> {
        self.metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until every answer received so far is stored in the cache.
    pub async fn flush_cache(&self) -> Result<(), crate::cache::CacheError> {
        self.engine.flush_cache().await
    }

    /// datafusion-distributed's worker service for this host.
    pub fn service(self: &Arc<Self>) -> Worker {
        let host = self.clone();
        Worker::from_session_builder(move |ctx: WorkerQueryContext| {
            let host = host.clone();
            async move { host.session(ctx) }
        })
        .with_runtime_env(self.engine.context().runtime_env())
    }

    /// The session a task runs in: sluice's scalar functions and the LLM codec; the
    /// coordinator's `bad_rows` rules join this worker's.
    fn session(self: &Arc<Self>, ctx: WorkerQueryContext) -> Result<SessionState> {
        let mut builder = ctx
            .builder
            .with_distributed_option_extension_from_headers::<TableRules>(&ctx.headers)?;
        if let Some(rules) = builder
            .config()
            .as_ref()
            .and_then(|c| c.options().extensions.get::<TableRules>())
        {
            self.engine.lines.add_from_text(&rules.bad_rows);
        }
        let own = self.engine.context().state();
        let functions = builder.scalar_functions().get_or_insert_with(Vec::new);
        for f in own.scalar_functions().values() {
            // The engine's own version of a function wins (`get_field` that keeps NULLs).
            match functions.iter_mut().find(|g| g.name() == f.name()) {
                Some(g) => *g = f.clone(),
                None => functions.push(f.clone()),
            }
        }
        let side = self.side(listed_as(&ctx.headers));
        let who: Arc<str> = Arc::from(self.name.as_str());
        Ok(builder
            .with_distributed_user_codec(LlmCodec::worker(side))
            // Tasks that read other workers' output reach them as the coordinator does.
            .with_distributed_channel_resolver(WorkerChannels::new(&self.config.cluster))
            .with_distributed_worker_plan_rewrite_handler(
                move |ev: WorkerPlanRewriteEvent<'_>| -> Result<_> {
                    let calls = ev.plan.exists(|p| Ok(p.is::<LlmExec>()))?;
                    let plan = crate::udf::claimed::pulled_by_calls(ev.plan, calls)?;
                    Ok(WorkerPlanRewriteEventResponse::new(
                        super::named::name_leaves(plan, &who)?,
                    ))
                },
            )
            .build())
    }

    /// The worker as the plan of a task sent to `listed_as` (its URL in the coordinator's
    /// list) sees it.
    pub(super) fn side(self: &Arc<Self>, listed_as: Option<String>) -> Arc<dyn WorkerSide> {
        Arc::new(TaskSide {
            host: self.clone(),
            listed_as,
        })
    }

    /// Serves on `listener` until `shutdown` completes, then finishes the tasks on the wire.
    pub async fn serve(
        self: &Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), String> {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = server_tls(&self.config.cluster) {
            server = server
                .tls_config(tls)
                .map_err(|e| format!("{}: TLS settings: {e}", self.name))?;
        }
        // The token is checked before a request's body (a plan) is read.
        let check = TokenCheck::new(self.config.cluster.token.as_ref(), &self.name);
        server
            .layer(tonic::service::InterceptorLayer::new(check))
            .add_service(self.service().into_worker_server())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| format!("{}: {e}", self.name))?;
        self.flush_cache()
            .await
            .map_err(|e| format!("{}: {e}", self.name))
    }

    /// A new dispatcher and models for `share` (this worker's part of every limit), and the
    /// run's client to its coordinator.
    fn share_runtime(
        &self,
        share: &RunShare,
        listed_as: Option<String>,
    ) -> (Arc<LlmRuntime>, Option<Arc<SharedCache>>) {
        let n = share.workers.max(1) as usize;
        let base = &self.engine.runtime;
        // The run's budgets are the coordinator's; the limits are this worker's config.
        let mut run = self.config.dispatcher.clone();
        run.budget_tokens = share.budget_tokens;
        run.budget_usd = share.budget_micro_usd.map(|m| m as f64 / 1e6);
        let mut settings = run.share(n);
        let shared = share.cache_url.as_deref().map(|url| {
            let cluster = &self.config.cluster;
            let ca = cluster.tls.ca.as_deref();
            Arc::new(SharedCache::new(url, cluster.token.clone(), ca).listed_as(listed_as))
        });
        if shared.is_some() {
            // The coordinator admits the shared models' requests: their limits are the
            // cluster's, not a share of them, so this worker may send as many as it can; and
            // it grants the run's budgets as the workers spend.
            settings.concurrency = self.config.dispatcher.concurrency;
            settings.budget_tokens = run.budget_tokens;
            settings.budget_usd = run.budget_usd;
        } else {
            // Models each machine answers itself keep their whole concurrency here.
            let own: usize = self
                .config
                .models
                .values()
                .filter(|m| m.per_worker())
                .map(|m| m.concurrency)
                .sum();
            settings.concurrency = settings
                .concurrency
                .max(own.min(self.config.dispatcher.concurrency));
        }
        let mode = if self.config.cache.refresh {
            CacheMode::Refresh
        } else {
            CacheMode::ReadWrite
        };
        let dispatcher = Dispatcher::with_shared_cache(
            settings,
            base.dispatcher.cache().cloned(),
            shared.clone(),
            mode,
        );
        if let Some(coordinator) = &shared {
            dispatcher.budgets_granted_by(coordinator.clone(), n);
        }
        self.metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dispatcher.metrics().clone());
        let models = super::models::shared_models(&self.config, &base.models, n, shared.as_ref());
        let runtime = Arc::new(LlmRuntime {
            dispatcher,
            models,
            max_join_calls: base.max_join_calls,
        });
        (runtime, shared)
    }

    /// The run of `share` on this worker, made at its first task (which came for the worker
    /// the coordinator lists at `listed_as`).
    fn run_of(
        &self,
        share: &RunShare,
        listed_as: Option<&str>,
    ) -> (Arc<LlmRuntime>, Option<Arc<SharedCache>>) {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        runs.retain(|r| now.duration_since(r.last_task) < RUN_IDLE);
        if let Some(r) = runs.iter_mut().find(|r| &r.share == share) {
            r.last_task = now;
            return (r.runtime.clone(), r.coordinator.clone());
        }
        tracing::info!(
            "{}: run {} ({} workers) starts here",
            self.name,
            share.run,
            share.workers
        );
        let (runtime, coordinator) = self.share_runtime(share, listed_as.map(String::from));
        runs.push(Run {
            share: share.clone(),
            runtime: runtime.clone(),
            coordinator: coordinator.clone(),
            last_task: now,
        });
        (runtime, coordinator)
    }
}

/// The worker as one task's plan sees it: the host, and the URL the coordinator lists it at
/// (from the task's request).
#[derive(Debug)]
struct TaskSide {
    host: Arc<WorkerHost>,
    listed_as: Option<String>,
}

impl WorkerSide for TaskSide {
    fn name(&self) -> &str {
        &self.host.name
    }

    fn coordinator(&self, run: &RunShare) -> Result<Arc<SharedCache>, String> {
        let listed = self.listed_as.as_deref();
        self.host.run_of(run, listed).1.ok_or_else(|| {
            format!(
                "{}: a chunked scan came from a coordinator that serves nothing",
                self.host.name
            )
        })
    }

    fn function(&self, function: &str) -> Option<Arc<FunctionDef>> {
        self.host.engine.function(function).cloned()
    }

    fn model(&self, model: &str) -> Result<String, String> {
        let config = &self.host.config;
        let Some(m) = config.models.get(model) else {
            let known: Vec<&str> = config.models.keys().map(String::as_str).collect();
            return Err(format!(
                "not defined in this worker's sluice.toml (defined: [{}])",
                known.join(", ")
            ));
        };
        if let ModelPart::Local(_) = m.part
            && !std::path::Path::new(&m.model).exists()
        {
            return Err(format!(
                "model file {} not found on this worker; run scripts/fetch-model.sh there",
                m.model
            ));
        }
        Ok(m.fingerprint())
    }

    fn runtime(&self, share: &RunShare) -> Result<Arc<LlmRuntime>, String> {
        Ok(self.host.run_of(share, self.listed_as.as_deref()).0)
    }
}
