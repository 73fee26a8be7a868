//! The logical node of lifted LLM calls ([`LlmNode`]): its input's rows with, for each call, a
//! value column, an error column and the name of the model that answered.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::TreeNode;
use datafusion::common::{DFSchema, DFSchemaRef, Result};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{Expr, LogicalPlan, UserDefinedLogicalNodeCore};

use super::def::FunctionDef;
use super::face::{ERROR_TYPE, LlmUdf, value_type};

/// Prefix of the columns that hold lifted call results.
pub const LLM_COLUMN_PREFIX: &str = "__sluice_llm";

/// One lifted call: a function applied to argument expressions, producing a value column and an
/// error column.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub struct LlmCall {
    /// The function's SQL name.
    pub function: String,
    /// Argument expressions (over the node's input).
    pub args: Vec<Expr>,
    /// For `llm(prompt, 'model')`: the model named in SQL.
    pub model: Option<String>,
    /// Output column with the value.
    pub value_name: String,
    /// Output column with the error struct.
    pub error_name: String,
    /// Output column with the name of the model that answered.
    pub model_name: String,
}

/// A logical node that appends, for each call, its value and error columns to its input's rows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LlmNode {
    /// The rows the calls are evaluated on.
    pub input: LogicalPlan,
    /// The calls, evaluated independently per row.
    pub calls: Vec<LlmCall>,
    /// Definitions of the called functions, in `calls` order.
    pub defs: Vec<Arc<FunctionDef>>,
    /// Its calls are a join's condition over the join's pairs: it counts them before any call
    /// (`[execution] max_join_calls`).
    pub join_condition: bool,
    schema: DFSchemaRef,
}

impl PartialOrd for LlmNode {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        match self.calls.partial_cmp(&other.calls) {
            Some(std::cmp::Ordering::Equal) => self.input.partial_cmp(&other.input),
            o => o,
        }
    }
}

impl LlmNode {
    /// Builds the node and its schema (input columns, then value, error and model per call).
    pub fn try_new(
        input: LogicalPlan,
        calls: Vec<LlmCall>,
        defs: Vec<Arc<FunctionDef>>,
    ) -> Result<Self> {
        let mut fields = Vec::with_capacity(calls.len() * 3);
        for (call, def) in calls.iter().zip(&defs) {
            fields.push((
                None,
                Arc::new(datafusion::arrow::datatypes::Field::new(
                    &call.value_name,
                    value_type(def),
                    true,
                )),
            ));
            fields.push((
                None,
                Arc::new(datafusion::arrow::datatypes::Field::new(
                    &call.error_name,
                    ERROR_TYPE.clone(),
                    true,
                )),
            ));
            fields.push((
                None,
                Arc::new(datafusion::arrow::datatypes::Field::new(
                    &call.model_name,
                    datafusion::arrow::datatypes::DataType::Utf8,
                    true,
                )),
            ));
        }
        let added = DFSchema::new_with_metadata(fields, Default::default())?;
        let schema = Arc::new(input.schema().join(&added)?);
        Ok(LlmNode {
            input,
            calls,
            defs,
            join_condition: false,
            schema,
        })
    }
}

impl LlmNode {
    /// The same calls over `input`, which has the schema of the node's input (a limit moved
    /// below the node).
    pub(super) fn over(&self, input: LogicalPlan) -> LlmNode {
        LlmNode {
            input,
            ..self.clone()
        }
    }
}

impl UserDefinedLogicalNodeCore for LlmNode {
    fn name(&self) -> &str {
        "LlmNode"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        self.calls.iter().flat_map(|c| c.args.clone()).collect()
    }

    fn prevent_predicate_push_down_columns(&self) -> HashSet<String> {
        self.calls
            .iter()
            .flat_map(|c| {
                [
                    c.value_name.clone(),
                    c.error_name.clone(),
                    c.model_name.clone(),
                ]
            })
            .collect()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "LlmNode: ")?;
        for (i, c) in self.calls.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            let args: Vec<String> = c.args.iter().map(|a| a.to_string()).collect();
            write!(f, "{} := {}({})", c.value_name, c.function, args.join(", "))?;
        }
        if self.join_condition {
            write!(f, " (join condition)")?;
        }
        Ok(())
    }

    fn with_exprs_and_inputs(
        &self,
        exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        let mut exprs = exprs.into_iter();
        let calls = self
            .calls
            .iter()
            .map(|c| LlmCall {
                args: exprs.by_ref().take(c.args.len()).collect(),
                ..c.clone()
            })
            .collect();
        let node = LlmNode::try_new(inputs.swap_remove(0), calls, self.defs.clone())?;
        Ok(LlmNode {
            join_condition: self.join_condition,
            ..node
        })
    }

    fn necessary_children_exprs(&self, output_columns: &[usize]) -> Option<Vec<Vec<usize>>> {
        let input_len = self.input.schema().fields().len();
        let mut needed: Vec<usize> = output_columns
            .iter()
            .copied()
            .filter(|i| *i < input_len)
            .collect();
        for c in &self.calls {
            for a in &c.args {
                for col in a.column_refs() {
                    needed.push(self.input.schema().index_of_column(col).ok()?);
                }
            }
        }
        needed.sort_unstable();
        needed.dedup();
        Some(vec![needed])
    }

    fn supports_limit_pushdown(&self) -> bool {
        true
    }
}

/// What a scalar function expression is, if it is an LLM call.
pub(super) fn as_llm_call(e: &Expr) -> Option<(&LlmUdf, &[Expr])> {
    match e {
        Expr::ScalarFunction(ScalarFunction { func, args }) => {
            LlmUdf::from_udf(func).map(|u| (u, args.as_slice()))
        }
        _ => None,
    }
}

pub(super) fn contains_llm_call(e: &Expr) -> bool {
    e.exists(|e| Ok(as_llm_call(e).is_some())).unwrap_or(false)
}
