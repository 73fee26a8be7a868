//! `kind = "gemini"` against the test server's Gemini API over real HTTP: the flagship writes
//! the rows it writes on `openai` (structured output through `responseJsonSchema`) with every
//! billed token counted (cached and thinking tokens too) and the cost the bill's; 429s with a
//! `retryDelay` are absorbed, each retry waiting for it; hostile answers are typed row errors;
//! embedding functions get vectors of their `dim`; the key shows nowhere; configuration errors
//! are one line.

mod support;

use std::path::Path;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Float32Type;
use sluice::Engine;
use sluice::config::Config;
use sluice::udf::def::FunctionDef;
use support::mock_llm::{GeminiConfig, GeminiHostile, PrefixCacheConfig, embedding_of};
use support::providers::{
    self, SHORT_PROFILE, check_typed_row_errors, flagship_error, flagship_rows, hosted_text,
    openai_rows, parse_with_key, root,
};
use support::*;

const KEY: &str = "AIza-gemini-secret-0123456789";

/// Gemini 2.5 Flash's prices in USD per million tokens (cached input: sluice's default for
/// Gemini, 0.1 × the input price).
const PRICES: (f64, f64, f64) = (0.30, 0.03, 2.50);

/// The flagship's configuration with `[models.default]` of `kind` at `base_url`,
/// `concurrency` requests in flight, `extra` keys appended; the key in `$GEM_KEY`.
fn config(kind: &str, base_url: &str, concurrency: usize, extra: &str) -> Config {
    let text = hosted_text(kind, base_url, "gemini-2.5-flash", concurrency, extra);
    let mut cfg = parse_with_key(&text, "GEM_KEY", KEY);
    // Long enough for a 429's `retryDelay`.
    cfg.dispatcher.backoff_max = std::time::Duration::from_secs(1);
    cfg
}

fn gemini(server: &MockServer, concurrency: usize, extra: &str) -> Engine {
    let extra = format!("api_key_env = \"GEM_KEY\"\n{extra}");
    Engine::new(&config("gemini", &root(server), concurrency, &extra)).expect("engine starts")
}

fn keyed(cfg: MockConfig) -> MockConfig {
    providers::keyed(KEY, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flagship_on_gemini_writes_the_rows_it_writes_on_openai_and_costs_the_bill() {
    let expected = openai_rows().await;

    let s = mock(keyed(MockConfig {
        prefix_cache: Some(PrefixCacheConfig::default()),
        gemini: GeminiConfig {
            thoughts_tokens: 12,
            ..GeminiConfig::default()
        },
        ..MockConfig::default()
    }))
    .await;
    let cache = tempfile::tempdir().unwrap();
    let extra =
        "api_key_env = \"GEM_KEY\"\ninput_usd_per_mtok = 0.30\noutput_usd_per_mtok = 2.50\n";
    let mut cfg = config("gemini", &root(&s), 4, extra);
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
    // Every token the server billed is counted, thinking as output, and no more.
    let bill = st.gemini;
    assert_eq!(bill.requests, 56);
    assert_eq!(m.tokens_in, bill.prompt);
    assert_eq!(m.tokens_out, bill.candidates + bill.thoughts);
    assert_eq!(bill.thoughts, 56 * 12);
    assert_eq!(m.tokens_cached, bill.cached);
    // The three questions of a passage share it: the implicit cache serves the later two.
    let answers = &m.functions["answer_question"];
    assert!(
        answers.tokens_cached * 2 > answers.tokens_in,
        "most of the answer stage's prompt is cached: {answers:?}"
    );
    let (input, cached, output) = PRICES;
    let billed = bill.usd(input, cached, output);
    assert!(
        (m.cost_usd - billed).abs() <= 56e-9,
        "sluice ${:.8}, server ${billed:.8}",
        m.cost_usd
    );
    let uncached =
        bill.prompt as f64 * input / 1e6 + (bill.candidates + bill.thoughts) as f64 * output / 1e6;
    assert!(m.cost_usd < uncached, "the cache saves");
}

/// A server answering 429 `RESOURCE_EXHAUSTED` to 5% of requests, with a `retryDelay` of
/// 400 ms and no `retry-after` header.
async fn limited_server() -> MockServer {
    mock(keyed(MockConfig {
        faults: FaultRates {
            rate_limit: 0.05,
            ..FaultRates::default()
        },
        gemini: GeminiConfig {
            retry_delay_ms: 400,
            ..GeminiConfig::default()
        },
        seed: 11,
        ..MockConfig::default()
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_lose_nothing_and_every_retry_waits_for_the_retry_delay() {
    let s = limited_server().await;
    let engine = gemini(&s, 4, "");
    let rows = flagship_rows(&engine).await;
    assert_eq!(rows.len(), 42);
    let (st, m) = (s.stats(), engine.metrics());
    let limited = st.faults.get("rate_limit").copied().unwrap_or(0);
    assert!(limited > 0, "{st:?}");
    assert_eq!(m.failed, 0, "{:?}", m.errors);
    assert_eq!(m.calls, 56);
    assert_eq!(st.requests, 56 + limited, "one more request per refusal");
    assert_eq!(st.gemini.rate_limited, limited);
    // By the server's clock, no prompt came back before its 429's retryDelay had passed.
    assert_eq!(st.gemini.early_retries, 0, "{:?}", st.gemini);

    // The counter sees early retries: a dispatcher that may wait at most 1 ms comes back
    // long before the 400 ms asked.
    let s = limited_server().await;
    let mut cfg = config("gemini", &root(&s), 4, "api_key_env = \"GEM_KEY\"\n");
    cfg.dispatcher.backoff_max = std::time::Duration::from_millis(1);
    let rows = flagship_rows(&Engine::new(&cfg).unwrap()).await;
    assert_eq!(rows.len(), 42);
    assert!(s.stats().gemini.early_retries > 0, "{:?}", s.stats().gemini);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_are_typed_row_errors() {
    let hostile = [
        ("NOCAND", GeminiHostile::NoCandidates, "malformed_response"),
        (
            "ODDFINISH",
            GeminiHostile::UnknownFinish,
            "malformed_response",
        ),
        ("UNSAFE", GeminiHostile::Safety, "bad_request"),
        ("BLOCKED", GeminiHostile::BlockedPrompt, "bad_request"),
        ("HUGE", GeminiHostile::Huge, "too_large"),
    ];
    let s = mock(keyed(MockConfig {
        gemini: GeminiConfig {
            hostile: (hostile.iter())
                .map(|(m, h, _)| (m.to_string(), *h))
                .collect(),
            huge_bytes: 200_000,
            ..GeminiConfig::default()
        },
        ..MockConfig::default()
    }))
    .await;
    let extra = "api_key_env = \"GEM_KEY\"\nmax_response_bytes = 65536\n";
    let mut cfg = config("gemini", &root(&s), 4, extra);
    cfg.dispatcher.max_attempts = 2;
    let cases: Vec<(&str, &str)> = hostile.iter().map(|(m, _, k)| (*m, *k)).collect();
    let engine = check_typed_row_errors(&cfg, SHORT_PROFILE, &cases, KEY).await;
    // The malformed answers are tried twice; a filtered or blocked one, or one too large, once.
    assert_eq!(s.stats().requests, 2 * 2 + 3 + 1, "{:?}", s.stats());
    let m = engine.metrics();
    assert_eq!((m.calls, m.failed), (6, 5));
}

/// An embedding of a passage, on the Gemini model.
const EMBED_FN: &str = r#"
name = "embed"
kind = "embedding"
args = ["text"]
dim = 24
prompt = "{{ text }}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedding_functions_get_vectors_of_their_dimension() {
    let s = mock(keyed(MockConfig::default())).await;
    let cfg = config("gemini", &root(&s), 4, "api_key_env = \"GEM_KEY\"\n");
    let def = FunctionDef::parse(EMBED_FN, Path::new("embed.toml")).unwrap();
    let engine = Engine::with_functions(&cfg, vec![def]).unwrap();
    let sql = "CREATE TABLE r AS SELECT p, embed(p) AS v FROM (SELECT arrow_cast('Passage ' || \
               CAST(value AS VARCHAR), 'Utf8') AS p FROM generate_series(1, 250));";
    run(&engine, sql).await.unwrap();
    let batches = engine.query("SELECT p, v FROM r").await.unwrap();
    let mut seen = 0;
    for b in &batches {
        let (p, v) = (
            b.column(0).as_string::<i32>(),
            b.column(1).as_fixed_size_list(),
        );
        for i in 0..b.num_rows() {
            let got = v.value(i).as_primitive::<Float32Type>().values().to_vec();
            assert_eq!(got.len(), 24);
            assert_eq!(got, embedding_of(p.value(i), 24));
            seen += 1;
        }
    }
    assert_eq!(seen, 250);
    let st = s.stats();
    assert_eq!(st.gemini.embedded, 250);
    assert_eq!(st.prompts, 250, "one input per row");
    assert!(
        st.requests <= 25,
        "inputs share requests (up to 100 each): {}",
        st.requests
    );
    assert_eq!(engine.metrics().failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_key_fails_the_run_without_showing_the_key() {
    let s = mock(MockConfig {
        api_key: Some("the-right-key".into()),
        ..MockConfig::default()
    })
    .await;
    // A wrong key: Google's 400 API_KEY_INVALID is an authentication failure.
    let err = flagship_error(&gemini(&s, 2, "")).await;
    assert!(
        err.contains("authentication failed") && err.contains("$GEM_KEY"),
        "{err}"
    );
    assert!(err.contains("API key not valid"), "Google's message: {err}");
    assert!(!err.contains(KEY), "{err}");
    // No key at all: 403 PERMISSION_DENIED.
    let engine = Engine::new(&config("gemini", &root(&s), 2, "")).unwrap();
    let err = flagship_error(&engine).await;
    assert!(
        err.contains("authentication failed") && err.contains("unregistered callers"),
        "{err}"
    );
}

#[test]
fn the_key_is_in_no_log_line_or_output() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(mock(keyed(MockConfig {
        faults: FaultRates {
            rate_limit: 0.1,
            server_503: 0.05,
            ..FaultRates::default()
        },
        ..MockConfig::default()
    })));
    let p = Project::new(&s.base_url(), 4, true);
    let toml = std::fs::read_to_string(p.path("sluice.toml")).unwrap();
    let toml = toml
        .replace("kind = \"openai\"", "kind = \"gemini\"")
        .replace("max_attempts = 2", "max_attempts = 8")
        .replace(&s.base_url(), &root(&s))
        .replace(
            "model = \"mock\"",
            "model = \"gemini-2.5-flash\"\napi_key_env = \"GEM_KEY\"",
        );
    p.write("sluice.toml", &toml);
    p.write("q.sql", &project_flagship_sql("out/qa.parquet"));
    let out = p
        .command(&["-vv", "run", "q.sql"])
        .env("GEM_KEY", KEY)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("DEBUG"),
        "debug logs were written: {stderr}"
    );
    assert!(s.stats().faults.values().sum::<u64>() > 0);
    assert!(!stdout.contains(KEY) && !stderr.contains(KEY));
    assert!(
        !any_file_holds(p.dir.path(), KEY),
        "no key in the cache or the output"
    );
}

#[test]
fn configuration_errors_are_one_line() {
    let parse = |extra: &str| {
        let text = format!("[models.g]\nkind = \"gemini\"\nmodel = \"gemini-2.5-pro\"\n{extra}");
        Config::parse(&text, Path::new("sluice.toml"), &|_| None).map_err(|e| e.to_string())
    };
    let cfg = parse("input_usd_per_mtok = 1.25\noutput_usd_per_mtok = 10\n").unwrap();
    let m = &cfg.models["g"];
    assert_eq!(
        m.server().unwrap().base_url,
        "https://generativelanguage.googleapis.com"
    );
    let p = m.prices.unwrap();
    assert!(
        (p.cached_input - 0.125).abs() < 1e-12,
        "0.1 x the input price"
    );
    assert_eq!(p.cache_write, 1.25, "no write charge apart");
    let cfg = parse(
        "input_usd_per_mtok = 0.1\noutput_usd_per_mtok = 0.4\ncached_input_usd_per_mtok = 0.025\n",
    )
    .unwrap();
    assert_eq!(cfg.models["g"].prices.unwrap().cached_input, 0.025);
    assert!(
        Config::parse(
            "[models.g]\nkind = \"gemini\"\nmodel = \"models/gemini-2.5-flash\"\n",
            Path::new("sluice.toml"),
            &|_| None
        )
        .is_ok()
    );
    let errors = [
        ("prompts_per_request = 4\n", "one prompt per request"),
        (
            "base_url = \"https://generativelanguage.googleapis.com?key=AIzaXYZ\"\n",
            "must not carry a query",
        ),
        (
            "prompt_cache_min_tokens = 1024\n",
            "belongs to kind = \"anthropic\"",
        ),
        (
            "api_version = \"v1beta\"\n",
            "belongs to kind = \"azure_openai\"",
        ),
        ("thinking_budget = 0\n", "unknown field `thinking_budget`"),
    ];
    for (extra, says) in errors {
        let e = parse(extra).unwrap_err();
        assert!(e.contains(says), "{extra}: {e}");
        assert!(!e.contains('\n'), "one line: {e}");
        assert!(!e.contains("AIzaXYZ"), "{e}");
    }
    let odd_id = Config::parse(
        "[models.g]\nkind = \"gemini\"\nmodel = \"gemini 2.5/flash?x\"\n",
        Path::new("sluice.toml"),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        odd_id.contains("not a Gemini model id") && !odd_id.contains('\n'),
        "{odd_id}"
    );
}
