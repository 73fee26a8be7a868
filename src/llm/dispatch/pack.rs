//! Many rows per request (`rows_per_prompt`): the rows of a slice that miss the cache go out
//! up to N at a time, their items packed into one prompt whose output is an array of N results
//! in order (the function's schema as the items, `minItems = maxItems = N`). Each row's result
//! is stored under that row's own key — the key of the row alone — so a later run with another
//! N, or without packing, finds it.
//!
//! A packed answer that does not validate (the wrong number of items, an item off the schema,
//! cut at `max_tokens`, a refusal of the request) is never realigned: the rows are split in
//! halves and each half asked again, down to one row per request, which is an ordinary call
//! (shared, retried and validated like any other). Transport failures (429, 5xx, timeouts) are
//! retried as the same request.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::call::{CallResult, CallSpec, ModelHandle, Packer};
use super::inner::Inner;
use super::metrics::{FunctionMetrics, Metrics};
use crate::cache::{CachedResponse, KeyPrefix, RequestKey};
use crate::types::{ErrorKind, LlmError, LlmRequest, OutputSchema, RenderedPrompt, RowError};

/// One row of a packed request: its prompt alone (what its key is made of), its key, and its
/// rendered item.
pub(super) struct PackRow {
    pub prompt: RenderedPrompt,
    pub key: RequestKey,
    pub item: String,
}

/// Failures of a packed answer that asking fewer rows at once can cure.
fn splits(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::InvalidOutput
            | ErrorKind::Truncated
            | ErrorKind::Empty
            | ErrorKind::MalformedResponse
            | ErrorKind::BadRequest
            | ErrorKind::TooLarge
    )
}

/// The output schema of a request packing `n` rows of a function returning `item`.
fn packed_schema(item: Option<&OutputSchema>, n: usize) -> Result<OutputSchema, String> {
    let items = item.map_or_else(|| json!({"type": "string"}), |s| s.json.clone());
    OutputSchema::new(json!({"type": "array", "items": items, "minItems": n, "maxItems": n}))
        .map_err(|e| e.to_string())
}

impl Inner {
    /// The results of `rows` (at most the packer's N), in order.
    pub(super) fn call_pack<'a>(
        self: &'a Arc<Self>,
        (model, spec, pack): (&'a ModelHandle, &'a CallSpec, &'a Arc<dyn Packer>),
        mut rows: Vec<PackRow>,
        fm: &'a Arc<FunctionMetrics>,
    ) -> BoxFuture<'a, Vec<CallResult>> {
        async move {
            let n = rows.len();
            if n <= 1 {
                let Some(row) = rows.pop() else {
                    return Vec::new();
                };
                let req = spec.request(row.prompt);
                return vec![self.call_uncached(model, (req, row.key, false), fm.clone()).await];
            }
            let items: Vec<&str> = rows.iter().map(|r| r.item.as_str()).collect();
            let (prompt, schema) = match (pack.render(&items), packed_schema(spec.schema.as_deref(), n)) {
                (Ok(p), Ok(s)) => (p, s),
                (Err(e), _) | (_, Err(e)) => {
                    let e = Arc::new(RowError::without_call(ErrorKind::Template, e));
                    return vec![Err(e); n];
                }
            };
            let req = LlmRequest {
                function: spec.function.clone(),
                prompt,
                max_tokens: spec.max_tokens.map(|m| m.saturating_mul(n as u32)),
                temperature: spec.temperature,
                schema: Some(Arc::new(schema)),
                confidence: spec.confidence,
            };
            match self.attempt_packed(model, &req, fm).await {
                Ok(resp) => self.unpack(rows, resp, fm).await,
                Err((e, _)) if splits(e.kind) => {
                    tracing::debug!(function = %spec.function, rows = n, "packed answer split: {}", e.message);
                    let right = rows.split_off(n / 2);
                    let (mut a, b) = futures::join!(
                        self.call_pack((model, spec, pack), rows, fm),
                        self.call_pack((model, spec, pack), right, fm)
                    );
                    a.extend(b);
                    a
                }
                Err((e, attempts)) => {
                    self.count_rows(fm, n as u64, Some(e.kind));
                    vec![Err(Arc::new(RowError::from_attempt(e, attempts))); n]
                }
            }
        }
        .boxed()
    }

    /// Attempts a packed request, retrying failures of the transport; a failure of the answer
    /// itself is returned at once (the caller splits the rows).
    async fn attempt_packed(
        &self,
        model: &ModelHandle,
        req: &LlmRequest,
        fm: &Arc<FunctionMetrics>,
    ) -> Result<CachedResponse, (LlmError, u32)> {
        let key = KeyPrefix::of_request(&model.provider.endpoint(), req).key(&req.prompt);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.attempt(model, req, (key, attempt), fm).await {
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    let again =
                        e.kind.is_retryable() && !splits(e.kind) && attempt < self.cfg.max_attempts;
                    if !again {
                        return Err((e, attempt));
                    }
                    Metrics::bump(&self.metrics.retries, e.kind);
                    Metrics::bump(&fm.retries, e.kind);
                    tokio::time::sleep(self.retry_delay(&e, attempt)).await;
                }
            }
        }
    }

    /// Each row's value from a validated packed answer, stored under the row's own key.
    async fn unpack(
        &self,
        rows: Vec<PackRow>,
        resp: CachedResponse,
        fm: &Arc<FunctionMetrics>,
    ) -> Vec<CallResult> {
        let n = rows.len() as u64;
        // A cascade's stage: every row of the answer carries the answer's confidence.
        let (value, confidence) = match resp.value {
            v @ Value::Object(_) => {
                let (value, c) = super::call::split_confident(&v);
                (value, Some(c))
            }
            v => (v, None),
        };
        let Value::Array(values) = value else {
            // The schema is an array of n: validation lets nothing else through.
            let e = RowError::without_call(ErrorKind::InvalidOutput, "not an array".into());
            return vec![Err(Arc::new(e)); rows.len()];
        };
        // Usage is reported per request: each row carries its share.
        let usage = resp.usage.map(|u| u.share(n));
        self.count_rows(fm, n, None);
        let answers: Vec<(RequestKey, CachedResponse)> = rows
            .into_iter()
            .zip(values)
            .map(|(row, value)| {
                let value = match confidence {
                    Some(c) => super::call::confident_value(value, Some(c)),
                    None => value,
                };
                let one = CachedResponse {
                    value,
                    usage,
                    finish_reason: resp.finish_reason.clone(),
                };
                (row.key, one)
            })
            .collect();
        let results = answers
            .iter()
            .map(|(_, a)| Ok(Arc::new(a.value.clone())))
            .collect();
        self.store(answers).await;
        results
    }

    /// Counts `n` rows answered by one packed request (`failed`: how it ended otherwise).
    fn count_rows(&self, fm: &FunctionMetrics, n: u64, failed: Option<ErrorKind>) {
        let m = &self.metrics;
        m.calls.fetch_add(n, Ordering::Relaxed);
        match failed {
            None => {
                m.succeeded.fetch_add(n, Ordering::Relaxed);
                fm.succeeded.fetch_add(n, Ordering::Relaxed);
            }
            Some(kind) => {
                m.failed.fetch_add(n, Ordering::Relaxed);
                fm.failed.fetch_add(n, Ordering::Relaxed);
                for _ in 0..n {
                    Metrics::bump(&m.errors, kind);
                    Metrics::bump(&fm.errors, kind);
                }
            }
        }
    }
}
