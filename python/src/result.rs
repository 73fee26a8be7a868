//! A query's rows ([`Rows`]), handed to Python through the Arrow C stream interface
//! (`__arrow_c_stream__`): pyarrow, Polars and DuckDB read the batches without copying them.

use std::ffi::CStr;

use arrow::ffi_stream::FFI_ArrowArrayStream;
use arrow::record_batch::RecordBatchIterator;
use datafusion::arrow::util::pretty::pretty_format_batches;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;
use sluice::engine::QueryRows;

use crate::errors::SluiceError;

/// The capsule name the Arrow PyCapsule interface gives a stream.
const STREAM: &CStr = c"arrow_array_stream";

/// The rows of a statement (none for a statement that is not a query), kept in Arrow memory.
#[pyclass(module = "sluice._sluice", frozen, name = "Rows")]
pub struct Rows {
    rows: Option<QueryRows>,
}

impl Rows {
    /// Rows of a query, or `None` for another statement.
    pub fn new(rows: Option<QueryRows>) -> Rows {
        Rows { rows }
    }
}

#[pymethods]
impl Rows {
    /// The Arrow C stream of the rows, as a PyCapsule (the Arrow PyCapsule interface); a
    /// requested schema is not applied (the consumer casts).
    #[pyo3(signature = (requested_schema = None))]
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        let _ = requested_schema;
        let rows = self.rows.as_ref().ok_or_else(|| {
            SluiceError::new_err("the statement is not a query: it returned no rows")
        })?;
        let reader = RecordBatchIterator::new(
            rows.batches.clone().into_iter().map(Ok),
            rows.schema.clone(),
        );
        let stream = FFI_ArrowArrayStream::new(Box::new(reader));
        PyCapsule::new_with_value(py, stream, STREAM)
    }

    /// Whether the statement was a query (it has rows, perhaps none).
    #[getter]
    fn is_query(&self) -> bool {
        self.rows.is_some()
    }

    /// The number of rows.
    #[getter]
    fn num_rows(&self) -> usize {
        self.rows
            .as_ref()
            .map_or(0, |r| r.batches.iter().map(|b| b.num_rows()).sum())
    }

    /// The column names.
    #[getter]
    fn columns(&self) -> Vec<String> {
        self.rows.as_ref().map_or_else(Vec::new, |r| {
            r.schema.fields().iter().map(|f| f.name().clone()).collect()
        })
    }

    /// The first `max_rows` rows as the table `sluice run` prints, then the row count.
    fn format(&self, max_rows: usize) -> PyResult<String> {
        let Some(rows) = &self.rows else {
            return Ok("(not a query)".to_string());
        };
        let mut shown = Vec::new();
        let mut left = max_rows;
        for b in &rows.batches {
            if left == 0 {
                break;
            }
            let take = left.min(b.num_rows());
            shown.push(b.slice(0, take));
            left -= take;
        }
        let total = self.num_rows();
        let shown_rows = max_rows.min(total);
        let table = if shown.is_empty() {
            pretty_format_batches(&[datafusion::arrow::record_batch::RecordBatch::new_empty(
                rows.schema.clone(),
            )])
        } else {
            pretty_format_batches(&shown)
        }
        .map_err(|e| SluiceError::new_err(e.to_string()))?;
        let plural = if total == 1 { "" } else { "s" };
        let count = if total > shown_rows {
            format!("({total} row{plural}, {shown_rows} shown)")
        } else {
            format!("({total} row{plural})")
        };
        Ok(format!("{table}\n{count}"))
    }

    fn __repr__(&self) -> String {
        match &self.rows {
            Some(_) => format!(
                "<sluice rows: {} rows, columns {:?}>",
                self.num_rows(),
                self.columns()
            ),
            None => "<sluice rows: not a query>".to_string(),
        }
    }
}
