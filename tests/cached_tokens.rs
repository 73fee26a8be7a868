//! Cached prompt tokens end to end on real HTTP: the test server's prefix cache reports the
//! prompt tokens it held (`usage.prompt_tokens_details.cached_tokens`), sluice counts them per
//! run and per function, prices them at `cached_input_usd_per_mtok`, and shows them in the
//! summary and `--metrics-json`; odd counts from a server are clamped or read as 0. Prompts
//! that share a passage are sent so that the server computes it once (`share_prefixes`).

mod support;

use std::path::Path;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};
use sluice::Engine;
use sluice::config::Config;
use sluice::llm::dispatch::FunctionSnapshot;
use support::mock_llm::PrefixCacheConfig;
use support::*;

fn excerpts() -> std::path::PathBuf {
    shared_data("earnings_transcript_excerpts.jsonl")
}

fn prefix_cached() -> MockConfig {
    MockConfig {
        prefix_cache: Some(PrefixCacheConfig::default()),
        ..MockConfig::default()
    }
}

/// Prices per million tokens: input, cached input, output.
const PRICES: (f64, f64, f64) = (2.0, 0.5, 8.0);

/// The flagship's configuration against `server`, `concurrency` requests in flight, with
/// `extra` keys in `[models.default]`.
fn flagship_config(server: &MockServer, concurrency: usize, extra: &str) -> Config {
    let text = config_text(&server.base_url(), 2, concurrency) + extra;
    let mut cfg = Config::parse(&text, Path::new("sluice.toml"), &|_| None).expect("parses");
    cfg.udf_dir = repo().join("udfs");
    cfg
}

/// The flagship's engine with `extra` keys in `[models.default]`, one request in flight (so
/// the answers to a passage's second and third questions find the prefix the first computed).
fn engine(server: &MockServer, extra: &str) -> Engine {
    Engine::new(&flagship_config(server, 1, extra)).expect("engine starts")
}

/// The share of a function's prompt tokens the server took from its prefix cache.
fn cached_share(f: &FunctionSnapshot) -> f64 {
    f.tokens_cached as f64 / f.tokens_in as f64
}

async fn run_flagship(engine: &Engine) {
    let dir = tempfile::tempdir().unwrap();
    let sql = flagship_sql(&excerpts(), &dir.path().join("qa.parquet"));
    let printed = run(engine, &sql).await.unwrap();
    assert!(printed.contains("COPY 42 rows"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagship_counts_and_prices_the_prompt_tokens_the_server_held() {
    let server = mock(prefix_cached()).await;
    let (input, cached, output) = PRICES;
    let engine = engine(
        &server,
        &format!(
            "input_usd_per_mtok = {input}\noutput_usd_per_mtok = {output}\n\
             cached_input_usd_per_mtok = {cached}\n"
        ),
    );
    run_flagship(&engine).await;

    let stats = server.stats();
    let m = engine.metrics();
    assert_eq!((m.requests, m.failed), (56, 0));
    // The answers to one passage share its prompt up to the question.
    assert!(stats.prefill_cached > 0, "{stats:?}");
    assert_eq!(m.tokens_cached, stats.prefill_cached);
    assert_eq!(m.tokens_in, stats.prefill_computed + stats.prefill_cached);
    assert!(m.tokens_cached < m.tokens_in);
    let per_function: u64 = m.functions.values().map(|f| f.tokens_cached).sum();
    assert_eq!(per_function, m.tokens_cached);
    // The question prompts share only their instructions; the answers share a passage.
    let (gq, aq) = (
        m.functions["generate_questions"].tokens_cached,
        m.functions["answer_question"].tokens_cached,
    );
    assert!(aq > 10 * gq, "{aq} {gq}");
    let json = m.to_json();
    assert_eq!(json["tokens_cached"], json!(stats.prefill_cached));
    assert_eq!(
        json["functions"]["answer_question"]["tokens_cached"],
        json!(aq)
    );

    // The cost: uncached prompt tokens at the input price, cached ones at the cached price
    // (each response's cost is rounded up to a nano-dollar).
    let nano = |tokens: u64, usd_per_mtok: f64| tokens as f64 * usd_per_mtok * 1e3;
    let expected = nano(m.tokens_in - m.tokens_cached, input)
        + nano(m.tokens_cached, cached)
        + nano(m.tokens_out, output);
    let spent = engine.live_metrics().spent_nano_usd.load(Ordering::Relaxed);
    assert!(
        (spent as f64 - expected).abs() <= m.requests as f64,
        "spent {spent} nano-USD, expected {expected}"
    );
    let undiscounted = expected + nano(m.tokens_cached, input - cached);
    assert!((spent as f64) < undiscounted - 1.0);
    assert!((m.cost_usd - spent as f64 / 1e9).abs() < 1e-12);
    let summary = sluice::cli::format_summary(&m);
    assert!(summary.contains(" cached) / "), "{summary}");
    assert!(summary.contains("; cost $"), "{summary}");
}

/// The flagship with 16 requests in flight against a server that looks its prefix cache up
/// when a request arrives and answers in 20 ms: the answer stage's metrics and the server's.
async fn answers_in_parallel(share_prefixes: bool) -> (FunctionSnapshot, u64) {
    let server = mock(MockConfig {
        latency: std::time::Duration::from_millis(20),
        ..prefix_cached()
    })
    .await;
    let extra = format!("share_prefixes = {share_prefixes}\n");
    let engine = Engine::new(&flagship_config(&server, 16, &extra)).expect("engine starts");
    run_flagship(&engine).await;
    let m = engine.metrics();
    assert_eq!((m.requests, m.failed), (56, 0));
    assert_eq!(m.tokens_cached, server.stats().prefill_cached);
    (
        m.functions["answer_question"].clone(),
        m.functions["generate_questions"].prefix_waits,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siblings_wait_for_the_first_answer_to_their_passage_and_find_it_cached() {
    let (ordered, gq_waits) = answers_in_parallel(true).await;
    let (at_once, _) = answers_in_parallel(false).await;
    // 14 passages, 3 questions each: the first answer to each passage goes at once, the other
    // two wait for it; question prompts share no passage and never wait.
    assert_eq!(
        (ordered.prefix_waits, gq_waits, at_once.prefix_waits),
        (28, 0, 0)
    );
    // Sent at once, the siblings mostly arrive before the passage is computed (how many do
    // depends on the machine's speed); in order, 28 of 42 answers find their passage.
    assert!(cached_share(&ordered) > 0.5, "{ordered:?}");
    assert!(
        cached_share(&ordered) > cached_share(&at_once),
        "{ordered:?} {at_once:?}"
    );
    assert_eq!(ordered.tokens_in, at_once.tokens_in);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_estimates_the_shared_prefix_share_the_run_measures() {
    let server = mock(prefix_cached()).await;
    let cfg = flagship_config(&server, 16, "");
    let dir = tempfile::tempdir().unwrap();
    let sql = flagship_sql(&excerpts(), &dir.path().join("qa.parquet"));
    let x = Engine::for_estimates(&cfg)
        .unwrap()
        .explain_script(&sql, "q.sql")
        .await
        .unwrap();
    assert_eq!(server.stats().requests, 0, "explain sends nothing");
    let estimated = |f: &str| {
        let e = x.totals.iter().find(|e| e.function == f).unwrap();
        e.tokens_cached as f64 / e.tokens_in as f64
    };
    let (ordered, _) = answers_in_parallel(true).await;
    let measured = cached_share(&ordered);
    let estimate = estimated("answer_question");
    assert!(
        (estimate - measured).abs() <= 0.1 * measured,
        "estimated {estimate:.3}, measured {measured:.3}"
    );
    assert!(estimated("generate_questions") < 0.1);
    let text = x.to_text(false);
    assert!(text.contains("shared prefix"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cached_price_cached_tokens_cost_the_input_price() {
    let server = mock(prefix_cached()).await;
    let (input, _, output) = PRICES;
    let engine = engine(
        &server,
        &format!("input_usd_per_mtok = {input}\noutput_usd_per_mtok = {output}\n"),
    );
    run_flagship(&engine).await;
    let m = engine.metrics();
    assert!(m.tokens_cached > 0);
    let expected = (m.tokens_in as f64 * input + m.tokens_out as f64 * output) * 1e3;
    let spent = engine.live_metrics().spent_nano_usd.load(Ordering::Relaxed);
    assert!((spent as f64 - expected).abs() <= m.requests as f64);
}

#[test]
fn metrics_json_and_summary_show_cached_tokens() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(mock(prefix_cached()));
    let p = Project::new(&server.base_url(), 1, false);
    p.write("q.sql", &project_flagship_sql("out/qa.parquet"));
    let (code, _, err) = p.run_args(&["run", "q.sql", "--metrics-json", "m.json"]);
    assert_eq!(code, 0, "{err}");
    let stats = server.stats();
    assert!(stats.prefill_cached > 0, "{stats:?}");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(p.path("m.json")).unwrap()).unwrap();
    assert_eq!(m["tokens_cached"], json!(stats.prefill_cached), "{m}");
    let function = |f: &str| m["functions"][f]["tokens_cached"].as_u64().unwrap();
    assert!(function("answer_question") > 0, "{m}");
    assert_eq!(
        function("answer_question") + function("generate_questions"),
        stats.prefill_cached
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("LLM:"))
        .unwrap_or_else(|| panic!("a summary: {err}"));
    assert!(line.contains(" cached) / "), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_cached_counts_are_clamped_and_fail_nothing() {
    // (what the server sends as cached_tokens, whether the count is every prompt token)
    for (raw, all) in [
        (json!(1_000_000_000u64), true),
        (json!(-5), false),
        (json!("12"), false),
        (json!(12.5), false),
        (json!({"n": 1}), false),
    ] {
        let server = mock(MockConfig {
            cached_tokens_raw: Some(raw.clone()),
            ..MockConfig::default()
        })
        .await;
        let engine = flagship_engine(&server, 2);
        run_flagship(&engine).await;
        let m = engine.metrics();
        assert_eq!((m.requests, m.failed), (56, 0), "{raw}");
        let expected = if all { m.tokens_in } else { 0 };
        assert_eq!(m.tokens_cached, expected, "{raw}");
        assert!(m.tokens_in > 0);
    }
}

/// The test server's prefix cache as vLLM's: a prefix computed by a request in flight is not
/// reused by a request arriving meanwhile, only by one arriving after it was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_reuses_a_prefix_only_once_its_request_was_answered() {
    let server = mock(MockConfig {
        latency: std::time::Duration::from_millis(400),
        ..prefix_cached()
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", server.base_url());
    let shared = "The same long passage, told again. ".repeat(20);
    let ask = |question: &str| {
        let body = json!({"model": "mock", "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": format!("{shared}\nQuestion: {question}")},
        ]});
        let req = (http.post(&url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send();
        async move {
            let bytes = req.await.unwrap().bytes().await.unwrap();
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            let cached = v.pointer("/usage/prompt_tokens_details/cached_tokens");
            let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
            (cached.and_then(Value::as_u64).unwrap(), prompt)
        }
    };
    // Two at once: both compute the shared prefix.
    let (a, b) = tokio::join!(ask("one?"), ask("two?"));
    assert_eq!((a.0, b.0), (0, 0));
    // Later: the prefix's full blocks are held (16 tokens of 4 characters each).
    let prefix_chars = "Answer briefly.".len() + shared.len() + "\nQuestion: ".len();
    let (cached, prompt) = ask("why?").await;
    assert_eq!(cached, (prefix_chars / 64 * 16) as u64);
    assert!(cached < prompt);
    let stats = server.stats();
    assert_eq!(stats.prefill_cached, cached);
    assert_eq!(
        stats.prefill_computed + stats.prefill_cached,
        a.1 + b.1 + prompt
    );
}
