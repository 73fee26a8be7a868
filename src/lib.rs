//! sluice: a dataflow engine on Apache Arrow/DataFusion that turns LLM calls into SQL.
//!
//! The path of one row, by module:
//! - [`source`]: files → Arrow, and `chunk_text` to cut transcripts into passages;
//! - [`udf`]: LLM functions declared in `udfs/*.toml`, planned so each call runs once per row;
//! - [`llm`]: providers and the one shared dispatcher (budget, retries, validation);
//! - [`cache`]: the identity of a request and the persistent response store;
//! - [`sink`]: `COPY ... TO` outputs that appear only when complete;
//! - [`engine`] runs `.sql` files; [`cli`] is the `sluice` command; [`config`] reads `sluice.toml`;
//! - [`types`]: the vocabulary they share (requests, responses, errors, output schemas).
//!
//! `ARCHITECTURE.md` maps the modules and the rule between them: every import points down.

#![deny(missing_docs)]

pub mod cache;
pub mod cli;
pub mod config;
pub mod engine;
pub mod llm;
pub mod sink;
pub mod source;
pub mod types;
pub mod udf;

pub use config::Config;
pub use engine::{Engine, OutputFormat, RunOptions};
