//! Bad input through the `sluice` binary: a clear one-line error naming what and where, exit
//! code ≠ 0, no panic, no output file. Also: the API key never appears anywhere.

mod support;

use std::path::Path;

use support::*;

const SECRET: &str = "sk-sluice-test-7c1f9e0dSECRET";

/// Runs `sluice -vv run q.sql` in `p` with `sql` and extra environment variables; returns (exit
/// code, stdout, stderr).
fn run_sql(p: &Project, sql: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    p.write("q.sql", sql);
    let mut cmd = p.command(&["-vv", "run", "q.sql"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("sluice runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

const COPY_QA: &str = "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/';\n\
    COPY (SELECT ticker, answer_question(ticker, q, date, transcript, 'What was revenue?') AS a \
    FROM t) TO 'out/r.parquet' STORED AS PARQUET;\n";

/// Asserts a failed run: exit code, one `error:` line containing every needle, no panic, and
/// no output file.
fn assert_clean_failure(p: &Project, (code, _out, err): &(i32, String, String), needles: &[&str]) {
    eprintln!(
        "[{code}] {}",
        err.lines()
            .filter(|l| l.starts_with("error:"))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    assert_ne!(*code, 0, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "exactly one error line expected:\n{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} should mention {n:?}", lines[0]);
    }
    let out_dir = p.path("out");
    let leftovers: Vec<_> = std::fs::read_dir(&out_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "output left behind: {leftovers:?}");
    assert!(!err.contains(SECRET));
}

async fn server() -> MockServer {
    mock(MockConfig::default()).await
}

async fn in_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_jsonl_line_names_file_and_line() {
    let s = server().await;
    let p = Project::new(&s.base_url(), 8, false);
    let mut text = std::fs::read_to_string(p.path("data/t.jsonl")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[4] = "{\"ticker\": \"CSTE\", \"q\": broken".into();
    text = lines.join("\n");
    p.write("data/t.jsonl", &text);
    let r = in_blocking(move || (run_sql(&p, COPY_QA, &[]), p)).await;
    assert_clean_failure(&r.1, &r.0, &["t.jsonl:5", "q.sql:"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_column() {
    let s = server().await;
    let p = Project::new(&s.base_url(), 8, false);
    let sql = COPY_QA.replace("transcript, 'What", "passage, 'What");
    let r = in_blocking(move || (run_sql(&p, &sql, &[]), p)).await;
    assert_clean_failure(&r.1, &r.0, &["passage", "q.sql:2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_function() {
    let s = server().await;
    let p = Project::new(&s.base_url(), 8, false);
    let sql = COPY_QA.replace("answer_question(", "answer_questions(");
    let r = in_blocking(move || (run_sql(&p, &sql, &[]), p)).await;
    assert_clean_failure(&r.1, &r.0, &["answer_questions", "q.sql:2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_arity() {
    let s = server().await;
    let p = Project::new(&s.base_url(), 8, false);
    let sql = COPY_QA.replace("transcript, 'What was revenue?'", "transcript");
    let r = in_blocking(move || (run_sql(&p, &sql, &[]), p)).await;
    assert_clean_failure(&r.1, &r.0, &["answer_question", "5", "q.sql:2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_with_undefined_variable() {
    let s = server().await;
    let p = Project::new(&s.base_url(), 8, false);
    let t = std::fs::read_to_string(p.path("udfs/answer_question.toml")).unwrap();
    p.write(
        "udfs/answer_question.toml",
        &t.replace("{{ question }}", "{{ questoin }}"),
    );
    let r = in_blocking(move || (run_sql(&p, COPY_QA, &[]), p)).await;
    assert_clean_failure(&r.1, &r.0, &["answer_question.toml", "questoin"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_output_schema() {
    let s = server().await;
    let p = Project::new(&s.base_url(), 8, false);
    let t = std::fs::read_to_string(p.path("udfs/generate_questions.toml")).unwrap();
    p.write(
        "udfs/generate_questions.toml",
        &t.replace(
            "items = { type = \"string\",",
            "items = { type = \"strin\",",
        ),
    );
    let r = in_blocking(move || (run_sql(&p, COPY_QA, &[]), p)).await;
    assert_clean_failure(
        &r.1,
        &r.0,
        &["generate_questions.toml", "output.items", "strin"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_provider() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = Project::new(&format!("http://127.0.0.1:{port}/v1"), 8, false);
    let r = in_blocking(move || (run_sql(&p, COPY_QA, &[]), p)).await;
    assert_clean_failure(
        &r.1,
        &r.0,
        &[
            "answer_question",
            "connect",
            &format!("127.0.0.1:{port}"),
            "q.sql:2",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_api_key_variable() {
    let s = server().await;
    let p = Project::new(&s.base_url(), 8, false);
    let mut cfg = config_text(&s.base_url(), 2, 8);
    cfg.push_str("api_key_env = \"SLUICE_TEST_MISSING_KEY\"\n");
    p.write("sluice.toml", &cfg);
    let r = in_blocking(move || (run_sql(&p, COPY_QA, &[]), p)).await;
    assert_clean_failure(&r.1, &r.0, &["SLUICE_TEST_MISSING_KEY", "sluice.toml"]);
}

fn scan_for_secret(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            scan_for_secret(&path);
        } else {
            let bytes = std::fs::read(&path).unwrap();
            let hay = String::from_utf8_lossy(&bytes);
            assert!(!hay.contains(SECRET), "secret found in {}", path.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_never_appears_in_logs_errors_or_outputs() {
    // The server accepts only the right key: a wrong key fails with an auth error.
    let s = mock(MockConfig {
        api_key: Some(SECRET.to_string()),
        ..MockConfig::default()
    })
    .await;
    // The cache is on, so that the stored responses are scanned too.
    let p = Project::new(&s.base_url(), 8, true);
    let mut cfg = config_text(&s.base_url(), 2, 8).replace("enabled = false", "enabled = true");
    cfg.push_str("api_key_env = \"SLUICE_TEST_KEY\"\n");
    p.write("sluice.toml", &cfg);
    let wrong = format!("{SECRET}-wrong");
    let (p, bad) = in_blocking(move || {
        let r = run_sql(&p, COPY_QA, &[("SLUICE_TEST_KEY", wrong.as_str())]);
        (p, r)
    })
    .await;
    assert_clean_failure(&p, &bad, &["auth", "SLUICE_TEST_KEY"]);
    assert!(!bad.2.contains("-wrong"), "{}", bad.2);

    // The right key works, and appears in no log line, output or file.
    let (p, good) = in_blocking(move || {
        let r = run_sql(&p, COPY_QA, &[("SLUICE_TEST_KEY", SECRET)]);
        (p, r)
    })
    .await;
    assert_eq!(good.0, 0, "{}", good.2);
    assert!(
        good.2.contains("DEBUG") || good.2.contains("LLM:"),
        "{}",
        good.2
    );
    assert!(!good.1.contains(SECRET) && !good.2.contains(SECRET));
    assert!(p.path("out/r.parquet").exists());
    std::fs::remove_file(p.path("sluice.toml")).ok();
    assert!(p.path(".sluice/cache/responses.redb").exists());
    scan_for_secret(p.dir.path());
    assert!(s.stats().requests >= 14);
}

/// Sets up a project, lets `edit` change it, runs `sql`, and checks a clean failure naming
/// every needle.
async fn case(
    sql: &str,
    edit: impl FnOnce(&Project) + Send + 'static,
    needles: &'static [&'static str],
) {
    let s = server().await;
    let p = Project::new(&s.base_url(), 8, false);
    edit(&p);
    let sql = sql.to_string();
    let r = in_blocking(move || (run_sql(&p, &sql, &[]), p)).await;
    assert_clean_failure(&r.1, &r.0, needles);
}

/// Replaces the `base_url` line of the project's sluice.toml.
fn set_base_url(p: &Project, url: &str) {
    let t = std::fs::read_to_string(p.path("sluice.toml")).unwrap();
    let start = t.find("base_url = \"").unwrap();
    let end = start + t[start..].find('\n').unwrap();
    p.write(
        "sluice.toml",
        &format!("{}base_url = \"{url}\"{}", &t[..start], &t[end..]),
    );
}

fn set_config(p: &Project, from: &str, to: &str) {
    let t = std::fs::read_to_string(p.path("sluice.toml")).unwrap();
    assert!(t.contains(from), "{from:?} not in sluice.toml");
    p.write("sluice.toml", &t.replacen(from, to, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_jsonl_file() {
    case(COPY_QA, |p| p.write("data/t.jsonl", ""), &["q.sql:1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_jsonl_file() {
    case(
        COPY_QA,
        |p| {
            std::fs::write(
                p.path("data/t.jsonl"),
                b"{\"ticker\": \"A\xff\xfe\", \"q\": \"x\", \"date\": \"d\", \"transcript\": \"t\"}\n",
            )
            .unwrap()
        },
        &["q.sql:"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_syntax_error_names_the_line() {
    case(
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/';\n\nSELEC ticker FROM t;\n",
        |_| {},
        &["q.sql:3", "statement 2"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_table() {
    case("SELECT * FROM nowhere;\n", |_| {}, &["q.sql:1", "nowhere"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_arguments() {
    let sql = COPY_QA.replace("'What was revenue?')", "'What was revenue?', 'extra')");
    case(&sql, |_| {}, &["answer_question", "q.sql:2"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_toml_in_a_function_file() {
    case(
        COPY_QA,
        |p| p.write("udfs/broken.toml", "name = \"broken\nargs = [\n"),
        &["broken.toml"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_function_names() {
    case(
        COPY_QA,
        |p| {
            let t = std::fs::read_to_string(p.path("udfs/answer_question.toml")).unwrap();
            p.write("udfs/answer_question_copy.toml", &t);
        },
        &["answer_question"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_naming_an_unknown_model() {
    case(
        COPY_QA,
        |p| {
            let t = std::fs::read_to_string(p.path("udfs/answer_question.toml")).unwrap();
            p.write(
                "udfs/answer_question.toml",
                &t.replace("model = \"default\"", "model = \"nosuchmodel\""),
            );
        },
        &["nosuchmodel"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_provider_kind() {
    case(
        COPY_QA,
        |p| set_config(p, "kind = \"openai\"", "kind = \"magic\""),
        &["sluice.toml", "magic"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_base_url() {
    case(
        COPY_QA,
        |p| set_base_url(p, "not a url"),
        &["sluice.toml", "base_url"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_config_key() {
    case(
        COPY_QA,
        |p| set_config(p, "[dispatcher]\n", "[dispatcher]\nconcurency = 8\n"),
        &["sluice.toml", "concurency"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failure() {
    case(
        COPY_QA,
        |p| set_base_url(p, "http://no-such-host.invalid/v1"),
        &["q.sql:2", "no-such-host.invalid"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_path_that_cannot_be_created() {
    // A file where the output's directory should be (root ignores permission bits).
    let sql = COPY_QA.replace("'out/r.parquet'", "'data/t.jsonl/r.parquet'");
    case(&sql, |_| {}, &["q.sql:2", "data/t.jsonl/r.parquet"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_output_format() {
    let sql = COPY_QA.replace("STORED AS PARQUET", "STORED AS XML");
    case(&sql, |_| {}, &["q.sql:2", "XML"]).await;
}

/// Runs `sql` against a server that fails every prompt mentioning revenue, with
/// `answer_question` declared `on_error = "fail"` (and `data/t.jsonl` replaced by `data` if
/// given); asserts that the statement fails cleanly.
async fn on_error_fail_case(data: Option<&'static str>, sql: &'static str) {
    let s = mock(MockConfig {
        permanent: vec![("revenue".to_string(), Fault::Server500)],
        ..MockConfig::default()
    })
    .await;
    let p = Project::new(&s.base_url(), 8, false);
    let t = std::fs::read_to_string(p.path("udfs/answer_question.toml")).unwrap();
    p.write(
        "udfs/answer_question.toml",
        &t.replace("on_error = \"null\"", "on_error = \"fail\""),
    );
    if let Some(data) = data {
        p.write("data/t.jsonl", data);
    }
    let r = in_blocking(move || (run_sql(&p, sql, &[]), p)).await;
    assert_clean_failure(&r.1, &r.0, &["answer_question", "on_error", "q.sql:2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_fail_stops_the_statement_on_a_failed_row() {
    on_error_fail_case(None, COPY_QA).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_fail_looks_past_a_null_argument_to_a_failed_row() {
    // The slice's first row is not called (NULL argument); its second fails. The statement
    // fails on the second, whichever row's error comes first.
    on_error_fail_case(
        Some(
            "{\"ticker\":\"A\",\"q\":\"2024-Q1\",\"date\":\"2024-04-01\",\"transcript\":\"x\",\"question\":null}\n\
             {\"ticker\":\"B\",\"q\":\"2024-Q1\",\"date\":\"2024-04-01\",\"transcript\":\"y\",\"question\":\"What was revenue?\"}\n",
        ),
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/';\n\
         COPY (SELECT ticker, answer_question(ticker, q, date, transcript, question) AS a \
         FROM t) TO 'out/r.parquet' STORED AS PARQUET;\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_text_with_a_bad_size() {
    case(
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/';\n\
         SELECT unnest(chunk_text(transcript, 0)) FROM t;\n",
        |_| {},
        &["q.sql:2", "chunk_text"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_input_directory() {
    case(
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'nowhere/';\nSELECT * FROM t;\n",
        |_| {},
        &["q.sql:1", "nowhere"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_column_type() {
    case(
        "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/';\n\
         COPY (SELECT unnest(chunk_text(transcript, 4096)) AS p FROM t) TO 'out/r.parquet' \
         STORED AS PARQUET;\n",
        |p| {
            p.write(
                "data/t.jsonl",
                "{\"ticker\": \"A\", \"q\": \"2020-Q1\", \"date\": \"d\", \"transcript\": 123}\n",
            )
        },
        &["q.sql:2", "chunk_text", "Int64"],
    )
    .await;
}

/// A 50 MB transcript in one line is data, not an error: it is read and cut into passages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_row_is_read_and_chunked() {
    let s = server().await;
    let p = Project::new(&s.base_url(), 8, false);
    let sentence = "Revenue grew 12% to $4.2 million in the quarter. ";
    let big = sentence.repeat(50 * 1024 * 1024 / sentence.len());
    p.write(
        "data/t.jsonl",
        &format!(
            "{{\"ticker\": \"BIG\", \"q\": \"2020-Q1\", \"date\": \"d\", \"transcript\": \"{big}\"}}\n"
        ),
    );
    let sql = "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/';\n\
               SELECT count(*) AS passages, max(length(p)) AS longest FROM \
               (SELECT unnest(chunk_text(transcript, 4096)) AS p FROM t);\n";
    let (p, (code, out, err)) = in_blocking(move || {
        let r = run_sql(&p, sql, &[]);
        (p, r)
    })
    .await;
    assert_eq!(code, 0, "{err}");
    // Passages end at sentence boundaries, so a little under 4,096 characters each.
    let row = out
        .lines()
        .find(|l| l.starts_with("| ") && !l.contains("passages"))
        .unwrap_or_else(|| panic!("no result row:\n{out}"));
    let cells: Vec<usize> = row
        .split('|')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let (passages, longest) = (cells[0], cells[1]);
    assert!(
        (big.len() / 4096..big.len() / 3500).contains(&passages),
        "{passages} passages"
    );
    assert!(longest <= 4096, "{longest}");
    drop(p);
}
