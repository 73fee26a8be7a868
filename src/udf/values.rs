//! Arrow values → template values, row by row.

use std::collections::BTreeMap;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, GenericListArray, OffsetSizeTrait, StructArray,
};
use datafusion::arrow::datatypes::{
    DataType, Float16Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type,
    UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use minijinja::Value;

/// A string column of any of Arrow's three string types, read in place.
pub enum StrColumn<'a> {
    /// `Utf8`.
    Utf8(&'a datafusion::arrow::array::StringArray),
    /// `LargeUtf8`.
    LargeUtf8(&'a datafusion::arrow::array::LargeStringArray),
    /// `Utf8View`.
    Utf8View(&'a datafusion::arrow::array::StringViewArray),
}

impl<'a> StrColumn<'a> {
    /// `array` as strings, if it is a string array.
    pub fn of(array: &'a ArrayRef) -> Option<StrColumn<'a>> {
        match array.data_type() {
            DataType::Utf8 => Some(StrColumn::Utf8(array.as_string())),
            DataType::LargeUtf8 => Some(StrColumn::LargeUtf8(array.as_string())),
            DataType::Utf8View => Some(StrColumn::Utf8View(array.as_string_view())),
            _ => None,
        }
    }

    /// Row `i`, or `None` if it is NULL.
    pub fn get(&self, i: usize) -> Option<&'a str> {
        match self {
            StrColumn::Utf8(a) => a.is_valid(i).then(|| a.value(i)),
            StrColumn::LargeUtf8(a) => a.is_valid(i).then(|| a.value(i)),
            StrColumn::Utf8View(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

/// Converts every row of `array` to a template value; NULL rows become `None`.
pub fn to_template_values(array: &ArrayRef) -> Vec<Option<Value>> {
    let n = array.len();
    if let Some(strs) = StrColumn::of(array) {
        return (0..n).map(|i| strs.get(i).map(Value::from)).collect();
    }
    let valid = |i: usize| array.is_valid(i);
    macro_rules! prim {
        ($t:ty, $conv:expr) => {{
            let a = array.as_primitive::<$t>();
            (0..n)
                .map(|i| valid(i).then(|| Value::from($conv(a.value(i)))))
                .collect()
        }};
    }
    match array.data_type() {
        DataType::Boolean => {
            let a: &BooleanArray = array.as_boolean();
            (0..n)
                .map(|i| valid(i).then(|| Value::from(a.value(i))))
                .collect()
        }
        DataType::Int8 => prim!(Int8Type, i64::from),
        DataType::Int16 => prim!(Int16Type, i64::from),
        DataType::Int32 => prim!(Int32Type, i64::from),
        DataType::Int64 => prim!(Int64Type, |v: i64| v),
        DataType::UInt8 => prim!(UInt8Type, u64::from),
        DataType::UInt16 => prim!(UInt16Type, u64::from),
        DataType::UInt32 => prim!(UInt32Type, u64::from),
        DataType::UInt64 => prim!(UInt64Type, |v: u64| v),
        DataType::Float16 => prim!(Float16Type, f64::from),
        DataType::Float32 => prim!(Float32Type, f64::from),
        DataType::Float64 => prim!(Float64Type, |v: f64| v),
        DataType::List(_) => list_values(array.as_list::<i32>()),
        DataType::LargeList(_) => list_values(array.as_list::<i64>()),
        DataType::Struct(_) => struct_values(array.as_struct()),
        DataType::Null => vec![None; n],
        _ => {
            // Dates, timestamps, decimals...: their SQL text form.
            let opts = FormatOptions::default();
            match ArrayFormatter::try_new(array.as_ref(), &opts) {
                Ok(f) => (0..n)
                    .map(|i| valid(i).then(|| Value::from(f.value(i).to_string())))
                    .collect(),
                Err(_) => vec![None; n],
            }
        }
    }
}

fn list_values<O: OffsetSizeTrait>(a: &GenericListArray<O>) -> Vec<Option<Value>> {
    let items = to_template_values(a.values());
    let offsets = a.value_offsets();
    (0..a.len())
        .map(|i| {
            a.is_valid(i).then(|| {
                let (s, e) = (offsets[i].as_usize(), offsets[i + 1].as_usize());
                Value::from(
                    items[s..e]
                        .iter()
                        .map(|v| v.clone().unwrap_or(Value::from(())))
                        .collect::<Vec<_>>(),
                )
            })
        })
        .collect()
}

fn struct_values(a: &StructArray) -> Vec<Option<Value>> {
    let cols: Vec<(String, Vec<Option<Value>>)> = a
        .fields()
        .iter()
        .zip(a.columns())
        .map(|(f, c)| (f.name().clone(), to_template_values(c)))
        .collect();
    (0..a.len())
        .map(|i| {
            a.is_valid(i).then(|| {
                Value::from(
                    cols.iter()
                        .map(|(name, vals)| {
                            (name.clone(), vals[i].clone().unwrap_or(Value::from(())))
                        })
                        .collect::<BTreeMap<String, Value>>(),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int32Array, ListArray, StringArray};
    use datafusion::arrow::datatypes::Int32Type;
    use std::sync::Arc;

    #[test]
    fn converts_scalars_lists_and_nulls() {
        let s: ArrayRef = Arc::new(StringArray::from(vec![Some("a"), None]));
        let v = to_template_values(&s);
        assert_eq!(v[0].as_ref().unwrap().as_str(), Some("a"));
        assert!(v[1].is_none());
        let i: ArrayRef = Arc::new(Int32Array::from(vec![7]));
        assert_eq!(to_template_values(&i)[0].as_ref().unwrap().to_string(), "7");
        let l: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
            Some(vec![Some(1), Some(2)]),
        ]));
        assert_eq!(
            to_template_values(&l)[0].as_ref().unwrap().to_string(),
            "[1, 2]"
        );
    }
}
