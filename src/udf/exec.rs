//! Execution: [`LlmPlanner`] turns each [`LlmNode`] into an [`LlmExec`], which appends every
//! call's value and error columns to the rows of its input through the dispatcher (one
//! [`LlmStream`] per partition).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Result, plan_err};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::context::TaskContext;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{LogicalPlan, UserDefinedLogicalNode};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};

use super::call::resolve_cascade;
pub use super::call::{LlmRuntime, PhysicalCall};
use super::node::LlmNode;
use super::slice::SliceContext;
use super::stream::LlmStream;
use crate::llm::Dispatcher;
use crate::llm::dispatch::Packer;

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
            let embedding = def.kind.is_embedding();
            let cascade = match call.model {
                Some(_) => Vec::new(),
                None => resolve_cascade(def, &self.runtime.models).map_err(plan_error)?,
            };
            calls.push(Arc::new(PhysicalCall {
                def: def.clone(),
                model: model.for_kind(embedding),
                model_name: model_name.to_string(),
                embedding,
                args,
                cascade,
            }));
        }
        let schema: SchemaRef = Arc::new(node.schema().as_arrow().clone());
        let gate = node.join_condition.then_some(self.runtime.max_join_calls);
        let mut input = physical_inputs[0].clone();
        if gate.is_some() && input.output_partitioning().partition_count() > 1 {
            // The pairs are counted in one stream, before any call.
            input = Arc::new(
                datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec::new(input),
            );
        }
        Ok(Some(Arc::new(
            LlmExec::new(input, calls, schema, self.runtime.dispatcher.clone()).gated(gate),
        )))
    }
}

/// A planning error saying `message`.
fn plan_error(message: String) -> datafusion::common::DataFusionError {
    datafusion::common::DataFusionError::Plan(message)
}

/// Appends each call's value, error and model columns to every input row.
#[derive(Debug)]
pub struct LlmExec {
    input: Arc<dyn ExecutionPlan>,
    calls: Vec<Arc<PhysicalCall>>,
    schema: SchemaRef,
    dispatcher: Dispatcher,
    properties: Arc<PlanProperties>,
    /// Over a join: the most rows it may call for (counted before any call).
    gate: Option<u64>,
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
            gate: None,
        }
    }

    /// Calls for at most `max` rows, counted over the whole input before any call (the rows of
    /// a join).
    pub fn gated(mut self, max: Option<u64>) -> Self {
        self.gate = max;
        self
    }

    /// Its calls.
    pub(crate) fn calls(&self) -> &[Arc<PhysicalCall>] {
        &self.calls
    }

    /// The most rows it may call for, over a join.
    pub(crate) fn gate(&self) -> Option<u64> {
        self.gate
    }
}

impl DisplayAs for LlmExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let names: Vec<&str> = self.calls.iter().map(|c| c.def.name.as_str()).collect();
        write!(f, "LlmExec: calls=[{}]", names.join(", "))?;
        if let Some(max) = self.gate {
            write!(f, ", join condition (at most {max} pairs)")?;
        }
        Ok(())
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

    /// Each partition's rows come out in their input order (the stream's slices are emitted
    /// in order), so a sort below the lifted calls holds above them: without this, DataFusion
    /// drops that sort as one nothing above needs.
    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
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
        Ok(Arc::new(
            LlmExec::new(
                children.swap_remove(0),
                self.calls.clone(),
                self.schema.clone(),
                self.dispatcher.clone(),
            )
            .gated(self.gate),
        ))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let mut input = self.input.execute(partition, context)?;
        if let Some(max) = self.gate {
            let names: Vec<String> = self
                .calls
                .iter()
                .map(|c| format!("{}()", c.def.name))
                .collect();
            input = super::join::count_pairs_first(input, max, names.join(", "));
        }
        let concurrency = self.dispatcher.config().concurrency;
        let callers = self
            .calls
            .iter()
            .map(|c| super::cascade::stages(&self.dispatcher, c))
            .collect();
        let ctx = SliceContext {
            calls: self.calls.clone(),
            callers,
            schema: self.schema.clone(),
        };
        // A batch-mode model answers a file at a time: keep a file's worth of rows waiting.
        let batch = self
            .calls
            .iter()
            .filter_map(|c| c.model.batch.as_ref().map(|q| q.max_requests()))
            .max();
        let (slice_rows, unfinished) = match batch {
            Some(n) => (1024, n.max(1024)),
            None => (concurrency.clamp(16, 1024), 2 * concurrency + 16),
        };
        // A packed function (`rows_per_prompt = N`) packs the rows of one slice: slices of a
        // multiple of N leave no request short of rows but the last.
        let pack = self
            .calls
            .iter()
            .filter_map(|c| c.def.kind.packing().map(|p| p.rows()))
            .max()
            .unwrap_or(1);
        let slice_rows = slice_rows.max(pack).div_ceil(pack) * pack;
        let unfinished = unfinished.max(2 * slice_rows);
        Ok(Box::pin(LlmStream::new(
            input,
            ctx,
            slice_rows,
            unfinished,
            pack > 1,
        )))
    }
}
