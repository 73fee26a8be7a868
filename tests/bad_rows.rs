//! `OPTIONS ('bad_rows' 'fail' | 'skip' | 'null')` on a JSON-lines table, through the `sluice`
//! binary on the real excerpts with two malformed lines and a lone surrogate escape inserted:
//! `fail` names the file and line, `skip` leaves the lines out (and no call is made for them),
//! `null` reads them as rows of NULLs; the summary and `--metrics-json` name the file and lines.
//! A lone surrogate reads as U+FFFD in every mode. The scan is split into byte ranges (as
//! DataFusion does for large files) to show every range decides the same way.

mod support;

use serde_json::Value;
use support::*;

/// The excerpts with a malformed line 5, a lone surrogate on line 8 and a malformed line 12.
fn corrupt(p: &Project) {
    let text = std::fs::read_to_string(p.path("data/t.jsonl")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.insert(4, "{\"ticker\": \"CSTE\", \"q\": broken".into());
    lines.insert(
        7,
        r#"{"ticker": "SUR\ud800", "q": "2019-Q2", "date": "d", "transcript": "lone \udc00 low"}"#
            .into(),
    );
    lines.insert(11, "[1, 2, 3]".into());
    p.write("data/t.jsonl", &(lines.join("\n") + "\n"));
}

fn script(mode: &str) -> String {
    format!(
        "SET datafusion.optimizer.repartition_file_min_size = 1000;\n\
         CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/t.jsonl' OPTIONS ('bad_rows' '{mode}');\n\
         COPY (SELECT ticker, transcript, llm(ticker || ' ' || left(transcript, 40)) AS a FROM t) \
         TO 'out/r.parquet' STORED AS PARQUET;\n"
    )
}

fn run_mode(p: &Project, mode: &str) -> (i32, String, Value) {
    p.write("q.sql", &script(mode));
    let (code, _, stderr) = p.run_args(&["run", "--metrics-json", "m.json", "q.sql"]);
    let metrics = std::fs::read_to_string(p.path("m.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    (code, stderr, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_skip_and_null() {
    let s = mock(MockConfig::default()).await;
    let p = Project::new(&s.base_url(), 8, false);
    corrupt(&p);

    let (code, stderr, _) = run_mode(&p, "fail");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("t.jsonl:5"),
        "names the first bad line: {stderr}"
    );
    assert!(!p.path("out/r.parquet").exists());
    assert_eq!(s.stats().requests, 0);

    let (code, stderr, metrics) = run_mode(&p, "skip");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("t.jsonl: 2 malformed lines skipped (lines 5, 12)"),
        "{stderr}"
    );
    let bad = &metrics["bad_rows"][0];
    assert_eq!(bad["mode"], "skip");
    assert_eq!(bad["lines"], 2);
    assert_eq!(bad["first_lines"], serde_json::json!([5, 12]));
    assert!(bad["file"].as_str().unwrap().ends_with("data/t.jsonl"));
    let rows = read_parquet(&p.path("out/r.parquet")).await;
    let tickers = strings(&rows, "ticker");
    assert_eq!(tickers.len(), 15, "14 excerpts and the surrogate row");
    assert_eq!(s.stats().requests, 15, "no call for a skipped line");
    // The lone surrogates read as U+FFFD.
    assert!(tickers.contains(&Some("SUR\u{fffd}".into())), "{tickers:?}");
    let texts = strings(&rows, "transcript");
    assert!(texts.contains(&Some("lone \u{fffd} low".into())));

    let (code, stderr, metrics) = run_mode(&p, "null");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("2 malformed lines read as NULLs"),
        "{stderr}"
    );
    assert_eq!(metrics["bad_rows"][0]["mode"], "null");
    let rows = read_parquet(&p.path("out/r.parquet")).await;
    let tickers = strings(&rows, "ticker");
    assert_eq!(tickers.len(), 17);
    assert_eq!(tickers.iter().filter(|t| t.is_none()).count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_surrogate_alone_is_no_error_by_default() {
    let s = mock(MockConfig::default()).await;
    let p = Project::new(&s.base_url(), 8, false);
    p.write(
        "data/t.jsonl",
        "{\"ticker\": \"A\\ud800\", \"transcript\": \"x\"}\n{\"ticker\": \"B\", \"transcript\": \"\\ud83d\\ude00\"}\n",
    );
    let (code, stdout, stderr) = p.run_args(&[
        "run",
        "-q",
        "--format",
        "csv",
        "-c",
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/t.jsonl'; SELECT * FROM t ORDER BY ticker;",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "ticker,transcript\nA\u{fffd},x\nB,\u{1f600}\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_lines_with_the_wrong_number_of_fields() {
    let s = mock(MockConfig::default()).await;
    let p = Project::new(&s.base_url(), 8, false);
    p.write(
        "data/t.csv",
        "ticker,n,note\nA,1,\"one, with a comma\"\nB,2\nC,3,three\nD,4,four,extra\nE,5,five\n",
    );
    let sql = |mode: &str| {
        format!(
            "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION 'data/t.csv' \
             OPTIONS ('format.has_header' 'true', 'bad_rows' '{mode}'); \
             SELECT ticker, n, note FROM t ORDER BY n;"
        )
    };
    let (code, stdout, stderr) = p.run_args(&["run", "--format", "csv", "-c", &sql("skip")]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout,
        "ticker,n,note\nA,1,\"one, with a comma\"\nC,3,three\nE,5,five\n"
    );
    assert!(
        stderr.contains("t.csv: 2 malformed lines skipped (lines 3, 5)"),
        "{stderr}"
    );
    let (code, stdout, stderr) = p.run_args(&["run", "--format", "csv", "-c", &sql("null")]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 1 + 5, "{stdout}");
    let (code, _, stderr) = p.run_args(&["run", "-c", &sql("fail")]);
    assert_eq!(code, 1, "{stderr}");
}
