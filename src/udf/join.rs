//! LLM conditions in joins: `a JOIN b ON a.k = b.k AND same_topic(a.x, b.y)`, or a pure
//! `ON same_topic(a.x, b.y)` (and a `WHERE` over a cross join, which DataFusion moves into the
//! join's condition). The condition's other parts — the equality keys and any plain predicate —
//! stay in the join and are applied first; the LLM parts become a filter over its output, so
//! the model is called once per surviving pair, lifted like any call. The lifted node is marked
//! as a join condition: it counts the pairs before making any call and refuses more than
//! `[execution] max_join_calls`.

use std::sync::Arc;

use datafusion::common::Result;
use datafusion::common::plan_err;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::logical_expr::utils::{conjunction, split_conjunction_owned};
use datafusion::logical_expr::{Extension, Filter, Join, JoinType, LogicalPlan};

use super::node::{LlmNode, contains_llm_call};

/// `join` with its LLM condition parts moved into a filter above it (then lifted by `lift`), or
/// `None` when its condition calls no model.
pub(super) fn lift_join_condition(
    join: &Join,
    lift: impl FnOnce(LogicalPlan) -> Result<Transformed<LogicalPlan>>,
) -> Result<Option<LogicalPlan>> {
    let keyed = join
        .on
        .iter()
        .any(|(l, r)| contains_llm_call(l) || contains_llm_call(r));
    if keyed {
        return plan_err!(
            "an LLM function cannot be a join key; compute it in a subquery or CTE and join on \
             the result"
        );
    }
    let Some(filter) = join.filter.clone().filter(contains_llm_call) else {
        return Ok(None);
    };
    if join.join_type != JoinType::Inner {
        return plan_err!(
            "an LLM condition in the ON of a {} JOIN is not supported (only INNER JOIN): for an \
             outer join, compute the condition over the inner join's pairs in a subquery and \
             join its result",
            join.join_type
        );
    }
    let (calls, plain): (Vec<_>, Vec<_>) = split_conjunction_owned(filter)
        .into_iter()
        .partition(contains_llm_call);
    let pairs = Arc::new(LogicalPlan::Join(Join {
        filter: conjunction(plain),
        ..join.clone()
    }));
    let Some(condition) = conjunction(calls) else {
        return Ok(None);
    };
    let filtered = LogicalPlan::Filter(Filter::try_new(condition, pairs.clone())?);
    let lifted = lift(filtered)?.data;
    // The nodes whose calls run on the join's pairs count them first.
    let marked = lifted.transform_up(|node| {
        let LogicalPlan::Extension(ext) = &node else {
            return Ok(Transformed::no(node));
        };
        match ext.node.as_any().downcast_ref::<LlmNode>() {
            Some(n) if n.input == *pairs => {
                let mut gated = n.clone();
                gated.join_condition = true;
                Ok(Transformed::yes(LogicalPlan::Extension(Extension {
                    node: Arc::new(gated),
                })))
            }
            _ => Ok(Transformed::no(node)),
        }
    })?;
    Ok(Some(marked.data))
}

/// `input` (the pairs of a join) read to its end before any row goes on: more than `max` rows
/// is an error that says how many and the setting, before any call of `functions`.
pub(super) fn count_pairs_first(
    mut input: datafusion::execution::SendableRecordBatchStream,
    max: u64,
    functions: String,
) -> datafusion::execution::SendableRecordBatchStream {
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
    use futures::{StreamExt, TryStreamExt};
    let schema = input.schema();
    let counted = async move {
        let (mut batches, mut pairs) = (Vec::new(), 0u64);
        while let Some(batch) = input.next().await {
            let batch = batch?;
            pairs += batch.num_rows() as u64;
            if pairs <= max {
                batches.push(batch);
            } else {
                batches.clear();
            }
        }
        if pairs > max {
            return datafusion::common::exec_err!(
                "the join condition calling {functions} would make {pairs} LLM calls (one per \
                 pair the join's other conditions keep), more than [execution] max_join_calls = \
                 {max} in sluice.toml; no call was made. Narrow the join with an equality or a \
                 plain condition, or raise max_join_calls"
            );
        }
        Ok(futures::stream::iter(batches.into_iter().map(Ok)))
    };
    Box::pin(RecordBatchStreamAdapter::new(
        schema,
        futures::stream::once(counted).try_flatten(),
    ))
}
