//! Each injected fault is retried and, when permanent, classified into its own error kind; the row
//! stays, with NULL and a typed error. Transient faults of every kind are absorbed.

mod support;

use std::path::Path;

use datafusion::arrow::array::{Array, AsArray};
use sluice::Engine;
use sluice::config::Config;
use sluice::udf::def::FunctionDef;
use support::*;

const TRIPLE: &str = r#"
name = "triple"
args = ["x"]
prompt = "Three about {{ x }}"
output = { type = "array", items = { type = "string" }, minItems = 3, maxItems = 3 }
"#;

fn engine(server: &MockServer, max_attempts: u32, timeout_ms: u64) -> Engine {
    let text = format!(
        "[dispatcher]\nconcurrency = 16\nmax_attempts = {max_attempts}\nbackoff_base_ms = 1\n\
         backoff_max_ms = 20\n[cache]\nenabled = false\n[models.default]\nkind = \"openai\"\nbase_url = \"{}\"\n\
         model = \"m\"\ntimeout_ms = {timeout_ms}\n",
        server.base_url()
    );
    let cfg = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
    let def = FunctionDef::parse(TRIPLE, Path::new("triple.toml")).unwrap();
    Engine::with_functions(&cfg, vec![def]).unwrap()
}

const FAULTS: [(Fault, &str); 9] = [
    (Fault::RateLimit, "rate_limited"),
    (Fault::Server500, "server_error"),
    (Fault::Server503, "server_error"),
    (Fault::Timeout, "timeout"),
    (Fault::DroppedConnection, "connection"),
    (Fault::MalformedJson, "malformed_response"),
    (Fault::TruncatedBody, "malformed_response"),
    (Fault::InvalidSchema, "invalid_output"),
    (Fault::FinishLength, "truncated"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_faults_get_their_own_error_kind() {
    let permanent = FAULTS
        .iter()
        .enumerate()
        .map(|(i, (f, _))| (format!("row{i}"), *f))
        .collect();
    let server = mock(MockConfig {
        permanent,
        hang: std::time::Duration::from_millis(1500),
        retry_after_ms: 1,
        ..MockConfig::default()
    })
    .await;
    let engine = engine(&server, 2, 300);
    let values: Vec<String> = (0..FAULTS.len() + 1)
        .map(|i| format!("('row{i}')"))
        .collect();
    let sql = format!(
        "CREATE TABLE t AS VALUES {};\n\
         CREATE TABLE r AS SELECT column1 AS x, triple(column1) AS v, triple_error(column1) AS e \
         FROM t;",
        values.join(", ")
    );
    run(&engine, &sql).await.unwrap();
    let batches = engine
        .query("SELECT x, v, e['kind'] AS kind, e['attempts'] AS attempts FROM r ORDER BY x")
        .await
        .unwrap();
    let mut seen = 0;
    for b in &batches {
        let x = b.column(0).as_string::<i32>();
        let v = b.column(1);
        let kind = b.column(2).as_string::<i32>();
        let attempts = b
            .column(3)
            .as_primitive::<datafusion::arrow::datatypes::UInt32Type>();
        for i in 0..b.num_rows() {
            let row: usize = x.value(i)[3..].parse().unwrap();
            seen += 1;
            if row == FAULTS.len() {
                assert!(v.is_valid(i) && kind.is_null(i), "the clean row succeeds");
                continue;
            }
            assert!(v.is_null(i), "row {row} has no value");
            assert_eq!(
                kind.value(i),
                FAULTS[row].1,
                "row {row}: {:?}",
                FAULTS[row].0
            );
            assert_eq!(attempts.value(i), 2, "row {row} was retried once");
        }
    }
    assert_eq!(seen, FAULTS.len() + 1, "no row lost");
    assert_eq!(server.stats().requests, 2 * FAULTS.len() as u64 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_of_every_kind_are_absorbed() {
    let server = mock(MockConfig {
        faults: FaultRates {
            rate_limit: 0.04,
            server_500: 0.03,
            server_503: 0.03,
            timeout: 0.02,
            dropped_connection: 0.03,
            malformed_json: 0.03,
            truncated_body: 0.03,
            invalid_schema: 0.03,
            finish_length: 0.03,
            wrong_count: 0.0,
        },
        hang: std::time::Duration::from_millis(800),
        retry_after_ms: 1,
        seed: 11,
        ..MockConfig::default()
    })
    .await;
    let engine = engine(&server, 12, 250);
    let sql = "CREATE TABLE t AS SELECT 'item ' || CAST(value AS VARCHAR) AS x FROM generate_series(1, 300);\n\
               CREATE TABLE r AS SELECT x, unnest(triple(x)) AS q FROM t;";
    run(&engine, sql).await.unwrap();
    let batches = engine
        .query("SELECT count(*) AS n, count(q) AS q FROM r")
        .await
        .unwrap();
    let n = batches[0]
        .column(0)
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
        .value(0);
    let q = batches[0]
        .column(1)
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
        .value(0);
    assert_eq!(
        (n, q),
        (900, 900),
        "every row answered, three questions each"
    );
    let stats = server.stats();
    let faults: u64 = stats.faults.values().sum();
    assert!(faults >= 30, "{stats:?}");
    assert_eq!(
        stats.faults.len(),
        9,
        "every fault kind was injected: {stats:?}"
    );
    assert_eq!(stats.requests, 300 + faults);
    assert_eq!(engine.metrics().failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_stops_retrying_at_its_deadline() {
    let server = mock(MockConfig {
        permanent: vec![("row0".to_string(), Fault::Server500)],
        ..MockConfig::default()
    })
    .await;
    let text = format!(
        "[dispatcher]\nconcurrency = 4\nmax_attempts = 50\nbackoff_base_ms = 40\n\
         backoff_max_ms = 40\ndeadline_ms = 300\n[cache]\nenabled = false\n\
         [models.default]\nkind = \"openai\"\nbase_url = \"{}\"\nmodel = \"m\"\n",
        server.base_url()
    );
    let cfg = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
    let def = FunctionDef::parse(TRIPLE, Path::new("triple.toml")).unwrap();
    let engine = Engine::with_functions(&cfg, vec![def]).unwrap();
    let started = std::time::Instant::now();
    let b = engine
        .query("SELECT triple_error('row0')['message'], triple_error('row0')['attempts']")
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let msg = b[0].column(0).as_string::<i32>().value(0).to_string();
    let attempts = b[0]
        .column(1)
        .as_primitive::<datafusion::arrow::datatypes::UInt32Type>()
        .value(0);
    assert!(msg.contains("row deadline"), "{msg}");
    assert!((3..=12).contains(&attempts), "{attempts} attempts");
    assert!(elapsed < std::time::Duration::from_secs(3), "{elapsed:?}");
}
