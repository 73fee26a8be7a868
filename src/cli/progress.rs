//! Live progress on the terminal: one line per LLM function with rows done out of rows handed to
//! it so far, rate, retries, cache hits, errors, tokens, elapsed time and — once the plan has
//! handed over its last row, so the total is final — the ETA. Drawn on stderr only when it is a
//! terminal; `--quiet` turns it off.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;

use crate::llm::Metrics;
use crate::llm::batch::JobView;

/// The batch jobs of the run, by model, when asked.
pub(crate) type JobsFn = Box<dyn Fn() -> Vec<(String, JobView)> + Send + Sync>;

/// The line of one batch job.
fn job_line(model: &str, j: &JobView) -> String {
    let resumed = if j.resumed { " · resumed" } else { "" };
    format!(
        "model {model} · {} · {} requests{resumed}",
        super::batches::status_text(&j.status),
        j.lines
    )
}

/// Batch jobs as bars on a terminal, else as a line on stderr whenever one changes.
struct JobBars {
    style: ProgressStyle,
    bars: Vec<(String, ProgressBar, String)>,
    terminal: bool,
}

impl JobBars {
    fn update(&mut self, mp: &MultiProgress, jobs: &JobsFn) {
        for (model, j) in jobs() {
            let text = job_line(&model, &j);
            let id = &j.status.id;
            let i = match self.bars.iter().position(|b| &b.0 == id) {
                Some(i) => i,
                None => {
                    let b = mp.add(ProgressBar::new_spinner());
                    b.set_style(self.style.clone());
                    b.set_prefix(id.clone());
                    self.bars.push((id.clone(), b, String::new()));
                    self.bars.len() - 1
                }
            };
            let entry = &mut self.bars[i];
            if entry.2 != text {
                if !self.terminal {
                    eprintln!("batch {id}: {text}");
                }
                entry.2 = text.clone();
            }
            entry.1.set_message(text);
            entry.1.tick();
        }
    }
}

/// A running progress display; [`Progress::finish`] draws the last state and stops it.
pub struct Progress {
    multi: MultiProgress,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Compact counts: 950, 12.3k, 4.5M.
fn compact(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.1}M", n as f64 / 1e6),
    }
}

/// Rows finished (answered, failed, shared or found in the cache).
fn done(m: &crate::llm::dispatch::FunctionMetrics) -> u64 {
    m.rows_finished.load(std::sync::atomic::Ordering::Relaxed)
}

/// `42s`, `3m 05s`, `2h 10m`.
fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

/// The line of one function; `elapsed` is the time it has been working (up to its last
/// finished prompt), so the rate does not decay once the function is done.
fn line(m: &crate::llm::dispatch::FunctionMetrics, elapsed: Duration) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let hits = m.cache_hits.load(Relaxed);
    let done = done(m);
    let total = m.rows_queued.load(Relaxed);
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    let tokens = m.tokens_in.load(Relaxed) + m.tokens_out.load(Relaxed);
    let mut s = format!(
        "{} / {} prompts · {rate:.0}/s · {} retries · {} cached · {} errors · {} tokens",
        compact(done),
        compact(total),
        compact(m.retries_total()),
        compact(hits),
        compact(m.failed.load(Relaxed)),
        compact(tokens),
    );
    let prompt_cached = m.tokens_cached.load(Relaxed);
    if prompt_cached > 0 {
        s.push_str(&format!(" ({} prompt-cached)", compact(prompt_cached)));
    }
    if m.open_inputs.load(Relaxed) == 0 && done < total && rate > 0.0 {
        s.push_str(&format!(
            " · ETA {}",
            duration((total - done) as f64 / rate)
        ));
    }
    s
}

impl Progress {
    /// Starts drawing `metrics` and the run's batch `jobs` on stderr (when stderr is not a
    /// terminal, nothing is drawn and a batch job's changes are printed as lines).
    pub fn start(metrics: Arc<Metrics>, jobs: JobsFn) -> Progress {
        use std::io::IsTerminal;
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
        let (stop, mut stopped) = watch::channel(false);
        let mp = multi.clone();
        let task = tokio::spawn(async move {
            let style = ProgressStyle::with_template("{spinner} {prefix:.bold} {msg} [{elapsed}]")
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
            let mut job_bars = JobBars {
                style: style.clone(),
                bars: vec![],
                terminal: std::io::stderr().is_terminal(),
            };
            // Per function: its bar, when it appeared, and its last count and when that changed.
            let mut bars: Vec<(String, ProgressBar, Instant, u64, Instant)> = vec![];
            loop {
                for (name, fm) in metrics.functions() {
                    let i = match bars.iter().position(|b| b.0 == name) {
                        Some(i) => i,
                        // A bar appears with the function's first row, so bars are in the
                        // order the pipeline reaches its stages.
                        None if fm.rows_queued.load(std::sync::atomic::Ordering::Relaxed) == 0 => {
                            continue;
                        }
                        None => {
                            let b = mp.add(ProgressBar::new_spinner());
                            b.set_style(style.clone());
                            b.set_prefix(name.clone());
                            let now = Instant::now();
                            bars.push((name.clone(), b, now, 0, now));
                            bars.len() - 1
                        }
                    };
                    let entry = &mut bars[i];
                    let d = done(&fm);
                    if d != entry.3 {
                        entry.3 = d;
                        entry.4 = Instant::now();
                    }
                    entry.1.set_message(line(&fm, entry.4 - entry.2));
                    entry.1.tick();
                }
                job_bars.update(&mp, &jobs);
                if *stopped.borrow() {
                    for b in bars
                        .iter()
                        .map(|b| &b.1)
                        .chain(job_bars.bars.iter().map(|b| &b.1))
                    {
                        b.finish();
                    }
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_millis(125), stopped.changed()).await;
            }
        });
        Progress { multi, stop, task }
    }

    /// A writer for results that hides the bars while it writes, so lines do not interleave.
    pub fn writer<W: Write>(&self, inner: W) -> SuspendingWriter<W> {
        SuspendingWriter {
            multi: self.multi.clone(),
            inner,
        }
    }

    /// Draws the final state and stops.
    pub async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Writes through while the progress bars are hidden.
pub struct SuspendingWriter<W: Write> {
    multi: MultiProgress,
    inner: W,
}

impl<W: Write> Write for SuspendingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let inner = &mut self.inner;
        self.multi.suspend(|| inner.write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let inner = &mut self.inner;
        self.multi.suspend(|| inner.flush())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_short() {
        assert_eq!(duration(42.2), "42s");
        assert_eq!(duration(185.0), "3m 05s");
        assert_eq!(duration(7800.0), "2h 10m");
    }

    #[test]
    fn counts_are_compact() {
        assert_eq!(compact(950), "950");
        assert_eq!(compact(12_345), "12.3k");
        assert_eq!(compact(4_500_000), "4.5M");
    }

    #[test]
    fn a_line_shows_every_counter() {
        use std::sync::atomic::Ordering::Relaxed;
        let m = Metrics::default();
        let f = m.function("answer_question");
        f.rows_queued.store(10, Relaxed);
        f.rows_finished.store(9, Relaxed);
        f.cache_hits.store(2, Relaxed);
        f.failed.store(1, Relaxed);
        f.open_inputs.store(1, Relaxed);
        let l = line(&f, Duration::from_secs(1));
        assert!(l.starts_with("9 / 10 prompts · 9/s"), "{l}");
        assert!(l.contains("2 cached") && l.contains("1 errors"), "{l}");
        assert!(!l.contains("ETA"), "no ETA while rows may still come: {l}");
        assert!(!l.contains("prompt-cached"), "{l}");
        f.tokens_in.store(12_000, Relaxed);
        f.tokens_cached.store(8_000, Relaxed);
        let l = line(&f, Duration::from_secs(1));
        assert!(l.ends_with("· 12.0k tokens (8000 prompt-cached)"), "{l}");
        f.open_inputs.store(0, Relaxed);
        f.rows_finished.store(1, Relaxed);
        let l = line(&f, Duration::from_secs(2));
        assert!(l.ends_with("· ETA 18s"), "9 rows left at 0.5/s: {l}");
    }
}
