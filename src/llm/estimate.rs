//! Estimating a run without making it: token counting with the model's own tokenizer and a
//! provider that answers every request with a schema-shaped placeholder, for `sluice explain`.
//!
//! Prompt tokens are counted exactly as the model would see them: for OpenAI chat models the
//! cookbook's message framing (3 tokens per message, 3 to prime the reply) plus the structured
//! output schema; for text-completion and Lamini servers the flat prompt; for the embedded model
//! its chat template rendered and tokenized with the GGUF's vocabulary. Completion tokens can only
//! be guessed: the placeholder follows the output schema (array lengths from `minItems` /
//! `maxItems`, strings of [`TYPICAL_STRING_CHARS`] within `minLength`/`maxLength`), so fan-out
//! downstream (three questions per passage → three answers) is counted from the declaration.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::prefix::{BLOCK_BYTES, prefix_blocks};
use super::{Provider, SetupError};
use crate::config::{ModelConfig, ProviderKind, StructuredOutput};
use crate::types::{
    LlmError, LlmRequest, LlmResponse, NumberBounds, OutputSchema, SchemaKind, SchemaNode, Usage,
};

/// Characters of a placeholder string when the schema allows it (about one sentence).
pub const TYPICAL_STRING_CHARS: usize = 80;
/// Items of a placeholder array whose schema bounds neither end.
pub const DEFAULT_ARRAY_ITEMS: usize = 3;
/// Tokens of a placeholder answer of a function without an output schema (capped by its
/// `max_tokens`).
pub const TYPICAL_TEXT_TOKENS: u64 = 60;

/// Counts tokens the way one model does.
pub enum TokenCounter {
    /// A tiktoken encoding (OpenAI and OpenAI-compatible servers).
    Tiktoken {
        /// Encoding name, e.g. `o200k_base`.
        name: String,
        /// The encoder.
        bpe: &'static tiktoken_rs::CoreBPE,
        /// How the prompt is sent: chat messages (framing counted) or one flat text.
        chat: bool,
        /// Whether the output schema is sent as `response_format` (counted with the prompt).
        schema_in_prompt: bool,
    },
    /// A GGUF vocabulary and chat template (the embedded model, or `tokenizer = "x.gguf"`).
    #[cfg(feature = "local")]
    Gguf(Arc<super::local::Vocabulary>),
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl TokenCounter {
    /// The counter for a configured model: `tokenizer` if set, else the GGUF of a local model,
    /// else the encoding OpenAI uses for the model id, else `o200k_base`.
    pub fn for_model(m: &ModelConfig) -> Result<TokenCounter, SetupError> {
        let chat = matches!(
            m.kind,
            ProviderKind::Openai
                | ProviderKind::AzureOpenai
                | ProviderKind::Anthropic
                | ProviderKind::Gemini
        );
        let server = m.server();
        let schema_in_prompt =
            chat && server.is_some_and(|s| s.structured_output == StructuredOutput::JsonSchema);
        let configured = server.and_then(|s| s.tokenizer.clone());
        let gguf = match (&configured, m.kind) {
            (_, ProviderKind::Local) => Some(m.model.clone()),
            (Some(t), _) if t.ends_with(".gguf") => Some(t.clone()),
            _ => None,
        };
        if let Some(path) = gguf {
            #[cfg(feature = "local")]
            {
                return super::local::Vocabulary::load(std::path::Path::new(&path))
                    .map(|v| TokenCounter::Gguf(Arc::new(v)))
                    .map_err(SetupError::Tokenizer);
            }
            #[cfg(not(feature = "local"))]
            return Err(SetupError::Tokenizer(format!(
                "counting tokens with {path} needs the local model (cargo feature `local`)"
            )));
        }
        use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};
        let (name, tokenizer) = match configured.as_deref() {
            Some("o200k_base") => ("o200k_base", Tokenizer::O200kBase),
            Some("cl100k_base") => ("cl100k_base", Tokenizer::Cl100kBase),
            Some(other) => {
                return Err(SetupError::Tokenizer(format!(
                    "models.{}.tokenizer = {other:?}: use \"o200k_base\", \"cl100k_base\" or the \
                     path of a .gguf file whose vocabulary to count with",
                    m.name
                )));
            }
            None => match get_tokenizer(&m.model) {
                Some(Tokenizer::Cl100kBase) => ("cl100k_base", Tokenizer::Cl100kBase),
                _ => ("o200k_base", Tokenizer::O200kBase),
            },
        };
        let bpe = tiktoken_rs::bpe_for_tokenizer(tokenizer)
            .map_err(|e| SetupError::Tokenizer(e.to_string()))?;
        Ok(TokenCounter::Tiktoken {
            name: name.to_string(),
            bpe,
            chat,
            schema_in_prompt,
        })
    }

    /// What counts, for reports: `tiktoken o200k_base` or `GGUF vocabulary of <file>`.
    pub fn describe(&self) -> String {
        match self {
            TokenCounter::Tiktoken { name, .. } => format!("tiktoken {name}"),
            #[cfg(feature = "local")]
            TokenCounter::Gguf(v) => format!("GGUF vocabulary of {}", v.file_name()),
        }
    }

    /// Tokens of a piece of text.
    pub fn text(&self, s: &str) -> u64 {
        match self {
            TokenCounter::Tiktoken { bpe, .. } => bpe.encode_ordinary(s).len() as u64,
            #[cfg(feature = "local")]
            TokenCounter::Gguf(v) => v.count(s),
        }
    }

    /// Prompt tokens of a request, as the model is sent it.
    pub fn prompt(&self, req: &LlmRequest) -> u64 {
        match self {
            TokenCounter::Tiktoken {
                chat,
                schema_in_prompt,
                ..
            } => {
                if !chat {
                    return self.text(&super::openai::flat_prompt(req));
                }
                let p = &req.prompt;
                let mut n = chat_prompt_tokens(|s| self.text(s), p.system.as_deref(), &p.user);
                if *schema_in_prompt && let Some(schema) = &req.schema {
                    n += self.text(&schema.provider_schema().to_string());
                }
                n
            }
            #[cfg(feature = "local")]
            TokenCounter::Gguf(v) => v.count_chat(req.prompt.system.as_deref(), &req.prompt.user),
        }
    }
}

/// Prompt tokens of a chat request by OpenAI's cookbook rule: each message costs 3 framing
/// tokens plus its role and content, and 3 more prime the reply. The test server bills this way.
pub fn chat_prompt_tokens(count: impl Fn(&str) -> u64, system: Option<&str>, user: &str) -> u64 {
    let message = |role: &str, content: &str| 3 + count(role) + count(content);
    system.map_or(0, |s| message("system", s)) + message("user", user) + 3
}

/// A provider that sends nothing: each request is answered at once with a placeholder that
/// follows the output schema, and its usage is counted with the model's tokenizer. It keeps the
/// real provider's identity (so cache lookups match) and its schema checks.
///
/// Its usage reports as cached the prompt tokens a server's prefix cache would hold if every
/// distinct prefix were computed once (what the dispatcher's ordering and routing aim at): the
/// share of the prompt's text, in whole blocks of [`BLOCK_BYTES`], that an earlier prompt to
/// the model began with.
#[derive(Debug)]
pub struct EstimateProvider {
    real: Arc<dyn Provider>,
    counter: TokenCounter,
    /// The prefix blocks of the prompts answered so far (forgotten all at once beyond
    /// [`PREFIX_MEMORY`]: prompts that share a prefix come close together).
    seen: Mutex<HashSet<u64>>,
}

/// Prefix blocks an estimate remembers (64 MiB of prompt text).
const PREFIX_MEMORY: usize = 1 << 20;

impl EstimateProvider {
    /// Stands in for `real`, counting tokens with `counter`.
    pub fn new(real: Arc<dyn Provider>, counter: TokenCounter) -> Self {
        EstimateProvider {
            real,
            counter,
            seen: Mutex::default(),
        }
    }

    /// Of `prompt_tokens`, those an earlier prompt's prefix covers (in proportion to the text).
    fn shared_prefix_tokens(&self, req: &LlmRequest, prompt_tokens: u64) -> u64 {
        let blocks = prefix_blocks(req);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let held = blocks.iter().take_while(|b| seen.contains(b)).count();
        if seen.len() + blocks.len() > PREFIX_MEMORY {
            seen.clear();
        }
        seen.extend(blocks);
        let text = req.prompt.system.as_ref().map_or(0, String::len) + 1 + req.prompt.user.len();
        let share = (held * BLOCK_BYTES) as f64 / text.max(1) as f64;
        ((prompt_tokens as f64 * share.min(1.0)).floor() as u64).min(prompt_tokens)
    }
}

#[async_trait]
impl Provider for EstimateProvider {
    fn endpoint(&self) -> String {
        self.real.endpoint()
    }

    fn check_schema(&self, schema: Option<&OutputSchema>) -> Result<(), SetupError> {
        self.real.check_schema(schema)
    }

    fn embeds(&self) -> bool {
        self.real.embeds()
    }

    fn gives_confidence(&self) -> bool {
        self.real.gives_confidence()
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        // Distinct prompts get distinct answers, as a model's would: calls made from them (an
        // aggregate's reduce prompts over partial results, `f(g(x))`) are merged only where the
        // run would merge them too.
        let variant = prompt_variant(req);
        let content = match &req.schema {
            Some(schema) => {
                let value = placeholder_variant(&schema.root, variant);
                if schema.is_wrapped() {
                    json!({ "value": value }).to_string()
                } else {
                    value.to_string()
                }
            }
            None => {
                let tokens = TYPICAL_TEXT_TOKENS.min(u64::from(req.max_tokens.unwrap_or(256)));
                text_placeholder(tokens.max(1) as usize, variant)
            }
        };
        let prompt_tokens = self.counter.prompt(req);
        let embeds = self.real.embeds();
        let usage = Usage {
            prompt_tokens,
            // An embedding is not generated text: no completion tokens.
            completion_tokens: if embeds {
                0
            } else {
                self.counter.text(&content)
            },
            // Servers reuse the prefixes of generation prompts, not of embedding inputs.
            cached_prompt_tokens: if embeds {
                0
            } else {
                self.shared_prefix_tokens(req, prompt_tokens)
            },
            cache_write_tokens: 0,
        };
        Ok(LlmResponse {
            confidence: None,
            content,
            finish_reason: Some("stop".into()),
            usage: Some(usage),
            rate: Default::default(),
        })
    }
}

/// A number that tells `req`'s prompt from others (the same prompt, the same number).
fn prompt_variant(req: &LlmRequest) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    req.prompt.system.hash(&mut h);
    req.prompt.user.hash(&mut h);
    h.finish()
}

/// The variant of the `i`-th part of a value of variant `variant` (splitmix64's mix).
fn part_variant(variant: u64, i: usize) -> u64 {
    let mut z = variant.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Words that are one token each, after a space, in every vocabulary sluice counts with.
const ONE_TOKEN_WORDS: [&str; 16] = [
    "the", "of", "and", "to", "in", "is", "for", "on", "that", "with", "as", "at", "by", "it",
    "be", "from",
];

/// A text answer of `tokens` tokens, its words drawn by `variant` (so that the answers of
/// distinct prompts differ).
fn text_placeholder(tokens: usize, variant: u64) -> String {
    let mut rng = fastrand::Rng::with_seed(variant);
    let mut words = vec!["the"];
    words.extend((1..tokens).map(|_| ONE_TOKEN_WORDS[rng.usize(..ONE_TOKEN_WORDS.len())]));
    words.join(" ")
}

/// A value that satisfies `schema` with typical sizes (what the estimate assumes a model
/// returns), drawn by `variant`: items of an array differ from each other, and the answers of
/// distinct prompts differ, as a model's would.
fn placeholder_variant(schema: &SchemaNode, variant: u64) -> Value {
    let as_usize = |v: Option<u64>| v.map(|v| v as usize);
    match &schema.kind {
        SchemaKind::Object { properties, .. } => Value::Object(
            properties
                .iter()
                .map(|(k, s)| (k.clone(), placeholder_variant(s, variant)))
                .collect::<Map<_, _>>(),
        ),
        SchemaKind::Array {
            items,
            min_items,
            max_items,
        } => {
            let n = match (as_usize(*min_items), as_usize(*max_items)) {
                (Some(lo), Some(hi)) => (lo + hi.max(lo)).div_ceil(2),
                (Some(lo), None) => lo.max(1),
                (None, Some(hi)) => hi.min(DEFAULT_ARRAY_ITEMS),
                (None, None) => DEFAULT_ARRAY_ITEMS,
            };
            Value::Array(
                (0..n)
                    .map(|i| placeholder_variant(items, part_variant(variant, i)))
                    .collect(),
            )
        }
        SchemaKind::String {
            enum_values: Some(e),
            ..
        } if !e.is_empty() => Value::from(e[0].clone()),
        SchemaKind::String {
            min_length,
            max_length,
            pattern,
            ..
        } => {
            let lo = as_usize(*min_length).unwrap_or(0);
            let hi = as_usize(*max_length).unwrap_or(usize::MAX).max(lo);
            let chars = TYPICAL_STRING_CHARS.clamp(lo, hi);
            let text = prose(chars, variant);
            match pattern {
                Some(p) => Value::String(p.example(chars, &text).unwrap_or(text)),
                None => Value::String(text),
            }
        }
        SchemaKind::Integer(NumberBounds {
            enum_values: Some(e),
            ..
        })
        | SchemaKind::Number(NumberBounds {
            enum_values: Some(e),
            ..
        }) if !e.is_empty() => Value::Number(e[0].clone()),
        SchemaKind::Integer(b) => {
            let lo = b.minimum.as_ref().and_then(|n| n.as_i64()).unwrap_or(0);
            let hi = b
                .maximum
                .as_ref()
                .and_then(|n| n.as_i64())
                .unwrap_or(i64::MAX);
            json!(lo.max(1000).min(hi))
        }
        SchemaKind::Number(b) => {
            let lo = b.minimum.as_ref().and_then(|n| n.as_f64()).unwrap_or(0.0);
            let hi = b.maximum.as_ref().and_then(|n| n.as_f64()).unwrap_or(1e6);
            json!((lo + hi.max(lo)) / 2.0)
        }
        SchemaKind::Boolean => Value::Bool(true),
    }
}

/// English-like text of exactly `chars` characters (tokenizes like prose, ~4.5 chars a token),
/// its words drawn by `variant`.
fn prose(chars: usize, variant: u64) -> String {
    const WORDS: [&str; 24] = [
        "what",
        "was",
        "the",
        "reported",
        "revenue",
        "growth",
        "for",
        "quarter",
        "and",
        "how",
        "does",
        "company",
        "expect",
        "operating",
        "margin",
        "to",
        "develop",
        "over",
        "next",
        "fiscal",
        "year",
        "guidance",
        "customers",
        "demand",
    ];
    let mut rng = fastrand::Rng::with_seed(variant);
    let mut out = String::with_capacity(chars + 16);
    while out.len() < chars {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(WORDS[rng.usize(..WORDS.len())]);
    }
    out.truncate(chars);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_follows_item_bounds_and_string_lengths() {
        let node = |j| OutputSchema::new(j).unwrap().root;
        let s = node(json!({"type": "object", "properties": {"value": {
            "type": "array", "minItems": 2, "maxItems": 4,
            "items": {"type": "string", "minLength": 10, "maxLength": 30}}}}));
        let v = placeholder_variant(&s, 0);
        let items = v["value"].as_array().unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].as_str().unwrap().len(), 30);
        assert_ne!(items[0], items[1], "items differ");
        assert_ne!(
            placeholder_variant(&s, 1),
            placeholder_variant(&s, 2),
            "the answers of distinct prompts differ"
        );
        let short = placeholder_variant(&node(json!({"type": "string", "minLength": 200})), 0);
        assert_eq!(short.as_str().unwrap().len(), 200);
        assert_eq!(
            placeholder_variant(&node(json!({"type": "string", "enum": ["a", "b"]})), 0),
            json!("a")
        );
        assert_eq!(
            placeholder_variant(
                &node(json!({"type": "integer", "minimum": 1, "maximum": 5})),
                0
            ),
            json!(5)
        );
    }

    #[test]
    fn a_text_answer_has_its_tokens_and_differs_by_prompt() {
        let bpe = tiktoken_rs::o200k_base_singleton();
        let answers: Vec<String> = (0..50).map(|v| text_placeholder(60, v)).collect();
        for a in &answers {
            assert_eq!(bpe.encode_ordinary(a).len(), 60, "{a}");
        }
        let distinct: std::collections::BTreeSet<&String> = answers.iter().collect();
        assert_eq!(distinct.len(), answers.len());
        assert_eq!(text_placeholder(1, 7), "the");
    }

    #[test]
    fn chat_framing_follows_the_cookbook() {
        let words = |s: &str| s.split_whitespace().count() as u64;
        // system: 3 + 1 + 2, user: 3 + 1 + 1, priming 3.
        assert_eq!(chat_prompt_tokens(words, Some("be brief"), "hi"), 14);
        assert_eq!(chat_prompt_tokens(words, None, "hi"), 8);
    }
}

/// A model's [`TokenCounter`], made on first use (loading a vocabulary costs time that runs
/// which never count should not pay).
#[derive(Debug)]
pub struct LazyCounter {
    model: crate::config::ModelConfig,
    counter: std::sync::OnceLock<Option<TokenCounter>>,
}

impl LazyCounter {
    /// The counter of `model`, not made yet.
    pub fn new(model: crate::config::ModelConfig) -> Self {
        LazyCounter {
            model,
            counter: std::sync::OnceLock::new(),
        }
    }

    /// Prompt tokens of `req` as the model is sent it; `None` when the model's tokenizer
    /// cannot be had.
    pub fn prompt(&self, req: &LlmRequest) -> Option<u64> {
        self.counter
            .get_or_init(|| TokenCounter::for_model(&self.model).ok())
            .as_ref()
            .map(|c| c.prompt(req))
    }
}
