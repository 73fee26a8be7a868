//! Real `sluice worker` processes for the cluster tests: started on 127.0.0.1 ports, their
//! logs kept, stopped by PID.
#![allow(dead_code)]

use std::sync::Arc;

use super::{Project, project_flagship_sql};

/// A recognisable API key: the provider requires it, every machine has it in its own
/// environment, and it must appear in no worker's log.
pub const KEY: &str = "sk-cluster-test-7f3a9c1e5b";

/// A real `sluice worker` process and what it has logged.
pub struct WorkerProcess {
    pub child: std::process::Child,
    pub addr: String,
    log: Arc<std::sync::Mutex<String>>,
    /// The thread copying its stderr into `log`: it ends when the process's stderr closes.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl WorkerProcess {
    pub fn spawn(project: &Project, cache_rel: &str, listen: &str) -> WorkerProcess {
        Self::spawn_env(project, cache_rel, listen, &[])
    }

    pub fn spawn_env(
        project: &Project,
        cache_rel: &str,
        listen: &str,
        env: &[(&'static str, String)],
    ) -> WorkerProcess {
        Self::spawn_with(project, cache_rel, listen, &[], env)
    }

    /// A worker with `extra` flags after `--listen` and `--cache-dir`, and `env` added.
    pub fn spawn_with(
        project: &Project,
        cache_rel: &str,
        listen: &str,
        extra: &[&str],
        env: &[(&'static str, String)],
    ) -> WorkerProcess {
        use std::io::BufRead;
        let mut args = vec!["-v", "worker", "--listen", listen, "--cache-dir", cache_rel];
        args.extend_from_slice(extra);
        let mut child = project
            .command(&args)
            .env("SLUICE_CLUSTER_KEY", KEY)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sluice worker starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.strip_prefix("sluice worker listening on ") {
                    let _ = tx.send(rest.split(' ').next().unwrap_or_default().to_string());
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the worker says where it listens");
        WorkerProcess {
            child,
            addr,
            log,
            reader: Some(reader),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops it at once (a test that fails leaves no worker behind).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: it sends nothing more, and what it has on the wire stays there.
    pub fn freeze(&mut self) {
        // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> (i32, String) {
        // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        // Everything it logged, to its last line.
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        let log = self.log.lock().unwrap().clone();
        (status.code().unwrap_or(-1), log)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// The project's sluice.toml with the key read from `SLUICE_CLUSTER_KEY`.
pub fn cluster_project(base_url: &str, concurrency: usize) -> Project {
    let p = Project::new(base_url, concurrency, true);
    let text = std::fs::read_to_string(p.path("sluice.toml")).unwrap();
    p.write(
        "sluice.toml",
        &text.replace(
            "model = \"mock\"\n",
            &format!(
                "model = \"mock\"\napi_key_env = \"SLUICE_CLUSTER_KEY\"\nconcurrency = {concurrency}\n"
            ),
        ),
    );
    p.write("q.sql", &project_flagship_sql("out/qa.parquet"));
    p
}

/// `sluice ARGS` in `project` with the cluster's key; its stderr, after checking exit 0.
pub fn sluice_ok(project: &Project, args: &[&str]) -> String {
    let out = project
        .command(args)
        .env("SLUICE_CLUSTER_KEY", KEY)
        .output()
        .expect("sluice runs");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    stderr
}

/// The workers' addresses as `--workers` takes them.
pub fn worker_list(workers: &[WorkerProcess]) -> String {
    workers
        .iter()
        .map(|w| w.url())
        .collect::<Vec<_>>()
        .join(",")
}

/// `n` workers on free 127.0.0.1 ports, caches in `.sluice/w1` .. `.sluice/wN`.
pub fn spawn_workers(project: &Project, n: usize) -> Vec<WorkerProcess> {
    (1..=n)
        .map(|i| WorkerProcess::spawn(project, &format!(".sluice/w{i}"), "127.0.0.1:0"))
        .collect()
}

/// `sluice run q.sql` on `workers` in the background (stderr kept, stdout dropped).
pub fn spawn_run(project: &Project, workers: &str) -> std::process::Child {
    project
        .command(&["run", "--workers", workers, "q.sql"])
        .env("SLUICE_CLUSTER_KEY", KEY)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sluice run starts")
}
