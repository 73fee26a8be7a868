//! Shared helpers for integration tests: the fault-injecting OpenAI-compatible server
//! ([`mock_llm`]), engines configured against it, and Parquet read-back.
#![allow(dead_code)]

pub mod mock_llm;

use std::path::{Path, PathBuf};

use datafusion::arrow::record_batch::RecordBatch;
use sluice::config::Config;
use sluice::udf::def::FunctionDef;
use sluice::{Engine, RunOptions};

#[allow(unused_imports)]
pub use mock_llm::{Fault, FaultRates, MockConfig, MockServer, prompt_hash};

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
         backoff_base_ms = 2\nbackoff_max_ms = 50\n\n\
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

/// Starts a mock server with the given configuration.
pub async fn mock(cfg: MockConfig) -> MockServer {
    MockServer::start(cfg).await.expect("mock server starts")
}
