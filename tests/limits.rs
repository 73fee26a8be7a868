//! Providers that rate-limit (issue 15), over real HTTP against the test server's limits: a
//! cap on requests in flight, request and token buckets with and without `x-ratelimit-*`
//! headers, odd Retry-After values, and hung requests that are hedged. Every test checks that
//! no row is lost and counts what the server refused; speed is measured in `benches/`.

mod support;

use std::path::Path;
use std::time::Duration;

use sluice::config::Config;
use sluice::llm::LimitKind;
use support::*;

const TAG: &str = r#"
name = "tag"
args = ["x"]
prompt = "Tag {{ x }}"
"#;

/// An engine with `tag` against `server`: concurrency 16, fast retries, `extra` appended to
/// `[dispatcher]`.
fn engine(server: &MockServer, dispatcher_extra: &str) -> sluice::Engine {
    let text = format!(
        "[dispatcher]\nconcurrency = 16\nmax_attempts = 20\nbackoff_base_ms = 5\n\
         backoff_max_ms = 200\ndeadline_ms = 60000\n{dispatcher_extra}\n[cache]\nenabled = false\n\n\
         [models.default]\nkind = \"openai\"\nbase_url = \"{}\"\nmodel = \"mock\"\n\
         timeout_ms = 30000\n",
        server.base_url()
    );
    let cfg = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
    let def = sluice::udf::def::FunctionDef::parse(TAG, Path::new("tag.toml")).unwrap();
    sluice::Engine::with_functions(&cfg, vec![def]).unwrap()
}

/// Tags `n` rows; checks every row got its own answer; returns the requests the server saw
/// and those it refused for its limits.
async fn tag_rows(server: &MockServer, engine: &sluice::Engine, n: usize) -> (u64, u64) {
    let sql = format!(
        "CREATE TABLE t AS SELECT CAST(value AS VARCHAR) AS x FROM range({n});\n\
         CREATE TABLE r AS SELECT x, tag(x) AS y FROM t;"
    );
    run(engine, &sql).await.expect("runs");
    let batches = engine.query("SELECT x, y FROM r").await.unwrap();
    let rows = ordered_rows(&batches);
    assert_eq!(rows.len(), n);
    for r in &rows {
        let (x, y) = r.split_once(" | ").unwrap();
        let h = prompt_hash(None, &format!("Tag {x}"));
        assert_eq!(y, format!("Answer [{h}]: the passage reports the figure."));
    }
    let stats = server.stats();
    let refused = ["over_concurrency", "over_rpm", "over_tpm"]
        .iter()
        .map(|k| stats.faults.get(*k).copied().unwrap_or(0))
        .sum();
    (stats.requests, refused)
}

fn limited(limits: Limits) -> MockConfig {
    MockConfig {
        latency: Duration::from_millis(10),
        retry_after_ms: 1000,
        limits,
        ..MockConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_cap_is_learned_after_one_round_trip() {
    let server = mock(limited(Limits {
        max_in_flight: Some(4),
        headers: false,
        ..Limits::default()
    }))
    .await;
    let e = engine(&server, "");
    let (requests, refused) = tag_rows(&server, &e, 400).await;
    // The first round trips send 16 and most are refused; then the governor stays under 4.
    assert!(refused <= 48, "{refused} refused of {requests}");
    assert_eq!(requests, 400 + refused);
    let m = e.metrics();
    let limit = m.models["default"].limit;
    assert!(
        (2..=4).contains(&limit),
        "limit {limit} for a cap of 4: {:?}",
        m.models
    );
    assert!(server.stats().max_in_flight <= 16);
    // A cap is kept by the in-flight ceiling alone: no pace that would bind below it.
    assert_eq!(m.models["default"].pace_rps, None, "{:?}", m.models);
    assert_eq!(
        m.models["default"].kind,
        Some(LimitKind::Cap),
        "{:?}",
        m.models
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertised_limits_are_paced_to_before_any_refusal() {
    // 6,000 a minute with a burst of 20: the first 16 fit, the headers say the rest.
    let server = mock(limited(Limits {
        rpm: Some(6000),
        burst_secs: 0.2,
        headers: true,
        ..Limits::default()
    }))
    .await;
    let e = engine(&server, "");
    let (requests, refused) = tag_rows(&server, &e, 200).await;
    assert!(refused <= 2, "{refused} refused of {requests}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unadvertised_rate_is_learned_and_no_row_is_lost() {
    let server = mock(limited(Limits {
        rpm: Some(6000),
        burst_secs: 0.2,
        headers: false,
        ..Limits::default()
    }))
    .await;
    let e = engine(&server, "");
    let (requests, refused) = tag_rows(&server, &e, 300).await;
    assert!(
        refused * 4 < requests,
        "{refused} refused of {requests}: the pace was not learned"
    );
    let m = e.metrics();
    assert_eq!(
        m.models["default"].kind,
        Some(LimitKind::Rate),
        "{:?}",
        m.models
    );
    let pace = m.models["default"].pace_rps.expect("a pace");
    assert!((50.0..=150.0).contains(&pace), "pace {pace:.0}/s for 100/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_retry_after_values_are_clamped_not_fatal() {
    for raw in ["1e20", "-3", "NaN", "soon", "Fri, 01 Jan 2100 00:00:00 GMT"] {
        let server = mock(MockConfig {
            faults: FaultRates {
                rate_limit: 0.3,
                ..FaultRates::default()
            },
            retry_after_raw: Some(raw.to_string()),
            ..MockConfig::default()
        })
        .await;
        let e = engine(&server, "");
        // Each retry waits at most backoff_max_ms (200 ms): the run ends, every row answered.
        let (requests, _) = tag_rows(&server, &e, 40).await;
        assert!(
            requests > 40,
            "{raw}: some requests were refused and retried"
        );
        assert_eq!(e.metrics().failed, 0, "{raw}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_request_whose_hedge_fails_is_retried_not_waited_for() {
    // The row "stuck": its first request hangs (ten minutes), its hedge gets a 503.
    let server = mock(MockConfig {
        scripted: vec![(
            "stuck".into(),
            vec![Some(Fault::Timeout), Some(Fault::Server503)],
        )],
        hang: Duration::from_secs(600),
        ..MockConfig::default()
    })
    .await;
    let e = engine(&server, "hedge_after_ms = 1000");
    run(
        &e,
        "CREATE TABLE r AS SELECT x, tag(x) AS y FROM (VALUES ('stuck'), ('a'), ('b')) AS t(x);",
    )
    .await
    .expect("runs");
    let rows = ordered_rows(&e.query("SELECT x, y FROM r").await.unwrap());
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let (x, y) = r.split_once(" | ").unwrap();
        let h = prompt_hash(None, &format!("Tag {x}"));
        assert_eq!(y, format!("Answer [{h}]: the passage reports the figure."));
    }
    let m = e.metrics();
    // The 503 of the hedge was the attempt's failure, retried at once after its backoff: the
    // hung request was dropped, not waited for until its 30 s timeout (a retry after a
    // timeout would be counted as one).
    assert_eq!((m.hedges, m.failed), (1, 0));
    assert_eq!(
        m.retries,
        [("server_error".to_string(), 1)].into_iter().collect(),
        "{:?}",
        m.retries
    );
    assert_eq!(
        server.stats().requests,
        5,
        "three for the stuck row, one each for the others"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_requests_are_hedged_and_answered_once() {
    let server = mock(MockConfig {
        latency: Duration::from_millis(5),
        faults: FaultRates {
            timeout: 0.01,
            ..FaultRates::default()
        },
        hang: Duration::from_secs(25),
        ..MockConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    // Hedged after a second: a loaded machine does not stretch a 5 ms answer that far, so the
    // 2% budget is left for the hung requests.
    let text = format!(
        "[dispatcher]\nconcurrency = 16\nhedge_after_ms = 1000\n[cache]\nenabled = true\n\
         dir = \"{}\"\n\n[models.default]\nkind = \"openai\"\nbase_url = \"{}\"\n\
         model = \"mock\"\ntimeout_ms = 30000\n",
        dir.path().display(),
        server.base_url()
    );
    let cfg = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
    let def = sluice::udf::def::FunctionDef::parse(TAG, Path::new("tag.toml")).unwrap();
    let e = sluice::Engine::with_functions(&cfg, vec![def]).unwrap();
    let (requests, _) = tag_rows(&server, &e, 500).await;
    let m = e.metrics();
    let hung = server.stats().faults.get("timeout").copied().unwrap_or(0);
    assert!(hung > 0, "the seed hangs some requests");
    // Each hung request was hedged (the hedge got an answer), within the 2% budget, and
    // nothing waited for a 25 s hang: one that did would have ended with the connection
    // closed and been sent again, one request more than the rows and their hedges.
    assert!(
        m.hedges >= hung && m.hedges <= 10,
        "{} hedges for {hung} hung",
        m.hedges
    );
    assert_eq!(requests, 500 + m.hedges, "no request was retried");
    assert_eq!(m.retries.values().sum::<u64>(), 0, "{:?}", m.retries);
    // One answer per call in the cache.
    e.flush_cache().await.unwrap();
    drop(e);
    let cache = sluice::cache::ResponseCache::open(&dir.path().join("")).unwrap();
    assert_eq!(cache.stats().unwrap().entries, 500);
}
