//! A query's rows as they are computed ([`Batches`]): each batch is computed when Python asks
//! for it and crosses through the Arrow C data interface (`__arrow_c_array__`) without a copy,
//! so a large result is never held whole.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, StructArray};
use arrow::ffi::{FFI_ArrowSchema, to_ffi};
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;
use serde_json::Value;
use sluice::engine::{Engine, QueryStream};

use crate::errors::SluiceError;
use crate::progress::Progress;
use crate::runner::{Waited, block_on, runtime, wait};
use crate::session::{lock, metrics_delta, statement_failed, stopped_by_another_thread};

/// A statement being read, with what its end needs.
struct Run {
    engine: Arc<Engine>,
    stopped: Arc<AtomicBool>,
    progress: Progress,
    /// The session's counters when the statement started.
    before: Value,
    /// Where the session keeps its last statement's counters.
    last_metrics: Arc<Mutex<Value>>,
}

impl Run {
    /// The statement ended: its counters become the session's last; when it ended well, its
    /// progress is drawn a last time and the cache flushed.
    fn end(mut self, py: Python<'_>, well: bool) -> PyResult<()> {
        *lock(&self.last_metrics) = metrics_delta(&self.engine.metrics().to_json(), &self.before);
        if !well {
            return Ok(());
        }
        if let Some(signal) = self.progress.finish(py) {
            return Err(signal);
        }
        block_on(py, self.engine.flush_cache())?.map_err(|e| SluiceError::new_err(e.to_string()))
    }
}

/// Where a stream is.
enum State {
    Open(Box<(Run, QueryStream)>),
    /// A thread waits for its next batch.
    Reading,
    Ended,
}

/// The rows of a query, batch by batch as they are computed.
#[pyclass(module = "sluice._sluice", frozen, name = "Batches")]
pub struct Batches {
    schema: SchemaRef,
    state: Mutex<State>,
}

impl Batches {
    /// Runs the statements of `sql` but the last, and starts the last; `show` shows the
    /// progress.
    pub fn start(
        py: Python<'_>,
        (engine, stopped): (Arc<Engine>, Arc<AtomicBool>),
        sql: String,
        show: Option<Py<PyAny>>,
        last_metrics: Arc<Mutex<Value>>,
    ) -> PyResult<Batches> {
        let mut run = Run {
            before: engine.metrics().to_json(),
            progress: Progress::new(show, &engine),
            engine,
            stopped,
            last_metrics,
        };
        let work = {
            let engine = run.engine.clone();
            move || async move { engine.run_script_stream(&sql, "<sql>").await }
        };
        let waited = wait(py, (&run.engine, &run.stopped), &mut run.progress, work)?;
        let engine = run.engine.clone();
        let (schema, state) = match waited {
            Waited::Done(Ok(Some(stream))) => {
                (stream.schema(), State::Open(Box::new((run, stream))))
            }
            Waited::Done(Ok(None)) => {
                run.end(py, true)?;
                (Arc::new(Schema::empty()), State::Ended)
            }
            Waited::Done(Err(e)) => {
                run.end(py, false)?;
                return Err(statement_failed(py, &engine, &e));
            }
            Waited::Interrupted(signal) => {
                run.end(py, false)?;
                return Err(signal);
            }
            Waited::Stopped => return Err(stopped_by_another_thread()),
        };
        Ok(Batches {
            schema,
            state: Mutex::new(state),
        })
    }
}

/// Drops what a stream holds on the runtime (a statement's parts may start tasks as they
/// stop).
fn drop_on_runtime(state: State) {
    match runtime() {
        Ok(rt) => {
            let _entered = rt.enter();
            drop(state);
        }
        Err(_) => drop(state),
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        let state = std::mem::replace(&mut *lock(&self.state), State::Ended);
        drop_on_runtime(state);
    }
}

#[pymethods]
impl Batches {
    /// The next batch (`None` at the end), computed now with the GIL released.
    fn next_batch(&self, py: Python<'_>) -> PyResult<Option<Batch>> {
        let taken = {
            let mut state = lock(&self.state);
            match &*state {
                State::Ended => return Ok(None),
                State::Reading => {
                    return Err(SluiceError::new_err(
                        "another thread is reading this stream's next batch",
                    ));
                }
                State::Open(_) => std::mem::replace(&mut *state, State::Reading),
            }
        };
        let State::Open(open) = taken else {
            return Ok(None);
        };
        let (mut run, mut stream) = *open;
        let work = {
            let engine = run.engine.clone();
            move || async move {
                let next = stream.next(&engine).await;
                (stream, next)
            }
        };
        let waited = wait(py, (&run.engine, &run.stopped), &mut run.progress, work);
        let engine = run.engine.clone();
        let (next, out) = match waited {
            Ok(Waited::Done((stream, Some(Ok(batch))))) => (
                State::Open(Box::new((run, stream))),
                Ok(Some(Batch { batch })),
            ),
            Ok(Waited::Done((_, None))) => (State::Ended, run.end(py, true).map(|()| None)),
            Ok(Waited::Done((_, Some(Err(e))))) => {
                let _ = run.end(py, false);
                (State::Ended, Err(statement_failed(py, &engine, &e)))
            }
            Ok(Waited::Interrupted(signal)) => {
                let _ = run.end(py, false);
                (State::Ended, Err(signal))
            }
            Ok(Waited::Stopped) => (State::Ended, Err(stopped_by_another_thread())),
            Err(e) => (State::Ended, Err(e)),
        };
        *lock(&self.state) = next;
        out
    }

    /// Stops the statement (its calls on the wire are dropped; the answers received stay in
    /// the cache) and frees what it holds.
    fn close(&self) -> PyResult<()> {
        let taken = {
            let mut state = lock(&self.state);
            match &*state {
                State::Reading => {
                    return Err(SluiceError::new_err(
                        "cannot close the stream while another thread reads it",
                    ));
                }
                _ => std::mem::replace(&mut *state, State::Ended),
            }
        };
        drop_on_runtime(taken);
        Ok(())
    }

    /// Whether every batch was read, or the stream closed.
    #[getter]
    fn ended(&self) -> bool {
        matches!(*lock(&self.state), State::Ended)
    }

    /// The schema of the rows, as an Arrow C schema in a PyCapsule (the Arrow PyCapsule
    /// interface).
    fn __arrow_c_schema__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyCapsule>> {
        let schema = FFI_ArrowSchema::try_from(self.schema.as_ref())
            .map_err(|e| SluiceError::new_err(e.to_string()))?;
        PyCapsule::new_with_value(py, schema, c"arrow_schema")
    }

    /// The column names.
    #[getter]
    fn columns(&self) -> Vec<String> {
        self.schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    }
}

/// One batch of rows, for `pyarrow.record_batch` (the Arrow PyCapsule interface).
#[pyclass(module = "sluice._sluice", frozen, name = "Batch")]
pub struct Batch {
    batch: RecordBatch,
}

#[pymethods]
impl Batch {
    /// The batch as an Arrow C schema and array (a struct of its columns) in PyCapsules; a
    /// requested schema is not applied (the consumer casts).
    #[pyo3(signature = (requested_schema = None))]
    fn __arrow_c_array__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<(Bound<'py, PyCapsule>, Bound<'py, PyCapsule>)> {
        let _ = requested_schema;
        let array = StructArray::from(self.batch.clone());
        let (array, schema) =
            to_ffi(&array.to_data()).map_err(|e| SluiceError::new_err(e.to_string()))?;
        Ok((
            PyCapsule::new_with_value(py, schema, c"arrow_schema")?,
            PyCapsule::new_with_value(py, array, c"arrow_array")?,
        ))
    }

    /// The number of rows.
    #[getter]
    fn num_rows(&self) -> usize {
        self.batch.num_rows()
    }
}
