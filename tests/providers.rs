//! List-prompt providers: OpenAI-compatible text completions and Lamini's API, several prompts
//! per request through the dispatcher's batcher, on real HTTP against the test server.

mod support;

use std::path::Path;

use minijinja::Value;
use sluice::Engine;
use sluice::config::Config;
use support::*;

/// An engine whose `default` model is `kind` at `base_url`, with the repository's functions.
fn engine(kind: &str, base_url: &str, batch: usize, concurrency: usize) -> Engine {
    let text = format!(
        "[dispatcher]\nconcurrency = {concurrency}\nmax_attempts = 8\nbackoff_base_ms = 1\n\
         backoff_max_ms = 20\n[cache]\nenabled = false\n[models.default]\nkind = \"{kind}\"\n\
         base_url = \"{base_url}\"\nmodel = \"m\"\nprompts_per_request = {batch}\ntimeout_ms = 3000\n"
    );
    let mut cfg = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
    cfg.udf_dir = repo().join("udfs");
    Engine::new(&cfg).unwrap()
}

/// Runs the flagship over the real excerpts; checks 42 rows, every answer tagged with the hash
/// of its own flat prompt (system, blank line, user), and returns what the server saw.
async fn flagship_batched(engine: &Engine, server: &MockServer) -> StatsSnapshot {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qa.parquet");
    let sql = flagship_sql(&shared_data("earnings_transcript_excerpts.jsonl"), &out);
    run(engine, &sql).await.unwrap();
    let batches = read_parquet(&out).await;
    let (c, q, d, p) = (
        strings(&batches, "company"),
        strings(&batches, "quarter"),
        strings(&batches, "date"),
        strings(&batches, "passage"),
    );
    let (questions, answers) = (strings(&batches, "question"), strings(&batches, "answer"));
    assert_eq!(answers.len(), 42, "14 passages x 3 questions");
    let def = engine.function("answer_question").unwrap();
    for i in 0..answers.len() {
        let args = [&c[i], &q[i], &d[i], &p[i], &questions[i]]
            .map(|v| Value::from(v.clone().expect("no NULL input")));
        let prompt = def.render(&args).unwrap();
        let flat = format!("{}\n\n{}", prompt.system.unwrap(), prompt.user);
        let h = prompt_hash(None, &flat);
        let answer = answers[i].as_ref().expect("every row answered");
        assert!(
            answer.contains(&format!("[{h}]")),
            "{answer} is not row {i}'s"
        );
    }
    server.stats()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_list_prompts_carry_several_prompts_per_request() {
    let s = mock(MockConfig::default()).await;
    let e = engine("openai_completions", &s.base_url(), 8, 4);
    let st = flagship_batched(&e, &s).await;
    assert_eq!(st.prompts, 56, "14 question prompts + 42 answer prompts");
    assert!(
        st.requests <= 56 / 2,
        "{} requests for 56 prompts",
        st.requests
    );
    let m = e.metrics();
    assert_eq!(m.requests, st.requests);
    assert_eq!(m.calls, 56);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_report_the_prompt_tokens_the_server_held() {
    let s = mock(MockConfig {
        prefix_cache: Some(support::mock_llm::PrefixCacheConfig::default()),
        ..MockConfig::default()
    })
    .await;
    // One request at a time: a later request finds the prefixes of the earlier ones.
    let e = engine("openai_completions", &s.base_url(), 8, 1);
    let st = flagship_batched(&e, &s).await;
    let m = e.metrics();
    assert!(m.tokens_cached > 0, "{st:?}");
    // A request's usage is shared evenly by its prompts (rounded down).
    assert!(m.tokens_cached <= st.prefill_cached, "{st:?}");
    assert!(
        st.prefill_cached - m.tokens_cached < 8 * st.requests,
        "{st:?}"
    );
    assert!(m.tokens_cached < m.tokens_in);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lamini_output_type_round_trips_three_questions_per_passage() {
    let s = mock(MockConfig::default()).await;
    let root = s.base_url().trim_end_matches("/v1").to_string();
    let e = engine("lamini", &root, 16, 4);
    let st = flagship_batched(&e, &s).await;
    assert_eq!(st.prompts, 56);
    assert!(st.requests <= 56 / 2, "{} requests", st.requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_requests_absorb_transient_faults() {
    let s = mock(MockConfig {
        faults: FaultRates {
            rate_limit: 0.05,
            server_500: 0.02,
            malformed_json: 0.02,
            truncated_body: 0.02,
            invalid_schema: 0.02,
            ..FaultRates::default()
        },
        retry_after_ms: 5,
        ..MockConfig::default()
    })
    .await;
    let e = engine("openai_completions", &s.base_url(), 4, 4);
    let st = flagship_batched(&e, &s).await;
    let m = e.metrics();
    assert_eq!(m.failed, 0, "{:?}", m.errors);
    assert!(st.prompts >= 56);
}

#[test]
fn lamini_refuses_outputs_output_type_cannot_hold() {
    let text = "[cache]\nenabled = false\n[models.default]\nkind = \"lamini\"\nmodel = \"m\"\n";
    let cfg = Config::parse(text, Path::new("sluice.toml"), &|_| None).unwrap();
    assert_eq!(
        cfg.models["default"].server().unwrap().base_url,
        "https://api.lamini.ai"
    );
    let def = sluice::udf::def::FunctionDef::parse(
        "name = \"nested\"\nargs = [\"x\"]\nprompt = \"{{ x }}\"\n\
         output = { type = \"object\", properties = { a = { type = \"object\", properties = \
         { b = { type = \"string\" } } } } }\n",
        Path::new("udfs/nested.toml"),
    )
    .unwrap();
    let err = Engine::with_functions(&cfg, vec![def])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nested.toml") && err.contains("output_type"),
        "{err}"
    );
}

#[test]
fn chat_models_refuse_prompts_per_request() {
    let text = "[models.default]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
                model = \"m\"\nprompts_per_request = 8\n";
    let err = Config::parse(text, Path::new("sluice.toml"), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("openai_completions"), "{err}");
}
