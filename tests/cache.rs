//! The persistent response cache: re-runs cost nothing, an edited stage re-sends only itself, a
//! run killed with SIGKILL resumes where it stopped, and two processes never share a cache.

mod support;

use std::time::Duration;

use support::*;

async fn in_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Runs the flagship in `p` writing `out`; asserts success and returns the sorted rows.
async fn flagship(p: &Project, out: &str, extra: &[&str]) -> (Vec<String>, String) {
    p.write("q.sql", &project_flagship_sql(out));
    let mut args = vec!["run", "q.sql"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = p.run_args(&args);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    (sorted_rows(&read_parquet(&p.path(out)).await), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_run_sends_nothing_and_an_edited_stage_resends_only_itself() {
    let s = mock(MockConfig::default()).await;
    let p = Project::new(&s.base_url(), 8, true);
    let (first, _) = flagship(&p, "out/a.parquet", &[]).await;
    let prompts = s.stats().requests;
    let answers = first.len() as u64;
    assert!(answers >= 30 && prompts > answers, "{prompts} prompts");

    s.reset_stats();
    let (second, summary) = flagship(&p, "out/b.parquet", &[]).await;
    assert_eq!(
        s.stats().requests,
        0,
        "an identical re-run sends no request"
    );
    assert_eq!(first, second);
    assert!(
        summary.contains(&format!("cache {prompts} hits / 0 misses")),
        "{summary}"
    );

    // --no-cache calls again; --refresh calls again and stores.
    s.reset_stats();
    let (third, _) = flagship(&p, "out/c.parquet", &["--no-cache"]).await;
    assert_eq!(s.stats().requests, prompts);
    assert_eq!(first, third);

    // Edit only the answer template: only the answer stage is sent again.
    let path = p.path("udfs/answer_question.toml");
    let t = std::fs::read_to_string(&path).unwrap();
    let edited = t.replacen(
        "Answer with one short sentence",
        "Please answer with one short sentence",
        1,
    );
    assert_ne!(t, edited, "the answer template was edited");
    std::fs::write(&path, edited).unwrap();
    s.reset_stats();
    let (fourth, _) = flagship(&p, "out/d.parquet", &[]).await;
    assert_eq!(
        s.stats().requests,
        answers,
        "only the {answers} answers are re-sent"
    );
    assert_eq!(fourth.len(), first.len());

    s.reset_stats();
    flagship(&p, "out/e.parquet", &["--refresh"]).await;
    assert_eq!(
        s.stats().requests,
        prompts,
        "--refresh calls everything again"
    );

    // cache stats and clear.
    let (code, stdout, stderr) = p.run_args(&["cache", "stats"]);
    assert_eq!(code, 0, "{stderr}");
    // Entries: the first run's prompts plus the edited answers.
    assert!(
        stdout.contains(&format!("{} responses", prompts + answers)),
        "{stdout}"
    );
    let (code, stdout, _) = p.run_args(&["cache", "clear"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("removed"), "{stdout}");
    s.reset_stats();
    flagship(&p, "out/f.parquet", &[]).await;
    assert_eq!(
        s.stats().requests,
        prompts,
        "a cleared cache calls everything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_resumes_from_the_cache() {
    let concurrency = 4;
    let s = mock(MockConfig {
        latency: Duration::from_millis(40),
        ..MockConfig::default()
    })
    .await;

    // A clean run, on its own cache, gives the expected result and the number of prompts.
    let clean = Project::new(&s.base_url(), concurrency, true);
    let (expected, _) = flagship(&clean, "out/qa.parquet", &[]).await;
    let prompts = s.stats().requests;

    let p = Project::new(&s.base_url(), concurrency, true);
    p.write("q.sql", &project_flagship_sql("out/qa.parquet"));
    s.reset_stats();
    // Kill at a random point between a quarter and three quarters of the prompts.
    let kill_at = prompts / 4 + fastrand::u64(0..=prompts / 2);
    let mut child = p.command(&["run", "q.sql"]).spawn().expect("sluice starts");
    wait_until(&format!("{kill_at} answers"), || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        s.stats().ok >= kill_at
    })
    .await;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    // The requests the dead process left on the wire end.
    wait_until("the requests on the wire to end", || {
        s.stats().in_flight == 0
    })
    .await;
    let answered = s.stats().ok;
    assert!(
        !p.path("out/qa.parquet").exists(),
        "a killed run leaves no final file"
    );

    s.reset_stats();
    let (resumed, summary) = flagship(&p, "out/qa.parquet", &[]).await;
    let resent = s.stats().requests;
    eprintln!(
        "killed after {answered} of {prompts} prompts answered; the re-run sent {resent} \
         ({})",
        summary.trim()
    );
    assert_eq!(resumed, expected, "the resumed result equals a clean run's");
    // Lost at most: the requests on the wire at the kill plus one commit group in the writer.
    let window = 2 * concurrency as u64;
    assert!(
        resent <= prompts - answered + window,
        "re-run sent {resent}, but only {} were unanswered (+{window} window)",
        prompts - answered
    );
    assert!(
        resent >= prompts - answered,
        "every unanswered prompt is sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_cache_gets_a_clear_error() {
    let s = mock(MockConfig {
        latency: Duration::from_millis(100),
        ..MockConfig::default()
    })
    .await;
    let p = Project::new(&s.base_url(), 2, true);
    p.write("q.sql", &project_flagship_sql("out/a.parquet"));
    let mut first = p.command(&["run", "q.sql"]).spawn().unwrap();
    wait_until("the first run's first request", || s.stats().requests > 0).await;
    p.write("q2.sql", &project_flagship_sql("out/b.parquet"));
    let p = in_blocking(move || {
        let (code, _, err) = p.run_args(&["run", "q2.sql"]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("in use by another sluice process"), "{err}");
        assert!(!err.contains("panicked"));
        assert!(!p.path("out/b.parquet").exists());
        p
    })
    .await;
    first.kill().unwrap();
    first.wait().unwrap();
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_budget_stops_cleanly_and_the_rerun_continues() {
    let s = mock(MockConfig::default()).await;
    let p = Project::new(&s.base_url(), 4, true);
    p.write("q.sql", &project_flagship_sql("out/qa.parquet"));
    // Each prompt is about 1,000 tokens: the budget covers roughly a third of the 56 prompts.
    let (code, _, err) = p.run_args(&["run", "q.sql", "--budget-tokens", "20000"]);
    assert_eq!(code, 3, "{err}");
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(line.contains("token budget of 20000"), "{line}");
    assert!(!p.path("out/qa.parquet").exists(), "no partial output");
    let spent = s.stats().requests;
    assert!(
        (5..56).contains(&spent),
        "{spent} requests within the budget"
    );

    s.reset_stats();
    let (rows, _) = flagship(&p, "out/qa.parquet", &[]).await;
    assert_eq!(rows.len(), 42);
    assert_eq!(
        s.stats().requests,
        56 - spent,
        "the re-run sends only what the budget stopped"
    );
}
