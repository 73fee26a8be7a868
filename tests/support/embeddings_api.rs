//! OpenAI's embeddings endpoint for the test server (`POST /v1/embeddings`): a deterministic
//! unit vector per input, drawn from the input's hash (`prompt_hash(None, input)`), of
//! `dimensions` values when the request says so, else [`DEFAULT_DIM`]. Inputs count as prompts
//! (and their attempts as a live request's); the request's fault is drawn from its first input.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{
    After, Fault, Prompt, Request, State, authorized, count_fault, draw_fault, error_body,
    next_attempt, prompt_hash, response,
};

/// Vector length when the request does not give `dimensions`.
pub const DEFAULT_DIM: usize = 16;

/// The vector the server gives `input` (for tests to compare with).
pub fn embedding_of(input: &str, dim: usize) -> Vec<f32> {
    let h = prompt_hash(None, input);
    let mut rng = fastrand::Rng::with_seed(u64::from_str_radix(&h, 16).unwrap_or(0));
    let raw: Vec<f64> = (0..dim).map(|_| rng.f64() * 2.0 - 1.0).collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    raw.iter().map(|x| (x / norm) as f32).collect()
}

/// Answers one embeddings request.
pub(super) async fn serve_embeddings(
    sock: &mut TcpStream,
    st: &State,
    req: &Request,
) -> std::io::Result<After> {
    let refuse =
        |status: u16, message: &str, kind: &str| response(status, &[], &error_body(message, kind));
    if !authorized(&st.cfg, req) {
        sock.write_all(&refuse(
            401,
            "Incorrect API key provided",
            "invalid_request_error",
        ))
        .await?;
        return Ok(After::KeepAlive);
    }
    let parsed: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let inputs: Option<Vec<String>> = match parsed.get("input") {
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(Value::Array(a)) if !a.is_empty() => {
            a.iter().map(|v| v.as_str().map(str::to_string)).collect()
        }
        _ => None,
    };
    let Some(inputs) = inputs else {
        let body = refuse(
            400,
            "input must be a string or a list of strings",
            "invalid_request_error",
        );
        sock.write_all(&body).await?;
        return Ok(After::KeepAlive);
    };
    let s = &st.stats;
    s.requests.fetch_add(1, Ordering::Relaxed);
    s.prompts.fetch_add(inputs.len() as u64, Ordering::Relaxed);
    let prompts: Vec<Prompt> = inputs
        .iter()
        .map(|i| Prompt {
            system: None,
            user: i.clone(),
            hash: prompt_hash(None, i),
        })
        .collect();
    let attempt = next_attempt(st, &prompts);
    let (fault, _) = draw_fault(&st.cfg, &prompts, attempt);
    match fault {
        Some(f @ Fault::RateLimit) => {
            count_fault(st, f);
            let headers = [("retry-after-ms", st.cfg.retry_after_ms.to_string())];
            let body = error_body("Rate limit reached", "rate_limit_error");
            sock.write_all(&response(429, &headers, &body)).await?;
            return Ok(After::KeepAlive);
        }
        Some(f @ (Fault::Server500 | Fault::Server503)) => {
            count_fault(st, f);
            sock.write_all(&refuse(500, "The server had an error", "server_error"))
                .await?;
            return Ok(After::KeepAlive);
        }
        _ => {}
    }
    let dim = parsed
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(DEFAULT_DIM, |d| d as usize);
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| json!({"object": "embedding", "index": i, "embedding": embedding_of(input, dim)}))
        .collect();
    let tokens: usize = inputs.iter().map(|i| i.chars().count() / 4 + 1).sum();
    s.ok.fetch_add(inputs.len() as u64, Ordering::Relaxed);
    let body = json!({
        "object": "list", "data": data, "model": parsed.get("model").cloned().unwrap_or(Value::Null),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    sock.write_all(&response(200, &[], body.to_string().as_bytes()))
        .await?;
    Ok(After::KeepAlive)
}
