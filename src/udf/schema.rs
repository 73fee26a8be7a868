//! Output schemas: JSON Schema → Arrow type, response validation, JSON values → Arrow arrays.
//!
//! The supported subset is what maps onto Arrow without loss: `string` (Utf8), `number` (Float64),
//! `integer` (Int64), `boolean`, `array` (List), `object` (Struct, nested), with `["T", "null"]`
//! for explicitly nullable values, and the constraints sluice enforces on every response: `enum`,
//! `minItems`, `maxItems`, `minLength`, `maxLength`, `minimum`, `maximum`, `required` and
//! `additionalProperties`. Anything else (`anyOf`, `$ref`, `pattern`, ...) is rejected when the
//! function is loaded, so no constraint is silently left unenforced.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, new_null_array};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema};
use datafusion::arrow::json::ReaderBuilder;
use serde_json::{Map, Value};

/// An error in a schema declaration, with the JSON path of the offending node.
#[derive(Debug, Clone, thiserror::Error)]
#[error("output schema at {path}: {message}")]
pub struct SchemaError {
    /// Path such as `output.properties.items`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Keywords that only annotate and are accepted anywhere.
const ANNOTATIONS: &[&str] = &["description", "title", "examples", "default", "$comment"];

/// A validated output schema with its Arrow type.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSchema {
    /// The schema as declared (JSON).
    pub json: Value,
    /// The Arrow type of the SQL value.
    pub data_type: DataType,
}

impl OutputSchema {
    /// Checks `json` against the supported subset and derives the Arrow type.
    pub fn new(json: Value) -> Result<OutputSchema, SchemaError> {
        let data_type = to_arrow(&json, "output")?;
        Ok(OutputSchema { json, data_type })
    }

    /// The root type name (`object`, `array`, ...).
    pub fn root_type(&self) -> &str {
        type_of(&self.json).map(|(t, _)| t).unwrap_or("null")
    }

    /// Validates one response value; the message names the JSON path of the first violation.
    pub fn validate(&self, value: &Value) -> Result<(), String> {
        validate(&self.json, value, "$")
    }

    /// Converts validated values (None = NULL) to one Arrow array of [`Self::data_type`].
    pub fn to_array(&self, values: &[Option<&Value>]) -> Result<ArrayRef, String> {
        values_to_array(&self.data_type, values)
    }

    /// A schema usable with OpenAI's strict structured outputs: the root must be an object, so
    /// non-object outputs are wrapped as `{"value": ...}` (see [`Self::is_wrapped`]), and every
    /// object gets `additionalProperties: false`.
    pub fn provider_schema(&self) -> Value {
        let inner = close_objects(&self.json);
        if self.is_wrapped() {
            serde_json::json!({
                "type": "object",
                "properties": { "value": inner },
                "required": ["value"],
                "additionalProperties": false
            })
        } else {
            inner
        }
    }

    /// Whether [`Self::provider_schema`] wraps the value in `{"value": ...}`.
    pub fn is_wrapped(&self) -> bool {
        self.root_type() != "object"
    }

    /// Whether the provider schema satisfies OpenAI's strict mode (every property required).
    pub fn strict_compatible(&self) -> bool {
        fn all_required(s: &Value) -> bool {
            let Some(obj) = s.as_object() else {
                return true;
            };
            if let Some(props) = obj.get("properties").and_then(Value::as_object) {
                let req: Vec<&str> = obj
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if props.keys().any(|k| !req.contains(&k.as_str())) {
                    return false;
                }
                if !props.values().all(all_required) {
                    return false;
                }
            }
            obj.get("items").is_none_or(all_required)
        }
        all_required(&self.json)
    }
}

fn close_objects(s: &Value) -> Value {
    match s {
        Value::Object(obj) => {
            let mut out = Map::new();
            for (k, v) in obj {
                match k.as_str() {
                    "properties" => {
                        let props = v
                            .as_object()
                            .map(|p| {
                                p.iter()
                                    .map(|(pk, pv)| (pk.clone(), close_objects(pv)))
                                    .collect::<Map<_, _>>()
                            })
                            .unwrap_or_default();
                        out.insert(k.clone(), Value::Object(props));
                    }
                    "items" => {
                        out.insert(k.clone(), close_objects(v));
                    }
                    _ => {
                        out.insert(k.clone(), v.clone());
                    }
                }
            }
            if type_of(s).map(|(t, _)| t) == Some("object")
                && !out.contains_key("additionalProperties")
            {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// The declared type and whether `null` is allowed.
fn type_of(s: &Value) -> Option<(&str, bool)> {
    match s.get("type")? {
        Value::String(t) => Some((t.as_str(), false)),
        Value::Array(ts) => {
            let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
            let nullable = names.contains(&"null");
            let non_null: Vec<&str> = names.into_iter().filter(|t| *t != "null").collect();
            (non_null.len() == 1 && ts.len() <= 2).then(|| (non_null[0], nullable))
        }
        _ => None,
    }
}

fn to_arrow(s: &Value, path: &str) -> Result<DataType, SchemaError> {
    let err = |message: String| SchemaError {
        path: path.to_string(),
        message,
    };
    let obj = s
        .as_object()
        .ok_or_else(|| err(format!("expected a table/object, found {s}")))?;
    let (ty, _) = type_of(s).ok_or_else(|| {
        err(match obj.get("type") {
            None => "missing \"type\" (one of string, number, integer, boolean, array, object)"
                .to_string(),
            Some(t) => format!(
                "unsupported \"type\" {t}: use one type name, optionally with \"null\" \
                 (e.g. [\"string\", \"null\"])"
            ),
        })
    })?;
    let allowed: &[&str] = match ty {
        "string" => &["enum", "minLength", "maxLength"],
        "number" | "integer" => &["enum", "minimum", "maximum"],
        "boolean" => &[],
        "array" => &["items", "minItems", "maxItems"],
        "object" => &["properties", "required", "additionalProperties"],
        other => {
            return Err(err(format!(
                "unsupported type {other:?} (supported: string, number, integer, boolean, array, \
                 object)"
            )));
        }
    };
    for key in obj.keys() {
        if key != "type" && !allowed.contains(&key.as_str()) && !ANNOTATIONS.contains(&key.as_str())
        {
            return Err(err(format!(
                "unsupported keyword {key:?} for type {ty} (supported here: {})",
                allowed.join(", ")
            )));
        }
    }
    for key in ["minItems", "maxItems", "minLength", "maxLength"] {
        if let Some(v) = obj.get(key)
            && v.as_u64().is_none()
        {
            return Err(err(format!(
                "{key} must be a non-negative integer, got {v}"
            )));
        }
    }
    for key in ["minimum", "maximum"] {
        if let Some(v) = obj.get(key)
            && !v.is_number()
        {
            return Err(err(format!("{key} must be a number, got {v}")));
        }
    }
    if let (Some(lo), Some(hi)) = (
        obj.get("minItems").and_then(Value::as_u64),
        obj.get("maxItems").and_then(Value::as_u64),
    ) && lo > hi
    {
        return Err(err(format!(
            "minItems ({lo}) is greater than maxItems ({hi})"
        )));
    }
    if let Some(e) = obj.get("enum") {
        let ok = e.as_array().is_some_and(|a| {
            !a.is_empty()
                && a.iter().all(|v| match ty {
                    "string" => v.is_string(),
                    "integer" => v.is_i64() || v.is_u64(),
                    _ => v.is_number(),
                })
        });
        if !ok {
            return Err(err(format!("enum must be a non-empty list of {ty} values")));
        }
    }
    Ok(match ty {
        "string" => DataType::Utf8,
        "number" => DataType::Float64,
        "integer" => DataType::Int64,
        "boolean" => DataType::Boolean,
        "array" => {
            let items = obj
                .get("items")
                .ok_or_else(|| err("array needs \"items\"".to_string()))?;
            let item = to_arrow(items, &format!("{path}.items"))?;
            DataType::List(Arc::new(Field::new("item", item, true)))
        }
        _ => {
            let props = match obj.get("properties") {
                Some(Value::Object(p)) if !p.is_empty() => p,
                _ => {
                    return Err(err(
                        "object needs a non-empty \"properties\" table".to_string()
                    ));
                }
            };
            if let Some(req) = obj.get("required") {
                let names = req.as_array().ok_or_else(|| {
                    err("\"required\" must be a list of property names".to_string())
                })?;
                for n in names {
                    match n.as_str() {
                        Some(n) if props.contains_key(n) => {}
                        _ => {
                            return Err(err(format!(
                                "\"required\" names {n}, which is not in \"properties\""
                            )));
                        }
                    }
                }
            }
            if let Some(ap) = obj.get("additionalProperties")
                && !ap.is_boolean()
            {
                return Err(err("additionalProperties must be true or false".to_string()));
            }
            let mut fields = Vec::with_capacity(props.len());
            for (name, sub) in props {
                let t = to_arrow(sub, &format!("{path}.properties.{name}"))?;
                fields.push(Field::new(name, t, true));
            }
            DataType::Struct(Fields::from(fields))
        }
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn validate(s: &Value, v: &Value, path: &str) -> Result<(), String> {
    let Some((ty, nullable)) = type_of(s) else {
        return Ok(());
    };
    if v.is_null() {
        return if nullable {
            Ok(())
        } else {
            Err(format!("{path}: expected {ty}, got null"))
        };
    }
    let ok_type = match ty {
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "boolean" => v.is_boolean(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    };
    if !ok_type {
        return Err(format!("{path}: expected {ty}, got {}", kind(v)));
    }
    let obj = s.as_object().expect("validated schema is an object");
    if let Some(e) = obj.get("enum").and_then(Value::as_array)
        && !e
            .iter()
            .any(|x| x == v || (x.as_f64().is_some() && x.as_f64() == v.as_f64()))
    {
        return Err(format!(
            "{path}: {v} is not one of {}",
            Value::Array(e.clone())
        ));
    }
    let num = |k: &str| obj.get(k).and_then(Value::as_f64);
    let int = |k: &str| obj.get(k).and_then(Value::as_u64);
    match v {
        Value::String(st) => {
            let n = st.chars().count() as u64;
            if let Some(lo) = int("minLength")
                && n < lo
            {
                return Err(format!("{path}: string shorter than minLength {lo}"));
            }
            if let Some(hi) = int("maxLength")
                && n > hi
            {
                return Err(format!("{path}: string longer than maxLength {hi}"));
            }
        }
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if let Some(lo) = num("minimum")
                && f < lo
            {
                return Err(format!("{path}: {n} is below minimum {lo}"));
            }
            if let Some(hi) = num("maximum")
                && f > hi
            {
                return Err(format!("{path}: {n} is above maximum {hi}"));
            }
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(lo) = int("minItems")
                && n < lo
            {
                return Err(format!("{path}: {n} items, minItems is {lo}"));
            }
            if let Some(hi) = int("maxItems")
                && n > hi
            {
                return Err(format!("{path}: {n} items, maxItems is {hi}"));
            }
            if let Some(item_schema) = obj.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(item_schema, item, &format!("{path}[{i}]"))?;
                }
            }
        }
        Value::Object(map) => {
            let props = obj.get("properties").and_then(Value::as_object);
            if let Some(req) = obj.get("required").and_then(Value::as_array) {
                for r in req.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        return Err(format!("{path}: missing required property {r:?}"));
                    }
                }
            }
            let closed = obj.get("additionalProperties") == Some(&Value::Bool(false));
            for (k, val) in map {
                match props.and_then(|p| p.get(k)) {
                    Some(sub) => validate(sub, val, &format!("{path}.{k}"))?,
                    None if closed => {
                        return Err(format!("{path}: unexpected property {k:?}"));
                    }
                    None => {}
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Converts JSON values to one Arrow array of type `data_type` (None and JSON null become NULL).
pub fn values_to_array(
    data_type: &DataType,
    values: &[Option<&Value>],
) -> Result<ArrayRef, String> {
    if values.iter().all(Option::is_none) {
        return Ok(new_null_array(data_type, values.len()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_types_to_arrow() {
        let s = OutputSchema::new(json!({
            "type": "object",
            "properties": {
                "q": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3},
                "n": {"type": "integer"}, "x": {"type": ["number", "null"]},
                "ok": {"type": "boolean"},
                "inner": {"type": "object", "properties": {"a": {"type": "string"}}}
            },
            "required": ["q"]
        }))
        .unwrap();
        let DataType::Struct(f) = &s.data_type else {
            panic!("{:?}", s.data_type)
        };
        let names: Vec<_> = f.iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["q", "n", "x", "ok", "inner"]);
        assert!(matches!(f[0].data_type(), DataType::List(_)));
        assert_eq!(f[1].data_type(), &DataType::Int64);
        assert_eq!(f[2].data_type(), &DataType::Float64);
    }

    #[test]
    fn rejects_unsupported_schemas_with_path() {
        for (bad, needle) in [
            (json!({"type": "string", "pattern": "x"}), "pattern"),
            (json!({"anyOf": []}), "missing \"type\""),
            (json!({"type": "array"}), "items"),
            (
                json!({"type": "object", "properties": {"a": {"type": "date"}}}),
                "properties.a",
            ),
            (
                json!({"type": "array", "items": {"type": "string"}, "minItems": 4, "maxItems": 2}),
                "minItems",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}),
                "\"b\"",
            ),
        ] {
            let e = OutputSchema::new(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should contain {needle}");
        }
    }

    #[test]
    fn validates_values() {
        let s = OutputSchema::new(
            json!({"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3}),
        )
        .unwrap();
        assert!(s.validate(&json!(["a", "b", "c"])).is_ok());
        assert!(
            s.validate(&json!(["a", "b"]))
                .unwrap_err()
                .contains("minItems")
        );
        assert!(
            s.validate(&json!(["a", "b", 3]))
                .unwrap_err()
                .contains("$[2]")
        );
        assert!(s.validate(&json!("x")).is_err());
        let o = OutputSchema::new(json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}, "required": ["a"], "additionalProperties": false})).unwrap();
        assert!(o.validate(&json!({"a": 1})).is_ok());
        assert!(o.validate(&json!({"a": -1})).is_err());
        assert!(o.validate(&json!({})).is_err());
        assert!(o.validate(&json!({"a": 1, "b": 2})).is_err());
    }

    #[test]
    fn converts_values_to_arrays() {
        let s = OutputSchema::new(json!({"type": "object", "properties": {"a": {"type": "integer"}, "l": {"type": "array", "items": {"type": "string"}}}})).unwrap();
        let arr = s
            .to_array(&[
                Some(&json!({"a": 1, "l": ["x"]})),
                None,
                Some(&json!({"a": 2, "l": []})),
            ])
            .unwrap();
        assert_eq!(arr.len(), 3);
        assert_eq!(arr.null_count(), 1);
        assert_eq!(arr.data_type(), &s.data_type);
    }

    #[test]
    fn wraps_non_object_roots_for_providers() {
        let s = OutputSchema::new(json!({"type": "string"})).unwrap();
        assert!(s.is_wrapped());
        assert_eq!(s.provider_schema()["properties"]["value"]["type"], "string");
        let o =
            OutputSchema::new(json!({"type": "object", "properties": {"a": {"type": "string"}}}))
                .unwrap();
        assert!(!o.is_wrapped());
        assert_eq!(o.provider_schema()["additionalProperties"], false);
        assert!(!o.strict_compatible());
    }
}
