//! A statement dropped mid-flight leaves the engine as it found it: every governor admission,
//! budget permit and dedup entry of the calls it cancelled is given back on drop.
//!
//! The case: an LLM filter under a LIMIT stops reading after the first match, so the calls on
//! the wire when it stops are cancelled. Twice, and then a statement that makes 400 calls must
//! run at full speed — in one `sluice run` file and in one `sluice sql` shell session.

mod support;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const KEEP: &str = r#"
name = "keep"
args = ["x"]
prompt = "Keep {{ x }}?"
output = { type = "boolean" }
"#;

const TAG: &str = r#"
name = "tag"
args = ["x"]
prompt = "Tag {{ x }}"
"#;

/// Concurrency of the project (the model's governor admits this many requests at once).
const CONCURRENCY: usize = 8;

const SCRIPT: &str = "CREATE TABLE t AS SELECT CAST(value AS VARCHAR) AS x FROM range(400);\n\
                      SELECT x FROM t WHERE keep(x) LIMIT 1;\n\
                      SELECT x FROM t WHERE keep(concat(x, '!')) LIMIT 1;\n\
                      SELECT count(tag(x)) AS n FROM t;\n";

fn project(base_url: &str) -> Project {
    let p = Project::new(base_url, CONCURRENCY, false);
    for f in ["generate_questions.toml", "answer_question.toml"] {
        std::fs::remove_file(p.path(&format!("udfs/{f}"))).unwrap();
    }
    p.write("udfs/keep.toml", KEEP);
    p.write("udfs/tag.toml", TAG);
    p.write("q.sql", SCRIPT);
    p
}

/// Waits for `child` at most `limit`; kills it and fails the test if it is still running.
fn wait_within(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let started = Instant::now();
    loop {
        if child.try_wait().expect("child status").is_some() {
            return child.wait_with_output().expect("child output");
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("child output");
            panic!(
                "still running after {limit:?} (the cancelled calls kept their slots?)\n\
                 stdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The process succeeded and its last statement counted 400 values.
fn assert_counted_400(out: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| 400 |"), "{stdout}");
}

fn mock_50ms() -> MockConfig {
    MockConfig {
        latency: Duration::from_millis(50),
        ..MockConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_cancelled_by_limit_give_their_slots_back_in_a_run() {
    let s = mock(mock_50ms()).await;
    let p = project(&s.base_url());
    let child = p
        .command(&["run", "q.sql", "--quiet", "--metrics-json", "m.json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice runs");
    // 400 calls at 8 in flight and 50 ms each take 2.5 s; a leaked slot makes it hang.
    let out = tokio::task::spawn_blocking(move || wait_within(child, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_counted_400(&out);
    let m: Value = serde_json::from_str(&std::fs::read_to_string(p.path("m.json")).unwrap())
        .expect("metrics JSON");
    let tag = &m["functions"]["tag"];
    assert_eq!(tag["requests"], 400, "{m}");
    // Full speed: the last statement had the model's whole concurrency.
    assert_eq!(tag["max_in_flight"], CONCURRENCY as u64, "{m}");
    // The filters were cut short: far fewer than 2 x 400 calls.
    let keep = m["functions"]["keep"]["requests"].as_u64().unwrap();
    assert!(keep < 200, "LIMIT 1 stopped the filter early: {keep} calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_cancelled_by_limit_give_their_slots_back_in_the_shell() {
    let s = mock(mock_50ms()).await;
    let p = project(&s.base_url());
    let mut child = p
        .command(&["sql"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice sql runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(SCRIPT.as_bytes())
        .unwrap();
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || wait_within(child, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_counted_400(&out);
    let requests = s.stats().requests;
    assert!(requests < 600, "{requests} requests");
    // 2.5 s of calls at full concurrency; half the slots lost would double it.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}
