//! The cluster's shared cache tier: the coordinator serves its response cache to its workers
//! over HTTP, so that an answer any worker received is found by every worker of a later run,
//! whatever their number or order.
//!
//! A worker looks a record batch's keys up in its own cache first, then asks the coordinator
//! for the rest in one request ([`super::SharedCache::get_many`]); each answer it receives is
//! stored in its own cache and sent to the coordinator before the row is returned
//! ([`super::SharedCache::put_many`]). The tier is best effort: a coordinator that does not
//! answer makes lookups misses (the calls are made), is logged once and is not asked again in
//! that run.
//!
//! The same server takes the workers' counters: each worker reports the change of its run's
//! counters after each batch of calls (`POST /v1/counters`), and the coordinator adds them to
//! its own, so that its summary, progress and `--metrics-json` count every worker's calls. A
//! coordinator without a cache serves only the counters (lookups are misses, answers dropped).
//!
//! Identical calls made by two workers in one run are sent once: a lookup claims the keys it
//! misses ([`super::claims`]); a worker that misses a key another worker has claimed waits for
//! that answer (`/v1/wait`) instead of sending the request, and a worker whose call failed
//! releases its claim.
//!
//! Wire format (JSON; keys as 64 hex digits, entries as the cache stores them):
//! - `POST /v1/get` `{"keys": [..], "claim": true, "worker": url}` → `{"entries": [entry or
//!   null, ..], "pending": [index, ..]}`: the keys' entries in order, and which of the missing
//!   keys another worker is answering now (the others are now claimed by the asker, the
//!   worker at `url` in the coordinator's list when it says);
//! - `POST /v1/wait` `{"key": key}` → `{"entry": entry or null}`, once it is answered;
//! - `POST /v1/release` `{"keys": [..], "worker": url}` → 204 (another worker's claims stay);
//! - `POST /v1/put` `{"entries": [[key, entry], ..]}` → 204;
//! - `POST /v1/counters` `{"counters": {name: n, ..}}` → 204;
//! - `POST /v1/next` `{"queue": id, "claimer": worker}` → `{"chunk": n}`, or `{"chunk": null}`
//!   once every chunk is handed out or the rest is better left to faster workers
//!   ([`super::work`]); 404 for a queue it does not know;
//! - `POST /v1/admit` `{"model": name, "tokens": n, "worker": url}` → `{"lease": id}` once
//!   the coordinator's governor of the model admits the request, or `{"lease": null}` after a
//!   few seconds without room (ask again); 404 for a model it does not pace ([`Pacing`]);
//! - `POST /v1/finish` `{"lease": id, "outcome": ..}` → 204: how the admitted request ended;
//! - `POST /v1/budget` `{"tokens": n, "nano_usd": n}` → `{"granted": {"tokens": n, "nano_usd":
//!   n}}`, at least what was asked of each budget the run has, or `{"granted": null}` when one
//!   has less left ([`Grants`]); 404 when the run has no budget.
//!
//! With a cluster token, every request must carry `authorization: Bearer TOKEN`; a request
//! without it is refused with 401 before its body is read. With the cluster's certificate
//! files it is served over TLS (HTTPS), and workers trust only the cluster's authority.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use super::ResponseCache;
use super::claims::Claims;
use super::pacing::{ADMIT_PATIENCE, Allowance, Grants, Pacing};
use super::wire::{entry_from, entry_value, keys_of, unhex};
use super::work::{Next, WorkQueues};
use crate::config::Secret;

/// The largest request body the coordinator reads (a batch of keys or answers).
const MAX_BODY_BYTES: usize = 64 << 20;
/// The worker a request names (`"worker"`: its URL in the coordinator's list), if it does.
fn worker_of(doc: &Value) -> Option<&str> {
    doc["worker"].as_str().filter(|w| w.len() <= MAX_WORKER_URL)
}

/// The longest worker URL a request may name.
const MAX_WORKER_URL: usize = 2048;

/// The coordinator's side: serves `cache` until dropped.
#[derive(Debug)]
pub struct CacheServer {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<Served>,
    task: tokio::task::JoinHandle<()>,
}

impl CacheServer {
    /// Serves `cache` on `bind` (port 0: a free one), requiring `token` when given, over TLS
    /// with `tls` (a certificate chain and its key, PEM), and hands the counters workers report
    /// to `counters`. Needs a tokio runtime.
    pub fn start(
        cache: Option<Arc<ResponseCache>>,
        bind: SocketAddr,
        (token, tls): (Option<Secret>, Option<(&str, &Secret)>),
        counters: Counters,
    ) -> std::io::Result<CacheServer> {
        let acceptor = match tls {
            Some((cert, key)) => {
                Some(super::tls::tls_acceptor(cert, key).map_err(std::io::Error::other)?)
            }
            None => None,
        };
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let listener = std::net::TcpListener::bind(bind)?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Served {
            cache,
            token,
            counters,
            claims: Claims::default(),
            work: Arc::new(WorkQueues::default()),
            pacing: std::sync::OnceLock::new(),
            grants: std::sync::OnceLock::new(),
        });
        let served = state.clone();
        // The connections are tasks of the accept loop's own set: when the server is dropped
        // (the loop aborted), they end too, and nothing keeps the cache open.
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    Some(_) = connections.join_next() => continue,
                };
                let Ok((stream, peer)) = accepted else {
                    continue;
                };
                let state = state.clone();
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(state.answer(req, peer).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            // A peer that does not complete the handshake is dropped.
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let io = hyper_util::rt::TokioIo::new(stream);
                                let _ = http.serve_connection(io, service).await;
                            }
                        }
                        None => {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = http.serve_connection(io, service).await;
                        }
                    }
                });
            }
        });
        Ok(CacheServer {
            addr,
            scheme,
            state: served,
            task,
        })
    }

    /// Ends the claims and leases of the workers `dead` (URLs as the coordinator lists them)
    /// and of those that did not say who they are, before a statement runs again (a dead
    /// worker never releases its own; the workers left finish theirs).
    pub fn release_claims_of(&self, dead: &[&str]) {
        self.state.claims.end_of(dead);
        if let Some(p) = self.state.pacing.get() {
            p.end_of(dead);
        }
    }

    /// Admits the workers' requests with `pacing` from now on (once; later calls are ignored).
    pub fn pace_with(&self, pacing: Arc<dyn Pacing>) {
        let _ = self.state.pacing.set(pacing);
    }

    /// Grants the run's budgets to the workers from `grants` from now on (once; later calls
    /// are ignored).
    pub fn grant_with(&self, grants: Arc<dyn Grants>) {
        let _ = self.state.grants.set(grants);
    }

    /// The queues of input chunks it hands out to the workers' scans.
    pub fn work(&self) -> Arc<WorkQueues> {
        self.state.work.clone()
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL workers reach it at.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the coordinator does with a worker's reported counters.
pub type Counters = Arc<dyn Fn(&BTreeMap<String, u64>) + Send + Sync>;

/// What the server's connections share.
struct Served {
    cache: Option<Arc<ResponseCache>>,
    token: Option<Secret>,
    counters: Counters,
    claims: Claims,
    work: Arc<WorkQueues>,
    pacing: std::sync::OnceLock<Arc<dyn Pacing>>,
    grants: std::sync::OnceLock<Arc<dyn Grants>>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("cache", &self.cache)
            .field("token", &self.token)
            .finish()
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}

fn refusal(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": message }))
}

impl Served {
    async fn answer(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        if let Some(token) = &self.token {
            let presented = req.headers().get(http::header::AUTHORIZATION);
            if !presented.is_some_and(|p| token.is_bearer(p.as_bytes())) {
                tracing::warn!(
                    "shared cache: refused a request from {peer}: no or wrong cluster token"
                );
                return refusal(StatusCode::UNAUTHORIZED, "no or wrong cluster token");
            }
        }
        if req.method() != http::Method::POST {
            return refusal(StatusCode::METHOD_NOT_ALLOWED, "POST only");
        }
        let path = req.uri().path().to_string();
        let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => return refusal(StatusCode::PAYLOAD_TOO_LARGE, "body too large or cut"),
        };
        let Ok(doc) = serde_json::from_slice::<Value>(&body) else {
            return refusal(StatusCode::BAD_REQUEST, "the body is not JSON");
        };
        match path.as_str() {
            "/v1/get" => self.get(&doc).await,
            "/v1/put" => self.put(&doc),
            "/v1/wait" => self.wait(&doc).await,
            "/v1/release" => self.release(&doc),
            "/v1/counters" => self.counters(&doc),
            "/v1/next" => self.next(&doc),
            "/v1/admit" => self.admit(&doc).await,
            "/v1/finish" => self.finish(&doc),
            "/v1/budget" => self.budget(&doc),
            _ => refusal(StatusCode::NOT_FOUND, "unknown path"),
        }
    }

    async fn get(&self, doc: &Value) -> Response<Full<Bytes>> {
        let Some(keys) = keys_of(&doc["keys"]) else {
            return refusal(
                StatusCode::BAD_REQUEST,
                "keys: a list of 64 hex digits each",
            );
        };
        let mut found = match self.cache.clone() {
            None => vec![None; keys.len()],
            Some(cache) => {
                let asked = keys.clone();
                match tokio::task::spawn_blocking(move || cache.get_many(&asked)).await {
                    Ok(Ok(found)) => found,
                    Ok(Err(e)) => {
                        return refusal(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
                    }
                    Err(_) => {
                        return refusal(StatusCode::INTERNAL_SERVER_ERROR, "the lookup failed");
                    }
                }
            }
        };
        let claim = doc["claim"].as_bool() == Some(true);
        let mut pending = Vec::new();
        for (i, (key, f)) in keys.iter().zip(found.iter_mut()).enumerate() {
            if f.is_none() {
                *f = self.claims.recent(key);
            }
            if f.is_none() && claim && !self.claims.claim(*key, worker_of(doc)) {
                pending.push(i);
            }
        }
        let entries: Vec<Value> = found
            .iter()
            .map(|f| f.as_ref().map_or(Value::Null, entry_value))
            .collect();
        reply(
            StatusCode::OK,
            json!({ "entries": entries, "pending": pending }),
        )
    }

    async fn wait(&self, doc: &Value) -> Response<Full<Bytes>> {
        let Some(key) = doc["key"].as_str().and_then(unhex) else {
            return refusal(StatusCode::BAD_REQUEST, "key: 64 hex digits");
        };
        // An answer put before this wait began is among the recent ones.
        let entry = match self.claims.wait(key).await {
            Some(entry) => Some(entry),
            None => self.claims.recent(&key),
        };
        reply(
            StatusCode::OK,
            json!({ "entry": entry.as_ref().map_or(Value::Null, entry_value) }),
        )
    }

    fn release(&self, doc: &Value) -> Response<Full<Bytes>> {
        let Some(keys) = keys_of(&doc["keys"]) else {
            return refusal(
                StatusCode::BAD_REQUEST,
                "keys: a list of 64 hex digits each",
            );
        };
        for key in keys {
            self.claims.release(key, worker_of(doc));
        }
        no_content()
    }

    fn put(&self, doc: &Value) -> Response<Full<Bytes>> {
        let Some(entries) = doc["entries"].as_array() else {
            return refusal(StatusCode::BAD_REQUEST, "entries: expected a list");
        };
        let mut parsed = Vec::with_capacity(entries.len());
        for e in entries {
            let key = e[0].as_str().and_then(unhex);
            match (key, entry_from(&e[1])) {
                (Some(key), Some(resp)) => parsed.push((key, resp)),
                _ => return refusal(StatusCode::BAD_REQUEST, "entries: [key, entry] each"),
            }
        }
        for (key, resp) in parsed {
            self.claims.end(key, Some(&resp));
            if let Some(cache) = &self.cache {
                cache.put(key, &resp);
            }
        }
        no_content()
    }

    fn counters(&self, doc: &Value) -> Response<Full<Bytes>> {
        let Some(map) = doc["counters"].as_object() else {
            return refusal(StatusCode::BAD_REQUEST, "counters: expected an object");
        };
        let Some(delta) = map
            .iter()
            .map(|(k, v)| v.as_u64().map(|n| (k.clone(), n)))
            .collect::<Option<BTreeMap<String, u64>>>()
        else {
            return refusal(StatusCode::BAD_REQUEST, "counters: whole numbers");
        };
        (self.counters)(&delta);
        no_content()
    }

    async fn admit(&self, doc: &Value) -> Response<Full<Bytes>> {
        let (Some(model), Some(tokens)) = (doc["model"].as_str(), doc["tokens"].as_u64()) else {
            return refusal(StatusCode::BAD_REQUEST, "model and tokens expected");
        };
        let Some(pacing) = self.pacing.get() else {
            return refusal(StatusCode::NOT_FOUND, "the coordinator paces no model");
        };
        match pacing
            .admit(model, tokens, (worker_of(doc), ADMIT_PATIENCE))
            .await
        {
            Ok(lease) => reply(StatusCode::OK, json!({ "lease": lease })),
            Err(e) => refusal(StatusCode::NOT_FOUND, &e),
        }
    }

    fn finish(&self, doc: &Value) -> Response<Full<Bytes>> {
        let Some(lease) = doc["lease"].as_u64() else {
            return refusal(StatusCode::BAD_REQUEST, "lease expected");
        };
        if let Some(pacing) = self.pacing.get() {
            pacing.finish(lease, &doc["outcome"]);
        }
        no_content()
    }

    fn budget(&self, doc: &Value) -> Response<Full<Bytes>> {
        let (Some(tokens), Some(nano_usd)) = (doc["tokens"].as_u64(), doc["nano_usd"].as_u64())
        else {
            return refusal(StatusCode::BAD_REQUEST, "tokens and nano_usd expected");
        };
        let Some(grants) = self.grants.get() else {
            return refusal(StatusCode::NOT_FOUND, "the coordinator holds no budget");
        };
        let granted = grants.grant(Allowance { tokens, nano_usd });
        let granted = granted.map(|g| json!({ "tokens": g.tokens, "nano_usd": g.nano_usd }));
        reply(StatusCode::OK, json!({ "granted": granted }))
    }

    fn next(&self, doc: &Value) -> Response<Full<Bytes>> {
        let Some(queue) = doc["queue"].as_str() else {
            return refusal(StatusCode::BAD_REQUEST, "queue: expected a string");
        };
        let Some(claimer) = doc["claimer"].as_u64() else {
            return refusal(StatusCode::BAD_REQUEST, "claimer: expected a number");
        };
        match self.work.next(queue, claimer) {
            Next::Chunk(n) => reply(StatusCode::OK, json!({ "chunk": n })),
            Next::Done => reply(StatusCode::OK, json!({ "chunk": null })),
            Next::Unknown => refusal(StatusCode::NOT_FOUND, "no such work queue"),
        }
    }
}

fn no_content() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::remote::{Lookup, SharedCache};
    use crate::cache::wire::hex;
    use crate::cache::{CachedResponse, RequestKey};

    fn answer(text: &str) -> CachedResponse {
        CachedResponse {
            value: json!(text),
            usage: Some(crate::types::Usage::new(10, 2, 4)),
            finish_reason: Some("stop".into()),
        }
    }

    /// A coordinator's server over a fresh cache with `token`, and the cache.
    fn serve(token: &Secret) -> (CacheServer, Arc<ResponseCache>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ResponseCache::open(dir.path()).unwrap());
        let counters: Counters = Arc::new(|_: &BTreeMap<String, u64>| {});
        let guard = (Some(token.clone()), None);
        let server = CacheServer::start(
            Some(cache.clone()),
            ([127, 0, 0, 1], 0).into(),
            guard,
            counters,
        )
        .unwrap();
        (server, cache, dir)
    }

    #[tokio::test]
    async fn identical_calls_of_two_workers_are_made_once() {
        let token = Secret::new("shared-tier-token-0123456789");
        let (server, _cache, _dir) = serve(&token);
        let worker = SharedCache::new(&server.url(), Some(token.clone()), None);
        // Two workers miss the same key: the first claims it, the second waits for its answer,
        // which it gets before the coordinator's cache has committed it.
        let other = SharedCache::new(&server.url(), Some(token.clone()), None);
        let c: RequestKey = [3; 32];
        assert_eq!(worker.get_many(&[c], true).await, vec![Lookup::Miss]);
        assert_eq!(other.get_many(&[c], true).await, vec![Lookup::Pending]);
        let (got, ()) = tokio::join!(other.wait(c), async {
            tokio::task::yield_now().await;
            worker.put_many(&[(c, answer("C"))]).await;
        });
        assert_eq!(got, Some(answer("C")));
        assert_eq!(
            other.get_many(&[c], true).await,
            vec![Lookup::Hit(answer("C"))]
        );
        // A released claim lets the waiter make the call.
        let d: RequestKey = [4; 32];
        assert_eq!(worker.get_many(&[d], true).await, vec![Lookup::Miss]);
        assert_eq!(other.get_many(&[d], true).await, vec![Lookup::Pending]);
        let (got, ()) = tokio::join!(other.wait(d), async {
            tokio::task::yield_now().await;
            worker.release(&[d]).await;
        });
        assert_eq!(got, None);
    }

    #[tokio::test]
    async fn workers_with_the_token_share_answers_and_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ResponseCache::open(dir.path()).unwrap());
        let token = Secret::new("shared-tier-token-0123456789");
        let seen = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
        let sink = seen.clone();
        let counters: Counters = Arc::new(move |d: &BTreeMap<String, u64>| {
            let mut s = sink.lock().unwrap();
            for (k, v) in d {
                *s.entry(k.clone()).or_default() += v;
            }
        });
        let server = CacheServer::start(
            Some(cache.clone()),
            ([127, 0, 0, 1], 0).into(),
            (Some(token.clone()), None),
            counters,
        )
        .unwrap();
        let worker = SharedCache::new(&server.url(), Some(token.clone()), None);
        let (a, b): (RequestKey, RequestKey) = ([1; 32], [2; 32]);
        assert_eq!(
            worker.get_many(&[a, b], false).await,
            vec![Lookup::Miss, Lookup::Miss]
        );
        worker.put_many(&[(a, answer("A"))]).await;
        // Stored as the coordinator's own answers are: readable after the writer's commit.
        cache.flush().await.unwrap();
        assert_eq!(
            cache.get(&a).unwrap(),
            Some(answer("A")),
            "kept by the coordinator"
        );
        assert_eq!(
            worker.get_many(&[b, a], false).await,
            vec![Lookup::Miss, Lookup::Hit(answer("A"))]
        );
        assert_eq!(worker.failures(), 0);

        // Without the token, or with another: refused, nothing read or stored.
        for other in [None, Some(Secret::new("another-token-0123456789"))] {
            let stranger = SharedCache::new(&server.url(), other, None);
            assert_eq!(stranger.get_many(&[a], false).await, vec![Lookup::Miss]);
            stranger.put_many(&[(b, answer("poison"))]).await;
            assert_eq!(stranger.failures(), 2);
        }
        assert_eq!(worker.get_many(&[b], false).await, vec![Lookup::Miss]);

        // Bad bodies are refused with a status, and the server goes on.
        let client = reqwest::Client::new();
        let auth = "Bearer shared-tier-token-0123456789";
        for (path, body, status) in [
            ("/v1/get", "not json", 400),
            ("/v1/get", r#"{"keys": ["zz"]}"#, 400),
            ("/v1/put", r#"{"entries": [["00", 1]]}"#, 400),
            ("/v1/nope", "{}", 404),
        ] {
            let r = client
                .post(format!("{}{path}", server.url()))
                .header("authorization", auth)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), status, "{path} {body}");
        }
        assert_eq!(
            worker.get_many(&[a], false).await,
            vec![Lookup::Hit(answer("A"))]
        );

        // Counters reach the coordinator; a stranger's do not.
        let delta = BTreeMap::from([("requests".to_string(), 3u64)]);
        worker.report(&delta).await;
        SharedCache::new(&server.url(), None, None)
            .report(&delta)
            .await;
        assert_eq!(seen.lock().unwrap().get("requests"), Some(&3));
    }

    #[tokio::test]
    async fn a_tier_that_is_gone_reads_as_misses() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let worker = SharedCache::new(&url, None, None);
        assert_eq!(worker.get_many(&[[7; 32]], true).await, vec![Lookup::Miss]);
        worker.put_many(&[([7; 32], answer("x"))]).await;
        assert_eq!(worker.failures(), 2);
    }

    #[test]
    fn keys_travel_as_hex() {
        let key: RequestKey = std::array::from_fn(|i| (i * 7) as u8);
        assert_eq!(unhex(&hex(&key)), Some(key));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex(&"g".repeat(64)), None);
    }
}
