//! Response validation: a JSON value against a [`SchemaNode`].

use serde_json::{Map, Number, Value};

use super::node::{NumberBounds, SchemaKind, SchemaNode};

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

/// Checks `v` against `s`; the message names the JSON path of the first violation.
pub(super) fn value(s: &SchemaNode, v: &Value, path: &str) -> Result<(), String> {
    let ty = s.kind.type_name();
    if v.is_null() {
        return if s.nullable {
            Ok(())
        } else {
            Err(format!("{path}: expected {ty}, got null"))
        };
    }
    let mismatch = || Err(format!("{path}: expected {ty}, got {}", kind(v)));
    match (&s.kind, v) {
        (
            SchemaKind::String {
                enum_values,
                min_length,
                max_length,
                pattern,
            },
            Value::String(st),
        ) => {
            string(enum_values.as_deref(), *min_length, *max_length, st, path)?;
            match pattern {
                Some(p) if !p.is_match(st) => Err(format!(
                    "{path}: {} does not match pattern {}",
                    Value::from(st.as_str()),
                    p.source()
                )),
                _ => Ok(()),
            }
        }
        (SchemaKind::Integer(b), Value::Number(n)) => {
            let whole = n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0);
            if !whole {
                return mismatch();
            }
            number(b, n, v, path)
        }
        (SchemaKind::Number(b), Value::Number(n)) => number(b, n, v, path),
        (SchemaKind::Boolean, Value::Bool(_)) => Ok(()),
        (
            SchemaKind::Array {
                items,
                min_items,
                max_items,
            },
            Value::Array(values),
        ) => array(items, *min_items, *max_items, values, path),
        (
            SchemaKind::Object {
                properties,
                required,
                additional_properties,
            },
            Value::Object(map),
        ) => object(properties, required, *additional_properties, map, path),
        _ => mismatch(),
    }
}

fn string(
    enum_values: Option<&[String]>,
    min_length: Option<u64>,
    max_length: Option<u64>,
    st: &str,
    path: &str,
) -> Result<(), String> {
    if let Some(e) = enum_values
        && !e.iter().any(|x| x == st)
    {
        return Err(format!(
            "{path}: {} is not one of {}",
            Value::from(st),
            Value::from(e.to_vec())
        ));
    }
    let n = st.chars().count() as u64;
    if let Some(lo) = min_length
        && n < lo
    {
        return Err(format!("{path}: string shorter than minLength {lo}"));
    }
    if let Some(hi) = max_length
        && n > hi
    {
        return Err(format!("{path}: string longer than maxLength {hi}"));
    }
    Ok(())
}

fn array(
    items: &SchemaNode,
    min_items: Option<u64>,
    max_items: Option<u64>,
    values: &[Value],
    path: &str,
) -> Result<(), String> {
    let n = values.len() as u64;
    if let Some(lo) = min_items
        && n < lo
    {
        return Err(format!("{path}: {n} items, minItems is {lo}"));
    }
    if let Some(hi) = max_items
        && n > hi
    {
        return Err(format!("{path}: {n} items, maxItems is {hi}"));
    }
    for (i, item) in values.iter().enumerate() {
        value(items, item, &format!("{path}[{i}]"))?;
    }
    Ok(())
}

fn object(
    properties: &[(String, SchemaNode)],
    required: &[String],
    additional_properties: Option<bool>,
    map: &Map<String, Value>,
    path: &str,
) -> Result<(), String> {
    for r in required {
        if !map.contains_key(r) {
            return Err(format!("{path}: missing required property {r:?}"));
        }
    }
    for (k, val) in map {
        match properties.iter().find(|(name, _)| name == k) {
            Some((_, sub)) => value(sub, val, &format!("{path}.{k}"))?,
            None if additional_properties == Some(false) => {
                return Err(format!("{path}: unexpected property {k:?}"));
            }
            None => {}
        }
    }
    Ok(())
}

fn number(b: &NumberBounds, n: &Number, v: &Value, path: &str) -> Result<(), String> {
    let f = n.as_f64().unwrap_or(f64::NAN);
    if let Some(e) = &b.enum_values
        && !e.iter().any(|x| x == n || x.as_f64() == Some(f))
    {
        let list: Vec<Value> = e.iter().cloned().map(Value::Number).collect();
        return Err(format!("{path}: {v} is not one of {}", Value::Array(list)));
    }
    if let Some(lo) = b.minimum.as_ref().and_then(Number::as_f64)
        && f < lo
    {
        return Err(format!("{path}: {n} is below minimum {lo}"));
    }
    if let Some(hi) = b.maximum.as_ref().and_then(Number::as_f64)
        && f > hi
    {
        return Err(format!("{path}: {n} is above maximum {hi}"));
    }
    Ok(())
}
