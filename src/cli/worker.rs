//! `sluice worker --listen ADDR`: serve plan stages to a coordinator until SIGTERM or SIGINT.

use std::process::ExitCode;

use super::exit::Failure;
use super::interrupt::Interrupts;
use crate::config::Config;
use crate::engine::worker::WorkerHost;

/// What `sluice worker --help` says after the flags.
pub(crate) const WORKER_HELP: &str = "\
A worker runs the plan stages a coordinator (`sluice run --workers URL,...`) sends it: it
reads its byte ranges of the inputs itself, makes the LLM calls of its rows with its own
dispatcher, providers and response cache, and streams the rows back.

Shared by every machine: the inputs (s3:// or a path all of them see), sluice.toml and udfs/
(a worker refuses a task whose function or model differs from the coordinator's). API keys are
read by each worker from its own environment (the variables named in sluice.toml); the
coordinator never sends one.

Not shared: caches. Each worker keeps its own (--cache-dir); tasks go to the workers in the
order they are listed, so re-running a statement on the same cluster finds every answer.

Limits: concurrency, rpm, tpm, --budget-tokens and --budget-usd are the cluster's: each of N
workers gets 1/N of each (rounded down, at least 1).

A worker that dies mid-query fails the query with an error naming it; restart it and run again
(only what was not answered is sent).

A worker runs the plans of anyone who reaches its port (no TLS, no authentication) with its
own API keys: listen on a private network only.

SIGTERM or Ctrl-C: stop accepting tasks, finish the ones on the wire, store the cache, exit.";

/// Runs a worker on `listen` until a signal.
pub(crate) async fn worker_command(config: &Config, listen: &str) -> Result<ExitCode, Failure> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::config(format!("--listen {listen}: cannot listen there: {e}")))?;
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| listen.to_string());
    let host = WorkerHost::new(config, &addr).map_err(Failure::config)?;
    eprintln!(
        "sluice worker listening on {addr} (cache {}); stop with SIGTERM or Ctrl-C",
        if config.cache.enabled {
            config.cache.dir.display().to_string()
        } else {
            "off".to_string()
        }
    );
    let mut signals = Interrupts::listen();
    host.serve(listener, async move { signals.next().await })
        .await
        .map_err(Failure::statement)?;
    eprintln!(
        "sluice worker {addr} stopped: {} requests sent, {} answers from the cache",
        host.requests(),
        host.cache_hits()
    );
    Ok(ExitCode::SUCCESS)
}
