//! The identity of a request: two calls with the same key are the same call (same endpoint
//! and model, same generation parameters, same output schema, same rendered messages).

use sha2::{Digest, Sha256};

/// `key` as 64 hex digits (a batch line's `custom_id`, the shared tier's wire).
pub(crate) fn key_hex(key: &RequestKey) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key written by [`key_hex`], if `s` is one.
pub(crate) fn key_from_hex(s: &str) -> Option<RequestKey> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

use crate::types::{LlmRequest, OutputSchema, RenderedPrompt};

/// A 32-byte request key: 8 bytes that group calls whose user messages open alike, then 24 bytes
/// of the SHA-256 of the whole request (see [`KeyPrefix`]).
pub type RequestKey = [u8; 32];

/// Computes the key of `req` sent to `endpoint` (provider URL and model id).
#[cfg(test)]
pub(crate) fn request_key(endpoint: &str, req: &LlmRequest) -> RequestKey {
    KeyPrefix::of_request(endpoint, req).key(&req.prompt)
}

/// The part of a request key that one function's calls share (endpoint, generation parameters,
/// output schema), hashed once; [`KeyPrefix::key`] completes it with each call's messages.
///
/// The byte stream hashed is: every field but the user message length-prefixed, then the user
/// message followed by its length. Two different requests never share a stream. The key is the
/// first 8 bytes of the SHA-256 of the stream cut after the user message's first
/// [`GROUP_BYTES`], then the first 24 bytes of the SHA-256 of the whole stream (192 bits, which
/// no two requests share by accident). So calls whose prompts open alike (the three questions
/// about one passage) sit side by side in the store and are read with one page, and consecutive
/// prompts that share their start hash it once ([`KeyPrefix::keys`]).
#[derive(Clone)]
pub struct KeyPrefix(Sha256);

impl std::fmt::Debug for KeyPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyPrefix")
    }
}

/// How much of the user message groups keys.
const GROUP_BYTES: usize = 1024;

/// Hashes one field, length-prefixed.
fn hash_field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// How often [`KeyPrefix::keys`] keeps the hash state along a user message.
const CHECKPOINT_BYTES: usize = 256;

/// Length of the common start of `a` and `b`.
fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 64 <= n && a[i..i + 64] == b[i..i + 64] {
        i += 64;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

impl KeyPrefix {
    /// The shared part of the keys of requests to `endpoint` with these parameters.
    pub fn new(
        endpoint: &str,
        max_tokens: Option<u32>,
        temperature: Option<f64>,
        schema: Option<&OutputSchema>,
    ) -> KeyPrefix {
        let mut h = Sha256::new();
        hash_field(&mut h, b"sluice-request-v2");
        hash_field(&mut h, endpoint.as_bytes());
        hash_field(
            &mut h,
            &max_tokens.map(i64::from).unwrap_or(-1).to_le_bytes(),
        );
        let temperature = temperature.map(f64::to_bits).unwrap_or(u64::MAX);
        hash_field(&mut h, &temperature.to_le_bytes());
        match schema {
            Some(s) => hash_field(&mut h, s.json.to_string().as_bytes()),
            None => hash_field(&mut h, b"\0none"),
        }
        KeyPrefix(h)
    }

    /// The prefix of `req` sent to `endpoint`: its generation parameters, output schema and
    /// whether it asks for its answer's confidence.
    pub fn of_request(endpoint: &str, req: &LlmRequest) -> KeyPrefix {
        let prefix = KeyPrefix::new(
            endpoint,
            req.max_tokens,
            req.temperature,
            req.schema.as_deref(),
        );
        if req.confidence {
            prefix.with_confidence()
        } else {
            prefix
        }
    }

    /// This prefix for requests that also ask for their answer's confidence (a cascade's
    /// stage): their stored answers carry it, so they are kept apart from the plain ones.
    pub fn with_confidence(mut self) -> KeyPrefix {
        hash_field(&mut self.0, b"\0confidence");
        self
    }

    /// The state after this prefix and `prompt`'s system message.
    fn with_system(&self, prompt: &RenderedPrompt) -> Sha256 {
        let mut h = self.0.clone();
        match &prompt.system {
            Some(s) => hash_field(&mut h, s.as_bytes()),
            None => hash_field(&mut h, b"\0none"),
        }
        h
    }

    /// The key of the request that sends `prompt` with this prefix's parameters.
    pub fn key(&self, prompt: &RenderedPrompt) -> RequestKey {
        self.keys([prompt])[0]
    }

    /// The keys of `prompts` (each equal to [`KeyPrefix::key`]'s), hashing the start a prompt
    /// shares with the one before it only once.
    pub fn keys<'a>(
        &self,
        prompts: impl IntoIterator<Item = &'a RenderedPrompt>,
    ) -> Vec<RequestKey> {
        const GROUP_CHECKPOINT: usize = GROUP_BYTES / CHECKPOINT_BYTES;
        let prompts = prompts.into_iter();
        let mut keys = Vec::with_capacity(prompts.size_hint().0);
        // checkpoints[k]: the state after the system message and the user message's first
        // k * CHECKPOINT_BYTES bytes, for the previous prompt.
        let mut checkpoints: Vec<Sha256> = Vec::new();
        let mut previous: Option<&RenderedPrompt> = None;
        let mut group = [0u8; 8];
        for prompt in prompts {
            let user = prompt.user.as_bytes();
            let shared = match previous {
                Some(p) if p.system == prompt.system => {
                    common_prefix_len(p.user.as_bytes(), user) / CHECKPOINT_BYTES
                }
                _ => {
                    checkpoints.clear();
                    checkpoints.push(self.with_system(prompt));
                    0
                }
            };
            checkpoints.truncate(shared.min(checkpoints.len() - 1) + 1);
            // The previous prompt's group holds if both share the group's whole span.
            let same_group = checkpoints.len() > GROUP_CHECKPOINT;
            let mut pos = (checkpoints.len() - 1) * CHECKPOINT_BYTES;
            let mut h = checkpoints.last().expect("one checkpoint at least").clone();
            while pos + CHECKPOINT_BYTES <= user.len() {
                h.update(&user[pos..pos + CHECKPOINT_BYTES]);
                pos += CHECKPOINT_BYTES;
                checkpoints.push(h.clone());
            }
            h.update(&user[pos..]);
            if !same_group {
                let cut = checkpoints.get(GROUP_CHECKPOINT).unwrap_or(&h);
                group.copy_from_slice(&cut.clone().finalize()[..8]);
            }
            h.update((user.len() as u64).to_le_bytes());
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&group);
            key[8..].copy_from_slice(&h.finalize()[..24]);
            keys.push(key);
            previous = Some(prompt);
        }
        keys
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A request with user message `user` and temperature `temp`.
    pub(crate) fn req(user: &str, temp: Option<f64>) -> LlmRequest {
        LlmRequest {
            confidence: false,
            function: "f".into(),
            prompt: RenderedPrompt {
                system: None,
                user: user.into(),
                cuts: Default::default(),
            },
            max_tokens: Some(10),
            temperature: temp,
            schema: None,
        }
    }

    #[test]
    fn keys_of_a_sequence_equal_each_key() {
        let prefix = KeyPrefix::new("e", Some(10), None, None);
        let long = "p".repeat(5 * CHECKPOINT_BYTES + 17);
        let prompt = |system: Option<&str>, user: String| RenderedPrompt {
            system: system.map(str::to_string),
            user,
            cuts: Default::default(),
        };
        let prompts = vec![
            prompt(None, format!("{long} question one")),
            prompt(None, format!("{long} question two, longer than the first")),
            prompt(None, format!("{long} q")),
            prompt(None, long[..CHECKPOINT_BYTES].to_string()),
            prompt(None, long[..CHECKPOINT_BYTES * 2].to_string()),
            prompt(Some("sys"), long[..CHECKPOINT_BYTES * 2].to_string()),
            prompt(Some("sys"), format!("{long}{long}")),
            prompt(Some("other"), format!("{long}{long}")),
            prompt(Some("other"), String::new()),
            prompt(Some("other"), "x".into()),
            prompt(None, format!("{long} question one")),
        ];
        let keys = prefix.keys(&prompts);
        let one_by_one: Vec<RequestKey> = prompts.iter().map(|p| prefix.key(p)).collect();
        assert_eq!(keys, one_by_one);
        assert_eq!(keys[0], keys[10]);
        let distinct: std::collections::HashSet<_> = keys[..10].iter().collect();
        assert_eq!(distinct.len(), 10);
        // Prompts that open with the same GROUP_BYTES sit together; others do not.
        assert!(long.len() >= GROUP_BYTES);
        assert_eq!(keys[0][..8], keys[1][..8]);
        assert_eq!(keys[0][..8], keys[2][..8]);
        assert_ne!(keys[0][..8], keys[3][..8]);
        assert_ne!(keys[3][..8], keys[4][..8]);
        assert_ne!(keys[6][..8], keys[7][..8]);
        let other = prefix.key(&prompt(None, format!("x{long}")));
        assert_ne!(keys[0][..8], other[..8]);
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
