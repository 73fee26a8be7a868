//! `kind = "anthropic"` against the test server's Messages API over real HTTP: the flagship
//! writes the rows it writes on `openai` (structured output through a forced tool); 429s and
//! 529s are absorbed; hostile answers are typed row errors; the shared openings of the prompts
//! are cached, the answer stage reads most of its prompt from the cache, and the run's cost is
//! what the server bills; the key shows nowhere; configuration errors are one line.

mod support;

use std::path::Path;

use sluice::Engine;
use sluice::config::Config;
use sluice::udf::def::FunctionDef;
use support::mock_llm::{AnthropicConfig, AnthropicPrices, Hostile, SONNET_4_5};
use support::providers::{
    self, check_typed_row_errors, flagship_error, flagship_rows, hosted_text, openai_rows,
    parse_with_key, root,
};
use support::*;

const KEY: &str = "sk-ant-secret-0123456789";

/// Prices in USD per million tokens: Claude Sonnet 4.5's.
const PRICES: AnthropicPrices = SONNET_4_5;

/// The flagship's configuration with `[models.default]` of `kind` at `base_url`, the key in
/// `$ANT_KEY`, `concurrency` requests in flight, `extra` keys appended.
fn config(kind: &str, base_url: &str, concurrency: usize, extra: &str) -> Config {
    let text = hosted_text(kind, base_url, "claude-sonnet-4-5", concurrency, extra);
    parse_with_key(&text, "ANT_KEY", KEY)
}

fn anthropic(server: &MockServer, concurrency: usize, extra: &str) -> Engine {
    let extra = format!("api_key_env = \"ANT_KEY\"\n{extra}");
    Engine::new(&config("anthropic", &root(server), concurrency, &extra)).expect("engine starts")
}

fn keyed(cfg: MockConfig) -> MockConfig {
    providers::keyed(KEY, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flagship_on_anthropic_writes_the_rows_it_writes_on_openai() {
    let expected = openai_rows().await;

    let s = mock(keyed(MockConfig::default())).await;
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config("anthropic", &root(&s), 4, "api_key_env = \"ANT_KEY\"\n");
    cfg.cache.enabled = true;
    cfg.cache.dir = cache.path().to_path_buf();
    let engine = Engine::new(&cfg).unwrap();
    let rows = flagship_rows(&engine).await;
    assert_eq!(rows.len(), 42);
    assert_eq!(rows, expected, "the same rows as on openai");
    assert!(!rows.iter().any(|r| r.contains(KEY)));
    assert!(!any_file_holds(cache.path(), KEY), "no key in the cache");
    let (st, m) = (s.stats(), engine.metrics());
    assert_eq!((st.requests, st.ok), (56, 56), "{st:?}");
    assert_eq!((m.requests, m.calls, m.failed), (56, 56, 0));
    // Every token the server billed is counted, and no more.
    let bill = st.anthropic;
    assert_eq!(bill.requests, 56);
    assert_eq!(m.tokens_in, bill.prompt());
    assert_eq!(m.tokens_out, bill.output);
    assert_eq!(m.tokens_cached, bill.cache_read);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_overloads_lose_nothing() {
    let s = mock(keyed(MockConfig {
        faults: FaultRates {
            rate_limit: 0.05,
            ..FaultRates::default()
        },
        anthropic: AnthropicConfig {
            overloaded: 0.05,
            ..AnthropicConfig::default()
        },
        retry_after_ms: 5,
        seed: 7,
        ..MockConfig::default()
    }))
    .await;
    let engine = anthropic(&s, 4, "");
    let rows = flagship_rows(&engine).await;
    assert_eq!(rows.len(), 42);
    let (st, m) = (s.stats(), engine.metrics());
    let count = |f: &str| st.faults.get(f).copied().unwrap_or(0);
    let (limited, overloaded) = (count("rate_limit"), count("overloaded"));
    assert!(limited > 0 && overloaded > 0, "{st:?}");
    assert_eq!(m.failed, 0, "{:?}", m.errors);
    assert_eq!(m.calls, 56);
    assert_eq!(
        st.requests,
        56 + limited + overloaded,
        "one more request per refusal"
    );
    assert_eq!(m.requests, st.requests);
    assert_eq!(st.anthropic.requests, 56, "billed once per answer");
    assert_eq!(m.tokens_in, st.anthropic.prompt());
}

/// A function answering an object for each row of `t`.
const PROFILE: &str = r#"
name = "profile"
args = ["x"]
prompt = "Describe {{ x }}"
max_tokens = 50
output = { type = "object", properties = { a = { type = "string" }, b = { type = "integer" } }, required = ["a", "b"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_are_typed_row_errors() {
    let hostile = [
        ("EMPTY", Hostile::Empty, "invalid_output"),
        ("ODDSTOP", Hostile::UnknownStop, "malformed_response"),
        ("NOTOOL", Hostile::NoToolUse, "invalid_output"),
        ("HUGE", Hostile::Huge, "too_large"),
    ];
    let s = mock(keyed(MockConfig {
        anthropic: AnthropicConfig {
            hostile: (hostile.iter())
                .map(|(m, h, _)| (m.to_string(), *h))
                .collect(),
            huge_bytes: 200_000,
            ..AnthropicConfig::default()
        },
        ..MockConfig::default()
    }))
    .await;
    let extra = "api_key_env = \"ANT_KEY\"\nmax_response_bytes = 65536\n";
    let mut cfg = config("anthropic", &root(&s), 4, extra);
    cfg.dispatcher.max_attempts = 2;
    let cases: Vec<(&str, &str)> = hostile.iter().map(|(m, _, k)| (*m, *k)).collect();
    let engine = check_typed_row_errors(&cfg, PROFILE, &cases, KEY).await;
    let st = s.stats();
    // Every hostile answer is tried twice but the oversized one (not worth a retry).
    assert_eq!(st.requests, 2 * 3 + 1 + 1, "{st:?}");
    let m = engine.metrics();
    assert_eq!((m.calls, m.failed), (5, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_stage_reads_its_passages_from_the_cache_and_the_cost_is_the_bill() {
    let s = mock(keyed(MockConfig::default())).await;
    let engine = anthropic(&s, 4, "input_usd_per_mtok = 3\noutput_usd_per_mtok = 15\n");
    let rows = flagship_rows(&engine).await;
    assert_eq!(rows.len(), 42);
    let (st, m) = (s.stats(), engine.metrics());
    let bill = st.anthropic;
    assert_eq!((m.requests, m.failed, bill.requests), (56, 0, 56));
    assert_eq!(m.tokens_in, bill.prompt());
    assert_eq!(m.tokens_cached, bill.cache_read);
    assert!(bill.cache_write > 0 && bill.cache_read > 0, "{bill:?}");
    // The three questions of a passage share it: the first writes it, the other two read it
    // (at most 2/3 of the prompt). Twelve of the fourteen passages are long enough to cache
    // at the model's minimum (1,024 tokens); the other two (649 and 2,697 characters) are
    // not: 0.59 of the stage's prompt tokens are read from the cache.
    let answers = &m.functions["answer_question"];
    let share = answers.tokens_cached as f64 / answers.tokens_in as f64;
    println!("answer stage: {share:.3} of its prompt tokens read from the cache");
    assert!(share >= 0.58, "{share:.3} {answers:?}");
    let questions = &m.functions["generate_questions"];
    assert_eq!(
        questions.tokens_cached, 0,
        "no two question prompts share a passage"
    );
    // What sluice counts is what the server bills, to the cent (each answer's cost is rounded
    // up to a nano-dollar).
    let billed = bill.usd(PRICES);
    assert!(
        (m.cost_usd - billed).abs() <= 56e-9,
        "sluice ${:.6}, server ${billed:.6}",
        m.cost_usd
    );
    assert_eq!(format!("{:.2}", m.cost_usd), format!("{billed:.2}"));
    let uncached =
        bill.prompt() as f64 * PRICES.input / 1e6 + bill.output as f64 * PRICES.output / 1e6;
    assert!(
        m.cost_usd < uncached,
        "the cache saves: {} vs {uncached}",
        m.cost_usd
    );
}

/// A text function: one tag per row.
const TAG: &str = "name = \"tag\"\nargs = [\"x\"]\nprompt = \"Tag {{ x }}\"\nmax_tokens = 20\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_rate_limit_headers_pace_the_model_before_any_refusal() {
    // 6,000 requests a minute with a burst of 20, advertised in `anthropic-ratelimit-*`
    // headers (resets as RFC 3339 times): the first 16 fit, the headers say the rest.
    let s = mock(keyed(MockConfig {
        latency: std::time::Duration::from_millis(10),
        retry_after_ms: 1000,
        limits: Limits {
            rpm: Some(6000),
            burst_secs: 0.2,
            headers: true,
            ..Limits::default()
        },
        ..MockConfig::default()
    }))
    .await;
    let cfg = config("anthropic", &root(&s), 16, "api_key_env = \"ANT_KEY\"\n");
    let def = FunctionDef::parse(TAG, Path::new("tag.toml")).unwrap();
    let engine = Engine::with_functions(&cfg, vec![def]).unwrap();
    let sql = "CREATE TABLE t AS SELECT CAST(value AS VARCHAR) AS x FROM range(200);\n\
               CREATE TABLE r AS SELECT x, tag(x) AS y FROM t;";
    run(&engine, sql).await.unwrap();
    let rows = ordered_rows(&engine.query("SELECT x, y FROM r").await.unwrap());
    assert_eq!(rows.len(), 200);
    for r in &rows {
        let (x, y) = r.split_once(" | ").unwrap();
        let h = prompt_hash(None, &format!("Tag {x}"));
        assert_eq!(y, format!("Answer [{h}]: the passage reports the figure."));
    }
    let st = s.stats();
    let refused = st.faults.get("over_rpm").copied().unwrap_or(0);
    assert!(refused <= 2, "{refused} refused of {}", st.requests);
    assert_eq!(st.requests, 200 + refused);
    assert_eq!(engine.metrics().failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_fails_the_run_without_showing_the_key() {
    let s = mock(MockConfig {
        api_key: Some("the-right-key".into()),
        ..MockConfig::default()
    })
    .await;
    let err = flagship_error(&anthropic(&s, 2, "")).await;
    assert!(
        err.contains("authentication failed") && err.contains("$ANT_KEY"),
        "{err}"
    );
    assert!(
        err.contains("invalid x-api-key"),
        "Anthropic's message: {err}"
    );
    assert!(!err.contains(KEY), "{err}");
}

#[test]
fn configuration_errors_are_one_line() {
    let parse = |extra: &str| {
        let text =
            format!("[models.a]\nkind = \"anthropic\"\nmodel = \"claude-haiku-4-5\"\n{extra}");
        Config::parse(&text, Path::new("sluice.toml"), &|_| None).map_err(|e| e.to_string())
    };
    let cfg = parse("input_usd_per_mtok = 1\noutput_usd_per_mtok = 5\n").unwrap();
    let m = &cfg.models["a"];
    let server = m.server().unwrap();
    assert_eq!(server.base_url, "https://api.anthropic.com");
    assert_eq!(server.prompt_cache_min_tokens, 4096, "Haiku 4.5's minimum");
    let p = m.prices.unwrap();
    assert_eq!((p.cached_input, p.cache_write), (0.1, 1.25));
    let cfg = parse("prompt_cache_min_tokens = 2048\ncache_write_usd_per_mtok = 2\ninput_usd_per_mtok = 1\noutput_usd_per_mtok = 5\n").unwrap();
    assert_eq!(
        cfg.models["a"].server().unwrap().prompt_cache_min_tokens,
        2048
    );
    assert_eq!(cfg.models["a"].prices.unwrap().cache_write, 2.0);
    let errors = [
        (
            "structured_output = \"json_object\"\n",
            "no json_object mode",
        ),
        ("prompts_per_request = 4\n", "one prompt per request"),
        (
            "api_version = \"2024-10-21\"\n",
            "belongs to kind = \"azure_openai\"",
        ),
        (
            "cache_write_usd_per_mtok = 2\n",
            "cache_write_usd_per_mtok needs input_usd_per_mtok",
        ),
        ("cache_ttl = \"1h\"\n", "unknown field `cache_ttl`"),
    ];
    for (extra, says) in errors {
        let e = parse(extra).unwrap_err();
        assert!(e.contains(says), "{extra}: {e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
}
