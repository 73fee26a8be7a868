//! What a function is: a completion (text, or a value of its `output` schema; optionally
//! packing several rows into one prompt), an embedding (`kind = "embedding"`: a vector of `dim`
//! numbers, `FixedSizeList<Float32, dim>`) or an aggregate (`kind = "aggregate"`: one call per
//! group, reduced hierarchically when the group does not fit). Each kind carries what only it
//! has, so no definition can hold a combination that means nothing.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field};
use serde::Deserialize;

use super::pack::Packing;
use super::reduce::Reduce;
use crate::types::OutputSchema;

/// What a function is, with what only its kind has.
#[derive(Debug, Clone)]
pub enum FunctionKind {
    /// A completion: text, or a value of the output schema (default); with `rows_per_prompt`,
    /// the shared templates its rows' items are packed into.
    Completion {
        /// The shared prompt of a packed function (`rows_per_prompt`), if it is one.
        packing: Option<Arc<Packing>>,
    },
    /// An embedding of the rendered prompt, from a model of `kind = "openai_embeddings"` (or
    /// the embedded model).
    Embedding {
        /// The vector's length.
        dim: usize,
    },
    /// An aggregate: the template sees the group's values of its first argument as a list
    /// (`GROUP BY`).
    Aggregate {
        /// How a group that does not fit `max_input_tokens` is reduced, if a budget is set.
        reduce: Option<Reduce>,
    },
}

/// The `kind` key of a function's TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub(super) enum KindName {
    #[default]
    Completion,
    Embedding,
    Aggregate,
}

impl FunctionKind {
    /// The kind as written in a function's TOML (`completion`, `embedding`, `aggregate`).
    pub fn name(&self) -> &'static str {
        match self {
            FunctionKind::Completion { .. } => "completion",
            FunctionKind::Embedding { .. } => "embedding",
            FunctionKind::Aggregate { .. } => "aggregate",
        }
    }

    /// A packed completion's shared templates.
    pub fn packing(&self) -> Option<&Arc<Packing>> {
        match self {
            FunctionKind::Completion { packing } => packing.as_ref(),
            _ => None,
        }
    }

    /// An aggregate's reduction budget.
    pub fn reduce(&self) -> Option<Reduce> {
        match self {
            FunctionKind::Aggregate { reduce } => *reduce,
            _ => None,
        }
    }

    /// Whether it returns an embedding.
    pub fn is_embedding(&self) -> bool {
        matches!(self, FunctionKind::Embedding { .. })
    }

    /// Whether it is an aggregate.
    pub fn is_aggregate(&self) -> bool {
        matches!(self, FunctionKind::Aggregate { .. })
    }
}

/// An embedding's schema: exactly `dim` numbers, as `FixedSizeList<Float32, dim>` in Arrow.
pub(super) fn embedding_schema(dim: usize) -> Result<OutputSchema, String> {
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

/// The schema a function's `output` declares (none: text).
pub(super) fn declared_schema(output: Option<toml::Value>) -> Result<Option<OutputSchema>, String> {
    let Some(v) = output else {
        return Ok(None);
    };
    let json =
        serde_json::to_value(v).map_err(|e| format!("output: cannot convert to JSON: {e}"))?;
    OutputSchema::new(json).map(Some).map_err(|e| e.to_string())
}
