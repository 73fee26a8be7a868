//! On a cluster's worker, a call whose request is on the wire when its statement is dropped
//! goes on alone and keeps its answer.
//!
//! The coordinator drops every worker's statement when one worker dies, and runs it again on
//! the workers left. A request already sent has been paid for: cancelling it would make the
//! next attempt send it again. So a worker runs each call it makes as a task of its own
//! ([`detachable`]). Dropped before any of its requests is on the wire, the task is aborted,
//! as any cancelled call is; dropped while one is, the task is *orphaned*: that request
//! finishes, and its answer is stored in the worker's cache and sent to the coordinator's, as
//! it would have been. An orphan sends nothing more: no retry, no hedge. Its claim on the key
//! in the coordinator's tier is held until it ends, so a worker of the next attempt that needs
//! the same answer waits for it instead of paying for it again.
//!
//! The requests of a call mark themselves on the wire with [`OnWire`]; the call's state is a
//! task-local value, so the layers between (retries, hedging, routing) need not carry it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The state a detachable call's requests share.
#[derive(Debug, Default)]
struct Detachable {
    /// Its requests on the wire now.
    on_wire: AtomicUsize,
    /// Set when the call was dropped with a request on the wire: it finishes alone.
    orphaned: AtomicBool,
}

tokio::task_local! {
    static CALL: Arc<Detachable>;
}

/// Whether the call running on this task was orphaned (it sends nothing more).
pub(super) fn orphaned() -> bool {
    CALL.try_with(|c| c.orphaned.load(Ordering::Acquire))
        .unwrap_or(false)
}

/// One request of the call running on this task, on the wire while this lives.
pub(super) struct OnWire(Option<Arc<Detachable>>);

impl OnWire {
    /// A request of the current call (if it is detachable) goes on the wire.
    pub(super) fn enter() -> OnWire {
        let call = CALL.try_with(Arc::clone).ok();
        if let Some(c) = &call {
            c.on_wire.fetch_add(1, Ordering::AcqRel);
        }
        OnWire(call)
    }
}

impl Drop for OnWire {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.on_wire.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Aborts or orphans the task of a detachable call dropped before its end.
struct Detach {
    call: Arc<Detachable>,
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for Detach {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        // Marked first, so that a request that leaves the wire now finds itself orphaned.
        self.call.orphaned.store(true, Ordering::Release);
        if self.call.on_wire.load(Ordering::Acquire) == 0 {
            task.abort();
        }
    }
}

/// Runs `call` as a detachable task (see the module) and returns its output; a panic in it
/// goes on here, as it would have without the task.
pub(super) async fn detachable<T: Send + 'static>(
    call: impl Future<Output = T> + Send + 'static,
) -> T {
    let state = Arc::new(Detachable::default());
    let handle = tokio::spawn(CALL.scope(state.clone(), call));
    let mut detach = Detach {
        call: state,
        task: Some(handle.abort_handle()),
    };
    let out = handle.await;
    detach.task = None;
    match out {
        Ok(out) => out,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: only by the runtime shutting down, which drops this future too.
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A call that marks one request on the wire after `before`, for `on_wire`, and counts
    /// its end in `ended` (`orphaned` tells whether it was orphaned by then).
    async fn call(before: Duration, on_wire: Duration, ended: Arc<std::sync::Mutex<Vec<bool>>>) {
        tokio::time::sleep(before).await;
        let wire = OnWire::enter();
        tokio::time::sleep(on_wire).await;
        drop(wire);
        ended.lock().unwrap().push(orphaned());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_dropped_with_a_request_on_the_wire_finishes_alone() {
        let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = call(Duration::ZERO, Duration::from_secs(1), ended.clone());
        let dropped = tokio::time::timeout(Duration::from_millis(100), detachable(c)).await;
        assert!(dropped.is_err(), "dropped while on the wire");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(*ended.lock().unwrap(), vec![true], "it ended, orphaned");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_dropped_before_it_sends_is_aborted() {
        let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = call(Duration::from_secs(1), Duration::ZERO, ended.clone());
        let dropped = tokio::time::timeout(Duration::from_millis(100), detachable(c)).await;
        assert!(dropped.is_err());
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(ended.lock().unwrap().is_empty(), "never sent, never ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_left_to_finish_gives_its_output_and_is_not_orphaned() {
        let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = call(Duration::ZERO, Duration::from_secs(1), ended.clone());
        detachable(c).await;
        assert_eq!(*ended.lock().unwrap(), vec![false]);
        assert!(!orphaned(), "outside a detachable call");
    }
}
