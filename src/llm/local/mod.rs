//! The embedded local model: in-process GGUF inference with llama.cpp (through `llama-cpp-2`),
//! so the flagship runs offline with no server and no key.
//!
//! One worker thread owns the model and its context and decodes up to `concurrency` rows
//! together: every step puts the next token of each active sequence (or a chunk of a new
//! sequence's prompt) into one batch, so the CPU works on several rows at once. Prompts are
//! rendered with the model's own chat template (the GGUF's `tokenizer.chat_template`, a Jinja
//! template run with minijinja), and a function's output schema becomes a llama.cpp grammar
//! (llama.cpp's JSON-schema converter), so `generate_questions` returns exactly three strings
//! even from a 135M-parameter model.

use std::path::PathBuf;
use std::sync::Mutex;

use async_trait::async_trait;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use tokio::sync::oneshot;

mod decode;
mod embed;
mod load;
mod prefix;
mod sample;

pub use embed::LocalEmbedder;
pub use load::{LocalSettings, render_chat};

use decode::worker_main;
use load::{Job, backend, missing_model};

use super::Provider;
use crate::config::LocalConfig;
use crate::types::{ErrorKind, LlmError, LlmRequest, LlmResponse};

/// The `local` provider.
#[derive(Debug)]
pub struct LocalProvider {
    settings: LocalSettings,
    identity: String,
    worker: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
}

impl LocalProvider {
    /// A provider for the GGUF at `model`, decoding `concurrency` rows together. The model is
    /// loaded on the first call.
    pub fn new(model: &str, concurrency: usize, cfg: &LocalConfig) -> Self {
        let path = PathBuf::from(model);
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as i32;
        let settings = LocalSettings {
            path: path.clone(),
            parallel: concurrency.clamp(1, 64),
            context_per_sequence: cfg.context_size,
            threads,
        };
        // The file name and size identify the model in cache keys without hashing 100 MB.
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        let name = path
            .file_name()
            .map_or_else(|| model.to_string(), |n| n.to_string_lossy().to_string());
        LocalProvider {
            identity: format!("local:{name}#{size}"),
            settings,
            worker: Mutex::new(None),
        }
    }

    /// The embeddings of the same GGUF (its own worker and context).
    pub fn embedder(&self) -> LocalEmbedder {
        LocalEmbedder::new(
            self.settings.path.clone(),
            self.identity.clone(),
            self.settings.threads,
        )
    }

    fn worker(&self) -> Result<std::sync::mpsc::Sender<Job>, LlmError> {
        let mut w = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = w.as_ref() {
            return Ok(tx.clone());
        }
        if !self.settings.path.exists() {
            return Err(LlmError::new(
                ErrorKind::NotFound,
                missing_model(&self.settings.path),
            ));
        }
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let settings = self.settings.clone();
        std::thread::Builder::new()
            .name("sluice-local-model".into())
            .spawn(move || worker_main(&settings, &rx))
            .map_err(|e| LlmError::new(ErrorKind::NotFound, format!("cannot start: {e}")))?;
        *w = Some(tx.clone());
        Ok(tx)
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn endpoint(&self) -> String {
        self.identity.clone()
    }

    fn gives_confidence(&self) -> bool {
        true
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        let tx = self.worker()?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            system: req.prompt.system.clone(),
            user: req.prompt.user.clone(),
            schema: req.schema.as_ref().map(|s| s.provider_schema().to_string()),
            max_tokens: req.max_tokens.unwrap_or(256),
            temperature: req.temperature.unwrap_or(0.0),
            confidence: req.confidence,
            reply,
        };
        let gone = || LlmError::new(ErrorKind::Connection, "the local model stopped");
        tx.send(job).map_err(|_| gone())?;
        answer.await.unwrap_or_else(|_| Err(gone()))
    }
}

/// A GGUF's vocabulary and chat template, loaded without the weights: counts tokens exactly as
/// the local provider feeds them (for `sluice explain`).
pub struct Vocabulary {
    model: LlamaModel,
    template: Option<String>,
    file_name: String,
}

impl Vocabulary {
    /// Loads the vocabulary of the GGUF at `path`.
    pub fn load(path: &std::path::Path) -> Result<Vocabulary, String> {
        if !path.exists() {
            return Err(missing_model(path));
        }
        let backend = backend().map_err(|e| format!("cannot start llama.cpp: {e}"))?;
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| format!("cannot load {} as a GGUF model: {e}", path.display()))?;
        Ok(Vocabulary {
            template: model.meta_val_str("tokenizer.chat_template").ok(),
            file_name: path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into(),
            ),
            model,
        })
    }

    /// The GGUF's file name.
    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    /// Tokens of plain text (no special tokens).
    pub fn count(&self, text: &str) -> u64 {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), false, false)
            .len() as u64
    }

    /// Prompt tokens of a system + user exchange: the chat template rendered and tokenized as
    /// the provider does it.
    pub fn count_chat(&self, system: Option<&str>, user: &str) -> u64 {
        let vocab = self.model.vocab();
        match render_chat(self.template.as_deref(), system, user) {
            Ok(text) => vocab
                .tokenize(text.as_bytes(), vocab.should_add_bos(), true)
                .len() as u64,
            Err(_) => self.count(system.unwrap_or_default()) + self.count(user),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_template_renders_messages_and_generation_prompt() {
        let t = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
                 message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}\
                 {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let out = render_chat(Some(t), Some("sys"), "hi").unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(render_chat(None, Some("sys"), "hi").unwrap(), out);
    }
}
