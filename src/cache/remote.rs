//! A worker's side of the cluster's shared tier (see [`super::shared`]): the coordinator's
//! cache and its claims, reached over HTTP(S), and where the worker reports its counters.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::{Value, json};

use super::pacing::Allowance;
use super::wire::{entry_from, entry_value, hex};
use super::{CachedResponse, RequestKey};
use crate::config::Secret;

/// What the coordinator's cache says of one key.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Lookup {
    /// Its answer.
    Hit(CachedResponse),
    /// Not known: make the call (claimed for this worker when asked to claim).
    Miss,
    /// Another worker is answering it now: [`SharedCache::wait`] for its answer.
    Pending,
}

/// A worker's side: the coordinator's cache, reached over HTTP.
#[derive(Debug)]
pub struct SharedCache {
    client: reqwest::Client,
    base: String,
    token: Option<Secret>,
    /// Whether a failure was logged already (one warning per run, not one per batch).
    warned: AtomicBool,
    /// Set when the coordinator could not be reached (no connection, or no answer in time):
    /// the tier is not asked again in this run, so that a firewalled port costs one timeout,
    /// not one per call.
    unreachable: AtomicBool,
    /// Requests that failed.
    failures: AtomicU64,
    /// This worker's id in the coordinator's work queues (its tasks share it).
    claimer: u64,
    /// This worker's URL in the coordinator's list, named in its claims and admissions so
    /// that the coordinator ends only a dead worker's.
    listed_as: Option<String>,
}

/// `doc[field]`: a number, or an explicit null (`Some(None)`); `None` when it is missing or
/// anything else (never taken for a null).
fn nullable_u64(doc: &Value, field: &str) -> Option<Option<u64>> {
    match doc.get(field)? {
        Value::Null => Some(None),
        n => n.as_u64().map(Some),
    }
}

impl SharedCache {
    /// The tier at `base` (`http://host:port`, or `https://` trusting only the authority `ca`),
    /// sending `token` with every request.
    pub fn new(base: &str, token: Option<Secret>, ca: Option<&str>) -> SharedCache {
        // Longer than a wait for another worker's answer can last.
        let mut client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(super::claims::MAX_WAIT * 3 / 2);
        if let Some(ca) = ca.and_then(|pem| reqwest::Certificate::from_pem(pem.as_bytes()).ok()) {
            client = client
                .tls_built_in_root_certs(false)
                .add_root_certificate(ca);
        }
        let client = client.build().unwrap_or_default();
        SharedCache {
            client,
            base: base.trim_end_matches('/').to_string(),
            token,
            warned: AtomicBool::new(false),
            unreachable: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            claimer: fastrand::u64(..),
            listed_as: None,
        }
    }

    /// The same client for the worker the coordinator lists at `url`.
    pub fn listed_as(mut self, url: Option<String>) -> SharedCache {
        self.listed_as = url;
        self
    }

    /// Requests to the coordinator that failed so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// A POST of `body` (JSON) to `path`, with the cluster token.
    fn request(&self, path: &str, body: Value) -> reqwest::RequestBuilder {
        let req = self
            .client
            .post(format!("{}{path}", self.base))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        match &self.token {
            Some(t) => req.header(http::header::AUTHORIZATION, t.bearer()),
            None => req,
        }
    }

    async fn post(&self, path: &str, body: Value) -> Option<reqwest::Response> {
        if self.unreachable.load(Ordering::Relaxed) {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let req = self.request(path, body);
        let failed = |why: String| {
            self.failures.fetch_add(1, Ordering::Relaxed);
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the coordinator's shared cache at {} failed ({why}); calls it would have \
                     answered are made",
                    self.base
                );
            }
        };
        match req.send().await {
            Ok(r) if r.status().is_success() => Some(r),
            Ok(r) => {
                failed(format!("HTTP {}", r.status().as_u16()));
                None
            }
            Err(e) if e.is_timeout() => {
                self.unreachable.store(true, Ordering::Relaxed);
                failed("no answer in time; not asked again in this run".to_string());
                None
            }
            Err(e) if e.is_connect() => {
                self.unreachable.store(true, Ordering::Relaxed);
                failed("cannot connect; not asked again in this run".to_string());
                None
            }
            Err(_) => {
                failed("the connection failed".to_string());
                None
            }
        }
    }

    /// The coordinator's entries for `keys`, in their order (a failure reads as misses). With
    /// `claim`, the missing keys are claimed for this worker, except those another worker is
    /// answering now, which come back as [`Lookup::Pending`].
    pub(crate) async fn get_many(&self, keys: &[RequestKey], claim: bool) -> Vec<Lookup> {
        let misses = || vec![Lookup::Miss; keys.len()];
        if keys.is_empty() {
            return Vec::new();
        }
        let keys_hex: Vec<String> = keys.iter().map(hex).collect();
        let body = json!({ "keys": keys_hex, "claim": claim, "worker": self.listed_as });
        let Some(doc) = self.post_json("/v1/get", body).await else {
            return misses();
        };
        let Some(entries) = doc["entries"].as_array().filter(|e| e.len() == keys.len()) else {
            return misses();
        };
        let mut out: Vec<Lookup> = entries
            .iter()
            .map(|e| entry_from(e).map_or(Lookup::Miss, Lookup::Hit))
            .collect();
        for i in doc["pending"].as_array().into_iter().flatten() {
            if let Some(slot) = i.as_u64().and_then(|i| out.get_mut(i as usize)) {
                *slot = Lookup::Pending;
            }
        }
        out
    }

    /// Waits for another worker's answer to `key` (`None`: it failed, or took too long).
    pub(crate) async fn wait(&self, key: RequestKey) -> Option<CachedResponse> {
        let doc = self
            .post_json("/v1/wait", json!({ "key": hex(&key) }))
            .await?;
        entry_from(&doc["entry"])
    }

    /// Gives up this worker's claims on `keys` (its calls failed or were cancelled); a key
    /// another worker claimed stays claimed.
    pub(crate) async fn release(&self, keys: &[RequestKey]) {
        let keys: Vec<String> = keys.iter().map(hex).collect();
        let body = json!({ "keys": keys, "worker": self.listed_as });
        let _ = self.post("/v1/release", body).await;
    }

    /// [`SharedCache::get_many`] claiming the keys it misses, safe to drop: the lookup runs as
    /// a task of its own, and should its caller be dropped before the answer (a statement
    /// dropped), the keys it turns out to have claimed are released once that answer is in.
    /// Releasing them at once could reach the coordinator before the lookup that claims them,
    /// and leave them claimed by no one (any worker needing one would wait [`MAX_WAIT`]).
    ///
    /// [`MAX_WAIT`]: super::claims::MAX_WAIT
    pub(crate) async fn claim_many(self: &Arc<Self>, keys: &[RequestKey]) -> Vec<Lookup> {
        let (me, asked) = (self.clone(), keys.to_vec());
        let lookup = tokio::spawn(async move {
            let found = me.get_many(&asked, true).await;
            (asked, found)
        });
        let mut unread = UnreadClaims(Some(lookup), self.clone());
        let answer = match unread.0.as_mut() {
            Some(lookup) => lookup.await.ok(),
            None => None,
        };
        unread.0 = None;
        // A lookup that panicked: its keys are taken as claimed, and released by their calls.
        answer.map_or_else(|| vec![Lookup::Miss; keys.len()], |(_, found)| found)
    }

    async fn post_json(&self, path: &str, body: Value) -> Option<Value> {
        let bytes = self.post(path, body).await?.bytes().await.ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// `body` posted to `path`, its JSON answer; any failure is an error (no retry, no
    /// shortcut: for what must not be taken as a miss).
    async fn post_strict(&self, path: &str, body: Value) -> Result<Value, String> {
        let resp = self.request(path, body).send().await.map_err(|e| {
            let why = if e.is_connect() {
                "cannot connect"
            } else if e.is_timeout() {
                "no answer in time"
            } else {
                "the connection failed"
            };
            format!("the coordinator at {}: {why}", self.base)
        })?;
        let status = resp.status();
        if !status.is_success() {
            let why = if status == http::StatusCode::NOT_FOUND {
                "it does not know what this statement asked for (did it restart?)".to_string()
            } else {
                format!("HTTP {}", status.as_u16())
            };
            return Err(format!("the coordinator at {}: {why}", self.base));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|_| format!("the coordinator at {}: the answer was cut", self.base))?;
        serde_json::from_slice(&bytes)
            .map_err(|_| format!("the coordinator at {}: the answer is not JSON", self.base))
    }

    /// The next chunk of the coordinator's work queue `queue` (`None`: every chunk is handed
    /// out). Unlike lookups, any failure is an error: a chunk the coordinator handed out but
    /// this worker did not hear of would be rows lost, so it is never asked twice.
    pub(crate) async fn next_chunk(&self, queue: &str) -> Result<Option<u64>, String> {
        let doc = self
            .post_strict(
                "/v1/next",
                json!({ "queue": queue, "claimer": self.claimer }),
            )
            .await
            .map_err(|e| format!("cannot get work from {e}"))?;
        // Only an explicit null ends the scan: a malformed answer is never taken for "done".
        nullable_u64(&doc, "chunk").ok_or_else(|| {
            format!(
                "cannot get work from the coordinator at {}: the answer has no chunk number",
                self.base
            )
        })
    }

    /// Asks the coordinator's governor of `model` to admit a request of `tokens`: its lease,
    /// or `None` when the coordinator had no room within its patience (ask again).
    pub(crate) async fn admit(&self, model: &str, tokens: u64) -> Result<Option<u64>, String> {
        let doc = self
            .post_strict(
                "/v1/admit",
                json!({ "model": model, "tokens": tokens, "worker": self.listed_as }),
            )
            .await?;
        nullable_u64(&doc, "lease")
            .ok_or_else(|| "the coordinator's admission has no lease".to_string())
    }

    /// Asks the coordinator for at least `ask` of the run's budgets: the grant, or `None`
    /// when a budget has less left; an error when the coordinator could not be asked.
    pub(crate) async fn grant(&self, ask: Allowance) -> Result<Option<Allowance>, String> {
        let body = json!({ "tokens": ask.tokens, "nano_usd": ask.nano_usd });
        let doc = self.post_strict("/v1/budget", body).await?;
        let granted = &doc["granted"];
        if granted.is_null() {
            return Ok(None);
        }
        match (granted["tokens"].as_u64(), granted["nano_usd"].as_u64()) {
            (Some(tokens), Some(nano_usd)) => Ok(Some(Allowance { tokens, nano_usd })),
            _ => Err("the coordinator's budget grant is malformed".to_string()),
        }
    }

    /// Tells the coordinator how the request of `lease` ended (`outcome`: its wire form).
    pub(crate) async fn finish(&self, lease: u64, outcome: Value) {
        let _ = self
            .post_strict("/v1/finish", json!({ "lease": lease, "outcome": outcome }))
            .await;
    }

    /// Reports the change of this worker's counters to the coordinator.
    pub(crate) async fn report(&self, delta: &BTreeMap<String, u64>) {
        let _ = self
            .post("/v1/counters", json!({ "counters": delta }))
            .await;
    }

    /// Sends answers to the coordinator's cache; returns when it has them (or failed).
    pub(crate) async fn put_many(&self, answers: &[(RequestKey, CachedResponse)]) {
        let entries: Vec<Value> = answers
            .iter()
            .map(|(key, resp)| json!([hex(key), entry_value(resp)]))
            .collect();
        let _ = self.post("/v1/put", json!({ "entries": entries })).await;
    }
}

/// A claiming lookup whose answer its caller has not read: released on drop (see
/// [`SharedCache::claim_many`]).
struct UnreadClaims(
    Option<tokio::task::JoinHandle<(Vec<RequestKey>, Vec<Lookup>)>>,
    Arc<SharedCache>,
);

impl Drop for UnreadClaims {
    fn drop(&mut self) {
        let (Some(lookup), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let shared = self.1.clone();
        rt.spawn(async move {
            let Ok((asked, found)) = lookup.await else {
                return;
            };
            let claimed: Vec<RequestKey> = asked
                .into_iter()
                .zip(found)
                .filter(|(_, f)| *f == Lookup::Miss)
                .map(|(k, _)| k)
                .collect();
            if !claimed.is_empty() {
                shared.release(&claimed).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cache::{CacheServer, Counters};

    /// Whether `probe` claims `key` within a few seconds (a release on the way lands).
    async fn claimable(probe: &SharedCache, key: RequestKey) -> bool {
        for _ in 0..200 {
            if probe.get_many(&[key], true).await == vec![Lookup::Miss] {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_lookup_dropped_on_the_wire_gives_its_claims_up_and_only_its_own() {
        let counters: Counters = Arc::new(|_| {});
        let server =
            CacheServer::start(None, ([127, 0, 0, 1], 0).into(), (None, None), counters).unwrap();
        let named = |url: &str| {
            let c = SharedCache::new(&server.url(), None, None);
            Arc::new(c.listed_as(Some(url.to_string())))
        };
        let (a, b, probe) = (
            named("http://a:1/"),
            named("http://b:1/"),
            named("http://p:1/"),
        );
        // `a`'s lookup claims the key, but its statement is dropped before the answer is read.
        let key = [9; 32];
        let keys = [key];
        let mut lookup = Box::pin(a.claim_many(&keys));
        // Polled once: its task is spawned, and has not run (this runtime has one thread).
        assert!(futures::poll!(&mut lookup).is_pending());
        drop(lookup);
        assert!(claimable(&probe, key).await, "given up");
        // Claimed by `probe` now: `b` cannot give it up, `probe` can.
        b.release(&[key]).await;
        assert_eq!(a.get_many(&[key], true).await, vec![Lookup::Pending]);
        probe.release(&[key]).await;
        assert!(claimable(&a, key).await);
        // A lookup whose answer was read keeps its claim.
        let other = [10; 32];
        assert_eq!(b.claim_many(&[other]).await, vec![Lookup::Miss]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(probe.get_many(&[other], true).await, vec![Lookup::Pending]);
    }
}
