//! A script run statement by statement, stopping at the first failure, whose error names the
//! statement, its line and a readable cause.

use std::io::Write;
use std::path::Path;

use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::DataFusionError;

use super::cluster::{dead_workers, is_transport_failure, name_failed_workers};
use super::error::{StatementError, StatementErrorKind};
use super::session::{Engine, RunOptions};
use super::statements::{ScriptStatement, split_statements, summary};
use super::transport::is_refused_token;
use crate::sink::tidy_store_message;
use crate::source::find_malformed_json_line;
use crate::types::StatementStop;

impl Engine {
    /// Runs a `.sql` file; output of SELECTs and progress lines go to `out`.
    pub async fn run_file(
        &self,
        path: &Path,
        opts: &RunOptions,
        out: &mut dyn Write,
    ) -> Result<(), StatementError> {
        let sql = std::fs::read_to_string(path).map_err(|e| StatementError {
            kind: StatementErrorKind::Other,
            origin: path.display().to_string(),
            line: 0,
            index: 0,
            summary: "reading the file".into(),
            message: e.to_string(),
        })?;
        self.run_script(&sql, &path.display().to_string(), opts, out)
            .await
    }

    /// Runs every statement of `sql` in order; stops at the first failure.
    pub async fn run_script(
        &self,
        sql: &str,
        origin: &str,
        opts: &RunOptions,
        out: &mut dyn Write,
    ) -> Result<(), StatementError> {
        for (i, stmt) in split_statements(sql).into_iter().enumerate() {
            if let Err(e) = self.run_on_live_workers(&stmt.text, opts, out).await {
                return Err(self.statement_error(origin, i + 1, &stmt, e).await);
            }
        }
        Ok(())
    }

    /// [`name_failed_workers`], whose probes block, on a blocking thread.
    async fn name_failed_workers(&self, transport: bool) -> Option<String> {
        if !self.cluster.distributed() {
            return None;
        }
        let cluster = self.cluster.clone();
        tokio::task::spawn_blocking(move || name_failed_workers(&cluster, transport))
            .await
            .ok()
            .flatten()
    }

    /// Runs a statement; on a cluster, when it fails because workers died before it wrote
    /// anything, runs it again on the workers left (the answers the dead ones received are in
    /// the coordinator's cache, so only the calls they had on the wire are made again). Every
    /// worker is tried again from the next statement.
    pub(super) async fn run_on_live_workers(
        &self,
        text: &str,
        opts: &RunOptions,
        out: &mut dyn Write,
    ) -> Result<(), DataFusionError> {
        self.on_live_workers(async || {
            let mut counted = Counted {
                out: &mut *out,
                written: 0,
            };
            let result = self.run_statement(text, opts, &mut counted).await;
            (result, counted.written > 0)
        })
        .await
    }

    /// Makes `attempt` (which says whether it handed anything out) until it succeeds; on a
    /// cluster, a failed attempt that handed nothing out, because workers died, is made again
    /// on the workers left.
    pub(super) async fn on_live_workers<T>(
        &self,
        mut attempt: impl AsyncFnMut() -> (Result<T, DataFusionError>, bool),
    ) -> Result<T, DataFusionError> {
        self.live.revive_all();
        let mut left = self.cluster.workers.len();
        loop {
            let e = match attempt().await {
                (Err(e), false) if self.cluster.distributed() => e,
                (result, _) => return result,
            };
            if StatementStop::of(&e).is_some() {
                return Err(e);
            }
            let cluster = self.cluster.clone();
            let transport = is_transport_failure(&e);
            let down = tokio::task::spawn_blocking(move || dead_workers(&cluster, transport))
                .await
                .unwrap_or_default();
            let now_left = self.live.pass_over(&down);
            if down.is_empty() || now_left == 0 || now_left >= left {
                return Err(e);
            }
            left = now_left;
            // The dead workers' claims on the calls they had on the wire would hold the others;
            // the live workers finish theirs, and the next attempt waits for those answers.
            if let Some(server) = &self.cache_server {
                server.release_claims_of(&down.iter().map(url::Url::as_str).collect::<Vec<_>>());
            }
            let names: Vec<&str> = down
                .iter()
                .map(|u| u.as_str().trim_end_matches('/'))
                .collect();
            tracing::warn!(
                "worker {} stopped answering; running the statement again on the {left} left",
                names.join(", ")
            );
        }
    }

    /// The failure of the `index`-th statement of a script, with its place and a readable cause
    /// (on a cluster, the workers that stopped answering, probed off the runtime's threads).
    pub(super) async fn statement_error(
        &self,
        origin: &str,
        index: usize,
        stmt: &ScriptStatement,
        e: DataFusionError,
    ) -> StatementError {
        let stopped = StatementStop::of(&e);
        let transport = is_transport_failure(&e);
        let refused = is_refused_token(&e);
        let message = self.explain_error(StatementStop::strip(e));
        let (kind, message) = match stopped {
            Some(stop) => (stop.into(), message),
            None if refused => (
                StatementErrorKind::Workers,
                format!(
                    "a worker refused the coordinator's cluster token: set {} to the workers' \
                     token (the same value on every machine)",
                    self.cluster.token_env
                ),
            ),
            None => match self.name_failed_workers(transport).await {
                Some(workers) => (StatementErrorKind::Workers, workers),
                None if transport && self.cluster.distributed() => (
                    StatementErrorKind::Workers,
                    format!(
                        "{message} (every worker accepts connections, but the exchange with \
                         one failed: workers that serve TLS need [cluster] tls_ca on the \
                         coordinator, workers that do not need it removed)"
                    ),
                ),
                None => (StatementErrorKind::Other, message),
            },
        };
        StatementError {
            kind,
            origin: origin.to_string(),
            line: stmt.line,
            index,
            summary: summary(&stmt.text),
            message,
        }
    }

    /// Runs a statement and collects a query's result (for tests and embedding).
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>, DataFusionError> {
        self.ctx.sql(sql).await?.collect().await
    }

    /// A failed statement's cause on one line: object-store noise shortened, staged names shown
    /// as the names the user wrote, and a JSON decoding error located in its file and line.
    fn explain_error(&self, e: DataFusionError) -> String {
        let mut msg = tidy_store_message(&e.to_string().replace('\n', " "));
        if is_json_error(&e) {
            let locations = self
                .json_locations
                .lock()
                .map(|m| m.values().cloned().collect::<Vec<_>>())
                .unwrap_or_default();
            if let Some(found) = locations.iter().find_map(|l| find_malformed_json_line(l)) {
                msg = format!("{found} — {msg}");
            }
        }
        msg
    }
}

/// Whether `e` is (or was caused by) Arrow's JSON reader refusing its input.
fn is_json_error(e: &DataFusionError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        let arrow = match c.downcast_ref::<DataFusionError>() {
            Some(DataFusionError::ArrowError(a, _)) => Some(a.as_ref()),
            _ => c.downcast_ref::<ArrowError>(),
        };
        if matches!(arrow, Some(ArrowError::JsonError(_))) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// `out`, counting what is written to it (a statement that wrote nothing may run again).
struct Counted<'a> {
    out: &'a mut dyn Write,
    written: usize,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
