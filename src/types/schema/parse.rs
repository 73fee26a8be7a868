//! The one reader of JSON Schema keywords: a declared schema → [`SchemaNode`], or the first
//! problem with the path where it is.

use serde_json::{Map, Number, Value};

use super::node::{NumberBounds, SchemaError, SchemaKind, SchemaNode};
use super::pattern::Pattern;

/// Keywords that only annotate and are accepted anywhere.
const ANNOTATIONS: &[&str] = &["description", "title", "examples", "default", "$comment"];

/// Keywords each type accepts besides `type` and the annotations.
fn allowed(ty: &str) -> Option<&'static [&'static str]> {
    Some(match ty {
        "string" => &["enum", "minLength", "maxLength", "pattern"],
        "number" | "integer" => &["enum", "minimum", "maximum"],
        "boolean" => &[],
        "array" => &["items", "minItems", "maxItems"],
        "object" => &["properties", "required", "additionalProperties"],
        _ => return None,
    })
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

/// Reads the node at `path`.
pub(super) fn node(s: &Value, path: &str) -> Result<SchemaNode, SchemaError> {
    let err = |message: String| SchemaError {
        path: path.to_string(),
        message,
    };
    let obj = s
        .as_object()
        .ok_or_else(|| err(format!("expected a table/object, found {s}")))?;
    let (ty, nullable) = type_of(s).ok_or_else(|| {
        err(match obj.get("type") {
            None => "missing \"type\" (one of string, number, integer, boolean, array, object)"
                .to_string(),
            Some(t) => format!(
                "unsupported \"type\" {t}: use one type name, optionally with \"null\" \
                 (e.g. [\"string\", \"null\"])"
            ),
        })
    })?;
    let allowed = allowed(ty).ok_or_else(|| {
        err(format!(
            "unsupported type {ty:?} (supported: string, number, integer, boolean, array, object)"
        ))
    })?;
    let mut annotations = vec![];
    for (key, v) in obj {
        if ANNOTATIONS.contains(&key.as_str()) {
            annotations.push((key.clone(), v.clone()));
        } else if key != "type" && !allowed.contains(&key.as_str()) {
            return Err(err(format!(
                "unsupported keyword {key:?} for type {ty} (supported here: {})",
                allowed.join(", ")
            )));
        }
    }
    let kind = match ty {
        "string" => string(obj, &err)?,
        "integer" => SchemaKind::Integer(bounds(obj, ty, &err)?),
        "number" => SchemaKind::Number(bounds(obj, ty, &err)?),
        "boolean" => SchemaKind::Boolean,
        "array" => array(obj, path, &err)?,
        _ => object(obj, path, &err)?,
    };
    Ok(SchemaNode {
        kind,
        nullable,
        annotations,
    })
}

type Err<'a> = dyn Fn(String) -> SchemaError + 'a;

fn count(obj: &Map<String, Value>, key: &str, err: &Err) -> Result<Option<u64>, SchemaError> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| err(format!("{key} must be a non-negative integer, got {v}"))),
    }
}

fn enum_list(obj: &Map<String, Value>) -> Option<&Vec<Value>> {
    obj.get("enum").and_then(Value::as_array)
}

fn bad_enum(obj: &Map<String, Value>, ty: &str, err: &Err) -> Result<(), SchemaError> {
    if obj.contains_key("enum") {
        return Err(err(format!("enum must be a non-empty list of {ty} values")));
    }
    Ok(())
}

fn string(obj: &Map<String, Value>, err: &Err) -> Result<SchemaKind, SchemaError> {
    let min_length = count(obj, "minLength", err)?;
    let max_length = count(obj, "maxLength", err)?;
    let enum_values = match enum_list(obj) {
        Some(e) if !e.is_empty() && e.iter().all(Value::is_string) => Some(
            e.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
        ),
        _ => {
            bad_enum(obj, "string", err)?;
            None
        }
    };
    let pattern = match obj.get("pattern") {
        None => None,
        Some(Value::String(p)) => Some(Pattern::new(p).map_err(err)?),
        Some(other) => return Err(err(format!("pattern must be a string, got {other}"))),
    };
    Ok(SchemaKind::String {
        enum_values,
        min_length,
        max_length,
        pattern,
    })
}

fn bounds(obj: &Map<String, Value>, ty: &str, err: &Err) -> Result<NumberBounds, SchemaError> {
    let number = |key: &str| -> Result<Option<Number>, SchemaError> {
        match obj.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(Some(n.clone())),
            Some(v) => Err(err(format!("{key} must be a number, got {v}"))),
        }
    };
    let minimum = number("minimum")?;
    let maximum = number("maximum")?;
    let fits = |v: &Value| match ty {
        "integer" => v.is_i64() || v.is_u64(),
        _ => v.is_number(),
    };
    let enum_values = match enum_list(obj) {
        Some(e) if !e.is_empty() && e.iter().all(fits) => Some(
            e.iter()
                .filter_map(|v| v.as_number().cloned())
                .collect::<Vec<_>>(),
        ),
        _ => {
            bad_enum(obj, ty, err)?;
            None
        }
    };
    Ok(NumberBounds {
        enum_values,
        minimum,
        maximum,
    })
}

fn array(obj: &Map<String, Value>, path: &str, err: &Err) -> Result<SchemaKind, SchemaError> {
    let min_items = count(obj, "minItems", err)?;
    let max_items = count(obj, "maxItems", err)?;
    if let (Some(lo), Some(hi)) = (min_items, max_items)
        && lo > hi
    {
        return Err(err(format!(
            "minItems ({lo}) is greater than maxItems ({hi})"
        )));
    }
    let items = obj
        .get("items")
        .ok_or_else(|| err("array needs \"items\"".to_string()))?;
    Ok(SchemaKind::Array {
        items: Box::new(node(items, &format!("{path}.items"))?),
        min_items,
        max_items,
    })
}

fn object(obj: &Map<String, Value>, path: &str, err: &Err) -> Result<SchemaKind, SchemaError> {
    let props = match obj.get("properties") {
        Some(Value::Object(p)) if !p.is_empty() => p,
        _ => {
            return Err(err(
                "object needs a non-empty \"properties\" table".to_string()
            ));
        }
    };
    let mut required = vec![];
    if let Some(req) = obj.get("required") {
        let names = req
            .as_array()
            .ok_or_else(|| err("\"required\" must be a list of property names".to_string()))?;
        for n in names {
            match n.as_str() {
                Some(name) if props.contains_key(name) => required.push(name.to_string()),
                _ => {
                    return Err(err(format!(
                        "\"required\" names {n}, which is not in \"properties\""
                    )));
                }
            }
        }
    }
    let additional_properties = match obj.get("additionalProperties") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => {
            return Err(err("additionalProperties must be true or false".to_string()));
        }
    };
    let mut properties = Vec::with_capacity(props.len());
    for (name, sub) in props {
        properties.push((
            name.clone(),
            node(sub, &format!("{path}.properties.{name}"))?,
        ));
    }
    Ok(SchemaKind::Object {
        properties,
        required,
        additional_properties,
    })
}
