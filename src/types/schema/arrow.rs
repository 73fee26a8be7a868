//! A schema's Arrow type, and validated JSON values → one Arrow array of it.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, new_null_array};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema};
use datafusion::arrow::json::ReaderBuilder;
use serde_json::Value;

use super::node::{SchemaKind, SchemaNode};

/// The Arrow type of values of `s`.
pub(super) fn data_type(s: &SchemaNode) -> DataType {
    match &s.kind {
        SchemaKind::String { .. } => DataType::Utf8,
        SchemaKind::Integer(_) => DataType::Int64,
        SchemaKind::Number(_) => DataType::Float64,
        SchemaKind::Boolean => DataType::Boolean,
        SchemaKind::Array { items, .. } => {
            DataType::List(Arc::new(Field::new("item", data_type(items), true)))
        }
        SchemaKind::Object { properties, .. } => DataType::Struct(Fields::from(
            properties
                .iter()
                .map(|(name, p)| Field::new(name, data_type(p), true))
                .collect::<Vec<_>>(),
        )),
    }
}

/// Converts JSON values to one Arrow array of type `data_type` (None and JSON null become NULL).
pub(super) fn values_to_array(
    data_type: &DataType,
    values: &[Option<&Value>],
) -> Result<ArrayRef, String> {
    if values.iter().all(Option::is_none) {
        return Ok(new_null_array(data_type, values.len()));
    }
    if let DataType::FixedSizeList(_, len) = data_type {
        return vectors(values, *len);
    }
    let schema = Arc::new(Schema::new(vec![Field::new("v", data_type.clone(), true)]));
    let mut decoder = ReaderBuilder::new(schema)
        .with_batch_size(values.len().max(1))
        .build_decoder()
        .map_err(|e| e.to_string())?;
    let rows: Vec<Row> = values.iter().map(|v| Row(*v)).collect();
    decoder.serialize(&rows).map_err(|e| e.to_string())?;
    let batch = decoder
        .flush()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "no rows decoded".to_string())?;
    Ok(batch.column(0).clone())
}

/// Validated vectors of `len` numbers (embeddings) as `FixedSizeList<Float32, len>`.
fn vectors(values: &[Option<&Value>], len: i32) -> Result<ArrayRef, String> {
    use datafusion::arrow::array::{FixedSizeListBuilder, Float32Builder};
    let mut b = FixedSizeListBuilder::with_capacity(
        Float32Builder::with_capacity(values.len() * len as usize),
        len,
        values.len(),
    );
    for v in values {
        match v.and_then(|v| v.as_array()) {
            Some(xs) if xs.len() == len as usize => {
                for x in xs {
                    b.values().append_option(x.as_f64().map(|f| f as f32));
                }
                b.append(true);
            }
            Some(xs) => return Err(format!("a vector of {} values, not {len}", xs.len())),
            None => {
                for _ in 0..len {
                    b.values().append_null();
                }
                b.append(false);
            }
        }
    }
    Ok(Arc::new(b.finish()))
}

/// One value as the decoder's one-column row `{"v": value}`, serialised without copying it.
struct Row<'a>(Option<&'a Value>);

impl serde::Serialize for Row<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("v", &self.0.unwrap_or(&Value::Null))?;
        m.end()
    }
}
