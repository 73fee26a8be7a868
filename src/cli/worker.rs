//! `sluice worker --listen ADDR`: serve plan stages to a coordinator until SIGTERM or SIGINT.

use std::process::ExitCode;

use super::exit::Failure;
use super::interrupt::Interrupts;
use crate::config::Config;
use crate::engine::worker::WorkerHost;

/// What `sluice worker --help` says after the flags.
pub(crate) const WORKER_HELP: &str = "\
A worker runs the plan stages a coordinator (`sluice run --workers URL,...`) sends it: it
reads the chunks of the inputs the coordinator hands it as its calls free up, makes the LLM
calls of their rows with its own dispatcher, providers and response cache (each request
admitted by the coordinator, which paces every model for the cluster), and streams the rows
back.

Shared by every machine: the inputs (s3:// or a path all of them see), sluice.toml and udfs/
(a worker refuses a task whose function or model differs from the coordinator's; a model with
per_worker = true may name each machine's own server and limits). API keys are
read by each worker from its own environment (the variables named in sluice.toml); the
coordinator never sends one.

Caches: each worker keeps its own (--cache-dir) and, when the coordinator serves its cache
(with a cluster token, or on loopback; over TLS in a TLS cluster), asks it for what it lacks
and sends it every answer: a re-run pays for nothing already answered, whatever the workers'
order or number. Each worker also reports its counters there, for the coordinator's summary.

Limits: concurrency, rpm, tpm, --budget-tokens and --budget-usd are the cluster's: each of N
workers gets 1/N of each (rounded down, at least 1).

A worker that dies mid-statement is run around: the coordinator runs the statement again on
the workers left. A worker that comes back is used from the next statement.

Only its coordinator: with SLUICE_CLUSTER_TOKEN set (or the variable [cluster] token_env names)
to the same long random value on every machine, a worker refuses any request without that
token before reading it, and the coordinator sends it. Without a token a worker listens only on
a loopback address, unless started with --insecure. [cluster] tls_cert and tls_key make a
worker serve over TLS; tls_ca on the coordinator (the authority that signed the workers'
certificates) makes it connect over TLS.

SIGTERM or Ctrl-C: stop accepting tasks, finish the ones on the wire, store the cache, exit.";

/// Runs a worker on `listen` until a signal.
pub(crate) async fn worker_command(
    config: &Config,
    listen: &str,
    insecure: bool,
) -> Result<ExitCode, Failure> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::config(format!("--listen {listen}: cannot listen there: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Failure::config(format!("--listen {listen}: {e}")))?;
    if config.cluster.token.is_none() && !local.ip().is_loopback() && !insecure {
        return Err(Failure::config(format!(
            "--listen {listen}: a worker without a cluster token serves only on a loopback \
             address; set {} (the same long random value on the coordinator and every worker), \
             or pass --insecure to serve anyone who reaches the port",
            config.cluster.token_env
        )));
    }
    let addr = local.to_string();
    let host = WorkerHost::new(config, &addr).map_err(Failure::config)?;
    // Listening for signals before saying where it listens: a SIGTERM sent on reading that
    // line stops the worker in order.
    let mut signals = Interrupts::listen();
    let guard = match (&config.cluster.token, config.cluster.tls.cert.is_some()) {
        (Some(_), true) => "cluster token and TLS",
        (Some(_), false) => "cluster token, no TLS",
        (None, true) => "TLS, no cluster token",
        (None, false) => "no cluster token",
    };
    eprintln!(
        "sluice worker listening on {addr} ({guard}; cache {}); stop with SIGTERM or Ctrl-C",
        if config.cache.enabled {
            config.cache.dir.display().to_string()
        } else {
            "off".to_string()
        }
    );
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
