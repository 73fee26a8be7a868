//! What a function returns: a completion (text, or a value of its `output` schema) or an
//! embedding (`kind = "embedding"`: a vector of `dim` numbers, `FixedSizeList<Float32, dim>`).

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field};
use serde::Deserialize;

use crate::types::OutputSchema;

/// What a function returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FunctionKind {
    /// A completion: text, or a value of the output schema (default).
    #[default]
    Completion,
    /// An embedding of the rendered prompt: `FixedSizeList<Float32, dim>`, from a model of
    /// `kind = "openai_embeddings"`.
    Embedding,
    /// An aggregate: the template sees the group's values of its first argument as a list
    /// (`GROUP BY`), reduced hierarchically when they do not fit `max_input_tokens`.
    Aggregate,
}

/// The output schema of a function of `kind` with the `output` and `dim` its TOML gives
/// (`packed`: it has `rows_per_prompt`).
pub(super) fn output_schema(
    kind: FunctionKind,
    output: Option<toml::Value>,
    dim: Option<usize>,
    packed: bool,
) -> Result<Option<OutputSchema>, String> {
    match (kind, output, dim) {
        (FunctionKind::Embedding, _, _) if packed => Err(
            "an embedding function takes many inputs per request already (prompts_per_request of its \
             model); leave rows_per_prompt out"
                .into(),
        ),
        (FunctionKind::Embedding, None, Some(dim)) => embedding_schema(dim).map(Some),
        (FunctionKind::Embedding, _, _) => Err(
            "an embedding function returns its vector: give its length as dim (e.g. dim = \
             1536) and leave output out"
                .into(),
        ),
        (FunctionKind::Aggregate, _, _) if packed => {
            Err("an aggregate function makes one call per group; leave rows_per_prompt out".into())
        }
        (_, _, Some(_)) => Err(
            "dim is the vector length of kind = \"embedding\"; set kind or leave dim out".into(),
        ),
        (_, None, None) => Ok(None),
        (_, Some(v), None) => {
            let json = serde_json::to_value(v)
                .map_err(|e| format!("output: cannot convert to JSON: {e}"))?;
            OutputSchema::new(json).map(Some).map_err(|e| e.to_string())
        }
    }
}

/// An embedding's schema: exactly `dim` numbers, as `FixedSizeList<Float32, dim>` in Arrow.
fn embedding_schema(dim: usize) -> Result<OutputSchema, String> {
    if dim == 0 || dim > 65_536 {
        return Err(format!("dim must be between 1 and 65536, got {dim}"));
    }
    let json = serde_json::json!({
        "type": "array", "items": {"type": "number"}, "minItems": dim, "maxItems": dim,
    });
    let mut schema = OutputSchema::new(json).map_err(|e| e.to_string())?;
    let item = Field::new("item", DataType::Float32, true);
    schema.data_type = DataType::FixedSizeList(Arc::new(item), dim as i32);
    Ok(schema)
}
