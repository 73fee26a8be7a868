//! Response identity: the key under which a call's result is shared and stored.
//!
//! Two calls with the same key are the same call: same endpoint and model, same generation
//! parameters, same output schema, same rendered messages. The dispatcher uses the key to send
//! identical prompts once per run; the persistent store keys responses by it.

use sha2::{Digest, Sha256};

use crate::llm::LlmRequest;

/// A 32-byte SHA-256 request key.
pub type RequestKey = [u8; 32];

/// Computes the key of `req` sent to `endpoint` (provider URL and model id).
pub fn request_key(endpoint: &str, req: &LlmRequest) -> RequestKey {
    let mut h = Sha256::new();
    // Each field is length-prefixed so that no two different requests share a byte stream.
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(b"sluice-request-v1");
    field(endpoint.as_bytes());
    field(&req.max_tokens.map(|m| m as i64).unwrap_or(-1).to_le_bytes());
    field(
        &req.temperature
            .map(f64::to_bits)
            .unwrap_or(u64::MAX)
            .to_le_bytes(),
    );
    match &req.schema {
        Some(s) => field(s.json.to_string().as_bytes()),
        None => field(b"\0none"),
    }
    match &req.prompt.system {
        Some(s) => field(s.as_bytes()),
        None => field(b"\0none"),
    }
    field(req.prompt.user.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udf::def::RenderedPrompt;

    fn req(user: &str, temp: Option<f64>) -> LlmRequest {
        LlmRequest {
            function: "f".into(),
            prompt: RenderedPrompt {
                system: None,
                user: user.into(),
            },
            max_tokens: Some(10),
            temperature: temp,
            schema: None,
        }
    }

    #[test]
    fn key_covers_every_parameter() {
        let a = request_key("e", &req("hi", None));
        assert_eq!(a, request_key("e", &req("hi", None)));
        assert_ne!(a, request_key("e2", &req("hi", None)));
        assert_ne!(a, request_key("e", &req("hi!", None)));
        assert_ne!(a, request_key("e", &req("hi", Some(0.0))));
    }
}
