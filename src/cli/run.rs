//! `sluice run FILE.sql`: the run's flags applied to the configuration, the script run with
//! progress, then the summary, the metrics file and the exit code (a budget stop says what was
//! kept).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use super::exit::{EXIT_BATCHES_PENDING, EXIT_BUDGET, EXIT_CONFIG, EXIT_STATEMENT_FAILED, Failure};
use super::interrupt::{EXIT_INTERRUPTED, Interrupts, run_until_interrupted};
use super::progress;
use super::script::Script;
use super::summary::format_summary;
use crate::config::Config;
use crate::engine::{Engine, OutputFormat, RunOptions, StatementError, StatementErrorKind};
use crate::llm::MetricsSnapshot;
use crate::source::lines::{BadLines, BadRows};

/// The flags of `sluice run`.
#[derive(Debug, clap::Args)]
pub struct RunFlags {
    /// Rows of each SELECT result to print as a table.
    #[arg(long, default_value_t = 20)]
    pub max_rows: usize,
    /// How SELECT results are printed: `table` (the first --max-rows), or every row as `csv`
    /// or `json` lines with nothing else on stdout.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    /// No progress display and no LLM summary.
    #[arg(short, long)]
    pub quiet: bool,
    /// Also write the LLM metrics as JSON to this file.
    #[arg(long)]
    pub metrics_json: Option<PathBuf>,
    /// Neither read nor write the persistent response cache.
    #[arg(long, conflicts_with = "refresh")]
    pub no_cache: bool,
    /// Ignore cached responses (call again) but store the new ones.
    #[arg(long)]
    pub refresh: bool,
    /// Stop cleanly (exit code 3) before the run's prompt + completion tokens would exceed
    /// this; everything received so far stays in the cache.
    #[arg(long)]
    pub budget_tokens: Option<u64>,
    /// Stop cleanly (exit code 3) before the run's cost would exceed this many US dollars
    /// at the models' prices (`input_usd_per_mtok`, `output_usd_per_mtok` in sluice.toml).
    #[arg(long)]
    pub budget_usd: Option<f64>,
    /// Send every model that has a batch API (OpenAI-compatible chat models) through it, as
    /// `mode = "batch"` in sluice.toml does: half the price, results within the provider's
    /// completion window.
    #[arg(long)]
    pub batch: bool,
    /// With batch mode, wait for the jobs' results (default); `--wait false` submits them,
    /// exits with code 75 and leaves them running: the same command collects them later.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub wait: bool,
}

/// Applies the flags that change the configuration.
fn apply(config: &mut Config, flags: &RunFlags) -> Result<(), Failure> {
    if flags.budget_tokens.is_some() {
        config.dispatcher.budget_tokens = flags.budget_tokens;
    }
    if let Some(usd) = flags.budget_usd {
        if !usd.is_finite() || usd < 0.0 {
            return Err(Failure::config(format!(
                "--budget-usd must be a non-negative amount, got {usd}"
            )));
        }
        config.dispatcher.budget_usd = Some(usd);
    }
    if flags.no_cache {
        config.cache.enabled = false;
    }
    if flags.batch && config.models.values().all(|m| !m.supports_batch()) {
        return Err(Failure::config(
            "--batch: no model in sluice.toml has a batch API (models of kind = \"openai\", \"azure_openai\" or \"anthropic\" do)",
        ));
    }
    if flags.batch {
        config.use_batch_mode();
    }
    for m in config.models.values_mut() {
        m.batch.wait = flags.wait;
    }
    config.cache.refresh = flags.refresh;
    Ok(())
}

/// Runs the script, printing to stdout (through the progress display unless `quiet`); `None`
/// when interrupted.
async fn execute(
    engine: &Engine,
    script: &Script,
    flags: &RunFlags,
    interrupts: &mut Interrupts,
) -> Option<Ended> {
    let opts = RunOptions {
        max_rows: flags.max_rows,
        format: flags.format,
    };
    let progress = (!flags.quiet)
        .then(|| progress::Progress::start(engine.live_metrics(), Box::new(engine.batch_watch())));
    let mut out: Box<dyn Write> = match &progress {
        Some(p) => Box::new(p.writer(std::io::stdout())),
        None => Box::new(std::io::stdout()),
    };
    let work = engine.run_script(&script.sql, &script.origin, &opts, &mut out);
    let work = until_only_parked_batches(engine, work);
    let result = run_until_interrupted(engine, interrupts, work).await;
    out.flush().ok();
    drop(out);
    if let Some(p) = progress {
        p.finish().await;
    }
    result
}

/// How a run that was not interrupted ended.
enum Ended {
    /// Every statement ran (or one failed).
    Done(Result<(), StatementError>),
    /// It only waited for batch jobs left running (`--wait false`).
    Parked,
}

/// `work`, or [`Ended::Parked`] once the run has done all it can without waiting for a batch
/// job (checked for a second, so that results just collected can start the next stage).
async fn until_only_parked_batches(
    engine: &Engine,
    work: impl std::future::Future<Output = Result<(), StatementError>>,
) -> Ended {
    let parked = async {
        let mut quiet = 0;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            quiet = if engine.only_parked_batches() {
                quiet + 1
            } else {
                0
            };
            if quiet >= 10 {
                return;
            }
        }
    };
    tokio::select! {
        r = work => Ended::Done(r),
        _ = parked => Ended::Parked,
    }
}

/// `N batch job(s) with M requests ...`, for the jobs still open at the provider.
fn open_jobs_line(engine: &Engine) -> Option<String> {
    let open: Vec<_> = engine
        .batch_jobs()
        .into_iter()
        .filter(|(_, j)| !j.status.is_final())
        .collect();
    if open.is_empty() {
        return None;
    }
    let requests: u64 = open.iter().map(|(_, j)| j.lines).sum();
    Some(format!(
        "{} batch job(s) with {requests} requests keep running at the provider; the same \
         command collects their results (sluice batches lists them)",
        open.len()
    ))
}

/// `data/t.jsonl: 2 malformed lines skipped (lines 3, 9)`.
fn bad_rows_line(b: &BadLines) -> String {
    let what = match b.mode {
        BadRows::Null => "read as NULLs",
        _ => "skipped",
    };
    let lines: Vec<String> = b.first_lines.iter().map(u64::to_string).collect();
    let more = if b.count > b.first_lines.len() as u64 {
        ", …"
    } else {
        ""
    };
    let plural = if b.count == 1 { "" } else { "s" };
    format!(
        "read {}: {} malformed line{plural} {what} (line{plural} {}{more})",
        b.file,
        b.count,
        lines.join(", ")
    )
}

fn bad_rows_json(b: &BadLines) -> serde_json::Value {
    serde_json::json!({
        "file": b.file, "mode": b.mode.as_str(), "lines": b.count, "first_lines": b.first_lines,
    })
}

/// The line after an interrupt: what is kept and how to continue.
fn interrupt_stop(metrics: &MetricsSnapshot, cache_enabled: bool) -> String {
    let received = metrics.succeeded;
    if cache_enabled {
        format!(
            "stopped: {received} answer(s) received by this run are kept in the cache \
             (with {} found there); the interrupted statement wrote no output; the same command \
             continues from there",
            metrics.cache_hits
        )
    } else {
        format!(
            "stopped: {received} answer(s) received but not kept (the cache is off); the \
             interrupted statement wrote no output"
        )
    }
}

/// The line that says what a budget stop kept.
fn budget_stop(e: &StatementError, metrics: &MetricsSnapshot, cache_enabled: bool) -> String {
    let kept = if cache_enabled {
        "and kept in the cache; the same command with a larger budget continues from there"
    } else {
        "(not kept: the cache is off)"
    };
    let completed = match e.index {
        1 => "no statement completed".to_string(),
        2 => "statement 1 completed".to_string(),
        i => format!("statements 1 to {} completed", i - 1),
    };
    format!(
        "stopped by the budget: {completed}, statement {} and later not completed (no output \
         written); {} calls answered {kept}; {} refused",
        e.index,
        metrics.succeeded + metrics.cache_hits,
        metrics.errors.get("budget").copied().unwrap_or(0)
    )
}

/// The summary, malformed lines and batch jobs on stderr, and the metrics file: what the run
/// did. Returns the metrics.
async fn report(engine: &Engine, flags: &RunFlags) -> MetricsSnapshot {
    let metrics = engine.metrics();
    let bad_rows = engine.bad_rows().await;
    if !flags.quiet && metrics.calls + metrics.deduplicated + metrics.cache_hits > 0 {
        eprintln!("{}", format_summary(&metrics));
    }
    if !flags.quiet
        && let Some(n) = engine.workers()
    {
        eprintln!(
            "LLM calls of distributed stages ran on the {n} worker(s): each prints its totals \
             (requests sent, answers from its cache) when it stops"
        );
    }
    let jobs = engine.batch_jobs();
    if !flags.quiet {
        for b in &bad_rows {
            eprintln!("{}", bad_rows_line(b));
        }
        if !jobs.is_empty() {
            let each: Vec<String> = jobs
                .iter()
                .map(|(_, j)| format!("{} {} ({} requests)", j.status.id, j.status.status, j.lines))
                .collect();
            eprintln!("batch jobs: {}", each.join(", "));
        }
    }
    if let Some(path) = &flags.metrics_json {
        let mut json = metrics.to_json();
        json["bad_rows"] = serde_json::Value::Array(bad_rows.iter().map(bad_rows_json).collect());
        json["batch_jobs"] = jobs
            .iter()
            .map(|(model, j)| {
                serde_json::json!({
                    "id": j.status.id, "model": model, "status": j.status.status,
                    "requests": j.lines, "completed": j.status.completed,
                    "failed": j.status.failed, "resumed": j.resumed,
                })
            })
            .collect();
        if let Err(e) = std::fs::write(path, json.to_string()) {
            eprintln!("error: cannot write {}: {e}", path.display());
        }
    }
    metrics
}

/// `sluice run`.
pub(super) async fn run_command(
    mut config: Config,
    script: &Script,
    flags: RunFlags,
) -> Result<ExitCode, Failure> {
    apply(&mut config, &flags)?;
    let engine = Engine::new(&config).map_err(Failure::config)?;
    if flags.budget_usd.is_some()
        && let Some(model) = engine.unpriced_model()
    {
        return Err(Failure::new(
            EXIT_CONFIG,
            format!(
                "--budget-usd needs the price of model {model}: set input_usd_per_mtok and \
                 output_usd_per_mtok (USD per million tokens) in [models.{model}] of sluice.toml"
            ),
        ));
    }
    let mut interrupts = Interrupts::listen();
    let result = execute(&engine, script, &flags, &mut interrupts).await;
    crate::sink::finish_cleanups().await;
    if let Err(e) = engine.flush_cache().await {
        eprintln!("warning: {e}");
    }
    let metrics = report(&engine, &flags).await;
    let Some(ended) = result else {
        eprintln!("{}", interrupt_stop(&metrics, config.cache.enabled));
        if let Some(line) = open_jobs_line(&engine) {
            eprintln!("{line}");
        }
        return Err(Failure::new(EXIT_INTERRUPTED, ""));
    };
    let result = match ended {
        Ended::Done(r) => r,
        Ended::Parked => {
            let line = open_jobs_line(&engine)
                .unwrap_or_else(|| "batch jobs keep running at the provider".into());
            eprintln!("left running (--wait false): {line}; no output written yet");
            return Err(Failure::new(EXIT_BATCHES_PENDING, ""));
        }
    };
    let Err(e) = result else {
        return Ok(ExitCode::SUCCESS);
    };
    eprintln!("error: {e}");
    if e.kind == StatementErrorKind::Budget {
        eprintln!("{}", budget_stop(&e, &metrics, config.cache.enabled));
        return Err(Failure::new(EXIT_BUDGET, ""));
    }
    Err(Failure::new(EXIT_STATEMENT_FAILED, ""))
}
