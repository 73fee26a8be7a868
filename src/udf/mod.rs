//! LLM functions in SQL: the DataFusion glue.
//!
//! Each `udfs/*.toml` file becomes three SQL functions:
//! - `name(args...)`: the value, typed by the declared output schema
//!   ([`crate::types::OutputSchema`]);
//! - `name_error(args...)`: NULL on success, otherwise a struct `{kind, message, attempts,
//!   http_status, finish_reason, model}` describing why the same call failed;
//! - `name_model(args...)`: the name of the model that answered (with a `cascade`, the first
//!   model confident enough).
//!
//! Both are placeholders during SQL planning. The [`plan::LiftLlmCalls`] optimizer rule lifts
//! every distinct call into an [`plan::LlmNode`] below its users (so each call runs once per row,
//! whatever position it appears in), and [`exec::LlmExec`] executes those nodes through the shared
//! [`crate::llm::Dispatcher`].

pub(crate) mod aggregate;
mod call;
mod cascade;
pub(crate) mod claimed;
pub(crate) mod codec;
pub mod def;
pub(crate) mod exec;
mod face;
mod field;
mod join;
pub mod kind;
mod node;
pub mod pack;
mod plain;
pub(crate) mod plan;
mod reduce;
mod slice;
mod stages;
mod stream;
mod template;
pub(crate) mod values;
pub(crate) mod vector;

pub(crate) use face::LlmUdf;
pub(crate) use field::{NullSafeFields, NullSafeGetField};
pub use reduce::Reduce;
