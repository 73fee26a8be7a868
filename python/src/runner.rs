//! Engine work on a Tokio runtime while the calling Python thread waits with the GIL released,
//! looking at Python's signals every [`POLL`]: Ctrl-C (or interrupting a notebook cell) stops
//! sending, lets the requests on the wire finish for at most [`GRACE`] (their answers are
//! stored in the cache), drops the statement and raises `KeyboardInterrupt`. The statement's
//! progress is shown from the same loop.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use sluice::engine::Engine;
use tokio::runtime::Runtime;

use crate::errors::SluiceError;
use crate::progress::Progress;

/// How often a waiting thread looks at Python's signals.
const POLL: Duration = Duration::from_millis(50);

/// How long the requests on the wire may take to finish after an interrupt (the exception is
/// raised within two seconds of it).
const GRACE: Duration = Duration::from_millis(1200);

/// How long the cache may take to store what it received, after an interrupt.
const FLUSH: Duration = Duration::from_millis(400);

/// The process's runtime for engine work (started on first use).
pub fn runtime() -> PyResult<&'static Runtime> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .thread_name("sluice")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the async runtime: {e}"))
        })
        .as_ref()
        .map_err(|e| SluiceError::new_err(e.clone()))
}

/// How waiting for engine work ended.
pub enum Waited<T> {
    /// The work finished.
    Done(T),
    /// A Python signal handler raised (`KeyboardInterrupt` for Ctrl-C): the work was dropped
    /// after its requests on the wire finished (or [`GRACE`] passed), and its answers flushed
    /// to the cache. The engine sends nothing more; the session builds it again.
    Interrupted(PyErr),
    /// Another thread's statement on the same engine was interrupted: this one was dropped
    /// too (the engine sends nothing more).
    Stopped,
}

/// Runs the future `make` builds on a thread of its own (statements borrow writers that stay
/// on one thread), with the runtime's workers; the calling thread waits with the GIL released.
pub fn wait<T, F, M>(
    py: Python<'_>,
    (engine, stopped): (&Arc<Engine>, &AtomicBool),
    progress: &mut Progress,
    make: M,
) -> PyResult<Waited<T>>
where
    T: Send + 'static,
    F: Future<Output = T>,
    M: FnOnce() -> F + Send + 'static,
{
    let rt = runtime()?;
    let (tx, rx) = channel();
    let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("sluice-statement".into())
        .spawn(move || {
            let done = rt.block_on(async move {
                tokio::select! {
                    done = make() => Some(done),
                    _ = cancelled => None,
                }
            });
            if let Some(done) = done {
                let _ = tx.send(done);
            }
        })
        .map_err(|e| SluiceError::new_err(format!("cannot start a thread: {e}")))?;
    let rx = Mutex::new(rx);
    let next = |timeout: Duration| lock(&rx).recv_timeout(timeout);
    loop {
        match py.detach(|| next(POLL)) {
            Ok(done) => {
                let _ = py.detach(|| thread.join());
                return Ok(Waited::Done(done));
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = py.detach(|| thread.join());
                return Err(SluiceError::new_err(
                    "the engine stopped without an answer (an internal error)",
                ));
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        let signal = py.check_signals().err().or_else(|| progress.tick(py));
        if signal.is_none() && stopped.load(Ordering::SeqCst) {
            let _ = cancel.send(());
            let _ = py.detach(|| thread.join());
            return Ok(Waited::Stopped);
        }
        if let Some(signal) = signal {
            py.detach(|| {
                stopped.store(true, Ordering::SeqCst);
                engine.stop_sending();
                let deadline = Instant::now() + GRACE;
                // What the work returns meanwhile (a stream's next batch, with the stream) is
                // kept until the requests on the wire are done: dropping it would cancel them.
                let mut returned = None;
                while engine.requests_in_flight() > 0 && Instant::now() < deadline {
                    match returned {
                        None => returned = next(Duration::from_millis(20)).ok(),
                        Some(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                let _ = cancel.send(());
                let _ = thread.join();
                let _ =
                    rt.block_on(async { tokio::time::timeout(FLUSH, engine.flush_cache()).await });
                let _entered = rt.enter();
                drop(returned);
            });
            // A second Ctrl-C while the last lines are drawn changes nothing.
            let _ = progress.finish(py);
            return Ok(Waited::Interrupted(signal));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `work` on the runtime to its end with the GIL released (setup work that sends no
/// request: building an engine, planning an estimate).
pub fn block_on<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    T: Send,
    F: Future<Output = T> + Send,
{
    let rt = runtime()?;
    Ok(py.detach(|| rt.block_on(work)))
}
