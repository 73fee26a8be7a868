//! `sluice._sluice`: the Python extension of sluice. It runs the same engine as the `sluice`
//! command ([`sluice::engine::Engine`]) on a Tokio runtime, with the GIL released while
//! statements run; results cross to Python through the Arrow C stream interface. The Python
//! package `sluice` (python/sluice) wraps it.

mod errors;
mod progress;
mod result;
mod runner;
mod session;
mod stream;

use pyo3::prelude::*;

/// A JSON object as TOML text (for configurations and function definitions given as dicts).
#[pyfunction]
fn json_to_toml(json: &str) -> PyResult<String> {
    let value: toml::Value = serde_json::from_str(json)
        .map_err(|e| errors::ConfigError::new_err(format!("<config>: {e}")))?;
    toml::to_string(&value).map_err(|e| errors::ConfigError::new_err(format!("<config>: {e}")))
}

#[pymodule]
fn _sluice(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<session::Session>()?;
    m.add_class::<result::Rows>()?;
    m.add_class::<stream::Batches>()?;
    m.add_class::<stream::Batch>()?;
    m.add_function(wrap_pyfunction!(json_to_toml, m)?)?;
    errors::add(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
