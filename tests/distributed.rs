//! The same SQL on a cluster of sluice workers (datafusion-distributed): in-process workers on
//! 127.0.0.1 ports for most cases, real `sluice worker` processes for the ones about processes
//! (a worker killed mid-query, a worker without the model file).

mod support;

use std::path::Path;
use std::sync::Arc;

use sluice::config::Config;
use sluice::engine::worker::WorkerHost;
use support::*;
use tokio::sync::oneshot;

/// An in-process worker: its host, its address and what stops it.
struct InProcess {
    host: Arc<WorkerHost>,
    url: String,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), String>>,
    _cache: tempfile::TempDir,
}

impl InProcess {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.done.await.unwrap().unwrap();
    }
}

/// The test configuration with the response cache on in `cache_dir`, `concurrency` in flight
/// for the model and the dispatcher.
fn worker_config(base_url: &str, cache_dir: &Path, concurrency: usize) -> Config {
    let text = config_text(base_url, 4, concurrency)
        .replace("[cache]\nenabled = false", "[cache]\nenabled = true")
        .replace(
            "timeout_ms = 2000\n",
            &format!("timeout_ms = 2000\nconcurrency = {concurrency}\n"),
        );
    let mut c = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
    c.udf_dir = repo().join("udfs");
    c.cache.dir = cache_dir.to_path_buf();
    c
}

async fn start_worker(base_url: &str, concurrency: usize) -> InProcess {
    let cache = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let host = WorkerHost::new(&worker_config(base_url, cache.path(), concurrency), &addr).unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let h = host.clone();
    let done = tokio::spawn(async move {
        h.serve(listener, async move {
            let _ = rx.await;
        })
        .await
    });
    InProcess {
        host,
        url: format!("http://{addr}"),
        stop: Some(tx),
        done,
        _cache: cache,
    }
}

/// A coordinator over `workers`, with the workers' configuration (its own cache, unused: the
/// workers keep theirs).
fn coordinator(base_url: &str, workers: &[&InProcess], concurrency: usize) -> sluice::Engine {
    let cache = tempfile::tempdir().unwrap().keep();
    let mut c = worker_config(base_url, &cache, concurrency);
    let urls: Vec<String> = workers.iter().map(|w| w.url.clone()).collect();
    c.cluster.workers = sluice::config::ClusterConfig::parse_workers(&urls).unwrap();
    sluice::Engine::new(&c).unwrap()
}

fn excerpts() -> std::path::PathBuf {
    shared_data("earnings_transcript_excerpts.jsonl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flagship_on_three_workers_equals_one_process() {
    let server = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();

    // One process first.
    let alone = flagship_engine(&server, 4);
    let single_out = dir.path().join("single.parquet");
    run(&alone, &flagship_sql(&excerpts(), &single_out))
        .await
        .unwrap();
    let single_requests = server.stats().requests;
    assert_eq!(
        single_requests, 56,
        "14 question prompts + 42 answer prompts"
    );
    server.reset_stats();

    let workers = vec![
        start_worker(&server.base_url(), 48).await,
        start_worker(&server.base_url(), 48).await,
        start_worker(&server.base_url(), 48).await,
    ];
    let engine = coordinator(&server.base_url(), &workers.iter().collect::<Vec<_>>(), 48);
    let out = dir.path().join("cluster.parquet");
    let printed = run(&engine, &flagship_sql(&excerpts(), &out))
        .await
        .unwrap();
    assert!(printed.contains("COPY 42 rows"), "{printed}");

    let single = sorted_rows(&read_parquet(&single_out).await);
    let cluster = sorted_rows(&read_parquet(&out).await);
    assert_eq!(
        cluster, single,
        "the cluster's Parquet is the single process's"
    );

    let stats = server.stats();
    assert_eq!(stats.requests, single_requests, "no call made twice");
    assert!(stats.by_prompt.values().all(|n| *n == 1));
    let per_worker: Vec<u64> = workers.iter().map(|w| w.host.requests()).collect();
    assert_eq!(
        per_worker.iter().sum::<u64>(),
        single_requests,
        "{per_worker:?}"
    );
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "no worker idle: {per_worker:?}"
    );
    assert_eq!(
        engine.metrics().requests,
        0,
        "the coordinator calls no model itself"
    );

    for w in workers {
        w.stop().await;
    }
}
