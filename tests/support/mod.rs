//! Shared helpers for integration tests: the fault-injecting OpenAI-compatible server
//! ([`mock_llm`]), engines configured against it, and Parquet read-back.
#![allow(dead_code)]

pub mod mock_llm;
pub mod providers;
pub mod rows;
pub mod s3;
pub mod workers;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::record_batch::RecordBatch;
use sluice::config::Config;
use sluice::udf::def::FunctionDef;
use sluice::{Engine, RunOptions};

#[allow(unused_imports)]
pub use mock_llm::{Fault, FaultRates, Limits, MockConfig, MockServer, StatsSnapshot, prompt_hash};

/// A function returning an object `{a: string, b: integer}` about `x` (for position tests).
pub const PROFILE_FN: &str = r#"
name = "profile"
args = ["x"]
prompt = "Describe {{ x }}"
output = { type = "object", properties = { a = { type = "string" }, b = { type = "integer" } }, required = ["a", "b"] }
"#;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/data/<name>` beside the repository.
pub fn shared_data(name: &str) -> PathBuf {
    repo().join("..").join("shared").join("data").join(name)
}

/// sluice.toml text pointing the `default` model at `base_url`, with fast retries for tests.
pub fn config_text(base_url: &str, max_attempts: u32, concurrency: usize) -> String {
    format!(
        "[dispatcher]\nconcurrency = {concurrency}\nmax_attempts = {max_attempts}\n\
         backoff_base_ms = 2\nbackoff_max_ms = 50\n\n[cache]\nenabled = false\n\n\
         [models.default]\nkind = \"openai\"\nbase_url = \"{base_url}\"\nmodel = \"mock\"\n\
         timeout_ms = 2000\n"
    )
}

/// A parsed configuration from [`config_text`], with function definitions read from `udf_dir`.
pub fn config(base_url: &str, max_attempts: u32, udf_dir: &Path) -> Config {
    let mut c = Config::parse(
        &config_text(base_url, max_attempts, 16),
        Path::new("sluice.toml"),
        &|_| None,
    )
    .expect("test config parses");
    c.udf_dir = udf_dir.to_path_buf();
    c
}

/// An engine using the repository's `udfs/` against `server`.
pub fn flagship_engine(server: &MockServer, max_attempts: u32) -> Engine {
    Engine::new(&config(
        &server.base_url(),
        max_attempts,
        &repo().join("udfs"),
    ))
    .expect("engine starts")
}

/// An engine with extra definitions given as TOML texts.
pub fn engine_with(server: &MockServer, defs: &[&str]) -> Engine {
    let cfg = config(&server.base_url(), 4, Path::new("/nonexistent"));
    let defs = defs
        .iter()
        .map(|t| FunctionDef::parse(t, Path::new("test.toml")).expect("definition parses"))
        .collect();
    Engine::with_functions(&cfg, defs).expect("engine starts")
}

/// Runs a script, returning what it printed.
pub async fn run(engine: &Engine, sql: &str) -> Result<String, String> {
    let mut out = Vec::new();
    engine
        .run_script(sql, "test.sql", &RunOptions::default(), &mut out)
        .await
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).to_string())
}

/// The flagship script with its input and output paths replaced.
pub fn flagship_sql(input: &Path, output: &Path) -> String {
    std::fs::read_to_string(repo().join("queries/earnings_qa.sql"))
        .expect("flagship query exists")
        .replace("'data/transcripts/'", &format!("'{}'", input.display()))
        .replace(
            "'out/earnings_qa.parquet'",
            &format!("'{}'", output.display()),
        )
}

/// Reads a Parquet file (or every Parquet file under a directory) back with the Arrow types
/// stored in the file, using the parquet crate directly.
pub async fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut files = vec![];
    if path.is_dir() {
        let mut stack = vec![path.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("output directory").flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "parquet") {
                    files.push(p);
                }
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut batches = vec![];
    for f in files {
        let file = std::fs::File::open(&f).expect("parquet file opens");
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("valid parquet")
            .build()
            .expect("reader");
        for b in reader {
            batches.push(b.expect("batch decodes"));
        }
    }
    batches
}

/// The values of a Utf8 column over every batch (None for NULL).
pub fn strings(batches: &[RecordBatch], col: &str) -> Vec<Option<String>> {
    let mut out = vec![];
    for b in batches {
        let a = b
            .column_by_name(col)
            .unwrap_or_else(|| panic!("column {col}"));
        let s = a.as_string::<i32>();
        for i in 0..s.len() {
            out.push(s.is_valid(i).then(|| s.value(i).to_string()));
        }
    }
    out
}

/// `kind` of an error struct column per row (None when the row has no error).
pub fn error_kinds(batches: &[RecordBatch], col: &str) -> Vec<Option<String>> {
    let mut out = vec![];
    for b in batches {
        let a = b
            .column_by_name(col)
            .unwrap_or_else(|| panic!("column {col}"));
        let st = a.as_struct();
        let kind = st.column_by_name("kind").expect("kind").as_string::<i32>();
        for i in 0..st.len() {
            out.push(st.is_valid(i).then(|| kind.value(i).to_string()));
        }
    }
    out
}

/// How long a test waits for something to happen before it fails: far longer than anything
/// takes, even on a loaded machine, so that only a real hang reaches it.
pub const WAIT_DEADLINE: Duration = Duration::from_secs(60);

/// Polls `ready` every few milliseconds until it holds; panics naming `what` if it has not
/// held after [`WAIT_DEADLINE`]. `ready` may itself panic (a process that ended too early).
pub async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_DEADLINE;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "waited {WAIT_DEADLINE:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// [`wait_until`] for a thread outside the runtime (a blocking task, a terminal's typist).
pub fn wait_until_blocking(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_DEADLINE;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "waited {WAIT_DEADLINE:?} for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts a mock server with the given configuration.
pub async fn mock(cfg: MockConfig) -> MockServer {
    MockServer::start(cfg).await.expect("mock server starts")
}

/// Every row of `batches` rendered as one line (columns joined by ` | `), sorted, so that two
/// results can be compared regardless of row order.
pub fn sorted_rows(batches: &[RecordBatch]) -> Vec<String> {
    let mut rows = ordered_rows(batches);
    rows.sort();
    rows
}

/// Every row of `batches` rendered as one line (columns joined by ` | `), in result order.
pub fn ordered_rows(batches: &[RecordBatch]) -> Vec<String> {
    use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
    let opts = FormatOptions::default().with_null("NULL");
    let mut rows = vec![];
    for b in batches {
        let fmts: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).expect("formatter"))
            .collect();
        for i in 0..b.num_rows() {
            let cells: Vec<String> = fmts.iter().map(|f| f.value(i).to_string()).collect();
            rows.push(cells.join(" | "));
        }
    }
    rows
}

/// A project directory for driving the `sluice` binary: the repository's udfs, a sluice.toml
/// pointing at `base_url` (cache enabled in `<dir>/.sluice/cache` when `cache` is set), and the
/// real excerpts as `data/t.jsonl`.
pub struct Project {
    /// The directory (removed on drop).
    pub dir: tempfile::TempDir,
}

impl Project {
    /// Sets up the directory.
    pub fn new(base_url: &str, concurrency: usize, cache: bool) -> Project {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        std::fs::create_dir_all(p.join("udfs")).unwrap();
        for f in ["generate_questions.toml", "answer_question.toml"] {
            std::fs::copy(repo().join("udfs").join(f), p.join("udfs").join(f)).unwrap();
        }
        let mut cfg = config_text(base_url, 2, concurrency);
        if cache {
            cfg = cfg.replace("[cache]\nenabled = false", "[cache]\nenabled = true");
        }
        std::fs::write(p.join("sluice.toml"), cfg).unwrap();
        std::fs::create_dir_all(p.join("data")).unwrap();
        std::fs::copy(
            shared_data("earnings_transcript_excerpts.jsonl"),
            p.join("data/t.jsonl"),
        )
        .unwrap();
        Project { dir }
    }

    /// A path inside the project.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a file inside the project, creating directories.
    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// A `sluice` command running in the project, with a clean environment for sluice's own
    /// variables.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.current_dir(self.dir.path())
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("SLUICE_CONFIG")
            .env_remove("SLUICE_CLUSTER_TOKEN");
        cmd
    }

    /// Runs `sluice <args>`; returns (exit code, stdout, stderr).
    pub fn run_args(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.command(args).output().expect("sluice runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// Runs `sluice <args>` with `input` on its stdin; returns (exit code, stdout, stderr).
    pub fn run_with_stdin(&self, args: &[&str], input: &str) -> (i32, String, String) {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sluice runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }
}

/// The flagship SQL reading `data/` and writing `out_rel`, relative to a [`Project`].
pub fn project_flagship_sql(out_rel: &str) -> String {
    std::fs::read_to_string(repo().join("queries/earnings_qa.sql"))
        .expect("flagship query exists")
        .replace("'data/transcripts/'", "'data/'")
        .replace("'out/earnings_qa.parquet'", &format!("'{out_rel}'"))
}

/// Runs `sluice ARGS` in `dir` on a pseudo-terminal (script(1)), as a person at a terminal
/// would; `typing` gets the terminal's input and a reader of what it has shown so far. Returns
/// (exit code, everything the terminal showed).
pub fn on_a_terminal(
    dir: &Path,
    args: &str,
    typing: impl FnOnce(&mut std::process::ChildStdin, &dyn Fn() -> String),
) -> (i32, String) {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};
    let sluice = env!("CARGO_BIN_EXE_sluice");
    let mut child = Command::new("script")
        .current_dir(dir)
        .env_remove("SLUICE_CONFIG")
        .args(["-qec", &format!("{sluice} {args}"), "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("script(1) runs");
    let seen = Arc::new(Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let mut stdin = child.stdin.take().unwrap();
    typing(&mut stdin, &|| seen.lock().unwrap().clone());
    let status = child.wait().unwrap();
    drop(stdin);
    reader.join().unwrap();
    let text = seen.lock().unwrap().clone();
    (status.code().unwrap_or(-1), text)
}

/// Whether any file under `dir` holds `needle` (for keys that must be written nowhere).
pub fn any_file_holds(dir: &Path, needle: &str) -> bool {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                return true;
            }
        }
    }
    false
}
