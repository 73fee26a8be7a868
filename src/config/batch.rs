//! The settings of a model's batch mode (`mode = "batch"`, `[models.NAME.batch]`): the calls
//! that miss the cache are uploaded as files of requests to the provider's batch API, answered
//! within its completion window at its batch prices.

use std::time::Duration;

use super::raw::RawBatch;
use super::values::{BatchRetry, Prices, parse_size};

/// The settings of batch mode (`[models.NAME.batch]`).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    /// Most requests in one batch file (`max_requests`, default 50,000: OpenAI's limit).
    pub max_requests: usize,
    /// Largest batch file in bytes (`max_bytes`, default "200MB" read as 200,000,000 bytes).
    pub max_bytes: u64,
    /// How often an open job is polled (`poll_ms`, default 30 s).
    pub poll: Duration,
    /// How long the calls of a statement are gathered after the last one arrived before a file
    /// is uploaded (`collect_ms`, default 2 s); a full file goes at once.
    pub collect: Duration,
    /// Where failed results are tried again.
    pub retry: BatchRetry,
    /// The job's completion window (`completion_window`, default "24h").
    pub completion_window: String,
    /// Batch prices (`batch_input_usd_per_mtok`, `batch_output_usd_per_mtok`,
    /// `batch_cached_input_usd_per_mtok` of the model); default: half the live prices.
    pub prices: Option<Prices>,
    /// Wait for the jobs' results (default); `sluice run --wait false` submits them and
    /// leaves them running.
    pub wait: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_requests: 50_000,
            max_bytes: 200_000_000,
            poll: Duration::from_secs(30),
            collect: Duration::from_secs(2),
            retry: BatchRetry::Batch,
            completion_window: "24h".into(),
            prices: None,
            wait: true,
        }
    }
}

/// Checks `[models.NAME.batch]`; `live` and `batch` are the model's prices.
pub(super) fn batch_from_raw(
    name: &str,
    raw: Option<&RawBatch>,
    live: Option<Prices>,
    batch: Option<Prices>,
) -> Result<BatchConfig, String> {
    let d = BatchConfig::default();
    let Some(raw) = raw else {
        return Ok(BatchConfig {
            prices: batch.or(live.map(half)),
            ..d
        });
    };
    let max_requests = match raw.max_requests {
        Some(0) => {
            return Err(format!(
                "models.{name}.batch.max_requests must be at least 1"
            ));
        }
        Some(n) => n,
        None => d.max_requests,
    };
    let max_bytes = match &raw.max_bytes {
        None => d.max_bytes,
        Some(s) => match parse_size(s) {
            Ok(b) if b >= 1024 => b,
            Ok(_) => {
                return Err(format!(
                    "models.{name}.batch.max_bytes must be at least 1KB"
                ));
            }
            Err(m) => return Err(format!("models.{name}.batch.max_bytes: {m}")),
        },
    };
    if raw.poll_ms == Some(0) {
        return Err(format!("models.{name}.batch.poll_ms must be at least 1"));
    }
    Ok(BatchConfig {
        max_requests,
        max_bytes,
        poll: raw.poll_ms.map_or(d.poll, Duration::from_millis),
        collect: raw.collect_ms.map_or(d.collect, Duration::from_millis),
        retry: raw.retry.unwrap_or_default(),
        completion_window: raw.completion_window.clone().unwrap_or(d.completion_window),
        prices: batch.or(live.map(half)),
        wait: true,
    })
}

/// Half of `p`: what OpenAI's and Anthropic's batch APIs charge.
fn half(p: Prices) -> Prices {
    Prices {
        input: p.input / 2.0,
        output: p.output / 2.0,
        cached_input: p.cached_input / 2.0,
        cache_write: p.cache_write / 2.0,
    }
}
