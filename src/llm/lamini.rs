//! Lamini's API (`POST {base_url}/v1/completions`): list prompts in one request, structured
//! output through `output_type`, a flat map of field name to `str`, `int`, `float` or `bool`.
//!
//! Output schemas map onto `output_type` like this (anything else is refused when the engine
//! starts, naming the function):
//! - an object whose properties are all scalars: one field per property;
//! - a scalar (string, integer, number, boolean): one field `value`;
//! - an array of scalars with `minItems = maxItems = n` (n ≤ 32), e.g. three questions: fields
//!   `item_1` … `item_n`, put back into an array;
//! - no schema: Lamini's plain `{"output": text}`.
//!
//! Lamini sends the prompt as given, so a model that needs its chat template should have it
//! written into the function's template; the system text, if any, precedes the user text.

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::http::HttpEndpoint;
use super::openai::flat_prompt;
use super::response::malformed;
use super::{Provider, SetupError, preview};
use crate::config::ServerConfig;
use crate::types::{
    ErrorKind, LlmError, LlmRequest, LlmResponse, OutputSchema, SchemaKind, SchemaNode,
};

/// Largest fixed-length array mapped to `item_1..item_n` fields.
const MAX_ITEMS: u64 = 32;

/// A provider for Lamini's completions API.
#[derive(Debug)]
pub struct LaminiProvider {
    http: HttpEndpoint,
    model: String,
    prompts_per_request: usize,
}

/// How a function's output travels through `output_type` and back.
#[derive(Debug, Clone, PartialEq)]
enum Shape {
    /// No schema: `{"output": text}`.
    Text,
    /// Object fields as they are.
    Object(Map<String, Value>),
    /// A scalar as field `value`.
    Scalar(&'static str),
    /// A fixed-length array as `item_1..item_n`.
    Items(&'static str, u64),
}

/// Lamini's name for a scalar node's type (nullable scalars map to the scalar type).
fn lamini_type(node: &SchemaNode) -> Option<&'static str> {
    match node.kind {
        SchemaKind::String { .. } => Some("str"),
        SchemaKind::Integer(_) => Some("int"),
        SchemaKind::Number(_) => Some("float"),
        SchemaKind::Boolean => Some("bool"),
        _ => None,
    }
}

fn shape(schema: Option<&OutputSchema>) -> Result<Shape, String> {
    let Some(s) = schema else {
        return Ok(Shape::Text);
    };
    if let Some(t) = lamini_type(&s.root) {
        return Ok(Shape::Scalar(t));
    }
    match &s.root.kind {
        SchemaKind::Object { properties, .. } => {
            let mut fields = Map::new();
            for (k, p) in properties {
                let t = lamini_type(p).ok_or_else(|| {
                    format!(
                        "property {k:?} is not a string, integer, number or boolean, and \
                         Lamini's output_type holds only those"
                    )
                })?;
                fields.insert(k.clone(), json!(t));
            }
            Ok(Shape::Object(fields))
        }
        SchemaKind::Array {
            items,
            min_items,
            max_items,
        } => match (lamini_type(items), *min_items, *max_items) {
            (Some(t), Some(a), Some(b)) if a == b && (1..=MAX_ITEMS).contains(&a) => {
                Ok(Shape::Items(t, a))
            }
            _ => Err(format!(
                "an array output needs scalar items and minItems = maxItems (1 to \
                 {MAX_ITEMS}) to travel through Lamini's output_type"
            )),
        },
        other => Err(format!(
            "a {} output cannot travel through Lamini's output_type",
            other.type_name()
        )),
    }
}

impl Shape {
    fn output_type(&self) -> Option<Value> {
        match self {
            Shape::Text => None,
            Shape::Object(fields) => Some(Value::Object(fields.clone())),
            Shape::Scalar(t) => Some(json!({ "value": t })),
            Shape::Items(t, n) => Some(Value::Object(
                (1..=*n).map(|i| (format!("item_{i}"), json!(t))).collect(),
            )),
        }
    }

    /// The content (JSON text, or plain text without a schema) of one answer item.
    fn content(&self, item: &Value) -> Result<String, LlmError> {
        let obj = item.as_object().ok_or_else(|| {
            malformed(format!(
                "answer item is not an object: {}",
                preview(&item.to_string())
            ))
        })?;
        match self {
            Shape::Text => match obj.get("output") {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(malformed(format!(
                    "answer has no string output: {}",
                    preview(&item.to_string())
                ))),
            },
            Shape::Object(_) | Shape::Scalar(_) => Ok(item.to_string()),
            Shape::Items(_, n) => {
                let mut out = Vec::with_capacity(*n as usize);
                for i in 1..=*n {
                    // A missing field stays missing, so validation reports the short array.
                    if let Some(v) = obj.get(&format!("item_{i}")) {
                        out.push(v.clone());
                    }
                }
                Ok(Value::Array(out).to_string())
            }
        }
    }
}

impl LaminiProvider {
    /// Builds a provider for `model` on one configured server.
    pub fn new(model: &str, cfg: &ServerConfig, pool_size: usize) -> Result<Self, SetupError> {
        Ok(LaminiProvider {
            http: HttpEndpoint::new(cfg, format!("{}/v1/completions", cfg.base_url), pool_size)?,
            model: model.to_string(),
            prompts_per_request: cfg.prompts_per_request,
        })
    }
}

#[async_trait]
impl Provider for LaminiProvider {
    fn endpoint(&self) -> String {
        format!("lamini:{}#{}", self.http.identity(), self.model)
    }

    fn max_prompts_per_request(&self) -> usize {
        self.prompts_per_request
    }

    fn check_schema(&self, schema: Option<&OutputSchema>) -> Result<(), SetupError> {
        shape(schema).map(|_| ()).map_err(SetupError::Output)
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        super::complete_as_list(self, req).await
    }

    async fn complete_list(
        &self,
        reqs: &[LlmRequest],
    ) -> Result<Vec<Result<LlmResponse, LlmError>>, LlmError> {
        let Some(first) = reqs.first() else {
            return Ok(vec![]);
        };
        let shape =
            shape(first.schema.as_deref()).map_err(|m| LlmError::new(ErrorKind::BadRequest, m))?;
        let prompts: Vec<String> = reqs.iter().map(flat_prompt).collect();
        let mut body = json!({"model_name": self.model, "prompt": prompts});
        if let Some(t) = shape.output_type() {
            body["output_type"] = t;
        }
        if let Some(m) = first.max_tokens {
            body["max_new_tokens"] = json!(m);
        }
        let (v, rate) = self.http.post_json(&body).await?;
        let items = match v {
            Value::Array(items) => items,
            other => {
                return Err(malformed(format!(
                    "expected a list of {} answers: {}",
                    reqs.len(),
                    preview(&other.to_string())
                )));
            }
        };
        if items.len() != reqs.len() {
            return Err(malformed(format!(
                "{} answers for {} prompts",
                items.len(),
                reqs.len()
            )));
        }
        Ok(items
            .iter()
            .map(|item| {
                shape.content(item).map(|content| LlmResponse {
                    content,
                    rate,
                    ..LlmResponse::default()
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(j: Value) -> OutputSchema {
        OutputSchema::new(j).unwrap()
    }

    #[test]
    fn maps_schemas_to_output_types() {
        let three = schema(json!({"type": "array", "items": {"type": "string"},
                                  "minItems": 3, "maxItems": 3}));
        let s = shape(Some(&three)).unwrap();
        assert_eq!(
            s.output_type().unwrap(),
            json!({"item_1": "str", "item_2": "str", "item_3": "str"})
        );
        assert_eq!(
            s.content(&json!({"item_1": "a", "item_2": "b", "item_3": "c"}))
                .unwrap(),
            r#"["a","b","c"]"#
        );
        let obj = schema(json!({"type": "object", "properties": {
            "amount": {"type": "number"}, "unit": {"type": "string"}}}));
        assert_eq!(
            shape(Some(&obj)).unwrap().output_type().unwrap(),
            json!({"amount": "float", "unit": "str"})
        );
        let int = schema(json!({"type": "integer"}));
        assert_eq!(
            shape(Some(&int)).unwrap().output_type().unwrap(),
            json!({"value": "int"})
        );
        assert_eq!(shape(None).unwrap(), Shape::Text);
        assert_eq!(Shape::Text.content(&json!({"output": "hi"})).unwrap(), "hi");
    }

    #[test]
    fn refuses_schemas_output_type_cannot_hold() {
        let nested = schema(json!({"type": "object", "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "string"}}}}}));
        assert!(shape(Some(&nested)).unwrap_err().contains("\"a\""));
        let open = schema(json!({"type": "array", "items": {"type": "string"}}));
        assert!(shape(Some(&open)).unwrap_err().contains("minItems"));
    }
}
