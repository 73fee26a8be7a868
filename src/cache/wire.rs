//! The shared tier's wire format: keys as 64 hex digits, entries as the cache stores them.

use serde_json::Value;

use super::{CachedResponse, RequestKey};
pub(super) use super::{key_from_hex as unhex, key_hex as hex};

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
