//! The decode loop of the local model's worker thread: rows join free slots, every step
//! decodes one batch holding a prompt chunk or the next token of each active sequence, and a
//! sequence that stops (end of generation, its `max_tokens`, its context) answers its row.
//! A sequence whose prompt starts with tokens another slot holds takes those cells instead of
//! decoding them again (see `prefix`); a finished sequence's cells stay in its slot for that
//! until a new row is placed there.

use std::collections::HashMap;
use std::num::NonZeroU32;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use super::load::{Job, LocalSettings, backend, render_chat};
use super::prefix::{Held, Plan, place, plan};
use super::sample::{PENALTY_WINDOW, best_penalised, log_prob, penalised};
use crate::types::{ErrorKind, LlmError, LlmResponse, Usage};

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
    /// The prompt's tokens.
    prompt: Vec<LlamaToken>,
    /// Prompt tokens in the cells or in the current batch (taken from another slot or decoded).
    fed: usize,
    /// Whether its cells were set up (a prefix taken or none): until then it may wait for a
    /// sequence that is decoding a prefix it shares.
    started: bool,
    /// Prompt tokens taken from cells that another sequence decoded.
    reused: usize,
    /// Position of the next token.
    pos: i32,
    /// The token to feed next (after the prompt).
    next: Option<LlamaToken>,
    output: Vec<u8>,
    generated: u32,
    /// Index in the batch of this sequence's logits, when it has one this step.
    logits_at: Option<i32>,
    /// The least log-probability of a token it generated (when its confidence is asked for).
    least_logprob: f64,
}

fn fail_all(rx: &std::sync::mpsc::Receiver<Job>, message: &str) {
    while let Ok(job) = rx.recv() {
        let _ = job
            .reply
            .send(Err(LlmError::new(ErrorKind::NotFound, message.to_string())));
    }
}

pub(super) fn worker_main(s: &LocalSettings, rx: &std::sync::mpsc::Receiver<Job>) {
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
    let mut grammars: HashMap<String, Result<String, String>> = HashMap::new();
    let mut slots: Vec<Option<Active>> = (0..s.parallel).map(|_| None).collect();
    let mut held: Vec<Held> = (0..s.parallel).map(|_| Held::default()).collect();
    let mut batch = LlamaBatch::new(n_batch as usize, s.parallel as i32);
    let mut stats = StepStats::default();
    loop {
        let starting = |job| start(job, &model, template.as_deref(), &mut grammars, per_seq);
        if !admit(rx, &mut slots, &mut held, stats.steps, starting) {
            return;
        }
        if slots.iter().all(Option::is_none) {
            continue;
        }
        start_sequences(&mut ctx, &mut slots, &mut held, &mut stats);
        let only_generation = fill_batch(&mut batch, &mut slots, &mut held, n_batch as usize);
        if batch.n_tokens() == 0 {
            start_from_nothing(&mut ctx, &mut slots, &mut held, &mut stats);
            continue;
        }
        let step = std::time::Instant::now();
        let decoded = ctx.decode(&mut batch);
        stats.count(
            step.elapsed(),
            only_generation.then(|| batch.n_tokens() as u64),
        );
        if let Err(e) = decoded {
            let msg = format!("llama.cpp decode failed: {e}");
            for slot in slots.iter_mut() {
                if let Some(a) = slot.take() {
                    let _ = a
                        .job
                        .reply
                        .send(Err(LlmError::new(ErrorKind::ServerError, msg.clone())));
                }
            }
            // No cells are trusted after a failed step: kept prefixes go too.
            ctx.clear_kv_cache();
            for h in held.iter_mut() {
                h.tokens.clear();
            }
            continue;
        }
        sample_step(&model, &mut ctx, &mut slots, &mut held, per_seq, &stats);
    }
}

/// Only sequences waiting for a prefix that nothing decodes: cannot happen (they wait on
/// started sequences, which always have room), but the loop never spins on an empty batch: they
/// start from nothing.
fn start_from_nothing(
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    slots: &mut [Option<Active>],
    held: &mut [Held],
    stats: &mut StepStats,
) {
    for (seq, a) in slots.iter_mut().enumerate() {
        if let Some(a) = a.as_mut().filter(|a| !a.started) {
            let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
            held[seq].tokens.clear();
            a.started = true;
            stats.prompt_sent += a.prompt.len() as u64;
        }
    }
}

/// Sets up the cells of the sequences that have not started: each takes the longest prefix of
/// its prompt that a slot holds, waits for one that a started sequence is decoding, or starts
/// from nothing. All plans are made against the cells as they were before this step's batch.
fn start_sequences(
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    slots: &mut [Option<Active>],
    held: &mut [Held],
    stats: &mut StepStats,
) {
    for me in 0..slots.len() {
        let Some(a) = slots[me].as_ref().filter(|a| !a.started) else {
            continue;
        };
        let holding: Vec<&[LlamaToken]> = held.iter().map(|h| &h.tokens[..]).collect();
        let coming: Vec<Option<&[LlamaToken]>> = slots
            .iter()
            .map(|s| {
                s.as_ref()
                    .filter(|b| b.started && b.fed < b.prompt.len())
                    .map(|b| &b.prompt[..])
            })
            .collect();
        let decided = plan(me, &a.prompt, &holding, &coming);
        let seq = me as i32;
        let taken = match decided {
            Plan::Wait => continue,
            Plan::Fresh => 0,
            Plan::Take { from, len } => {
                let copied = from == me
                    || (ctx.clear_kv_cache_seq(Some(me as u32), None, None).is_ok()
                        && ctx.copy_kv_cache_seq(from as i32, seq, None, None).is_ok());
                // Positions from `len` on go: the rest of the source's prompt or output.
                if copied && ctx.kv_cache_seq_rm(seq, Some(len as u32), None).is_ok() {
                    let tokens = held[from].tokens[..len].to_vec();
                    held[me].tokens = tokens;
                    len
                } else {
                    0
                }
            }
        };
        if taken == 0 {
            let _ = ctx.clear_kv_cache_seq(Some(me as u32), None, None);
            held[me].tokens.clear();
        }
        let Some(a) = slots[me].as_mut() else {
            continue;
        };
        a.started = true;
        a.fed = taken;
        a.pos = taken as i32;
        a.reused = taken;
        stats.prompt_sent += a.prompt.len() as u64;
        stats.prompt_reused += taken as u64;
        if taken > 0 {
            tracing::debug!(
                "local model: a row takes {taken} of its {} prompt tokens from kept cells ({:?})",
                a.prompt.len(),
                decided
            );
        }
    }
}

/// Decode steps and the time llama.cpp spent in them, against the loop's wall time; and the
/// steps that carried only generated tokens (no prompt), comparable with llama.cpp's own
/// text-generation figure.
#[derive(Debug)]
struct StepStats {
    started: std::time::Instant,
    steps: u64,
    time: std::time::Duration,
    generation_steps: u64,
    generation_tokens: u64,
    generation_time: std::time::Duration,
    /// Prompt tokens of the sequences started, and those of them taken from kept cells.
    prompt_sent: u64,
    prompt_reused: u64,
}

impl Default for StepStats {
    fn default() -> Self {
        StepStats {
            started: std::time::Instant::now(),
            steps: 0,
            time: std::time::Duration::ZERO,
            generation_steps: 0,
            generation_tokens: 0,
            generation_time: std::time::Duration::ZERO,
            prompt_sent: 0,
            prompt_reused: 0,
        }
    }
}

impl StepStats {
    /// Counts one step that took `t`; `generated` is its token count if it carried only
    /// generated tokens.
    fn count(&mut self, t: std::time::Duration, generated: Option<u64>) {
        self.steps += 1;
        self.time += t;
        if let Some(n) = generated {
            self.generation_steps += 1;
            self.generation_tokens += n;
            self.generation_time += t;
        }
    }
}

/// Puts waiting rows into free slots (the one holding the longest prefix of the prompt, else
/// an empty one, else the one used longest ago), blocking only when nothing is running; false
/// when the provider is gone.
fn admit(
    rx: &std::sync::mpsc::Receiver<Job>,
    slots: &mut [Option<Active>],
    held: &mut [Held],
    now: u64,
    mut start: impl FnMut(Job) -> Option<Active>,
) -> bool {
    let put = |a: Active, slots: &mut [Option<Active>], held: &mut [Held]| {
        let free: Vec<usize> = (0..slots.len()).filter(|&s| slots[s].is_none()).collect();
        if let Some(s) = place(&a.prompt, &free, held) {
            held[s].used_at = now;
            slots[s] = Some(a);
        }
    };
    if slots.iter().all(Option::is_none) {
        match rx.recv() {
            Ok(job) => {
                if let Some(a) = start(job) {
                    put(a, slots, held);
                }
            }
            Err(_) => return false,
        }
    }
    while slots.iter().any(Option::is_none) {
        match rx.try_recv() {
            Ok(job) => {
                if let Some(a) = start(job) {
                    put(a, slots, held);
                }
            }
            Err(_) => break,
        }
    }
    true
}

/// One batch: a prompt chunk or the next token of every started sequence. Returns whether it
/// carries only generated tokens.
fn fill_batch(
    batch: &mut LlamaBatch,
    slots: &mut [Option<Active>],
    held: &mut [Held],
    n_batch: usize,
) -> bool {
    batch.clear();
    let mut room = n_batch;
    for (seq, slot) in slots.iter_mut().enumerate() {
        let Some(a) = slot.as_mut() else { continue };
        a.logits_at = None;
        if room == 0 || !a.started {
            continue;
        }
        if a.fed < a.prompt.len() {
            let take = (a.prompt.len() - a.fed).min(room);
            let end = a.fed + take;
            for i in a.fed..end {
                let logits = i + 1 == a.prompt.len();
                if batch
                    .add(a.prompt[i], a.pos, &[seq as i32], logits)
                    .is_err()
                {
                    break;
                }
                if logits {
                    a.logits_at = Some(batch.n_tokens() - 1);
                }
                held[seq].tokens.push(a.prompt[i]);
                a.fed += 1;
                a.pos += 1;
            }
            room -= take;
        } else if let Some(t) = a.next.take()
            && batch.add(t, a.pos, &[seq as i32], true).is_ok()
        {
            a.logits_at = Some(batch.n_tokens() - 1);
            held[seq].tokens.push(t);
            a.pos += 1;
            room -= 1;
        }
    }
    slots
        .iter()
        .flatten()
        .all(|a| a.fed == a.prompt.len() && a.pos as usize > a.prompt.len())
}

/// After a decode: the next token of every sequence that had logits; a sequence that stopped
/// or is full answers its row and frees its slot.
fn sample_step(
    model: &LlamaModel,
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    slots: &mut [Option<Active>],
    held: &mut [Held],
    per_seq: u32,
    stats: &StepStats,
) {
    let vocab = model.vocab();
    for (seq, slot) in slots.iter_mut().enumerate() {
        let Some(a) = slot.as_mut() else { continue };
        let Some(i) = a.logits_at else { continue };
        let token = next_token(ctx, i, a);
        let stop = vocab.is_eog(token);
        if !stop {
            a.output
                .extend_from_slice(&vocab.token_to_piece(token, false, None));
            a.generated += 1;
        }
        let full = a.generated >= a.job.max_tokens || a.pos as u32 + 1 >= per_seq;
        if !(stop || full) {
            a.next = Some(token);
            continue;
        }
        let a = slot.take().expect("active");
        tracing::debug!(
            "local model: row done, {} prompt ({} taken from kept cells, {} decoded) + {} \
             generated tokens; prompt tokens so far: {} sent, {} taken from kept cells; {} \
             decode steps so far took {:?} in llama.cpp of {:?}; generation-only steps: {} \
             steps, {} tokens, {:.3} s",
            a.prompt.len(),
            a.reused,
            a.prompt.len() - a.reused,
            a.generated,
            stats.prompt_sent,
            stats.prompt_reused,
            stats.steps,
            stats.time,
            stats.started.elapsed(),
            stats.generation_steps,
            stats.generation_tokens,
            stats.generation_time.as_secs_f64()
        );
        // Its cells stay, for a later prompt that starts the same way.
        held[seq].used_at = stats.steps;
        let finish = if stop { "stop" } else { "length" };
        let _ = a.job.reply.send(Ok(LlmResponse {
            confidence: a.job.confidence.then(|| a.least_logprob.exp()),
            content: String::from_utf8_lossy(&a.output).to_string(),
            finish_reason: Some(finish.to_string()),
            usage: Some(Usage {
                prompt_tokens: a.prompt.len() as u64,
                completion_tokens: u64::from(a.generated),
                cached_prompt_tokens: a.reused as u64,
                cache_write_tokens: 0,
            }),
            rate: Default::default(),
        }));
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
    // The recent tokens, sorted and without repeats: the penalty is applied by walking this
    // list alongside the vocabulary (a scan of the window per vocabulary entry cost ~10% of a
    // constrained run's time in a debug build).
    let mut recent: Vec<usize> = a.recent.iter().map(|r| r.0 as usize).collect();
    recent.sort_unstable();
    recent.dedup();
    let mut chosen = None;
    if a.greedy {
        let best = best_penalised(ctx.get_logits_ith(i), &recent);
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
                if recent.binary_search(&(d.id().0 as usize)).is_ok() {
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
    if a.job.confidence {
        let lp = log_prob(ctx.get_logits_ith(i), &recent, token.0 as usize);
        a.least_logprob = a.least_logprob.min(lp);
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
    Some(Active {
        job,
        grammar: grammar_sampler,
        base,
        recent: std::collections::VecDeque::with_capacity(PENALTY_WINDOW),
        greedy,
        prompt,
        fed: 0,
        started: false,
        reused: 0,
        pos: 0,
        next: None,
        output: Vec::new(),
        generated: 0,
        logits_at: None,
        least_logprob: 0.0,
    })
}
