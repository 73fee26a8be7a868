//! sluice's errors as Python exceptions: one class per kind of failure, chosen from the
//! engine's typed errors (never from their text), with the one-line message the `sluice`
//! command prints after `error:`.

use pyo3::PyErr;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use sluice::engine::{EngineError, StatementError, StatementErrorKind};
use sluice::udf::def::DefError;

create_exception!(
    sluice,
    SluiceError,
    PyException,
    "Every error sluice raises (its one-line message is what the `sluice` command prints)."
);
create_exception!(
    sluice,
    ConfigError,
    SluiceError,
    "The configuration (sluice.toml, a dict, a model's setup) is invalid."
);
create_exception!(
    sluice,
    FunctionDefinitionError,
    SluiceError,
    "An LLM function definition (udfs/*.toml, a dict, TOML text) is invalid."
);
create_exception!(
    sluice,
    PlanError,
    SluiceError,
    "A statement failed: its SQL, an input file or table, or an output."
);
create_exception!(
    sluice,
    BudgetExceeded,
    SluiceError,
    "The run's token or cost budget stopped a statement (answers received stay in the cache)."
);
create_exception!(
    sluice,
    ProviderError,
    SluiceError,
    "A model failed for every row, or a row failed under on_error = \"fail\"."
);
create_exception!(
    sluice,
    TableError,
    SluiceError,
    "A Python table could not be read as Arrow (for example a column of mixed types)."
);

/// The exception for an engine that cannot start.
pub fn engine_error(e: &EngineError) -> PyErr {
    let message = e.to_string();
    match e {
        EngineError::Definition(_) => FunctionDefinitionError::new_err(message),
        EngineError::Model { .. } => ConfigError::new_err(message),
        EngineError::Cache(_) | EngineError::DataFusion(_) => SluiceError::new_err(message),
    }
}

/// The exception for an invalid function definition.
pub fn definition_error(e: &DefError) -> PyErr {
    FunctionDefinitionError::new_err(e.to_string())
}

/// The exception for a failed statement, by the kind of its failure.
pub fn statement_error(e: &StatementError) -> PyErr {
    let message = e.to_string();
    match e.kind {
        StatementErrorKind::Budget => BudgetExceeded::new_err(message),
        StatementErrorKind::Model | StatementErrorKind::Row => ProviderError::new_err(message),
        StatementErrorKind::Workers => SluiceError::new_err(message),
        StatementErrorKind::Other => PlanError::new_err(message),
    }
}

/// Adds the exception classes to the module.
pub fn add(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SluiceError", py.get_type::<SluiceError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add(
        "FunctionDefinitionError",
        py.get_type::<FunctionDefinitionError>(),
    )?;
    m.add("PlanError", py.get_type::<PlanError>())?;
    m.add("BudgetExceeded", py.get_type::<BudgetExceeded>())?;
    m.add("ProviderError", py.get_type::<ProviderError>())?;
    m.add("TableError", py.get_type::<TableError>())?;
    Ok(())
}
