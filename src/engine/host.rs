//! What a program that embeds the engine needs beyond running scripts (the Python package):
//! a script whose last query's rows come back as Arrow batches, tables registered from
//! batches, functions added to a running session, and an estimating twin of a session.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::TableProvider;
use datafusion::common::{DataFusionError, TableReference};
use datafusion::datasource::MemTable;
use datafusion::sql::parser::Statement;

use super::error::{EngineError, StatementError};
use super::models::Answers;
use super::session::{Engine, RunOptions};
use super::statements::{parse_one, split_statements};
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

impl Engine {
    /// Runs every statement of `sql` in order, as [`Engine::run_script`] does (stopping at the
    /// first failure), and returns the rows of the last statement when it is a query (`None`
    /// when it is not, or when `sql` has no statement). Nothing is printed. On a cluster, the
    /// last statement is not run again on the workers left when some die.
    pub async fn run_script_rows(
        &self,
        sql: &str,
        origin: &str,
    ) -> Result<Option<QueryRows>, StatementError> {
        let statements = split_statements(sql);
        let opts = RunOptions::default();
        let n = statements.len();
        for (i, stmt) in statements.iter().enumerate() {
            let result = if i + 1 == n {
                self.last_statement_rows(&stmt.text).await
            } else {
                self.run_on_live_workers(&stmt.text, &opts, &mut std::io::sink())
                    .await
                    .map(|()| None)
            };
            match result {
                Ok(rows) if i + 1 == n => return Ok(rows),
                Ok(_) => {}
                Err(e) => return Err(self.statement_error(origin, i + 1, stmt, e).await),
            }
        }
        Ok(None)
    }

    /// Runs one statement; a query's rows are collected, anything else runs as in a script.
    async fn last_statement_rows(&self, text: &str) -> Result<Option<QueryRows>, DataFusionError> {
        let statement = parse_one(text)?;
        if matches!(
            statement,
            Statement::CopyTo(_) | Statement::CreateExternalTable(_)
        ) {
            let opts = RunOptions::default();
            self.run_statement(text, &opts, &mut std::io::sink())
                .await?;
            return Ok(None);
        }
        let plan = self.ctx.state().statement_to_plan(statement).await?;
        let is_query = super::run::is_query(&plan);
        let df = self.ctx.execute_logical_plan(plan).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        Ok(is_query.then_some(QueryRows { schema, batches }))
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

    /// This engine built again from `config`, with its functions and tables: after
    /// [`Engine::stop_sending`] (an interrupt), the session that goes on, on the same response
    /// cache.
    pub async fn rebuilt(self, config: &Config) -> Result<Engine, EngineError> {
        let functions = self.functions.clone();
        let tables = self.tables().await;
        let cache = self.runtime.dispatcher.cache().cloned();
        drop(self);
        let mut fresh = Engine::build_on(config, Vec::new(), Answers::Models, cache)?;
        fresh.take_over(&functions, tables)?;
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
