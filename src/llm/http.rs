//! The HTTP plumbing every remote provider shares: one pooled client per model, bearer auth from
//! a [`Secret`], a capped body, and the classification of transport failures and HTTP statuses
//! into [`ErrorKind`]s (with Retry-After).

use std::time::Duration;

use serde_json::Value;

use super::{SetupError, preview};
use crate::config::{Secret, ServerConfig};
use crate::types::{ErrorKind, LlmError};

/// A JSON-over-HTTP endpoint of one model.
#[derive(Debug)]
pub struct HttpEndpoint {
    client: reqwest::Client,
    url: String,
    api_key: Option<Secret>,
    api_key_env: Option<String>,
    max_body: usize,
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
        Ok(HttpEndpoint {
            client,
            url,
            api_key: cfg.api_key.clone(),
            api_key_env: cfg.api_key_env.clone(),
            max_body: cfg.max_response_bytes,
        })
    }

    /// The URL requests go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// POSTs `body` and returns the parsed JSON of a 200 answer, or the classified failure.
    pub async fn post_json(&self, body: &Value) -> Result<Value, LlmError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| LlmError::new(ErrorKind::BadRequest, e.to_string()))?;
        let mut builder = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key.expose());
        }
        let mut resp = builder.send().await.map_err(|e| classify_transport(&e))?;
        let status = resp.status().as_u16();
        let wait = retry_after(resp.headers());
        let mut buf: Vec<u8> = Vec::with_capacity(
            resp.content_length()
                .map(|l| l as usize)
                .unwrap_or(4096)
                .min(self.max_body),
        );
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if buf.len() + chunk.len() > self.max_body {
                        return Err(LlmError {
                            http_status: Some(status),
                            ..LlmError::new(
                                ErrorKind::TooLarge,
                                format!("response body exceeds {} bytes", self.max_body),
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
            return Err(self.status_error(status, &buf, wait));
        }
        serde_json::from_slice(&buf).map_err(|e| {
            malformed(format!(
                "response body is not valid JSON ({e}): {}",
                preview(&String::from_utf8_lossy(&buf))
            ))
        })
    }

    fn status_error(&self, status: u16, body: &[u8], wait: Option<Duration>) -> LlmError {
        let msg = provider_message(body);
        let (kind, message) = match status {
            429 => (ErrorKind::RateLimited, format!("rate limited: {msg}")),
            401 | 403 => (
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
                format!(
                    "{} answered 404: {msg} (check base_url and model)",
                    self.url
                ),
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

/// A 200 answer whose body is not what the protocol promises.
pub fn malformed(message: String) -> LlmError {
    LlmError {
        http_status: Some(200),
        ..LlmError::new(ErrorKind::MalformedResponse, message)
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

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    let v = get("retry-after")?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return Some(Duration::from_secs_f64(secs.max(0.0)));
    }
    // An HTTP date: wait until then.
    let when = httpdate_to_unix(v)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(Duration::from_secs(when.saturating_sub(now)))
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) to Unix seconds.
fn httpdate_to_unix(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: u64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as u64
        + 1;
    let year: u64 = parts[3].parse().ok()?;
    let hms: Vec<u64> = parts[4].split(':').filter_map(|x| x.parse().ok()).collect();
    if hms.len() != 3 || year < 1970 {
        return None;
    }
    // Days from civil date (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2])
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
    fn parses_retry_after_forms() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        assert_eq!(
            httpdate_to_unix("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
    }

    #[test]
    fn provider_messages_come_from_the_error_body() {
        assert_eq!(
            provider_message(br#"{"error": {"message": "slow down"}}"#),
            "slow down"
        );
        assert_eq!(provider_message(br#"{"detail": "bad key"}"#), "bad key");
        assert_eq!(provider_message(b"  plain  "), "plain");
    }
}
