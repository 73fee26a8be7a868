//! The command line beyond `run`: `sluice explain` against an actual run on the test server
//! (which bills tokens as OpenAI does), `--budget-usd`, the script given by `-c`, stdin and
//! `--set`, the `--format` of printed rows, and the `sluice sql` shell with piped input and on a
//! pseudo-terminal.

mod support;

use std::io::Write;

use serde_json::Value;
use support::*;

/// Prices written into the project's sluice.toml (USD per million tokens).
const PRICE_IN: f64 = 0.15;
const PRICE_OUT: f64 = 0.60;

fn priced_project(base_url: &str) -> Project {
    let p = Project::new(base_url, 4, true);
    let cfg = std::fs::read_to_string(p.path("sluice.toml")).unwrap();
    p.write(
        "sluice.toml",
        &format!("{cfg}input_usd_per_mtok = {PRICE_IN}\noutput_usd_per_mtok = {PRICE_OUT}\n"),
    );
    p.write("q.sql", &project_flagship_sql("out/qa.parquet"));
    p
}

fn function<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == name)
        .unwrap_or_else(|| panic!("{name} in {v}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is a number in {v}"))
}

fn within(estimate: u64, actual: u64, tolerance: f64) -> bool {
    (estimate as f64 - actual as f64).abs() <= tolerance * actual as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_matches_the_actual_run_and_calls_nothing() {
    let s = mock(MockConfig {
        tiktoken_usage: true,
        ..MockConfig::default()
    })
    .await;
    let p = priced_project(&s.base_url());
    let (code, out, err) = p.run_args(&["explain", "q.sql", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(s.stats().requests, 0, "explain calls no model");
    assert!(!p.path("out/qa.parquet").exists(), "explain writes nothing");
    let est: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));

    // 14 passages: 14 question calls, and 3 questions each (minItems = maxItems = 3) → 42 answers.
    let gq = function(&est, "generate_questions");
    let aq = function(&est, "answer_question");
    assert_eq!((n(gq, "calls"), n(gq, "requests")), (14, 14), "{gq}");
    assert_eq!((n(aq, "calls"), n(aq, "requests")), (42, 42), "{aq}");
    let copy = est["statements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["summary"].as_str().unwrap().starts_with("COPY"))
        .expect("the COPY statement");
    assert_eq!(copy["rows"], 42, "{copy}");
    assert!(
        copy["plan"]
            .as_str()
            .unwrap()
            .contains("generate_questions"),
        "{copy}"
    );

    // The actual run on the test server.
    let (code, _, err) = p.run_args(&["run", "q.sql", "--metrics-json", "m.json"]);
    assert_eq!(code, 0, "{err}");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(p.path("m.json")).unwrap()).unwrap();
    let actual = |f: &str, k: &str| m["functions"][f][k].as_u64().unwrap();
    // Prompts of stage 1 are known exactly; stage 2's contain the questions, which explain can
    // only guess, so its prompt count may differ by their length.
    assert_eq!(
        n(gq, "tokens_in"),
        actual("generate_questions", "tokens_in"),
        "stage 1 prompt tokens counted exactly"
    );
    assert!(
        within(
            n(aq, "tokens_in"),
            actual("answer_question", "tokens_in"),
            0.05
        ),
        "stage 2 prompt tokens: {} estimated, {} actual",
        n(aq, "tokens_in"),
        actual("answer_question", "tokens_in")
    );
    let total_est = n(&est["total"], "tokens_in") + n(&est["total"], "tokens_out");
    let total_actual = m["tokens_in"].as_u64().unwrap() + m["tokens_out"].as_u64().unwrap();
    assert!(
        within(total_est, total_actual, 0.15),
        "total tokens: {total_est} estimated, {total_actual} actual (goal: within 15%)"
    );
    let cost = est["total"]["cost_usd"].as_f64().unwrap();
    let expected = (n(&est["total"], "tokens_in") as f64 * PRICE_IN
        + n(&est["total"], "tokens_out") as f64 * PRICE_OUT)
        / 1e6;
    assert!((cost - expected).abs() < 1e-9, "{cost} vs {expected}");

    // After the run every call is cached: the same plan costs nothing.
    s.reset_stats();
    let (code, out, err) = p.run_args(&["explain", "q.sql", "--json"]);
    assert_eq!(code, 0, "{err}");
    let again: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(n(&again["total"], "calls"), 56);
    assert_eq!(n(&again["total"], "cached"), 56);
    assert_eq!(n(&again["total"], "requests"), 0);
    assert_eq!(again["total"]["cost_usd"].as_f64(), Some(0.0));
    assert_eq!(s.stats().requests, 0);

    // The text form: plans, the table and how tokens were counted.
    let (code, text, err) = p.run_args(&["explain", "q.sql"]);
    assert_eq!(code, 0, "{err}");
    for needle in [
        "Statement 4 (line",
        "generate_questions",
        "tokens out (est.)",
        "tiktoken o200k_base",
        "reads what statement 4 writes",
    ] {
        assert!(text.contains(needle), "{needle:?} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_sample_measures_completions_and_extrapolates() {
    let s = mock(MockConfig {
        tiktoken_usage: true,
        ..MockConfig::default()
    })
    .await;
    let p = priced_project(&s.base_url());
    let (code, out, err) = p.run_args(&["explain", "q.sql", "--json", "--sample", "2"]);
    assert_eq!(code, 0, "{err}");
    // The sample ran for real on 2 transcripts: 2 question calls and 6 answers, nothing written.
    assert_eq!(s.stats().requests, 2 + 6);
    assert!(!p.path("out/qa.parquet").exists(), "explain writes nothing");
    let est: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let how = est["extrapolated"].as_str().expect("says it extrapolated");
    assert!(how.contains("first 2 rows"), "{how}");
    let aq = function(&est, "answer_question");
    // The sampled answers are cached: the rest are the requests still to send.
    assert_eq!(
        (n(aq, "calls"), n(aq, "cached"), n(aq, "requests")),
        (42, 6, 36)
    );

    // The run sends those requests; its completion tokens are what was extrapolated.
    let (code, _, err) = p.run_args(&["run", "q.sql", "--metrics-json", "m.json"]);
    assert_eq!(code, 0, "{err}");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(p.path("m.json")).unwrap()).unwrap();
    assert_eq!(m["functions"]["answer_question"]["requests"], 36);
    for f in ["generate_questions", "answer_question"] {
        let actual = m["functions"][f]["tokens_out"].as_u64().unwrap();
        let estimated = n(function(&est, f), "tokens_out");
        assert!(
            within(estimated, actual, 0.10),
            "{f}: {estimated} completion tokens extrapolated, {actual} actual"
        );
    }
    let (_, text, _) = p.run_args(&["explain", "q.sql", "--sample", "1"]);
    assert!(
        text.contains("completion tokens are extrapolated"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_reports_a_bad_statement_like_run() {
    let s = mock(MockConfig::default()).await;
    let p = priced_project(&s.base_url());
    p.write(
        "bad.sql",
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/';\n\
         SELECT generate_questions(ticker, q, date) FROM t;\n",
    );
    let (code, out, err) = p.run_args(&["explain", "bad.sql"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.starts_with("error: bad.sql:2: statement 2"),
        "names file, line and statement: {err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(s.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dollar_budget_stops_cleanly_and_needs_prices() {
    let s = mock(MockConfig {
        tiktoken_usage: true,
        ..MockConfig::default()
    })
    .await;
    // Without prices the budget cannot be enforced: refused before any call.
    let unpriced = Project::new(&s.base_url(), 4, true);
    unpriced.write("q.sql", &project_flagship_sql("out/qa.parquet"));
    let (code, _, err) = unpriced.run_args(&["run", "q.sql", "--budget-usd", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("model default") && err.contains("input_usd_per_mtok"),
        "{err}"
    );
    assert_eq!(s.stats().requests, 0);

    // The whole run costs about $0.009 at these prices: $0.003 stops it about a third through.
    // No hedging: on a busy machine a hedge would be a request whose answer is the same call's
    // (counted by the server, not a call the re-run could have been spared).
    let p = priced_project(&s.base_url());
    let cfg = std::fs::read_to_string(p.path("sluice.toml")).unwrap();
    assert!(cfg.contains("[dispatcher]\n"), "{cfg}");
    p.write(
        "sluice.toml",
        &cfg.replace("[dispatcher]\n", "[dispatcher]\nhedge_after_ms = 0\n"),
    );
    let (code, _, err) = p.run_args(&["run", "q.sql", "--budget-usd", "0.003"]);
    assert_eq!(code, 3, "{err}");
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(line.contains("cost budget of $0.003"), "{line}");
    let stop = err
        .lines()
        .find(|l| l.starts_with("stopped by the budget"))
        .unwrap_or_else(|| panic!("a line saying what was done: {err}"));
    assert!(
        stop.contains("statements 1 to 3 completed, statement 4"),
        "{stop}"
    );
    assert!(!p.path("out/qa.parquet").exists(), "no partial output");
    let spent = s.stats().requests;
    assert!(
        (5..56).contains(&spent),
        "{spent} requests within the budget"
    );
    s.reset_stats();
    let (code, _, err) = p.run_args(&["run", "q.sql", "--metrics-json", "m.json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        s.stats().requests,
        56 - spent,
        "the re-run sends only what the budget stopped"
    );
}

/// Input for the shell: meta commands, a multi-line statement, an LLM call and a bad statement.
const SESSION: &str = "\\d\n\
CREATE EXTERNAL TABLE t\n  STORED AS JSON LOCATION 'data/t.jsonl';\n\
\\d t\n\
SELECT ticker, generate_questions(ticker, q, date, substr(transcript, 1, 400)) AS qs\n\
  FROM (SELECT * FROM t ORDER BY ticker LIMIT 2);\n\
SELECT no_such_column FROM t;\n\
\\d generate_questions\n\
\\q\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_runs_statements_from_piped_input() {
    let s = mock(MockConfig::default()).await;
    let p = Project::new(&s.base_url(), 4, false);
    let (code, stdout, stderr) = p.run_with_stdin(&["sql"], SESSION);
    assert_eq!(code, 1, "a failed statement: exit 1\n{stderr}");
    // \d before any table: the LLM functions with their signatures.
    assert!(stdout.contains("No tables."), "{stdout}");
    assert!(
        stdout.contains("generate_questions(ticker, quarter, date, passage) -> List("),
        "{stdout}"
    );
    assert!(stdout.contains("answer_question("), "{stdout}");
    // \d t: the columns of the table created by the multi-line statement.
    assert!(stdout.contains("transcript"), "{stdout}");
    // The LLM call ran for exactly the two rows and printed them.
    assert!(stdout.contains("(2 rows)"), "{stdout}");
    assert_eq!(s.stats().prompts, 2);
    // The bad statement's error, and the session went on to the last command.
    assert!(stderr.contains("no_such_column"), "{stderr}");
    assert!(
        stdout.contains("also: generate_questions_error"),
        "{stdout}"
    );
    assert!(!stdout.contains("sluice>"), "no prompt on piped input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_prompts_on_a_terminal() {
    let s = mock(MockConfig::default()).await;
    let p = Project::new(&s.base_url(), 4, false);
    let dir = p.dir.path().to_path_buf();
    let (code, text) = tokio::task::spawn_blocking(move || {
        on_a_terminal(&dir, "sql", |stdin, seen| {
            // Type each line only once its prompt is drawn, as a person would (input typed
            // ahead of the prompt is discarded when the line editor takes the terminal).
            let lines = [
                "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/t.jsonl';",
                "SELECT count(*) AS n",
                "FROM t;",
                "\\q",
            ];
            for (i, line) in lines.iter().enumerate() {
                wait_until_blocking(&format!("prompt {}", i + 1), || {
                    seen().matches("> ").count() > i
                });
                stdin.write_all(format!("{line}\r").as_bytes()).unwrap();
            }
        })
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("sluice> "), "the prompt is drawn: {text}");
    assert!(text.contains("   ...> "), "continuation prompt: {text}");
    assert!(
        text.contains("| 14 |"),
        "the count of the 14 transcripts: {text}"
    );
    assert!(p.path(".sluice/history").exists(), "history kept");
}

/// `llm(head)` over the first 12 characters of the first excerpts in their order.
const TWO_CALLS: &str = "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION '${CORPUS}';\n\
                         SELECT left(transcript, 12) AS head, llm(left(transcript, 12)) AS a FROM t \
                         ORDER BY head LIMIT ${N:-2};";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_from_c_and_stdin_with_set_and_formats() {
    let s = mock(MockConfig::default()).await;
    let p = Project::new(&s.base_url(), 4, false);
    let dir = p.dir.path().to_path_buf();

    // -c with --set, as CSV: a header and the rows, nothing else on stdout.
    let args = [
        "run",
        "-q",
        "--format",
        "csv",
        "--set",
        "CORPUS=data/t.jsonl",
        "-c",
        TWO_CALLS,
    ];
    let (code, stdout, stderr) = p.run_args(&args);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "header and 2 rows only:\n{stdout}");
    assert_eq!(lines[0], "head,a");
    let heads = excerpt_heads(&dir.join("data/t.jsonl"));
    for (line, head) in lines[1..].iter().zip(&heads) {
        let answer = format!("Answer [{}]", prompt_hash(None, head));
        assert!(line.starts_with(&format!("{head},")), "{line}");
        assert!(
            line.contains(&answer),
            "each row carries its own answer: {line}"
        );
    }
    assert!(stderr.contains("CREATE EXTERNAL TABLE t"), "{stderr}");
    assert_eq!(s.stats().prompts, 2, "ORDER BY ... LIMIT 2 makes 2 calls");

    // The same script from stdin, as JSON lines, with N given: 3 objects.
    let (code, stdout, stderr) = p.run_with_stdin(
        &[
            "run",
            "-q",
            "--format",
            "json",
            "--set",
            "CORPUS=data/t.jsonl",
            "--set",
            "N=3",
            "-",
        ],
        TWO_CALLS,
    );
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    assert_eq!(rows[2]["head"].as_str(), Some(heads[2].as_str()));

    // A variable without a value: exit 2, naming it, before any call.
    let (code, _, stderr) = p.run_args(&["run", "-c", TWO_CALLS]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("${CORPUS}") && stderr.contains("--set CORPUS="),
        "{stderr}"
    );
    // The default table format prints the row count.
    let (code, stdout, _) =
        p.run_args(&["run", "-q", "--set", "CORPUS=data/t.jsonl", "-c", TWO_CALLS]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("(2 rows)") && stdout.contains("CREATE EXTERNAL TABLE t"),
        "{stdout}"
    );
}

/// The first 12 characters of each transcript of a JSON-lines file, sorted.
fn excerpt_heads(path: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            v["transcript"]
                .as_str()
                .map(|t| t.chars().take(12).collect())
        })
        .collect();
    v.sort();
    v
}
