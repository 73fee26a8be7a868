//! Batch mode (`mode = "batch"` on a model, or `sluice run --batch`): the calls of a statement
//! that miss the cache go to the provider's batch API instead of one request each — at the
//! batch price, answered within the completion window — and nothing in the SQL or the function
//! definitions changes.
//!
//! The dispatcher hands each attempt of a batch-mode model to its [`BatchQueue`] instead of the
//! provider, and validates, caches and retries what comes back exactly as for a live answer.
//! [`protocol`] is the provider's batch API: [`api`] speaks the OpenAI Files + Batches API
//! (OpenAI, Azure OpenAI) with [`line`] its JSONL lines each way, [`anthropic`] Anthropic's
//! Message Batches, [`gemini`] Gemini's Batch API; [`wire`] is their shared HTTP and [`job`] what they say of a job in common
//! words. [`queue`] gathers requests, submits them, stores jobs durably before waiting (in the
//! response cache's database), polls them and hands results back.

mod anthropic;
mod api;
mod gemini;
mod job;
mod line;
mod protocol;
mod queue;
mod wire;

pub use job::JobStatus;
pub use protocol::BatchApi;
pub use queue::{BatchQueue, JobView};
