//! Batch mode (`mode = "batch"` on a model, or `sluice run --batch`): the calls of a statement
//! that miss the cache go to the provider's batch API instead of one request each — at the
//! batch price, answered within the completion window — and nothing in the SQL or the function
//! definitions changes.
//!
//! The dispatcher hands each attempt of a batch-mode model to its [`BatchQueue`] instead of the
//! provider, and validates, caches and retries what comes back exactly as for a live answer.
//! [`api`] speaks the OpenAI Files + Batches API, [`line`] the JSONL lines each way, [`queue`]
//! gathers files, stores jobs durably before waiting (in the response cache's database), polls
//! them and hands results back.

pub(crate) mod api;
mod line;
mod queue;

pub use api::{BatchApi, JobStatus};
pub use queue::{BatchQueue, JobView};
