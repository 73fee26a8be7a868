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

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use async_trait::async_trait;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::oneshot;

use super::Provider;
use crate::config::LocalConfig;
use crate::types::{ErrorKind, LlmError, LlmRequest, LlmResponse, Usage};

/// llama.cpp's backend may be initialised once per process.
static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

fn backend() -> Result<&'static LlamaBackend, String> {
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

struct Job {
    system: Option<String>,
    user: String,
    schema: Option<String>,
    max_tokens: u32,
    temperature: f64,
    reply: oneshot::Sender<Result<LlmResponse, LlmError>>,
}

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

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        let tx = self.worker()?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            system: req.prompt.system.clone(),
            user: req.prompt.user.clone(),
            schema: req.schema.as_ref().map(|s| s.provider_schema().to_string()),
            max_tokens: req.max_tokens.unwrap_or(256),
            temperature: req.temperature.unwrap_or(0.0),
            reply,
        };
        let gone = || LlmError::new(ErrorKind::Connection, "the local model stopped");
        tx.send(job).map_err(|_| gone())?;
        answer.await.unwrap_or_else(|_| Err(gone()))
    }
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
fn missing_model(path: &std::path::Path) -> String {
    format!(
        "model file {} not found: run scripts/fetch-model.sh for the default model, or set \
         model = \"path/to/model.gguf\" in sluice.toml",
        path.display()
    )
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

/// A sequence being decoded.
struct Active {
    job: Job,
    /// The output schema's grammar, if any.
    grammar: Option<LlamaSampler>,
    /// Greedy, or temperature + random draw.
    base: LlamaSampler,
    /// The last tokens generated, for the repetition penalty.
    recent: std::collections::VecDeque<LlamaToken>,
    greedy: bool,
    /// Prompt tokens not yet decoded.
    prompt: Vec<LlamaToken>,
    prompt_len: usize,
    /// Position of the next token.
    pos: i32,
    /// The token to feed next (after the prompt).
    next: Option<LlamaToken>,
    output: Vec<u8>,
    generated: u32,
    /// Index in the batch of this sequence's logits, when it has one this step.
    logits_at: Option<i32>,
}

fn fail_all(rx: &std::sync::mpsc::Receiver<Job>, message: &str) {
    while let Ok(job) = rx.recv() {
        let _ = job
            .reply
            .send(Err(LlmError::new(ErrorKind::NotFound, message.to_string())));
    }
}

fn worker_main(s: &LocalSettings, rx: &std::sync::mpsc::Receiver<Job>) {
    let backend = match backend() {
        Ok(b) => b,
        Err(e) => return fail_all(rx, &format!("cannot start llama.cpp: {e}")),
    };
    let model = match LlamaModel::load_from_file(backend, &s.path, &LlamaModelParams::default()) {
        Ok(m) => m,
        Err(e) => {
            return fail_all(
                rx,
                &format!("cannot load {} as a GGUF model: {e}", s.path.display()),
            );
        }
    };
    let template = model.meta_val_str("tokenizer.chat_template").ok();
    let per_seq = s.context_per_sequence.min(model.n_ctx_train().max(512));
    let n_ctx = per_seq * s.parallel as u32;
    let n_batch = n_ctx.min(2048);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch.min(512))
        .with_n_seq_max(s.parallel as u32)
        .with_n_threads(s.threads)
        .with_n_threads_batch(s.threads);
    let mut ctx = match model.new_context(backend, params) {
        Ok(c) => c,
        Err(e) => return fail_all(rx, &format!("cannot create a llama.cpp context: {e}")),
    };
    let vocab = model.vocab();
    let mut grammars: HashMap<String, Result<String, String>> = HashMap::new();
    let mut slots: Vec<Option<Active>> = (0..s.parallel).map(|_| None).collect();
    let mut batch = LlamaBatch::new(n_batch as usize, s.parallel as i32);
    // Decode steps and the time llama.cpp spent in them, against the loop's wall time; and the
    // steps that carried only generated tokens (no prompt), comparable with llama.cpp's own
    // text-generation figure: (steps, tokens, time).
    let mut steps = (0u64, std::time::Duration::ZERO);
    let mut generation = (0u64, 0u64, std::time::Duration::ZERO);
    let started = std::time::Instant::now();
    loop {
        // Admit new rows into free slots; block only when nothing is running.
        if slots.iter().all(Option::is_none) {
            match rx.recv() {
                Ok(job) => {
                    slots[0] = start(job, &model, template.as_deref(), &mut grammars, per_seq)
                }
                Err(_) => return,
            }
        }
        for slot in slots.iter_mut().filter(|s| s.is_none()) {
            match rx.try_recv() {
                Ok(job) => *slot = start(job, &model, template.as_deref(), &mut grammars, per_seq),
                Err(_) => break,
            }
        }
        if slots.iter().all(Option::is_none) {
            continue;
        }
        // One batch: a prompt chunk or the next token of every active sequence.
        batch.clear();
        let mut room = n_batch as usize;
        for (seq, slot) in slots.iter_mut().enumerate() {
            let Some(a) = slot.as_mut() else { continue };
            a.logits_at = None;
            if room == 0 {
                continue;
            }
            if !a.prompt.is_empty() {
                let take = a.prompt.len().min(room);
                let chunk: Vec<LlamaToken> = a.prompt.drain(..take).collect();
                let last_of_prompt = a.prompt.is_empty();
                for (i, t) in chunk.iter().enumerate() {
                    let logits = last_of_prompt && i + 1 == take;
                    if batch.add(*t, a.pos, &[seq as i32], logits).is_err() {
                        break;
                    }
                    if logits {
                        a.logits_at = Some(batch.n_tokens() - 1);
                    }
                    a.pos += 1;
                }
                room -= take;
            } else if let Some(t) = a.next.take()
                && batch.add(t, a.pos, &[seq as i32], true).is_ok()
            {
                a.logits_at = Some(batch.n_tokens() - 1);
                a.pos += 1;
                room -= 1;
            }
        }
        let only_generation = slots
            .iter()
            .flatten()
            .all(|a| a.prompt.is_empty() && a.pos as usize > a.prompt_len);
        let step = std::time::Instant::now();
        let decoded = ctx.decode(&mut batch);
        let decode_time = step.elapsed();
        steps.0 += 1;
        steps.1 += decode_time;
        if only_generation {
            generation.0 += 1;
            generation.1 += batch.n_tokens() as u64;
            generation.2 += decode_time;
        }
        if let Err(e) = decoded {
            let msg = format!("llama.cpp decode failed: {e}");
            for (seq, slot) in slots.iter_mut().enumerate() {
                if let Some(a) = slot.take() {
                    let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
                    let _ = a
                        .job
                        .reply
                        .send(Err(LlmError::new(ErrorKind::ServerError, msg.clone())));
                }
            }
            continue;
        }
        for (seq, slot) in slots.iter_mut().enumerate() {
            let Some(a) = slot.as_mut() else { continue };
            let Some(i) = a.logits_at else { continue };
            let token = next_token(&ctx, i, a);
            let stop = vocab.is_eog(token);
            if !stop {
                a.output
                    .extend_from_slice(&vocab.token_to_piece(token, false, None));
                a.generated += 1;
            }
            let full = a.generated >= a.job.max_tokens || a.pos as u32 + 1 >= per_seq;
            if stop || full {
                let a = slot.take().expect("active");
                tracing::debug!(
                    "local model: row done, {} prompt + {} generated tokens; {} decode steps \
                     so far took {:?} in llama.cpp of {:?}; generation-only steps: {} steps, {} \
                     tokens, {:.3} s",
                    a.prompt_len,
                    a.generated,
                    steps.0,
                    steps.1,
                    started.elapsed(),
                    generation.0,
                    generation.1,
                    generation.2.as_secs_f64()
                );
                let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
                let finish = if stop { "stop" } else { "length" };
                let _ = a.job.reply.send(Ok(LlmResponse {
                    content: String::from_utf8_lossy(&a.output).to_string(),
                    finish_reason: Some(finish.to_string()),
                    usage: Some(Usage {
                        prompt_tokens: a.prompt_len as u64,
                        completion_tokens: u64::from(a.generated),
                    }),
                }));
            } else {
                a.next = Some(token);
            }
        }
    }
}

/// Repetition penalty on the last [`PENALTY_WINDOW`] tokens (llama.cpp's `repeat_penalty`):
/// small models fall into loops such as `0.00,0.00,...` without it.
const PENALTY: f32 = 1.15;
const PENALTY_WINDOW: usize = 64;

fn penalised(logit: f32) -> f32 {
    if logit > 0.0 {
        logit / PENALTY
    } else {
        logit * PENALTY
    }
}

/// Picks the next token of a sequence from the logits at batch index `i`.
///
/// Greedy decoding reads the logits in place: one pass for the best token with the repetition
/// penalty applied to the recent ones, no 50k-entry candidate array. With a grammar, the best
/// token is checked alone first, as llama.cpp's own sampler does; the whole vocabulary goes
/// through the grammar only when that token is not allowed (checking ~50k tokens at every step
/// is what makes constrained decoding slow).
fn next_token(ctx: &llama_cpp_2::context::LlamaContext<'_>, i: i32, a: &mut Active) -> LlamaToken {
    use llama_cpp_2::token::data::LlamaTokenData;
    use llama_cpp_2::token::data_array::LlamaTokenDataArray;
    let recent = |t: usize| a.recent.iter().any(|r| r.0 as usize == t);
    let mut chosen = None;
    if a.greedy {
        let logits = ctx.get_logits_ith(i);
        let mut best = (0usize, f32::NEG_INFINITY);
        for (t, &l) in logits.iter().enumerate() {
            if l > best.1 {
                best = (t, l);
            }
        }
        // The penalty only lowers logits: re-check the recent tokens and the winner.
        if recent(best.0) {
            best = (0, f32::NEG_INFINITY);
            for (t, &l) in logits.iter().enumerate() {
                let l = if recent(t) { penalised(l) } else { l };
                if l > best.1 {
                    best = (t, l);
                }
            }
        }
        let token = LlamaToken(best.0 as i32);
        match a.grammar.as_mut() {
            None => chosen = Some(token),
            Some(grammar) => {
                let mut one =
                    LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, best.1, 0.0)], false);
                one.apply_sampler(grammar);
                if one.data[0].logit().is_finite() {
                    chosen = Some(token);
                }
            }
        }
    }
    let token = match chosen {
        Some(t) => t,
        None => {
            let mut all = ctx.token_data_array_ith(i);
            for d in all.data.iter_mut() {
                if recent(d.id().0 as usize) {
                    d.set_logit(penalised(d.logit()));
                }
            }
            if let Some(grammar) = a.grammar.as_mut() {
                all.apply_sampler(grammar);
            }
            all.apply_sampler(&mut a.base);
            all.selected_token()
                .unwrap_or_else(|| all.sample_token_greedy())
        }
    };
    if let Some(grammar) = a.grammar.as_mut() {
        grammar.accept(token);
    }
    if a.recent.len() == PENALTY_WINDOW {
        a.recent.pop_front();
    }
    a.recent.push_back(token);
    token
}

/// Tokenizes a job's prompt and builds its sampler; replies with an error and returns `None`
/// when it cannot run.
fn start(
    job: Job,
    model: &LlamaModel,
    template: Option<&str>,
    grammars: &mut HashMap<String, Result<String, String>>,
    per_seq: u32,
) -> Option<Active> {
    let vocab = model.vocab();
    let fail = |job: Job, kind: ErrorKind, msg: String| {
        let _ = job.reply.send(Err(LlmError::new(kind, msg)));
        None
    };
    let text = match render_chat(template, job.system.as_deref(), &job.user) {
        Ok(t) => t,
        Err(e) => return fail(job, ErrorKind::Template, e),
    };
    let prompt = vocab.tokenize(text.as_bytes(), vocab.should_add_bos(), true);
    if prompt.len() as u32 + job.max_tokens.min(64) >= per_seq {
        let msg = format!(
            "the prompt has {} tokens; the local model's context holds {per_seq} per row \
             (context_size in sluice.toml)",
            prompt.len()
        );
        return fail(job, ErrorKind::TooLarge, msg);
    }
    let mut grammar_sampler = None;
    if let Some(schema) = &job.schema {
        let grammar = grammars
            .entry(schema.clone())
            .or_insert_with(|| {
                llama_cpp_2::json_schema_to_grammar(schema).map_err(|e| e.to_string())
            })
            .clone();
        match grammar
            .and_then(|g| LlamaSampler::grammar(model, &g, "root").map_err(|e| e.to_string()))
        {
            Ok(g) => grammar_sampler = Some(g),
            Err(e) => {
                return fail(
                    job,
                    ErrorKind::BadRequest,
                    format!("cannot turn the output schema into a grammar: {e}"),
                );
            }
        }
    }
    let greedy = job.temperature <= 0.0;
    let base = if greedy {
        LlamaSampler::greedy()
    } else {
        LlamaSampler::chain_simple([
            LlamaSampler::temp(job.temperature as f32),
            LlamaSampler::dist(fastrand::u32(..)),
        ])
    };
    let prompt_len = prompt.len();
    Some(Active {
        job,
        grammar: grammar_sampler,
        base,
        recent: std::collections::VecDeque::with_capacity(PENALTY_WINDOW),
        greedy,
        prompt,
        prompt_len,
        pos: 0,
        next: None,
        output: Vec::new(),
        generated: 0,
        logits_at: None,
    })
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
