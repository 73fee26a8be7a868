//! A statement's progress for Python: at most every [`EVERY`], the lines the `sluice` command
//! draws (one per LLM function, then the run's batch jobs) go to a Python callable, which draws
//! them in a terminal or a notebook (`sluice._progress`).

use std::time::{Duration, Instant};

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use sluice::cli::progress::{FunctionLines, batch_job_lines};
use sluice::engine::Engine;

/// How often the callable is given the lines.
const EVERY: Duration = Duration::from_millis(250);

/// The lines of the run's batch jobs.
type Jobs = Box<dyn Fn() -> Vec<(String, String)> + Send + Sync>;

/// The progress of one statement: its lines, and the callable that shows them (none: shown
/// nowhere).
pub struct Progress {
    show: Option<Py<PyAny>>,
    lines: FunctionLines,
    jobs: Jobs,
    last: Option<Instant>,
}

impl Progress {
    /// The progress of `engine`'s next statement, shown by `show(lines, finished)`, where
    /// `lines` is a list of `(name, text)`.
    pub fn new(show: Option<Py<PyAny>>, engine: &Engine) -> Progress {
        Progress {
            show,
            lines: FunctionLines::new(engine.live_metrics()),
            jobs: {
                let watch = engine.batch_watch();
                Box::new(move || batch_job_lines(&watch()))
            },
            last: None,
        }
    }

    /// Shows the lines when [`EVERY`] has passed since they were last shown. Returns what a
    /// signal handler raised while the callable ran (`KeyboardInterrupt`).
    pub fn tick(&mut self, py: Python<'_>) -> Option<PyErr> {
        if self.last.is_some_and(|at| at.elapsed() < EVERY) {
            return None;
        }
        self.show(py, false)
    }

    /// Shows the last state of the lines (the statement ended, or was interrupted).
    pub fn finish(&mut self, py: Python<'_>) -> Option<PyErr> {
        self.show(py, true)
    }

    fn show(&mut self, py: Python<'_>, finished: bool) -> Option<PyErr> {
        let show = self.show.as_ref()?;
        self.last = Some(Instant::now());
        let mut lines = self.lines.lines();
        lines.extend((self.jobs)());
        match show.call1(py, (lines, finished)) {
            Ok(_) => None,
            // A display that fails does not stop the statement: its error is printed once, and
            // nothing more is shown.
            Err(e) if e.is_instance_of::<PyException>(py) => {
                e.display(py);
                self.show = None;
                None
            }
            // A signal handler raised while the display ran.
            Err(signal) => Some(signal),
        }
    }
}
