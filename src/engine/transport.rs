//! How a coordinator and its workers reach each other: the cluster token on every request, and
//! TLS when certificate files are configured.
//!
//! - [`WorkerChannels`] is the coordinator's (and a worker's, for the tasks it reads from other
//!   workers) connection to each worker: one gRPC channel per worker, over TLS when
//!   `[cluster] tls_ca` is set, with `authorization: Bearer TOKEN` added to every request,
//!   and the worker's URL as listed ([`listed_as`]).
//! - [`TokenCheck`] is the worker's gate: a request without the token, or with another one, is
//!   refused with `UNAUTHENTICATED` before its body (a plan) is read, and the refusal is logged
//!   in one line that names the peer, never the token.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::common::{DataFusionError, Result};
use datafusion_distributed::grpc::{BoxCloneSyncChannel, create_worker_client};
use datafusion_distributed::{ChannelResolver, WorkerChannel};
use http::HeaderValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tower::ServiceExt;
use url::Url;

use crate::config::{ClusterConfig, Secret};

/// The `authorization` value that carries `token`, marked sensitive so that no `Debug` of the
/// headers shows it.
fn bearer(token: &Secret) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(&token.bearer()).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// The header that tells a worker its URL in the coordinator's list: it names itself so in
/// its claims on calls, so that the coordinator can end a dead worker's claims alone.
const LISTED_AS: &str = "x-sluice-worker-url";

/// The URL a request's sender lists this worker at (see [`LISTED_AS`]).
pub(super) fn listed_as(headers: &http::HeaderMap) -> Option<String> {
    let url = headers.get(LISTED_AS)?.to_str().ok()?;
    Url::parse(url).ok().map(String::from)
}

/// Connections to workers: one channel per worker URL, made on first use and kept.
#[derive(Clone)]
pub(super) struct WorkerChannels {
    auth: Option<HeaderValue>,
    tls: Option<ClientTlsConfig>,
    channels: Arc<Mutex<HashMap<Url, BoxCloneSyncChannel>>>,
}

impl std::fmt::Debug for WorkerChannels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerChannels")
            .field("token", &self.auth.as_ref().map(|_| "***"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl WorkerChannels {
    /// Channels with `cluster`'s token and TLS settings.
    pub(super) fn new(cluster: &ClusterConfig) -> WorkerChannels {
        let tls =
            cluster.tls.ca.as_ref().map(|ca| {
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.as_bytes()))
            });
        WorkerChannels {
            auth: cluster.token.as_ref().and_then(bearer),
            tls,
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A new channel to `url`: TLS when configured, the token on every request.
    async fn connect(&self, url: &Url) -> Result<BoxCloneSyncChannel> {
        let mut target = url.clone();
        if self.tls.is_some() {
            // Both schemes are special in the URL standard, so this cannot fail.
            let _ = target.set_scheme("https");
        }
        let shown = target.as_str().trim_end_matches('/').to_string();
        let mut endpoint = Endpoint::from_shared(target.to_string())
            .map_err(|e| DataFusionError::Configuration(format!("worker address {shown}: {e}")))?;
        if let Some(tls) = &self.tls {
            let tls = match url.host_str() {
                Some(host) => tls.clone().domain_name(host),
                None => tls.clone(),
            };
            endpoint = endpoint.tls_config(tls).map_err(|e| {
                DataFusionError::Configuration(format!("worker {shown}: TLS settings: {e}"))
            })?;
        }
        // A worker host that vanishes without closing its connections is noticed by keepalive.
        endpoint = endpoint
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect().await.map_err(|e| {
            DataFusionError::External(Box::new(e))
                .context(format!("cannot connect to worker {shown}"))
        })?;
        let auth = self.auth.clone();
        let listed = HeaderValue::from_str(url.as_str()).ok();
        let channel = channel.map_request(move |mut request: http::Request<tonic::body::Body>| {
            let headers = request.headers_mut();
            if let Some(auth) = &auth {
                headers.insert(http::header::AUTHORIZATION, auth.clone());
            }
            if let Some(listed) = &listed {
                headers.insert(LISTED_AS, listed.clone());
            }
            request
        });
        Ok(BoxCloneSyncChannel::new(channel))
    }
}

#[async_trait]
impl ChannelResolver for WorkerChannels {
    async fn get_worker_client_for_url(&self, url: &Url) -> Result<Box<dyn WorkerChannel>> {
        let known = self
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(url)
            .cloned();
        let channel = match known {
            Some(c) => c,
            None => {
                let c = self.connect(url).await?;
                self.channels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(url.clone())
                    .or_insert(c)
                    .clone()
            }
        };
        Ok(create_worker_client(channel))
    }
}

/// A worker's check of the cluster token on each request (a tonic interceptor).
#[derive(Clone)]
pub(crate) struct TokenCheck {
    expected: Option<Secret>,
    worker: Arc<str>,
}

impl TokenCheck {
    /// The check for `worker` (its name in the log): with no token, every request passes.
    pub(crate) fn new(token: Option<&Secret>, worker: &str) -> TokenCheck {
        TokenCheck {
            expected: token.cloned(),
            worker: Arc::from(worker),
        }
    }

    /// Whether `presented` (an `authorization` value) carries the token.
    fn accepts(&self, presented: Option<&[u8]>) -> bool {
        match (&self.expected, presented) {
            (None, _) => true,
            (Some(token), Some(p)) => token.is_bearer(p),
            (Some(_), None) => false,
        }
    }

    fn refuse(&self, peer: Option<SocketAddr>, had_token: bool) -> tonic::Status {
        let peer = peer.map_or_else(|| "an unknown peer".to_string(), |p| p.to_string());
        let why = if had_token {
            "a wrong cluster token"
        } else {
            "no cluster token"
        };
        tracing::warn!("{}: refused a request from {peer}: {why}", self.worker);
        tonic::Status::unauthenticated(format!(
            "{} refused the request: {why} (the coordinator must have the workers' token)",
            self.worker
        ))
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(
        &mut self,
        request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        if self.accepts(presented) {
            Ok(request)
        } else {
            Err(self.refuse(request.remote_addr(), presented.is_some()))
        }
    }
}

/// The worker's TLS settings, when `[cluster] tls_cert` and `tls_key` are set.
pub(crate) fn server_tls(cluster: &ClusterConfig) -> Option<ServerTlsConfig> {
    let (cert, key) = (cluster.tls.cert.as_ref()?, cluster.tls.key.as_ref()?);
    Some(ServerTlsConfig::new().identity(Identity::from_pem(cert, key.expose())))
}

/// Whether `e` is a worker's refusal of the coordinator's token (or of its lack of one).
pub(super) fn is_refused_token(e: &DataFusionError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(status) = c.downcast_ref::<tonic::Status>()
            && status.code() == tonic::Code::Unauthenticated
        {
            return true;
        }
        cause = c.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_compared_whole() {
        let token = Secret::new("0123456789abcdef-secret");
        let check = TokenCheck::new(Some(&token), "worker w");
        assert!(check.accepts(Some(b"Bearer 0123456789abcdef-secret")));
        for wrong in [
            &b"Bearer 0123456789abcdef-secreT"[..],
            b"Bearer 0123456789abcdef-secret2",
            b"Bearer 0123456789abcdef-secre",
            b"",
            b"0123456789abcdef-secret",
        ] {
            assert!(!check.accepts(Some(wrong)), "{wrong:?}");
        }
        assert!(!check.accepts(None));
        let open = TokenCheck::new(None, "worker w");
        assert!(open.accepts(None));
    }

    #[test]
    fn a_refusal_names_the_peer_and_not_the_token() {
        let token = Secret::new("0123456789abcdef-secret");
        let check = TokenCheck::new(Some(&token), "worker 127.0.0.1:5");
        let status = check.refuse(Some("10.0.0.9:4242".parse().unwrap()), true);
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(!status.message().contains("secret"), "{}", status.message());
        let channels = WorkerChannels::new(&ClusterConfig {
            token: Some(token),
            ..ClusterConfig::default()
        });
        assert!(!format!("{channels:?}").contains("secret"));
    }
}
