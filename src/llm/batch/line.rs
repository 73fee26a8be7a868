//! One line of a batch file each way: a request (`custom_id` = the request key in hex, the
//! chat request as `body`) and a result (the answer's status and body, or the job's error for a
//! request it never ran).

use serde_json::{Value, json};

use crate::cache::{RequestKey, key_from_hex, key_hex};
use crate::llm::openai::OpenAiProvider;
use crate::llm::preview;
use crate::llm::response::malformed;
use crate::types::{ErrorKind, LlmError, LlmRequest, LlmResponse};

/// The JSONL line (with its newline) asking for `req` under `key`.
pub(super) fn request_line(chat: &OpenAiProvider, key: &RequestKey, req: &LlmRequest) -> Vec<u8> {
    let line = json!({
        "custom_id": key_hex(key),
        "method": "POST",
        "url": chat.batch_endpoint(),
        "body": chat.body(req),
    });
    let mut bytes = line.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// A result line: whose it is and what it says, or `None` for a line that names no request.
pub(super) fn result_line(
    chat: &OpenAiProvider,
    line: &[u8],
) -> Option<(RequestKey, Result<LlmResponse, LlmError>)> {
    let v: Value = serde_json::from_slice(line).ok()?;
    let key = key_from_hex(v.get("custom_id")?.as_str()?)?;
    Some((key, outcome(chat, &v)))
}

fn outcome(chat: &OpenAiProvider, v: &Value) -> Result<LlmResponse, LlmError> {
    if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
        let part = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("");
        let kind = match part("code") {
            "batch_expired" => ErrorKind::Timeout,
            _ => ErrorKind::ServerError,
        };
        return Err(LlmError::new(
            kind,
            format!("batch result: {}: {}", part("code"), part("message")),
        ));
    }
    let Some(resp) = v.get("response").filter(|r| !r.is_null()) else {
        return Err(malformed(
            "a batch result line has neither response nor error".into(),
        ));
    };
    let status = resp.get("status_code").and_then(Value::as_u64).unwrap_or(0) as u16;
    let body = resp.get("body").cloned().unwrap_or(Value::Null);
    if status != 200 {
        let url = format!("{} (batch)", chat.http().url());
        let mut e = chat
            .http()
            .status_error(&url, status, body.to_string().as_bytes(), None);
        // A refusal of one line is that row's, never the whole provider's.
        if e.kind.is_systemic() {
            e.kind = ErrorKind::BadRequest;
        }
        return Err(e);
    }
    if !body.is_object() {
        return Err(malformed(format!(
            "a batch result's body is not a chat completion: {}",
            preview(&body.to_string())
        )));
    }
    OpenAiProvider::parse_chat(&body, Default::default())
}
