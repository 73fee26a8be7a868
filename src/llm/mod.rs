//! LLM providers, the shared dispatcher, and the classified errors they produce.
//!
//! A row's call goes: rendered prompt → [`LlmRequest`] → [`Dispatcher::call`] (global and per-model
//! concurrency, retries with backoff honouring Retry-After, validation of the response against the
//! output schema, in-run dedup) → a [`Provider`] (one HTTP request) → a validated JSON value or a
//! [`RowError`] that SQL can select.

pub(crate) mod anthropic;
pub(crate) mod batch;
pub mod dispatch;
pub(crate) mod embeddings;
pub(crate) mod estimate;
pub(crate) mod gemini;
pub(crate) mod gemini_embed;
pub(crate) mod governor;
pub(crate) mod http;
pub(crate) mod lamini;
pub(crate) mod limits;
#[cfg(feature = "local")]
pub(crate) mod local;
pub(crate) mod openai;
pub(crate) mod prefix;
pub(crate) mod provider;
pub(crate) mod replicas;
pub(crate) mod response;

pub(crate) use dispatch::Dispatcher;
pub use dispatch::{Metrics, MetricsSnapshot};
pub use governor::LimitKind;
pub use provider::{Provider, SetupError, complete_as_list};
pub use replicas::ReplicaSnapshot;
pub use response::{parse_response, preview};
