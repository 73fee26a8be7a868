//! The shared vocabulary of the row-to-provider path, at the bottom of the module map: what a
//! request is ([`RenderedPrompt`], [`LlmRequest`]), what comes back ([`LlmResponse`],
//! [`Usage`]), how a call fails ([`ErrorKind`], [`LlmError`], [`RowError`]) and what a value must
//! look like ([`OutputSchema`]).
//!
//! `udf`, `cache` and `llm` all speak these types; this module imports none of them (see
//! `ARCHITECTURE.md`).

mod error;
mod rate;
mod request;
pub mod schema;
mod stop;

pub use error::{ErrorKind, LlmError, RowError};
pub use rate::{RateLimits, RateWindow};
pub use request::{
    LlmRequest, LlmResponse, PromptCuts, RenderedPrompt, Usage, confidence_of, estimate_tokens,
};
pub use schema::{NumberBounds, OutputSchema, SchemaError, SchemaKind, SchemaNode};
pub use stop::StatementStop;
