//! Statements on a cluster of `sluice worker`s: the coordinator's side.
//!
//! The session plans as it does alone (sluice's planner and [`LiftLlmCalls`]), and
//! datafusion-distributed's planner, wrapped around it, cuts the physical plan into stages at
//! its exchanges and sends every stage but the head to workers. This file tells that planner
//! what sluice knows:
//! - where the workers are ([`Workers`]), and that the tasks of a stage go to them in the
//!   listed order on every run;
//! - how to reach them ([`WorkerChannels`]: the cluster token, TLS);
//! - where the coordinator serves its response cache to them ([`serve_cache`]), so that an
//!   answer any worker received is found by any worker of a later run;
//! - that a stage holding an LLM node wants one task per worker, however small its input
//!   (the 16 MiB-per-task default would leave a small corpus on one worker);
//! - how an LLM node crosses the wire ([`LlmCodec`]), with the run's [`RunShare`] of the
//!   limits and budgets.
//!
//! [`LiftLlmCalls`]: crate::udf::plan::LiftLlmCalls

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use datafusion::common::Result;
use datafusion::execution::SessionStateBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion_distributed::{
    DesiredTaskCountEvent, DesiredTaskCountEventResponse, DistributedExec, DistributedExt,
    RouteTasksEvent, RouteTasksEventResponse, ScaleUpLeafNodeEvent, ScaleUpLeafNodeEventResponse,
    SessionStateBuilderExt, WorkerResolver, display_plan_ascii,
};
use url::Url;

use super::live::LiveWorkers;
use super::session::Engine;
use super::transport::WorkerChannels;
use crate::cache::{CacheServer, Counters, WorkQueues};
use crate::config::{ClusterConfig, Config, Secret};
use crate::llm::Dispatcher;
use crate::udf::claimed::chunked_leaf;
use crate::udf::codec::{LlmCodec, RunShare};
use crate::udf::exec::LlmExec;

datafusion::common::extensions_options! {
    /// What the workers must know of the coordinator's tables: the `bad_rows` rules of their
    /// locations (sent with every task, as datafusion-distributed sends config extensions).
    pub struct TableRules {
        /// The rules ([`crate::source::lines::LineRules::to_text`]).
        pub bad_rows: String, default = String::new()
    }
}

impl datafusion::config::ConfigExtension for TableRules {
    const PREFIX: &'static str = "sluice";
}

/// The configured workers, in order (a task count per worker that does not change when one is
/// passed over, so that every task reads the same rows as before).
#[derive(Debug, Clone)]
struct Workers(Vec<Url>);

impl WorkerResolver for Workers {
    /// The workers; a lone worker is listed twice, so that a stage with an LLM node still
    /// gets two tasks (both routed to it) rather than being folded into the coordinator's
    /// head stage, which datafusion-distributed does with a one-task stage under a one-task
    /// consumer.
    fn get_urls(&self) -> Result<Vec<Url>> {
        Ok(match self.0.as_slice() {
            [one] => vec![one.clone(), one.clone()],
            all => all.to_vec(),
        })
    }
}

/// A run's share of the limits: one id per engine, the worker count and the budgets, and
/// where the coordinator's cache is served.
fn run_share(config: &Config, cache_url: Option<String>) -> RunShare {
    let run = format!(
        "{:016x}{:016x}",
        fastrand::u64(..),
        std::process::id() as u64 ^ fastrand::u64(..)
    );
    RunShare {
        run,
        workers: config.cluster.workers.len() as u32,
        budget_tokens: config.dispatcher.budget_tokens,
        budget_micro_usd: config
            .dispatcher
            .budget_usd
            .map(|usd| (usd * 1e6).round().max(0.0) as u64),
        cache_url,
    }
}

/// The address of this machine on its route to `url` (no packet is sent).
fn local_address_toward(url: &Url) -> Option<IpAddr> {
    let target = *url.socket_addrs(|| None).ok()?.first()?;
    let any: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// Where a cluster's coordinator serves its response cache, counters and work queues: this
/// machine's address toward the first worker, and the TLS certificate and key it serves with
/// when the cluster uses TLS. `None` (each worker keeps only its own cache, counts only its own
/// calls and reads fixed byte ranges): beyond loopback without a cluster token, or with TLS but
/// no certificate of the coordinator's own; `warn` logs why.
fn serving_address(
    cluster: &ClusterConfig,
    warn: bool,
) -> Option<(IpAddr, Option<(&str, &Secret)>)> {
    let first = cluster.workers.first()?;
    // With TLS between the machines, served over TLS with this machine's certificate.
    let tls = match (
        cluster.tls.to_workers(),
        &cluster.tls.cert,
        &cluster.tls.key,
    ) {
        (false, _, _) => None,
        (true, Some(cert), Some(key)) => Some((cert.as_str(), key)),
        (true, _, _) => {
            if warn {
                tracing::warn!(
                    "workers keep their own caches and counts: with [cluster] tls_ca, the \
                     coordinator serves its cache only over TLS, with tls_cert and tls_key of \
                     its own"
                );
            }
            return None;
        }
    };
    let ip = local_address_toward(first)?;
    if cluster.token.is_none() && !ip.is_loopback() {
        if warn {
            tracing::warn!(
                "workers keep their own caches and counts: the coordinator serves its cache to \
                 them only with a cluster token ({}) or on loopback",
                cluster.token_env
            );
        }
        return None;
    }
    Some((ip, tls))
}

/// Whether a coordinator of `cluster` serves its workers (cache, counters, chunks) and so
/// admits their requests with its own governors ([`serving_address`]).
pub(super) fn paces_workers(cluster: &ClusterConfig) -> bool {
    cluster.distributed() && serving_address(cluster, false).is_some()
}

/// On a cluster's coordinator, serves the response cache of `dispatcher` (when it has one) to
/// the workers, takes their counters into its metrics, grants them the run's budgets (whole:
/// the dispatcher's own calls draw on the same pool) and hands out chunks of the input
/// ([`crate::cache::CacheServer`]), where [`serving_address`] says, on a free port.
pub(super) fn serve_cache(config: &Config, dispatcher: &Dispatcher) -> Option<CacheServer> {
    let cluster = &config.cluster;
    tokio::runtime::Handle::try_current().ok()?;
    let (ip, tls) = serving_address(cluster, true)?;
    let d = &config.dispatcher;
    let pool = dispatcher.budget_pool((d.budget_tokens, d.budget_usd), cluster.workers.len());
    let metrics = dispatcher.metrics().clone();
    let reports = pool.clone();
    let counters: Counters = Arc::new(move |delta| {
        metrics.absorb(delta);
        reports.reported(delta);
    });
    let guard = (cluster.token.clone(), tls);
    let cache = dispatcher.cache().cloned();
    match CacheServer::start(cache, (ip, 0).into(), guard, counters) {
        Ok(server) => {
            server.grant_with(pool.clone());
            dispatcher.draw_on(pool);
            Some(server)
        }
        Err(e) => {
            tracing::warn!("the coordinator cannot serve its cache to the workers: {e}");
            None
        }
    }
}

/// Adds the distributed planner over `config.cluster.workers` to a session whose query
/// planner is already sluice's, with the codec of this run; with the coordinator's server
/// (`served`), file scans are handed out in chunks as workers free up.
pub(super) fn distribute(
    builder: SessionStateBuilder,
    config: &Config,
    served: Option<&CacheServer>,
    live: &Arc<LiveWorkers>,
) -> SessionStateBuilder {
    let cache_url = served.map(CacheServer::url);
    let work = served.map(CacheServer::work);
    planned_on(builder, &config.cluster, live.clone(), work)
        .with_distributed_user_codec(LlmCodec::coordinator(run_share(config, cache_url), config))
        .with_distributed_option_extension(TableRules::default())
}

/// The distributed planner over `cluster`: LLM stages get a task per worker, tasks go to the
/// workers in the listed order (passing over those `live` says are gone), and with `work` (the
/// coordinator's queues) file scans are cut into chunks that the tasks ask for as they free up
/// ([`chunked_leaf`]).
fn planned_on(
    builder: SessionStateBuilder,
    cluster: &ClusterConfig,
    live: Arc<LiveWorkers>,
    work: Option<Arc<WorkQueues>>,
) -> SessionStateBuilder {
    let workers = cluster.workers.clone();
    let n = workers.len();
    let mut builder = builder
        .with_distributed_planner()
        .with_distributed_channel_resolver(WorkerChannels::new(cluster))
        .with_distributed_worker_resolver(Workers(workers))
        .with_distributed_desired_task_count_handler(
            move |ev: DesiredTaskCountEvent<'_>| -> Option<Result<DesiredTaskCountEventResponse>> {
                ev.plan.downcast_ref::<LlmExec>()?;
                Some(Ok(DesiredTaskCountEventResponse::desired(n.max(2))))
            },
        )
        .with_distributed_route_tasks_handler(
            move |ev: RouteTasksEvent<'_>| -> Option<Result<RouteTasksEventResponse>> {
                Some(live.route(ev.task_count).map(RouteTasksEventResponse::new))
            },
        );
    if let Some(queues) = work {
        builder = builder.with_distributed_scale_up_leaf_node_handler(
            move |ev: ScaleUpLeafNodeEvent<'_>| -> Option<Result<ScaleUpLeafNodeEventResponse>> {
                chunked_leaf(ev.plan, ev.task_count, &queues)
                    .map(|r| r.map(ScaleUpLeafNodeEventResponse::new))
            },
        );
    }
    builder
}

impl Engine {
    /// On a cluster, sends the tables' `bad_rows` rules with every later task.
    pub(super) fn share_table_rules(&self) {
        if !self.cluster.distributed() {
            return;
        }
        let text = self.lines.to_text();
        let state = self.ctx.state_ref();
        let mut state = state.write();
        if let Some(rules) = state
            .config_mut()
            .options_mut()
            .extensions
            .get_mut::<TableRules>()
        {
            rules.bad_rows = text;
        }
    }

    /// On a cluster, `plan` as the coordinator would distribute it: its stages, each stage's
    /// tasks, and the workers they go to (for `sluice explain`; nothing is sent).
    pub(super) async fn stages(&self, plan: &LogicalPlan) -> Result<Option<String>> {
        if !self.cluster.distributed() {
            return Ok(None);
        }
        // Chunks as a run hands them out, from queues nobody asks (nothing is sent).
        let work = paces_workers(&self.cluster).then(|| Arc::new(WorkQueues::default()));
        let state = planned_on(
            SessionStateBuilder::new_from_existing(self.ctx.state()),
            &self.cluster,
            LiveWorkers::new(&self.cluster),
            work,
        )
        .build();
        let physical = state.create_physical_plan(plan).await?;
        let mut text = display_plan_ascii(physical.as_ref(), false);
        if !physical.is::<DistributedExec>() {
            return Ok(Some(format!(
                "runs on the coordinator alone (no stage to distribute)\n{text}"
            )));
        }
        let order: Vec<String> = self
            .cluster
            .workers
            .iter()
            .enumerate()
            .map(|(i, u)| format!("t{i} {}", u.as_str().trim_end_matches('/')))
            .collect();
        text.push_str(&format!(
            "tasks go to the workers in order (task i to worker i mod {}): {}\n",
            order.len(),
            order.join(", ")
        ));
        Ok(Some(text))
    }
}

/// The workers of `cluster` that do not accept a connection now, each with the reason.
pub(super) fn unreachable_workers(cluster: &ClusterConfig) -> Vec<(Url, String)> {
    let mut out = Vec::new();
    for url in &cluster.workers {
        let addr = match url.socket_addrs(|| None) {
            Ok(a) if !a.is_empty() => a[0],
            Ok(_) => {
                out.push((url.clone(), "its host has no address".to_string()));
                continue;
            }
            Err(e) => {
                out.push((url.clone(), format!("its host does not resolve ({e})")));
                continue;
            }
        };
        if let Err(e) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            out.push((url.clone(), e.to_string()));
        }
    }
    out
}

/// The workers that do not accept a connection now; after a `transport` failure, probed again
/// for up to a second (a dying worker's connections break before its listener closes).
/// Blocking: call it off the async runtime's threads.
fn unreachable_within_a_second(cluster: &ClusterConfig, transport: bool) -> Vec<(Url, String)> {
    let mut down = unreachable_workers(cluster);
    for _ in 0..10 {
        if !down.is_empty() || !transport {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        down = unreachable_workers(cluster);
    }
    down
}

/// The workers found dead after a failed statement (see [`unreachable_within_a_second`]).
pub(super) fn dead_workers(cluster: &ClusterConfig, transport: bool) -> Vec<Url> {
    unreachable_within_a_second(cluster, transport)
        .into_iter()
        .map(|(url, _)| url)
        .collect()
}

/// Whether `e` came from the transport between the coordinator and a worker (a gRPC status the
/// worker did not send as an error of its own, or an I/O error), rather than from a worker.
pub(super) fn is_transport_failure(e: &datafusion::common::DataFusionError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<tonic::Status>() || c.is::<tonic::transport::Error>() || c.is::<std::io::Error>()
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// On a cluster, the message of a statement that failed because workers stopped answering,
/// naming them (their transport errors say nothing a person can act on); `None` when every
/// worker answers. After a `transport` failure, a worker that died is seen dying: its
/// connections break before its listener closes, so it is probed again for a moment. Blocking.
pub(super) fn name_failed_workers(cluster: &ClusterConfig, transport: bool) -> Option<String> {
    if !cluster.distributed() {
        return None;
    }
    let down = unreachable_within_a_second(cluster, transport);
    if down.is_empty() {
        return None;
    }
    let names: Vec<String> = down
        .iter()
        .map(|(url, why)| {
            let why = why.split(" (os error").next().unwrap_or(why).to_lowercase();
            format!("{} ({why})", url.as_str().trim_end_matches('/'))
        })
        .collect();
    let (what, is, it) = if names.len() == 1 {
        ("worker", "is", "it")
    } else {
        ("workers", "are", "them")
    };
    Some(format!(
        "{what} {} {is} not reachable: start {it} (`sluice worker --listen ...`) and run again; \
         answers received before are in the workers' caches",
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use datafusion::physical_plan::{ExecutionPlan, displayable};
    use datafusion_proto::bytes::{
        physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
    };

    use super::*;
    use crate::engine::Engine;
    use crate::engine::worker::WorkerHost;

    const KEY: &str = "sk-coordinator-only-4d9e2b7a1c";

    fn config(dir: &Path) -> Config {
        let text = "[cache]\nenabled = false\n\n[models.default]\nkind = \"openai\"\n\
                    base_url = \"http://127.0.0.1:9/v1\"\nmodel = \"mock\"\n\
                    api_key_env = \"CODEC_TEST_KEY\"\n";
        let mut c = Config::parse(text, &dir.join("sluice.toml"), &|k| {
            (k == "CODEC_TEST_KEY").then(|| KEY.to_string())
        })
        .unwrap();
        c.udf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("udfs");
        c
    }

    /// The plan of a two-call statement over a JSON-lines table, planned in one process.
    async fn plan(engine: &Engine, dir: &Path) -> Arc<dyn ExecutionPlan> {
        let data = dir.join("t.jsonl");
        std::fs::write(
            &data,
            "{\"p\": \"Revenue grew 5%.\"}\n{\"p\": \"Margins fell.\"}\n",
        )
        .unwrap();
        let ctx = engine.context();
        ctx.sql(&format!(
            "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION '{}'",
            data.display()
        ))
        .await
        .unwrap();
        ctx.sql(
            "SELECT p, answer_question('ACME', 'Q1', '2024-01-01', p, 'What grew?') AS a, \
                    generate_questions('ACME', 'Q1', '2024-01-01', upper(p)) AS q \
             FROM t",
        )
        .await
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap()
    }

    fn find_llm(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
        if plan.downcast_ref::<LlmExec>().is_some() {
            return Some(plan.clone());
        }
        plan.children().into_iter().find_map(find_llm)
    }

    #[tokio::test]
    async fn an_llm_node_round_trips_and_carries_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let engine = Engine::new(&cfg).unwrap();
        let node = find_llm(&plan(&engine, dir.path()).await).expect("an LLM node");

        let share = RunShare {
            run: "r1".into(),
            workers: 3,
            budget_tokens: Some(9_000),
            budget_micro_usd: None,
            cache_url: None,
        };
        let coordinator = LlmCodec::coordinator(share, &cfg);
        let bytes =
            physical_plan_to_bytes_with_extension_codec(node.clone(), &coordinator).unwrap();
        let haystack = String::from_utf8_lossy(&bytes);
        assert!(!haystack.contains(KEY), "the key is in the encoded node");
        assert!(
            haystack.contains("answer_question"),
            "the definition travels"
        );

        let host = WorkerHost::new(&cfg, "127.0.0.1:1").unwrap();
        let side = host.side(None);
        let worker = LlmCodec::worker(side.clone());
        let task_ctx = engine.context().task_ctx();
        let decoded =
            physical_plan_from_bytes_with_extension_codec(&bytes, &task_ctx, &worker).unwrap();
        let show = |p: &Arc<dyn ExecutionPlan>| displayable(p.as_ref()).indent(true).to_string();
        assert_eq!(show(&decoded), show(&node));
        assert_eq!(decoded.schema(), node.schema());
        let exec = decoded.downcast_ref::<LlmExec>().unwrap();
        let names: Vec<&str> = exec.calls().iter().map(|c| c.def.name.as_str()).collect();
        assert_eq!(names, ["answer_question", "generate_questions"]);
        // The worker's runtime for this run has a third of the limits.
        let rt = side.runtime(&RunShare {
            run: "r1".into(),
            workers: 3,
            budget_tokens: Some(9_000),
            budget_micro_usd: None,
            cache_url: None,
        });
        let rt = rt.unwrap();
        assert_eq!(rt.dispatcher.config().concurrency, 64 / 3);
        assert_eq!(rt.dispatcher.config().budget_tokens, Some(3_000));
    }

    #[test]
    fn a_lone_worker_is_listed_twice_and_others_once() {
        let a = Url::parse("http://a:1").unwrap();
        let b = Url::parse("http://b:2").unwrap();
        assert_eq!(
            Workers(vec![a.clone()]).get_urls().unwrap(),
            [a.clone(), a.clone()]
        );
        assert_eq!(
            Workers(vec![a.clone(), b.clone()]).get_urls().unwrap(),
            [a, b]
        );
    }
}
