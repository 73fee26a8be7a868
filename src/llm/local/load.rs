//! What the local model's parts share: llama.cpp's backend (initialised once per process), the
//! settings, a decoding job, and the chat template rendering.

use std::path::PathBuf;
use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;
use tokio::sync::oneshot;

use crate::types::{LlmError, LlmResponse};

/// llama.cpp's backend may be initialised once per process.
static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

pub(super) fn backend() -> Result<&'static LlamaBackend, String> {
    BACKEND
        .get_or_init(|| {
            let mut b = LlamaBackend::init().map_err(|e| e.to_string())?;
            b.void_logs();
            Ok(b)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Settings of the local model.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// The GGUF file.
    pub path: PathBuf,
    /// Sequences decoded together.
    pub parallel: usize,
    /// Context tokens per sequence (prompt + output).
    pub context_per_sequence: u32,
    /// CPU threads for decoding.
    pub threads: i32,
}

pub(super) struct Job {
    pub system: Option<String>,
    pub user: String,
    pub schema: Option<String>,
    pub max_tokens: u32,
    pub temperature: f64,
    /// Whether the answer's confidence is asked for (its least likely token's probability).
    pub confidence: bool,
    pub reply: oneshot::Sender<Result<LlmResponse, LlmError>>,
}

/// Renders the GGUF's chat template (or a ChatML fallback) for one system + user exchange.
pub fn render_chat(
    template: Option<&str>,
    system: Option<&str>,
    user: &str,
) -> Result<String, String> {
    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
                          {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let mut env = minijinja::Environment::new();
    env.add_template("chat", template.unwrap_or(CHATML))
        .map_err(|e| format!("the model's chat template does not parse: {e}"))?;
    let mut messages = vec![];
    if let Some(s) = system {
        messages.push(minijinja::context! { role => "system", content => s });
    }
    messages.push(minijinja::context! { role => "user", content => user });
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => "",
                eos_token => "",
            })
        })
        .map_err(|e| format!("the model's chat template failed: {e}"))
}

/// The error for a GGUF path that does not exist, with the fix.
pub(super) fn missing_model(path: &std::path::Path) -> String {
    format!(
        "model file {} not found: run scripts/fetch-model.sh for the default model, or set \
         model = \"path/to/model.gguf\" in sluice.toml",
        path.display()
    )
}
