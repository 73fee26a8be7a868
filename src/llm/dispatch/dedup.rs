//! Identical calls of one run are made once: a call whose request key matches one already
//! running shares its result, and one that matches a finished call gets that call's result.
//!
//! A running call is held only by the rows waiting for it; the map keeps a weak handle. When
//! every waiter is dropped (a LIMIT satisfied, an error elsewhere, Ctrl-C), the call itself is
//! dropped — and with it its place on the wire, its governor admission and its budget
//! reservation — and a later identical call starts afresh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared, WeakShared};

use super::call::CallResult;
use crate::cache::RequestKey;

type SharedCall = Shared<BoxFuture<'static, CallResult>>;

/// Entries of the map; when it is full, finished calls are forgotten (a later identical call
/// is answered by the persistent cache, or sent again without one), so memory stays flat
/// however long the run.
pub(super) const CAPACITY: usize = 20_000;

#[derive(Debug)]
enum Entry {
    Running(WeakShared<BoxFuture<'static, CallResult>>),
    Done(CallResult),
}

/// The calls of the run by request key (cheap to clone: a running call holds one to record
/// its result).
#[derive(Debug, Clone)]
pub(super) struct Dedup(Arc<Calls>);

#[derive(Debug)]
struct Calls {
    map: Mutex<HashMap<RequestKey, Entry>>,
    /// The size at which finished calls are next forgotten.
    sweep_at: AtomicUsize,
}

impl Default for Dedup {
    fn default() -> Self {
        Dedup(Arc::new(Calls {
            map: Mutex::default(),
            sweep_at: AtomicUsize::new(CAPACITY),
        }))
    }
}

/// What the map knows of a key.
enum Found {
    Done(CallResult),
    Running(SharedCall),
}

impl Dedup {
    fn lock(&self) -> MutexGuard<'_, HashMap<RequestKey, Entry>> {
        self.0.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The result of the call whose key is `key`: shared with an identical call of the run
    /// (counted in `shared`), or the one `run` makes, which later identical calls share.
    pub(super) async fn share(
        &self,
        key: RequestKey,
        shared: &AtomicU64,
        run: impl FnOnce() -> BoxFuture<'static, CallResult>,
    ) -> CallResult {
        let call = {
            let mut map = self.lock();
            match Dedup::find(&map, &key) {
                Some(found) => {
                    shared.fetch_add(1, Ordering::Relaxed);
                    match found {
                        Found::Done(result) => return result,
                        Found::Running(call) => call,
                    }
                }
                None => {
                    let calls = self.clone();
                    let running = run();
                    let call = async move {
                        let result = running.await;
                        calls.finish(key, &result);
                        result
                    }
                    .boxed()
                    .shared();
                    self.insert(&mut map, key, &call);
                    call
                }
            }
        };
        call.await
    }

    /// Calls remembered (running or finished).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    fn find(map: &HashMap<RequestKey, Entry>, key: &RequestKey) -> Option<Found> {
        match map.get(key)? {
            Entry::Done(r) => Some(Found::Done(r.clone())),
            Entry::Running(weak) => weak.upgrade().map(Found::Running),
        }
    }

    fn insert(&self, map: &mut HashMap<RequestKey, Entry>, key: RequestKey, call: &SharedCall) {
        let Some(weak) = call.downgrade() else {
            return;
        };
        if map.len() >= self.0.sweep_at.load(Ordering::Relaxed) {
            map.retain(|_, e| matches!(e, Entry::Running(w) if w.upgrade().is_some()));
            // Running calls are never forgotten: with more than CAPACITY of them waiting at
            // once (a batch job), the next sweep waits until the map has doubled, so inserts
            // stay O(1) amortised instead of sweeping a map of running calls every time.
            self.0
                .sweep_at
                .store((2 * map.len()).max(CAPACITY), Ordering::Relaxed);
        }
        map.insert(key, Entry::Running(weak));
    }

    /// Records the result of a call that ran to its end.
    fn finish(&self, key: RequestKey, result: &CallResult) {
        if let Some(e) = self.lock().get_mut(&key) {
            *e = Entry::Done(result.clone());
        }
    }
}
