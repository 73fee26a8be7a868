//! `kind = "anthropic"` in batch mode (`mode = "batch"`) against the test server's Message
//! Batches API over real HTTP: the flagship writes the live run's rows, nothing sent live, at
//! half the server's bill; a run killed while its batch is in progress resumes the same batch
//! (nothing submitted twice) and writes the live rows; errored and expired results are typed
//! row errors; `sluice batches` lists and cancels Anthropic batches; the key shows nowhere.

mod support;

use std::path::Path;
use std::time::Duration;

use datafusion::arrow::array::{Array, AsArray};
use sluice::Engine;
use sluice::config::Config;
use sluice::udf::def::FunctionDef;
use support::mock_llm::{AnthropicPrices, BatchConfig, Fault, SONNET_4_5};
use support::providers::{
    cached_config_text, flagship_rows, parse_with_key, project_with_model, sluice_keyed,
};
use support::*;

const KEY: &str = "sk-ant-secret-0123456789";

/// Live prices in USD per million tokens (Claude Sonnet 4.5's); batches are billed at half of
/// each, cache reads and writes included.
const PRICES: AnthropicPrices = SONNET_4_5;

/// `[models.default]` on Anthropic at `server`, the key in `$ANT_KEY`, with `extra` keys and a
/// `[models.default.batch]` polling every 20 ms.
fn model_text(server: &MockServer, extra: &str) -> String {
    format!(
        "[models.default]\nkind = \"anthropic\"\nbase_url = \"http://{}\"\n\
         model = \"claude-sonnet-4-5\"\napi_key_env = \"ANT_KEY\"\ntimeout_ms = 5000\n\
         input_usd_per_mtok = 3\noutput_usd_per_mtok = 15\n{extra}\n\
         [models.default.batch]\npoll_ms = 20\ncollect_ms = 150\n",
        server.addr()
    )
}

fn keyed(batch: BatchConfig) -> MockConfig {
    MockConfig {
        api_key: Some(KEY.into()),
        batch,
        ..MockConfig::default()
    }
}

/// An in-process engine on `server` with `max_attempts` attempts and the cache in `cache`.
fn engine_config(server: &MockServer, attempts: u32, extra: &str, cache: &Path) -> Config {
    let text = cached_config_text(attempts, cache, &model_text(server, extra));
    parse_with_key(&text, "ANT_KEY", KEY)
}

/// The flagship's rows and its number of requests, live on Anthropic.
async fn live_rows() -> (Vec<String>, u64) {
    let s = mock(keyed(BatchConfig::default())).await;
    let cache = tempfile::tempdir().unwrap();
    let engine = Engine::new(&engine_config(&s, 2, "", cache.path())).unwrap();
    let rows = flagship_rows(&engine).await;
    assert_eq!(rows.len(), 42);
    (rows, s.stats().requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flagship_in_batch_mode_writes_the_live_rows_at_half_the_bill() {
    let (live, calls) = live_rows().await;
    let s = mock(keyed(BatchConfig::default())).await;
    let cache = tempfile::tempdir().unwrap();
    let cfg = engine_config(&s, 2, "mode = \"batch\"", cache.path());
    let engine = Engine::new(&cfg).unwrap();
    let rows = flagship_rows(&engine).await;
    assert_eq!(rows, live, "batch mode writes the live run's rows");
    let st = s.stats();
    assert_eq!(st.requests, 0, "nothing is sent live");
    assert_eq!(st.batch_lines, calls, "one request per distinct call");
    // Stage 1 (questions) is one batch; stage 2 (answers) needs its results: another.
    let batches = s.anthropic_batches();
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert_eq!(batches[1].1, 3 * batches[0].1, "{batches:?}");
    assert_eq!((st.batches_created, st.batch_results_fetched), (2, 2));
    assert!(batches.iter().all(|(id, _)| id.starts_with("msgbatch_")));
    // Every token the server billed is counted, at the batch prices: half of each live one.
    let (m, bill) = (engine.metrics(), st.anthropic);
    assert_eq!(m.tokens_in, bill.prompt());
    assert_eq!(m.tokens_cached, bill.cache_read);
    assert!(
        bill.cache_read > 0,
        "batches read the prompt cache too: {bill:?}"
    );
    let billed = bill.usd(PRICES) / 2.0;
    assert!(
        (m.cost_usd - billed).abs() <= 56e-9,
        "sluice ${:.6}, server ${billed:.6}",
        m.cost_usd
    );
    assert!(!any_file_holds(cache.path(), KEY), "no key in the cache");
    // A re-run is answered by the cache: nothing submitted.
    drop(engine);
    let rows = flagship_rows(&Engine::new(&cfg).unwrap()).await;
    assert_eq!(rows, live);
    assert_eq!(s.stats().batches_created, 2);
}

/// A project running the flagship as `q.sql` at `server`, `extra` in its model, the cache on.
fn project(server: &MockServer, extra: &str) -> Project {
    project_with_model(server, &model_text(server, extra))
}

/// `sluice ARGS` in `p` with the key in its environment; (exit code, stdout, stderr).
fn sluice(p: &Project, args: &[&str]) -> (i32, String, String) {
    sluice_keyed(p, ("ANT_KEY", KEY), args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_while_its_batch_runs_resumes_the_same_batch() {
    let s = mock(keyed(BatchConfig::default())).await;
    let p = project(&s, "");
    let (code, _, stderr) = sluice(&p, &["run", "q.sql", "--quiet"]);
    assert_eq!(code, 0, "{stderr}");
    let live = sorted_rows(&read_parquet(&p.path("out/qa.parquet")).await);
    let calls = s.stats().requests;

    let slow = BatchConfig {
        completion_time: Duration::from_secs(3),
        ..BatchConfig::default()
    };
    let s = mock(keyed(slow)).await;
    let p = project(&s, "mode = \"batch\"");
    let mut child = p
        .command(&["run", "q.sql", "--quiet"])
        .env("ANT_KEY", KEY)
        .spawn()
        .expect("sluice starts");
    // The batch is stored before it is first polled.
    wait_until("the first poll of the batch", || {
        assert!(child.try_wait().unwrap().is_none(), "finished too early");
        s.stats().batch_polls > 0
    })
    .await;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    assert_eq!(s.stats().batches_created, 1);
    assert!(!p.path("out/qa.parquet").exists());
    assert!(
        !any_file_holds(&p.path(""), KEY),
        "no key in the stored job"
    );

    let (code, _, stderr) = sluice(&p, &["run", "q.sql"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("resumed"),
        "the batch is picked up: {stderr}"
    );
    let st = s.stats();
    assert_eq!(
        st.batches_created, 2,
        "only stage 2 is submitted after the kill, not stage 1 again"
    );
    assert_eq!(st.requests, 0, "nothing is sent live");
    assert_eq!(st.batch_lines, calls, "no request submitted twice");
    assert_eq!(
        st.batch_results_fetched, 2,
        "the first batch's results read once, by the rerun"
    );
    let rows = sorted_rows(&read_parquet(&p.path("out/qa.parquet")).await);
    assert_eq!(rows, live, "the resumed run writes the live run's rows");
    assert!(!stderr.contains(KEY));
    assert!(
        !any_file_holds(&p.path(""), KEY),
        "no key in the cache or outputs"
    );
}

/// A text function: one tag per row.
const TAG: &str = "name = \"tag\"\nargs = [\"x\"]\nprompt = \"Tag {{ x }}\"\nmax_tokens = 20\n";

/// The error kind of each row of `tag(x)` over `values` (None: answered), by value.
async fn tag_errors(
    engine: &Engine,
    table: &str,
    values: &[&str],
) -> Vec<(String, Option<String>)> {
    let rows: Vec<String> = values.iter().map(|v| format!("('{v}')")).collect();
    let sql = format!(
        "CREATE TABLE {table}_in AS VALUES {};\nCREATE TABLE {table} AS SELECT column1 AS x, \
         tag_error(column1) AS e FROM {table}_in;",
        rows.join(", ")
    );
    run(engine, &sql).await.unwrap();
    let q = format!("SELECT x, e['kind'], e['message'] FROM {table} ORDER BY x");
    let mut out = vec![];
    for b in engine.query(&q).await.unwrap() {
        let (x, kind, message) = (
            b.column(0).as_string::<i32>(),
            b.column(1).as_string::<i32>(),
            b.column(2).as_string::<i32>(),
        );
        for i in 0..b.num_rows() {
            assert!(message.is_null(i) || !message.value(i).contains(KEY));
            out.push((
                x.value(i).to_string(),
                kind.is_valid(i).then(|| kind.value(i).to_string()),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errored_and_expired_results_are_typed_row_errors() {
    // The first batch expires with half its requests run; a request holding BROKEN errors
    // (an api_error, as the live endpoint's 500).
    let s = mock(MockConfig {
        permanent: vec![("BROKEN".into(), Fault::Server500)],
        ..keyed(BatchConfig {
            expire_jobs: 1,
            ..BatchConfig::default()
        })
    })
    .await;
    let cache = tempfile::tempdir().unwrap();
    let cfg = engine_config(&s, 1, "mode = \"batch\"", cache.path());
    let def = FunctionDef::parse(TAG, Path::new("tag.toml")).unwrap();
    let engine = Engine::with_functions(&cfg, vec![def]).unwrap();
    let values: Vec<String> = (0..10).map(|i| format!("row{i}")).collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    let expired = tag_errors(&engine, "a", &values).await;
    assert_eq!(expired.len(), 10, "no row lost");
    let kinds: Vec<Option<&str>> = expired.iter().map(|(_, k)| k.as_deref()).collect();
    assert_eq!(
        kinds.iter().filter(|k| k.is_none()).count(),
        5,
        "{expired:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == Some("timeout")).count(),
        5,
        "{expired:?}"
    );

    let errored = tag_errors(&engine, "b", &["BROKEN", "fine"]).await;
    assert_eq!(
        errored,
        vec![
            ("BROKEN".to_string(), Some("server_error".to_string())),
            ("fine".to_string(), None)
        ]
    );
    assert_eq!(s.anthropic_batches().len(), 2);
    assert_eq!(s.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_lists_and_cancels_anthropic_batches() {
    let slow = BatchConfig {
        completion_time: Duration::from_secs(30),
        ..BatchConfig::default()
    };
    let s = mock(keyed(slow)).await;
    let p = project(&s, "mode = \"batch\"");
    let (code, _, stderr) = sluice(&p, &["run", "q.sql", "--wait", "false"]);
    assert_eq!(code, 75, "{stderr}");
    let (code, stdout, stderr) = sluice(&p, &["batches"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("msgbatch_")
            && stdout.contains("model default")
            && stdout.contains("in_progress"),
        "{stdout}"
    );
    let (code, stdout, stderr) = sluice(&p, &["batches", "cancel"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("msgbatch_"), "{stdout}");
    assert_eq!(s.stats().batch_cancels, 1);
    let (_, stdout, _) = sluice(&p, &["batches"]);
    assert!(stdout.contains("no open batch jobs"), "{stdout}");
    assert!(!any_file_holds(&p.path(""), KEY));
}

#[test]
fn batch_mode_is_accepted_for_anthropic_at_half_price_with_cache_multipliers() {
    let parse = |extra: &str| {
        let text = format!(
            "[models.a]\nkind = \"anthropic\"\nmodel = \"claude-sonnet-4-5\"\nmode = \"batch\"\n\
             input_usd_per_mtok = 3\noutput_usd_per_mtok = 15\n{extra}"
        );
        Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap()
    };
    let cfg = parse("");
    let m = &cfg.models["a"];
    assert!(m.supports_batch());
    let p = m.effective_prices().unwrap();
    assert_eq!((p.input, p.output), (1.5, 7.5));
    assert!((p.cached_input - 0.15).abs() < 1e-12 && (p.cache_write - 1.875).abs() < 1e-12);
    // Batch prices given: the cache's are the batch input price times Anthropic's multiples.
    let cfg = parse("batch_input_usd_per_mtok = 2\nbatch_output_usd_per_mtok = 8\n");
    let p = cfg.models["a"].effective_prices().unwrap();
    assert!((p.cached_input - 0.2).abs() < 1e-12 && (p.cache_write - 2.5).abs() < 1e-12);
}
