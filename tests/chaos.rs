//! The chaos profile: the flagship over 500 passages against a server injecting every fault at
//! once — 5% 429 with Retry-After, 2% 500, 1% each of 503, dropped connection mid-body, malformed
//! JSON, truncated body, schema-invalid content and finish_reason = length, and 0.5% hangs past
//! the client timeout. Every row must be present, every accepted value schema-valid and from its
//! own prompt, and every failed row must carry a typed error.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use sluice::Engine;
use sluice::config::Config;
use support::*;

const KNOWN: [&str; 9] = [
    "rate_limited",
    "server_error",
    "timeout",
    "connection",
    "malformed_response",
    "invalid_output",
    "truncated",
    "empty",
    "too_large",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagship_under_every_fault_at_once_keeps_every_row() {
    let server = mock(MockConfig {
        faults: FaultRates {
            rate_limit: 0.05,
            server_500: 0.02,
            server_503: 0.01,
            dropped_connection: 0.01,
            malformed_json: 0.01,
            truncated_body: 0.01,
            invalid_schema: 0.01,
            finish_length: 0.01,
            wrong_count: 0.0,
            timeout: 0.005,
        },
        retry_after_ms: 20,
        hang: Duration::from_millis(1500),
        seed: 2026,
        ..MockConfig::default()
    })
    .await;
    // Few attempts, so that some rows do fail and their errors can be checked.
    let text = format!(
        "[dispatcher]\nconcurrency = 64\nmax_attempts = 3\nbackoff_base_ms = 5\n\
         backoff_max_ms = 100\n[cache]\nenabled = false\n[models.default]\nkind = \"openai\"\n\
         base_url = \"{}\"\nmodel = \"m\"\ntimeout_ms = 400\n",
        server.base_url()
    );
    let mut cfg = Config::parse(&text, Path::new("sluice.toml"), &|_| None).unwrap();
    cfg.udf_dir = repo().join("udfs");
    let engine = Engine::new(&cfg).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("corpus.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    // 50 companies x 10 quarters: 500 transcripts of one passage each.
    sluice::source::corpus::write_corpus(&mut f, 9, 50, 10, None).unwrap();
    drop(f);
    let out = dir.path().join("qa.parquet");
    run(&engine, &flagship_sql(&input, &out)).await.unwrap();
    let b = read_parquet(&out).await;

    let passages = strings(&b, "passage");
    let questions = strings(&b, "question");
    let answers = strings(&b, "answer");
    let (qk, ak) = (
        error_kinds(&b, "question_error"),
        error_kinds(&b, "answer_error"),
    );
    let mut per_passage: HashMap<&str, usize> = HashMap::new();
    for p in &passages {
        *per_passage.entry(p.as_deref().unwrap()).or_default() += 1;
    }
    assert_eq!(per_passage.len(), 500, "every passage is present");
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut accepted, mut failed) = (0u64, 0u64);
    for i in 0..passages.len() {
        match (&questions[i], &qk[i]) {
            (None, Some(kind)) => {
                // A failed question stage keeps its passage once, with the typed error.
                assert!(KNOWN.contains(&kind.as_str()), "{kind}");
                assert_eq!(per_passage[passages[i].as_deref().unwrap()], 1);
                *errors.entry(format!("question {kind}")).or_default() += 1;
                failed += 1;
                continue;
            }
            (Some(q), None) => {
                assert!(q.contains("What was the figure"), "accepted question {q}");
                assert_eq!(per_passage[passages[i].as_deref().unwrap()], 3);
            }
            other => panic!("question and its error disagree: {other:?}"),
        }
        match (&answers[i], &ak[i]) {
            (Some(a), None) => {
                assert!(a.starts_with("Answer ["), "accepted answer {a}");
                accepted += 1;
            }
            (None, Some(kind)) => {
                assert!(KNOWN.contains(&kind.as_str()), "{kind}");
                *errors.entry(format!("answer {kind}")).or_default() += 1;
                failed += 1;
            }
            other => panic!("answer and its error disagree: {other:?}"),
        }
    }
    let st = server.stats();
    let mut faults: Vec<_> = st.faults.iter().collect();
    faults.sort();
    eprintln!(
        "chaos: {} requests, faults injected {faults:?}; rows in 500 passages, rows out {}, \
         answers accepted {accepted}, failed rows {failed} {errors:?}",
        st.requests,
        passages.len()
    );
    assert!(
        st.faults.len() >= 8,
        "every fault kind was injected: {faults:?}"
    );
    assert!(accepted > 1000);
}
