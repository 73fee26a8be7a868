//! The same SQL on a cluster of sluice workers (datafusion-distributed): in-process workers on
//! 127.0.0.1 ports for most cases, real `sluice worker` processes for the ones about processes
//! (a worker killed mid-query, a worker without the model file).

mod support;

use std::path::Path;
use std::sync::Arc;

use sluice::config::Config;
use sluice::engine::worker::WorkerHost;
use support::rows::{assert_provenance, rows, sorted_lines};
use support::workers::{
    KEY, WorkerProcess, cluster_project, sluice_ok, spawn_run, spawn_workers, worker_list,
};
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

/// A coordinator over `workers`, with the workers' configuration and a cache of its own (which
/// it serves to them).
fn coordinator(base_url: &str, workers: &[&str], concurrency: usize) -> sluice::Engine {
    let cache = tempfile::tempdir().unwrap().keep();
    coordinator_in(base_url, workers, concurrency, &cache)
}

/// [`coordinator`] with its cache in `cache_dir`.
fn coordinator_in(
    base_url: &str,
    workers: &[&str],
    concurrency: usize,
    cache_dir: &Path,
) -> sluice::Engine {
    sluice::Engine::new(&coordinator_config(
        base_url,
        workers,
        concurrency,
        cache_dir,
    ))
    .unwrap()
}

/// The workers' configuration, its cache in `cache_dir`, with `workers` as the cluster.
fn coordinator_config(
    base_url: &str,
    workers: &[&str],
    concurrency: usize,
    cache_dir: &Path,
) -> Config {
    let mut c = worker_config(base_url, cache_dir, concurrency);
    c.cluster.workers = sluice::config::ClusterConfig::parse_workers(workers).unwrap();
    c
}

/// A new coordinator on the cache of one just dropped: its server's connections close as their
/// tasks end, so the cache is opened again as soon as it is free (within 10 s).
async fn reopened(base_url: &str, workers: &[&str], cache_dir: &Path) -> sluice::Engine {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let config = coordinator_config(base_url, workers, 48, cache_dir);
        match sluice::Engine::new(&config) {
            Ok(engine) => return engine,
            Err(sluice::engine::EngineError::Cache(sluice::cache::CacheError::Busy(_)))
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
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

/// Runs the flagship on `engine` expecting it to fail: the error, checked to be one line and
/// to leave no output file.
async fn flagship_error(engine: &sluice::Engine) -> String {
    flagship_failure(engine).await.1
}

/// What failed the flagship, and its one-line message.
async fn flagship_failure(engine: &sluice::Engine) -> (sluice::engine::StatementErrorKind, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qa.parquet");
    let sql = flagship_sql(&excerpts(), &out);
    let mut printed = Vec::new();
    let err = engine
        .run_script(
            &sql,
            "test.sql",
            &sluice::RunOptions::default(),
            &mut printed,
        )
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(!message.contains('\n'), "one line: {message}");
    assert!(!out.exists(), "no output file: {message}");
    (err.kind, message)
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
    let coordinator_cache = dir.path().join("coordinator-cache");
    let engine = coordinator_in(&server.base_url(), &urls(&workers), 48, &coordinator_cache);
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
    // The workers made every request (above); the coordinator's counters include them all.
    assert_eq!(
        engine.metrics().requests,
        single_requests,
        "the coordinator counts every worker's requests"
    );
    let batches = read_parquet(&out).await;
    for r in &rows(&batches) {
        assert_provenance(&alone, r);
    }

    // The same statement on the same cluster (a new run): every answer is in the cluster's
    // caches, whichever worker reads which rows this time.
    server.reset_stats();
    engine.flush_cache().await.unwrap();
    drop(engine);
    let again = reopened(&server.base_url(), &urls(&workers), &coordinator_cache).await;
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
    let err = flagship_error(&engine).await;
    assert!(err.contains("answer_question()"), "{err}");
    assert!(err.contains("differs from the coordinator's"), "{err}");
    assert!(
        err.contains(odd_url.trim_start_matches("http://")),
        "names the worker: {err}"
    );
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
    let (kind, err) = flagship_failure(&engine).await;
    assert!(err.contains(&format!("worker http://{closed}")), "{err}");
    assert_eq!(kind, sluice::engine::StatementErrorKind::Workers, "{err}");
    assert_eq!(server.stats().requests, 0);
}

/// For the tests that kill a worker: a test server at 150 ms that wants the cluster's key, and
/// the flagship's rows as one process makes them alone (the server's counters reset after).
async fn server_and_rows_alone(concurrency: usize) -> (MockServer, Vec<String>) {
    let server = mock(MockConfig {
        latency: std::time::Duration::from_millis(150),
        api_key: Some(KEY.to_string()),
        ..MockConfig::default()
    })
    .await;
    let alone = cluster_project(&server.base_url(), concurrency);
    sluice_ok(&alone, &["run", "--no-cache", "q.sql"]);
    let expected = sorted_lines(rows(&read_parquet(&alone.path("out/qa.parquet")).await));
    server.reset_stats();
    (server, expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_query_is_run_around_and_comes_back_for_the_next_one() {
    let concurrency = 12;
    let (server, expected) = server_and_rows_alone(concurrency).await;

    let p = cluster_project(&server.base_url(), concurrency);
    let mut workers = spawn_workers(&p, 3);
    let prompts = 56;
    let all = worker_list(&workers);

    let mut coordinator = spawn_run(&p, &all);
    // Kill the second worker once stage 2 has started.
    wait_until("20 answers", || {
        let running = coordinator.try_wait().unwrap().is_none();
        assert!(running, "finished before the kill");
        server.stats().ok >= 20
    })
    .await;
    let mut victim = workers.remove(1);
    let victim_addr = victim.addr.clone();
    // Frozen first, so that what is on the wire when it is read is what it had at its end.
    victim.freeze();
    let on_the_wire = server.stats().in_flight;
    victim.kill();
    let out = coordinator.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("worker http://{victim_addr} stopped answering")),
        "says which worker it ran around: {stderr}"
    );
    let got = sorted_lines(rows(&read_parquet(&p.path("out/qa.parquet")).await));
    assert_eq!(got, expected, "the single process's rows");
    // Paid twice at most: what was on the wire at the kill. The answers the dead worker had
    // received are in the coordinator's cache, and the workers left finished the calls they
    // had on the wire although their statement was dropped. One more is allowed: an answer
    // the server had sent (no longer on its wire) that the frozen worker had not yet passed
    // to the coordinator (none in 28 runs, but a busy machine widens that window).
    let sent = server.stats().requests;
    eprintln!("killed with {on_the_wire} on the wire: the run sent {sent} for {prompts} prompts");
    assert!(
        sent <= prompts + on_the_wire + 1,
        "sent {sent} for {prompts} prompts ({on_the_wire} on the wire at the kill)"
    );

    // Back on its address, it is used again: the next run finds every answer and sends nothing.
    workers.insert(1, WorkerProcess::spawn(&p, ".sluice/w2", &victim_addr));
    server.reset_stats();
    std::fs::remove_file(p.path("out/qa.parquet")).unwrap();
    let rerun = p
        .command(&["-v", "run", "--workers", &worker_list(&workers), "q.sql"])
        .env("SLUICE_CLUSTER_KEY", KEY)
        .output()
        .unwrap();
    let rerun_err = String::from_utf8_lossy(&rerun.stderr).to_string();
    assert_eq!(rerun.status.code(), Some(0), "{rerun_err}");
    assert_eq!(server.stats().requests, 0, "{rerun_err}");

    // Stopped by SIGTERM: each exits 0, and no log shows the key; the one that came back took
    // part in the last run.
    for (i, w) in workers.into_iter().enumerate() {
        let (code, log) = w.terminate();
        assert_eq!(code, 0, "{log}");
        assert!(log.contains("stopped"), "{log}");
        assert!(!log.contains(KEY), "a worker logged the key: {log}");
        if i == 1 {
            assert!(
                log.contains("starts here"),
                "the returned worker ran tasks: {log}"
            );
        }
    }
}

/// The flagship as a query whose rows come back to the program (no COPY), reading `data`.
fn flagship_query(data: &Path) -> String {
    let text = flagship_sql(data, Path::new("unused.parquet"));
    let copy = text.find("COPY (").unwrap();
    let to = text.find(") TO ").unwrap();
    format!("{}{}", &text[..copy], &text[copy + "COPY (".len()..to])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_programs_last_query_is_run_around_a_killed_worker() {
    // What the Python package runs (`run_script_rows`): the rows come back to the program.
    let concurrency = 12;
    let (server, expected) = server_and_rows_alone(concurrency).await;

    let p = cluster_project(&server.base_url(), concurrency);
    let mut workers = spawn_workers(&p, 3);
    let text = std::fs::read_to_string(p.path("sluice.toml")).unwrap();
    let key = |k: &str| (k == "SLUICE_CLUSTER_KEY").then(|| KEY.to_string());
    let mut config = Config::parse(&text, &p.path("sluice.toml"), &key).unwrap();
    config.udf_dir = p.path("udfs");
    config.cache.dir = p.path(".sluice/coordinator");
    let list: Vec<String> = workers.iter().map(|w| w.url()).collect();
    let list: Vec<&str> = list.iter().map(String::as_str).collect();
    config.cluster.workers = sluice::config::ClusterConfig::parse_workers(&list).unwrap();
    let engine = Arc::new(sluice::Engine::new(&config).unwrap());
    let sql = flagship_query(&p.path("data/t.jsonl"));
    // A statement's future holds writers that stay on one thread, so it runs on its own (as
    // the Python package runs it).
    let run = {
        let engine = engine.clone();
        let rt = tokio::runtime::Handle::current();
        std::thread::spawn(move || rt.block_on(engine.run_script_rows(&sql, "<sql>")))
    };
    wait_until("20 answers", || {
        assert!(!run.is_finished(), "finished before the kill");
        server.stats().ok >= 20
    })
    .await;
    let mut victim = workers.remove(1);
    victim.kill();
    let got = tokio::task::spawn_blocking(move || run.join().unwrap())
        .await
        .unwrap()
        .expect("the query runs around the dead worker");
    let got = got.expect("a query's rows");
    assert_eq!(sorted_lines(rows(&got.batches)), expected);
    for w in workers {
        let (code, log) = w.terminate();
        assert_eq!(code, 0, "{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_worker_gone_the_statement_fails_in_one_line_naming_them() {
    let server = mock(MockConfig {
        latency: std::time::Duration::from_millis(150),
        api_key: Some(KEY.to_string()),
        ..MockConfig::default()
    })
    .await;
    let p = cluster_project(&server.base_url(), 8);
    let mut workers = spawn_workers(&p, 2);
    let all = worker_list(&workers);
    let coordinator = spawn_run(&p, &all);
    wait_until("10 answers", || server.stats().ok >= 10).await;
    for w in &mut workers {
        w.kill();
    }
    let out = coordinator.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    for w in &workers {
        assert!(errors[0].contains(&w.url()), "names {}: {stderr}", w.url());
    }
    assert!(!p.path("out/qa.parquet").exists(), "no output file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_the_stages_and_where_llm_nodes_run_and_sends_nothing() {
    let server = mock(MockConfig::default()).await;
    let workers = three_workers(&server.base_url(), 48).await;
    let cache = tempfile::tempdir().unwrap();
    let c = coordinator_config(&server.base_url(), &urls(&workers), 48, cache.path());
    let engine = sluice::Engine::for_estimates(&c).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let x = engine
        .explain_script(
            &flagship_sql(&excerpts(), &dir.path().join("qa.parquet")),
            "q.sql",
        )
        .await
        .unwrap();
    let copy = &x.statements[3];
    let stages = copy.stages.as_deref().expect("the COPY has stages");
    assert!(stages.contains("Stage 1 ── tasks=3"), "{stages}");
    assert!(
        stages.contains("LlmExec: calls=[answer_question]"),
        "{stages}"
    );
    assert!(
        stages.contains("LlmExec: calls=[generate_questions]"),
        "{stages}"
    );
    for w in &workers {
        assert!(stages.contains(w.url.as_str()), "{stages}");
    }
    // The LLM nodes sit in the workers' stage, below the coordinator's network boundary.
    let head_end = stages.find("Stage 1 ──").unwrap();
    assert!(!stages[..head_end].contains("LlmExec"), "{stages}");
    assert!(x.to_text(true).contains(": ┌───── DistributedExec"));
    assert_eq!(server.stats().requests, 0, "explain calls no model");
    assert!(workers.iter().all(|w| w.host.requests() == 0));
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_read_s3_themselves_and_one_that_cannot_is_named_with_the_location() {
    use object_store::ObjectStoreExt;
    let moto = support::s3::Moto::start();
    moto.create_bucket("corpus").await;
    let bytes = std::fs::read(excerpts()).unwrap();
    moto.store("corpus")
        .put(&"transcripts/excerpts.jsonl".into(), bytes.into())
        .await
        .unwrap();
    // A server that refuses every key: what a worker without access to the bucket meets.
    let strict = support::s3::Moto::start_with_auth();
    let server = mock(MockConfig {
        api_key: Some(KEY.to_string()),
        ..MockConfig::default()
    })
    .await;
    let p = cluster_project(&server.base_url(), 12);
    p.write(
        "q.sql",
        &project_flagship_sql("out/qa.parquet").replace("'data/'", "'s3://corpus/transcripts/'"),
    );
    let mut workers = vec![
        WorkerProcess::spawn_env(&p, ".sluice/w1", "127.0.0.1:0", &moto.env()),
        WorkerProcess::spawn_env(&p, ".sluice/w2", "127.0.0.1:0", &strict.env()),
        WorkerProcess::spawn_env(&p, ".sluice/w3", "127.0.0.1:0", &moto.env()),
    ];
    let coordinator = |ws: &[WorkerProcess]| {
        p.command(&["run", "--workers", &worker_list(ws), "q.sql"])
            .env("SLUICE_CLUSTER_KEY", KEY)
            .envs(moto.env().iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap()
    };
    let out = coordinator(&workers);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert!(
        errors[0].contains(&format!("worker {}", workers[1].addr)),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].contains("transcripts/excerpts.jsonl"),
        "{}",
        errors[0]
    );
    assert!(!p.path("out/qa.parquet").exists());

    // Given access, the same worker reads its ranges and the cluster writes the flagship.
    let bad = workers.remove(1);
    let addr = bad.addr.clone();
    bad.terminate();
    workers.insert(
        1,
        WorkerProcess::spawn_env(&p, ".sluice/w2", &addr, &moto.env()),
    );
    let out = coordinator(&workers);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let batches = read_parquet(&p.path("out/qa.parquet")).await;
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 42);
    for w in workers {
        w.terminate();
    }
}

#[cfg(feature = "local")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_model_file_refuses_naming_it() {
    let models = tempfile::tempdir().unwrap();
    let gguf = models.path().join("SmolLM2-135M-Instruct-Q8_0.gguf");
    let local = move |cache: &Path| {
        let text = format!(
            "[cache]\nenabled = false\n\n[models.default]\nkind = \"local\"\nmodel = \"{}\"\n",
            gguf.display()
        );
        let mut c = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
        c.udf_dir = repo().join("udfs");
        c.cache.dir = cache.to_path_buf();
        c
    };
    let make = local.clone();
    let worker = start_worker_with(move |cache| make(cache)).await;
    let scratch = tempfile::tempdir().unwrap();
    let mut c = local(scratch.path());
    c.cluster.workers =
        sluice::config::ClusterConfig::parse_workers(&[worker.url.as_str()]).unwrap();
    let engine = sluice::Engine::new(&c).unwrap();
    let err = flagship_error(&engine).await;
    assert!(err.contains("not found on this worker"), "{err}");
    assert!(
        err.contains(worker.url.trim_start_matches("http://")),
        "{err}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_budget_is_the_clusters_and_stops_every_worker() {
    let server = mock(MockConfig::default()).await;
    let workers = three_workers(&server.base_url(), 48).await;
    let cache = tempfile::tempdir().unwrap();
    let mut c = coordinator_config(&server.base_url(), &urls(&workers), 48, cache.path());
    // The flagship needs ~50,000 tokens; the cluster may spend 3,000.
    c.dispatcher.budget_tokens = Some(3_000);
    let engine = sluice::Engine::new(&c).unwrap();
    let (kind, err) = flagship_failure(&engine).await;
    assert!(
        err.contains("token budget of 3000 on the cluster reached"),
        "{err}"
    );
    assert!(!err.contains("sluice-stop"), "{err}");
    // A worker's budget refusal reaches the coordinator as a budget stop (exit code 3).
    assert_eq!(kind, sluice::engine::StatementErrorKind::Budget, "{err}");
    let sent: u64 = workers.iter().map(|w| w.host.requests()).sum();
    assert!(
        sent < 56,
        "the budget stopped the run early: {sent} requests"
    );
    let m = engine.metrics();
    assert!(
        m.tokens_in + m.tokens_out <= 3_000,
        "the cluster spent {} + {} tokens of 3,000",
        m.tokens_in,
        m.tokens_out
    );
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_reads_more_spends_more_of_the_clusters_budget() {
    // Two GPU boxes; the second answers nothing until most rows are done, so the first reads
    // most of the input. A budget of 1.25 times what the whole run spends is enough for the
    // cluster, but not for a fixed half of it per worker.
    let fast = mock(MockConfig::default()).await;
    let slow = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let rows = 400;
    let out = dir.path().join("out.parquet");
    let sql = questions_per_passage(dir.path(), rows, &out);
    let mut alone = own_server_config(&fast.base_url(), &dir.path().join("alone"), 4);
    alone.cache.enabled = false;
    let alone = sluice::Engine::new(&alone).unwrap();
    run(&alone, &sql).await.unwrap();
    let whole = alone.metrics().tokens_in + alone.metrics().tokens_out;
    std::fs::remove_file(&out).unwrap();
    fast.reset_stats();

    slow.hold();
    let w_fast = start_worker_with(|c| own_server_config(&fast.base_url(), c, 4)).await;
    let w_slow = start_worker_with(|c| own_server_config(&slow.base_url(), c, 4)).await;
    let mut config = own_server_config(&fast.base_url(), &dir.path().join("cache"), 4);
    config.cluster.workers =
        sluice::config::ClusterConfig::parse_workers(&[&w_fast.url, &w_slow.url]).unwrap();
    let budget = whole * 5 / 4;
    config.dispatcher.budget_tokens = Some(budget);
    let engine = sluice::Engine::new(&config).unwrap();
    let statement = run(&engine, &sql);
    tokio::pin!(statement);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while fast.stats().requests < rows * 3 / 4 {
        assert!(std::time::Instant::now() < deadline, "{:?}", fast.stats());
        let tick = tokio::time::sleep(std::time::Duration::from_millis(20));
        tokio::select! {
            r = &mut statement => panic!("ended before the second worker answered: {r:?}"),
            () = tick => {}
        }
    }
    slow.release();
    let printed = statement.await.unwrap();
    assert!(printed.contains(&format!("COPY {rows} rows")), "{printed}");
    let (f, s) = (fast.stats().requests, slow.stats().requests);
    assert_eq!(f + s, rows, "every row asked once: {f} + {s}");
    let m = engine.metrics();
    let spent = m.tokens_in + m.tokens_out;
    assert_eq!(spent, whole, "the cluster spent what one process does");
    assert!(
        spent * f / rows > budget / 2,
        "the first worker spent more than half the budget: {f} of {rows} rows"
    );
    w_fast.stop().await;
    w_slow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tables_bad_rows_option_reaches_the_workers_that_read_it() {
    let server = mock(MockConfig::default()).await;
    let workers = three_workers(&server.base_url(), 48).await;
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(excerpts()).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.insert(4, "{\"ticker\": \"CSTE\", \"q\": broken".into());
    lines.insert(11, "[1, 2, 3]".into());
    let data = dir.path().join("t.jsonl");
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("qa.parquet");
    let sql = |mode: &str| {
        flagship_sql(&data, &out).replace(
            &format!("LOCATION '{}';", data.display()),
            &format!(
                "LOCATION '{}' OPTIONS ('bad_rows' '{mode}');",
                data.display()
            ),
        )
    };
    assert!(sql("skip").contains("OPTIONS ('bad_rows' 'skip')"));

    // With skip, every worker leaves the two lines out (in the default fail mode a worker
    // would stop at the first): the flagship's 42 rows.
    let engine = coordinator(&server.base_url(), &urls(&workers), 48);
    let printed = run(&engine, &sql("skip")).await.unwrap();
    assert!(printed.contains("COPY 42 rows"), "{printed}");
    stop_all(workers).await;
}

/// A script over `rows` distinct passages written in `dir`: three questions per passage, to
/// the Parquet file `out`.
fn questions_per_passage(dir: &Path, rows: u64, out: &Path) -> String {
    let data = dir.join("t.jsonl");
    let lines: Vec<String> = (0..rows)
        .map(|i| format!("{{\"p\": \"Passage {i}: revenue grew by {i} percent.\"}}"))
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    format!(
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION '{}';\n\
         COPY (SELECT p, generate_questions('ACME', 'Q1', '2024-01-01', p) AS q FROM t) \
         TO '{}' STORED AS PARQUET;",
        data.display(),
        out.display()
    )
}

/// A worker whose model is its own server (`per_worker = true`), `concurrency` in flight.
fn own_server_config(base_url: &str, cache_dir: &Path, concurrency: usize) -> Config {
    let text = config_text(base_url, 4, concurrency).replace(
        "timeout_ms = 2000\n",
        &format!("timeout_ms = 30000\nconcurrency = {concurrency}\nper_worker = true\n"),
    );
    let mut c = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
    c.udf_dir = repo().join("udfs");
    c.cache.dir = cache_dir.to_path_buf();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn input_goes_to_the_worker_whose_calls_finish_and_the_output_is_whole() {
    // Two GPU boxes, each a worker with its own server; the second answers nothing until the
    // test releases it, so it is slower than any timing could make it.
    let fast = mock(MockConfig::default()).await;
    let slow = mock(MockConfig::default()).await;
    slow.hold();
    let w_fast = start_worker_with(|c| own_server_config(&fast.base_url(), c, 4)).await;
    let w_slow = start_worker_with(|c| own_server_config(&slow.base_url(), c, 4)).await;
    let dir = tempfile::tempdir().unwrap();
    let rows = 1000;
    let out = dir.path().join("out.parquet");
    let sql = questions_per_passage(dir.path(), rows, &out);
    let mut config = own_server_config(&fast.base_url(), &dir.path().join("cache"), 4);
    config.cluster.workers =
        sluice::config::ClusterConfig::parse_workers(&[&w_fast.url, &w_slow.url]).unwrap();
    let engine = sluice::Engine::new(&config).unwrap();
    // The held worker keeps what it asked for before its calls stalled: its two LLM streams'
    // read-ahead (2 x (2 x 4 + 16) rows) and a few chunks of about 30 rows. A fixed half each
    // would leave the other worker at 500.
    let most_held = 300;
    let (result, ()) = tokio::join!(run(&engine, &sql), async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while fast.stats().requests < rows - most_held {
            assert!(
                std::time::Instant::now() < deadline,
                "the worker that answers read only {} rows of {rows}",
                fast.stats().requests
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        slow.release();
    });
    let printed = result.unwrap();
    assert!(printed.contains(&format!("COPY {rows} rows")), "{printed}");
    let (f, s) = (fast.stats().requests, slow.stats().requests);
    assert_eq!(f + s, rows, "every row asked once: {f} + {s}");
    assert!(s > 0, "the held worker answered what it had taken");
    let written = sorted_rows(&read_parquet(&out).await);
    assert_eq!(written.len(), rows as usize);
    assert_eq!(
        engine.metrics().requests,
        rows,
        "the coordinator counts both"
    );
    w_fast.stop().await;
    w_slow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_models_limit_is_learned_once_for_the_cluster_at_the_coordinator() {
    // The provider serves 6 requests at once and refuses the rest without saying why; the
    // cluster is configured for 48.
    let cap = 6;
    let server = mock(MockConfig {
        latency: std::time::Duration::from_millis(20),
        retry_after_ms: 20,
        limits: Limits {
            max_in_flight: Some(cap),
            ..Limits::default()
        },
        ..MockConfig::default()
    })
    .await;
    let workers = three_workers(&server.base_url(), 48).await;
    let engine = coordinator(&server.base_url(), &urls(&workers), 48);
    let dir = tempfile::tempdir().unwrap();
    let rows = 300;
    let out = dir.path().join("out.parquet");
    let sql = questions_per_passage(dir.path(), rows, &out);
    let printed = run(&engine, &sql).await.unwrap();
    assert!(printed.contains(&format!("COPY {rows} rows")), "{printed}");
    let stats = server.stats();
    let refused = stats.faults.get("over_concurrency").copied().unwrap_or(0);
    assert_eq!(stats.requests, rows + refused, "{stats:?}");
    // Every worker's request was admitted by the coordinator's governor, which saw the
    // refusals of all of them and learned the limit itself: one learner for the cluster (on
    // a busy machine the refusals may read as a rate rather than a cap; either way it is the
    // coordinator's governor that learned it).
    let model = &engine.metrics().models["default"];
    assert!(model.saturations > 0, "{model:?} after {refused} refusals");
    match model.kind {
        Some(sluice::llm::LimitKind::Cap) => assert!(model.limit <= cap as usize, "{model:?}"),
        Some(sluice::llm::LimitKind::Rate) => assert!(model.pace_rps.is_some(), "{model:?}"),
        None => panic!("the coordinator learned nothing: {model:?} after {refused} refusals"),
    }
    stop_all(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_mode_model_on_a_cluster_collects_each_workers_rows_in_few_files() {
    // Rows handed to a batch queue count as sent: a worker keeps asking for input while its
    // queue collects, instead of one chunk per job.
    let server = mock(MockConfig::default()).await;
    let batch = |base: &str, cache: &Path| {
        let text = config_text(base, 2, 16)
            + "mode = \"batch\"\n\n[models.default.batch]\npoll_ms = 20\ncollect_ms = 300\n";
        let mut c = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
        c.udf_dir = repo().join("udfs");
        c.cache.dir = cache.to_path_buf();
        c
    };
    let base = server.base_url();
    let a = start_worker_with(|c| batch(&base, c)).await;
    let b = start_worker_with(|c| batch(&base, c)).await;
    let dir = tempfile::tempdir().unwrap();
    let rows = 300;
    let out = dir.path().join("out.parquet");
    let sql = questions_per_passage(dir.path(), rows, &out);
    let mut config = batch(&base, &dir.path().join("cache"));
    config.cluster.workers =
        sluice::config::ClusterConfig::parse_workers(&[&a.url, &b.url]).unwrap();
    let engine = sluice::Engine::new(&config).unwrap();
    let printed = run(&engine, &sql).await.unwrap();
    assert!(printed.contains(&format!("COPY {rows} rows")), "{printed}");
    let st = server.stats();
    assert_eq!((st.requests, st.batch_lines), (0, rows), "{st:?}");
    // The input is cut into more than a dozen chunks; each worker's rows go in one or two
    // files (a collect window may close before the last chunk arrives).
    let jobs = server.batches().len();
    assert!(jobs <= 4, "{jobs} batch jobs for {rows} rows on 2 workers");
    a.stop().await;
    b.stop().await;
}
