//! On a worker: the plan's leaves (the scans of its byte ranges) wrapped so that an error
//! reading an input says which worker met it (the coordinator only sees the message).

use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;

/// A leaf whose errors are prefixed with the worker's name.
#[derive(Debug)]
pub(super) struct Named {
    inner: Arc<dyn ExecutionPlan>,
    who: Arc<str>,
}

/// Wraps every leaf of `plan` in [`Named`].
pub(super) fn name_leaves(
    plan: Arc<dyn ExecutionPlan>,
    who: &Arc<str>,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|p| {
        if !p.children().is_empty() || p.is::<Named>() {
            return Ok(Transformed::no(p));
        }
        Ok(Transformed::yes(Arc::new(Named {
            inner: p,
            who: who.clone(),
        }) as Arc<dyn ExecutionPlan>))
    })
    .map(|t| t.data)
}

impl DisplayAs for Named {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        self.inner.fmt_as(t, f)
    }
}

/// `e`, said by worker `who`.
fn said_by(who: &str, e: DataFusionError) -> DataFusionError {
    DataFusionError::Context(who.to_string(), Box::new(e))
}

impl ExecutionPlan for Named {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.inner.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.inner.apply_expressions(f)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let stream = self
            .inner
            .execute(partition, context)
            .map_err(|e| said_by(&self.who, e))?;
        let schema = stream.schema();
        let who = self.who.clone();
        let named = stream.map(move |r| r.map_err(|e| said_by(&who, e)));
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, named)))
    }
}
