//! Why the engine cannot start ([`EngineError`]), and a failed statement of a script
//! ([`StatementError`]).

use datafusion::common::DataFusionError;

use crate::cache::CacheError;
use crate::llm::SetupError;
use crate::types::StatementStop;
use crate::udf::def::DefError;

/// Errors that stop the engine from starting.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A function definition is invalid.
    #[error(transparent)]
    Definition(#[from] DefError),
    /// A model could not be set up.
    #[error("model {model:?}: {source}")]
    Model {
        /// The model name.
        model: String,
        /// What went wrong.
        source: SetupError,
    },
    /// The response cache could not be opened.
    #[error(transparent)]
    Cache(CacheError),
    /// DataFusion refused a registration.
    #[error("{0}")]
    DataFusion(#[from] DataFusionError),
}

/// What made a statement fail, as the exit code and the run's last lines need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementErrorKind {
    /// The run's token or cost budget stopped it.
    Budget,
    /// A model failed for every row (no connection, authentication, unknown model, a failed
    /// batch job).
    Model,
    /// A row's call failed under `on_error = "fail"`.
    Row,
    /// Workers of the cluster stopped answering.
    Workers,
    /// Anything else: SQL, input files, outputs.
    Other,
}

impl From<StatementStop> for StatementErrorKind {
    fn from(stop: StatementStop) -> Self {
        match stop {
            StatementStop::Budget => StatementErrorKind::Budget,
            StatementStop::Model => StatementErrorKind::Model,
            StatementStop::Row => StatementErrorKind::Row,
        }
    }
}

/// A statement of a script that failed.
#[derive(Debug, thiserror::Error)]
#[error("{origin}:{line}: statement {index} ({summary}): {message}")]
pub struct StatementError {
    /// What made it fail.
    pub kind: StatementErrorKind,
    /// The script (file path or `<sql>`).
    pub origin: String,
    /// 1-based line where the statement starts.
    pub line: usize,
    /// 1-based statement number.
    pub index: usize,
    /// The statement's first words.
    pub summary: String,
    /// What failed, on one line.
    pub message: String,
}
