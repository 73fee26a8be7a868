//! Statements on a cluster of `sluice worker`s: the coordinator's side.
//!
//! The session plans as it does alone (sluice's planner and [`LiftLlmCalls`]), and
//! datafusion-distributed's planner, wrapped around it, cuts the physical plan into stages at
//! its exchanges and sends every stage but the head to workers. This file tells that planner
//! what sluice knows:
//! - where the workers are ([`Workers`]), and that the tasks of a stage go to them in the
//!   listed order on every run (so a re-run finds each passage's answers in the cache of the
//!   worker that made them);
//! - that a stage holding an LLM node wants one task per worker, however small its input
//!   (the 16 MiB-per-task default would leave a small corpus on one worker);
//! - how an LLM node crosses the wire ([`LlmCodec`]), with the run's [`RunShare`] of the
//!   limits and budgets.
//!
//! [`LiftLlmCalls`]: crate::udf::plan::LiftLlmCalls

use std::collections::BTreeMap;
use std::time::Duration;

use datafusion::common::Result;
use datafusion::execution::SessionStateBuilder;
use datafusion_distributed::{
    DesiredTaskCountEvent, DesiredTaskCountEventResponse, DistributedExt, RouteTasksEvent,
    RouteTasksEventResponse, SessionStateBuilderExt, WorkerResolver,
};
use url::Url;

use crate::config::{ClusterConfig, Config};
use crate::udf::codec::{LlmCodec, RunShare};
use crate::udf::exec::LlmExec;

/// The configured workers, in order.
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

/// A run's share of the limits: one id per engine, the worker count and the budgets.
fn run_share(config: &Config) -> RunShare {
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
    }
}

/// Adds the distributed planner over `config.cluster.workers` to a session whose query
/// planner is already sluice's.
pub(super) fn distribute(builder: SessionStateBuilder, config: &Config) -> SessionStateBuilder {
    let workers = config.cluster.workers.clone();
    let n = workers.len();
    let models: BTreeMap<String, String> = config
        .models
        .iter()
        .map(|(name, m)| (name.clone(), m.fingerprint()))
        .collect();
    let in_order = workers.clone();
    builder
        .with_distributed_planner()
        .with_distributed_worker_resolver(Workers(workers))
        .with_distributed_user_codec(LlmCodec::coordinator(run_share(config), models))
        .with_distributed_desired_task_count_handler(
            move |ev: DesiredTaskCountEvent<'_>| -> Option<Result<DesiredTaskCountEventResponse>> {
                ev.plan.downcast_ref::<LlmExec>()?;
                Some(Ok(DesiredTaskCountEventResponse::desired(n.max(2))))
            },
        )
        .with_distributed_route_tasks_handler(
            move |ev: RouteTasksEvent<'_>| -> Option<Result<RouteTasksEventResponse>> {
                let urls = (0..ev.task_count)
                    .map(|i| in_order[i % in_order.len()].clone())
                    .collect();
                Some(Ok(RouteTasksEventResponse::new(urls)))
            },
        )
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

/// A failed distributed statement's message, naming the workers that stopped answering.
pub(super) fn name_failed_workers(cluster: &ClusterConfig, message: String) -> String {
    if !cluster.distributed() {
        return message;
    }
    let down = unreachable_workers(cluster);
    if down.is_empty() {
        return message;
    }
    let names: Vec<String> = down
        .iter()
        .map(|(url, why)| format!("{} ({why})", url.as_str().trim_end_matches('/')))
        .collect();
    let what = if names.len() == 1 {
        "worker"
    } else {
        "workers"
    };
    format!(
        "{what} {} not reachable; restart it and run again (answers already received are \
         cached on the workers) — {message}",
        names.join(", ")
    )
}
