//! Embeddings of the embedded local model (a function of `kind = "embedding"` on a model of
//! `kind = "local"`): the GGUF's hidden states, mean-pooled over the input's tokens and
//! normalised to unit length, computed offline by llama.cpp. The vector has the model's
//! embedding width (`n_embd`: 576 for SmolLM2-135M), which the function's `dim` must match.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Mutex;

use async_trait::async_trait;
use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use tokio::sync::oneshot;

use super::load::{backend, missing_model};
use crate::llm::Provider;
use crate::types::{ErrorKind, LlmError, LlmRequest, LlmResponse, Usage};

/// Inputs embedded per request (one worker decodes them one after another).
const PROMPTS_PER_REQUEST: usize = 16;

/// Most tokens of one input (longer inputs are cut: the vector then stands for their start).
const MAX_TOKENS: usize = 2048;

type Reply = oneshot::Sender<Result<Vec<(Vec<f32>, u64)>, LlmError>>;

/// Where a request's inputs go: the worker's queue.
type Jobs = std::sync::mpsc::Sender<(Vec<String>, Reply)>;

/// The local model as an embeddings provider.
#[derive(Debug)]
pub struct LocalEmbedder {
    path: PathBuf,
    identity: String,
    threads: i32,
    worker: Mutex<Option<Jobs>>,
}

impl LocalEmbedder {
    /// The embedder of the GGUF at `path`, named `identity` in request keys.
    pub fn new(path: PathBuf, identity: String, threads: i32) -> Self {
        LocalEmbedder {
            path,
            identity: format!("{identity}#embeddings"),
            threads,
            worker: Mutex::new(None),
        }
    }

    fn worker(&self) -> Result<Jobs, LlmError> {
        let mut w = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = w.as_ref() {
            return Ok(tx.clone());
        }
        if !self.path.exists() {
            return Err(LlmError::new(
                ErrorKind::NotFound,
                missing_model(&self.path),
            ));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (path, threads) = (self.path.clone(), self.threads);
        std::thread::Builder::new()
            .name("sluice-local-embeddings".into())
            .spawn(move || embed_worker(&path, threads, &rx))
            .map_err(|e| LlmError::new(ErrorKind::NotFound, format!("cannot start: {e}")))?;
        *w = Some(tx.clone());
        Ok(tx)
    }
}

/// Loads the model with an embeddings context, then answers jobs until the provider is gone.
fn embed_worker(
    path: &std::path::Path,
    threads: i32,
    rx: &std::sync::mpsc::Receiver<(Vec<String>, Reply)>,
) {
    let fail = |message: String| {
        while let Ok((_, reply)) = rx.recv() {
            let _ = reply.send(Err(LlmError::new(ErrorKind::NotFound, message.clone())));
        }
    };
    let backend = match backend() {
        Ok(b) => b,
        Err(e) => return fail(format!("cannot start llama.cpp: {e}")),
    };
    let model = match LlamaModel::load_from_file(backend, path, &LlamaModelParams::default()) {
        Ok(m) => m,
        Err(e) => {
            return fail(format!(
                "cannot load {} as a GGUF model: {e}",
                path.display()
            ));
        }
    };
    let n = MAX_TOKENS as u32;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n))
        .with_n_batch(n)
        .with_n_ubatch(n)
        .with_embeddings(true)
        .with_pooling_type(LlamaPoolingType::Mean)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = match model.new_context(backend, params) {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot create a llama.cpp embeddings context: {e}")),
    };
    let mut batch = LlamaBatch::new(MAX_TOKENS, 1);
    while let Ok((inputs, reply)) = rx.recv() {
        let mut out = Vec::with_capacity(inputs.len());
        let mut failed = None;
        for input in &inputs {
            let vocab = model.vocab();
            let mut tokens = vocab.tokenize(input.as_bytes(), vocab.should_add_bos(), true);
            if tokens.is_empty() {
                failed = Some("the input has no tokens".into());
                break;
            }
            tokens.truncate(MAX_TOKENS);
            batch.clear();
            let added = batch.add_sequence(&tokens, 0, true);
            ctx.clear_kv_cache();
            let vector = added
                .map_err(|e| e.to_string())
                .and_then(|()| ctx.decode(&mut batch).map_err(|e| e.to_string()))
                .and_then(|()| {
                    ctx.embeddings_seq_ith(0)
                        .map(<[f32]>::to_vec)
                        .map_err(|e| e.to_string())
                });
            match vector {
                Ok(v) => out.push((unit(v), tokens.len() as u64)),
                Err(e) => {
                    failed = Some(format!("llama.cpp could not embed the input: {e}"));
                    break;
                }
            }
        }
        let _ = reply.send(match failed {
            Some(m) => Err(LlmError::new(ErrorKind::ServerError, m)),
            None => Ok(out),
        });
    }
}

/// `v` scaled to unit length (a zero vector stays zero).
fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
    v
}

#[async_trait]
impl Provider for LocalEmbedder {
    fn endpoint(&self) -> String {
        self.identity.clone()
    }

    fn max_prompts_per_request(&self) -> usize {
        PROMPTS_PER_REQUEST
    }

    fn embeds(&self) -> bool {
        true
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        crate::llm::complete_as_list(self, req).await
    }

    async fn complete_list(
        &self,
        reqs: &[LlmRequest],
    ) -> Result<Vec<Result<LlmResponse, LlmError>>, LlmError> {
        let tx = self.worker()?;
        let inputs = reqs.iter().map(|r| r.prompt.user.clone()).collect();
        let (reply, answer) = oneshot::channel();
        let gone = || LlmError::new(ErrorKind::Connection, "the local model stopped");
        tx.send((inputs, reply)).map_err(|_| gone())?;
        let vectors = answer.await.unwrap_or_else(|_| Err(gone()))?;
        Ok(vectors
            .into_iter()
            .map(|(v, tokens)| {
                Ok(LlmResponse {
                    confidence: None,
                    content: serde_json::to_string(&v).unwrap_or_default(),
                    finish_reason: Some("stop".into()),
                    usage: Some(Usage {
                        prompt_tokens: tokens,
                        completion_tokens: 0,
                        cached_prompt_tokens: 0,
                        cache_write_tokens: 0,
                    }),
                    rate: Default::default(),
                })
            })
            .collect())
    }
}
