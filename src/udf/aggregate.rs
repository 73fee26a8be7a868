//! Aggregate LLM functions (`kind = "aggregate"`): `summarize_call(passage ORDER BY idx)` in a
//! `GROUP BY` query. DataFusion has no async aggregates, so the call is planned as the group's
//! values collected in order (`array_agg(... ORDER BY ...)`), then an ordinary lifted call over
//! the collected list — which works with `HAVING`, in views and wherever a group's row goes.
//!
//! A group whose prompt would not fit `max_input_tokens` is reduced hierarchically: as many
//! values as fit go in each call, then the partial results are folded with the `reduce`
//! template (which sees them as `partials`) until one remains. Every partial call is cached
//! and retried like any call; a group whose partial call fails gets NULL and its typed error.
//! A single value that does not fit alone is an error, never a truncated prompt.

use std::any::Any;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::tree_node::Transformed;
use datafusion::common::{Column, Result, exec_err};
use datafusion::logical_expr::expr::{AggregateFunction, AggregateFunctionParams, ScalarFunction};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::{
    Accumulator, Aggregate, AggregateUDF, AggregateUDFImpl, Expr, LogicalPlan, Projection,
    ScalarUDF, Signature, Volatility,
};

use super::def::FunctionDef;
use super::face::{ERROR_TYPE, Face, LlmUdf, value_type};
use super::node::LLM_COLUMN_PREFIX;
use super::reduce::Reduce;
use super::values::to_template_values;

/// The SQL aggregate of one face of an aggregate function; it is never run: the planner
/// replaces it by the collected list and a lifted call.
#[derive(Debug)]
pub(crate) struct LlmAggregate {
    def: Arc<FunctionDef>,
    face: Face,
    name: String,
    signature: Signature,
}

impl PartialEq for LlmAggregate {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && Arc::ptr_eq(&self.def, &other.def)
    }
}
impl Eq for LlmAggregate {}
impl Hash for LlmAggregate {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl LlmAggregate {
    /// `name(...)` and `name_error(...)` of an aggregate function.
    pub fn pair(def: Arc<FunctionDef>) -> [AggregateUDF; 2] {
        let signature = Signature::any(def.args.len(), Volatility::Volatile);
        [Face::Value, Face::Error].map(|face| {
            let name = face.sql_name(&def);
            AggregateUDF::new_from_impl(LlmAggregate {
                def: def.clone(),
                face,
                name,
                signature: signature.clone(),
            })
        })
    }
}

impl AggregateUDFImpl for LlmAggregate {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(match self.face {
            Face::Value => value_type(&self.def),
            Face::Error => ERROR_TYPE.clone(),
            Face::Model => DataType::Utf8,
        })
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        exec_err!(
            "{}() was not planned as an LLM aggregate (it works in GROUP BY queries)",
            self.name
        )
    }

    fn state_fields(&self, _args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(&self.name, DataType::Null, true))])
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        AggregateOrderSensitivity::HardRequirement
    }
}

/// `Aggregate` with LLM aggregates becomes `Projection(Aggregate)`: each becomes
/// `array_agg(first argument ORDER BY ...)` in the aggregate, and the projection calls the
/// function's scalar face over that list (with the constant arguments) under the same name.
pub(super) fn rewrite_llm_aggregates(node: LogicalPlan) -> Result<Transformed<LogicalPlan>> {
    let LogicalPlan::Aggregate(agg) = &node else {
        return Ok(Transformed::no(node));
    };
    let mut calls = Vec::new();
    let mut aggr = Vec::with_capacity(agg.aggr_expr.len());
    for e in &agg.aggr_expr {
        let name = e.schema_name().to_string();
        let (Expr::AggregateFunction(f), alias) = (e.clone().unalias_nested().data, name.clone())
        else {
            aggr.push(e.clone());
            continue;
        };
        let inner: &dyn Any = f.func.inner().as_ref();
        let Some(llm) = inner.downcast_ref::<LlmAggregate>() else {
            aggr.push(e.clone());
            continue;
        };
        let AggregateFunctionParams {
            args,
            distinct,
            filter,
            order_by,
            null_treatment,
        } = f.params.clone();
        let list = Expr::AggregateFunction(AggregateFunction::new_udf(
            datafusion::functions_aggregate::array_agg::array_agg_udaf(),
            vec![args[0].clone()],
            distinct,
            filter,
            order_by,
            null_treatment,
        ));
        // The list goes under a name of its own: were it the call's, a rule that moves an
        // expression over the call (`summ(x)['title']`) could take the list for the value.
        let list_name = format!("{LLM_COLUMN_PREFIX}_values_{}", calls.len() + 1);
        aggr.push(list.alias(&list_name));
        let face = ScalarUDF::new_from_impl(LlmUdf::face(llm.def.clone(), llm.face));
        calls.push((list_name, alias, face, args[1..].to_vec()));
    }
    if calls.is_empty() {
        return Ok(Transformed::no(node));
    }
    let collected = Aggregate::try_new(agg.input.clone(), agg.group_expr.clone(), aggr)?;
    let schema = collected.schema.clone();
    let exprs = schema
        .iter()
        .map(|(q, field)| {
            let col = Expr::Column(Column::from((q, field)));
            match calls.iter().find(|(list, ..)| list == field.name()) {
                Some((_, name, face, consts)) => {
                    let mut args = vec![col];
                    args.extend(consts.iter().cloned());
                    Expr::ScalarFunction(ScalarFunction::new_udf(Arc::new(face.clone()), args))
                        .alias(name)
                }
                None => col,
            }
        })
        .collect();
    let projection = Projection::try_new(exprs, Arc::new(LogicalPlan::Aggregate(collected)))?;
    Ok(Transformed::yes(LogicalPlan::Projection(projection)))
}

/// The rows of `rendered` whose prompt is over the budget get the result of their reduction
/// tree (as their "no call" result, so the slice takes it as it is).
pub(super) async fn reduce_oversized(
    def: &FunctionDef,
    budget: Reduce,
    caller: &crate::llm::dispatch::FunctionCaller,
    arrays: &[datafusion::arrow::array::ArrayRef],
    rendered: &mut [std::result::Result<
        crate::types::RenderedPrompt,
        crate::llm::dispatch::CallResult,
    >],
    progress: &std::sync::atomic::AtomicUsize,
) {
    let over: Vec<usize> = (0..rendered.len())
        .filter(
            |&i| matches!(&rendered[i], Ok(p) if caller.prompt_tokens(p) > budget.max_input_tokens),
        )
        .collect();
    if over.is_empty() {
        return;
    }
    let columns: Vec<Vec<Option<minijinja::Value>>> =
        arrays.iter().map(to_template_values).collect();
    let trees = over.iter().map(|&row| {
        let args: Vec<minijinja::Value> = columns
            .iter()
            .map(|c| c[row].clone().unwrap_or_default())
            .collect();
        reduce_row(def, budget, caller, args, progress)
    });
    for (row, result) in over.iter().zip(futures::future::join_all(trees).await) {
        rendered[*row] = Err(result);
    }
}

/// The values of a list in chunks whose prompts (by `render`) fit the budget, each with its
/// prompt; a value that does not fit alone is an error.
fn chunks(
    values: Vec<minijinja::Value>,
    (budget, caller): (u64, &crate::llm::dispatch::FunctionCaller),
    render: &dyn Fn(
        Vec<minijinja::Value>,
    ) -> std::result::Result<crate::types::RenderedPrompt, String>,
) -> std::result::Result<Vec<crate::types::RenderedPrompt>, String> {
    let mut out = Vec::new();
    let mut current: Vec<minijinja::Value> = Vec::new();
    let mut fitted: Option<crate::types::RenderedPrompt> = None;
    for v in values {
        current.push(v);
        let mut p = render(current.clone())?;
        let mut tokens = caller.prompt_tokens(&p);
        if tokens > budget && current.len() > 1 {
            // The chunk so far is full: it goes, and the value starts the next one.
            out.extend(fitted.take());
            current.drain(..current.len() - 1);
            p = render(current.clone())?;
            tokens = caller.prompt_tokens(&p);
        }
        if tokens > budget {
            return Err(format!(
                "one value of the group has {tokens} prompt tokens alone, over max_input_tokens \
                 = {budget}; no call was made"
            ));
        }
        fitted = Some(p);
    }
    out.extend(fitted);
    Ok(out)
}

/// One group's value through its reduction tree: leaf calls over chunks of its values, then
/// reduce calls over chunks of partial results until one remains.
async fn reduce_row(
    def: &FunctionDef,
    budget: Reduce,
    caller: &crate::llm::dispatch::FunctionCaller,
    args: Vec<minijinja::Value>,
    progress: &std::sync::atomic::AtomicUsize,
) -> crate::llm::dispatch::CallResult {
    use crate::types::{ErrorKind, RowError};
    let fail = |m: String| Err(Arc::new(RowError::without_call(ErrorKind::Template, m)));
    let consts = args[1..].to_vec();
    let values: Vec<minijinja::Value> = match args[0].try_iter() {
        Ok(it) => it.collect(),
        Err(e) => return fail(format!("the aggregated values are not a list: {e}")),
    };
    let leaf = |chunk: Vec<minijinja::Value>| {
        let mut a = vec![minijinja::Value::from(chunk)];
        a.extend(consts.iter().cloned());
        def.render(&a)
    };
    let system = leaf(Vec::new()).ok().and_then(|p| p.system);
    let reduce = |chunk: Vec<minijinja::Value>| {
        let user = def.render_reduce(&consts, chunk)?;
        Ok(crate::types::RenderedPrompt {
            system: system.clone(),
            user,
            cuts: Default::default(),
        })
    };
    let limit = (budget.max_input_tokens, caller);
    let mut prompts = match chunks(values, limit, &leaf) {
        Ok(p) => p,
        Err(m) => return fail(m),
    };
    loop {
        let n = prompts.len();
        let mut results = Vec::with_capacity(n);
        for r in caller.call_all(prompts, progress).await {
            results.push(r?);
        }
        if n == 1 {
            return Ok(results.swap_remove(0));
        }
        let partials = results
            .iter()
            .map(|v| minijinja::Value::from_serialize(&**v))
            .collect();
        prompts = match chunks(partials, limit, &reduce) {
            Ok(p) if p.len() < n => p,
            Ok(_) => {
                return fail(format!(
                    "two partial results do not fit max_input_tokens = {} together; raise it",
                    budget.max_input_tokens
                ));
            }
            Err(m) => return fail(m),
        };
    }
}
