//! `COPY ... TO`: the statement runs against a staged location from [`crate::sink`], which
//! becomes the target only when every row is written, and is removed otherwise.

use std::io::Write;

use datafusion::arrow::array::UInt64Array;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::DataFusionError;
use datafusion::sql::parser::{CopyToStatement, Statement};

use super::session::{Engine, RunOptions};
use crate::sink::{SinkError, StagedOutput, check_writable, is_local};

/// Output formats `COPY` may write.
const FORMATS: [&str; 4] = ["PARQUET", "CSV", "JSON", "ARROW"];

fn sink_error(e: SinkError) -> DataFusionError {
    DataFusionError::Execution(e.to_string())
}

/// The number of rows a `COPY` reports (one row with the count).
fn count_rows(batches: &[RecordBatch]) -> u64 {
    batches
        .first()
        .and_then(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<UInt64Array>()
                .map(|a| a.value(0))
        })
        .unwrap_or(0)
}

impl Engine {
    /// Where `target` is staged; an object-store target is checked for being writable first,
    /// so a missing bucket or bad credentials fail before any LLM call is made.
    async fn stage(
        &self,
        target: &str,
        is_dir: bool,
    ) -> Result<Option<StagedOutput>, DataFusionError> {
        let staged = if is_local(target) {
            StagedOutput::local(target, is_dir)
        } else {
            let url = url::Url::parse(target)
                .map_err(|e| DataFusionError::Plan(format!("{target} is not a valid URL: {e}")))?;
            let store = self.store_for(&url)?;
            check_writable(store.as_ref(), &url, target)
                .await
                .map_err(sink_error)?;
            StagedOutput::in_store(target, &url, store, is_dir)
        };
        if let Some(s) = &staged {
            s.prepare().map_err(sink_error)?;
        }
        Ok(staged)
    }

    /// Runs a `COPY` all or nothing.
    pub(super) async fn run_copy(
        &self,
        mut copy: CopyToStatement,
        opts: &RunOptions,
        out: &mut dyn Write,
    ) -> Result<(), DataFusionError> {
        let target = copy.target.clone();
        if let Some(format) = &copy.stored_as
            && !FORMATS.contains(&format.to_ascii_uppercase().as_str())
        {
            return Err(DataFusionError::Plan(format!(
                "COPY ... STORED AS {format}: sluice writes PARQUET, CSV, JSON or ARROW"
            )));
        }
        let staged = self.stage(&target, !copy.partitioned_by.is_empty()).await?;
        if let Some(s) = &staged {
            copy.target = s.staging_sql.clone();
        }
        let state = self.ctx.state();
        let result = async {
            let plan = state.statement_to_plan(Statement::CopyTo(copy)).await?;
            self.ctx.execute_logical_plan(plan).await?.collect().await
        }
        .await;
        let batches = match (result, staged) {
            (Ok(batches), Some(s)) => {
                s.commit().await.map_err(sink_error)?;
                batches
            }
            (Ok(batches), None) => batches,
            (Err(e), staged) => {
                if let Some(s) = staged {
                    s.abort().await;
                }
                return Err(e);
            }
        };
        let rows = count_rows(&batches);
        super::run::report(opts, out, &format!("COPY {rows} rows to {target}"));
        Ok(())
    }
}
