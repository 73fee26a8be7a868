//! What an answer becomes: the function's value, parsed and validated, or a classified error.

use serde_json::Value;

use crate::types::{ErrorKind, LlmError, LlmResponse, OutputSchema};

/// A 200 answer whose body is not what the protocol promises.
pub fn malformed(message: String) -> LlmError {
    LlmError {
        http_status: Some(200),
        ..LlmError::new(ErrorKind::MalformedResponse, message)
    }
}

/// Turns a response into the function's value: JSON parsed, unwrapped and validated against the
/// schema, or the non-empty text for functions without a schema.
pub fn parse_response(
    schema: Option<&OutputSchema>,
    resp: &LlmResponse,
) -> Result<Value, LlmError> {
    let with_reason = |kind, message: String| LlmError {
        finish_reason: resp.finish_reason.clone(),
        ..LlmError::new(kind, message)
    };
    if resp.finish_reason.as_deref() == Some("length") {
        return Err(with_reason(
            ErrorKind::Truncated,
            "the model stopped at max_tokens (finish_reason = length)".into(),
        ));
    }
    let content = resp.content.trim();
    if content.is_empty() {
        return Err(with_reason(ErrorKind::Empty, "empty content".into()));
    }
    let Some(schema) = schema else {
        return Ok(Value::String(resp.content.clone()));
    };
    let json_text = strip_code_fence(content);
    let parsed: Value = serde_json::from_str(json_text).map_err(|e| {
        with_reason(
            ErrorKind::InvalidOutput,
            format!("content is not JSON ({e}): {}", preview(content)),
        )
    })?;
    let value = match parsed {
        Value::Object(mut m) if schema.is_wrapped() && m.len() == 1 && m.contains_key("value") => {
            m.remove("value").unwrap_or(Value::Null)
        }
        other => other,
    };
    schema.validate(&value).map_err(|e| {
        with_reason(
            ErrorKind::InvalidOutput,
            format!("does not match the output schema: {e}"),
        )
    })?;
    Ok(value)
}

fn strip_code_fence(s: &str) -> &str {
    let Some(rest) = s.strip_prefix("```") else {
        return s;
    };
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    rest.strip_suffix("```").unwrap_or(rest).trim()
}

/// The first 120 characters of `s`, for messages.
pub fn preview(s: &str) -> String {
    let mut out: String = s.chars().take(120).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resp(content: &str, finish: &str) -> LlmResponse {
        LlmResponse {
            confidence: None,
            content: content.into(),
            finish_reason: Some(finish.into()),
            usage: None,
            rate: Default::default(),
        }
    }

    #[test]
    fn parses_wrapped_and_direct_values() {
        let s = OutputSchema::new(json!({"type": "array", "items": {"type": "string"}})).unwrap();
        let v = parse_response(Some(&s), &resp(r#"{"value": ["a"]}"#, "stop")).unwrap();
        assert_eq!(v, json!(["a"]));
        let v = parse_response(Some(&s), &resp("```json\n[\"b\"]\n```", "stop")).unwrap();
        assert_eq!(v, json!(["b"]));
    }

    #[test]
    fn classifies_bad_responses() {
        let s = OutputSchema::new(json!({"type": "integer"})).unwrap();
        let kind = |c: &str, f: &str| parse_response(Some(&s), &resp(c, f)).unwrap_err().kind;
        assert_eq!(kind(r#"{"value": "x"}"#, "stop"), ErrorKind::InvalidOutput);
        assert_eq!(kind("{\"value\": 1", "stop"), ErrorKind::InvalidOutput);
        assert_eq!(kind(r#"{"value": 1}"#, "length"), ErrorKind::Truncated);
        assert_eq!(kind("  ", "stop"), ErrorKind::Empty);
        assert_eq!(
            parse_response(None, &resp("hello", "stop")).unwrap(),
            json!("hello")
        );
    }
}
