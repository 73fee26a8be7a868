//! The engine: a DataFusion session with sluice's functions, planner and dispatcher, and the
//! runner that executes a `.sql` file statement by statement.
//!
//! - [`statements`]: SQL text → statements (shared with the shell);
//! - `build`: a session from configuration — models and their providers (`models`), the
//!   response cache, the planner with the LLM rule, the functions;
//! - `run`: one statement (tables, views, queries printed); `copy`: `COPY ... TO`, staged by
//!   [`crate::sink`] so that it is all or nothing;
//! - [`explain`](Engine::explain_script): the estimate of a script without calling a model.

mod batches;
mod build;
mod cascade_estimate;
mod cluster;
mod copy;
mod error;
mod explain;
mod explain_text;
mod host;
mod live;
mod models;
mod named;
mod pacing;
mod run;
mod script;
mod session;
pub mod statements;
mod transport;
pub mod worker;
pub use cascade_estimate::CascadeEstimate;

pub use batches::{BatchListing, cancel_batches, list_batches};
pub use error::{EngineError, StatementError, StatementErrorKind};
pub use explain::{Explanation, FunctionEstimate, StatementEstimate};
pub use host::{QueryRows, QueryStream};
pub use session::{Engine, OutputFormat, RunOptions};
pub use statements::{ScriptStatement, split_statements};
