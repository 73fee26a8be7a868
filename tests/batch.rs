//! Batch mode (`mode = "batch"`, `sluice run --batch`) against the test server's Files and
//! Batches API over real HTTP: the same Parquet as live mode, one uploaded line per distinct
//! call, stage 2 only after stage 1's results, resume after SIGKILL without uploading again,
//! retries of failed lines and jobs, and clear errors for servers without the API, refused
//! files and jobs cancelled by someone else.

mod support;

use std::time::Duration;

use support::mock_llm::BatchConfig;
use support::*;

/// A project on `s` with the cache on, `max_attempts` attempts, the flagship as `q.sql`, and
/// `model` + `batch` appended to `[models.default]` and `[models.default.batch]`.
fn project(s: &MockServer, attempts: u32, model: &str, batch: &str) -> Project {
    let p = Project::new(&s.base_url(), 8, true);
    let cfg = std::fs::read_to_string(p.path("sluice.toml"))
        .unwrap()
        .replace("max_attempts = 2", &format!("max_attempts = {attempts}"));
    p.write(
        "sluice.toml",
        &format!("{cfg}{model}\n[models.default.batch]\npoll_ms = 20\ncollect_ms = 150\n{batch}"),
    );
    p.write("q.sql", &project_flagship_sql("out/qa.parquet"));
    p
}

async fn server(batch: BatchConfig, faults: FaultRates) -> MockServer {
    mock(MockConfig {
        batch,
        faults,
        ..MockConfig::default()
    })
    .await
}

/// Runs `sluice run q.sql ARGS` in `p`; (exit code, stderr).
async fn run(p: &Project, args: &[&str]) -> (i32, String) {
    let mut all = vec!["run", "q.sql"];
    all.extend_from_slice(args);
    let (code, _, stderr) = tokio::task::block_in_place(|| p.run_args(&all));
    (code, stderr)
}

async fn rows(p: &Project) -> Vec<String> {
    sorted_rows(&read_parquet(&p.path("out/qa.parquet")).await)
}

/// The flagship run live on a fault-free server: its rows and its number of requests.
async fn live_run() -> (Vec<String>, u64) {
    let s = server(BatchConfig::default(), FaultRates::default()).await;
    let p = project(&s, 2, "", "");
    let (code, stderr) = run(&p, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    (rows(&p).await, s.stats().requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flagship_in_batch_mode_writes_what_live_mode_writes() {
    let (live, calls) = live_run().await;
    let s = server(BatchConfig::default(), FaultRates::default()).await;
    let p = project(&s, 2, "mode = \"batch\"", "");
    let (code, stderr) = run(&p, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        rows(&p).await,
        live,
        "batch mode writes the live run's rows"
    );
    let st = s.stats();
    assert_eq!(st.requests, 0, "nothing is sent live");
    assert_eq!(st.batch_lines, calls, "one uploaded line per distinct call");
    // Stage 1 (questions) is one job; stage 2 (answers) needs its results, so it is another.
    let jobs = s.batches();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert_eq!(st.files_uploaded, 2);
    let (questions, answers) = (jobs[0].1, jobs[1].1);
    assert_eq!(questions + answers, calls);
    assert_eq!(
        answers,
        3 * questions,
        "stage 2 holds only answers: {jobs:?}"
    );
    assert!(stderr.contains("batch batch_"), "progress lines: {stderr}");
    assert!(stderr.contains("completed"), "{stderr}");

    // A re-run is answered by the cache: nothing uploaded.
    let (code, stderr) = run(&p, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(s.stats().files_uploaded, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_while_its_job_runs_resumes_the_job_without_uploading_again() {
    let (live, _) = live_run().await;
    let slow = BatchConfig {
        completion_time: Duration::from_secs(3),
        ..BatchConfig::default()
    };
    let s = server(slow, FaultRates::default()).await;
    let p = project(&s, 2, "", "");
    let mut child = p
        .command(&["run", "q.sql", "--batch", "--quiet"])
        .spawn()
        .expect("sluice starts");
    // The job is stored before it is first polled.
    wait_until("the first poll of the job", || {
        assert!(child.try_wait().unwrap().is_none(), "finished too early");
        s.stats().batch_polls > 0
    })
    .await;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    assert_eq!(s.stats().files_uploaded, 1);
    assert!(!p.path("out/qa.parquet").exists());

    let (code, stderr) = run(&p, &["--batch"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("resumed"), "the job is picked up: {stderr}");
    let st = s.stats();
    assert_eq!(
        st.files_uploaded, 2,
        "only stage 2 is uploaded after the kill, not stage 1 again"
    );
    assert_eq!(s.batches().len(), 2);
    assert_eq!(
        rows(&p).await,
        live,
        "the resumed run writes the clean run's rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_lines_a_failed_job_an_expired_job_and_invalid_outputs_are_retried() {
    let (live, calls) = live_run().await;
    let faulty = BatchConfig {
        fail_jobs: 1,
        expire_jobs: 1,
        ..BatchConfig::default()
    };
    let faults = FaultRates {
        server_500: 0.1,
        rate_limit: 0.05,
        invalid_schema: 0.1,
        finish_length: 0.05,
        ..FaultRates::default()
    };
    let s = server(faulty, faults).await;
    let p = project(&s, 8, "mode = \"batch\"", "");
    let (code, stderr) = run(&p, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    let got = rows(&p).await;
    assert_eq!(got.len(), live.len(), "no row lost");
    assert_eq!(got, live, "every row ends with its value after retries");
    let st = s.stats();
    assert_eq!(st.requests, 0, "retries go in follow-up batches");
    assert!(s.batches().len() >= 4, "{:?}", s.batches());
    assert!(st.batch_lines > calls, "failed lines were sent again");
    assert!(stderr.contains("retries"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_live_sends_failed_lines_as_live_requests() {
    let (live, calls) = live_run().await;
    let faults = FaultRates {
        server_500: 0.2,
        ..FaultRates::default()
    };
    let s = server(BatchConfig::default(), faults).await;
    let p = project(&s, 8, "", "retry = \"live\"\n");
    let (code, stderr) = run(&p, &["--batch"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(rows(&p).await, live);
    let st = s.stats();
    assert_eq!(st.batch_lines, calls, "each call is in a batch once");
    assert!(st.requests > 0, "the failed ones were sent live");
    assert_eq!(s.batches().len(), 2, "no follow-up batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_split_at_the_request_limit() {
    let (live, calls) = live_run().await;
    let s = server(BatchConfig::default(), FaultRates::default()).await;
    let p = project(&s, 2, "mode = \"batch\"", "max_requests = 10\n");
    let (code, stderr) = run(&p, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(rows(&p).await, live);
    let jobs = s.batches();
    assert!(jobs.iter().all(|(_, n)| *n <= 10), "{jobs:?}");
    assert_eq!(jobs.iter().map(|(_, n)| n).sum::<u64>(), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_batch_api_is_one_clear_error() {
    let off = BatchConfig {
        enabled: false,
        ..BatchConfig::default()
    };
    let s = server(off, FaultRates::default()).await;
    let p = project(&s, 2, "", "");
    let (code, stderr) = run(&p, &["--batch"]).await;
    assert_eq!(code, 1, "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("no batch API") && errors[0].contains("mode = \"live\""),
        "{stderr}"
    );
    assert!(!p.path("out/qa.parquet").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_provider_refuses_is_one_clear_error() {
    let small = BatchConfig {
        max_file_bytes: 4096,
        ..BatchConfig::default()
    };
    let s = server(small, FaultRates::default()).await;
    let p = project(&s, 2, "", "");
    let (code, stderr) = run(&p, &["--batch"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("refused") && stderr.contains("max_bytes"),
        "{stderr}"
    );
    // Within the provider's limit, the same run goes through.
    let p = project(&s, 2, "", "max_bytes = \"4KB\"\n");
    let (code, stderr) = run(&p, &["--batch"]).await;
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_by_someone_else_fails_the_statement_and_the_rerun_submits_anew() {
    let slow = BatchConfig {
        completion_time: Duration::from_secs(2),
        ..BatchConfig::default()
    };
    let s = server(slow, FaultRates::default()).await;
    let p = project(&s, 2, "", "");
    let child = p
        .command(&["run", "q.sql", "--batch"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sluice starts");
    wait_until("a job", || !s.batches().is_empty()).await;
    let id = s.batches()[0].0.clone();
    assert!(s.cancel_batch(&id));
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("batch job {id}")) && stderr.contains("was cancelled"),
        "{stderr}"
    );
    assert!(!p.path("out/qa.parquet").exists());
    let (code, stderr) = run(&p, &["--batch"]).await;
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_false_leaves_jobs_running_and_the_same_command_collects_them() {
    let (live, _) = live_run().await;
    let s = server(BatchConfig::default(), FaultRates::default()).await;
    let p = project(&s, 2, "mode = \"batch\"", "");
    let (code, stderr) = run(&p, &["--wait", "false"]).await;
    assert_eq!(code, 75, "{stderr}");
    assert!(
        stderr.contains("1 batch job(s)") && stderr.contains("same command collects"),
        "{stderr}"
    );
    let (code, stdout, stderr) = p.run_args(&["batches"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("batch_") && stdout.contains("model default"),
        "{stdout}"
    );
    // The job completes meanwhile; the next run collects it and submits stage 2.
    wait_until("stage 1's job to end", || s.batches_ended()).await;
    let (code, stderr) = run(&p, &["--wait", "false"]).await;
    assert_eq!(code, 75, "{stderr}");
    assert_eq!(s.stats().files_uploaded, 2);
    wait_until("stage 2's job to end", || s.batches_ended()).await;
    let (code, stderr) = run(&p, &["--wait", "false"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(rows(&p).await, live);
    assert_eq!(s.stats().files_uploaded, 2, "nothing uploaded twice");
    let (_, stdout, _) = p.run_args(&["batches"]);
    assert!(stdout.contains("no open batch jobs"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_cancel_cancels_open_jobs_at_the_provider() {
    let slow = BatchConfig {
        completion_time: Duration::from_secs(30),
        ..BatchConfig::default()
    };
    let s = server(slow, FaultRates::default()).await;
    let p = project(&s, 2, "mode = \"batch\"", "");
    let (code, stderr) = run(&p, &["--wait", "false"]).await;
    assert_eq!(code, 75, "{stderr}");
    let (code, stdout, stderr) = p.run_args(&["batches", "cancel"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("cancel"), "{stdout}");
    assert_eq!(s.stats().batch_cancels, 1);
    let (_, stdout, _) = p.run_args(&["batches"]);
    assert!(stdout.contains("no open batch jobs"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_prices_batch_mode_at_batch_prices() {
    let s = server(BatchConfig::default(), FaultRates::default()).await;
    let p = project(
        &s,
        2,
        "input_usd_per_mtok = 0.15\noutput_usd_per_mtok = 0.6",
        "",
    );
    let json = |args: &[&str]| {
        let mut all = vec!["explain", "q.sql", "--json"];
        all.extend_from_slice(args);
        let (code, stdout, stderr) = p.run_args(&all);
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
    };
    let live = json(&[]);
    let batch = json(&["--batch"]);
    let cost = |v: &serde_json::Value, k: &str| v["total"][k].as_f64().unwrap();
    assert!((cost(&batch, "cost_usd") * 2.0 - cost(&live, "cost_usd")).abs() < 1e-9);
    assert!((cost(&batch, "live_cost_usd") - cost(&live, "cost_usd")).abs() < 1e-9);
    assert_eq!(batch["total"]["batch_files"], 2);
    let (_, text, _) = p.run_args(&["explain", "q.sql", "--batch", "--no-plan"]);
    assert!(
        text.contains("as a batch (1 file(s) of model default)"),
        "{text}"
    );
    assert!(text.contains("at batch prices"), "{text}");
    assert_eq!(
        s.stats().files_uploaded + s.stats().requests,
        0,
        "explain sends nothing"
    );
}
