//! Files of the test server's batch API: multipart uploads of JSONL request files, their
//! validation, and the files served back.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use memchr::memmem;
use serde_json::{Value, json};

use super::super::{Request, State, response};
use super::{Line, Reply, StoredFile, bad, unix_now};

pub(super) fn with_file(st: &State, id: &str, f: impl FnOnce(&StoredFile) -> Value) -> Reply {
    let inner = st.batches.lock();
    let file = inner.files.get(id);
    file.map(f)
        .ok_or_else(|| (404, format!("No such File object: {id}")))
}

pub(super) fn file_content(st: &State, id: &str) -> Vec<u8> {
    let bytes = st.batches.lock().files.get(id).map(|f| f.bytes.clone());
    let Some(bytes) = bytes else {
        let body = json!({"error": {"message": format!("No such File object: {id}"),
                                    "type": "invalid_request_error", "param": null, "code": null}});
        return response(404, &[], body.to_string().as_bytes());
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        bytes.len()
    );
    [head.as_bytes(), &bytes].concat()
}

pub(super) fn delete_file(st: &State, id: &str) -> Reply {
    match st.batches.lock().files.remove(id) {
        Some(_) => Ok(json!({"id": id, "object": "file", "deleted": true})),
        None => Err((404, format!("No such File object: {id}"))),
    }
}

/// `POST /v1/files`: a multipart upload of a JSONL file with `purpose=batch`.
pub(super) fn upload(st: &State, req: &Request) -> Reply {
    let limits = &st.cfg.batch;
    let parts = multipart(req.header("content-type").unwrap_or(""), &req.body).map_err(bad)?;
    let purpose = (parts.iter().find(|p| p.name == "purpose"))
        .map(|p| String::from_utf8_lossy(p.data).trim().to_string());
    if purpose.as_deref() != Some("batch") {
        return Err(bad(format!(
            "Invalid value for 'purpose': {purpose:?}; this server accepts 'batch'."
        )));
    }
    let file = (parts.iter())
        .find(|p| p.name == "file" && p.filename.is_some())
        .ok_or_else(|| bad("A 'file' field with a filename is required."))?;
    if file.data.len() > limits.max_file_bytes {
        return Err(bad(format!(
            "File is too large: {} bytes; the maximum size is {} bytes.",
            file.data.len(),
            limits.max_file_bytes
        )));
    }
    let lines = parse_lines(file.data, limits.max_file_lines).map_err(bad)?;
    let count = lines.len() as u64;
    let stored = StoredFile {
        filename: file.filename.clone().unwrap_or_default(),
        purpose: "batch",
        created_at: unix_now(),
        bytes: Arc::new(file.data.to_vec()),
        lines: Some(Arc::new(lines)),
    };
    let id = st.batches.id("file-");
    let object = stored.to_json(&id);
    st.batches.lock().files.insert(id, stored);
    st.stats.files_uploaded.fetch_add(1, Ordering::Relaxed);
    st.stats.batch_lines.fetch_add(count, Ordering::Relaxed);
    Ok(object)
}

/// The requests of a batch file: one JSON object a line, unique custom_ids, all to the chat
/// endpoint.
fn parse_lines(data: &[u8], max_lines: usize) -> Result<Vec<Line>, String> {
    let text = std::str::from_utf8(data).map_err(|_| "The file is not UTF-8.".to_string())?;
    let raw: Vec<(usize, &str)> = (text.split('\n').enumerate())
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    if raw.len() > max_lines {
        return Err(format!(
            "The file has {} lines; the maximum is {max_lines} lines per batch file.",
            raw.len()
        ));
    }
    if raw.is_empty() {
        return Err("The file has no requests.".to_string());
    }
    let mut seen = HashSet::new();
    let mut lines = Vec::with_capacity(raw.len());
    for (i, text) in raw {
        let at = |what: &str| format!("Line {}: {what}", i + 1);
        let v: Value = serde_json::from_str(text).map_err(|e| at(&format!("invalid JSON: {e}")))?;
        let Value::Object(mut v) = v else {
            return Err(at("a request must be a JSON object."));
        };
        let custom_id = (v.get("custom_id").and_then(Value::as_str))
            .ok_or_else(|| at("'custom_id' must be a string."))?
            .to_string();
        if v.get("method").and_then(Value::as_str) != Some("POST") {
            return Err(at("'method' must be 'POST'."));
        }
        // OpenAI names the endpoint with its version, Azure OpenAI without.
        let url = v.get("url").and_then(Value::as_str);
        if !matches!(url, Some("/v1/chat/completions" | "/chat/completions")) {
            return Err(at("'url' must be '/v1/chat/completions'."));
        }
        let body = v.remove("body").filter(Value::is_object);
        let body = body.ok_or_else(|| at("'body' must be a JSON object."))?;
        if !seen.insert(custom_id.clone()) {
            return Err(at(&format!("duplicate custom_id {custom_id:?}.")));
        }
        lines.push(Line { custom_id, body });
    }
    Ok(lines)
}

/// A field of a multipart body.
struct Part<'a> {
    name: String,
    filename: Option<String>,
    data: &'a [u8],
}

/// The fields of a `multipart/form-data` body.
fn multipart<'a>(content_type: &str, body: &'a [u8]) -> Result<Vec<Part<'a>>, String> {
    let (kind, params) = content_type.split_once(';').unwrap_or((content_type, ""));
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return Err("The Content-Type must be multipart/form-data.".to_string());
    }
    let boundary = (params.split(';').filter_map(|p| p.trim().split_once('=')))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or("The multipart Content-Type has no boundary.")?;
    let broken = || "Malformed multipart body.".to_string();
    let first = format!("--{boundary}");
    let next = format!("\r\n--{boundary}");
    let start = memmem::find(body, first.as_bytes()).ok_or_else(broken)?;
    let mut rest = &body[start + first.len()..];
    let mut parts = vec![];
    while !rest.starts_with(b"--") {
        rest = rest.strip_prefix(b"\r\n").ok_or_else(broken)?;
        let head_end = memmem::find(rest, b"\r\n\r\n").ok_or_else(broken)?;
        let head = String::from_utf8_lossy(&rest[..head_end]);
        let data = &rest[head_end + 4..];
        let len = memmem::find(data, next.as_bytes()).ok_or_else(broken)?;
        let param = |key: &str| disposition_param(&head, key);
        parts.push(Part {
            name: param("name").unwrap_or_default(),
            filename: param("filename"),
            data: &data[..len],
        });
        rest = &data[len + next.len()..];
    }
    Ok(parts)
}

/// A parameter of a part's `Content-Disposition` header.
fn disposition_param(head: &str, key: &str) -> Option<String> {
    let line = head.split("\r\n").find(|l| {
        l.split_once(':')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("content-disposition"))
    })?;
    line.split(';')
        .skip(1)
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
}
