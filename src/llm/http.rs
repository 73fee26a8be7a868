//! The HTTP plumbing every remote provider shares: one pooled client per model, the key from a
//! [`Secret`] (a bearer token, or a header of the provider's own: Azure's `api-key`,
//! Anthropic's `x-api-key`, Google's `x-goog-api-key`) with the provider's fixed headers, a
//! capped body, and the classification of transport failures and HTTP statuses into
//! [`ErrorKind`]s (with Retry-After, or the `retryDelay` of Google's error details).

use std::time::Duration;

use serde_json::Value;

use super::limits::{rate_limits, retry_after, retry_info};
use super::provider::SetupError;
use super::response::{malformed, preview};
use crate::config::{Secret, ServerConfig};
use crate::types::{ErrorKind, LlmError, RateLimits};

/// How a request carries the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyHeader {
    /// `Authorization: Bearer KEY` (OpenAI and compatible servers).
    Bearer,
    /// `NAME: KEY` (Azure's `api-key`, Anthropic's `x-api-key`, Google's `x-goog-api-key`).
    Named(&'static str),
}

/// How a server's error bodies read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorBodies {
    /// `{"error": {"message"}}` or `{"detail"}`; waits only in headers.
    Plain,
    /// Google's `{"error": {"code", "message", "status", "details"}}`: a `google.rpc.RetryInfo`
    /// detail's `retryDelay` is the wait when no header gives one, and a 400 whose
    /// `google.rpc.ErrorInfo` reason is `API_KEY_INVALID` is an authentication failure.
    Google,
}

/// A JSON-over-HTTP endpoint of one model.
#[derive(Debug)]
pub struct HttpEndpoint {
    client: reqwest::Client,
    url: String,
    identity: String,
    api_key: Option<Secret>,
    api_key_env: Option<String>,
    max_body: usize,
    key_header: KeyHeader,
    headers: Vec<(&'static str, &'static str)>,
    bodies: ErrorBodies,
}

impl HttpEndpoint {
    /// An endpoint at `url` with the model's timeouts, key and body cap, and a connection pool
    /// of `pool_size`.
    pub fn new(cfg: &ServerConfig, url: String, pool_size: usize) -> Result<Self, SetupError> {
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.connect_timeout)
            .pool_max_idle_per_host(pool_size)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| SetupError::HttpClient(e.to_string()))?;
        // A replica's URL stands for the model's servers as a whole (`endpoint_id`).
        let identity = match url.strip_prefix(&cfg.base_url) {
            Some(path) => format!("{}{path}", cfg.endpoint_id),
            None => url.clone(),
        };
        Ok(HttpEndpoint {
            client,
            url,
            identity,
            api_key: cfg.api_key.clone(),
            api_key_env: cfg.api_key_env.clone(),
            max_body: cfg.max_response_bytes,
            key_header: KeyHeader::Bearer,
            headers: Vec::new(),
            bodies: ErrorBodies::Plain,
        })
    }

    /// This endpoint sending the key as `key_header` says.
    pub fn with_key_header(mut self, key_header: KeyHeader) -> Self {
        self.key_header = key_header;
        self
    }

    /// This endpoint reading error bodies as `bodies` says.
    pub fn with_error_bodies(mut self, bodies: ErrorBodies) -> Self {
        self.bodies = bodies;
        self
    }

    /// This endpoint sending `name: value` with every request.
    pub fn with_header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The URL requests go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What the response cache knows this endpoint as: its URL, or for a replica the URL of
    /// the model's servers as a whole (`replicas:NAME/...`), the same for every replica.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// POSTs `body` and returns the parsed JSON of a 200 answer with the rate limits its
    /// headers advertise, or the classified failure.
    pub async fn post_json(&self, body: &Value) -> Result<(Value, RateLimits), LlmError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| LlmError::new(ErrorKind::BadRequest, e.to_string()))?;
        let builder = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let (buf, rate) = self.send(builder, &self.url, self.max_body).await?;
        let json = serde_json::from_slice(&buf).map_err(|e| {
            malformed(format!(
                "response body is not valid JSON ({e}): {}",
                preview(&String::from_utf8_lossy(&buf))
            ))
        })?;
        Ok((json, rate))
    }

    /// A request to another path of the same server (`url`), for [`HttpEndpoint::send`].
    pub fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.client.request(method, url)
    }

    /// Sends `builder` (to `url`, for messages) with the key, and returns the body of a 200
    /// answer (at most `max_body` bytes) with the rate limits its headers advertise, or the
    /// classified failure.
    pub async fn send(
        &self,
        mut builder: reqwest::RequestBuilder,
        url: &str,
        max_body: usize,
    ) -> Result<(Vec<u8>, RateLimits), LlmError> {
        builder = match (&self.api_key, self.key_header) {
            (Some(key), KeyHeader::Bearer) => builder.bearer_auth(key.expose()),
            (Some(key), KeyHeader::Named(name)) => {
                match reqwest::header::HeaderValue::from_str(key.expose()) {
                    Ok(mut value) => {
                        value.set_sensitive(true);
                        builder.header(name, value)
                    }
                    // reqwest refuses it when sending, with a message that does not show it.
                    Err(_) => builder.header(name, key.expose()),
                }
            }
            (None, _) => builder,
        };
        for (name, value) in &self.headers {
            builder = builder.header(*name, *value);
        }
        let mut resp = builder.send().await.map_err(|e| classify_transport(&e))?;
        let status = resp.status().as_u16();
        let wait = retry_after(resp.headers());
        let rate = rate_limits(resp.headers());
        let mut buf: Vec<u8> = Vec::with_capacity(
            resp.content_length()
                .map(|l| l as usize)
                .unwrap_or(4096)
                .min(max_body),
        );
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if buf.len() + chunk.len() > max_body {
                        return Err(LlmError {
                            http_status: Some(status),
                            ..LlmError::new(
                                ErrorKind::TooLarge,
                                format!("response body exceeds {max_body} bytes"),
                            )
                        });
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    let mut err = classify_transport(&e);
                    err.http_status = Some(status);
                    return Err(err);
                }
            }
        }
        if status != 200 {
            return Err(LlmError {
                rate: (!rate.is_empty()).then(|| Box::new(rate)),
                ..self.status_error(url, status, &buf, wait)
            });
        }
        Ok((buf, rate))
    }

    /// The failure a non-200 answer of `url` stands for.
    pub fn status_error(
        &self,
        url: &str,
        status: u16,
        body: &[u8],
        wait: Option<Duration>,
    ) -> LlmError {
        let msg = provider_message(body);
        let google = self.bodies == ErrorBodies::Google;
        let wait = wait.or_else(|| retry_info(body).filter(|_| google));
        let bad_key = google && status == 400 && google_reason(body) == Some("API_KEY_INVALID");
        let (kind, message) = match status {
            429 => (ErrorKind::RateLimited, format!("rate limited: {msg}")),
            401 | 403 | 400 if status != 400 || bad_key => (
                ErrorKind::Auth,
                match &self.api_key_env {
                    Some(var) => format!("authentication failed: {msg} (check the key in ${var})"),
                    None => format!(
                        "authentication failed: {msg} (set api_key_env for this model in \
                         sluice.toml)"
                    ),
                },
            ),
            404 => (
                ErrorKind::NotFound,
                format!("{url} answered 404: {msg} (check base_url and model)"),
            ),
            408 => (ErrorKind::Timeout, format!("request timeout: {msg}")),
            500..=599 => (ErrorKind::ServerError, format!("server error: {msg}")),
            _ => (ErrorKind::BadRequest, format!("request refused: {msg}")),
        };
        LlmError {
            http_status: Some(status),
            retry_after: wait,
            ..LlmError::new(kind, message)
        }
    }
}

fn classify_transport(e: &reqwest::Error) -> LlmError {
    // reqwest's messages name the URL (never headers), so they carry no credentials.
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connect() {
        ErrorKind::Connect
    } else {
        ErrorKind::Connection
    };
    LlmError::new(kind, msg)
}

/// The `reason` of the `google.rpc.ErrorInfo` detail of a Google error body.
fn google_reason(body: &[u8]) -> Option<&'static str> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let details = v.pointer("/error/details")?.as_array()?;
    let reason = details
        .iter()
        .filter(|d| {
            d.get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("google.rpc.ErrorInfo"))
        })
        .find_map(|d| d.get("reason").and_then(Value::as_str))?;
    // The reasons a decision is made on, as static names.
    ["API_KEY_INVALID"].into_iter().find(|r| *r == reason)
}

fn provider_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.pointer("/detail"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| preview(text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_messages_come_from_the_error_body() {
        assert_eq!(
            provider_message(br#"{"error": {"message": "slow down"}}"#),
            "slow down"
        );
        assert_eq!(provider_message(br#"{"detail": "bad key"}"#), "bad key");
        assert_eq!(provider_message(b"  plain  "), "plain");
    }

    #[test]
    fn google_error_details_name_the_reason() {
        let body = br#"{"error": {"code": 400, "message": "API key not valid.",
            "status": "INVALID_ARGUMENT", "details": [{"@type":
            "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]}}"#;
        assert_eq!(google_reason(body), Some("API_KEY_INVALID"));
        assert_eq!(provider_message(body), "API key not valid.");
        assert_eq!(
            google_reason(br#"{"error": {"details": [{"reason": "X"}]}}"#),
            None
        );
        assert_eq!(google_reason(b"nope"), None);
    }
}
