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
use crate::llm::dispatch::FunctionMetrics;

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
pub(crate) struct Progress {
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

/// The counters of one function that a progress line shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    /// Rows finished (answered, failed, shared or found in the cache).
    done: u64,
    /// Rows handed to the function so far.
    total: u64,
    hits: u64,
    retries: u64,
    failed: u64,
    tokens: u64,
    prompt_cached: u64,
    /// Inputs still handing rows to it (0: the total is final).
    open_inputs: u64,
}

impl Counts {
    fn of(m: &FunctionMetrics) -> Counts {
        use std::sync::atomic::Ordering::Relaxed;
        Counts {
            done: m.rows_finished.load(Relaxed),
            total: m.rows_queued.load(Relaxed),
            hits: m.cache_hits.load(Relaxed),
            retries: m.retries_total(),
            failed: m.failed.load(Relaxed),
            tokens: m.tokens_in.load(Relaxed) + m.tokens_out.load(Relaxed),
            prompt_cached: m.tokens_cached.load(Relaxed),
            open_inputs: m.open_inputs.load(Relaxed),
        }
    }

    /// These counters less `before`'s (the open inputs are a gauge, kept).
    fn since(self, before: Counts) -> Counts {
        Counts {
            done: self.done.saturating_sub(before.done),
            total: self.total.saturating_sub(before.total),
            hits: self.hits.saturating_sub(before.hits),
            retries: self.retries.saturating_sub(before.retries),
            failed: self.failed.saturating_sub(before.failed),
            tokens: self.tokens.saturating_sub(before.tokens),
            prompt_cached: self.prompt_cached.saturating_sub(before.prompt_cached),
            open_inputs: self.open_inputs,
        }
    }
}

/// One function's place in a progress display.
#[derive(Debug)]
struct Shown {
    name: String,
    /// Its counters when the display started (a session's earlier statements).
    before: Counts,
    /// When its first row came.
    appeared: Instant,
    /// Its last count of finished rows, and when that changed.
    done: u64,
    changed: Instant,
}

/// The progress lines of a statement's LLM functions: one per function with rows, in the order
/// the pipeline reaches them, counting from when the tracker was made.
#[derive(Debug)]
pub struct FunctionLines {
    metrics: Arc<Metrics>,
    shown: Vec<Shown>,
    /// Functions with their counters at the start, before their first row of this statement.
    waiting: Vec<(String, Counts)>,
}

impl FunctionLines {
    /// A tracker of `metrics` from now on.
    pub fn new(metrics: Arc<Metrics>) -> FunctionLines {
        let waiting = metrics
            .functions()
            .into_iter()
            .map(|(name, m)| (name, Counts::of(&m)))
            .collect();
        FunctionLines {
            metrics,
            shown: Vec::new(),
            waiting,
        }
    }

    /// `(function, line)` for every function that has had a row since the start.
    pub fn lines(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, fm) in self.metrics.functions() {
            let now = Counts::of(&fm);
            let i = match self.shown.iter().position(|s| s.name == name) {
                Some(i) => i,
                None => {
                    let before = self
                        .waiting
                        .iter()
                        .find(|w| w.0 == name)
                        .map_or_else(Counts::default, |w| w.1);
                    if now.since(before).total == 0 {
                        continue;
                    }
                    let at = Instant::now();
                    self.shown.push(Shown {
                        name: name.clone(),
                        before,
                        appeared: at,
                        done: 0,
                        changed: at,
                    });
                    self.shown.len() - 1
                }
            };
            let s = &mut self.shown[i];
            let c = now.since(s.before);
            if c.done != s.done {
                s.done = c.done;
                s.changed = Instant::now();
            }
            out.push((name, line(c, s.changed - s.appeared)));
        }
        // In the order the functions appeared.
        out.sort_by_key(|(name, _)| self.shown.iter().position(|s| &s.name == name));
        out
    }
}

/// `(job id, line)` for each batch job of the run.
pub fn batch_job_lines(jobs: &[(String, JobView)]) -> Vec<(String, String)> {
    jobs.iter()
        .map(|(model, j)| (j.status.id.clone(), job_line(model, j)))
        .collect()
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
fn line(c: Counts, elapsed: Duration) -> String {
    let rate = c.done as f64 / elapsed.as_secs_f64().max(1e-3);
    let mut s = format!(
        "{} / {} prompts · {rate:.0}/s · {} retries · {} cached · {} errors · {} tokens",
        compact(c.done),
        compact(c.total),
        compact(c.retries),
        compact(c.hits),
        compact(c.failed),
        compact(c.tokens),
    );
    if c.prompt_cached > 0 {
        s.push_str(&format!(" ({} prompt-cached)", compact(c.prompt_cached)));
    }
    if c.open_inputs == 0 && c.done < c.total && rate > 0.0 {
        s.push_str(&format!(
            " · ETA {}",
            duration((c.total - c.done) as f64 / rate)
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
            let mut lines = FunctionLines::new(metrics);
            let mut bars: Vec<(String, ProgressBar)> = vec![];
            loop {
                // A bar appears with the function's first row, so bars are in the order the
                // pipeline reaches its stages.
                for (name, text) in lines.lines() {
                    let i = match bars.iter().position(|b| b.0 == name) {
                        Some(i) => i,
                        None => {
                            let b = mp.add(ProgressBar::new_spinner());
                            b.set_style(style.clone());
                            b.set_prefix(name.clone());
                            bars.push((name, b));
                            bars.len() - 1
                        }
                    };
                    bars[i].1.set_message(text);
                    bars[i].1.tick();
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
pub(crate) struct SuspendingWriter<W: Write> {
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
        let mut c = Counts {
            total: 10,
            done: 9,
            hits: 2,
            failed: 1,
            open_inputs: 1,
            ..Counts::default()
        };
        let l = line(c, Duration::from_secs(1));
        assert!(l.starts_with("9 / 10 prompts · 9/s"), "{l}");
        assert!(l.contains("2 cached") && l.contains("1 errors"), "{l}");
        assert!(!l.contains("ETA"), "no ETA while rows may still come: {l}");
        assert!(!l.contains("prompt-cached"), "{l}");
        c.tokens = 12_000;
        c.prompt_cached = 8_000;
        let l = line(c, Duration::from_secs(1));
        assert!(l.ends_with("· 12.0k tokens (8000 prompt-cached)"), "{l}");
        c.open_inputs = 0;
        c.done = 1;
        let l = line(c, Duration::from_secs(2));
        assert!(l.ends_with("· ETA 18s"), "9 rows left at 0.5/s: {l}");
    }

    #[test]
    fn lines_count_from_their_start_in_the_order_functions_appear() {
        use std::sync::atomic::Ordering::Relaxed;
        let m = Arc::new(Metrics::default());
        let earlier = m.function("zeta");
        earlier.rows_queued.store(100, Relaxed);
        earlier.rows_finished.store(100, Relaxed);
        let mut lines = FunctionLines::new(m.clone());
        assert!(lines.lines().is_empty(), "no row yet in this statement");
        earlier.rows_queued.store(104, Relaxed);
        earlier.rows_finished.store(101, Relaxed);
        assert_eq!(lines.lines().len(), 1);
        let later = m.function("alpha");
        later.rows_queued.store(3, Relaxed);
        let got = lines.lines();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["zeta", "alpha"],
            "the order they appeared in, not by name"
        );
        assert!(got[0].1.starts_with("1 / 4 prompts"), "{}", got[0].1);
        assert!(got[1].1.starts_with("0 / 3 prompts"), "{}", got[1].1);
    }
}
