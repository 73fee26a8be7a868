//! The HTTP of a batch API, whatever its protocol: a request with the model's key and fixed
//! headers, a capped body, and the refusals of the batch API itself turned into
//! [`ErrorKind::Batch`] errors that name the setting to change.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use super::job::parse_json;
use crate::llm::http::HttpEndpoint;
use crate::types::{ErrorKind, LlmError};

/// Uploads and downloads may take minutes where a completion takes seconds.
pub(super) const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// Largest result body read (results of one batch of at most 256 MB of requests).
const MAX_RESULT_BYTES: usize = 2 << 30;

/// The batch API of one model, on its chat endpoint's client.
pub(super) struct Wire<'a> {
    /// The chat endpoint (client, key, fixed headers).
    pub http: &'a HttpEndpoint,
    /// The model's name in `sluice.toml`, for messages.
    pub model: &'a str,
    /// The API's name, for messages (`Files + Batches`, `Message Batches`).
    pub api: &'static str,
}

impl Wire<'_> {
    /// Sends `method url` (with `setup` adding the rest of the request) and the key; the body
    /// of a 200 answer of at most `cap` bytes.
    pub async fn send(
        &self,
        (method, url): (Method, &str),
        cap: usize,
        setup: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, LlmError> {
        let b = setup(self.http.request(method.clone(), url));
        let (bytes, _) =
            (self.http.send(b, url, cap).await).map_err(|e| self.refused(&method, url, e))?;
        Ok(bytes)
    }

    /// The body of `GET url`, a batch's results (at most [`MAX_RESULT_BYTES`], given
    /// [`TRANSFER_TIMEOUT`]).
    pub async fn download(&self, url: &str) -> Result<Vec<u8>, LlmError> {
        self.send((Method::GET, url), MAX_RESULT_BYTES, |b| {
            b.timeout(TRANSFER_TIMEOUT)
        })
        .await
    }

    /// [`Wire::json`] with the body as a JSON value.
    pub async fn json_value(
        &self,
        method: Method,
        url: &str,
        body: Option<Value>,
    ) -> Result<Value, LlmError> {
        let body = body.map(|b| b.to_string().into_bytes());
        self.json(method, url, body).await
    }

    /// The row error of one batch result that the live API would have answered with HTTP
    /// `status` and `body`: classified as that answer would be, but never systemic (a refusal
    /// of one request is that row's, not the whole provider's).
    pub fn row_error(&self, status: u16, body: &[u8]) -> LlmError {
        let url = format!("{} (batch)", self.http.url());
        let mut err = self.http.status_error(&url, status, body, None);
        if err.kind.is_systemic() {
            err.kind = ErrorKind::BadRequest;
        }
        err.message = format!("batch result: {}", err.message);
        err
    }

    /// [`Wire::send`] with an optional JSON body, reading a JSON answer.
    pub async fn json(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Value, LlmError> {
        let bytes = self
            .send((method.clone(), url), 16 << 20, |b| match body {
                Some(body) => b
                    .timeout(TRANSFER_TIMEOUT)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body),
                None => b,
            })
            .await?;
        parse_json(method.as_str(), url, &bytes)
    }

    fn refused(&self, method: &Method, url: &str, mut e: LlmError) -> LlmError {
        let (name, api) = (self.model, self.api);
        match e.kind {
            ErrorKind::NotFound => {
                e.kind = ErrorKind::Batch;
                e.message = format!(
                    "{method} {url} answered 404: this server has no batch API ({api}); set \
                     mode = \"live\" for models.{name} or run without --batch"
                );
            }
            ErrorKind::BadRequest | ErrorKind::TooLarge => {
                e.kind = ErrorKind::Batch;
                e.message = format!(
                    "{method} {url} refused: {} (models.{name}.batch.max_bytes and \
                     max_requests set the batch limits)",
                    e.message
                );
            }
            _ => e.message = format!("{method} {url}: {}", e.message),
        }
        e
    }
}
