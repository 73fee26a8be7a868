//! `sluice explain`: what a script would do and cost, without calling any model.
//!
//! Every statement is planned and run on an engine built by [`Engine::for_estimates`]: sources are
//! read and chunked for real, each LLM call is looked up in the response cache (read only) and
//! otherwise answered by a placeholder that follows the function's output schema, with prompt
//! tokens counted by the model's tokenizer. Nothing is written: `COPY` and `INSERT` run only their
//! source query, and a later `CREATE EXTERNAL TABLE` over a `COPY` target gets an empty table of
//! the target's schema.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::DataFusionError;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{DdlStatement, LogicalPlan};
use datafusion::sql::parser::Statement;
use futures::StreamExt;
use serde_json::{Value, json};

use super::cascade_estimate::{self, CascadeEstimate};
use super::error::StatementError;
use super::session::{Engine, RunOptions};
use super::statements::{parse_one, split_statements, summary};

/// One LLM function's share of a statement or script.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FunctionEstimate {
    /// The function.
    pub function: String,
    /// The model it calls.
    pub model: String,
    /// Rows that call it.
    pub calls: u64,
    /// Calls the response cache answers (free).
    pub cached: u64,
    /// Requests that would be sent (identical calls share one).
    pub requests: u64,
    /// Prompt tokens of those requests (counted with the model's tokenizer).
    pub tokens_in: u64,
    /// Completion tokens of those requests (estimated from the output schema).
    pub tokens_out: u64,
    /// Of `tokens_in`, those a server's prefix cache would hold if every distinct prefix were
    /// computed once (priced at the model's cached input price).
    pub tokens_cached: u64,
    /// Cost in USD at the model's prices, when they are configured (its batch prices in batch
    /// mode).
    pub cost_usd: Option<f64>,
    /// In batch mode: the batch files its requests make.
    pub batch_files: Option<u64>,
    /// In batch mode: what the same requests would cost live.
    pub live_cost_usd: Option<f64>,
    /// With `rows_per_prompt`: the most rows per request.
    pub rows_per_prompt: Option<usize>,
    /// With a cascade: each model's rows and cost.
    pub cascade: Vec<CascadeEstimate>,
}

impl FunctionEstimate {
    fn to_json(&self) -> Value {
        json!({
            "function": self.function, "model": self.model, "calls": self.calls,
            "cached": self.cached, "requests": self.requests, "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out, "tokens_cached": self.tokens_cached,
            "cost_usd": self.cost_usd,
            "batch_files": self.batch_files, "live_cost_usd": self.live_cost_usd,
            "rows_per_prompt": self.rows_per_prompt,
            "cascade": (!self.cascade.is_empty())
                .then(|| self.cascade.iter().map(CascadeEstimate::to_json).collect::<Vec<_>>()),
        })
    }

    fn add(&mut self, o: &FunctionEstimate) {
        self.calls += o.calls;
        self.cached += o.cached;
        self.requests += o.requests;
        self.tokens_in += o.tokens_in;
        self.tokens_out += o.tokens_out;
        self.tokens_cached += o.tokens_cached;
        let sum = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self.cost_usd = sum(self.cost_usd, o.cost_usd);
        self.live_cost_usd = sum(self.live_cost_usd, o.live_cost_usd);
        self.batch_files = match (self.batch_files, o.batch_files) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        cascade_estimate::add(&mut self.cascade, &o.cascade);
    }
}

/// One statement of the script.
#[derive(Debug, Clone, Default)]
pub struct StatementEstimate {
    /// 1-based statement number.
    pub index: usize,
    /// Line where it starts.
    pub line: usize,
    /// Its first words.
    pub summary: String,
    /// The optimised logical plan (LLM calls lifted into their own nodes), for statements
    /// that read data.
    pub plan: Option<String>,
    /// On a cluster (`--workers`): the distributed plan's stages, their tasks and the workers
    /// those go to.
    pub stages: Option<String>,
    /// Rows the statement's query produces (for COPY and INSERT: rows that would be written).
    pub rows: Option<u64>,
    /// LLM calls made while running it.
    pub functions: Vec<FunctionEstimate>,
    /// What explain did differently from a run, if anything.
    pub note: Option<String>,
}

/// The whole estimate.
#[derive(Debug, Clone, Default)]
pub struct Explanation {
    /// Per statement.
    pub statements: Vec<StatementEstimate>,
    /// Per function over the whole script.
    pub totals: Vec<FunctionEstimate>,
    /// How each model's tokens were counted.
    pub tokenizers: BTreeMap<String, String>,
    /// Models whose functions were called but that have no prices.
    pub unpriced: Vec<String>,
    /// How completion tokens were extrapolated from a sample (`explain --sample N`), if they were.
    pub extrapolated: Option<String>,
}

impl Explanation {
    /// Sum over every function.
    /// Sum over every function; with batch-mode functions, `live_cost_usd` is what the whole
    /// script would cost live.
    pub fn total(&self) -> FunctionEstimate {
        let batched = self.totals.iter().any(|f| f.batch_files.is_some());
        let mut t = FunctionEstimate {
            cost_usd: Some(0.0),
            live_cost_usd: batched.then_some(0.0),
            ..Default::default()
        };
        for f in &self.totals {
            t.add(&FunctionEstimate {
                live_cost_usd: f.live_cost_usd.or(f.cost_usd),
                ..f.clone()
            });
        }
        t
    }

    /// The estimate as JSON (`sluice explain --json`).
    pub fn to_json(&self) -> Value {
        json!({
            "statements": self.statements.iter().map(|s| json!({
                "index": s.index, "line": s.line, "summary": s.summary, "plan": s.plan,
                "stages": s.stages,
                "rows": s.rows, "note": s.note,
                "functions": s.functions.iter().map(FunctionEstimate::to_json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "functions": self.totals.iter().map(FunctionEstimate::to_json).collect::<Vec<_>>(),
            "total": self.total().to_json(),
            "tokenizers": self.tokenizers,
            "unpriced_models": self.unpriced,
            "extrapolated": self.extrapolated,
        })
    }
}

/// Counters of every function so far: (calls, cached, requests, tokens in, tokens out, tokens
/// in cached).
type Counters = BTreeMap<String, [u64; 6]>;

impl Engine {
    fn function_counters(&self) -> Counters {
        self.live_metrics()
            .functions()
            .into_iter()
            .map(|(name, f)| {
                let c = [
                    f.prompts.load(Ordering::Relaxed),
                    f.cache_hits.load(Ordering::Relaxed),
                    f.requests.load(Ordering::Relaxed),
                    f.tokens_in.load(Ordering::Relaxed),
                    f.tokens_out.load(Ordering::Relaxed),
                    f.tokens_cached.load(Ordering::Relaxed),
                ];
                (name, c)
            })
            .collect()
    }

    /// Estimates every statement of `sql` (see the module documentation), costed at the models'
    /// prices. Stops at the first statement that fails to plan or run.
    pub async fn explain_script(
        &self,
        sql: &str,
        origin: &str,
    ) -> Result<Explanation, StatementError> {
        self.explain_rows(sql, origin, None).await
    }

    /// Runs every statement of `sql` for real (models called, answers cached) on the first
    /// `rows` rows of each external table, writing nothing: what `explain --sample` measures.
    pub async fn sample_script(
        &self,
        sql: &str,
        origin: &str,
        rows: usize,
    ) -> Result<Explanation, StatementError> {
        self.explain_rows(sql, origin, Some(rows)).await
    }

    async fn explain_rows(
        &self,
        sql: &str,
        origin: &str,
        sample: Option<usize>,
    ) -> Result<Explanation, StatementError> {
        let mut out = Explanation {
            tokenizers: self.token_counters().clone(),
            ..Default::default()
        };
        let mut copy_targets: BTreeMap<String, (usize, SchemaRef)> = BTreeMap::new();
        let mut totals: BTreeMap<String, FunctionEstimate> = BTreeMap::new();
        for (i, stmt) in split_statements(sql).into_iter().enumerate() {
            let before = self.function_counters();
            let cascades_before = cascade_estimate::counters(&self.live_metrics());
            let mut est = StatementEstimate {
                index: i + 1,
                line: stmt.line,
                summary: summary(&stmt.text),
                ..Default::default()
            };
            let explained = self
                .explain_statement(&stmt.text, &mut est, &mut copy_targets, sample)
                .await;
            if let Err(e) = explained {
                return Err(self.statement_error(origin, i + 1, &stmt, e).await);
            }
            let cascades_after = cascade_estimate::counters(&self.live_metrics());
            for (name, after) in self.function_counters() {
                let b = before.get(&name).copied().unwrap_or_default();
                let d: Vec<u64> = after.iter().zip(b).map(|(a, b)| a - b).collect();
                if d.iter().all(|v| *v == 0) {
                    continue;
                }
                let model = self
                    .function(&name)
                    .map_or_else(String::new, |f| f.model.clone());
                let prices = self.runtime.models.get(&model).and_then(|m| m.prices);
                if prices.is_none() && !out.unpriced.contains(&model) {
                    out.unpriced.push(model.clone());
                }
                let mut f = FunctionEstimate {
                    function: name.clone(),
                    model,
                    calls: d[0],
                    cached: d[1],
                    requests: d[2],
                    tokens_in: d[3],
                    tokens_out: d[4],
                    tokens_cached: d[5],
                    cost_usd: prices.map(|p| p.cost_cached(d[3], d[5], d[4])),
                    rows_per_prompt: self
                        .function(&name)
                        .and_then(|f| f.kind.packing())
                        .map(|p| crate::llm::dispatch::Packer::rows(p.as_ref())),
                    ..Default::default()
                };
                self.add_batch_estimate(&mut f);
                self.cascade_estimate(&mut f, (&cascades_before, &cascades_after), &mut out);
                totals
                    .entry(name)
                    .or_insert_with(|| FunctionEstimate {
                        function: f.function.clone(),
                        model: f.model.clone(),
                        cost_usd: f.cost_usd.map(|_| 0.0),
                        live_cost_usd: f.live_cost_usd.map(|_| 0.0),
                        rows_per_prompt: f.rows_per_prompt,
                        ..Default::default()
                    })
                    .add(&f);
                est.functions.push(f);
            }
            out.statements.push(est);
        }
        out.totals = totals.into_values().collect();
        Ok(out)
    }

    async fn explain_statement(
        &self,
        text: &str,
        est: &mut StatementEstimate,
        copy_targets: &mut BTreeMap<String, (usize, SchemaRef)>,
        sample: Option<usize>,
    ) -> Result<(), DataFusionError> {
        match parse_one(text)? {
            Statement::CreateExternalTable(cet) => {
                let name = cet.name.to_string();
                let written_by = cet
                    .locations
                    .iter()
                    .find_map(|l| copy_targets.get(&target_key(l)));
                if let Some((index, schema)) = written_by {
                    let table = MemTable::try_new(schema.clone(), vec![vec![]])?;
                    self.ctx
                        .register_table(cet.name.to_string().as_str(), Arc::new(table))?;
                    est.note = Some(format!(
                        "reads what statement {index} writes; explain writes nothing, so this \
                         table is empty here"
                    ));
                    return Ok(());
                }
                let mut sink = std::io::sink();
                self.run_statement(text, &RunOptions::default(), &mut sink)
                    .await?;
                if let Some(n) = sample {
                    self.keep_first_rows(&name, n).await?;
                    est.note = Some(format!("sampled: its first {n} rows"));
                }
                Ok(())
            }
            other => self.explain_planned(other, est, copy_targets).await,
        }
    }

    /// Any statement but an external table: definitions run as in a real run; what a query,
    /// COPY or INSERT reads is run (its LLM calls answered by placeholders) and counted.
    async fn explain_planned(
        &self,
        statement: Statement,
        est: &mut StatementEstimate,
        copy_targets: &mut BTreeMap<String, (usize, SchemaRef)>,
    ) -> Result<(), DataFusionError> {
        let state = self.ctx.state();
        let plan = state.statement_to_plan(statement).await?;
        let optimized = |p: &LogicalPlan| {
            state
                .optimize(p)
                .map(|o| o.display_indent().to_string())
                .ok()
        };
        let (source, written) = match &plan {
            LogicalPlan::Copy(c) => {
                copy_targets.insert(
                    target_key(&c.output_url),
                    (est.index, c.input.schema().inner().clone()),
                );
                est.note = Some(format!("writes {} (not written by explain)", c.output_url));
                (Some(c.input.as_ref().clone()), true)
            }
            LogicalPlan::Dml(d) => {
                est.note = Some(format!(
                    "writes into {} (not written by explain)",
                    d.table_name
                ));
                (Some(d.input.as_ref().clone()), true)
            }
            LogicalPlan::Ddl(DdlStatement::CreateView(v)) => {
                est.plan = optimized(&v.input);
                (None, false)
            }
            LogicalPlan::Ddl(_) | LogicalPlan::Statement(_) => (None, false),
            query => (Some(query.clone()), false),
        };
        let Some(source) = source else {
            // Definitions (views, CREATE TABLE AS, DROP, SET): run as in a real run.
            if let LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(t)) = &plan {
                est.plan = optimized(&t.input);
            }
            self.ctx.execute_logical_plan(plan).await?.collect().await?;
            return Ok(());
        };
        est.plan = optimized(if written { &plan } else { &source });
        est.stages = self.stages(if written { &plan } else { &source }).await?;
        let mut stream = self
            .ctx
            .execute_logical_plan(source)
            .await?
            .execute_stream()
            .await?;
        let mut rows = 0u64;
        while let Some(batch) = stream.next().await {
            rows += batch?.num_rows() as u64;
        }
        est.rows = Some(rows);
        Ok(())
    }
}

impl Engine {
    /// With a cascade: each model's rows and cost in `f` (between the counters `before` and
    /// `after`), the function's cost their sum, and models without prices named in `out`.
    fn cascade_estimate(
        &self,
        f: &mut FunctionEstimate,
        (before, after): (&cascade_estimate::Counters, &cascade_estimate::Counters),
        out: &mut Explanation,
    ) {
        let prices = |m: &str| self.runtime.models.get(m).and_then(|h| h.prices);
        f.cascade = cascade_estimate::delta(before, after, &f.function, |m| prices(m).is_some());
        if f.cascade.is_empty() {
            return;
        }
        f.cost_usd = f.cascade.iter().map(|s| s.cost_usd).sum::<Option<f64>>();
        for s in &f.cascade {
            if prices(&s.model).is_none() && !out.unpriced.contains(&s.model) {
                out.unpriced.push(s.model.clone());
            }
        }
    }

    /// Replaces table `name` by its first `n` rows.
    async fn keep_first_rows(&self, name: &str, n: usize) -> Result<(), DataFusionError> {
        let df = self.ctx.table(name).await?.limit(0, Some(n))?;
        let schema = df.schema().inner().clone();
        let batches = df.collect().await?;
        self.ctx.deregister_table(name)?;
        let table = MemTable::try_new(schema, vec![batches])?;
        self.ctx.register_table(name, Arc::new(table))?;
        Ok(())
    }

    /// Puts the completion tokens measured on a sample (`sample`, from [`Engine::sample_script`]
    /// over the first `rows` rows) in place of the schema's estimates: each function's
    /// requests times the mean completion tokens per request it measured, costed again.
    pub fn extrapolate(&self, full: &mut Explanation, sample: &Explanation, rows: usize) {
        let per_request: BTreeMap<&str, f64> = sample
            .totals
            .iter()
            .filter(|f| f.requests > 0)
            .map(|f| (f.function.as_str(), f.tokens_out as f64 / f.requests as f64))
            .collect();
        let rescale = |f: &mut FunctionEstimate| {
            if let Some(mean) = per_request.get(f.function.as_str()) {
                f.tokens_out = (f.requests as f64 * mean).round() as u64;
                let prices = self.runtime.models.get(&f.model).and_then(|m| m.prices);
                f.cost_usd =
                    prices.map(|p| p.cost_cached(f.tokens_in, f.tokens_cached, f.tokens_out));
                self.add_batch_estimate(f);
            }
        };
        full.totals.iter_mut().for_each(rescale);
        for st in &mut full.statements {
            st.functions.iter_mut().for_each(rescale);
        }
        // A cascade's later models are asked the share of rows the sample measured.
        let shares: BTreeMap<&str, Vec<f64>> = sample
            .totals
            .iter()
            .filter_map(|f| Some((f.function.as_str(), cascade_estimate::shares(&f.cascade)?)))
            .collect();
        let scale = |f: &mut FunctionEstimate| {
            if let Some(shares) = shares.get(f.function.as_str()) {
                let (factor, cost) = cascade_estimate::scale(&mut f.cascade, shares);
                for n in [&mut f.requests, &mut f.tokens_in, &mut f.tokens_out] {
                    *n = (*n as f64 * factor).round() as u64;
                }
                f.tokens_cached = (f.tokens_cached as f64 * factor).round() as u64;
                f.cost_usd = cost;
            }
        };
        full.totals.iter_mut().for_each(scale);
        for st in &mut full.statements {
            st.functions.iter_mut().for_each(scale);
        }
        let means: Vec<String> = per_request
            .iter()
            .map(|(f, m)| format!("{f} {m:.1} tokens per request"))
            .collect();
        let unmeasured: Vec<&str> = full
            .totals
            .iter()
            .filter(|f| !per_request.contains_key(f.function.as_str()))
            .map(|f| f.function.as_str())
            .collect();
        let mut how = format!(
            "from a real run on the first {rows} rows of each table (measured: {})",
            if means.is_empty() {
                "nothing sent".to_string()
            } else {
                means.join(", ")
            }
        );
        if !unmeasured.is_empty() {
            how.push_str(&format!(
                "; not measured, so estimated from the schema: {}",
                unmeasured.join(", ")
            ));
        }
        full.extrapolated = Some(how);
    }
}

/// A location as COPY and CREATE EXTERNAL TABLE spell it, made comparable.
fn target_key(location: &str) -> String {
    location
        .trim_start_matches("file://")
        .trim_start_matches("./")
        .trim_end_matches('/')
        .to_string()
}
