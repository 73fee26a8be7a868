//! The flagship pipeline end to end on real HTTP and real Parquet read-back.

mod support;

use std::collections::HashMap;

use datafusion::arrow::datatypes::DataType;
use support::rows::{assert_provenance, rows};
use support::*;

fn excerpts() -> std::path::PathBuf {
    shared_data("earnings_transcript_excerpts.jsonl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagship_over_real_excerpts_three_questions_per_passage() {
    let server = mock(MockConfig::default()).await;
    let engine = flagship_engine(&server, 4);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qa.parquet");
    let printed = run(&engine, &flagship_sql(&excerpts(), &out))
        .await
        .unwrap();
    assert!(printed.contains("COPY 42 rows"), "{printed}");

    let batches = read_parquet(&out).await;
    let schema = batches[0].schema();
    for col in [
        "company", "quarter", "date", "passage", "question", "answer",
    ] {
        assert_eq!(
            schema.field_with_name(col).unwrap().data_type(),
            &DataType::Utf8,
            "{col}"
        );
    }
    for col in ["question_error", "answer_error"] {
        assert!(matches!(
            schema.field_with_name(col).unwrap().data_type(),
            DataType::Struct(_)
        ));
    }
    let rows = rows(&batches);
    assert_eq!(rows.len(), 42, "14 passages x 3 questions");
    let mut per_passage: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        *per_passage.entry(r.passage.as_str()).or_default() += 1;
        assert_eq!(r.company, "CSTE");
        assert_provenance(&engine, r);
    }
    assert_eq!(per_passage.len(), 14);
    assert!(per_passage.values().all(|n| *n == 3), "{per_passage:?}");
    assert!(
        error_kinds(&batches, "answer_error")
            .iter()
            .all(Option::is_none)
    );

    // Exactly one request per prompt: 14 question prompts + 42 answer prompts.
    let stats = server.stats();
    assert_eq!(stats.requests, 56);
    assert!(stats.by_prompt.values().all(|n| *n == 1));
    let m = engine.metrics();
    assert_eq!((m.calls, m.requests, m.failed), (56, 56, 0));
    // The progress counters: every row handed over and finished, no input left open (so the
    // totals shown were final and the ETA could be drawn).
    use std::sync::atomic::Ordering::Relaxed;
    for (name, rows) in [("generate_questions", 14), ("answer_question", 42)] {
        let f = engine.live_metrics().function(name);
        let counts = (
            f.rows_queued.load(Relaxed),
            f.rows_finished.load(Relaxed),
            f.open_inputs.load(Relaxed),
        );
        assert_eq!(counts, (rows, rows, 0), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagship_under_transient_faults_loses_nothing() {
    let cfg = MockConfig {
        faults: FaultRates {
            rate_limit: 0.05,
            server_500: 0.02,
            malformed_json: 0.01,
            truncated_body: 0.01,
            invalid_schema: 0.01,
            ..FaultRates::default()
        },
        retry_after_ms: 5,
        seed: 7,
        ..MockConfig::default()
    };
    let server = mock(cfg).await;
    let engine = flagship_engine(&server, 10);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qa.parquet");
    run(&engine, &flagship_sql(&excerpts(), &out))
        .await
        .unwrap();
    let batches = read_parquet(&out).await;
    let rows = rows(&batches);
    assert_eq!(rows.len(), 42);
    for r in &rows {
        assert_provenance(&engine, r);
    }
    let stats = server.stats();
    let faults: u64 = stats.faults.values().sum();
    assert!(faults > 0, "the profile injected faults: {stats:?}");
    assert_eq!(stats.requests, 56 + faults, "one retry per injected fault");
    let m = engine.metrics();
    assert_eq!(m.failed, 0);
    assert_eq!(m.retries.values().sum::<u64>(), faults);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_faults_keep_rows_with_null_and_typed_error() {
    let text = std::fs::read_to_string(excerpts()).unwrap();
    let transcripts: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["transcript"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // A marker found in exactly one passage (the excerpts overlap a little): its question call
    // always returns schema-invalid output.
    let third: Vec<char> = transcripts[2].chars().collect();
    let marker: String = (0..third.len() - 60)
        .step_by(50)
        .map(|i| third[i..i + 60].iter().collect::<String>())
        .find(|m| {
            transcripts
                .iter()
                .filter(|t| t.contains(m.as_str()))
                .count()
                == 1
        })
        .expect("a unique marker");
    let cfg = MockConfig {
        permanent: vec![
            (marker.clone(), Fault::InvalidSchema),
            // Every answer prompt for a second question always fails with HTTP 500.
            (
                "Question: What was the figure for item 2 [".to_string(),
                Fault::Server500,
            ),
        ],
        ..MockConfig::default()
    };
    let server = mock(cfg).await;
    let engine = flagship_engine(&server, 3);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qa.parquet");
    run(&engine, &flagship_sql(&excerpts(), &out))
        .await
        .unwrap();
    let batches = read_parquet(&out).await;
    let rows = rows(&batches);
    let qerr = error_kinds(&batches, "question_error");
    let aerr = error_kinds(&batches, "answer_error");
    // 13 passages x 3 questions + the failed passage kept as one row.
    let summary: Vec<String> = rows
        .iter()
        .zip(&qerr)
        .map(|(r, e)| format!("{:?} {:?} {:?}", &r.passage[..20], r.question, e))
        .collect();
    assert_eq!(rows.len(), 13 * 3 + 1, "{summary:#?}");
    let mut failed_passages = 0;
    for (i, r) in rows.iter().enumerate() {
        if r.passage.contains(&marker) {
            failed_passages += 1;
            assert!(r.question.is_none() && r.answer.is_none());
            assert_eq!(qerr[i].as_deref(), Some("invalid_output"));
            assert_eq!(aerr[i].as_deref(), Some("null_input"));
        } else if r
            .question
            .as_deref()
            .unwrap()
            .starts_with("What was the figure for item 2 ")
        {
            assert!(r.answer.is_none());
            assert_eq!(aerr[i].as_deref(), Some("server_error"));
        } else {
            assert_provenance(&engine, r);
            assert!(aerr[i].is_none() && qerr[i].is_none());
        }
    }
    assert_eq!(failed_passages, 1);
    // Failed calls were tried exactly max_attempts times; nothing else was retried.
    let stats = server.stats();
    // Questions: 13 passages once + the failing one 3 times; answers: Q1 and Q3 once, Q2 3 times.
    assert_eq!(stats.requests, (13 + 3) + (13 * 2) + (13 * 3));
}
