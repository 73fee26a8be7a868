//! `kind = "gemini"` in batch mode (`mode = "batch"`) against the test server's Gemini Batch
//! API over real HTTP (Files API upload, `batchGenerateContent`, operations polled, the
//! responses file downloaded): the flagship writes the live run's rows, nothing sent live, at
//! half the server's bill; a run killed while its batch is in progress resumes the same batch
//! (nothing uploaded or submitted twice) and writes the live rows; error results, hostile
//! answers, missing results and failed or expired batches are typed row errors; `sluice
//! batches` lists and cancels Gemini batches; the key shows nowhere.

mod support;

use std::path::Path;
use std::time::Duration;

use sluice::Engine;
use sluice::config::Config;
use support::mock_llm::{BatchConfig, Fault, GeminiConfig, GeminiHostile, PrefixCacheConfig};
use support::providers::{
    SHORT_PROFILE, cached_config_text, check_typed_row_errors, flagship_rows, hosted_text,
    parse_with_key, project_with_model, root, sluice_keyed,
};
use support::*;

const KEY: &str = "AIza-gemini-batch-secret-0123456789";

/// Gemini 2.5 Flash's live prices in USD per million tokens (input, cached input, output);
/// batches are billed at half of each.
const PRICES: (f64, f64, f64) = (0.30, 0.03, 2.50);

/// `[models.default]` on Gemini at `server`, the key in `$GEM_KEY`, with `extra` keys and a
/// `[models.default.batch]` polling every 20 ms.
fn model_text(server: &MockServer, extra: &str) -> String {
    format!(
        "[models.default]\nkind = \"gemini\"\nbase_url = \"{}\"\n\
         model = \"gemini-2.5-flash\"\napi_key_env = \"GEM_KEY\"\ntimeout_ms = 5000\n\
         input_usd_per_mtok = 0.30\noutput_usd_per_mtok = 2.50\n{extra}\n\
         [models.default.batch]\npoll_ms = 20\ncollect_ms = 150\n",
        root(server)
    )
}

fn keyed(batch: BatchConfig) -> MockConfig {
    MockConfig {
        api_key: Some(KEY.into()),
        batch,
        prefix_cache: Some(PrefixCacheConfig::default()),
        gemini: GeminiConfig {
            thoughts_tokens: 12,
            ..GeminiConfig::default()
        },
        ..MockConfig::default()
    }
}

/// An in-process engine on `server` with `max_attempts` attempts and the cache in `cache`.
fn engine_config(server: &MockServer, attempts: u32, extra: &str, cache: &Path) -> Config {
    let text = cached_config_text(attempts, cache, &model_text(server, extra));
    parse_with_key(&text, "GEM_KEY", KEY)
}

/// The flagship's rows and its number of requests, live on Gemini.
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
    let batches = s.gemini_batches();
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert_eq!(batches[1].1, 3 * batches[0].1, "{batches:?}");
    assert!(batches.iter().all(|(id, _)| id.starts_with("batches/")));
    assert_eq!(
        (
            st.files_uploaded,
            st.batches_created,
            st.batch_results_fetched
        ),
        (2, 2, 2)
    );
    // Every token the server billed is counted, at the batch prices: half of each live one.
    let (m, bill) = (engine.metrics(), st.gemini);
    assert_eq!(bill.requests, calls);
    assert_eq!(m.tokens_in, bill.prompt);
    assert_eq!(m.tokens_out, bill.candidates + bill.thoughts);
    assert_eq!(m.tokens_cached, bill.cached);
    assert!(bill.cached > 0, "batches read the implicit cache too");
    let (input, cached, output) = PRICES;
    let billed = bill.usd(input, cached, output) / 2.0;
    assert!(
        (m.cost_usd - billed).abs() <= 56e-9,
        "sluice ${:.8}, server ${billed:.8}",
        m.cost_usd
    );
    assert!(!any_file_holds(cache.path(), KEY), "no key in the cache");
    // A re-run is answered by the cache: nothing submitted.
    drop(engine);
    let rows = flagship_rows(&Engine::new(&cfg).unwrap()).await;
    assert_eq!(rows, live);
    let st = s.stats();
    assert_eq!((st.files_uploaded, st.batches_created), (2, 2));
}

/// A project running the flagship as `q.sql` at `server`, `extra` in its model, the cache on.
fn project(server: &MockServer, extra: &str) -> Project {
    project_with_model(server, &model_text(server, extra))
}

/// `sluice ARGS` in `p` with the key in its environment; (exit code, stdout, stderr).
fn sluice(p: &Project, args: &[&str]) -> (i32, String, String) {
    sluice_keyed(p, ("GEM_KEY", KEY), args)
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
        .env("GEM_KEY", KEY)
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
    let st = s.stats();
    assert_eq!((st.files_uploaded, st.batches_created), (1, 1));
    assert!(!p.path("out/qa.parquet").exists());
    assert!(
        !any_file_holds(&p.path(""), KEY),
        "no key in the stored job"
    );

    // Debug logs too: the key is in none of them.
    let (code, _, stderr) = sluice(&p, &["-vv", "run", "q.sql"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("resumed"),
        "the batch is picked up: {stderr}"
    );
    assert!(stderr.contains("DEBUG"), "debug logs were written");
    let st = s.stats();
    assert_eq!(
        (st.files_uploaded, st.batches_created),
        (2, 2),
        "only stage 2 is uploaded and submitted after the kill, not stage 1 again"
    );
    assert_eq!(st.requests, 0, "nothing is sent live");
    assert_eq!(st.batch_lines, calls, "no request submitted twice");
    assert_eq!(
        st.batch_results_fetched, 2,
        "the first batch's responses read once, by the rerun"
    );
    let rows = sorted_rows(&read_parquet(&p.path("out/qa.parquet")).await);
    assert_eq!(rows, live, "the resumed run writes the live run's rows");
    assert!(!stderr.contains(KEY));
    assert!(
        !any_file_holds(&p.path(""), KEY),
        "no key in the cache or outputs"
    );
}

/// A batch-mode engine configuration on `server`, one attempt a call, no cache.
fn batch_config(server: &MockServer) -> Config {
    let extra = "api_key_env = \"GEM_KEY\"\nmode = \"batch\"\n";
    let text = hosted_text("gemini", &root(server), "gemini-2.5-flash", 4, extra);
    let text = format!("{text}[models.default.batch]\npoll_ms = 20\ncollect_ms = 100\n");
    let mut cfg = parse_with_key(&text, "GEM_KEY", KEY);
    cfg.dispatcher.max_attempts = 1;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_results_hostile_answers_and_missing_results_are_typed_row_errors() {
    let hostile = [
        ("NOCAND", GeminiHostile::NoCandidates),
        ("ODDFINISH", GeminiHostile::UnknownFinish),
        ("UNSAFE", GeminiHostile::Safety),
        ("BLOCKED", GeminiHostile::BlockedPrompt),
    ];
    let s = mock(MockConfig {
        permanent: vec![
            ("BROKEN".into(), Fault::Server500),
            ("REFUSED".into(), Fault::Server503),
        ],
        gemini: GeminiConfig {
            hostile: hostile.iter().map(|(m, h)| (m.to_string(), *h)).collect(),
            batch_dropped: vec!["DROPPED".into()],
            batch_empty: vec!["EMPTY".into()],
            ..GeminiConfig::default()
        },
        ..keyed(BatchConfig::default())
    })
    .await;
    let cases = [
        ("NOCAND", "malformed_response"),
        ("ODDFINISH", "malformed_response"),
        ("UNSAFE", "bad_request"),
        ("BLOCKED", "bad_request"),
        ("BROKEN", "server_error"),
        ("REFUSED", "server_error"),
        ("DROPPED", "malformed_response"),
        ("EMPTY", "malformed_response"),
    ];
    let engine = check_typed_row_errors(&batch_config(&s), SHORT_PROFILE, &cases, KEY).await;
    let m = engine.metrics();
    assert_eq!((m.calls, m.failed), (9, 8));
    let st = s.stats();
    assert_eq!((st.requests, st.batches_created), (0, 1), "{st:?}");
}

/// A text function: one tag per row.
const TAG: &str = "name = \"tag\"\nargs = [\"x\"]\nprompt = \"Tag {{ x }}\"\nmax_tokens = 20\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_expired_batches_are_typed_row_errors() {
    // The first batch fails as a whole; the second expires with half its requests run.
    let s = mock(keyed(BatchConfig {
        fail_jobs: 1,
        expire_jobs: 1,
        ..BatchConfig::default()
    }))
    .await;
    let def = sluice::udf::def::FunctionDef::parse(TAG, Path::new("tag.toml")).unwrap();
    let engine = Engine::with_functions(&batch_config(&s), vec![def]).unwrap();
    let kinds = |table: &'static str| {
        let engine = &engine;
        async move {
            let values: Vec<String> = (0..10).map(|i| format!("('{table}{i}')")).collect();
            let sql = format!(
                "CREATE TABLE {table}_in AS VALUES {};\nCREATE TABLE {table} AS SELECT \
                 column1 AS x, tag_error(column1) AS e FROM {table}_in;",
                values.join(", ")
            );
            run(engine, &sql).await.unwrap();
            let q = format!("SELECT x, e, e['message'] AS m FROM {table}");
            let batches = engine.query(&q).await.unwrap();
            let messages = strings(&batches, "m");
            assert!(messages.iter().flatten().all(|m| !m.contains(KEY)));
            error_kinds(&batches, "e")
        }
    };
    let failed = kinds("a").await;
    assert_eq!(failed.len(), 10, "no row lost");
    assert!(
        failed.iter().all(|k| k.as_deref() == Some("server_error")),
        "{failed:?}"
    );
    let expired = kinds("b").await;
    assert_eq!(expired.len(), 10, "no row lost");
    assert_eq!(
        expired.iter().filter(|k| k.is_none()).count(),
        5,
        "{expired:?}"
    );
    assert_eq!(
        (expired.iter())
            .filter(|k| k.as_deref() == Some("timeout"))
            .count(),
        5,
        "{expired:?}"
    );
    assert_eq!(s.gemini_batches().len(), 2);
    assert_eq!(s.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_lists_and_cancels_gemini_batches() {
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
        stdout.contains("batches/mock")
            && stdout.contains("model default")
            && stdout.contains("BATCH_STATE_"),
        "{stdout}"
    );
    let (code, stdout, stderr) = sluice(&p, &["batches", "cancel"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("batches/mock"), "{stdout}");
    assert_eq!(s.stats().batch_cancels, 1);
    let (_, stdout, _) = sluice(&p, &["batches"]);
    assert!(stdout.contains("no open batch jobs"), "{stdout}");
    assert!(!any_file_holds(&p.path(""), KEY));
}

#[test]
fn batch_mode_is_accepted_for_gemini_at_half_price() {
    let text = "[models.g]\nkind = \"gemini\"\nmodel = \"gemini-2.5-flash\"\nmode = \"batch\"\n\
                input_usd_per_mtok = 0.30\noutput_usd_per_mtok = 2.50\n";
    let cfg = Config::parse(text, Path::new("sluice.toml"), &|_| None).unwrap();
    let m = &cfg.models["g"];
    assert!(m.supports_batch());
    let p = m.effective_prices().unwrap();
    assert_eq!((p.input, p.output), (0.15, 1.25));
    assert!((p.cached_input - 0.015).abs() < 1e-12, "{p:?}");
}

/// The test server's batch API as a client that follows Google's reference would see it:
/// inlined requests answered in order under their metadata keys, the key required in
/// `x-goog-api-key` and refused in a query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_server_answers_inlined_requests_in_order() {
    use serde_json::{Value, json};
    let s = mock(keyed(BatchConfig::default())).await;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", root(&s));
    let send = |req: reqwest::RequestBuilder| async move {
        let resp = req.header("x-goog-api-key", KEY).send().await.unwrap();
        let status = resp.status().as_u16();
        let v: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        (status, v)
    };
    let request = |text: &str| {
        json!({"request": {"contents": [{"role": "user", "parts": [{"text": text}]}]},
               "metadata": {"key": format!("k-{text}")}})
    };
    let body = json!({"batch": {"display_name": "inline",
        "input_config": {"requests": {"requests": [request("one"), request("two")]}}}});
    let create = http
        .post(url("/v1beta/models/gemini-2.5-flash:batchGenerateContent"))
        .body(body.to_string());
    let (status, op) = send(create).await;
    assert_eq!(status, 200, "{op}");
    let name = op["name"].as_str().unwrap().to_string();
    assert_eq!(op["metadata"]["state"], "BATCH_STATE_PENDING", "{op}");
    assert_eq!(op["metadata"]["batchStats"]["requestCount"], "2");
    // Polled as a client polls it, until done (under the tests' deadline).
    let poll = async {
        loop {
            let (_, op) = send(http.get(url(&format!("/v1beta/{name}")))).await;
            if op["done"] == json!(true) {
                return op;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let done = tokio::time::timeout(WAIT_DEADLINE, poll)
        .await
        .expect("the inlined batch ends");
    assert_eq!(done["metadata"]["state"], "BATCH_STATE_SUCCEEDED", "{done}");
    let inlined = done["response"]["inlinedResponses"]["inlinedResponses"]
        .as_array()
        .unwrap();
    let keys: Vec<&Value> = inlined.iter().map(|r| &r["metadata"]["key"]).collect();
    assert_eq!(keys, [&json!("k-one"), &json!("k-two")], "in request order");
    assert!(
        inlined
            .iter()
            .all(|r| r["response"]["candidates"][0]["finishReason"] == "STOP")
    );
    // The key only in its header: none is refused, one in a query too.
    let resp = http
        .get(url(&format!("/v1beta/{name}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let (status, _) = send(http.get(url(&format!("/v1beta/{name}?key={KEY}")))).await;
    assert_eq!(status, 400);
    assert_eq!(s.stats().requests, 0, "nothing counted as live");
}
