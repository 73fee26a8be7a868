//! One statement of a script: external tables (JSON lines found by glob or listing), views
//! and tables, and queries whose first rows are printed. `COPY` is in `copy`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::common::DataFusionError;
use datafusion::logical_expr::{DdlStatement, LogicalPlan};
use datafusion::sql::parser::{CreateExternalTable, Statement};
use futures::StreamExt;

use super::session::{Engine, OutputFormat, RunOptions};
use super::statements::parse_one;
use crate::sink::is_local;
use crate::source::lines::{BadRows, LineFormat};
use datafusion::datasource::listing::ListingTableUrl;

impl Engine {
    /// The object store holding `url` (built from the environment on first use).
    pub(super) fn store_for(
        &self,
        url: &url::Url,
    ) -> Result<Arc<dyn object_store::ObjectStore>, DataFusionError> {
        self.ctx.runtime_env().object_store(
            datafusion::execution::object_store::ObjectStoreUrl::parse(format!(
                "{}://{}",
                url.scheme(),
                url.host_str().unwrap_or_default()
            ))?,
        )
    }

    /// The JSON-lines files of an object-store prefix. DataFusion's JSON reader takes every
    /// file of a prefix, but globs only on local paths: when the prefix also holds other files,
    /// the `.jsonl` / `.ndjson` objects are listed (the first 10,000) and named one by one.
    async fn remote_json_lines(&self, location: &str) -> Result<Vec<String>, DataFusionError> {
        use futures::TryStreamExt;
        if !location.ends_with('/') {
            return Ok(vec![location.to_string()]);
        }
        let url = url::Url::parse(location)
            .map_err(|e| DataFusionError::Plan(format!("{location} is not a valid URL: {e}")))?;
        let store = self.store_for(&url)?;
        let prefix = object_store::path::Path::from_url_path(url.path())
            .map_err(|e| DataFusionError::Plan(format!("{location}: {e}")))?;
        let keys: Vec<object_store::path::Path> = store
            .list(Some(&prefix))
            .take(10_000)
            .map_ok(|o| o.location)
            .try_collect()
            .await
            .map_err(|e| DataFusionError::Execution(format!("cannot list {location}: {e}")))?;
        let is_lines = |k: &object_store::path::Path| {
            matches!(k.extension(), Some("jsonl" | "ndjson" | "json"))
        };
        if keys.iter().all(is_lines) {
            return Ok(vec![location.to_string()]);
        }
        let root = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
        Ok(keys
            .iter()
            .filter(|k| is_lines(k))
            .map(|k| format!("{root}/{k}"))
            .collect())
    }

    /// Runs one statement; what it prints goes to `out`.
    pub(super) async fn run_statement(
        &self,
        text: &str,
        opts: &RunOptions,
        out: &mut dyn Write,
    ) -> Result<(), DataFusionError> {
        match parse_one(text)? {
            Statement::CopyTo(copy) => self.run_copy(copy, opts, out).await,
            Statement::CreateExternalTable(cet) => self.create_external_table(cet, opts, out).await,
            other => self.run_other(other, opts, out).await,
        }
    }

    /// `CREATE EXTERNAL TABLE`: JSON-lines locations become the files DataFusion should read,
    /// and a table of empty files is refused here rather than as a missing column later.
    async fn create_external_table(
        &self,
        mut cet: CreateExternalTable,
        opts: &RunOptions,
        out: &mut dyn Write,
    ) -> Result<(), DataFusionError> {
        if cet.file_type.eq_ignore_ascii_case("json") {
            if let Ok(mut m) = self.json_locations.lock() {
                for (i, location) in cet.locations.iter().enumerate() {
                    if is_local(location) {
                        let loc = location.trim_start_matches("file://");
                        m.insert(format!("{}#{i}", cet.name), PathBuf::from(loc));
                    }
                }
            }
            let mut locations = Vec::with_capacity(cet.locations.len());
            for location in std::mem::take(&mut cet.locations) {
                if is_local(&location) {
                    locations.push(crate::source::json_lines_glob(&location).unwrap_or(location));
                } else {
                    locations.extend(self.remote_json_lines(&location).await?);
                }
            }
            cet.locations = locations;
            self.set_bad_rows(&mut cet, LineFormat::Json)?;
        } else if cet.file_type.eq_ignore_ascii_case("csv") {
            let option = |names: &[&str], default: u8| {
                cet.options
                    .iter()
                    .find(|(k, _)| names.contains(&k.to_ascii_lowercase().as_str()))
                    .and_then(|(_, v)| v.to_string().trim_matches('\'').bytes().next())
                    .unwrap_or(default)
            };
            let format = LineFormat::Csv {
                delimiter: option(&["format.delimiter", "delimiter"], b','),
                quote: option(&["format.quote", "quote"], b'"'),
            };
            self.set_bad_rows(&mut cet, format)?;
        }
        let name = cet.name.to_string();
        let locations = cet.locations.join(", ");
        let state = self.ctx.state();
        let plan = state
            .statement_to_plan(Statement::CreateExternalTable(cet))
            .await?;
        self.ctx.execute_logical_plan(plan).await?.collect().await?;
        if self
            .ctx
            .table(name.as_str())
            .await
            .is_ok_and(|t| t.schema().fields().is_empty())
        {
            let _ = self.ctx.deregister_table(name.as_str());
            return Err(DataFusionError::Plan(format!(
                "{name}: no columns could be read from {locations} (the files are empty)"
            )));
        }
        report(opts, out, &format!("CREATE EXTERNAL TABLE {name}"));
        Ok(())
    }

    /// Takes the `bad_rows` option (`fail`, `skip`, `null`) out of a JSON or CSV table's options and
    /// sets it for each of its locations (`fail` too, so that re-creating a table resets it).
    fn set_bad_rows(
        &self,
        cet: &mut CreateExternalTable,
        format: LineFormat,
    ) -> Result<(), DataFusionError> {
        let mut mode = BadRows::Fail;
        let mut kept = Vec::with_capacity(cet.options.len());
        for (key, value) in std::mem::take(&mut cet.options) {
            let k = key.to_ascii_lowercase();
            if k != "bad_rows" && k != "format.bad_rows" {
                kept.push((key, value));
                continue;
            }
            let text = value.to_string();
            let text = text.trim_matches('\'');
            mode = BadRows::parse(text).ok_or_else(|| {
                DataFusionError::Plan(format!(
                    "{}: OPTIONS ('bad_rows' '{text}'): expected 'fail', 'skip' or 'null'",
                    cet.name
                ))
            })?;
        }
        cet.options = kept;
        for location in &cet.locations {
            let url = ListingTableUrl::parse(location)?;
            let root = url::Url::parse(url.object_store().as_str())
                .map(|u| super::build::store_root(&u))
                .map_err(|e| DataFusionError::Plan(format!("{location}: {e}")))?;
            self.lines.set(&root, url.prefix().clone(), mode, format);
        }
        self.share_table_rules();
        Ok(())
    }

    /// Any other statement: a query prints its first rows and its row count; DDL prints what
    /// it created.
    async fn run_other(
        &self,
        statement: Statement,
        opts: &RunOptions,
        out: &mut dyn Write,
    ) -> Result<(), DataFusionError> {
        let plan = self.ctx.state().statement_to_plan(statement).await?;
        let label = match &plan {
            LogicalPlan::Ddl(DdlStatement::CreateView(v)) => format!("CREATE VIEW {}", v.name),
            LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(t)) => {
                format!("CREATE TABLE {}", t.name)
            }
            LogicalPlan::Ddl(d) => d.name().to_string(),
            _ => String::new(),
        };
        let is_query = is_query(&plan);
        let df = self.ctx.execute_logical_plan(plan).await?;
        if !is_query {
            df.collect().await?;
            if !label.is_empty() {
                report(opts, out, &label);
            }
            return Ok(());
        }
        let mut stream = df.execute_stream().await?;
        if opts.format != OutputFormat::Table {
            return write_rows(stream, opts.format, out).await;
        }
        let mut shown = vec![];
        let mut shown_rows = 0;
        let mut total = 0;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            total += batch.num_rows();
            if shown_rows < opts.max_rows {
                let take = (opts.max_rows - shown_rows).min(batch.num_rows());
                shown.push(batch.slice(0, take));
                shown_rows += take;
            }
        }
        writeln!(out, "{}", pretty_format_batches(&shown)?).ok();
        let plural = if total == 1 { "" } else { "s" };
        if total > shown_rows {
            writeln!(out, "({total} row{plural}, {shown_rows} shown)").ok();
        } else {
            writeln!(out, "({total} row{plural})").ok();
        }
        Ok(())
    }
}

/// What a statement did ("CREATE VIEW v"): on `out` with tables, on stderr with a machine
/// format, so that stdout holds only rows.
pub(super) fn report(opts: &RunOptions, out: &mut dyn Write, what: &str) {
    if opts.format == OutputFormat::Table {
        writeln!(out, "{what}").ok();
    } else {
        eprintln!("{what}");
    }
}

/// Every row of a query as CSV (one header) or JSON lines, batch by batch as they come.
async fn write_rows(
    mut stream: datafusion::physical_plan::SendableRecordBatchStream,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), DataFusionError> {
    use datafusion::arrow::{csv, json};
    let mut buf = Vec::new();
    let mut header = true;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        buf.clear();
        if format == OutputFormat::Csv {
            let mut w = csv::WriterBuilder::new()
                .with_header(header)
                .build(&mut buf);
            w.write(&batch)?;
            header = false;
        } else {
            let mut w = json::LineDelimitedWriter::new(&mut buf);
            w.write(&batch)?;
            w.finish()?;
        }
        out.write_all(&buf)
            .map_err(|e| DataFusionError::Execution(format!("cannot write the rows: {e}")))?;
    }
    if header && format == OutputFormat::Csv {
        // No batch at all: still print the header.
        let mut w = csv::WriterBuilder::new().with_header(true).build(&mut buf);
        w.write(&datafusion::arrow::record_batch::RecordBatch::new_empty(
            stream.schema(),
        ))?;
        drop(w);
        out.write_all(&buf).ok();
    }
    Ok(())
}

/// Whether `plan` is a query, whose rows are its answer (not a definition, a write or a
/// setting).
pub(super) fn is_query(plan: &LogicalPlan) -> bool {
    !matches!(
        plan,
        LogicalPlan::Ddl(_)
            | LogicalPlan::Dml(_)
            | LogicalPlan::Statement(_)
            | LogicalPlan::Copy(_)
    )
}
