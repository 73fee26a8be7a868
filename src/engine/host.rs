//! What a program that embeds the engine needs beyond running scripts (the Python package):
//! a script whose last query's rows come back as Arrow batches, tables registered from
//! batches, functions added to a running session, and an estimating twin of a session.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::TableProvider;
use datafusion::common::{DataFusionError, TableReference};
use datafusion::datasource::MemTable;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::sql::parser::Statement;
use futures::{StreamExt, TryStreamExt};

use super::error::{EngineError, StatementError};
use super::models::Answers;
use super::session::{Engine, RunOptions};
use super::statements::{ScriptStatement, parse_one, split_statements};
use crate::config::Config;
use crate::udf::def::FunctionDef;

/// The rows a query returned, with their schema (also when there are none).
#[derive(Debug, Clone)]
pub struct QueryRows {
    /// The schema of the rows.
    pub schema: SchemaRef,
    /// The rows, batch by batch.
    pub batches: Vec<RecordBatch>,
}

/// The rows of a script's last query as they are computed ([`Engine::run_script_stream`]).
/// Dropping it cancels the statement: its calls on the wire are dropped, its resources freed.
pub struct QueryStream {
    schema: SchemaRef,
    first: Option<RecordBatch>,
    rest: SendableRecordBatchStream,
    /// Where the statement is, for its errors.
    origin: String,
    index: usize,
    statement: ScriptStatement,
}

impl std::fmt::Debug for QueryStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryStream")
            .field("origin", &self.origin)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl QueryStream {
    /// The schema of the rows.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The next batch of rows (`None` at the end); a failure is the statement's, as
    /// [`Engine::run_script`] reports it. `engine` is the one that started the stream.
    pub async fn next(&mut self, engine: &Engine) -> Option<Result<RecordBatch, StatementError>> {
        if let Some(first) = self.first.take() {
            return Some(Ok(first));
        }
        match self.rest.next().await? {
            Ok(batch) => Some(Ok(batch)),
            Err(e) => Some(Err(engine
                .statement_error(&self.origin, self.index, &self.statement, e)
                .await)),
        }
    }
}

/// A query's schema, its first batch and the rest of its stream.
type Started = (SchemaRef, Option<RecordBatch>, SendableRecordBatchStream);

impl Engine {
    /// Runs every statement of `sql` in order, as [`Engine::run_script`] does (stopping at the
    /// first failure), and returns the rows of the last statement when it is a query (`None`
    /// when it is not, or when `sql` has no statement). Nothing is printed. On a cluster, a
    /// statement that fails because workers died runs again on the workers left, the last one
    /// included (its rows are collected before they are returned).
    pub async fn run_script_rows(
        &self,
        sql: &str,
        origin: &str,
    ) -> Result<Option<QueryRows>, StatementError> {
        let Some((index, last, statement)) = self.run_leading(sql, origin).await? else {
            return Ok(None);
        };
        let collected = self
            .on_live_workers(async || (self.collect_query(&statement).await, false))
            .await;
        match collected {
            Ok(rows) => Ok(rows),
            Err(e) => Err(self.statement_error(origin, index, &last, e).await),
        }
    }

    /// [`Engine::run_script_rows`] whose last query's rows come as they are computed, so that a
    /// large result is never held whole. On a cluster, the last statement runs again on the
    /// workers left only when workers die before its first batch.
    pub async fn run_script_stream(
        &self,
        sql: &str,
        origin: &str,
    ) -> Result<Option<QueryStream>, StatementError> {
        let Some((index, last, statement)) = self.run_leading(sql, origin).await? else {
            return Ok(None);
        };
        let started = self
            .on_live_workers(async || (self.start_query(&statement).await, false))
            .await;
        match started {
            Ok(Some((schema, first, rest))) => Ok(Some(QueryStream {
                schema,
                first,
                rest,
                origin: origin.to_string(),
                index,
                statement: last,
            })),
            Ok(None) => Ok(None),
            Err(e) => Err(self.statement_error(origin, index, &last, e).await),
        }
    }

    /// Runs every statement of `sql` but the last; returns the last (its 1-based index, its
    /// text and its parse) when it is left to run as a query, `None` when there is none or it
    /// has run (it writes files or creates a table: run as in a script).
    async fn run_leading(
        &self,
        sql: &str,
        origin: &str,
    ) -> Result<Option<(usize, ScriptStatement, Statement)>, StatementError> {
        let mut statements = split_statements(sql);
        let Some(last) = statements.pop() else {
            return Ok(None);
        };
        let opts = RunOptions::default();
        let index = statements.len() + 1;
        for (i, stmt) in statements.iter().enumerate() {
            if let Err(e) = self
                .run_on_live_workers(&stmt.text, &opts, &mut std::io::sink())
                .await
            {
                return Err(self.statement_error(origin, i + 1, stmt, e).await);
            }
        }
        let parsed = match parse_one(&last.text) {
            Ok(p) => p,
            Err(e) => return Err(self.statement_error(origin, index, &last, e).await),
        };
        if !matches!(
            parsed,
            Statement::CopyTo(_) | Statement::CreateExternalTable(_)
        ) {
            return Ok(Some((index, last, parsed)));
        }
        match self
            .run_on_live_workers(&last.text, &opts, &mut std::io::sink())
            .await
        {
            Ok(()) => Ok(None),
            Err(e) => Err(self.statement_error(origin, index, &last, e).await),
        }
    }

    /// Runs a statement to its end: a query's rows, collected (`None` for anything else).
    async fn collect_query(
        &self,
        statement: &Statement,
    ) -> Result<Option<QueryRows>, DataFusionError> {
        let Some((schema, first, rest)) = self.start_query(statement).await? else {
            return Ok(None);
        };
        let mut batches: Vec<RecordBatch> = first.into_iter().collect();
        batches.extend(rest.try_collect::<Vec<_>>().await?);
        Ok(Some(QueryRows { schema, batches }))
    }

    /// Plans and starts a statement: for a query, its schema, first batch and the rest of its
    /// stream; anything else runs to its end (`None`).
    async fn start_query(&self, statement: &Statement) -> Result<Option<Started>, DataFusionError> {
        let plan = self
            .ctx
            .state()
            .statement_to_plan(statement.clone())
            .await?;
        let is_query = super::run::is_query(&plan);
        let df = self.ctx.execute_logical_plan(plan).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let mut stream = df.execute_stream().await?;
        if !is_query {
            while let Some(batch) = stream.next().await {
                batch?;
            }
            return Ok(None);
        }
        let first = stream.next().await.transpose()?;
        Ok(Some((schema, first, stream)))
    }

    /// Registers `batches` as the table `name`, replacing a table of that name.
    pub fn register_batches(
        &self,
        name: &str,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<(), DataFusionError> {
        let table = MemTable::try_new(schema, vec![batches])?;
        self.ctx.deregister_table(name)?;
        self.ctx.register_table(name, Arc::new(table))?;
        Ok(())
    }

    /// Adds an LLM function to this session (checked as the functions of `udf_dir` are); its
    /// name must not be a SQL function already.
    pub fn add_function(&mut self, def: FunctionDef) -> Result<(), EngineError> {
        let def = super::build::register_function(&self.ctx, &self.runtime, Arc::new(def))?;
        self.functions.push(def);
        Ok(())
    }

    /// An engine for estimates ([`Engine::for_estimates`]) with this engine's functions and
    /// tables, so that [`Engine::explain_script`] on it sees what this session sees (its cache,
    /// read only, answers for free what this session has received).
    pub async fn estimating_twin(&self, config: &Config) -> Result<Engine, EngineError> {
        let cache = self.runtime.dispatcher.cache().cloned();
        let mut twin = Engine::build_on(config, Vec::new(), Answers::Estimates, cache)?;
        twin.take_over(&self.functions, self.tables().await)?;
        Ok(twin)
    }

    /// This engine built again from `config`, with its functions, tables and their
    /// `bad_rows` rules: after [`Engine::stop_sending`] (an interrupt), the session that goes
    /// on, on the same response cache.
    pub async fn rebuilt(self, config: &Config) -> Result<Engine, EngineError> {
        let functions = self.functions.clone();
        let tables = self.tables().await;
        let cache = self.runtime.dispatcher.cache().cloned();
        let rules = self.lines.to_text();
        let json_locations = std::mem::take(
            &mut *self
                .json_locations
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        drop(self);
        let mut fresh = Engine::build_on(config, Vec::new(), Answers::Models, cache)?;
        fresh.take_over(&functions, tables)?;
        // The tables read their files through the new engine's object stores, which clean
        // lines by the new engine's rules.
        fresh.lines.add_from_text(&rules);
        *fresh
            .json_locations
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = json_locations;
        Ok(fresh)
    }

    /// Registers `functions` (those it does not have) and `tables` in this engine.
    fn take_over(
        &mut self,
        functions: &[Arc<FunctionDef>],
        tables: Vec<(TableReference, Arc<dyn TableProvider>)>,
    ) -> Result<(), EngineError> {
        for def in functions {
            if self.function(&def.name).is_some() {
                continue;
            }
            let def = super::build::register_function(&self.ctx, &self.runtime, def.clone())?;
            self.functions.push(def);
        }
        for (name, provider) in tables {
            self.ctx.register_table(name, provider)?;
        }
        Ok(())
    }

    /// Every table and view of this session, by its full name.
    async fn tables(&self) -> Vec<(TableReference, Arc<dyn TableProvider>)> {
        let mut out = Vec::new();
        for catalog_name in self.ctx.catalog_names() {
            let Some(catalog) = self.ctx.catalog(&catalog_name) else {
                continue;
            };
            let names = catalog.schema_names();
            for schema_name in names.iter().filter(|s| *s != "information_schema") {
                let Some(schema) = catalog.schema(schema_name) else {
                    continue;
                };
                for table in schema.table_names() {
                    if let Ok(Some(provider)) = schema.table(&table).await {
                        let name = TableReference::full(
                            catalog_name.as_str(),
                            schema_name.as_str(),
                            table.as_str(),
                        );
                        out.push((name, provider));
                    }
                }
            }
        }
        out
    }
}
