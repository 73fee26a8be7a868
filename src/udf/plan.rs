//! Planning: lift every distinct LLM call into an [`LlmNode`] below the node that uses it.
//!
//! DataFusion plans LLM function calls wherever SQL allows an expression: projections, filters,
//! GROUP BY keys, ORDER BY, window arguments, nested calls, subqueries. Evaluating them in place
//! would call the model once per *reference* (and DataFusion's async UDF support covers only some
//! of those positions). [`LiftLlmCalls`] rewrites each plan node that contains calls:
//!
//! ```text
//! Sort: f(x)                      Projection: t.x            (restores the node's schema)
//!   TableScan: t          =>        Sort: __sluice_llm_1
//!                                     LlmNode: __sluice_llm_1 := f(t.x)
//!                                       TableScan: t
//! ```
//!
//! Identical calls in one node (`f(x)`, `f(x)['a']`, `f_error(x)`) share one lifted column, and
//! nested calls (`f(g(x))`) become stacked nodes, innermost first. The rule runs after
//! DataFusion's own optimizer rules have seen the (volatile) placeholders, so no rule later inlines
//! the call into several places.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, Result, plan_err};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{
    Expr, Extension, LogicalPlan, LogicalPlanBuilder, Projection, Sort, Unnest,
};
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};
use datafusion::scalar::ScalarValue;

use super::def::{FunctionDef, GENERIC_LLM};
use super::face::{Face, LlmUdf};
pub use super::node::{LLM_COLUMN_PREFIX, LlmCall, LlmNode};
use super::node::{as_llm_call, contains_llm_call};

/// The call identity (function + arguments) of an LLM expression, with `llm`'s model argument split off.
fn call_identity(u: &LlmUdf, args: &[Expr]) -> Result<CallId> {
    if u.def.name == GENERIC_LLM && args.len() == 2 {
        let model = match &args[1] {
            Expr::Literal(ScalarValue::Utf8(Some(m)), _)
            | Expr::Literal(ScalarValue::LargeUtf8(Some(m)), _)
            | Expr::Literal(ScalarValue::Utf8View(Some(m)), _) => m.clone(),
            other => {
                return plan_err!(
                    "the second argument of llm() must be a model name as a string literal \
                     (a [models.NAME] of sluice.toml), got {other}"
                );
            }
        };
        return Ok((u.def.name.clone(), vec![args[0].clone()], Some(model)));
    }
    Ok((u.def.name.clone(), args.to_vec(), None))
}

/// The optimizer rule that lifts LLM calls. Register it after DataFusion's rules
/// (`SessionStateBuilder::with_optimizer_rule` appends).
#[derive(Debug, Default)]
pub struct LiftLlmCalls;

impl OptimizerRule for LiftLlmCalls {
    fn name(&self) -> &str {
        "lift_llm_calls"
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let lifted = plan
            .transform_up_with_subqueries(super::aggregate::rewrite_llm_aggregates)?
            .transform_data(|p| p.transform_down_with_subqueries(sort_before_calls))?
            .transform_data(|p| p.transform_up_with_subqueries(|n| lift_node(n, config)))?;
        Ok(Transformed::new(
            lifted.data,
            lifted.transformed,
            TreeNodeRecursion::Continue,
        ))
    }
}

/// `Sort(Projection)` where the projection calls a model but no sort key depends on a call
/// becomes `Projection(Sort)`: the rows are ordered (and, with a fetch, cut to the TopK) before
/// any call, so `SELECT x, f(x) FROM t ORDER BY x LIMIT 5` makes 5 calls, not one per row.
fn sort_before_calls(node: LogicalPlan) -> Result<Transformed<LogicalPlan>> {
    let LogicalPlan::Sort(sort) = &node else {
        return Ok(Transformed::no(node));
    };
    let LogicalPlan::Projection(projection) = sort.input.as_ref() else {
        return Ok(Transformed::no(node));
    };
    if !projection.expr.iter().any(contains_llm_call) {
        return Ok(Transformed::no(node));
    }
    // What each output column of the projection is, over the projection's input.
    let meaning: HashMap<Column, &Expr> = projection
        .schema
        .columns()
        .into_iter()
        .zip(&projection.expr)
        .collect();
    let mut keys = Vec::with_capacity(sort.expr.len());
    for key in &sort.expr {
        let over_input = key
            .expr
            .clone()
            .transform(|e| match &e {
                Expr::Column(c) => match meaning.get(c) {
                    Some(m) => Ok(Transformed::yes((*m).clone().unalias_nested().data)),
                    None => Ok(Transformed::no(e)),
                },
                _ => Ok(Transformed::no(e)),
            })?
            .data;
        let movable = !contains_llm_call(&over_input)
            && !over_input.exists(|e| {
                Ok(matches!(
                    e,
                    Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_)
                ))
            })?;
        if !movable {
            return Ok(Transformed::no(node));
        }
        keys.push(key.with_expr(over_input));
    }
    let ordered = LogicalPlan::Sort(Sort {
        expr: keys,
        input: projection.input.clone(),
        fetch: sort.fetch,
    });
    let moved = Projection::try_new_with_schema(
        projection.expr.clone(),
        Arc::new(ordered),
        projection.schema.clone(),
    )?;
    Ok(Transformed::yes(LogicalPlan::Projection(moved)))
}

/// A call's identity: function name, arguments, and the model named in SQL (for `llm`).
type CallId = (String, Vec<Expr>, Option<String>);

/// Distinct calls of one node.
struct Collected {
    /// (identity, def) per distinct call, in discovery order.
    calls: Vec<(CallId, Arc<FunctionDef>)>,
}

impl Collected {
    fn find(&self, id: &CallId) -> Option<usize> {
        self.calls.iter().position(|(i, _)| i == id)
    }
}

/// The name of the first LLM function called in `exprs` (for messages).
fn first_function(exprs: &[Expr]) -> String {
    exprs
        .iter()
        .find_map(|e| {
            let mut found = None;
            let _ = e.apply(|x| {
                if let Some(c) = as_llm_call(x) {
                    found = Some(c.0.def.name.clone());
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            });
            found
        })
        .unwrap_or_default()
}

fn lift_node(node: LogicalPlan, config: &dyn OptimizerConfig) -> Result<Transformed<LogicalPlan>> {
    if let LogicalPlan::Unnest(u) = &node {
        return preserve_failed_rows_in_unnest(u).map(|changed| match changed {
            Some(plan) => Transformed::yes(plan),
            None => Transformed::no(node),
        });
    }
    if let LogicalPlan::Limit(_) = &node {
        return Ok(limit_before_calls(node));
    }
    if let LogicalPlan::Join(join) = &node
        && let Some(lifted) =
            super::join::lift_join_condition(join, |filter| lift_node(filter, config))?
    {
        return Ok(Transformed::yes(lifted));
    }
    let exprs = node.expressions();
    if !exprs.iter().any(contains_llm_call) {
        return Ok(Transformed::no(node));
    }
    match &node {
        LogicalPlan::Projection(_)
        | LogicalPlan::Filter(_)
        | LogicalPlan::Aggregate(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Window(_) => {}
        other => {
            return plan_err!(
                "LLM function {}() cannot be evaluated inside {}; compute it in a subquery or \
                 CTE and refer to the result",
                first_function(&exprs),
                other.display()
            );
        }
    }
    let inputs = node.inputs();
    if inputs.len() != 1 {
        return plan_err!(
            "LLM calls in a node with {} inputs are not supported",
            inputs.len()
        );
    }
    let input = inputs[0].clone();

    // Collect distinct calls and their nesting depth.
    let mut collected = Collected { calls: vec![] };
    let mut depth: Vec<usize> = vec![];
    for e in &exprs {
        collect_calls(e, &mut collected, &mut depth)?;
    }
    let names: Vec<ColumnNames> = collected
        .calls
        .iter()
        .map(|_| {
            let v = config.alias_generator().next(LLM_COLUMN_PREFIX);
            let e = format!("{v}_error");
            let m = format!("{v}_model");
            (v, e, m)
        })
        .collect();
    let below = stack_llm_nodes(input, &collected, &depth, &names)?;
    rewrite_over(node, exprs, below, &collected, &names).map(Transformed::yes)
}

/// `Limit(LlmNode(x))` becomes `LlmNode(Limit(x))`, through every stacked node: an LLM node keeps
/// its input's rows and their order, so the rows an OFFSET skips are never sent to the model.
fn limit_before_calls(node: LogicalPlan) -> Transformed<LogicalPlan> {
    let LogicalPlan::Limit(limit) = &node else {
        return Transformed::no(node);
    };
    let LogicalPlan::Extension(ext) = limit.input.as_ref() else {
        return Transformed::no(node);
    };
    let Some(llm) = ext.node.as_any().downcast_ref::<LlmNode>() else {
        return Transformed::no(node);
    };
    let mut sunk = limit.clone();
    sunk.input = Arc::new(llm.input.clone());
    let below = limit_before_calls(LogicalPlan::Limit(sunk)).data;
    let moved = llm.over(below);
    Transformed::yes(LogicalPlan::Extension(Extension {
        node: Arc::new(moved),
    }))
}

/// One [`LlmNode`] per nesting level over `input`, innermost first.
fn stack_llm_nodes(
    mut current: LogicalPlan,
    collected: &Collected,
    depth: &[usize],
    names: &[ColumnNames],
) -> Result<LogicalPlan> {
    let max_depth = depth.iter().copied().max().unwrap_or(0);
    for level in 1..=max_depth {
        let mut calls = vec![];
        let mut defs = vec![];
        for (i, ((function, args, model), def)) in collected.calls.iter().enumerate() {
            if depth[i] != level {
                continue;
            }
            let args = args
                .iter()
                .map(|a| replace_calls(a.clone(), collected, names))
                .collect::<Result<Vec<_>>>()?;
            calls.push(LlmCall {
                function: function.clone(),
                args,
                model: model.clone(),
                value_name: names[i].0.clone(),
                error_name: names[i].1.clone(),
                model_name: names[i].2.clone(),
            });
            defs.push(def.clone());
        }
        current = LogicalPlan::Extension(Extension {
            node: Arc::new(LlmNode::try_new(current, calls, defs)?),
        });
    }
    Ok(current)
}

/// `node` over `below`, its expressions reading the lifted columns (output names kept), and
/// projected back to its own schema when it passes its input's columns through.
fn rewrite_over(
    node: LogicalPlan,
    exprs: Vec<Expr>,
    below: LogicalPlan,
    collected: &Collected,
    names: &[ColumnNames],
) -> Result<LogicalPlan> {
    let original_schema = node.schema().clone();
    let preserver = NamePreserver::new(&node);
    let new_exprs = exprs
        .into_iter()
        .map(|e| {
            let saved = preserver.save(&e);
            Ok(saved.restore(replace_calls(e, collected, names)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let rewritten = node.with_new_exprs(new_exprs, vec![below])?;
    if rewritten.schema().fields().len() == original_schema.fields().len() {
        return Ok(rewritten);
    }
    let cols: Vec<Expr> = original_schema
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    LogicalPlanBuilder::from(rewritten).project(cols)?.build()
}

/// Records the distinct calls in `e` (post-order, so arguments come first) with their depth.
fn collect_calls(e: &Expr, out: &mut Collected, depth: &mut Vec<usize>) -> Result<usize> {
    // Depth of the deepest call in e (0 if none).
    let mut max_child = 0;
    let own = as_llm_call(e);
    let children: Vec<&Expr> = match own {
        Some((_, args)) => args.iter().collect(),
        None => {
            let mut v = vec![];
            e.apply_children(|c| {
                v.push(c);
                Ok(TreeNodeRecursion::Continue)
            })?;
            v
        }
    };
    for c in children {
        max_child = max_child.max(collect_calls(c, out, depth)?);
    }
    let Some((u, args)) = own else {
        return Ok(max_child);
    };
    let id = call_identity(u, args)?;
    let d = max_child + 1;
    match out.find(&id) {
        Some(i) => depth[i] = depth[i].max(d),
        None => {
            out.calls.push((id, u.def.clone()));
            depth.push(d);
        }
    }
    Ok(d)
}

/// The lifted columns of one call: its value, its error and the model that answered.
type ColumnNames = (String, String, String);

/// Replaces every LLM call in `e` by the column holding its value, error or model.
fn replace_calls(e: Expr, calls: &Collected, names: &[ColumnNames]) -> Result<Expr> {
    e.transform_down(|x| {
        let Some((u, args)) = as_llm_call(&x) else {
            return Ok(Transformed::no(x));
        };
        let id = call_identity(u, args)?;
        let Some(i) = calls.find(&id) else {
            return plan_err!("internal: LLM call {x} was not collected");
        };
        let name = match u.face {
            Face::Value => &names[i].0,
            Face::Error => &names[i].1,
            Face::Model => &names[i].2,
        };
        Ok(Transformed::new(
            Expr::Column(Column::from_name(name)),
            true,
            TreeNodeRecursion::Jump,
        ))
    })
    .map(|t| t.data)
}

/// SQL's UNNEST drops rows whose list is NULL. A NULL produced by a failed LLM call must not lose
/// the row, so unnesting a lifted LLM column keeps such rows (with NULL).
fn preserve_failed_rows_in_unnest(u: &Unnest) -> Result<Option<LogicalPlan>> {
    if u.options.preserve_nulls() {
        return Ok(None);
    }
    let LogicalPlan::Projection(Projection { expr, .. }) = u.input.as_ref() else {
        return Ok(None);
    };
    let from_llm = u.exec_columns.iter().any(|col| {
        let Ok(idx) = u.input.schema().index_of_column(col) else {
            return false;
        };
        matches!(expr.get(idx).map(|e| e.clone().unalias_nested().data),
            Some(Expr::Column(c)) if c.name.starts_with(LLM_COLUMN_PREFIX))
    });
    if !from_llm {
        return Ok(None);
    }
    let mut kept = u.clone();
    kept.options = kept.options.with_preserve_nulls(true);
    Ok(Some(LogicalPlan::Unnest(kept)))
}
