//! Output schemas: a declared JSON Schema read once into a typed tree ([`SchemaNode`]), which
//! everything else walks — the Arrow type, response validation, the schema sent to providers
//! (and turned into a llama.cpp grammar), Lamini's `output_type` and explain's placeholders.
//!
//! The supported subset is what maps onto Arrow without loss: `string` (Utf8), `number` (Float64),
//! `integer` (Int64), `boolean`, `array` (List), `object` (Struct, nested), with `["T", "null"]`
//! for explicitly nullable values, and the constraints sluice enforces on every response: `enum`,
//! `minItems`, `maxItems`, `minLength`, `maxLength`, `minimum`, `maximum`, `required` and
//! `additionalProperties`. Anything else (`anyOf`, `$ref`, `pattern`, ...) is rejected when the
//! function is loaded, so no constraint is silently left unenforced.

mod arrow;
mod node;
mod parse;
mod pattern;
mod validate;

pub use node::{NumberBounds, SchemaError, SchemaKind, SchemaNode};
pub use pattern::Pattern;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::DataType;
use serde_json::Value;

/// A validated output schema with its Arrow type.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSchema {
    /// The schema as declared (JSON); part of every request key.
    pub json: Value,
    /// The schema as a typed tree.
    pub root: SchemaNode,
    /// The Arrow type of the SQL value.
    pub data_type: DataType,
}

impl OutputSchema {
    /// Checks `json` against the supported subset and derives the Arrow type.
    pub fn new(json: Value) -> Result<OutputSchema, SchemaError> {
        let root = parse::node(&json, "output")?;
        let data_type = arrow::data_type(&root);
        Ok(OutputSchema {
            json,
            root,
            data_type,
        })
    }

    /// The root type name (`object`, `array`, ...).
    pub fn root_type(&self) -> &'static str {
        self.root.kind.type_name()
    }

    /// Validates one response value; the message names the JSON path of the first violation.
    pub fn validate(&self, value: &Value) -> Result<(), String> {
        validate::value(&self.root, value, "$")
    }

    /// Converts validated values (None = NULL) to one Arrow array of [`Self::data_type`].
    pub fn to_array(&self, values: &[Option<&Value>]) -> Result<ArrayRef, String> {
        arrow::values_to_array(&self.data_type, values)
    }

    /// A schema usable with OpenAI's strict structured outputs: the root must be an object, so
    /// non-object outputs are wrapped as `{"value": ...}` (see [`Self::is_wrapped`]), and every
    /// object gets `additionalProperties: false`.
    pub fn provider_schema(&self) -> Value {
        let inner = self.root.to_json(true);
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
        !matches!(self.root.kind, SchemaKind::Object { .. })
    }

    /// Whether the provider schema satisfies OpenAI's strict mode (every property required).
    pub fn strict_compatible(&self) -> bool {
        fn all_required(n: &SchemaNode) -> bool {
            match &n.kind {
                SchemaKind::Object {
                    properties,
                    required,
                    ..
                } => properties
                    .iter()
                    .all(|(k, p)| required.contains(k) && all_required(p)),
                SchemaKind::Array { items, .. } => all_required(items),
                _ => true,
            }
        }
        all_required(&self.root)
    }
}

#[cfg(test)]
mod tests;
