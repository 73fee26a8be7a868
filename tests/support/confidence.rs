//! Token log-probabilities in the test server's chat answers (`"logprobs": true`), and a small
//! model that is sometimes wrong and sometimes unsure, for model cascades.
//!
//! With [`ConfidenceConfig::small_model`] set, a request naming that model is answered, for
//! each prompt (decided by its hash, so every run agrees): right — the value every other model
//! answers — on a share [`ConfidenceConfig::right`] of prompts, wrong otherwise (a boolean
//! negated, a string marked, a number moved); and unsure (its least likely token at
//! [`ConfidenceConfig::unsure_p`]) on a share of the wrong answers and of the right ones.
//! Every other token, and every token of other models, is near-certain.

use std::hash::{Hash, Hasher};

use serde_json::{Value, json};

/// How the small model of a cascade answers.
#[derive(Debug, Clone)]
pub struct ConfidenceConfig {
    /// The model (the request's `model`) that is sometimes wrong; none: every model is right.
    pub small_model: Option<String>,
    /// The share of prompts it answers right.
    pub right: f64,
    /// The share of its wrong answers it is unsure of.
    pub unsure_when_wrong: f64,
    /// The share of its right answers it is unsure of.
    pub unsure_when_right: f64,
    /// The probability of the least likely token of an unsure answer.
    pub unsure_p: f64,
    /// The probability of the least likely token of a sure answer.
    pub sure_p: f64,
}

impl Default for ConfidenceConfig {
    fn default() -> Self {
        ConfidenceConfig {
            small_model: None,
            right: 0.85,
            unsure_when_wrong: 0.9,
            unsure_when_right: 0.05,
            unsure_p: 0.55,
            sure_p: 0.97,
        }
    }
}

/// A uniform draw in [0, 1) from `hash` and `salt`.
fn draw(hash: &str, salt: u64) -> f64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    hash.hash(&mut h);
    salt.hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// How `model` answers the prompt whose hash is `hash`: whether right, and its answer's
/// confidence (the probability of its least likely token).
pub fn judge(cfg: &ConfidenceConfig, model: &str, hash: &str) -> (bool, f64) {
    if cfg.small_model.as_deref() != Some(model) {
        return (true, 0.999);
    }
    let right = draw(hash, 1) < cfg.right;
    let unsure_share = if right {
        cfg.unsure_when_right
    } else {
        cfg.unsure_when_wrong
    };
    let unsure = draw(hash, 2) < unsure_share;
    (right, if unsure { cfg.unsure_p } else { cfg.sure_p })
}

/// A wrong version of `v`.
pub fn wrong(v: &Value) -> Value {
    match v {
        Value::Bool(b) => json!(!b),
        Value::String(s) => json!(format!("{s} (wrong)")),
        Value::Number(n) => json!(n.as_f64().unwrap_or(0.0) + 1.0),
        Value::Array(items) if !items.is_empty() => {
            let mut items = items.clone();
            items[0] = wrong(&items[0]);
            Value::Array(items)
        }
        Value::Object(m) if !m.is_empty() => {
            let mut m = m.clone();
            if let Some((_, first)) = m.iter_mut().next() {
                *first = wrong(first);
            }
            Value::Object(m)
        }
        other => other.clone(),
    }
}

/// OpenAI's `choices[].logprobs` of `content` (cut into tokens of up to four characters),
/// every token near-certain but the first, whose probability is `confidence`.
pub fn logprobs(content: &str, confidence: f64) -> Value {
    let chars: Vec<char> = content.chars().collect();
    let tokens: Vec<Value> = chars
        .chunks(4)
        .enumerate()
        .map(|(i, t)| {
            let token: String = t.iter().collect();
            let p: f64 = if i == 0 { confidence } else { 0.9995 };
            json!({"token": token, "logprob": p.ln(), "bytes": token.as_bytes(), "top_logprobs": []})
        })
        .collect();
    json!({"content": tokens, "refusal": null})
}
