//! The cluster's shared cache tier: the coordinator serves its response cache to its workers
//! over HTTP, so that an answer any worker received is found by every worker of a later run,
//! whatever their number or order.
//!
//! A worker looks a record batch's keys up in its own cache first, then asks the coordinator
//! for the rest in one request ([`SharedCache::get_many`]); each answer it receives is stored in
//! its own cache and sent to the coordinator before the row is returned
//! ([`SharedCache::put_many`]). The tier is best effort: a coordinator that does not answer makes
//! lookups misses (the calls are made) and is logged once.
//!
//! The same server takes the workers' counters: each worker reports the change of its run's
//! counters after each batch of calls (`POST /v1/counters`), and the coordinator adds them to
//! its own, so that its summary, progress and `--metrics-json` count every worker's calls. A
//! coordinator without a cache serves only the counters (lookups are misses, answers dropped).
//!
//! Wire format (JSON; keys as 64 hex digits, entries as the cache stores them):
//! - `POST /v1/get` `{"keys": [..]}` → `{"entries": [entry or null, ..]}` in the keys' order;
//! - `POST /v1/put` `{"entries": [[key, entry], ..]}` → 204;
//! - `POST /v1/counters` `{"counters": {name: n, ..}}` → 204.
//!
//! With a cluster token, every request must carry `authorization: Bearer TOKEN`; a request
//! without it is refused with 401 before its body is read. With the cluster's certificate
//! files it is served over TLS (HTTPS), and workers trust only the cluster's authority.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use super::{CachedResponse, RequestKey, ResponseCache};
use crate::config::Secret;

/// The largest request body the coordinator reads (a batch of keys or answers).
const MAX_BODY_BYTES: usize = 64 << 20;

fn hex(key: &RequestKey) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<RequestKey> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

fn entry_value(resp: &CachedResponse) -> Value {
    serde_json::from_slice(&resp.encode()).unwrap_or(Value::Null)
}

fn entry_from(value: &Value) -> Option<CachedResponse> {
    CachedResponse::decode(&serde_json::to_vec(value).ok()?)
}

/// The coordinator's side: serves `cache` until dropped.
#[derive(Debug)]
pub struct CacheServer {
    addr: SocketAddr,
    scheme: &'static str,
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
            Some((cert, key)) => Some(tls_acceptor(cert, key).map_err(std::io::Error::other)?),
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
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
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
        Ok(CacheServer { addr, scheme, task })
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

/// A TLS acceptor for `cert` (a PEM chain) and `key` (its PEM private key).
fn tls_acceptor(cert: &str, key: &Secret) -> Result<tokio_rustls::TlsAcceptor, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls_cert: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key.expose().as_bytes())
        .map_err(|_| "tls_key: not a PEM private key".to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls_cert / tls_key: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// What the coordinator does with a worker's reported counters.
pub type Counters = Arc<dyn Fn(&BTreeMap<String, u64>) + Send + Sync>;

/// What the server's connections share.
struct Served {
    cache: Option<Arc<ResponseCache>>,
    token: Option<Secret>,
    counters: Counters,
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
            "/v1/counters" => self.counters(&doc),
            _ => refusal(StatusCode::NOT_FOUND, "unknown path"),
        }
    }

    async fn get(&self, doc: &Value) -> Response<Full<Bytes>> {
        let Some(keys) = doc["keys"].as_array() else {
            return refusal(StatusCode::BAD_REQUEST, "keys: expected a list");
        };
        let Some(keys) = keys
            .iter()
            .map(|k| k.as_str().and_then(unhex))
            .collect::<Option<Vec<RequestKey>>>()
        else {
            return refusal(StatusCode::BAD_REQUEST, "keys: 64 hex digits each");
        };
        let Some(cache) = self.cache.clone() else {
            return reply(
                StatusCode::OK,
                json!({ "entries": vec![Value::Null; keys.len()] }),
            );
        };
        let found = tokio::task::spawn_blocking(move || cache.get_many(&keys)).await;
        match found {
            Ok(Ok(found)) => {
                let entries: Vec<Value> = found
                    .iter()
                    .map(|f| f.as_ref().map_or(Value::Null, entry_value))
                    .collect();
                reply(StatusCode::OK, json!({ "entries": entries }))
            }
            Ok(Err(e)) => refusal(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            Err(_) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "the lookup failed"),
        }
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
        if let Some(cache) = &self.cache {
            for (key, resp) in parsed {
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
}

fn no_content() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// A worker's side: the coordinator's cache, reached over HTTP.
#[derive(Debug)]
pub struct SharedCache {
    client: reqwest::Client,
    base: String,
    token: Option<Secret>,
    /// Whether a failure was logged already (one warning per run, not one per batch).
    warned: AtomicBool,
    /// Requests that failed.
    failures: AtomicU64,
}

impl SharedCache {
    /// The tier at `base` (`http://host:port`, or `https://` trusting only the authority `ca`),
    /// sending `token` with every request.
    pub fn new(base: &str, token: Option<Secret>, ca: Option<&str>) -> SharedCache {
        let mut client = reqwest::Client::builder().timeout(Duration::from_secs(30));
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
            failures: AtomicU64::new(0),
        }
    }

    /// Requests to the coordinator that failed so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    async fn post(&self, path: &str, body: Value) -> Option<reqwest::Response> {
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(t) = &self.token {
            req = req.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", t.expose()),
            );
        }
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
                failed("no answer in 30 s".to_string());
                None
            }
            Err(e) if e.is_connect() => {
                failed("cannot connect".to_string());
                None
            }
            Err(_) => {
                failed("the connection failed".to_string());
                None
            }
        }
    }

    /// The coordinator's entries for `keys`, in their order (a failure reads as misses).
    pub(crate) async fn get_many(&self, keys: &[RequestKey]) -> Vec<Option<CachedResponse>> {
        let misses = || vec![None; keys.len()];
        if keys.is_empty() {
            return Vec::new();
        }
        let body = json!({ "keys": keys.iter().map(hex).collect::<Vec<_>>() });
        let Some(resp) = self.post("/v1/get", body).await else {
            return misses();
        };
        let Ok(bytes) = resp.bytes().await else {
            return misses();
        };
        let Ok(doc) = serde_json::from_slice::<Value>(&bytes) else {
            return misses();
        };
        match doc["entries"].as_array() {
            Some(entries) if entries.len() == keys.len() => {
                entries.iter().map(entry_from).collect()
            }
            _ => misses(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> CachedResponse {
        CachedResponse {
            value: json!(text),
            usage: Some(crate::types::Usage::new(10, 2, 4)),
            finish_reason: Some("stop".into()),
        }
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
        let worker = SharedCache::new(&server.url(), Some(token), None);
        let (a, b): (RequestKey, RequestKey) = ([1; 32], [2; 32]);
        assert_eq!(worker.get_many(&[a, b]).await, vec![None, None]);
        worker.put_many(&[(a, answer("A"))]).await;
        // Stored as the coordinator's own answers are: readable after the writer's commit.
        cache.flush().await.unwrap();
        assert_eq!(
            cache.get(&a).unwrap(),
            Some(answer("A")),
            "kept by the coordinator"
        );
        assert_eq!(
            worker.get_many(&[b, a]).await,
            vec![None, Some(answer("A"))]
        );
        assert_eq!(worker.failures(), 0);

        // Without the token, or with another: refused, nothing read or stored.
        for other in [None, Some(Secret::new("another-token-0123456789"))] {
            let stranger = SharedCache::new(&server.url(), other, None);
            assert_eq!(stranger.get_many(&[a]).await, vec![None]);
            stranger.put_many(&[(b, answer("poison"))]).await;
            assert_eq!(stranger.failures(), 2);
        }
        assert_eq!(worker.get_many(&[b]).await, vec![None]);

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
        assert_eq!(worker.get_many(&[a]).await, vec![Some(answer("A"))]);

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
        assert_eq!(worker.get_many(&[[7; 32]]).await, vec![None]);
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
