//! A field of a NULL struct is NULL. DataFusion's `get_field` (which `s['x']`, `s.x` and
//! `get_field(s, 'x')` all plan to) returns the struct's child column as it is; where the struct
//! is NULL, the child holds whatever its writer put there — for a non-nullable child read from
//! Parquet, an empty string or a zero, so `answer_error['kind'] IS NOT NULL` held on every row of
//! sluice's own output. [`NullSafeGetField`] is `get_field` with the nulls of every struct on
//! the path applied to the result; [`NullSafeFields`] puts it in place of the built-in one in
//! every plan, and the session registers it under the built-in's name (so a plan decoded on a
//! worker finds it too).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, make_array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ExpressionPlacement, LogicalPlan, ReturnFieldArgs,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use datafusion::optimizer::AnalyzerRule;

/// `get_field`, whose result is NULL wherever a struct on its path is NULL.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct NullSafeGetField {
    inner: ScalarUDF,
}

impl NullSafeGetField {
    /// The function, under the built-in's name.
    pub(crate) fn udf() -> ScalarUDF {
        ScalarUDF::new_from_impl(NullSafeGetField {
            inner: datafusion::functions::core::get_field().as_ref().clone(),
        })
    }

    /// Whether `udf` is the built-in `get_field` (not this one).
    fn is_builtin(udf: &ScalarUDF) -> bool {
        udf.name() == "get_field" && !udf.inner().is::<Self>()
    }
}

/// `expr` with every built-in `get_field` call replaced by [`NullSafeGetField`].
fn null_safe(expr: Expr, udf: &Arc<ScalarUDF>) -> Result<Transformed<Expr>> {
    expr.transform_up(|e| match e {
        Expr::ScalarFunction(ScalarFunction { func, args })
            if NullSafeGetField::is_builtin(&func) =>
        {
            Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction {
                func: Arc::clone(udf),
                args,
            })))
        }
        other => Ok(Transformed::no(other)),
    })
}

/// The nulls of every struct on the path `names` from `base` (the last name's parent
/// included), or `None` when the path leaves structs or nothing on it is NULL.
fn path_nulls(base: &ArrayRef, names: &[ColumnarValue]) -> Option<NullBuffer> {
    let mut current = Arc::clone(base);
    let mut nulls = current.logical_nulls();
    for (i, name) in names.iter().enumerate() {
        if !matches!(current.data_type(), DataType::Struct(_)) {
            return None;
        }
        if i + 1 == names.len() {
            break;
        }
        let ColumnarValue::Scalar(name) = name else {
            return None;
        };
        let name = name.try_as_str().flatten()?;
        current = Arc::clone(current.as_struct().column_by_name(name)?);
        nulls = NullBuffer::union(nulls.as_ref(), current.logical_nulls().as_ref());
    }
    nulls
}

/// `array` with `nulls` added to its own.
fn with_nulls(array: ArrayRef, nulls: &NullBuffer) -> Result<ArrayRef> {
    if matches!(
        array.data_type(),
        DataType::Null | DataType::Union(..) | DataType::RunEndEncoded(..)
    ) {
        return Ok(array);
    }
    let merged = NullBuffer::union(Some(nulls), array.logical_nulls().as_ref());
    let data = array.to_data().into_builder().nulls(merged).build()?;
    Ok(make_array(data))
}

impl ScalarUDFImpl for NullSafeGetField {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let base = args.args.first().cloned();
        let scalar = matches!(base, Some(ColumnarValue::Scalar(_)));
        let names = args.args.get(1..).map(<[_]>::to_vec).unwrap_or_default();
        let result = self.inner.invoke_with_args(args)?;
        let Some(base) = base else {
            return Ok(result);
        };
        let base = base.to_array(rows)?;
        match path_nulls(&base, &names) {
            None => Ok(result),
            Some(nulls) => {
                let array = with_nulls(result.to_array(rows)?, &nulls)?;
                if scalar {
                    // A scalar struct's field stays a scalar.
                    return Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(
                        &array, 0,
                    )?));
                }
                Ok(ColumnarValue::Array(array))
            }
        }
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        let udf = Arc::new(NullSafeGetField::udf());
        Ok(match self.inner.simplify(args, info)? {
            ExprSimplifyResult::Simplified(e) => {
                ExprSimplifyResult::Simplified(null_safe(e, &udf)?.data)
            }
            original => original,
        })
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn placement(&self, args: &[ExpressionPlacement]) -> ExpressionPlacement {
        self.inner.placement(args)
    }
}

/// Puts [`NullSafeGetField`] in place of the built-in `get_field` in every expression of a
/// plan (its subqueries included), once, before the optimizer.
#[derive(Debug, Default)]
pub(crate) struct NullSafeFields;

impl AnalyzerRule for NullSafeFields {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        let udf = Arc::new(NullSafeGetField::udf());
        plan.transform_up_with_subqueries(|node| node.map_expressions(|e| null_safe(e, &udf)))
            .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "null_safe_fields"
    }
}
