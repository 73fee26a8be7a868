//! A model served by several replicas, over real HTTP: the flagship spread over three mock
//! servers gives the rows one server gives; a replica that dies mid-run, or answers 503 to
//! everything, is ejected and its work goes to the others without losing a row or spending a
//! row's attempts; with every replica down the statement fails with one error naming them;
//! each replica receives only its own key; the cache does not depend on the replicas.

mod support;

use std::path::Path;
use std::time::Duration;

use sluice::Engine;
use sluice::config::Config;
use support::*;

fn excerpts() -> std::path::PathBuf {
    shared_data("earnings_transcript_excerpts.jsonl")
}

/// sluice.toml text with the `default` model served by `servers` (a TOML value for
/// `base_url`, or `replicas = [...]` when it starts with `replicas`).
fn config_text(servers: &str, max_attempts: u32, cache: Option<&Path>) -> String {
    let servers = if servers.starts_with("replicas") {
        servers.to_string()
    } else {
        format!("base_url = {servers}")
    };
    let cache = match cache {
        Some(dir) => format!("dir = \"{}\"", dir.display()),
        None => "enabled = false".to_string(),
    };
    format!(
        "[dispatcher]\nconcurrency = 16\nmax_attempts = {max_attempts}\n\
         backoff_base_ms = 2\nbackoff_max_ms = 50\n\n[cache]\n{cache}\n\n\
         [models.default]\nkind = \"openai\"\n{servers}\nmodel = \"mock\"\n\
         timeout_ms = 5000\n"
    )
}

/// The engine of [`config_text`] with the repository's functions; `env` reads keys.
fn engine(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Engine {
    let mut c = Config::parse(text, Path::new("sluice.toml"), env).expect("config parses");
    c.udf_dir = repo().join("udfs");
    Engine::new(&c).expect("engine starts")
}

/// `["url1", "url2", ...]`.
fn url_list(servers: &[&MockServer]) -> String {
    let urls: Vec<String> = servers
        .iter()
        .map(|s| format!("\"{}\"", s.base_url()))
        .collect();
    format!("[{}]", urls.join(", "))
}

fn latency(ms: u64) -> MockConfig {
    MockConfig {
        latency: Duration::from_millis(ms),
        ..MockConfig::default()
    }
}

/// Runs the flagship into a fresh directory; returns what it printed and its sorted rows.
async fn flagship(engine: &Engine) -> (Result<String, String>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qa.parquet");
    let printed = run(engine, &flagship_sql(&excerpts(), &out)).await;
    let rows = if printed.is_ok() {
        sorted_rows(&read_parquet(&out).await)
    } else {
        vec![]
    };
    (printed, rows)
}

/// Runs the flagship on `e` and checks that it lost nothing: 42 rows written, 56 calls and no
/// failed one; the run's metrics.
async fn flagship_loses_nothing(e: &Engine) -> sluice::llm::MetricsSnapshot {
    let (printed, got) = flagship(e).await;
    assert!(printed.unwrap().contains("COPY 42 rows"));
    assert_eq!(got.len(), 42);
    let m = e.metrics();
    assert_eq!((m.calls, m.failed), (56, 0), "{:?}", m.errors);
    m
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagship_over_three_replicas_matches_one_server_and_spreads_requests() {
    let single = mock(latency(5)).await;
    let one = engine(
        &config_text(&format!("\"{}\"", single.base_url()), 4, None),
        &|_| None,
    );
    let (printed, want) = flagship(&one).await;
    assert!(printed.unwrap().contains("COPY 42 rows"));

    let servers = [
        mock(latency(5)).await,
        mock(latency(5)).await,
        mock(latency(5)).await,
    ];
    let refs: Vec<&MockServer> = servers.iter().collect();
    let three = engine(&config_text(&url_list(&refs), 4, None), &|_| None);
    let (printed, got) = flagship(&three).await;
    assert!(printed.unwrap().contains("COPY 42 rows"));
    assert_eq!(got, want, "the same rows as over one server");

    let counts: Vec<u64> = servers.iter().map(|s| s.stats().requests).collect();
    assert_eq!(counts.iter().sum::<u64>(), 56, "{counts:?}");
    for c in &counts {
        assert!(*c * 5 >= 56, "each replica gets a fair share: {counts:?}");
    }
    let m = three.metrics();
    assert_eq!((m.calls, m.failed), (56, 0));
    let reps = &m.replicas["default"];
    assert_eq!(reps.len(), 3);
    for (r, s) in reps.iter().zip(&servers) {
        assert_eq!(r.url, s.base_url());
        assert_eq!((r.failures, r.ejections, r.state), (0, 0, "up"));
    }
    let json = m.to_json();
    assert_eq!(json["models"]["default"]["replicas"][1]["state"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_run_is_ejected_and_loses_nothing() {
    let servers = [
        mock(latency(20)).await,
        mock(latency(20)).await,
        mock(latency(20)).await,
    ];
    let refs: Vec<&MockServer> = servers.iter().collect();
    // One attempt per row: a failure counted against a row would fail it.
    let e = engine(&config_text(&url_list(&refs), 1, None), &|_| None);
    let victim = &servers[1];
    let kill = async {
        wait_until("the victim serves", || victim.stats().requests >= 5).await;
        victim.stop();
    };
    let ((printed, got), ()) = tokio::join!(flagship(&e), kill);
    assert!(printed.unwrap().contains("COPY 42 rows"));
    assert_eq!(got.len(), 42);
    let m = e.metrics();
    assert_eq!((m.calls, m.failed), (56, 0), "{:?}", m.errors);
    assert!(
        m.retries.is_empty(),
        "no row spent an attempt: {:?}",
        m.retries
    );
    let r = &m.replicas["default"][1];
    assert!(r.ejections >= 1 && r.failures >= 1, "{r:?}");
    assert_eq!(r.state, "ejected");
    assert_eq!(m.replicas["default"][0].state, "up");
    // The summary names it.
    let summary = sluice::cli::format_summary(&m);
    let line = format!("model default replica 1 ({}):", victim.base_url());
    let line = summary
        .lines()
        .find(|l| l.contains(&line))
        .expect("a line per replica");
    assert!(line.ends_with(", ejected"), "{line}");
    let json = m.to_json();
    assert_eq!(json["models"]["default"]["replicas"][1]["state"], "ejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answering_503_to_everything_is_routed_around() {
    let broken = MockConfig {
        faults: FaultRates {
            server_503: 1.0,
            ..FaultRates::default()
        },
        ..latency(5)
    };
    let servers = [
        mock(latency(5)).await,
        mock(broken).await,
        mock(latency(5)).await,
    ];
    let refs: Vec<&MockServer> = servers.iter().collect();
    let e = engine(&config_text(&url_list(&refs), 1, None), &|_| None);
    let m = flagship_loses_nothing(&e).await;
    let r = &m.replicas["default"][1];
    assert!(r.ejections >= 1, "{r:?}");
    assert_eq!(r.requests, r.failures, "{r:?}");
    assert_eq!(servers[1].stats().ok, 0);
    assert_eq!(
        servers[0].stats().ok + servers[2].stats().ok,
        56,
        "every prompt answered by the healthy replicas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_down_fails_the_statement_with_one_error_naming_them() {
    let servers = [
        mock(MockConfig::default()).await,
        mock(MockConfig::default()).await,
    ];
    let refs: Vec<&MockServer> = servers.iter().collect();
    let e = engine(&config_text(&url_list(&refs), 4, None), &|_| None);
    for s in &servers {
        s.stop();
    }
    let (printed, _) = flagship(&e).await;
    let err = printed.expect_err("the statement fails");
    assert!(
        err.contains("every replica of model \"default\" is down"),
        "{err}"
    );
    for s in &servers {
        assert!(err.contains(&s.base_url()), "{err}");
    }
    let m = e.metrics();
    assert!(m.replicas["default"].iter().all(|r| r.state == "ejected"));
    // Each replica is ejected once: the calls fail as soon as every replica is out, not after
    // their retries (which would reach the probes).
    assert!(
        m.replicas["default"].iter().all(|r| r.ejections == 1),
        "{:?}",
        m.replicas
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_replica_receives_only_its_own_key() {
    let keyed = |key: &str| MockConfig {
        api_key: Some(key.to_string()),
        ..latency(5)
    };
    let a = mock(keyed("key-of-a")).await;
    let b = mock(keyed("key-of-b")).await;
    let servers = format!(
        "replicas = [{{ base_url = \"{}\", api_key_env = \"KEY_A\" }}, \
         {{ base_url = \"{}\", api_key_env = \"KEY_B\" }}]",
        a.base_url(),
        b.base_url()
    );
    let env = |var: &str| match var {
        "KEY_A" => Some("key-of-a".to_string()),
        "KEY_B" => Some("key-of-b".to_string()),
        _ => None,
    };
    let e = engine(&config_text(&servers, 1, None), &env);
    let (printed, got) = flagship(&e).await;
    // A wrong key is answered 401, which fails the statement.
    assert!(printed.unwrap().contains("COPY 42 rows"));
    assert_eq!(got.len(), 42);
    let (sa, sb) = (a.stats(), b.stats());
    assert!(sa.requests > 0 && sb.requests > 0, "{sa:?} {sb:?}");
    assert_eq!(sa.ok + sb.ok, 56);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_does_not_depend_on_which_replicas_serve() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let first = [mock(latency(2)).await, mock(latency(2)).await];
    let refs: Vec<&MockServer> = first.iter().collect();
    let (printed, want) = {
        let e = engine(&config_text(&url_list(&refs), 4, Some(&cache)), &|_| None);
        flagship(&e).await
    };
    assert!(printed.unwrap().contains("COPY 42 rows"));
    // Other servers, one more of them: every answer comes from the cache.
    let other = [
        mock(latency(2)).await,
        mock(latency(2)).await,
        mock(latency(2)).await,
    ];
    let refs: Vec<&MockServer> = other.iter().collect();
    let e = engine(&config_text(&url_list(&refs), 4, Some(&cache)), &|_| None);
    let (printed, got) = flagship(&e).await;
    assert!(printed.unwrap().contains("COPY 42 rows"));
    assert_eq!(got, want);
    assert_eq!(e.metrics().cache_hits, 56);
    assert!(other.iter().all(|s| s.stats().requests == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_replica_is_ejected_after_its_timeouts() {
    let hangs = MockConfig {
        faults: FaultRates {
            timeout: 1.0,
            ..FaultRates::default()
        },
        hang: Duration::from_secs(30),
        ..latency(5)
    };
    let servers = [
        mock(latency(5)).await,
        mock(latency(5)).await,
        mock(hangs).await,
    ];
    let refs: Vec<&MockServer> = servers.iter().collect();
    // Hedging off: the hung requests end by the timeout alone.
    let text = config_text(&url_list(&refs), 1, None)
        .replace("timeout_ms = 5000", "timeout_ms = 300")
        .replace(
            "backoff_max_ms = 50",
            "backoff_max_ms = 50\nhedge_after_ms = 0",
        );
    let e = engine(&text, &|_| None);
    let m = flagship_loses_nothing(&e).await;
    let r = &m.replicas["default"][2];
    assert!(r.ejections >= 1 && r.failures >= 3, "{r:?}");
    assert_eq!(servers[2].stats().ok, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_prompts_go_around_a_dead_replica() {
    let servers = [
        mock(latency(5)).await,
        mock(latency(5)).await,
        mock(latency(5)).await,
    ];
    servers[0].stop();
    let refs: Vec<&MockServer> = servers.iter().collect();
    let text = config_text(&url_list(&refs), 1, None).replace(
        "kind = \"openai\"",
        "kind = \"openai_completions\"\nprompts_per_request = 4",
    );
    let e = engine(&text, &|_| None);
    let m = flagship_loses_nothing(&e).await;
    assert_eq!(m.replicas["default"][0].state, "ejected");
    let prompts: u64 = servers[1..].iter().map(|s| s.stats().ok).sum();
    assert_eq!(prompts, 56);
    assert!(
        servers[1..].iter().all(|s| s.stats().requests < 56),
        "lists of several"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_replica_is_probed_back_once_it_answers() {
    let a = mock(latency(5)).await;
    let b = mock(latency(5)).await;
    let port = b.addr().port();
    let e = engine(&config_text(&url_list(&[&a, &b]), 1, None), &|_| None);
    b.stop();
    let (printed, _) = flagship(&e).await;
    assert!(printed.unwrap().contains("COPY 42 rows"));
    assert_eq!(e.metrics().replicas["default"][1].state, "ejected");
    drop(b);
    // The server comes back on its address; statements keep coming until one probes it.
    let back = MockServer::start_on(latency(5), port)
        .await
        .expect("the port is free again");
    let deadline = std::time::Instant::now() + WAIT_DEADLINE;
    let mut i = 0;
    while back.stats().ok == 0 {
        assert!(std::time::Instant::now() < deadline, "never probed");
        i += 1;
        let sql = format!("SELECT llm('probe {i} ' || x) FROM (VALUES ('a'), ('b')) AS t(x)");
        run(&e, &sql).await.expect("the statement runs");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = &e.metrics().replicas["default"][1];
    assert_eq!(r.state, "up", "{r:?}");
    assert_eq!(e.metrics().failed, 0);
}

#[test]
fn replica_forms_are_checked_in_one_place() {
    let parse = |servers: &str, extra: &str| {
        let text = format!("{}{extra}", config_text(servers, 2, None));
        Config::parse(&text, Path::new("sluice.toml"), &|v| {
            (v == "K").then(|| "secret".to_string())
        })
        .map_err(|e| e.to_string())
    };
    let c = parse("[\"http://a:1/v1\", \"http://b:2/v1/\"]", "").unwrap();
    let s = c.models["default"].server().unwrap().clone();
    let urls: Vec<&str> = s.replicas.iter().map(|r| r.base_url.as_str()).collect();
    assert_eq!(urls, ["http://a:1/v1", "http://b:2/v1"]);
    assert_eq!(s.endpoint_id, "replicas:default");
    // One URL, as a string or a list of one, keeps its own identity.
    let one = parse("[\"http://a:1/v1\"]", "").unwrap();
    assert_eq!(
        one.models["default"].server().unwrap().endpoint_id,
        "http://a:1/v1"
    );
    // A replica's own key variable; the model's for those that name none.
    let c = parse(
        "replicas = [{ base_url = \"http://a:1/v1\", api_key_env = \"K\" }, \
         { base_url = \"http://b:2/v1\" }]",
        "",
    )
    .unwrap();
    let s = c.models["default"].server().unwrap();
    assert!(s.replicas[0].api_key.is_some() && s.replicas[1].api_key.is_none());
    let b = s.replica(1).unwrap();
    assert!(b.api_key.is_none() && b.replicas.iter().all(|r| r.api_key.is_none()));

    // `--batch` leaves a model with several servers live.
    let mut c = parse("[\"http://a:1/v1\", \"http://b:2/v1\"]", "").unwrap();
    assert!(!c.models["default"].supports_batch());
    assert_eq!(c.use_batch_mode(), ["default"]);

    for (servers, extra, says) in [
        ("[]", "", "empty"),
        ("5", "", "a URL, or a list"),
        ("[\"http://a:1/v1\", \"http://a:1/v1\"]", "", "listed twice"),
        ("[\"http://a:1/v1\", \"ftp://b/v1\"]", "", "http://"),
        (
            "[\"http://a:1/v1\", \"http://b:2/v1\"]",
            "mode = \"batch\"\n",
            "batch",
        ),
        (
            "replicas = [{ base_url = \"http://a:1/v1\", api_key_env = \"MISSING\" }]",
            "",
            "MISSING",
        ),
        (
            "\"http://a:1/v1\"\nreplicas = [{ base_url = \"http://b:1/v1\" }]",
            "",
            "not both",
        ),
    ] {
        let err = parse(servers, extra).expect_err(servers);
        assert!(err.contains(says), "{servers}: {err}");
        assert!(!err.contains("secret"), "{err}");
    }
}
