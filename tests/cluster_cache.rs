//! Answers outlive workers and topology: real `sluice worker` processes whose coordinator
//! serves them its response cache, so that a later run pays for nothing already answered,
//! whatever the number or order of the workers.

mod support;

use support::rows::{rows, sorted_lines};
use support::workers::{KEY, cluster_project, sluice_ok, spawn_workers, worker_list};
use support::*;

/// The flagship's rows of `rel` as sorted lines.
async fn sorted_rows(p: &Project, rel: &str) -> Vec<String> {
    sorted_lines(rows(&read_parquet(&p.path(rel)).await))
}

/// Runs `sluice run q.sql` with `args` before `q.sql`; returns stderr after checking exit 0.
fn run_ok(p: &Project, args: &[&str]) -> String {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.push("q.sql");
    sluice_ok(p, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_pays_nothing_whatever_the_order_or_number_of_workers() {
    let server = mock(MockConfig {
        api_key: Some(KEY.to_string()),
        ..MockConfig::default()
    })
    .await;
    let prompts = 56;

    // What one process makes alone, without a cache.
    let alone = cluster_project(&server.base_url(), 8);
    run_ok(&alone, &["--no-cache"]);
    let expected = sorted_rows(&alone, "out/qa.parquet").await;
    assert_eq!(expected.len(), 42);
    server.reset_stats();

    let p = cluster_project(&server.base_url(), 8);
    let workers = spawn_workers(&p, 4);
    let url = |i: usize| workers[i].url();
    let runs: [(&str, Vec<String>); 4] = [
        ("w1,w2,w3", vec![url(0), url(1), url(2)]),
        ("w2,w3,w1", vec![url(1), url(2), url(0)]),
        ("w3,w1 (one fewer)", vec![url(2), url(0)]),
        (
            "w4,w2,w3,w1 (one more, w4 new)",
            vec![url(3), url(1), url(2), url(0)],
        ),
    ];
    for (i, (name, list)) in runs.iter().enumerate() {
        server.reset_stats();
        let _ = std::fs::remove_file(p.path("out/qa.parquet"));
        run_ok(&p, &["--workers", &list.join(",")]);
        let sent = server.stats().requests;
        if i == 0 {
            assert_eq!(
                sent, prompts,
                "{name}: the first run sends each prompt once"
            );
        } else {
            assert_eq!(sent, 0, "{name}: every answer is known to the cluster");
        }
        assert_eq!(
            sorted_rows(&p, "out/qa.parquet").await,
            expected,
            "{name}: the single process's rows"
        );
    }
    // The new worker answered its share from the coordinator's cache.
    let (code, log) = workers.into_iter().last().unwrap().terminate();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("0 requests sent"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_counts_every_call_of_every_worker() {
    let server = mock(MockConfig {
        api_key: Some(KEY.to_string()),
        faults: FaultRates {
            rate_limit: 0.1,
            ..FaultRates::default()
        },
        ..MockConfig::default()
    })
    .await;
    let metrics = |p: &Project| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.path("m.json")).unwrap()).unwrap()
    };
    // Tokens are the prompts' and answers', whoever sends them: the single process's figures.
    let alone = cluster_project(&server.base_url(), 8);
    run_ok(&alone, &["--no-cache", "--metrics-json", "m.json"]);
    let single = metrics(&alone);
    server.reset_stats();

    let p = cluster_project(&server.base_url(), 8);
    let workers = spawn_workers(&p, 3);
    let list = worker_list(&workers);
    let stderr = run_ok(&p, &["--workers", &list, "--metrics-json", "m.json"]);
    let m = metrics(&p);
    let s = server.stats();
    let refused = s.faults.get("rate_limit").copied().unwrap_or(0);
    assert!(refused > 0, "the server refused some requests");
    assert_eq!(m["requests"], s.requests, "{m}");
    assert_eq!(m["succeeded"], 56, "{m}");
    assert_eq!(m["failed"], 0, "{m}");
    assert_eq!(m["retries"]["rate_limited"], refused, "{m}");
    for key in ["tokens_in", "tokens_out"] {
        assert_eq!(m[key], single[key], "{key}: {m}");
    }
    let answers = &m["functions"]["answer_question"];
    assert_eq!(answers["prompts"], 42, "{m}");
    assert!(answers["latency_ms"]["p50"].as_f64().is_some(), "{m}");
    assert!(
        stderr.contains(&format!("{} requests", s.requests)),
        "the summary counts the workers' requests: {stderr}"
    );
    // A re-run: every call answered from the cache, counted as such.
    server.reset_stats();
    run_ok(&p, &["--workers", &list, "--metrics-json", "m.json"]);
    let m = metrics(&p);
    assert_eq!(server.stats().requests, 0);
    assert_eq!(m["requests"], 0, "{m}");
    assert_eq!(m["cache_hits"], 56, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_calls_of_two_workers_in_one_run_are_sent_once() {
    let server = mock(MockConfig {
        api_key: Some(KEY.to_string()),
        latency: std::time::Duration::from_millis(300),
        ..MockConfig::default()
    })
    .await;
    let p = cluster_project(&server.base_url(), 8);
    // Every passage twice: the second half of the file (the other worker's byte range) asks
    // what the first half asks, at the same time.
    let once = std::fs::read_to_string(p.path("data/t.jsonl")).unwrap();
    p.write("data/t.jsonl", &format!("{once}{once}"));
    let workers = spawn_workers(&p, 2);
    let list = worker_list(&workers);
    run_ok(&p, &["--workers", &list, "--metrics-json", "m.json"]);
    let rows = sorted_rows(&p, "out/qa.parquet").await;
    assert_eq!(rows.len(), 84, "every row of both copies");
    assert_eq!(
        server.stats().requests,
        56,
        "each distinct prompt sent once, whichever worker asked"
    );
    let mut sent = Vec::new();
    for w in workers {
        let (code, log) = w.terminate();
        assert_eq!(code, 0, "{log}");
        let n: u64 = log
            .lines()
            .find_map(|l| l.split(" stopped: ").nth(1))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .expect("the worker's totals");
        sent.push(n);
    }
    assert_eq!(sent.iter().sum::<u64>(), 56, "{sent:?}");
}
