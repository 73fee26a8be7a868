//! The embedded local model on the real GGUF (SmolLM2-135M-Instruct Q4_1, fetched into models/
//! by scripts/fetch-model.sh): the flagship's functions run in-process, and the output schema's
//! grammar makes `generate_questions` return exactly three questions.
#![cfg(feature = "local")]

mod support;

use std::path::Path;

use datafusion::arrow::array::{Array, AsArray};
use sluice::Engine;
use sluice::config::Config;
use support::*;

fn local_config() -> Config {
    let model = repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.exists(),
        "{} is missing: run scripts/fetch-model.sh (scripts/test.sh does)",
        model.display()
    );
    let text = format!(
        "[cache]\nenabled = false\n[models.default]\nkind = \"local\"\nmodel = \"{}\"\n\
         concurrency = 4\ncontext_size = 2048\n",
        model.display()
    );
    let mut cfg = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
    cfg.udf_dir = repo().join("udfs");
    cfg
}

fn engine() -> Engine {
    Engine::new(&local_config()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generates_three_questions_and_answers_offline() {
    let e = engine();
    let data = shared_data("earnings_transcript_excerpts.jsonl");
    let sql = format!(
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION '{}';\n\
         CREATE TABLE p AS SELECT ticker, q, date, substr(transcript, 1, 1200) AS passage \
         FROM t ORDER BY date, q LIMIT 3;\n\
         CREATE TABLE g AS SELECT ticker, q, date, passage, \
           generate_questions(ticker, q, date, passage) AS qs, \
           generate_questions_error(ticker, q, date, passage) AS err FROM p;\n\
         CREATE TABLE a AS SELECT answer_question(ticker, q, date, passage, qs[1]) AS answer, \
           answer_question_error(ticker, q, date, passage, qs[1]) AS err FROM g;\n",
        data.display()
    );
    run(&e, &sql).await.unwrap();
    let g = e
        .query("SELECT qs, err['kind'] AS kind FROM g")
        .await
        .unwrap();
    let mut rows = 0;
    for b in &g {
        let qs = b.column(0).as_list::<i32>();
        let kind = b.column(1).as_string::<i32>();
        for i in 0..b.num_rows() {
            rows += 1;
            assert!(kind.is_null(i), "error: {}", kind.value(i));
            let list = qs.value(i);
            let list = list.as_string::<i32>();
            assert_eq!(list.len(), 3, "exactly three questions");
            for j in 0..3 {
                assert!(!list.value(j).trim().is_empty(), "question {j} is empty");
                eprintln!("Q: {}", list.value(j));
            }
        }
    }
    assert_eq!(rows, 3);
    let a = e
        .query("SELECT answer, err['kind'], err['message'] FROM a")
        .await
        .unwrap();
    for b in &a {
        let ans = b.column(0).as_string::<i32>();
        let msg = b.column(2).as_string::<i32>();
        for i in 0..b.num_rows() {
            assert!(b.column(1).is_null(i), "answer failed: {}", msg.value(i));
            assert!(!ans.value(i).trim().is_empty());
            eprintln!("A: {}", ans.value(i));
        }
    }
    let m = e.metrics();
    assert_eq!(m.calls, 6);
    assert!(m.tokens_out > 0 && m.tokens_in > 0);
    eprintln!("{}", sluice::cli::format_summary(&m));

    // `sluice explain` counts the same prompts with the GGUF's own vocabulary and chat template:
    // stage 1's prompt tokens exactly as the model was fed them.
    let cfg = local_config();
    let x = Engine::for_estimates(&cfg)
        .unwrap()
        .explain_script(&sql, "test.sql")
        .await
        .unwrap();
    let gq = x
        .totals
        .iter()
        .find(|f| f.function == "generate_questions")
        .unwrap();
    let actual = m.functions["generate_questions"].tokens_in;
    assert_eq!((gq.calls, gq.tokens_in), (3, actual), "{gq:?}");
    assert_eq!(gq.cost_usd, Some(0.0), "a local model costs nothing");
    assert!(x.tokenizers["default"].contains("GGUF vocabulary of SmolLM2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_file_fails_the_statement_with_the_fix() {
    let text = "[cache]\nenabled = false\n[models.default]\nkind = \"local\"\n\
                model = \"/nonexistent/model.gguf\"\n";
    let mut cfg = Config::parse(text, Path::new("sluice.toml"), &|_| None).unwrap();
    cfg.udf_dir = repo().join("udfs");
    let e = Engine::new(&cfg).unwrap();
    let err = run(&e, "SELECT llm('hello');").await.unwrap_err();
    assert!(
        err.contains("/nonexistent/model.gguf") && err.contains("fetch-model.sh"),
        "{err}"
    );
    let err = Engine::for_estimates(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("/nonexistent/model.gguf") && err.contains("fetch-model.sh"),
        "explain says the same: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeds_offline_with_the_local_model() {
    let embed = r#"
name = "embed_local"
kind = "embedding"
args = ["text"]
dim = 576
prompt = "{{ text }}"
"#;
    let def = sluice::udf::def::FunctionDef::parse(embed, Path::new("embed.toml")).unwrap();
    let e = Engine::with_functions(&local_config(), vec![def]).unwrap();
    let data = shared_data("earnings_transcript_excerpts.jsonl");
    let sql = format!(
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION '{}';\n\
         CREATE TABLE v AS SELECT date, substr(transcript, 1, 600) AS p, \
           embed_local(substr(transcript, 1, 600)) AS v, \
           embed_local_error(substr(transcript, 1, 600)) AS err FROM t ORDER BY date LIMIT 4;\n",
        data.display()
    );
    run(&e, &sql).await.unwrap();
    let b = e
        .query(
            "SELECT a.p = b.p AS same, cosine_similarity(a.v, b.v) AS c, a.err['message'] AS m \
             FROM v a, v b",
        )
        .await
        .unwrap();
    let mut pairs = 0;
    for batch in &b {
        let same = batch.column(0).as_boolean();
        let c = batch
            .column(1)
            .as_primitive::<datafusion::arrow::datatypes::Float64Type>();
        for i in 0..batch.num_rows() {
            assert!(
                !c.is_null(i),
                "every passage has its vector: {:?}",
                batch.column(2)
            );
            if same.value(i) {
                assert!(
                    (c.value(i) - 1.0).abs() < 1e-5,
                    "a vector is itself: {}",
                    c.value(i)
                );
            } else {
                assert!(c.value(i) < 0.9999, "different passages, different vectors");
            }
            pairs += 1;
        }
    }
    assert_eq!(pairs, 16);
}

/// The engine with the local model decoding `parallel` rows together in `context_size` tokens
/// per row.
fn engine_at(parallel: usize, context_size: u32) -> Engine {
    let model = repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let text = format!(
        "[cache]\nenabled = false\n[models.default]\nkind = \"local\"\nmodel = \"{}\"\n\
         concurrency = {parallel}\ncontext_size = {context_size}\n",
        model.display()
    );
    let mut cfg = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
    cfg.udf_dir = repo().join("udfs");
    Engine::new(&cfg).unwrap()
}

/// Every answer of table `a` (columns `answer`, `err`) is there and matches the function's
/// pattern; returns how many.
async fn valid_answers(e: &Engine) -> usize {
    let pattern = regex::Regex::new(r#"^([A-Z$][^\n"{}\\]{2,240}[.]|I don't know[.])$"#).unwrap();
    let a = e
        .query("SELECT answer, err['kind'], err['message'] FROM a")
        .await
        .unwrap();
    let mut n = 0;
    for b in &a {
        let ans = b.column(0).as_string::<i32>();
        let msg = b.column(2).as_string::<i32>();
        for i in 0..b.num_rows() {
            assert!(b.column(1).is_null(i), "answer failed: {}", msg.value(i));
            assert!(pattern.is_match(ans.value(i)), "{:?}", ans.value(i));
            n += 1;
        }
    }
    n
}

/// Asks `questions` about the first `chars` characters of the first `passages` real excerpts
/// (by date): `answer_question` into table `a` (columns `answer`, `err`).
async fn ask_about_passages(e: &Engine, chars: usize, passages: usize, questions: &[&str]) {
    let data = shared_data("earnings_transcript_excerpts.jsonl");
    let values: Vec<String> = questions.iter().map(|q| format!("('{q}')")).collect();
    let sql = format!(
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION '{}';\n\
         CREATE TABLE p AS SELECT ticker, q, date, substr(transcript, 1, {chars}) AS passage \
         FROM t ORDER BY date, q LIMIT {passages};\n\
         CREATE TABLE qs AS SELECT * FROM p CROSS JOIN (VALUES {}) AS v(question);\n\
         CREATE TABLE a AS SELECT answer_question(ticker, q, date, passage, question) AS answer, \
           answer_question_error(ticker, q, date, passage, question) AS err FROM qs;\n",
        data.display(),
        values.join(", ")
    );
    run(e, &sql).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_sharing_a_passage_decode_it_once() {
    let e = engine_at(4, 2048);
    // Two passages, three questions each: the answer prompts of one passage share everything
    // up to the question.
    let questions = [
        "What was the revenue?",
        "How much did margins grow?",
        "What is the guidance for next quarter?",
    ];
    ask_about_passages(&e, 2000, 2, &questions).await;
    assert_eq!(valid_answers(&e).await, 6);
    let m = e.metrics();
    let f = &m.functions["answer_question"];
    let decoded = f.tokens_in - f.tokens_cached;
    eprintln!("{}", sluice::cli::format_summary(&m));
    assert!(
        f.tokens_cached > 0 && decoded * 2 < f.tokens_in,
        "the passage is decoded once per passage, not per question: {} sent, {} taken from \
         kept cells",
        f.tokens_in,
        f.tokens_cached
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_prefixes_never_take_the_room_of_a_running_row() {
    // Three rows at once in a context of 1,024 tokens a row, each prompt most of it: kept
    // cells of finished rows (and prompts sharing a passage among them) must never make a
    // long distinct prompt fail or lose its cells.
    let e = engine_at(3, 1024);
    let questions = ["What was the revenue?", "How much did margins grow?"];
    ask_about_passages(&e, 2400, 5, &questions).await;
    assert_eq!(valid_answers(&e).await, 10);
    let m = e.metrics();
    assert_eq!((m.calls, m.failed), (10, 0));
}

/// The embedded model's answers carry their confidence: a cascade from it to a server passes
/// on no row when the threshold is tiny, and the rows below a threshold of 1 when it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_model_leads_a_cascade_by_its_tokens_probabilities() {
    let server = mock(MockConfig::default()).await;
    let mut cfg = local_config();
    let text = format!(
        "[models.large]\nkind = \"openai\"\nbase_url = \"{}\"\nmodel = \"large\"\n",
        server.base_url()
    );
    let large = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
    cfg.models.extend(large.models);
    let def = |min: &str| {
        format!(
            "name = \"positive\"\nargs = [\"x\"]\nprompt = \"Is this good news? {{{{ x }}}}\"\n\
             output = {{ type = \"boolean\" }}\nmax_tokens = 8\n\
             cascade = [{{ model = \"default\", min_confidence = {min} }}, {{ model = \"large\" }}]\n"
        )
    };
    let sql = "SELECT positive_model(x) AS m FROM (VALUES ('Revenue doubled.'), \
               ('The plant burned down.'), ('Margins held.')) AS t(x)";
    let answered_by = |e: Engine| async move {
        let batches = e.query(sql).await.unwrap();
        let mut by = Vec::new();
        for b in &batches {
            let m = b.column(0).as_string::<i32>();
            by.extend((0..m.len()).map(|i| m.value(i).to_string()));
        }
        by
    };
    let defs = |min: &str| {
        vec![sluice::udf::def::FunctionDef::parse(&def(min), Path::new("p.toml")).unwrap()]
    };
    let sure = answered_by(Engine::with_functions(&cfg, defs("1e-9")).unwrap()).await;
    assert_eq!(sure, vec!["default"; 3]);
    assert_eq!(server.stats().requests, 0);
    let strict = answered_by(Engine::with_functions(&cfg, defs("1.0")).unwrap()).await;
    let passed_on = strict.iter().filter(|m| *m == "large").count();
    assert!(
        passed_on > 0,
        "a small model is never certain of every token: {strict:?}"
    );
    assert_eq!(server.stats().requests, passed_on as u64);
}
