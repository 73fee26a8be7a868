//! The same SQL on a cluster of sluice workers (datafusion-distributed): in-process workers on
//! 127.0.0.1 ports for most cases, real `sluice worker` processes for the ones about processes
//! (a worker killed mid-query, a worker without the model file).

mod support;

use std::path::Path;
use std::sync::Arc;

use sluice::config::Config;
use sluice::engine::worker::WorkerHost;
use support::rows::{assert_provenance, rows};
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
    start_worker_with(|cache| worker_config(base_url, cache, concurrency)).await
}

/// A worker with the configuration `config(cache_dir)` gives.
async fn start_worker_with(config: impl FnOnce(&Path) -> Config) -> InProcess {
    let cache = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let host = WorkerHost::new(&config(cache.path()), &addr).unwrap();
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
fn coordinator(base_url: &str, workers: &[&str], concurrency: usize) -> sluice::Engine {
    let cache = tempfile::tempdir().unwrap().keep();
    let mut c = worker_config(base_url, &cache, concurrency);
    c.cluster.workers = sluice::config::ClusterConfig::parse_workers(workers).unwrap();
    sluice::Engine::new(&c).unwrap()
}

fn urls(workers: &[InProcess]) -> Vec<&str> {
    workers.iter().map(|w| w.url.as_str()).collect()
}

async fn three_workers(base_url: &str, concurrency: usize) -> Vec<InProcess> {
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(start_worker(base_url, concurrency).await);
    }
    out
}

async fn stop_all(workers: Vec<InProcess>) {
    for w in workers {
        w.stop().await;
    }
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

    let workers = three_workers(&server.base_url(), 48).await;
    let engine = coordinator(&server.base_url(), &urls(&workers), 48);
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
    let batches = read_parquet(&out).await;
    for r in &rows(&batches) {
        assert_provenance(&alone, r);
    }

    // The same statement on the same cluster (a new run): every answer is in a worker's cache.
    server.reset_stats();
    let again = coordinator(&server.base_url(), &urls(&workers), 48);
    let out2 = dir.path().join("again.parquet");
    run(&again, &flagship_sql(&excerpts(), &out2))
        .await
        .unwrap();
    assert_eq!(server.stats().requests, 0, "a re-run sends no request");
    assert_eq!(sorted_rows(&read_parquet(&out2).await), single);
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_capped_at_n_in_flight_never_refuses_a_cluster_configured_with_n() {
    let cap = 12;
    let server = mock(MockConfig {
        latency: std::time::Duration::from_millis(20),
        limits: Limits {
            max_in_flight: Some(cap),
            ..Limits::default()
        },
        ..MockConfig::default()
    })
    .await;
    let workers = three_workers(&server.base_url(), cap as usize).await;
    let engine = coordinator(&server.base_url(), &urls(&workers), cap as usize);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qa.parquet");
    let printed = run(&engine, &flagship_sql(&excerpts(), &out))
        .await
        .unwrap();
    assert!(printed.contains("COPY 42 rows"), "{printed}");
    let stats = server.stats();
    assert_eq!(
        stats.faults.get("over_concurrency").copied().unwrap_or(0),
        0,
        "{stats:?}"
    );
    assert!(
        stats.max_in_flight <= cap,
        "{} in flight",
        stats.max_in_flight
    );
    assert_eq!(stats.requests, 56);
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_with_another_definition_refuses_the_task_naming_it() {
    let server = mock(MockConfig::default()).await;
    let udfs = tempfile::tempdir().unwrap();
    for f in ["generate_questions.toml", "answer_question.toml"] {
        let mut text = std::fs::read_to_string(repo().join("udfs").join(f)).unwrap();
        if f == "answer_question.toml" {
            text = text.replacen("{{ question }}", "{{ question }} Be brief.", 1);
        }
        std::fs::write(udfs.path().join(f), text).unwrap();
    }
    let base = server.base_url();
    let mut workers = three_workers(&base, 48).await;
    let udf_dir = udfs.path().to_path_buf();
    let odd = start_worker_with(|cache| {
        let mut c = worker_config(&base, cache, 48);
        c.udf_dir = udf_dir;
        c
    })
    .await;
    let odd_url = odd.url.clone();
    let old = std::mem::replace(&mut workers[1], odd);
    old.stop().await;
    let engine = coordinator(&base, &urls(&workers), 48);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qa.parquet");
    let err = run(&engine, &flagship_sql(&excerpts(), &out))
        .await
        .unwrap_err();
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(err.contains("answer_question()"), "{err}");
    assert!(err.contains("differs from the coordinator's"), "{err}");
    assert!(
        err.contains(odd_url.trim_start_matches("http://")),
        "names the worker: {err}"
    );
    assert!(!out.exists(), "no output file");
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_worker_is_a_one_line_error_naming_it() {
    let server = mock(MockConfig::default()).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let engine = coordinator(&server.base_url(), &[closed.as_str()], 8);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qa.parquet");
    let err = run(&engine, &flagship_sql(&excerpts(), &out))
        .await
        .unwrap_err();
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(err.contains(&format!("worker http://{closed}")), "{err}");
    assert!(!out.exists(), "no output file");
    assert_eq!(server.stats().requests, 0);
}
