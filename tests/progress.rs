//! The progress display: drawn per LLM function when stderr is a terminal (run here under a
//! pseudo-terminal with script(1)), absent when it is not, and absent with --quiet.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_drawn_on_a_terminal_only() {
    let s = mock(MockConfig {
        latency: Duration::from_millis(30),
        ..MockConfig::default()
    })
    .await;
    let p = Project::new(&s.base_url(), 4, false);
    p.write("q.sql", &project_flagship_sql("out/qa.parquet"));
    let dir = p.dir.path().to_path_buf();
    let (tty, piped, quiet) = tokio::task::spawn_blocking(move || {
        let sluice = env!("CARGO_BIN_EXE_sluice");
        let tty = Command::new("script")
            .current_dir(&dir)
            .env_remove("SLUICE_CONFIG")
            .args(["-qec", &format!("{sluice} run q.sql"), "/dev/null"])
            .output()
            .expect("script(1) runs");
        let piped = Command::new(sluice)
            .current_dir(&dir)
            .args(["run", "q.sql"])
            .output()
            .unwrap();
        let quiet = Command::new("script")
            .current_dir(&dir)
            .args(["-qec", &format!("{sluice} run q.sql --quiet"), "/dev/null"])
            .output()
            .unwrap();
        let text = |o: &std::process::Output| {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        };
        (text(&tty), text(&piped), text(&quiet))
    })
    .await
    .unwrap();
    for f in ["generate_questions", "answer_question"] {
        assert!(tty.contains(f), "{tty}");
    }
    assert!(
        tty.contains("42 / 42 prompts"),
        "final counts drawn:\n{tty}"
    );
    assert!(tty.contains("COPY 42 rows"), "{tty}");
    assert!(
        !piped.contains(" prompts ·"),
        "no progress when not a terminal:\n{piped}"
    );
    assert!(piped.contains("LLM: 56 calls"), "{piped}");
    assert!(
        !quiet.contains(" prompts ·") && !quiet.contains("LLM:"),
        "{quiet}"
    );
}
