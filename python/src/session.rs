//! A sluice session for Python ([`Session`]): the same [`Engine`] the `sluice` command runs,
//! built from `sluice.toml`, a dict or the defaults, with its scripts run off the GIL.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arrow::ffi_stream::{ArrowArrayStreamReader, FFI_ArrowArrayStream};
use datafusion::arrow::record_batch::RecordBatchReader;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;
use serde_json::Value;
use sluice::Config;
use sluice::engine::{Engine, StatementError};
use sluice::udf::def::FunctionDef;

use crate::errors::{
    ConfigError, FunctionDefinitionError, SluiceError, TableError, definition_error, engine_error,
    statement_error,
};
use crate::progress::Progress;
use crate::result::Rows;
use crate::runner::{Waited, block_on, wait};
use crate::stream::Batches;

/// The engine, and whether an interrupt stopped it (then it is built again before its next
/// statement).
struct Held {
    engine: Option<Arc<Engine>>,
    /// Set by the statement that was interrupted; a new flag goes with each engine.
    stopped: Arc<AtomicBool>,
}

/// A sluice session: SQL with LLM functions over files and Python tables.
#[pyclass(module = "sluice._sluice", frozen, name = "Session")]
pub struct Session {
    config: Config,
    held: Mutex<Held>,
    /// The counters of the last statement run (cumulative counters less those before it).
    last_metrics: Arc<Mutex<Value>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The configuration: TOML text, a file, or what `sluice` finds (`$SLUICE_CONFIG`,
/// `./sluice.toml`, else the embedded model), with the session's overrides.
fn load_config(
    text: Option<(String, String)>,
    path: Option<PathBuf>,
    overrides: &Overrides,
) -> PyResult<Config> {
    let env = |k: &str| std::env::var(k).ok();
    let mut config = match (text, path) {
        (Some((text, origin)), _) => Config::parse(&text, Path::new(&origin), &env)
            .map_err(|e| ConfigError::new_err(e.to_string()))?,
        (None, Some(p)) => Config::load(&p).map_err(|e| ConfigError::new_err(e.to_string()))?,
        (None, None) => sluice::cli::load_config(None).map_err(ConfigError::new_err)?,
    };
    if let Some(dir) = &overrides.udfs {
        config.udf_dir = dir.clone();
    }
    if let Some(dir) = &overrides.cache_dir {
        config.cache.dir = dir.clone();
    }
    if !overrides.cache {
        config.cache.enabled = false;
    }
    if let Some(t) = overrides.budget_tokens {
        config.dispatcher.budget_tokens = Some(t);
    }
    if let Some(usd) = overrides.budget_usd {
        if !usd.is_finite() || usd < 0.0 {
            return Err(ConfigError::new_err(format!(
                "budget_usd must be a non-negative amount, got {usd}"
            )));
        }
        config.dispatcher.budget_usd = Some(usd);
    }
    Ok(config)
}

/// What `connect` changes in the configuration.
struct Overrides {
    udfs: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    cache: bool,
    budget_tokens: Option<u64>,
    budget_usd: Option<f64>,
}

/// `after - before` for every counter of a metrics snapshot (maxima and rates kept as they
/// are).
pub(crate) fn metrics_delta(after: &Value, before: &Value) -> Value {
    match (after, before) {
        (Value::Object(a), Value::Object(b)) => Value::Object(
            a.iter()
                .map(|(k, v)| {
                    let gauge = matches!(k.as_str(), "max_in_flight" | "latency_ms" | "models");
                    let d = match b.get(k) {
                        Some(bv) if !gauge => metrics_delta(v, bv),
                        _ => v.clone(),
                    };
                    (k.clone(), d)
                })
                .collect(),
        ),
        (Value::Number(a), Value::Number(b)) => match (a.as_u64(), b.as_u64()) {
            (Some(x), Some(y)) => Value::from(x.saturating_sub(y)),
            _ => match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => serde_json::json!((x - y).max(0.0)),
                _ => after.clone(),
            },
        },
        _ => after.clone(),
    }
}

impl Session {
    /// The engine for the next statement (built again after an interrupt), waited for with the
    /// GIL released.
    fn engine(&self, py: Python<'_>) -> PyResult<Arc<Engine>> {
        self.engine_and_flag(py).map(|(engine, _)| engine)
    }

    /// The engine for the next statement, with the flag an interrupt sets.
    fn engine_and_flag(&self, py: Python<'_>) -> PyResult<(Arc<Engine>, Arc<AtomicBool>)> {
        py.detach(|| {
            let mut held = lock(&self.held);
            if held.stopped.load(Ordering::SeqCst) {
                let old = held.engine.take().ok_or_else(|| {
                    SluiceError::new_err("the session could not be built again after an interrupt")
                })?;
                let old = Arc::try_unwrap(old).map_err(|old| {
                    held.engine = Some(old);
                    SluiceError::new_err(
                        "the session is still running a statement in another thread",
                    )
                })?;
                let rt = crate::runner::runtime()?;
                let fresh = rt
                    .block_on(old.rebuilt(&self.config))
                    .map_err(|e| engine_error(&e))?;
                held.engine = Some(Arc::new(fresh));
                held.stopped = Arc::new(AtomicBool::new(false));
            }
            let engine = held
                .engine
                .clone()
                .ok_or_else(|| SluiceError::new_err("the session is closed"))?;
            Ok((engine, held.stopped.clone()))
        })
    }

    /// The engine to change (no statement may run meanwhile).
    fn with_engine_mut<T>(&self, f: impl FnOnce(&mut Engine) -> PyResult<T>) -> PyResult<T> {
        let mut held = lock(&self.held);
        let engine = held.engine.as_mut().and_then(Arc::get_mut).ok_or_else(|| {
            SluiceError::new_err("cannot change the session while a statement runs")
        })?;
        f(engine)
    }

    /// Runs a script and returns the last statement's rows; `show` shows its progress.
    fn run(
        &self,
        py: Python<'_>,
        (sql, origin): (String, String),
        show: Option<Py<PyAny>>,
    ) -> PyResult<Rows> {
        let (engine, stopped) = self.engine_and_flag(py)?;
        let before = engine.metrics().to_json();
        let mut progress = Progress::new(show, &engine);
        let work = {
            let engine = engine.clone();
            move || async move { engine.run_script_rows(&sql, &origin).await }
        };
        let waited = wait(py, (&engine, &stopped), &mut progress, work)?;
        *lock(&self.last_metrics) = metrics_delta(&engine.metrics().to_json(), &before);
        if let Waited::Done(_) = &waited
            && let Some(signal) = progress.finish(py)
        {
            return Err(signal);
        }
        match waited {
            Waited::Done(Ok(rows)) => {
                let flushed = block_on(py, engine.flush_cache())?;
                flushed.map_err(|e| SluiceError::new_err(e.to_string()))?;
                Ok(Rows::new(rows))
            }
            Waited::Done(Err(e)) => Err(statement_failed(py, &engine, &e)),
            Waited::Interrupted(signal) => Err(signal),
            Waited::Stopped => Err(stopped_by_another_thread()),
        }
    }
}

/// The exception for a statement a thread's interrupt stopped in another.
pub(crate) fn stopped_by_another_thread() -> PyErr {
    SluiceError::new_err(
        "a statement of this session was interrupted in another thread, so this one was \
         stopped too (the answers received are in the cache); run it again",
    )
}

/// The exception for a failed statement (the answers received are flushed to the cache first).
pub(crate) fn statement_failed(py: Python<'_>, engine: &Arc<Engine>, e: &StatementError) -> PyErr {
    let _ = block_on(py, engine.flush_cache());
    statement_error(e)
}

#[pymethods]
impl Session {
    /// Opens a session. `config`: `(toml_text, origin)` or `None`; `config_path`: a
    /// sluice.toml; neither: what `sluice` finds.
    #[new]
    #[pyo3(signature = (config = None, config_path = None, udfs = None, cache_dir = None,
        cache = true, budget_tokens = None, budget_usd = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        config: Option<(String, String)>,
        config_path: Option<PathBuf>,
        udfs: Option<PathBuf>,
        cache_dir: Option<PathBuf>,
        cache: bool,
        budget_tokens: Option<u64>,
        budget_usd: Option<f64>,
    ) -> PyResult<Session> {
        let overrides = Overrides {
            udfs,
            cache_dir,
            cache,
            budget_tokens,
            budget_usd,
        };
        let config = load_config(config, config_path, &overrides)?;
        let rt = crate::runner::runtime()?;
        let engine = py
            .detach(|| {
                let _guard = rt.enter();
                Engine::new(&config)
            })
            .map_err(|e| engine_error(&e))?;
        Ok(Session {
            config,
            held: Mutex::new(Held {
                engine: Some(Arc::new(engine)),
                stopped: Arc::new(AtomicBool::new(false)),
            }),
            last_metrics: Arc::new(Mutex::new(Value::Object(Default::default()))),
        })
    }

    /// Runs every statement of `sql`; returns the last one's rows. `progress(lines, finished)`
    /// is called with the progress lines while it runs.
    #[pyo3(signature = (sql, progress = None))]
    fn sql(&self, py: Python<'_>, sql: String, progress: Option<Py<PyAny>>) -> PyResult<Rows> {
        self.run(py, (sql, "<sql>".to_string()), progress)
    }

    /// Runs a `.sql` file (relative paths in it are read from the working directory, as
    /// `sluice run` does).
    #[pyo3(signature = (path, progress = None))]
    fn run_file(
        &self,
        py: Python<'_>,
        path: PathBuf,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Rows> {
        let sql = std::fs::read_to_string(&path).map_err(|e| {
            crate::errors::PlanError::new_err(format!("cannot read {}: {e}", path.display()))
        })?;
        self.run(py, (sql, path.display().to_string()), progress)
    }

    /// Runs every statement of `sql`; returns the last one's rows as they are computed.
    #[pyo3(signature = (sql, progress = None))]
    fn stream(
        &self,
        py: Python<'_>,
        sql: String,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Batches> {
        let (engine, stopped) = self.engine_and_flag(py)?;
        Batches::start(
            py,
            (engine, stopped),
            sql,
            progress,
            self.last_metrics.clone(),
        )
    }

    /// Registers the Arrow C stream in `capsule` (from `__arrow_c_stream__`) as table `name`.
    fn register_stream(
        &self,
        py: Python<'_>,
        name: &str,
        capsule: Bound<'_, PyCapsule>,
    ) -> PyResult<()> {
        let ptr = capsule
            .pointer_checked(Some(c"arrow_array_stream"))?
            .cast::<FFI_ArrowArrayStream>();
        // SAFETY: the capsule holds an `ArrowArrayStream` (its name says so); `from_raw`
        // moves it out and leaves the capsule's released, as the interface requires.
        let stream = unsafe { FFI_ArrowArrayStream::from_raw(ptr.as_ptr()) };
        let reader = ArrowArrayStreamReader::try_new(stream)
            .map_err(|e| TableError::new_err(format!("table {name}: {e}")))?;
        let schema = reader.schema();
        let batches = reader
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TableError::new_err(format!("table {name}: {e}")))?;
        let engine = self.engine(py)?;
        engine
            .register_batches(name, schema, batches)
            .map_err(|e| TableError::new_err(format!("table {name}: {e}")))
    }

    /// Adds an LLM function from TOML text (`origin` names it in messages).
    fn define_function(&self, text: &str, origin: &str) -> PyResult<String> {
        let def = FunctionDef::parse(text, Path::new(origin)).map_err(|e| definition_error(&e))?;
        let name = def.name.clone();
        self.with_engine_mut(|engine| engine.add_function(def).map_err(|e| engine_error(&e)))?;
        Ok(name)
    }

    /// Adds an LLM function from JSON text (a dict's keys, as in `udfs/*.toml`).
    fn define_function_json(&self, json: &str, origin: &str) -> PyResult<String> {
        let value: toml::Value = serde_json::from_str(json)
            .map_err(|e| FunctionDefinitionError::new_err(format!("{origin}: {e}")))?;
        let text = toml::to_string(&value)
            .map_err(|e| FunctionDefinitionError::new_err(format!("{origin}: {e}")))?;
        self.define_function(&text, origin)
    }

    /// Adds every function of a directory's `*.toml` files; returns their names.
    fn load_functions(&self, dir: PathBuf) -> PyResult<Vec<String>> {
        if !dir.is_dir() {
            return Err(FunctionDefinitionError::new_err(format!(
                "{}: not a directory",
                dir.display()
            )));
        }
        let defs = FunctionDef::load_dir(&dir).map_err(|e| definition_error(&e))?;
        self.with_engine_mut(|engine| {
            let mut names = Vec::with_capacity(defs.len());
            for def in defs {
                names.push(def.name.clone());
                engine.add_function(def).map_err(|e| engine_error(&e))?;
            }
            Ok(names)
        })
    }

    /// The LLM functions as JSON (name, description, args, model, on_error, output).
    fn functions_json(&self, py: Python<'_>) -> PyResult<String> {
        let engine = self.engine(py)?;
        let list: Vec<Value> = engine
            .functions()
            .iter()
            .map(|f| {
                serde_json::json!({
                    "name": f.name,
                    "description": f.description,
                    "args": f.args,
                    "model": f.model,
                    "on_error": format!("{:?}", f.on_error).to_lowercase(),
                    "source": f.source.display().to_string(),
                })
            })
            .collect();
        Ok(Value::Array(list).to_string())
    }

    /// The estimate of a script (calls, tokens, cost; nothing is sent): `(json, text)`.
    fn explain(&self, py: Python<'_>, sql: String) -> PyResult<(String, String)> {
        let engine = self.engine(py)?;
        let config = self.config.clone();
        let rt = crate::runner::runtime()?;
        let x = py.detach(|| {
            rt.block_on(async {
                let twin = engine
                    .estimating_twin(&config)
                    .await
                    .map_err(|e| engine_error(&e))?;
                twin.explain_script(&sql, "<sql>")
                    .await
                    .map_err(|e| statement_error(&e))
            })
        })?;
        Ok((x.to_json().to_string(), x.to_text(false)))
    }

    /// The counters of the last statement run, as JSON.
    fn last_metrics_json(&self) -> String {
        lock(&self.last_metrics).to_string()
    }

    /// The session's counters since it started, as JSON.
    fn metrics_json(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.engine(py)?.metrics().to_json().to_string())
    }

    fn __repr__(&self) -> String {
        let functions = lock(&self.held)
            .engine
            .as_ref()
            .map_or(0, |e| e.functions().len());
        format!(
            "<sluice session: {functions} functions, models {:?}>",
            self.config.models.keys().collect::<Vec<_>>()
        )
    }
}
