//! Execution: [`LlmExec`] evaluates an [`LlmNode`]'s calls for every row through the dispatcher.
//!
//! There is no batch barrier: input batches are cut into slices, each slice's rows are submitted
//! as soon as it is read, and the stream keeps reading ahead while earlier slices still have rows
//! in flight (slow responses, retries in backoff), so the global budget stays full. Output order
//! within a partition is the input order.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, StringArray};
use datafusion::arrow::array::{ArrayRef, StringBuilder, StructArray, UInt16Array, UInt32Array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::Session;
use datafusion::common::runtime::SpawnedTask;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::execution::context::TaskContext;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{LogicalPlan, UserDefinedLogicalNode};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};
use futures::{FutureExt, Stream, StreamExt};
use minijinja::Value as JinjaValue;
use serde_json::Value;

use super::def::{FunctionDef, OnError, RenderedPrompt};
use super::plan::LlmNode;
use super::values::{StrColumn, to_template_values};
use super::{ERROR_TYPE, value_type};
use crate::cache::{KeyPrefix, RequestKey};
use crate::llm::dispatcher::{CallResult, FunctionMetrics, ModelHandle};
use crate::llm::{Dispatcher, ErrorKind, LlmRequest, RowError};

/// What LLM execution needs from the session: the dispatcher and the configured models.
#[derive(Debug, Clone)]
pub struct LlmRuntime {
    /// The shared scheduler.
    pub dispatcher: Dispatcher,
    /// Models by name (`[models.NAME]` in sluice.toml).
    pub models: BTreeMap<String, ModelHandle>,
}

/// One call of an [`LlmExec`], resolved for execution.
#[derive(Debug)]
pub struct PhysicalCall {
    /// The function.
    pub def: Arc<FunctionDef>,
    /// The model it runs on.
    pub model: ModelHandle,
    /// Argument expressions over the input batch.
    pub args: Vec<Arc<dyn PhysicalExpr>>,
}

/// Plans [`LlmNode`]s into [`LlmExec`]s.
#[derive(Debug)]
pub struct LlmPlanner {
    /// Runtime handed to every planned node.
    pub runtime: Arc<LlmRuntime>,
}

#[async_trait]
impl ExtensionPlanner for LlmPlanner {
    async fn plan_extension(
        &self,
        planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        session: &dyn Session,
        planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<LlmNode>() else {
            return Ok(None);
        };
        let input_schema = logical_inputs[0].schema();
        let mut calls = Vec::with_capacity(node.calls.len());
        for (call, def) in node.calls.iter().zip(&node.defs) {
            let model_name = call.model.as_deref().unwrap_or(&def.model);
            let Some(model) = self.runtime.models.get(model_name) else {
                let known: Vec<&str> = self.runtime.models.keys().map(String::as_str).collect();
                return plan_err!(
                    "{}() ({}) uses model {model_name:?}, which sluice.toml does not define; \
                     add a [models.{model_name}] table (defined: [{}])",
                    call.function,
                    def.source.display(),
                    known.join(", ")
                );
            };
            let args = call
                .args
                .iter()
                .map(|a| planner.create_physical_expr(a, input_schema, session, planning_ctx))
                .collect::<Result<Vec<_>>>()?;
            calls.push(Arc::new(PhysicalCall {
                def: def.clone(),
                model: model.clone(),
                args,
            }));
        }
        let schema: SchemaRef = Arc::new(node.schema().as_arrow().clone());
        Ok(Some(Arc::new(LlmExec::new(
            physical_inputs[0].clone(),
            calls,
            schema,
            self.runtime.dispatcher.clone(),
        ))))
    }
}

/// Appends each call's value and error columns to every input row.
#[derive(Debug)]
pub struct LlmExec {
    input: Arc<dyn ExecutionPlan>,
    calls: Vec<Arc<PhysicalCall>>,
    schema: SchemaRef,
    dispatcher: Dispatcher,
    properties: Arc<PlanProperties>,
}

impl LlmExec {
    /// Builds the node.
    pub fn new(
        input: Arc<dyn ExecutionPlan>,
        calls: Vec<Arc<PhysicalCall>>,
        schema: SchemaRef,
        dispatcher: Dispatcher,
    ) -> Self {
        // Input columns keep their positions, so the input's orderings and partitioning hold.
        let mut eq = EquivalenceProperties::new(schema.clone());
        if let Some(ordering) = input.output_ordering() {
            eq.add_orderings(std::iter::once(ordering.iter().cloned()));
        }
        let properties = Arc::new(PlanProperties::new(
            eq,
            input.output_partitioning().clone(),
            input.pipeline_behavior(),
            input.boundedness(),
        ));
        LlmExec {
            input,
            calls,
            schema,
            dispatcher,
            properties,
        }
    }
}

impl DisplayAs for LlmExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let names: Vec<&str> = self.calls.iter().map(|c| c.def.name.as_str()).collect();
        write!(f, "LlmExec: calls=[{}]", names.join(", "))
    }
}

impl ExecutionPlan for LlmExec {
    fn name(&self) -> &str {
        "LlmExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        let mut rec = TreeNodeRecursion::Continue;
        for c in &self.calls {
            for a in &c.args {
                rec = f(a)?;
                if rec == TreeNodeRecursion::Stop {
                    return Ok(rec);
                }
            }
        }
        Ok(rec)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(LlmExec::new(
            children.swap_remove(0),
            self.calls.clone(),
            self.schema.clone(),
            self.dispatcher.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let concurrency = self.dispatcher.config().concurrency;
        let functions: Vec<Arc<FunctionMetrics>> = self
            .calls
            .iter()
            .map(|c| self.dispatcher.metrics().function(&c.def.name))
            .collect();
        for f in &functions {
            f.open_inputs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Box::pin(LlmStream {
            input: Some(input),
            pending: VecDeque::new(),
            slice_rows: concurrency.clamp(16, 1024),
            unfinished_limit: 2 * concurrency + 16,
            buffered_limit: 64,
            leftover: None,
            shared: Arc::new(Shared {
                calls: self.calls.clone(),
                schema: self.schema.clone(),
                dispatcher: self.dispatcher.clone(),
                functions,
            }),
        }))
    }
}

struct Shared {
    calls: Vec<Arc<PhysicalCall>>,
    schema: SchemaRef,
    dispatcher: Dispatcher,
    /// Counters of each call's function, in the order of `calls`; `open_inputs` counts the
    /// stream until its input ends.
    functions: Vec<Arc<FunctionMetrics>>,
}

struct Slot {
    rows: usize,
    /// (row, call) pairs of this slice that have their result.
    finished_calls: Arc<AtomicUsize>,
    task: Option<SpawnedTask<Result<RecordBatch>>>,
    done: Option<Result<RecordBatch>>,
}

struct LlmStream {
    input: Option<SendableRecordBatchStream>,
    pending: VecDeque<Slot>,
    slice_rows: usize,
    unfinished_limit: usize,
    buffered_limit: usize,
    /// Rest of an input batch not yet submitted.
    leftover: Option<RecordBatch>,
    shared: Arc<Shared>,
}

impl Drop for LlmStream {
    fn drop(&mut self) {
        self.close_input();
    }
}

impl LlmStream {
    /// The input is exhausted (or abandoned): the functions' row totals are final for it.
    fn close_input(&mut self) {
        if self.input.take().is_some() {
            for f in &self.shared.functions {
                f.open_inputs.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Rows whose calls are still running. A slice waiting on a few slow rows (a retry in
    /// backoff) counts only those rows, so later slices keep the budget full meanwhile.
    fn unfinished_rows(&self) -> usize {
        let calls = self.shared.calls.len().max(1);
        self.pending
            .iter()
            .filter(|s| s.done.is_none())
            .map(|s| {
                let open =
                    s.rows * calls - s.finished_calls.load(Ordering::Relaxed).min(s.rows * calls);
                open.div_ceil(calls)
            })
            .sum()
    }

    fn submit(&mut self, batch: RecordBatch) {
        let shared = self.shared.clone();
        let rows = batch.num_rows();
        for f in &self.shared.functions {
            f.rows_queued.fetch_add(rows as u64, Ordering::Relaxed);
        }
        let finished_calls = Arc::new(AtomicUsize::new(0));
        let progress = finished_calls.clone();
        let task =
            SpawnedTask::spawn(async move { process_batch(&shared, batch, &progress).await });
        self.pending.push_back(Slot {
            rows,
            finished_calls,
            task: Some(task),
            done: None,
        });
    }

    fn poll_tasks(&mut self, cx: &mut Context<'_>) {
        for slot in self.pending.iter_mut() {
            if let Some(task) = slot.task.as_mut()
                && let Poll::Ready(res) = task.poll_unpin(cx)
            {
                slot.done = Some(match res {
                    Ok(r) => r,
                    Err(join) => Err(DataFusionError::External(Box::new(join))),
                });
                slot.task = None;
            }
        }
    }
}

impl Stream for LlmStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            this.poll_tasks(cx);
            // A slice failed the statement: submit nothing more, and let the requests already
            // on the wire finish (their responses reach the cache) before reporting it.
            if let Some(i) = this
                .pending
                .iter()
                .position(|s| matches!(s.done, Some(Err(_))))
            {
                if this.pending.iter().any(|s| s.task.is_some()) {
                    return Poll::Pending;
                }
                let slot = this.pending.remove(i).expect("failed slot");
                this.pending.clear();
                this.close_input();
                this.leftover = None;
                return Poll::Ready(slot.done);
            }
            // Emit the front slot as soon as it is complete.
            if this.pending.front().is_some_and(|s| s.done.is_some()) {
                let slot = this.pending.pop_front().expect("front exists");
                return Poll::Ready(slot.done);
            }
            // Read ahead while the budget has room.
            let room = this.unfinished_rows() < this.unfinished_limit
                && this.pending.len() < this.buffered_limit;
            if !room {
                return Poll::Pending;
            }
            if let Some(batch) = this.leftover.take() {
                let n = this.slice_rows.min(batch.num_rows());
                if n < batch.num_rows() {
                    this.leftover = Some(batch.slice(n, batch.num_rows() - n));
                }
                this.submit(batch.slice(0, n));
                continue;
            }
            let Some(input) = this.input.as_mut() else {
                return if this.pending.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                };
            };
            match input.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(batch))) => {
                    if batch.num_rows() > 0 {
                        this.leftover = Some(batch);
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.close_input(),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl RecordBatchStream for LlmStream {
    fn schema(&self) -> SchemaRef {
        self.shared.schema.clone()
    }
}

fn no_call_error(kind: ErrorKind, message: String) -> CallResult {
    Err(Arc::new(RowError {
        kind,
        message,
        attempts: 0,
        http_status: None,
        finish_reason: None,
    }))
}

/// Each row's prompt, or the result of a row that cannot be called (a NULL argument, a template
/// error). Plain templates over string columns render straight from the Arrow buffers.
fn render_rows(
    def: &FunctionDef,
    arrays: &[ArrayRef],
    n: usize,
) -> Vec<std::result::Result<RenderedPrompt, CallResult>> {
    let null_arg = |i: usize| {
        no_call_error(
            ErrorKind::NullInput,
            format!("argument {:?} is NULL; no call was made", def.args[i]),
        )
    };
    let mut prompts = Vec::with_capacity(n);
    let plain = def.plain_templates().and_then(|plain| {
        let strs: Option<Vec<StrColumn>> = arrays.iter().map(StrColumn::of).collect();
        Some((plain, strs?))
    });
    if let Some((plain, strs)) = plain {
        let mut values: Vec<&str> = Vec::with_capacity(strs.len());
        'rows: for row in 0..n {
            values.clear();
            for (i, col) in strs.iter().enumerate() {
                match col.get(row) {
                    Some(v) => values.push(v),
                    None => {
                        prompts.push(Err(null_arg(i)));
                        continue 'rows;
                    }
                }
            }
            prompts.push(Ok(plain.render(&values)));
        }
    } else {
        let columns: Vec<Vec<Option<JinjaValue>>> = arrays.iter().map(to_template_values).collect();
        let mut values = Vec::with_capacity(columns.len());
        'rows: for row in 0..n {
            values.clear();
            for (i, col) in columns.iter().enumerate() {
                match &col[row] {
                    Some(v) => values.push(v.clone()),
                    None => {
                        prompts.push(Err(null_arg(i)));
                        continue 'rows;
                    }
                }
            }
            prompts.push(
                def.render(&values)
                    .map_err(|e| no_call_error(ErrorKind::Template, e)),
            );
        }
    }
    prompts
}

async fn run_call(
    shared: &Shared,
    call: &PhysicalCall,
    fm: &Arc<FunctionMetrics>,
    batch: &RecordBatch,
    progress: &AtomicUsize,
) -> Result<Vec<CallResult>> {
    let n = batch.num_rows();
    let arrays: Vec<ArrayRef> = call
        .args
        .iter()
        .map(|e| e.evaluate(batch)?.into_array(n))
        .collect::<Result<_>>()?;
    let def = &call.def;
    let schema = def.output.clone().map(Arc::new);
    let prefix = KeyPrefix::new(
        &call.model.provider.endpoint(),
        def.max_tokens,
        def.temperature,
        schema.as_deref(),
    );
    // Render every row's prompt (rows that cannot be called get their error now), then answer
    // what the cache holds in one read, and send the rest.
    let prompts = render_rows(def, &arrays, n);
    drop(arrays);
    let keys = prefix.keys(prompts.iter().filter_map(|p| p.as_ref().ok()));
    let mut results: Vec<Option<CallResult>> = Vec::with_capacity(n);
    let mut to_call: Vec<(usize, RenderedPrompt, RequestKey)> = Vec::with_capacity(keys.len());
    let mut next_key = keys.iter();
    for (row, prompt) in prompts.into_iter().enumerate() {
        match prompt {
            Ok(prompt) => {
                let key = *next_key.next().expect("a key per prompt");
                to_call.push((row, prompt, key));
                results.push(None);
            }
            Err(no_call) => results.push(Some(no_call)),
        }
    }
    let cached = shared.dispatcher.from_cache(fm, &keys);
    let sends = to_call
        .into_iter()
        .zip(cached)
        .filter_map(|((row, prompt, key), hit)| match hit {
            Some(value) => {
                results[row] = Some(Ok(value));
                None
            }
            None => Some((row, prompt, key)),
        })
        .collect::<Vec<_>>();
    let answered = n - sends.len();
    progress.fetch_add(answered, Ordering::Relaxed);
    fm.rows_finished
        .fetch_add(answered as u64, Ordering::Relaxed);
    let sent = sends.into_iter().map(|(row, prompt, key)| {
        let req = LlmRequest {
            function: def.name.clone(),
            prompt,
            max_tokens: def.max_tokens,
            temperature: def.temperature,
            schema: schema.clone(),
        };
        async move {
            let r = shared
                .dispatcher
                .call_uncached(&call.model, req, key, fm.clone())
                .await;
            progress.fetch_add(1, Ordering::Relaxed);
            fm.rows_finished.fetch_add(1, Ordering::Relaxed);
            (row, r)
        }
    });
    for (row, r) in futures::future::join_all(sent).await {
        results[row] = Some(r);
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every row has its result"))
        .collect())
}

async fn process_batch(
    shared: &Shared,
    batch: RecordBatch,
    progress: &AtomicUsize,
) -> Result<RecordBatch> {
    let per_call = futures::future::try_join_all(
        shared
            .calls
            .iter()
            .zip(&shared.functions)
            .map(|(c, fm)| run_call(shared, c, fm, &batch, progress)),
    )
    .await?;
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    for (call, results) in shared.calls.iter().zip(per_call) {
        let def = &call.def;
        // Any systemic failure (the model is unreachable, refuses the key, ...) fails the
        // statement, whichever rows it hit first; so does any failed row under on_error = "fail".
        let mut errors = results.iter().filter_map(|r| r.as_ref().err());
        if let Some(e) = errors.clone().find(|e| e.kind.is_systemic()) {
            return Err(DataFusionError::Execution(format!(
                "{}(): model {:?} failed: {e}",
                def.name,
                call.model.provider.endpoint()
            )));
        }
        if def.on_error == OnError::Fail
            && let Some(e) = errors.find(|e| e.kind != ErrorKind::NullInput)
        {
            return Err(DataFusionError::Execution(format!(
                "{}() failed for a row (on_error = \"fail\" in {}): {e}",
                def.name,
                def.source.display()
            )));
        }
        columns.push(value_array(def, &results)?);
        columns.push(error_array(&results));
    }
    Ok(RecordBatch::try_new(shared.schema.clone(), columns)?)
}

fn value_array(def: &FunctionDef, results: &[CallResult]) -> Result<ArrayRef> {
    match &def.output {
        Some(schema) => {
            let values: Vec<Option<&Value>> = results
                .iter()
                .map(|r| r.as_ref().ok().map(|v| v.as_ref()))
                .collect();
            schema.to_array(&values).map_err(|e| {
                DataFusionError::Execution(format!(
                    "{}(): cannot convert responses to {}: {e}",
                    def.name,
                    value_type(def)
                ))
            })
        }
        None => {
            let arr: StringArray = results
                .iter()
                .map(|r| r.as_ref().ok().and_then(|v| v.as_str().map(str::to_string)))
                .collect();
            Ok(Arc::new(arr))
        }
    }
}

fn error_array(results: &[CallResult]) -> ArrayRef {
    let n = results.len();
    let mut kind = StringBuilder::with_capacity(n, n * 8);
    let mut message = StringBuilder::with_capacity(n, n * 32);
    let mut attempts = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut finish = StringBuilder::with_capacity(n, n);
    let mut valid = Vec::with_capacity(n);
    for r in results {
        match r {
            Ok(_) => {
                // Children are NULL too, so `e['kind']` of a success is NULL, not "".
                kind.append_null();
                message.append_null();
                attempts.push(None);
                status.push(None);
                finish.append_null();
                valid.push(false);
            }
            Err(e) => {
                kind.append_value(e.kind.as_str());
                message.append_value(&e.message);
                attempts.push(Some(e.attempts));
                status.push(e.http_status);
                finish.append_option(e.finish_reason.as_deref());
                valid.push(true);
            }
        }
    }
    let DataType::Struct(fields) = ERROR_TYPE.clone() else {
        unreachable!("ERROR_TYPE is a struct")
    };
    let arrays: Vec<ArrayRef> = vec![
        Arc::new(kind.finish()),
        Arc::new(message.finish()),
        Arc::new(UInt32Array::from(attempts)),
        Arc::new(UInt16Array::from(status)),
        Arc::new(finish.finish()),
    ];
    let nulls = NullBuffer::from(valid);
    let arr = StructArray::new(fields, arrays, Some(nulls));
    debug_assert_eq!(arr.len(), n);
    Arc::new(arr)
}
