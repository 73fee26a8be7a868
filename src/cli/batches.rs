//! `sluice batches` (list the provider batch jobs a run left open) and `sluice batches cancel`.

use std::process::ExitCode;

use super::exit::{EXIT_STATEMENT_FAILED, Failure};
use crate::config::Config;
use crate::engine::{cancel_batches, list_batches};
use crate::llm::batch::JobStatus;

/// What `sluice batches` does.
#[derive(Debug, clap::Subcommand)]
pub enum BatchesAction {
    /// Every open job with its model, age, requests and state at the provider (the default).
    List,
    /// Cancel jobs at the provider (all open jobs when no id is given); the next run submits
    /// their unanswered requests anew.
    Cancel {
        /// Job ids (`batch_...`).
        ids: Vec<String>,
    },
}

/// `3h 05m`, `2d 4h`.
pub(crate) fn age(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m {:02}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// `in_progress, 30/42 done, 1 failed`.
pub(crate) fn status_text(s: &JobStatus) -> String {
    let mut t = format!(
        "{}, {}/{} done, {} failed",
        s.status, s.completed, s.total, s.failed
    );
    if let Some(e) = &s.errors {
        t.push_str(&format!(" ({e})"));
    }
    t
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `sluice batches [list | cancel [ID...]]`.
pub(super) async fn batches_command(
    config: &Config,
    action: Option<BatchesAction>,
) -> Result<ExitCode, Failure> {
    match action.unwrap_or(BatchesAction::List) {
        BatchesAction::List => {
            let jobs = list_batches(config).await.map_err(Failure::statement)?;
            if jobs.is_empty() {
                println!("no open batch jobs");
            }
            for l in &jobs {
                let state = match &l.status {
                    Ok(s) => status_text(s),
                    Err(e) => format!("unknown: {e}"),
                };
                println!(
                    "{}  model {}  {} requests  age {}  {state}",
                    l.job.id,
                    l.job.model,
                    l.job.keys.len(),
                    age(now().saturating_sub(l.job.created_at))
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BatchesAction::Cancel { ids } => {
            let done = cancel_batches(config, &ids)
                .await
                .map_err(Failure::statement)?;
            if done.is_empty() {
                println!("no open batch jobs");
            }
            let mut failed = false;
            for (job, r) in &done {
                match r {
                    Ok(s) => println!(
                        "{}: {} ({} requests; the next run submits the unanswered ones anew)",
                        job.id,
                        s.status,
                        job.keys.len()
                    ),
                    Err(e) => {
                        failed = true;
                        eprintln!("error: cannot cancel {}: {e}", job.id);
                    }
                }
            }
            if failed {
                return Err(Failure::new(EXIT_STATEMENT_FAILED, ""));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_short() {
        assert_eq!(age(42), "42s");
        assert_eq!(age(3 * 3600 + 300), "3h 05m");
        assert_eq!(age(2 * 86_400 + 4 * 3600), "2d 4h");
    }
}
