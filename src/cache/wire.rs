//! The shared tier's wire format: keys as 64 hex digits, entries as the cache stores them.

use serde_json::Value;

use super::{CachedResponse, RequestKey};

pub(super) fn hex(key: &RequestKey) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn unhex(text: &str) -> Option<RequestKey> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

pub(super) fn keys_of(list: &Value) -> Option<Vec<RequestKey>> {
    list.as_array()?
        .iter()
        .map(|k| k.as_str().and_then(unhex))
        .collect()
}

pub(super) fn entry_value(resp: &CachedResponse) -> Value {
    serde_json::from_slice(&resp.encode()).unwrap_or(Value::Null)
}

pub(super) fn entry_from(value: &Value) -> Option<CachedResponse> {
    CachedResponse::decode(&serde_json::to_vec(value).ok()?)
}
