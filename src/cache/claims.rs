//! The calls a cluster's workers are making now, as the coordinator's shared tier knows them:
//! the first worker that misses a key claims it and makes the call; a worker that misses a key
//! another has claimed waits for that worker's answer instead of sending the same request.
//!
//! A claim ends when its answer is put (the waiters get it), when its worker releases it (the
//! call failed or was cancelled: the waiters make the call themselves), when its worker is
//! found dead (a statement run again around it), or when a waiter has waited [`MAX_WAIT`]
//! (its worker may be gone unnoticed): the claim is dropped and the waiter calls. A claim
//! names its worker as the coordinator lists it, so that the claims of the workers left —
//! calls still on the wire, which they finish — hold when a statement runs again.
//!
//! The last answers put are kept here too ([`RECENT`] of them): the cache stores an answer at
//! its writer's next commit, and a lookup in between must find it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

use super::{CachedResponse, RequestKey};

/// The longest a worker waits for another's answer before making the call itself.
pub(super) const MAX_WAIT: Duration = Duration::from_secs(20);

/// How many of the last answers put are kept in memory.
const RECENT: usize = 16_384;

/// Whether what the worker `by` holds (a claim, a lease) ends when the workers `dead` are
/// found dead: theirs, and what a worker holds that did not say who it is.
pub fn held_by_dead(by: Option<&str>, dead: &[&str]) -> bool {
    by.is_none_or(|by| dead.contains(&by))
}

/// One claimed key: the worker answering it (its URL in the coordinator's list, when it
/// said), and the waiters for its answer.
#[derive(Debug, Default)]
struct Open {
    by: Option<String>,
    waiters: Vec<oneshot::Sender<Option<CachedResponse>>>,
}

/// Keys claimed by a worker, each with the waiters for its answer.
#[derive(Debug, Default)]
pub(super) struct Claims {
    open: Mutex<HashMap<RequestKey, Open>>,
    recent: Mutex<(HashMap<RequestKey, CachedResponse>, VecDeque<RequestKey>)>,
}

impl Claims {
    /// Claims `key` for the asker (the worker `by`): `true` when it is claimed now (the asker
    /// makes the call), `false` when another claimed it first.
    pub(super) fn claim(&self, key: RequestKey, by: Option<&str>) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.contains_key(&key) {
            return false;
        }
        let by = by.map(str::to_string);
        open.insert(
            key,
            Open {
                by,
                waiters: Vec::new(),
            },
        );
        true
    }

    /// Waits for the answer to a claimed `key` (at most [`MAX_WAIT`]); `None` when it is not
    /// claimed, was released or the wait ran out (the claim is then dropped).
    pub(super) async fn wait(&self, key: RequestKey) -> Option<CachedResponse> {
        let rx = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let claim = open.get_mut(&key)?;
            let (tx, rx) = oneshot::channel();
            claim.waiters.push(tx);
            rx
        };
        match tokio::time::timeout(MAX_WAIT, rx).await {
            Ok(answer) => answer.ok().flatten(),
            Err(_) => {
                self.end(key, None);
                None
            }
        }
    }

    /// Ends the claims of the workers `dead`, and those of workers that did not say who they
    /// are (their waiters make the calls themselves): after a statement failed because workers
    /// died, whose claims would otherwise hold the others for [`MAX_WAIT`].
    pub(super) fn end_of(&self, dead: &[&str]) {
        let ended: Vec<Open> = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.extract_if(|_, c| held_by_dead(c.by.as_deref(), dead))
                .map(|(_, c)| c)
                .collect()
        };
        for w in ended.into_iter().flat_map(|c| c.waiters) {
            let _ = w.send(None);
        }
    }

    /// Ends the claim on `key` of the worker `by` (its waiters make the call themselves); a
    /// claim of another named worker stays.
    pub(super) fn release(&self, key: RequestKey, by: Option<&str>) {
        let ended = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let theirs = open
                .get(&key)
                .is_some_and(|c| matches!((c.by.as_deref(), by), (Some(o), Some(b)) if o != b));
            if theirs { None } else { open.remove(&key) }
        };
        for w in ended.into_iter().flat_map(|c| c.waiters) {
            let _ = w.send(None);
        }
    }

    /// One of the last answers put, if `key` is among them.
    pub(super) fn recent(&self, key: &RequestKey) -> Option<CachedResponse> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.0.get(key).cloned()
    }

    /// Ends the claim on `key`, handing its waiters `answer` (`None`: released), and keeps
    /// the answer among the recent ones.
    pub(super) fn end(&self, key: RequestKey, answer: Option<&CachedResponse>) {
        if let Some(answer) = answer {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            let (map, order) = &mut *recent;
            if map.insert(key, answer.clone()).is_none() {
                order.push_back(key);
            }
            while order.len() > RECENT {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
        let waiters = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        for w in waiters.into_iter().flat_map(|c| c.waiters) {
            let _ = w.send(answer.cloned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> CachedResponse {
        CachedResponse {
            value: serde_json::json!("A"),
            usage: None,
            finish_reason: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_claims_and_the_others_wait_for_its_answer() {
        let claims = std::sync::Arc::new(Claims::default());
        let key = [3; 32];
        assert!(claims.claim(key, None));
        assert!(!claims.claim(key, None), "claimed already");
        let waiter = tokio::spawn({
            let claims = claims.clone();
            async move { claims.wait(key).await }
        });
        tokio::task::yield_now().await;
        claims.end(key, Some(&answer()));
        assert_eq!(waiter.await.unwrap(), Some(answer()));
        assert_eq!(
            claims.recent(&key),
            Some(answer()),
            "kept until the cache has it"
        );
        assert!(claims.claim(key, None), "the claim ended with its answer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_or_abandoned_claim_lets_the_waiter_call() {
        let claims = std::sync::Arc::new(Claims::default());
        let key = [4; 32];
        assert_eq!(claims.wait(key).await, None, "not claimed: no wait");
        assert!(claims.claim(key, None));
        let waiter = tokio::spawn({
            let claims = claims.clone();
            async move { claims.wait(key).await }
        });
        tokio::task::yield_now().await;
        claims.end(key, None);
        assert_eq!(waiter.await.unwrap(), None);
        // A claimant that never answers: the wait runs out and the claim is dropped.
        assert!(claims.claim(key, None));
        let start = tokio::time::Instant::now();
        assert_eq!(claims.wait(key).await, None);
        assert_eq!(start.elapsed(), MAX_WAIT);
        assert!(claims.claim(key, None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_workers_claims_end_at_once_and_the_others_hold() {
        let claims = std::sync::Arc::new(Claims::default());
        let (dead, live) = ("http://w1:1/", "http://w2:1/");
        assert!(claims.claim([5; 32], Some(dead)));
        assert!(claims.claim([6; 32], Some(live)));
        assert!(claims.claim([7; 32], None), "a worker that did not say");
        let waiter = |key| {
            let claims = claims.clone();
            tokio::spawn(async move { claims.wait(key).await })
        };
        let (on_dead, on_live, on_unknown) = (waiter([5; 32]), waiter([6; 32]), waiter([7; 32]));
        tokio::task::yield_now().await;
        let start = tokio::time::Instant::now();
        claims.release([6; 32], Some(dead));
        claims.end_of(&[dead]);
        assert_eq!(on_dead.await.unwrap(), None);
        assert_eq!(on_unknown.await.unwrap(), None);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(claims.claim([5; 32], None), "ended");
        assert!(
            !claims.claim([6; 32], None),
            "the live worker's call goes on"
        );
        claims.end([6; 32], Some(&answer()));
        assert_eq!(
            on_live.await.unwrap(),
            Some(answer()),
            "its answer reaches the waiter"
        );
    }
}
