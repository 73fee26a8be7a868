//! Only its coordinator: real `sluice worker` processes that require the cluster token before
//! reading a request, refuse to serve beyond loopback without one, and serve over TLS.

mod support;

use support::workers::{KEY, WorkerProcess, cluster_project, worker_list};
use support::*;

/// The cluster token of these tests: recognisable, so that a log or an error showing it fails.
const TOKEN: &str = "cluster-token-5b0e9d3c7a1f42e8";

fn token_env() -> Vec<(&'static str, String)> {
    vec![("SLUICE_CLUSTER_TOKEN", TOKEN.to_string())]
}

/// Runs the flagship on `workers` with `token` (none: the variable unset); returns the exit
/// code and stderr.
fn run_with_token(p: &Project, workers: &str, token: Option<&str>) -> (i32, String) {
    let mut cmd = p.command(&["run", "--workers", workers, "q.sql"]);
    cmd.env("SLUICE_CLUSTER_KEY", KEY);
    if let Some(t) = token {
        cmd.env("SLUICE_CLUSTER_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

async fn key_server() -> MockServer {
    mock(MockConfig {
        api_key: Some(KEY.to_string()),
        ..MockConfig::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_a_coordinator_without_its_token_before_reading_the_plan() {
    let server = key_server().await;
    let p = cluster_project(&server.base_url(), 8);
    let worker = WorkerProcess::spawn_env(&p, ".sluice/w1", "127.0.0.1:0", &token_env());
    let url = worker.url();

    for (presented, why) in [
        (None, "no cluster token"),
        (
            Some("cluster-token-not-the-right-one"),
            "a wrong cluster token",
        ),
    ] {
        let (code, stderr) = run_with_token(&p, &url, presented);
        assert_ne!(code, 0, "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "one error line: {stderr}");
        assert!(
            errors[0].contains("refused the coordinator's cluster token")
                && errors[0].contains("SLUICE_CLUSTER_TOKEN"),
            "{stderr}"
        );
        assert!(!stderr.contains(TOKEN), "{stderr}");
        assert_eq!(server.stats().requests, 0, "{why}: no LLM request was made");
        assert!(!p.path("out/qa.parquet").exists(), "no output file");
    }

    // With the token, the same statement runs.
    let (code, stderr) = run_with_token(&p, &url, Some(TOKEN));
    assert_eq!(code, 0, "{stderr}");
    let batches = read_parquet(&p.path("out/qa.parquet")).await;
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 42);
    assert_eq!(server.stats().requests, 56, "one request per prompt");

    let (code, log) = worker.terminate();
    assert_eq!(code, 0, "{log}");
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused a request from 127.0.0.1:"))
        .collect();
    assert!(
        refusals.iter().any(|l| l.ends_with("no cluster token")),
        "{log}"
    );
    assert!(
        refusals
            .iter()
            .any(|l| l.ends_with("a wrong cluster token")),
        "{log}"
    );
    assert!(!log.contains(TOKEN), "the worker logged the token: {log}");
    assert!(!log.contains(KEY), "the worker logged the key: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_a_token_serves_only_loopback_unless_insecure() {
    let server = key_server().await;
    let p = cluster_project(&server.base_url(), 8);
    let out = p
        .command(&["worker", "--listen", "0.0.0.0:0"])
        .env("SLUICE_CLUSTER_KEY", KEY)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("loopback") && stderr.contains("SLUICE_CLUSTER_TOKEN"),
        "{stderr}"
    );
    assert!(stderr.contains("--insecure"), "{stderr}");

    // With a token, or with --insecure, it listens there.
    let with_token = WorkerProcess::spawn_env(&p, ".sluice/w1", "0.0.0.0:0", &token_env());
    let (code, log) = with_token.terminate();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("cluster token, no TLS"), "{log}");
    let insecure = WorkerProcess::spawn_with(&p, ".sluice/w2", "0.0.0.0:0", &["--insecure"], &[]);
    let (code, log) = insecure.terminate();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("no cluster token"), "{log}");
    // A token too short to be a secret is refused with the reason.
    let mut cmd = p.command(&["worker", "--listen", "127.0.0.1:0"]);
    let out = cmd
        .env("SLUICE_CLUSTER_KEY", KEY)
        .env("SLUICE_CLUSTER_TOKEN", "short")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("shorter than 16 characters"), "{stderr}");
    assert!(!stderr.contains("short\n"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serve_over_tls_with_the_given_certificates() {
    let server = key_server().await;
    let p = cluster_project(&server.base_url(), 8);
    let fixtures = repo().join("tests/fixtures/tls");
    for f in ["ca.pem", "worker.pem", "worker.key"] {
        let text = std::fs::read_to_string(fixtures.join(f)).unwrap();
        p.write(&format!("tls/{f}"), &text);
    }
    let plain = std::fs::read_to_string(p.path("sluice.toml")).unwrap();
    p.write("plain.toml", &plain);
    p.write(
        "sluice.toml",
        &format!(
            "{plain}\n[cluster]\ntls_ca = \"tls/ca.pem\"\ntls_cert = \"tls/worker.pem\"\n\
             tls_key = \"tls/worker.key\"\n"
        ),
    );
    // Two workers, so that the answer stage reads rows the other worker's tasks made.
    let workers: Vec<WorkerProcess> = (1..=2)
        .map(|i| {
            WorkerProcess::spawn_env(&p, &format!(".sluice/w{i}"), "127.0.0.1:0", &token_env())
        })
        .collect();
    let list = worker_list(&workers);
    let (code, stderr) = run_with_token(&p, &list, Some(TOKEN));
    assert_eq!(code, 0, "{stderr}");
    let batches = read_parquet(&p.path("out/qa.parquet")).await;
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 42);
    assert_eq!(server.stats().requests, 56);
    // The coordinator's cache and counters are served over TLS too: the summary counts the
    // workers' requests, and the workers listed the other way round pay for nothing.
    assert!(stderr.contains("56 requests"), "{stderr}");
    std::fs::remove_file(p.path("out/qa.parquet")).unwrap();
    server.reset_stats();
    let reversed = workers
        .iter()
        .rev()
        .map(|w| w.url())
        .collect::<Vec<_>>()
        .join(",");
    let (code, stderr) = run_with_token(&p, &reversed, Some(TOKEN));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(server.stats().requests, 0, "{stderr}");
    std::fs::remove_file(p.path("out/qa.parquet")).unwrap();

    // A coordinator that does not speak TLS to them fails in one line and sends nothing.
    server.reset_stats();
    let out = p
        .command(&["--config", "plain.toml", "run", "--workers", &list, "q.sql"])
        .env("SLUICE_CLUSTER_KEY", KEY)
        .env("SLUICE_CLUSTER_TOKEN", TOKEN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert!(!stderr.contains(TOKEN), "{stderr}");
    assert_eq!(server.stats().requests, 0);
    assert!(!p.path("out/qa.parquet").exists(), "no output file");
    assert!(errors[0].contains("[cluster] tls_ca"), "{stderr}");
    for w in workers {
        let (code, log) = w.terminate();
        assert_eq!(code, 0, "{log}");
        assert!(log.contains("cluster token and TLS"), "{log}");
        assert!(
            !log.contains(TOKEN) && !log.contains("PRIVATE KEY"),
            "{log}"
        );
    }
}
