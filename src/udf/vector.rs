//! `cosine_similarity(a, b)` and `l2_distance(a, b)`: SQL functions over vectors (the
//! `FixedSizeList<Float32>` an embedding function returns, or any list of numbers), usable in
//! `ORDER BY ... LIMIT`, joins and filters. NULL where either vector is NULL (or, for cosine,
//! has no length); vectors of different lengths are an error naming both lengths.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type};
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// Which measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Measure {
    Cosine,
    L2,
}

/// One of the two vector functions.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct VectorFn {
    measure: Measure,
    signature: Signature,
}

impl VectorFn {
    /// `cosine_similarity` and `l2_distance`.
    pub fn udfs() -> [ScalarUDF; 2] {
        [Measure::Cosine, Measure::L2].map(|measure| {
            ScalarUDF::new_from_impl(VectorFn {
                measure,
                signature: Signature::user_defined(Volatility::Immutable),
            })
        })
    }
}

fn float_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Float64, true)))
}

fn is_numeric_list(t: &DataType) -> bool {
    match t {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            f.data_type().is_numeric() || f.data_type() == &DataType::Null
        }
        DataType::Null => true,
        _ => false,
    }
}

fn measure(m: Measure, a: &[f64], b: &[f64]) -> Option<f64> {
    match m {
        Measure::Cosine => {
            let (mut dot, mut na, mut nb) = (0.0, 0.0, 0.0);
            for (x, y) in a.iter().zip(b) {
                dot += x * y;
                na += x * x;
                nb += y * y;
            }
            (na > 0.0 && nb > 0.0).then(|| dot / (na.sqrt() * nb.sqrt()))
        }
        Measure::L2 => Some(
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f64>()
                .sqrt(),
        ),
    }
}

impl ScalarUDFImpl for VectorFn {
    fn name(&self) -> &str {
        match self.measure {
            Measure::Cosine => "cosine_similarity",
            Measure::L2 => "l2_distance",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if arg_types.len() != 2 || !arg_types.iter().all(is_numeric_list) {
            return plan_err!(
                "{}(a, b) takes two vectors (lists of numbers, such as an embedding function's \
                 value), got ({})",
                self.name(),
                arg_types
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(vec![float_list(), float_list()])
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let arrays: Vec<ArrayRef> = args
            .args
            .iter()
            .map(|a| a.to_array(n))
            .collect::<Result<_>>()?;
        let (a, b) = (arrays[0].as_list::<i32>(), arrays[1].as_list::<i32>());
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            if a.is_null(i) || b.is_null(i) {
                out.push(None);
                continue;
            }
            let (va, vb) = (a.value(i), b.value(i));
            let (va, vb) = (
                va.as_primitive::<Float64Type>(),
                vb.as_primitive::<Float64Type>(),
            );
            if va.len() != vb.len() {
                return exec_err!(
                    "{}: the vectors have {} and {} values",
                    self.name(),
                    va.len(),
                    vb.len()
                );
            }
            if va.null_count() + vb.null_count() > 0 {
                out.push(None);
                continue;
            }
            out.push(measure(self.measure, va.values(), vb.values()));
        }
        Ok(ColumnarValue::Array(Arc::new(Float64Array::from(out))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_agree_with_their_definitions() {
        let c = measure(Measure::Cosine, &[1.0, 0.0], &[1.0, 1.0]).unwrap();
        assert!((c - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12);
        assert_eq!(measure(Measure::Cosine, &[0.0, 0.0], &[1.0, 1.0]), None);
        assert_eq!(measure(Measure::L2, &[0.0, 3.0], &[4.0, 0.0]), Some(5.0));
    }
}
