//! The `sluice` command line.

pub mod batches;
mod exit;
pub(crate) mod interrupt;
pub mod progress;
pub(crate) mod repl;
pub mod run;
pub mod script;
mod summary;
mod worker;

pub(crate) use exit::Failure;
pub use exit::{EXIT_BATCHES_PENDING, EXIT_BUDGET, EXIT_CONFIG, EXIT_STATEMENT_FAILED};
pub use summary::format_summary;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cache::ResponseCache;
use crate::config::{Config, parse_size};
use crate::engine::{Engine, RunOptions};

/// sluice: SQL over your documents, with LLM calls as functions.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// Configuration file (default: $SLUICE_CONFIG, else ./sluice.toml if present).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Response cache directory (default: `[cache] dir` of sluice.toml, else .sluice/cache).
    #[arg(long, global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Run statements on these sluice workers (`host:port,...`; default: `[cluster] workers`
    /// of sluice.toml, else in this process).
    #[arg(long, global = true, value_name = "URL,...")]
    pub workers: Option<String>,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Execute every statement of a .sql file (or of `-c "SQL"`, or of stdin with `-`) in order.
    Run {
        /// The script.
        #[command(flatten)]
        script: script::ScriptArgs,
        /// How to run it.
        #[command(flatten)]
        flags: run::RunFlags,
    },
    /// Plan every statement and estimate its LLM calls, tokens and cost, without calling a
    /// model or writing anything (cached responses count as free).
    Explain {
        /// The script.
        #[command(flatten)]
        script: script::ScriptArgs,
        /// Print the estimate as JSON.
        #[arg(long)]
        json: bool,
        /// Leave the plans out.
        #[arg(long)]
        no_plan: bool,
        /// First run the script for real on the first N rows of each table (models are called,
        /// answers cached, nothing written), then extrapolate completion tokens and cost from
        /// what those calls returned instead of from the output schemas.
        #[arg(long, value_name = "N")]
        sample: Option<usize>,
        /// Estimate as `sluice run --batch` would run: every model with a batch API through
        /// it, at its batch prices.
        #[arg(long)]
        batch: bool,
    },
    /// An interactive SQL shell with the LLM functions (`\d` lists tables and functions).
    Sql {
        /// Rows of each SELECT result to print.
        #[arg(long, default_value_t = 20)]
        max_rows: usize,
    },
    /// List the provider batch jobs that runs left open (`mode = "batch"`), or cancel them.
    Batches {
        /// `list` (default) or `cancel [ID...]`.
        #[command(subcommand)]
        action: Option<batches::BatchesAction>,
    },
    /// Serve plan stages to a coordinator (`sluice run --workers`) until SIGTERM or Ctrl-C.
    #[command(after_long_help = worker::WORKER_HELP)]
    Worker {
        /// Address to listen on, e.g. 0.0.0.0:50051 (port 0: any free port, printed on start).
        #[arg(long)]
        listen: String,
        /// Serve without a cluster token on an address other than loopback: anyone who reaches
        /// the port can run plans with this worker's API keys.
        #[arg(long)]
        insecure: bool,
    },
    /// Inspect or empty the persistent response cache.
    Cache {
        /// `stats` or `clear`.
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Write a deterministic corpus of fictional earnings-call transcripts as JSON lines.
    GenCorpus {
        /// Output file (`.jsonl`).
        #[arg(long)]
        out: PathBuf,
        /// Number of companies.
        #[arg(long, default_value_t = 200)]
        companies: usize,
        /// Consecutive quarters per company.
        #[arg(long, default_value_t = 8)]
        quarters: usize,
        /// Stop after about this much output, e.g. 100MB or 1GB (quarters then repeat as needed).
        #[arg(long)]
        size: Option<String>,
        /// Random seed; the same seed gives the same bytes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// What `sluice cache` does.
#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Entries, file size and bytes per entry.
    Stats,
    /// Remove every stored response.
    Clear,
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Finds the configuration: `--config`, `$SLUICE_CONFIG`, `./sluice.toml`, or defaults.
pub fn load_config(explicit: Option<&Path>) -> Result<Config, String> {
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os("SLUICE_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| {
            let p = PathBuf::from("sluice.toml");
            p.exists().then_some(p)
        });
    match path {
        Some(p) => Config::load(&p).map_err(|e| e.to_string()),
        None => Ok(Config {
            cluster: crate::config::ClusterConfig::from_env(&|k| std::env::var(k).ok())?,
            ..Config::default()
        }),
    }
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    match try_main(cli).await {
        Ok(code) => code,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("error: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

/// Loads the configuration and runs the subcommand.
async fn try_main(cli: Cli) -> Result<ExitCode, Failure> {
    let mut config = load_config(cli.config.as_deref()).map_err(Failure::config)?;
    if let Some(dir) = cli.cache_dir {
        config.cache.dir = dir;
    }
    if let Some(workers) = &cli.workers {
        config.cluster.workers = crate::config::ClusterConfig::parse_workers(&[workers])
            .map_err(|e| Failure::config(format!("--workers: {e}")))?;
    }
    match cli.command {
        Command::Cache { action } => cache_command(&config, action),
        Command::Worker { listen, insecure } => {
            worker::worker_command(&config, &listen, insecure).await
        }
        Command::Batches { action } => batches::batches_command(&config, action).await,
        Command::Explain {
            script,
            json,
            no_plan,
            sample,
            batch,
        } => {
            if batch {
                config.use_batch_mode();
            }
            explain_command(&config, &script.load()?, json, no_plan, sample).await
        }
        Command::Sql { max_rows } => {
            let engine = Engine::new(&config).map_err(Failure::config)?;
            if repl::run(
                &engine,
                &RunOptions {
                    max_rows,
                    ..RunOptions::default()
                },
            )
            .await
            {
                Ok(ExitCode::SUCCESS)
            } else {
                Err(Failure::new(EXIT_STATEMENT_FAILED, ""))
            }
        }
        Command::GenCorpus {
            out,
            companies,
            quarters,
            size,
            seed,
        } => gen_corpus(&out, companies, quarters, size.as_deref(), seed),
        Command::Run { script, flags } => run::run_command(config, &script.load()?, flags).await,
    }
}

fn gen_corpus(
    out: &Path,
    companies: usize,
    quarters: usize,
    size: Option<&str>,
    seed: u64,
) -> Result<ExitCode, Failure> {
    let max_bytes = size
        .map(parse_size)
        .transpose()
        .map_err(|e| Failure::config(format!("--size {e}")))?;
    // With a size budget, quarters repeat until it is reached.
    let quarters = if max_bytes.is_some() {
        usize::MAX / 2
    } else {
        quarters
    };
    let result = std::fs::File::create(out).and_then(|f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let r = crate::source::corpus::write_corpus(
            &mut w,
            seed,
            companies.max(1),
            quarters,
            max_bytes,
        )?;
        w.flush()?;
        Ok(r)
    });
    match result {
        Ok((records, bytes)) => {
            eprintln!(
                "wrote {records} transcripts ({bytes} bytes) to {}",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let _ = std::fs::remove_file(out);
            Err(Failure::statement(format!(
                "cannot write {}: {e}",
                out.display()
            )))
        }
    }
}

async fn explain_command(
    config: &Config,
    script: &script::Script,
    json: bool,
    no_plan: bool,
    sample: Option<usize>,
) -> Result<ExitCode, Failure> {
    // The sample first: its answers are cached, so the estimate counts them as free.
    let measured = match sample {
        Some(rows) => {
            let engine = Engine::new(config).map_err(Failure::config)?;
            let m = engine
                .sample_script(&script.sql, &script.origin, rows)
                .await
                .map_err(Failure::statement)?;
            engine.flush_cache().await.map_err(Failure::statement)?;
            Some((m, rows))
        }
        None => None,
    };
    let engine = Engine::for_estimates(config).map_err(Failure::config)?;
    let mut x = engine
        .explain_script(&script.sql, &script.origin)
        .await
        .map_err(Failure::statement)?;
    if let Some((m, rows)) = &measured {
        engine.extrapolate(&mut x, m, *rows);
    }
    if json {
        println!("{}", x.to_json());
    } else {
        print!("{}", x.to_text(!no_plan));
    }
    Ok(ExitCode::SUCCESS)
}

fn cache_command(config: &Config, action: CacheAction) -> Result<ExitCode, Failure> {
    let dir = &config.cache.dir;
    if matches!(action, CacheAction::Stats) && !ResponseCache::file_in(dir).exists() {
        println!("cache {}: empty (no cache file yet)", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let cache = ResponseCache::open(dir).map_err(Failure::statement)?;
    let result = match action {
        CacheAction::Stats => cache.stats().map(|s| {
            let per = |b: u64| b.checked_div(s.entries).unwrap_or(0);
            println!(
                "cache {}: {} responses, {} bytes on disk ({} per response; {} of keys and values \
                 per response)",
                cache.path().display(),
                s.entries,
                s.file_bytes,
                per(s.file_bytes),
                per(s.payload_bytes)
            );
        }),
        CacheAction::Clear => cache.clear().map(|n| {
            println!("cache {}: removed {n} responses", cache.path().display());
        }),
    };
    result.map_err(Failure::statement)?;
    Ok(ExitCode::SUCCESS)
}
