//! `sluice batches`: the provider batch jobs stored in the response cache (submitted by runs
//! that have not collected them yet), as their providers see them now, and cancelling them.

use super::explain::FunctionEstimate;
use super::session::Engine;
use crate::cache::{ResponseCache, StoredJob};
use crate::config::{Config, ModelPart};
use crate::llm::batch::{BatchApi, JobStatus};

/// A stored job and what its provider says of it (or why it could not be asked).
#[derive(Debug, Clone)]
pub struct BatchListing {
    /// The stored job.
    pub job: StoredJob,
    /// Its state at the provider.
    pub status: Result<JobStatus, String>,
}

/// The batch API of the model that submitted `job`.
fn api_for(config: &Config, job: &StoredJob) -> Result<BatchApi, String> {
    let m = config.models.get(&job.model).ok_or_else(|| {
        format!(
            "model {} that submitted it is not in the configuration any more",
            job.model
        )
    })?;
    let ModelPart::Server(s) = &m.part else {
        return Err(format!("model {} has no server", job.model));
    };
    BatchApi::of_model(m, s, 1)
        .map(|(_, api)| api)
        .map_err(|e| e.to_string())
}

fn open_cache(config: &Config) -> Result<Option<ResponseCache>, String> {
    if !ResponseCache::file_in(&config.cache.dir).exists() {
        return Ok(None);
    }
    ResponseCache::open(&config.cache.dir)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The stored jobs, oldest first, each with its provider's state.
pub async fn list_batches(config: &Config) -> Result<Vec<BatchListing>, String> {
    let Some(cache) = open_cache(config)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for job in cache.jobs().map_err(|e| e.to_string())? {
        let status = match api_for(config, &job) {
            Ok(api) => api.status(&job.id).await.map_err(|e| e.message),
            Err(e) => Err(e),
        };
        out.push(BatchListing { job, status });
    }
    Ok(out)
}

/// Cancels the stored jobs named in `ids` (every stored job when empty) at their providers
/// and forgets them, so that the next run submits their requests anew; per job, its state
/// after the cancel or why it failed (a job that could not be cancelled stays stored).
pub async fn cancel_batches(
    config: &Config,
    ids: &[String],
) -> Result<Vec<(StoredJob, Result<JobStatus, String>)>, String> {
    let Some(cache) = open_cache(config)? else {
        return Ok(Vec::new());
    };
    let jobs = cache.jobs().map_err(|e| e.to_string())?;
    if let Some(unknown) = ids.iter().find(|id| !jobs.iter().any(|j| &j.id == *id)) {
        return Err(format!(
            "no stored batch job {unknown} (sluice batches lists them)"
        ));
    }
    let mut out = Vec::new();
    for job in jobs
        .into_iter()
        .filter(|j| ids.is_empty() || ids.contains(&j.id))
    {
        let result = match api_for(config, &job) {
            Ok(api) => api.cancel(&job.id).await.map_err(|e| e.message),
            Err(e) => Err(e),
        };
        if result.is_ok() {
            cache.remove_job(&job.id).map_err(|e| e.to_string())?;
        }
        out.push((job, result));
    }
    Ok(out)
}

/// Bytes of a batch line beyond its prompt's (the envelope, the chat body's other fields).
const LINE_OVERHEAD_BYTES: u64 = 400;

impl Engine {
    /// Fills in what batch mode changes in `f`: the files its requests make and what they
    /// would cost live. Prompt text is taken as 4 bytes per token.
    pub(super) fn add_batch_estimate(&self, f: &mut FunctionEstimate) {
        let Some(plan) = self.batch_plans.get(&f.model) else {
            return;
        };
        let bytes = f.tokens_in * 4 + f.requests * LINE_OVERHEAD_BYTES;
        let files = f
            .requests
            .div_ceil(plan.max_requests as u64)
            .max(bytes.div_ceil(plan.max_bytes.max(1)));
        f.batch_files = Some(files);
        f.live_cost_usd = plan
            .live_prices
            .map(|p| p.cost_cached(f.tokens_in, f.tokens_cached, f.tokens_out));
    }
}
