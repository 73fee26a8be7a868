//! Ctrl-C during `sluice run`, typed on a pseudo-terminal (script(1)) as a user would: the run
//! stops sending, lets the requests on the wire finish, keeps their answers, writes no output
//! file, says so in one line and exits 130; the same command then sends only what was not
//! answered. Runs the flagship over the real excerpts against the test server.

mod support;

use std::io::Write;
use std::time::Duration;

use support::*;

/// Runs `sluice run q.sql` on a terminal in `dir`; types Ctrl-C once `ready()` holds (if given).
/// Returns (exit code, everything the terminal showed).
fn run_on_a_terminal(dir: &std::path::Path, ready: Option<&dyn Fn() -> bool>) -> (i32, String) {
    on_a_terminal(dir, "run q.sql", |stdin, _| {
        if let Some(ready) = ready {
            wait_until_blocking("the moment to interrupt", ready);
            stdin.write_all(b"\x03").unwrap();
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_keeps_the_answers_and_the_same_command_continues() {
    let server = mock(MockConfig {
        latency: Duration::from_millis(150),
        ..MockConfig::default()
    })
    .await;
    let p = Project::new(&server.base_url(), 4, true);
    p.write("q.sql", &project_flagship_sql("out/qa.parquet"));
    let dir = p.dir.path().to_path_buf();
    let stats = server.clone_stats_handle();

    // Interrupt once the second stage has started (the 14 passages answered, some answers).
    let (code, text) = tokio::task::spawn_blocking({
        let dir = dir.clone();
        let stats = stats.clone();
        move || run_on_a_terminal(&dir, Some(&|| stats().requests >= 20))
    })
    .await
    .unwrap();
    let sent_first = stats().requests;
    assert_eq!(code, 130, "{text}");
    assert!(text.contains("stopped: "), "{text}");
    assert!(text.contains("the same command continues"), "{text}");
    let kept: u64 = text
        .split("stopped: ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the line says how many answers are kept: {text}"));
    assert_eq!(
        kept,
        stats().ok,
        "every answer the server gave is kept (those on the wire finished): {text}"
    );
    assert!(kept < 14 + 42, "stopped before the end: {text}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("out"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "no output file, staged or not: {leftovers:?}"
    );

    // The same command continues: it sends only the calls not answered, and finishes.
    let (code, text) = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || run_on_a_terminal(&dir, None)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{text}");
    let sent_second = stats().requests - sent_first;
    assert_eq!(
        sent_second,
        14 + 42 - kept,
        "the re-run sends exactly what was not answered: {text}"
    );
    let rows = read_parquet(&dir.join("out/qa.parquet")).await;
    assert_eq!(rows.iter().map(|b| b.num_rows()).sum::<usize>(), 42);
}
