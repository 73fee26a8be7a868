//! The typed tree a JSON Schema is read into ([`SchemaNode`]), and its JSON Schema form.

use serde_json::{Map, Number, Value};

use super::pattern::Pattern;

/// An error in a schema declaration, with the JSON path of the offending node.
#[derive(Debug, Clone, thiserror::Error)]
#[error("output schema at {path}: {message}")]
pub struct SchemaError {
    /// Path such as `output.properties.items`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// One node of a schema: its kind with the kind's constraints, whether `null` is allowed, and
/// the annotations (`description`, `title`, ...) that travel to providers unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaNode {
    /// The type and its constraints.
    pub kind: SchemaKind,
    /// `type = ["T", "null"]`.
    pub nullable: bool,
    /// Keywords that only annotate, in declaration order.
    pub annotations: Vec<(String, Value)>,
}

/// Bounds of a numeric node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NumberBounds {
    /// `enum`: the only values allowed.
    pub enum_values: Option<Vec<Number>>,
    /// `minimum` (inclusive).
    pub minimum: Option<Number>,
    /// `maximum` (inclusive).
    pub maximum: Option<Number>,
}

/// The type of a node, with the constraints that type allows.
#[derive(Debug, Clone, PartialEq)]
pub enum SchemaKind {
    /// `string` → Utf8.
    String {
        /// `enum`.
        enum_values: Option<Vec<String>>,
        /// `minLength` in characters.
        min_length: Option<u64>,
        /// `maxLength` in characters.
        max_length: Option<u64>,
        /// `pattern`: a regular expression the whole string must match (`^...$`).
        pattern: Option<Pattern>,
    },
    /// `integer` → Int64.
    Integer(NumberBounds),
    /// `number` → Float64.
    Number(NumberBounds),
    /// `boolean`.
    Boolean,
    /// `array` → List.
    Array {
        /// `items`.
        items: Box<SchemaNode>,
        /// `minItems`.
        min_items: Option<u64>,
        /// `maxItems`.
        max_items: Option<u64>,
    },
    /// `object` → Struct.
    Object {
        /// `properties`, in declaration order.
        properties: Vec<(String, SchemaNode)>,
        /// `required` property names.
        required: Vec<String>,
        /// `additionalProperties`, when declared.
        additional_properties: Option<bool>,
    },
}

impl SchemaKind {
    /// The JSON Schema type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            SchemaKind::String { .. } => "string",
            SchemaKind::Integer(_) => "integer",
            SchemaKind::Number(_) => "number",
            SchemaKind::Boolean => "boolean",
            SchemaKind::Array { .. } => "array",
            SchemaKind::Object { .. } => "object",
        }
    }
}

impl SchemaNode {
    /// The node as JSON Schema; `closed` adds `additionalProperties: false` to every object
    /// that does not declare it (what strict structured outputs require).
    pub fn to_json(&self, closed: bool) -> Value {
        let mut out = Map::new();
        let ty = self.kind.type_name();
        out.insert(
            "type".into(),
            if self.nullable {
                serde_json::json!([ty, "null"])
            } else {
                Value::from(ty)
            },
        );
        for (k, v) in &self.annotations {
            out.insert(k.clone(), v.clone());
        }
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                out.insert(k.to_string(), v);
            }
        };
        match &self.kind {
            SchemaKind::String {
                enum_values,
                min_length,
                max_length,
                pattern,
            } => {
                put("enum", enum_values.clone().map(Value::from));
                put("minLength", min_length.map(Value::from));
                put("maxLength", max_length.map(Value::from));
                put("pattern", pattern.as_ref().map(|p| Value::from(p.source())));
            }
            SchemaKind::Integer(b) | SchemaKind::Number(b) => {
                let numbers = |v: &Vec<Number>| v.iter().cloned().map(Value::Number).collect();
                put("enum", b.enum_values.as_ref().map(numbers));
                put("minimum", b.minimum.clone().map(Value::Number));
                put("maximum", b.maximum.clone().map(Value::Number));
            }
            SchemaKind::Boolean => {}
            SchemaKind::Array {
                items,
                min_items,
                max_items,
            } => {
                put("items", Some(items.to_json(closed)));
                put("minItems", min_items.map(Value::from));
                put("maxItems", max_items.map(Value::from));
            }
            SchemaKind::Object {
                properties,
                required,
                additional_properties,
            } => {
                let props: Map<String, Value> = properties
                    .iter()
                    .map(|(k, p)| (k.clone(), p.to_json(closed)))
                    .collect();
                put("properties", Some(Value::Object(props)));
                if !required.is_empty() {
                    put("required", Some(Value::from(required.clone())));
                }
                let closed_default = closed.then_some(false);
                put(
                    "additionalProperties",
                    additional_properties.or(closed_default).map(Value::Bool),
                );
            }
        }
        Value::Object(out)
    }
}
