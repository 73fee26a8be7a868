//! End-to-end benchmarks of the `sluice` binary against the project's test server
//! (`sluice-mock-llm`), each in its own process so that the client's CPU time and peak memory
//! are its own.
//!
//! `cargo bench --bench pipeline [-- SCENARIO...]` runs the full scenarios (release build) and
//! prints one JSON line per scenario; `benches/README.md` records the figures. Without `--bench`
//! (as `cargo test --all-targets` runs it) it makes a small smoke run that checks the harness and
//! the counts it relies on, so the benchmark cannot rot unnoticed.
//!
//! Scenarios: `flagship-c64`, `flagship-c512`, `batch8`, `jitter`, `rate-limit`, `limits`, `hedge`,
//! `all-faults`, `cache`, `s3`, `scale`, `distributed` (1, 2 and 3 `sluice worker`
//! processes), `capacity` (3 workers with servers of their own, one half as fast), `replicas` (one model over 1 and 4 test servers), `replica-killed` (one of 4
//! killed mid-run), `prefix` (shared prefixes over 1 and 4 compute-bound servers with prefix
//! caches, against the distinct-prefix lower bound), `cascade` (a boolean filter on a small
//! model that passes the rows it is unsure of to a large one, against the large one alone),
//! `local` (the embedded model; needs the default `local` feature and `models/` fetched).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The test server as a child process, ended by PID on drop.
struct Mock {
    child: Child,
    url: String,
}

impl Mock {
    fn start(args: &[&str]) -> Mock {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-mock-llm"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("sluice-mock-llm starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("listening line");
        let url = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected mock output {line:?}"))
            .to_string();
        Mock { child, url }
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the PID of a child this harness started and has not yet reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// What one `sluice` process cost.
struct Measured {
    wall_s: f64,
    cpu_s: f64,
    max_rss_mb: f64,
    metrics: Value,
}

/// Runs `sluice` with `args` in `dir`; waits with wait4(2) to get the child's own rusage.
///
/// Linux carries a process's peak RSS across fork and exec, so a child's `ru_maxrss` is at
/// least this benchmark process's own peak: the benchmark must never hold large buffers (it
/// streams corpora instead of reading them).
fn run_sluice(dir: &Path, args: &[&str]) -> Measured {
    run_sluice_env(dir, args, &[])
}

/// [`run_sluice`] with extra environment variables.
// The child is reaped by wait4 below, which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run_sluice_env(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Measured {
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .current_dir(dir)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.txt")).expect("stderr file"))
        .spawn()
        .expect("sluice starts");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value to be overwritten by wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; status and usage point to live locals.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall_s = started.elapsed().as_secs_f64();
    assert_eq!(r, pid, "wait4 failed");
    let err = std::fs::read_to_string(dir.join("stderr.txt")).unwrap_or_default();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "sluice {args:?} failed: {err}"
    );
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let metrics = std::fs::read_to_string(dir.join("metrics.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    Measured {
        wall_s,
        cpu_s: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_mb: usage.ru_maxrss as f64 / 1024.0,
        metrics,
    }
}

/// A project directory: the repository's udfs, a sluice.toml, a generated corpus of
/// `passages` transcripts (one passage each) and the flagship query.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(url: &str, concurrency: usize, passages: usize, cache: bool) -> Project {
        Self::with_model(url, concurrency, passages, cache, "kind = \"openai\"")
    }

    /// `model` is the `kind` line (and any other settings) of the `default` model.
    fn with_model(
        url: &str,
        concurrency: usize,
        passages: usize,
        cache: bool,
        model: &str,
    ) -> Project {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        std::fs::create_dir_all(p.join("udfs")).unwrap();
        std::fs::create_dir_all(p.join("data")).unwrap();
        for f in ["generate_questions.toml", "answer_question.toml"] {
            std::fs::copy(repo.join("udfs").join(f), p.join("udfs").join(f)).unwrap();
        }
        std::fs::write(
            p.join("sluice.toml"),
            format!(
                "[dispatcher]\nconcurrency = {concurrency}\nmax_attempts = 8\n\
                 backoff_base_ms = 50\nbackoff_max_ms = 2000\n\n\
                 [cache]\nenabled = {cache}\n\n\
                 [models.default]\n{model}\nbase_url = \"{url}\"\nmodel = \"mock\"\n\
                 timeout_ms = 10000\n"
            ),
        )
        .unwrap();
        let sql = std::fs::read_to_string(repo.join("queries/earnings_qa.sql"))
            .unwrap()
            .replace("'data/transcripts/'", "'data/'");
        std::fs::write(p.join("q.sql"), sql).unwrap();
        let project = Project { dir };
        if passages > 0 {
            // Generated transcripts are under 4,096 characters: one passage each.
            let companies = passages.clamp(1, 500);
            let quarters = passages.div_ceil(companies);
            let out = project.corpus();
            project.gen_corpus(&[
                "--companies",
                &companies.to_string(),
                "--quarters",
                &quarters.to_string(),
            ]);
            // Keep exactly `passages` lines, streaming: a child's peak RSS starts at this
            // process's peak (see `run_sluice_env`), so the bench never holds a corpus.
            let kept = out.with_extension("kept");
            {
                use std::io::{BufRead, Write};
                let reader = std::io::BufReader::new(std::fs::File::open(&out).unwrap());
                let mut w = std::io::BufWriter::new(std::fs::File::create(&kept).unwrap());
                for line in reader.lines().take(passages) {
                    writeln!(w, "{}", line.unwrap()).unwrap();
                }
                w.flush().unwrap();
            }
            std::fs::rename(&kept, &out).unwrap();
        }
        project
    }

    /// The generated corpus file.
    fn corpus(&self) -> PathBuf {
        self.dir.path().join("data/corpus.jsonl")
    }

    /// Writes the corpus with `sluice gen-corpus ARGS`.
    fn gen_corpus(&self, args: &[&str]) {
        let status = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("gen-corpus")
            .args(args)
            .arg("--out")
            .arg(self.corpus())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn run(&self, extra: &[&str]) -> Measured {
        let mut args = vec!["run", "q.sql", "--quiet", "--metrics-json", "metrics.json"];
        args.extend_from_slice(extra);
        run_sluice(self.dir.path(), &args)
    }
}

fn num(m: &Value, k: &str) -> u64 {
    m[k].as_u64().unwrap_or(0)
}

/// The flagship project over `mocks`, the replicas of its model, each paced at `per_replica`
/// in flight (the run's budget is all of theirs); `extra` goes into the model's table.
fn project_on(mocks: &[Mock], per_replica: usize, passages: usize, extra: &str) -> Project {
    let urls: Vec<String> = mocks.iter().map(|m| format!("\"{}\"", m.url)).collect();
    let model = format!("kind = \"openai\"\nconcurrency = {per_replica}\n{extra}");
    let total = per_replica * mocks.len();
    let p = Project::with_model(&mocks[0].url, total, passages, false, &model);
    let toml = p.dir.path().join("sluice.toml");
    let text = std::fs::read_to_string(&toml).unwrap().replace(
        &format!("base_url = \"{}\"", mocks[0].url),
        &format!("base_url = [{}]", urls.join(", ")),
    );
    std::fs::write(&toml, text).unwrap();
    p
}

/// The flagship over `replicas` test servers of one model, each at `latency_ms` and paced at
/// `per_replica` in flight (the run's budget is all of theirs): the JSON line of the scenario.
fn replicas(passages: usize, replicas: usize, per_replica: usize, latency_ms: u64) -> Value {
    let latency = latency_ms.to_string();
    let mocks: Vec<Mock> = (0..replicas)
        .map(|_| Mock::start(&["--latency-ms", &latency]))
        .collect();
    let p = project_on(&mocks, per_replica, passages, "");
    let m = p.run(&[]);
    let prompts = num(&m.metrics, "calls") + num(&m.metrics, "deduplicated");
    let rate = prompts as f64 / m.wall_s;
    let limit = (per_replica * replicas) as f64 / (latency_ms as f64 / 1000.0);
    let served: Vec<u64> = mocks
        .iter()
        .map(|m| num(&mock_stats(m), "requests"))
        .collect();
    json!({
        "scenario": format!("replicas-{replicas}-{latency_ms}ms"), "passages": passages, "prompts": prompts,
        "replicas": replicas, "per_replica": per_replica, "latency_ms": latency_ms,
        "wall_s": round(m.wall_s, 3), "prompts_per_s": round(rate, 1),
        "limit_prompts_per_s": round(limit, 1), "ratio_to_limit": round(rate / limit, 3),
        "requests_per_replica": served, "failed": num(&m.metrics, "failed"),
        "max_in_flight": num(&m.metrics, "max_in_flight"),
    })
}

/// Prefill tokens per second of each compute-bound test server in the `prefix` scenario.
const PREFILL_RATE: u64 = 200_000;

/// One run of the `prefix` scenario: the flagship over `replicas` compute-bound test servers
/// (prefill at [`PREFILL_RATE`], one request at a time, then 10 ms of decoding; a prefix cache
/// of 20,000 blocks of 16 tokens looked up when a request arrives), 32 in flight per replica.
fn prefix_run(passages: usize, replicas: usize, share: bool, lower_bound: u64) -> Value {
    let rate = PREFILL_RATE.to_string();
    let args = [
        "--prefix-cache-blocks",
        "20000",
        "--prefill-tokens-per-s",
        &rate,
        "--latency-ms",
        "10",
    ];
    let mocks: Vec<Mock> = (0..replicas).map(|_| Mock::start(&args)).collect();
    let p = project_on(&mocks, 32, passages, &format!("share_prefixes = {share}"));
    let m = p.run(&[]);
    let stats: Vec<Value> = mocks.iter().map(mock_stats).collect();
    let computed: Vec<u64> = stats.iter().map(|s| num(s, "prefill_computed")).collect();
    let total: u64 = computed.iter().sum();
    // The busiest replica cannot finish before it has computed its prefill.
    let busiest_s = *computed.iter().max().unwrap_or(&0) as f64 / PREFILL_RATE as f64;
    let answers = &m.metrics["functions"]["answer_question"];
    json!({
        "scenario": format!("prefix-{replicas}-replicas{}", if share { "" } else { "-sent-at-once" }),
        "passages": passages, "share_prefixes": share, "replicas": replicas,
        "prefill_computed": total, "lower_bound": lower_bound,
        "ratio_to_lower_bound": round(total as f64 / lower_bound.max(1) as f64, 3),
        "computed_per_replica": computed,
        "wall_s": round(m.wall_s, 3), "busiest_replica_compute_s": round(busiest_s, 3),
        "wall_ratio_to_busiest_compute": round(m.wall_s / busiest_s.max(1e-9), 3),
        "cached_share": round(num(&m.metrics, "tokens_cached") as f64
            / num(&m.metrics, "tokens_in").max(1) as f64, 3),
        "answer_cached_share": round(num(answers, "tokens_cached") as f64
            / num(answers, "tokens_in").max(1) as f64, 3),
        "answer_prefix_waits": num(answers, "prefix_waits"),
        "failed": num(&m.metrics, "failed"), "max_rss_mb": round(m.max_rss_mb, 1),
    })
}

/// Prefill tokens the flagship computes at least: every distinct prefix once. Measured with
/// one request at a time against one server whose cache never evicts, so that each prompt
/// finds every prefix an earlier prompt had.
fn prefix_lower_bound(passages: usize) -> u64 {
    let mock = Mock::start(&["--prefix-cache-blocks", "100000000"]);
    let p = Project::new(&mock.url, 1, passages, false);
    let m = p.run(&[]);
    assert_eq!(num(&m.metrics, "failed"), 0);
    num(&mock_stats(&mock), "prefill_computed")
}

/// The flagship over 4 test servers at `latency_ms` and 16 in flight each: a clean run, then
/// the same run (fresh servers) in which one server process is killed (SIGKILL) halfway
/// through the clean run's wall time. The JSON line: both walls, their ratio, the failed calls,
/// each replica's requests, failures and ejections as sluice counted them.
fn replica_killed(passages: usize, latency_ms: u64) -> Value {
    let latency = latency_ms.to_string();
    let start = || -> Vec<Mock> {
        (0..4)
            .map(|_| Mock::start(&["--latency-ms", &latency]))
            .collect()
    };
    let clean = {
        let mocks = start();
        let p = project_on(&mocks, 16, passages, "");
        let m = p.run(&[]);
        let (rows, _) = output_rows(p.dir.path());
        (m, rows)
    };
    let mocks = start();
    let p = project_on(&mocks, 16, passages, "");
    let victim = mocks[1].child.id() as libc::pid_t;
    let kill_after = Duration::from_secs_f64(clean.0.wall_s / 2.0);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(kill_after);
        // SAFETY: kill(2) on the PID of a child this harness started and has not yet reaped
        // (Mock's drop reaps it).
        unsafe { libc::kill(victim, libc::SIGKILL) };
    });
    let m = p.run(&[]);
    killer.join().unwrap();
    let (rows, _) = output_rows(p.dir.path());
    let replicas = &m.metrics["models"]["default"]["replicas"];
    let field = |k: &str| -> Vec<u64> {
        replicas
            .as_array()
            .map(|rs| rs.iter().map(|r| r[k].as_u64().unwrap_or(0)).collect())
            .unwrap_or_default()
    };
    json!({
        "scenario": "replica-killed", "passages": passages, "replicas": 4, "per_replica": 16,
        "latency_ms": latency_ms, "killed_after_s": round(kill_after.as_secs_f64(), 2),
        "clean_wall_s": round(clean.0.wall_s, 3), "wall_s": round(m.wall_s, 3),
        "ratio_to_clean": round(m.wall_s / clean.0.wall_s, 3),
        "clean_rows": clean.1, "rows": rows, "rows_lost": clean.1.saturating_sub(rows),
        "failed": num(&m.metrics, "failed"), "clean_failed": num(&clean.0.metrics, "failed"),
        "retries": m.metrics["retries"].clone(),
        "requests_per_replica": field("requests"), "failures_per_replica": field("failures"),
        "ejections_per_replica": field("ejected"),
        "clean_requests_per_replica": clean.0.metrics["models"]["default"]["replicas"]
            .as_array()
            .map(|rs| rs.iter().map(|r| r["requests"].clone()).collect::<Vec<_>>()),
    })
}

/// One flagship run against a fresh server; returns the JSON line of the scenario.
fn flagship(
    name: &str,
    passages: usize,
    concurrency: usize,
    mock_args: &[&str],
    mean_latency_ms: f64,
) -> Value {
    flagship_with(name, passages, concurrency, mock_args, mean_latency_ms, 1)
}

/// [`flagship`] with `batch` prompts per request (`openai_completions` when above 1).
fn flagship_with(
    name: &str,
    passages: usize,
    concurrency: usize,
    mock_args: &[&str],
    mean_latency_ms: f64,
    batch: usize,
) -> Value {
    let mock = Mock::start(mock_args);
    let model = if batch > 1 {
        format!("kind = \"openai_completions\"\nprompts_per_request = {batch}")
    } else {
        "kind = \"openai\"".to_string()
    };
    let p = Project::with_model(&mock.url, concurrency, passages, false, &model);
    let m = p.run(&[]);
    let prompts = num(&m.metrics, "calls") + num(&m.metrics, "deduplicated");
    let requests = num(&m.metrics, "requests");
    let rate = prompts as f64 / m.wall_s;
    let limit = (concurrency * batch) as f64 / (mean_latency_ms / 1000.0);
    json!({
        "scenario": name, "passages": passages, "prompts": prompts, "requests": requests,
        "concurrency": concurrency, "batch": batch, "mean_latency_ms": mean_latency_ms,
        "wall_s": round(m.wall_s, 3), "prompts_per_s": round(rate, 1),
        "limit_prompts_per_s": round(limit, 1), "ratio_to_limit": round(rate / limit, 3),
        "cpu_ms_per_prompt": round(m.cpu_s * 1000.0 / prompts.max(1) as f64, 4),
        "max_rss_mb": round(m.max_rss_mb, 1), "failed": num(&m.metrics, "failed"),
        "retries": m.metrics["retries"].clone(), "max_in_flight": num(&m.metrics, "max_in_flight"),
        // Request latency as sluice saw it (server latency + transport), and the limit it sets.
        "answer_latency_p50_ms": m.metrics["functions"]["answer_question"]["latency_ms"]["p50"].clone(),
        "ratio_to_measured_limit": m.metrics["functions"]["answer_question"]["latency_ms"]["p50"]
            .as_f64()
            .map(|p50| round(rate / ((concurrency * batch) as f64 / (p50 / 1000.0)), 3)),
    })
}

/// The test server's counters (`GET /stats`).
fn mock_stats(mock: &Mock) -> Value {
    use std::io::{Read, Write};
    let addr = mock
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    let mut sock = std::net::TcpStream::connect(&addr).expect("mock reachable");
    write!(
        sock,
        "GET /stats HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    sock.read_to_string(&mut text).unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("{}");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

/// Requests the server refused for its limits (`over_concurrency`, `over_rpm`, `over_tpm`).
fn refused(stats: &Value) -> u64 {
    ["over_concurrency", "over_rpm", "over_tpm"]
        .iter()
        .map(|k| stats["faults"][k].as_u64().unwrap_or(0))
        .sum()
}

/// Mean tokens per request as the test server's token bucket counts them, for the flagship.
fn flagship_tokens_per_request() -> f64 {
    let mock = Mock::start(&["--tpm", "1000000000"]);
    let p = Project::new(&mock.url, 16, 50, false);
    p.run(&[]);
    let stats = mock_stats(&mock);
    stats["tokens_admitted"].as_f64().unwrap_or(0.0) / stats["requests"].as_f64().unwrap_or(1.0)
}

/// The flagship at 20 ms and concurrency 64 against a provider that enforces a limit worth
/// `limit_prompts_per_s` (issue 15): throughput as a ratio to it, and the share of requests
/// it refused.
fn limited(name: &str, passages: usize, limit_args: &[&str], limit_prompts_per_s: f64) -> Value {
    let mut args = vec!["--latency-ms", "20"];
    args.extend_from_slice(limit_args);
    let mock = Mock::start(&args);
    let p = Project::new(&mock.url, 64, passages, false);
    let m = p.run(&[]);
    let stats = mock_stats(&mock);
    let prompts = num(&m.metrics, "calls") + num(&m.metrics, "deduplicated");
    let requests = stats["requests"].as_u64().unwrap_or(0);
    let refused = refused(&stats);
    let rate = prompts as f64 / m.wall_s;
    json!({
        "scenario": name, "passages": passages, "prompts": prompts, "requests": requests,
        "server_args": limit_args.join(" "),
        "wall_s": round(m.wall_s, 2), "prompts_per_s": round(rate, 1),
        "limit_prompts_per_s": round(limit_prompts_per_s, 1),
        "ratio_to_limit": round(rate / limit_prompts_per_s, 3),
        "refused": refused, "refused_share": round(refused as f64 / requests.max(1) as f64, 4),
        "failed": num(&m.metrics, "failed"), "max_in_flight_server": stats["max_in_flight"].clone(),
        "governor": m.metrics["models"]["default"].clone(),
        "max_rss_mb": round(m.max_rss_mb, 1),
    })
}

/// A `sluice worker` process in a project directory, ended by PID on drop.
struct WorkerProcess {
    child: Child,
    addr: String,
}

impl WorkerProcess {
    fn start(dir: &Path, cache: &str) -> WorkerProcess {
        Self::start_with(dir, cache, &dir.join("sluice.toml"))
    }

    /// A worker in `dir` reading the configuration file `config`.
    fn start_with(dir: &Path, cache: &str, config: &Path) -> WorkerProcess {
        let config = config.to_string_lossy();
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .current_dir(dir)
            .args(["worker", "--listen", "127.0.0.1:0", "--cache-dir", cache])
            .args(["--config", config.as_ref()])
            .stderr(Stdio::piped())
            .spawn()
            .expect("sluice worker starts");
        let mut line = String::new();
        BufReader::new(child.stderr.take().expect("stderr"))
            .read_line(&mut line)
            .expect("listening line");
        let addr = line
            .trim()
            .strip_prefix("sluice worker listening on ")
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("unexpected worker output {line:?}"))
            .to_string();
        WorkerProcess { child, addr }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the PID of a child this harness started and has not yet reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// The flagship on `workers` `sluice worker` processes (issue 17), each with `per_worker`
/// requests in flight (the cluster's `concurrency` is their sum), against a server answering
/// in `latency_ms`: prompts/s as a ratio to workers x concurrency / latency, and the
/// coordinator's peak RSS.
fn distributed(passages: usize, workers: usize, per_worker: usize, latency_ms: u64) -> Value {
    let latency = latency_ms.to_string();
    let mock = Mock::start(&["--latency-ms", &latency]);
    let p = Project::new(&mock.url, per_worker * workers, passages, true);
    let procs: Vec<WorkerProcess> = (0..workers)
        .map(|i| WorkerProcess::start(p.dir.path(), &format!(".sluice/w{i}")))
        .collect();
    let list: Vec<&str> = procs.iter().map(|w| w.addr.as_str()).collect();
    let list = list.join(",");
    let m = p.run(&["--workers", &list]);
    let stats = mock_stats(&mock);
    let prompts = stats["requests"].as_u64().unwrap_or(0);
    let rate = prompts as f64 / m.wall_s;
    let limit = (workers * per_worker) as f64 / (latency_ms as f64 / 1000.0);
    drop(procs);
    json!({
        "scenario": format!("distributed-{workers}w"), "passages": passages, "workers": workers,
        "concurrency_per_worker": per_worker, "latency_ms": latency_ms, "prompts": prompts,
        "wall_s": round(m.wall_s, 2), "prompts_per_s": round(rate, 1),
        "limit_prompts_per_s": round(limit, 1), "ratio_to_limit": round(rate / limit, 3),
        "max_in_flight_server": stats["max_in_flight"].clone(),
        "coordinator_cpu_s": round(m.cpu_s, 2), "coordinator_max_rss_mb": round(m.max_rss_mb, 1),
    })
}

/// Work goes where the capacity is: the flagship over `passages` on 3 `sluice worker`
/// processes, each with a test server of its own (a GPU box's; `per_worker = true`) and
/// `per_worker` requests in flight, the third answering in twice the others' `latency_ms`:
/// prompts/s as a ratio to the sum of the three workers' capacities (concurrency / latency),
/// each worker's share of the prompts, and what a fixed third each would allow.
fn capacity(passages: usize, per_worker: usize, latency_ms: u64) -> Value {
    let latencies = [latency_ms, latency_ms, 2 * latency_ms];
    let mocks: Vec<Mock> = latencies
        .iter()
        .map(|l| Mock::start(&["--latency-ms", &l.to_string()]))
        .collect();
    let model = format!("kind = \"openai\"\nper_worker = true\nconcurrency = {per_worker}");
    let p = Project::with_model(&mocks[0].url, per_worker * 3, passages, true, &model);
    let toml = std::fs::read_to_string(p.dir.path().join("sluice.toml")).unwrap();
    let procs: Vec<WorkerProcess> = mocks
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let own = p.dir.path().join(format!("w{i}.toml"));
            let text = toml.replace(
                &format!("base_url = \"{}\"", mocks[0].url),
                &format!("base_url = \"{}\"", m.url),
            );
            std::fs::write(&own, text).unwrap();
            WorkerProcess::start_with(p.dir.path(), &format!(".sluice/w{i}"), &own)
        })
        .collect();
    let list: Vec<&str> = procs.iter().map(|w| w.addr.as_str()).collect();
    let m = p.run(&["--workers", &list.join(",")]);
    let shares: Vec<u64> = mocks
        .iter()
        .map(|m| num(&mock_stats(m), "requests"))
        .collect();
    let prompts: u64 = shares.iter().sum();
    let rate = prompts as f64 / m.wall_s;
    let capacities: Vec<f64> = latencies
        .iter()
        .map(|l| per_worker as f64 / (*l as f64 / 1000.0))
        .collect();
    let capacity: f64 = capacities.iter().sum();
    // A fixed third each finishes when the slowest does.
    let static_rate = 3.0 * capacities.iter().cloned().fold(f64::INFINITY, f64::min);
    drop(procs);
    json!({
        "scenario": "capacity-3w-one-half-speed", "passages": passages, "prompts": prompts,
        "concurrency_per_worker": per_worker, "latencies_ms": latencies,
        "prompts_per_worker": shares, "wall_s": round(m.wall_s, 2),
        "prompts_per_s": round(rate, 1), "capacity_prompts_per_s": round(capacity, 1),
        "ratio_to_capacity": round(rate / capacity, 3),
        "fixed_thirds_bound_ratio": round(static_rate / capacity, 3),
        "coordinator_counted_requests": num(&m.metrics, "requests"),
        "coordinator_cpu_s": round(m.cpu_s, 2), "coordinator_max_rss_mb": round(m.max_rss_mb, 1),
    })
}

/// Answers outlive the cluster's topology (issue 28): the flagship over `passages` on workers
/// w1,w2,w3, then again with the list reordered, with one fewer and with one more (a new
/// worker with an empty cache): the requests each run pays, and what the coordinator counted.
fn topology(passages: usize) -> Value {
    let mock = Mock::start(&["--latency-ms", "50"]);
    let p = Project::new(&mock.url, 48, passages, true);
    let procs: Vec<WorkerProcess> = (0..4)
        .map(|i| WorkerProcess::start(p.dir.path(), &format!(".sluice/w{}", i + 1)))
        .collect();
    let runs: [(&str, &[usize]); 4] = [
        ("w1,w2,w3", &[0, 1, 2]),
        ("w2,w3,w1 (reordered)", &[1, 2, 0]),
        ("w1,w2 (one fewer)", &[0, 1]),
        ("w4,w1,w2,w3 (one more, w4 new)", &[3, 0, 1, 2]),
    ];
    let mut out = Vec::new();
    let mut before = 0;
    for (name, which) in runs {
        let list: Vec<&str> = which.iter().map(|&i| procs[i].addr.as_str()).collect();
        let m = p.run(&["--workers", &list.join(",")]);
        let total = num(&mock_stats(&mock), "requests");
        out.push(json!({
            "run": name, "requests_paid": total - before, "wall_s": round(m.wall_s, 2),
            "coordinator_counted_requests": num(&m.metrics, "requests"),
            "coordinator_counted_cache_hits": num(&m.metrics, "cache_hits"),
        }));
        before = total;
    }
    json!({ "scenario": "topology", "passages": passages, "prompts": passages * 4, "runs": out })
}

/// Hedging (issue 15): the flagship with 0.5% of requests hanging for 20 s, against the same
/// run without hangs.
fn hedging(passages: usize) -> Value {
    let clean = {
        let mock = Mock::start(&["--latency-ms", "20"]);
        Project::new(&mock.url, 64, passages, false).run(&[])
    };
    let mock = Mock::start(&[
        "--latency-ms",
        "20",
        "--timeout",
        "0.005",
        "--hang-ms",
        "20000",
    ]);
    let p = Project::new(&mock.url, 64, passages, true);
    let m = p.run(&[]);
    let stats = mock_stats(&mock);
    let hedges = num(&m.metrics, "hedges");
    let requests = num(&m.metrics, "requests");
    let calls = num(&m.metrics, "calls");
    let entries = {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .current_dir(p.dir.path())
            .args(["cache", "stats"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    json!({
        "scenario": "hedge-0.5pct-hang-20s", "passages": passages, "calls": calls,
        "requests": requests, "hedges": hedges,
        "hedge_share": round(hedges as f64 / requests.max(1) as f64, 4),
        "hung": stats["faults"]["timeout"].clone(), "failed": num(&m.metrics, "failed"),
        "clean_wall_s": round(clean.wall_s, 2), "wall_s": round(m.wall_s, 2),
        "ratio_to_clean": round(m.wall_s / clean.wall_s, 3), "cache": entries,
    })
}

/// The flagship's output (`out/earnings_qa.parquet`): its rows, and those with an error
/// (`question_error` or `answer_error` set). Only the two error columns are read, a batch at
/// a time (a child's peak RSS starts at this process's, see `run_sluice_env`).
fn output_rows(dir: &Path) -> (u64, u64) {
    use datafusion::arrow::array::Array;
    use datafusion::parquet::arrow::ProjectionMask;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let out = dir.join("out/earnings_qa.parquet");
    let files: Vec<PathBuf> = if out.is_dir() {
        std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    } else {
        vec![out]
    };
    let (mut rows, mut errors) = (0, 0);
    for f in files {
        let builder = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap())
            .unwrap()
            .with_batch_size(1024);
        let fields = builder.schema().fields().clone();
        let wanted: Vec<usize> = ["question_error", "answer_error"]
            .iter()
            .map(|n| {
                fields
                    .iter()
                    .position(|f| f.name() == n)
                    .expect("error column")
            })
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), wanted);
        for batch in builder.with_projection(mask).build().unwrap() {
            let batch = batch.unwrap();
            rows += batch.num_rows() as u64;
            let (q, a) = (batch.column(0), batch.column(1));
            errors += (0..batch.num_rows())
                .filter(|&i| !q.is_null(i) || !a.is_null(i))
                .count() as u64;
        }
    }
    (rows, errors)
}

/// Every fault at once: the flagship at 20 ms and 64 in flight against a server that injects
/// 1% each of 503, dropped connections, malformed JSON, truncated bodies and schema-violating
/// content, and hangs 0.5% of requests for 20 s; against the same run without faults. Rows
/// lost: the clean run's rows not in the faulty run's output (a passage whose questions failed
/// keeps one row where it had three).
fn all_faults(passages: usize) -> Value {
    let run = |mock_args: &[&str]| {
        let mock = Mock::start(mock_args);
        let p = Project::new(&mock.url, 64, passages, false);
        let m = p.run(&[]);
        let (rows, errors) = output_rows(p.dir.path());
        (m, rows, errors, mock_stats(&mock))
    };
    let (clean, clean_rows, clean_errors, _) = run(&["--latency-ms", "20"]);
    let (m, rows, errors, stats) = run(&[
        "--latency-ms",
        "20",
        "--server-503",
        "0.01",
        "--dropped",
        "0.01",
        "--malformed",
        "0.01",
        "--truncated",
        "0.01",
        "--invalid-schema",
        "0.01",
        "--timeout",
        "0.005",
        "--hang-ms",
        "20000",
    ]);
    let question_failed = m.metrics["functions"]["generate_questions"]["failed"]
        .as_u64()
        .unwrap_or(0);
    json!({
        "scenario": "all-faults", "passages": passages,
        "clean_wall_s": round(clean.wall_s, 2), "wall_s": round(m.wall_s, 2),
        "ratio_to_clean": round(m.wall_s / clean.wall_s, 3),
        "clean_rows": clean_rows, "rows": rows,
        "rows_lost": clean_rows.saturating_sub(rows + 2 * question_failed),
        "clean_rows_in_error": clean_errors, "rows_in_error": errors,
        "calls": num(&m.metrics, "calls"), "requests": num(&m.metrics, "requests"),
        "failed": num(&m.metrics, "failed"), "errors": m.metrics["errors"].clone(),
        "retries": m.metrics["retries"].clone(), "hedges": num(&m.metrics, "hedges"),
        "injected": stats["faults"].clone(),
        "clean_max_rss_mb": round(clean.max_rss_mb, 1), "max_rss_mb": round(m.max_rss_mb, 1),
    })
}

/// Fills a cache at high concurrency, then re-runs from it.
fn cache_rerun(passages: usize) -> Value {
    let mock = Mock::start(&[]);
    let p = Project::new(&mock.url, 256, passages, true);
    let fill = p.run(&[]);
    let prompts = num(&fill.metrics, "calls") + num(&fill.metrics, "deduplicated");
    let again = p.run(&[]);
    assert_eq!(num(&again.metrics, "requests"), 0, "the re-run is all hits");
    let hits = num(&again.metrics, "cache_hits");
    let stats = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .current_dir(p.dir.path())
        .args(["cache", "stats"])
        .output()
        .unwrap();
    let file_bytes =
        std::fs::metadata(p.dir.path().join(".sluice/cache/responses.redb")).map_or(0, |m| m.len());
    json!({
        "scenario": "cache", "passages": passages, "prompts": prompts, "hits": hits,
        "fill_wall_s": round(fill.wall_s, 2), "fill_prompts_per_s": round(prompts as f64 / fill.wall_s, 1),
        "rerun_wall_s": round(again.wall_s, 3),
        "rerun_prompts_per_s": round(hits as f64 / again.wall_s, 1),
        "rerun_cpu_ms_per_prompt": round(again.cpu_s * 1000.0 / hits.max(1) as f64, 4),
        "rerun_max_rss_mb": round(again.max_rss_mb, 1),
        "cache_file_bytes": file_bytes,
        "cache_bytes_per_entry": file_bytes / hits.max(1),
        "stats": String::from_utf8_lossy(&stats.stdout).trim().to_string(),
    })
}

/// Batch mode (issue 19): the flagship over `passages` passages through the test server's
/// Files + Batches API, each job taking `job_ms` there: wall time against what the provider's
/// time bounds it to (two stages, each gathered for `collect_ms`, then `job_ms`, then at most
/// one poll), CPU per call, peak RSS and the bytes uploaded.
fn batch_api(passages: usize, job_ms: u64) -> Value {
    let (collect_ms, poll_ms) = (500, 200);
    let mock = Mock::start(&["--batch-time-ms", &job_ms.to_string()]);
    let p = Project::with_model(
        &mock.url,
        64,
        passages,
        true,
        "kind = \"openai\"\nmode = \"batch\"",
    );
    let cfg = std::fs::read_to_string(p.dir.path().join("sluice.toml")).unwrap();
    std::fs::write(
        p.dir.path().join("sluice.toml"),
        format!("{cfg}\n[models.default.batch]\npoll_ms = {poll_ms}\ncollect_ms = {collect_ms}\n"),
    )
    .unwrap();
    let m = p.run(&[]);
    let stats = mock_stats(&mock);
    let calls = num(&m.metrics, "calls");
    let bound_s = 2.0 * (collect_ms + job_ms + poll_ms) as f64 / 1000.0;
    let jobs = m.metrics["batch_jobs"].as_array().map_or(0, Vec::len);
    json!({
        "scenario": format!("batch-api-{passages}"), "passages": passages, "calls": calls,
        "live_requests": num(&m.metrics, "requests"), "jobs": jobs,
        "lines_uploaded": num(&stats, "batch_lines"), "files_uploaded": num(&stats, "files_uploaded"),
        "job_ms": job_ms, "wall_s": round(m.wall_s, 2), "bound_s": round(bound_s, 2),
        "ratio_to_bound": round(bound_s / m.wall_s, 3),
        "cpu_ms_per_call": round(m.cpu_s * 1000.0 / calls.max(1) as f64, 4),
        "max_rss_mb": round(m.max_rss_mb, 1), "failed": num(&m.metrics, "failed"),
    })
}

/// A topic label per passage, packing `rows` rows per request (issue 18).
fn topic_fn(rows: usize) -> String {
    let prompt = "Label each of these {{ n }} passages with its topic, in order.\n\
                  {% for item in items %}### Item {{ loop.index }}\n{{ item }}\n{% endfor %}";
    format!(
        "name = \"topic\"\nargs = [\"passage\"]\nrows_per_prompt = {rows}\n\
         item = \"{{{{ passage }}}}\"\n\
         system = \"You label passages of earnings calls with the one topic they are mostly about.\"\n\
         prompt = {prompt:?}\n\
         output = {{ type = \"string\", enum = [\"guidance\", \"margins\", \"demand\", \"costs\", \"other\"] }}\n\
         max_tokens = 8\n"
    )
}

/// Row packing (issue 18): a topic per passage over `passages` generated passages, one row per
/// request and `rows` per request, against the test server billing tokens as OpenAI does:
/// requests and prompt tokens of each, and what packing saves.
fn packing(passages: usize, rows: usize) -> Value {
    let mock = Mock::start(&["--latency-ms", "20", "--tiktoken-usage"]);
    let run = |n: usize| {
        let p = Project::new(&mock.url, 64, passages, false);
        std::fs::write(p.dir.path().join("udfs/topic.toml"), topic_fn(n)).unwrap();
        let sql = "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/';\n\
                   COPY (SELECT ticker, topic(transcript) AS topic FROM t) \
                   TO 'out/topics.parquet' STORED AS PARQUET;\n";
        std::fs::write(p.dir.path().join("t.sql"), sql).unwrap();
        let m = run_sluice(
            p.dir.path(),
            &["run", "t.sql", "--quiet", "--metrics-json", "metrics.json"],
        );
        assert_eq!(num(&m.metrics, "failed"), 0);
        m
    };
    let one = run(1);
    let packed = run(rows);
    let (r1, rn) = (
        num(&one.metrics, "requests"),
        num(&packed.metrics, "requests"),
    );
    let (t1, tn) = (
        num(&one.metrics, "tokens_in"),
        num(&packed.metrics, "tokens_in"),
    );
    json!({
        "scenario": format!("pack-{passages}x{rows}"), "rows": passages,
        "requests_1": r1, "requests_packed": rn,
        "requests_saved": round(1.0 - rn as f64 / r1.max(1) as f64, 3),
        "prompt_tokens_1": t1, "prompt_tokens_packed": tn,
        "prompt_tokens_saved": round(1.0 - tn as f64 / t1.max(1) as f64, 3),
        "wall_s_1": round(one.wall_s, 2), "wall_s_packed": round(packed.wall_s, 2),
        "max_rss_mb_packed": round(packed.max_rss_mb, 1),
    })
}

/// An aggregate summary of each company's calls, with `budget` prompt tokens per call.
fn summary_fn(budget: u64) -> String {
    let prompt = "Summarise these earnings calls of one company, in order.\n\
                  {% for p in passages %}### Call {{ loop.index }}\n{{ p }}\n{% endfor %}";
    let reduce = "Combine these partial summaries of one company's calls.\n\
                  {% for p in partials %}- {{ p }}\n{% endfor %}";
    format!(
        "name = \"summarize_company\"\nkind = \"aggregate\"\nargs = [\"passages\"]\n\
         max_input_tokens = {budget}\nprompt = {prompt:?}\nreduce = {reduce:?}\nmax_tokens = 200\n"
    )
}

/// Aggregates (issue 18): a summary per company over `companies` x `quarters` generated
/// transcripts (the first 2,000 characters of each), at two input budgets: calls per group.
fn aggregate(companies: usize, quarters: usize) -> Value {
    let mock = Mock::start(&["--latency-ms", "20"]);
    let run = |budget: u64| {
        let p = Project::new(&mock.url, 64, 0, false);
        p.gen_corpus(&[
            "--companies",
            &companies.to_string(),
            "--quarters",
            &quarters.to_string(),
        ]);
        std::fs::write(p.dir.path().join("udfs/summary.toml"), summary_fn(budget)).unwrap();
        let sql = "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/';\n\
                   COPY (SELECT ticker, summarize_company(substr(transcript, 1, 2000) ORDER BY q) \
                   AS summary FROM t GROUP BY ticker) TO 'out/s.parquet' STORED AS PARQUET;\n";
        std::fs::write(p.dir.path().join("a.sql"), sql).unwrap();
        let m = run_sluice(
            p.dir.path(),
            &["run", "a.sql", "--quiet", "--metrics-json", "metrics.json"],
        );
        assert_eq!(num(&m.metrics, "failed"), 0);
        (num(&m.metrics, "requests"), m.wall_s)
    };
    let (small, small_s) = run(1500);
    let (large, large_s) = run(6000);
    let groups = companies as f64;
    json!({
        "scenario": format!("aggregate-{companies}x{quarters}"), "groups": companies,
        "values_per_group": quarters,
        "calls_per_group_budget_1500": round(small as f64 / groups, 2),
        "calls_per_group_budget_6000": round(large as f64 / groups, 2),
        "wall_s_1500": round(small_s, 2), "wall_s_6000": round(large_s, 2),
    })
}

/// GB scale (issue 9): `size` of generated transcripts → chunk → both LLM stages → Parquet,
/// first live against the test server at 20 ms (which fills the cache), then the same run three
/// times with every call answered from the cache: MB/s of input and peak RSS of each (for the
/// cached runs, the median wall time and the median peak RSS).
fn scale(size: &str, concurrency: usize) -> Value {
    let mock = Mock::start(&["--latency-ms", "20"]);
    let p = Project::new(&mock.url, concurrency, 0, true);
    p.gen_corpus(&["--size", size]);
    let input = std::fs::metadata(p.corpus()).unwrap().len() as f64 / 1e6;
    let transcripts = {
        use std::io::BufRead;
        let reader = std::io::BufReader::new(std::fs::File::open(p.corpus()).unwrap());
        reader.split(b'\n').count()
    };
    let live = p.run(&[]);
    let prompts = num(&live.metrics, "calls") + num(&live.metrics, "deduplicated");
    let limit = concurrency as f64 / 0.020;
    // The cached run is short and this machine is noisy: run it three times, report the medians
    // and every run's figures.
    let mut cached: Vec<Measured> = (0..3).map(|_| p.run(&[])).collect();
    for c in &cached {
        assert_eq!(
            num(&c.metrics, "requests"),
            0,
            "the later runs are all hits"
        );
    }
    let cached_runs: Vec<Value> = cached
        .iter()
        .map(|c| json!([round(c.wall_s, 2), round(c.max_rss_mb, 1)]))
        .collect();
    let mut rss: Vec<f64> = cached.iter().map(|c| c.max_rss_mb).collect();
    rss.sort_by(f64::total_cmp);
    let cached_rss = rss[1];
    cached.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
    let cached = cached.swap_remove(1);
    let output = std::fs::metadata(p.dir.path().join("out/earnings_qa.parquet"))
        .map_or(0.0, |m| m.len() as f64 / 1e6);
    json!({
        "scenario": format!("scale-{size}"), "input_mb": round(input, 1),
        "transcripts": transcripts, "prompts": prompts, "output_parquet_mb": round(output, 1),
        "live_concurrency": concurrency, "live_wall_s": round(live.wall_s, 2),
        "live_prompts_per_s": round(prompts as f64 / live.wall_s, 1),
        "live_limit_prompts_per_s": round(limit, 1),
        "live_ratio_to_limit": round(prompts as f64 / live.wall_s / limit, 3),
        "live_max_rss_mb": round(live.max_rss_mb, 1),
        "live_cpu_s": round(live.cpu_s, 2),
        "cached_wall_s": round(cached.wall_s, 2),
        "cached_mb_per_s": round(input / cached.wall_s, 1),
        "cached_max_rss_mb": round(cached_rss, 1),
        "cached_cpu_s": round(cached.cpu_s, 2),
        "cached_runs_wall_s_rss_mb": cached_runs,
    })
}

/// Writes a ~1 GB uncompressed Parquet result to local disk and to a local S3 server (moto),
/// then reads each back in full: MB/s of each.
fn s3_vs_local() -> Value {
    let moto_bin = std::env::var("SLUICE_MOTO_SERVER")
        .unwrap_or_else(|_| format!("{}/.venv-moto/bin/moto_server", env!("CARGO_MANIFEST_DIR")));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let mut moto = Command::new(&moto_bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server (run scripts/test.sh once to create .venv-moto)");
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let env = vec![
        ("AWS_ENDPOINT_URL", endpoint.clone()),
        ("AWS_ACCESS_KEY_ID", "bench".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "bench-secret".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("data")).unwrap();
    std::fs::write(d.join("sluice.toml"), "[cache]\nenabled = false\n").unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["gen-corpus", "--size", "1GB", "--out"])
        .arg(d.join("data/corpus.jsonl"))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let sql = |name: &str, text: &str| {
        std::fs::write(d.join(name), text).unwrap();
    };
    sql(
        "prepare.sql",
        "CREATE EXTERNAL TABLE c STORED AS JSON LOCATION 'data/';\n\
         COPY (SELECT * FROM c) TO 'src.parquet' STORED AS PARQUET \
         OPTIONS ('format.compression' 'uncompressed');\n",
    );
    run_sluice_env(d, &["run", "prepare.sql"], &[]);
    let bytes = std::fs::metadata(d.join("src.parquet")).unwrap().len();
    let mb = bytes as f64 / 1e6;
    let _ = reqwest_free_put(&endpoint, "bench");
    let write = |target: &str| {
        sql(
            "write.sql",
            &format!(
                "CREATE EXTERNAL TABLE s STORED AS PARQUET LOCATION 'src.parquet';\n\
                 COPY (SELECT * FROM s) TO '{target}' STORED AS PARQUET \
                 OPTIONS ('format.compression' 'uncompressed');\n"
            ),
        );
        run_sluice_env(d, &["run", "write.sql"], &env)
    };
    let read = |location: &str| {
        sql(
            "read.sql",
            &format!(
                "CREATE EXTERNAL TABLE r STORED AS PARQUET LOCATION '{location}';\n\
                 SELECT count(*), sum(length(transcript)) FROM r;\n"
            ),
        );
        run_sluice_env(d, &["run", "read.sql"], &env)
    };
    let lw = write("out/big.parquet");
    let lr = read("out/big.parquet");
    let sw = write("s3://bench/big.parquet");
    let sr = read("s3://bench/big.parquet");
    let _ = moto.kill();
    let _ = moto.wait();
    let rate = |m: &Measured| round(mb / m.wall_s, 1);
    json!({
        "scenario": "s3-vs-local", "parquet_mb": round(mb, 1),
        "local_write_mb_s": rate(&lw), "local_read_mb_s": rate(&lr),
        "s3_write_mb_s": rate(&sw), "s3_read_mb_s": rate(&sr),
        "local_write_max_rss_mb": round(lw.max_rss_mb, 1), "local_read_max_rss_mb": round(lr.max_rss_mb, 1),
        "s3_write_max_rss_mb": round(sw.max_rss_mb, 1), "s3_read_max_rss_mb": round(sr.max_rss_mb, 1),
    })
}

/// Tokens per second of the embedded model (needs the `local` feature and models/ fetched):
/// 64 rows answering the same kind of short question, decoded 1, 4 and 8 at a time.
fn local_model() -> Value {
    let model = format!(
        "{}/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut out = serde_json::Map::new();
    out.insert("scenario".into(), json!("local-model"));
    for parallel in [1, 4, 8] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("sluice.toml"),
            format!(
                "[cache]\nenabled = false\n[models.default]\nkind = \"local\"\n\
                 model = \"{model}\"\nconcurrency = {parallel}\n"
            ),
        )
        .unwrap();
        // No output schema: plain generation of at most 48 tokens per row, 64 different
        // prompts (rows cut at 48 tokens are retried once with 96: all of it is counted).
        std::fs::create_dir_all(d.join("udfs")).unwrap();
        std::fs::write(
            d.join("udfs/sentence.toml"),
            "name = \"sentence\"\nargs = [\"n\"]\nmax_tokens = 48\ntemperature = 0.0\n\
             prompt = \"Write one sentence about the number {{ n }} in a quarterly earnings \
             report.\"\n",
        )
        .unwrap();
        std::fs::write(
            d.join("q.sql"),
            "CREATE TABLE r AS SELECT sentence(v) AS t, sentence_error(v) AS e \
             FROM (SELECT unnest(range(64)) AS v);\n",
        )
        .unwrap();
        let m = run_sluice_env(
            d,
            &["run", "q.sql", "--quiet", "--metrics-json", "metrics.json"],
            &[("RUST_LOG", "sluice::llm::local=debug".to_string())],
        );
        let tokens = num(&m.metrics, "tokens_out");
        // The local provider's log: steps that carried only generated tokens (no prompt), the
        // figure comparable with llama-batched-bench's text-generation speed.
        let log = std::fs::read_to_string(d.join("stderr.txt")).unwrap_or_default();
        let generation = log
            .lines()
            .rev()
            .find_map(|l| l.split("generation-only steps: ").nth(1))
            .map(|rest| {
                let n: Vec<f64> = rest
                    .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .filter_map(|t| t.parse().ok())
                    .collect();
                json!({"steps": n[0], "tokens": n[1], "seconds": n[2],
                       "tokens_per_s": round(n[1] / n[2], 1)})
            });
        out.insert(
            format!("rows_{parallel}_at_once"),
            json!({
                "tokens_out": tokens, "tokens_in": num(&m.metrics, "tokens_in"),
                "wall_s": round(m.wall_s, 2),
                "generated_tokens_per_s": round(tokens as f64 / m.wall_s, 1),
                "generation_only_steps": generation,
                "max_rss_mb": round(m.max_rss_mb, 1),
            }),
        );
    }
    Value::Object(out)
}

/// Creates a bucket on the local S3 server with a plain HTTP PUT (moto needs no signature).
fn reqwest_free_put(endpoint: &str, bucket: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let addr = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
    Ok(())
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// A boolean filter answered by a cascade (small model, then large) and by the large model
/// alone, over `rows` statements; the test server's small model (`--small-model`) is right on
/// 85% of rows and unsure of 90% of its wrong answers. Agreement of the two filters' decisions,
/// and the cascade's cost against the large model's.
fn cascade(rows: usize) -> Value {
    let mock = Mock::start(&["--latency-ms", "20", "--small-model", "small"]);
    let prompt = "Is this statement material to the company's results? Answer true or false. \
                  {{ x }}";
    let run = |models: &str| {
        let p = Project::new(&mock.url, 64, 0, false);
        let dir = p.dir.path();
        let url = &mock.url;
        std::fs::write(
            dir.join("sluice.toml"),
            format!(
                "[dispatcher]\nconcurrency = 64\nmax_attempts = 8\n\n[cache]\nenabled = false\n\n\
                 [models.small]\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"small\"\n\
                 input_usd_per_mtok = 0.15\noutput_usd_per_mtok = 0.6\n\n\
                 [models.large]\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"large\"\n\
                 input_usd_per_mtok = 2.5\noutput_usd_per_mtok = 10.0\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("udfs/material.toml"),
            format!(
                "name = \"material\"\nargs = [\"x\"]\nprompt = {prompt:?}\n\
                 output = {{ type = \"boolean\" }}\n{models}\n"
            ),
        )
        .unwrap();
        let lines: Vec<String> = (0..rows)
            .map(|i| {
                json!({"id": i, "x": format!("Segment {} revenue moved {} percent in quarter {}.",
                    i % 37, i % 23, i % 4 + 1)})
                .to_string()
            })
            .collect();
        std::fs::write(dir.join("data/statements.jsonl"), lines.join("\n") + "\n").unwrap();
        let sql = "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION 'data/statements.jsonl';\n\
                   COPY (SELECT id FROM t WHERE material(x)) TO 'out/kept.csv' STORED AS CSV;\n";
        std::fs::write(dir.join("f.sql"), sql).unwrap();
        let m = run_sluice(
            dir,
            &["run", "f.sql", "--quiet", "--metrics-json", "metrics.json"],
        );
        assert_eq!(num(&m.metrics, "failed"), 0, "{}", m.metrics);
        let kept: std::collections::BTreeSet<String> =
            std::fs::read_to_string(dir.join("out/kept.csv"))
                .unwrap()
                .lines()
                .skip(1)
                .map(str::to_string)
                .collect();
        (m, kept)
    };
    let (c, kept_c) =
        run("cascade = [{ model = \"small\", min_confidence = 0.8 }, { model = \"large\" }]");
    let (l, kept_l) = run("model = \"large\"");
    let differ = kept_c.symmetric_difference(&kept_l).count();
    let cost = |m: &Measured| m.metrics["cost_usd"].as_f64().unwrap_or(0.0);
    let stages = &c.metrics["functions"]["material"]["cascade"];
    let asked = |i: usize| stages["models"][i]["asked"].as_u64().unwrap_or(0);
    json!({
        "scenario": format!("cascade-{rows}"), "rows": rows,
        "agreement_with_large": round(1.0 - differ as f64 / rows as f64, 4),
        "cost_ratio_to_large": round(cost(&c) / cost(&l).max(1e-12), 3),
        "escalated_share": round(asked(1) as f64 / rows as f64, 3),
        "requests_small": asked(0), "requests_large": asked(1),
        "cost_usd_cascade": round(cost(&c), 5), "cost_usd_large": round(cost(&l), 5),
        "summary_large_alone_usd": stages["last_model_alone_usd"],
        "kept_cascade": kept_c.len(), "kept_large": kept_l.len(),
        "wall_s_cascade": round(c.wall_s, 2), "wall_s_large": round(l.wall_s, 2),
        "max_rss_mb_cascade": round(c.max_rss_mb, 1),
    })
}

fn smoke() {
    // Small and fast: checks that the counts the benchmark reports are the real ones.
    let mock = Mock::start(&["--latency-ms", "1"]);
    let p = Project::new(&mock.url, 16, 12, true);
    let first = p.run(&[]);
    assert_eq!(num(&first.metrics, "requests"), 48, "{}", first.metrics);
    assert_eq!(num(&first.metrics, "succeeded"), 48);
    assert!(first.cpu_s > 0.0 && first.max_rss_mb > 1.0);
    let again = p.run(&[]);
    assert_eq!(num(&again.metrics, "requests"), 0);
    assert_eq!(num(&again.metrics, "cache_hits"), 48);
    let line = flagship("smoke", 12, 8, &["--latency-ms", "5"], 5.0);
    assert_eq!(line["prompts"], 48, "{line}");
    println!("{line}");
    let line = flagship_with("smoke-batch4", 12, 4, &["--latency-ms", "5"], 5.0, 4);
    assert_eq!(line["prompts"], 48, "{line}");
    assert!(line["requests"].as_u64().unwrap() < 48, "{line}");
    println!("{line}");
    let line = distributed(12, 2, 4, 5);
    assert_eq!(line["prompts"], 48, "{line}");
    println!("{line}");
    let line = capacity(12, 4, 5);
    assert_eq!(line["prompts"], 48, "{line}");
    assert_eq!(line["coordinator_counted_requests"], 48, "{line}");
    println!("{line}");
    let line = cascade(200);
    assert_eq!(line["requests_small"], 200, "{line}");
    let escalated = line["requests_large"].as_u64().unwrap();
    assert!((10..100).contains(&escalated), "{line}");
    assert!(
        line["agreement_with_large"].as_f64().unwrap() >= 0.9,
        "{line}"
    );
    assert!(
        line["cost_ratio_to_large"].as_f64().unwrap() < 1.0,
        "{line}"
    );
    println!("{line}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        smoke();
        return;
    }
    let wanted: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    let want = |s: &str| wanted.is_empty() || wanted.contains(&s);
    let deadline = Instant::now() + Duration::from_secs(1800);
    let emit = |v: Value| {
        println!("{v}");
        assert!(Instant::now() < deadline, "benchmarks exceeded 30 minutes");
    };
    if want("flagship-c64") {
        emit(flagship(
            "flagship-c64",
            4000,
            64,
            &["--latency-ms", "20"],
            20.0,
        ));
    }
    if want("flagship-c512") {
        emit(flagship(
            "flagship-c512",
            8000,
            512,
            &["--latency-ms", "20"],
            20.0,
        ));
    }
    if want("batch8") {
        let args = ["--latency-ms", "20"];
        emit(flagship_with("batch8-c64", 25_000, 64, &args, 20.0, 8));
    }
    if want("jitter") {
        // Uniform 10-200 ms: mean 105 ms.
        let args = ["--latency-ms", "10", "--jitter-ms", "190"];
        emit(flagship("jitter-10-200ms-c64", 1000, 64, &args, 105.0));
    }
    if want("rate-limit") {
        let args = [
            "--latency-ms",
            "20",
            "--rate-limit",
            "0.05",
            "--retry-after-ms",
            "100",
        ];
        emit(flagship("rate-limit-5pct-c64", 2000, 64, &args, 20.0));
    }
    if want("limits") {
        let concurrency_limit = 32.0 / 0.020;
        for (name, headers) in [("limits-cap32", true), ("limits-cap32-no-headers", false)] {
            let mut args = vec!["--max-in-flight", "32", "--retry-after-ms", "1000"];
            if !headers {
                args.push("--no-rate-headers");
            }
            emit(limited(name, 2000, &args, concurrency_limit));
        }
        // What bounds the cap on this machine: the same run with 32 in flight and no limit.
        let args = ["--latency-ms", "20"];
        emit(flagship(
            "limits-cap32-bound-c32-unlimited",
            2000,
            32,
            &args,
            20.0,
        ));
        for (name, headers) in [
            ("limits-rpm12000", true),
            ("limits-rpm12000-no-headers", false),
        ] {
            let mut args = vec!["--rpm", "12000"];
            if !headers {
                args.push("--no-rate-headers");
            }
            emit(limited(name, 2000, &args, 200.0));
        }
        // Tokens bind before requests: the token limit is worth 150 requests a second.
        let per_request = flagship_tokens_per_request();
        let tpm = (150.0 * 60.0 * per_request).round() as u64;
        let tpm_arg = tpm.to_string();
        for (name, headers) in [("limits-tpm", true), ("limits-tpm-no-headers", false)] {
            let mut args = vec!["--rpm", "12000", "--tpm", tpm_arg.as_str()];
            if !headers {
                args.push("--no-rate-headers");
            }
            let limit = tpm as f64 / 60.0 / per_request;
            emit(limited(name, 2000, &args, limit));
        }
    }
    if want("hedge") {
        emit(hedging(2000));
    }
    if want("all-faults") {
        emit(all_faults(2000));
    }
    if want("cache") {
        emit(cache_rerun(50_000));
    }
    if want("s3") {
        emit(s3_vs_local());
    }
    if want("scale") || want("scale-100MB") {
        emit(scale("100MB", 256));
    }
    if want("scale") || want("scale-1GB") {
        emit(scale("1GB", 256));
    }
    if want("local") {
        emit(local_model());
    }
    if want("aggregate") {
        emit(aggregate(50, 8));
    }
    if want("pack") {
        emit(packing(10_000, 10));
    }
    if want("batch-api") {
        emit(batch_api(10_000, 2000));
    }
    if want("replicas") {
        // At 50 ms sluice and the servers share the cores at ~1,200 requests a second; at
        // 200 ms the servers' latency is the bound, not the machine.
        for latency_ms in [50, 200] {
            for n in [1, 4] {
                emit(replicas(1000, n, 16, latency_ms));
            }
        }
    }
    if want("prefix") {
        let passages = 2000;
        let bound = prefix_lower_bound(passages);
        for (replicas, share) in [(1, false), (1, true), (4, false), (4, true)] {
            emit(prefix_run(passages, replicas, share, bound));
        }
    }
    if want("replica-killed") {
        emit(replica_killed(1000, 50));
    }
    if want("distributed") {
        for workers in 1..=3 {
            emit(distributed(600, workers, 16, 200));
        }
    }
    if want("capacity") {
        emit(capacity(600, 16, 200));
    }
    if want("topology") {
        emit(topology(300));
    }
    if want("cascade") {
        emit(cascade(2000));
    }
}
