//! The models a call's rows go to: one, or a cascade. In a cascade every row is asked of the
//! first model, with its answer's confidence; a row whose answer is less confident than the
//! model's `min_confidence`, or whose call failed, is asked of the next model, and so on; the
//! last model answers every row it is asked. A failure of a model itself (a refused key, an
//! unreachable server, a spent budget) fails the statement instead: a misconfigured small
//! model never sends every row to the large one unnoticed. Each model's answers are cached under their own
//! keys (a cascade's confident answers apart from plain ones), so a re-run asks nothing again.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::call::PhysicalCall;
use crate::llm::Dispatcher;
use crate::llm::dispatch::{CallResult, CascadeTally, FunctionCaller, split_confident};
use crate::types::RenderedPrompt;

/// One model of a call, ready to be asked.
#[derive(Debug)]
pub(super) struct Stage {
    /// Its caller (asking for confidence when `min_confidence` is set).
    pub caller: FunctionCaller,
    /// The model's name in sluice.toml.
    pub model: String,
    /// Below this confidence a row goes on to the next stage (none: the last).
    pub min_confidence: Option<f64>,
    /// Its counters, in a cascade.
    pub tally: Option<Arc<CascadeTally>>,
}

/// The stages of `call`: its model, or each model of its cascade.
pub(super) fn stages(dispatcher: &Dispatcher, call: &PhysicalCall) -> Vec<Stage> {
    if call.cascade.is_empty() {
        return vec![Stage {
            caller: dispatcher.caller(&call.model, call.spec()),
            model: call.model_name.clone(),
            min_confidence: None,
            tally: None,
        }];
    }
    let metrics = dispatcher.metrics().function(&call.def.name);
    let reference = call.cascade.last().and_then(|m| m.model.prices);
    call.cascade
        .iter()
        .enumerate()
        .map(|(position, m)| {
            let tally = metrics.cascade_tally((&m.name, position), reference);
            let mut handle = m.model.for_kind(call.embedding);
            handle.tally = Some(tally.clone());
            let mut spec = call.spec();
            spec.confidence = m.min_confidence.is_some();
            spec.in_cascade = true;
            Stage {
                caller: dispatcher.caller(&handle, spec),
                model: m.name.clone(),
                min_confidence: m.min_confidence,
                tally: Some(tally),
            }
        })
        .collect()
}

/// Asks `stage` for `prompts` (with their packed `items`, when the function packs rows).
async fn ask(
    stage: &Stage,
    prompts: Vec<RenderedPrompt>,
    items: Option<Vec<String>>,
    progress: &AtomicUsize,
) -> Vec<CallResult> {
    match items {
        Some(items) => stage.caller.call_all_packed(prompts, items, progress).await,
        None => stage.caller.call_all(prompts, progress).await,
    }
}

/// The rows a model of a cascade is asked: their places among the prompts, their prompts, and
/// their packed items (for a function that packs rows).
struct Asked {
    places: Vec<usize>,
    prompts: Vec<RenderedPrompt>,
    items: Option<Vec<String>>,
}

/// The row's result when a model that may pass it on answered `r`: kept when confident enough
/// (or when the model itself failed: a refused key, an unreachable server, a spent budget are
/// the statement's, not a row's to pass on to a dearer model); `None`: passed on.
fn kept(r: &CallResult, min: f64) -> Option<CallResult> {
    match r {
        Ok(v) => {
            let (value, confidence) = split_confident(v);
            (confidence >= min).then(|| Ok(Arc::new(value)))
        }
        Err(e) if e.kind.is_systemic() => Some(r.clone()),
        Err(_) => None,
    }
}

/// Counts what model `s` of a cascade did with `asked` rows, of which it answered `answered`
/// and finished `done`: the function's counters count a row once, asked of its first model
/// and finished by the model that answers it (the last model counts its own).
fn count(stage: &Stage, s: usize, (asked, done, answered): (usize, usize, usize)) {
    let fm = stage.caller.metrics();
    if s == 0 {
        fm.prompts.fetch_add(asked as u64, Ordering::Relaxed);
    }
    fm.rows_finished.fetch_add(done as u64, Ordering::Relaxed);
    if let Some(t) = &stage.tally {
        t.answered.fetch_add(answered as u64, Ordering::Relaxed);
    }
}

/// One result per prompt, in order, with the stage that gave it (an error: the last stage
/// asked). `items`: the rows' packed items, for a function that packs rows.
pub(super) async fn answer(
    stages: &[Stage],
    prompts: Vec<RenderedPrompt>,
    items: Option<Vec<String>>,
    progress: &AtomicUsize,
) -> Vec<(CallResult, usize)> {
    let n = prompts.len();
    let mut results: Vec<Option<(CallResult, usize)>> = vec![None; n];
    let mut rows = Asked {
        places: (0..n).collect(),
        prompts,
        items,
    };
    for (s, stage) in stages.iter().enumerate() {
        if rows.places.is_empty() {
            break;
        }
        if let Some(t) = &stage.tally {
            t.asked
                .fetch_add(rows.places.len() as u64, Ordering::Relaxed);
        }
        let Some(min) = stage.min_confidence else {
            // The last model: its result is the row's (its caller counts the rows it finishes).
            let answers = ask(stage, rows.prompts, rows.items, progress).await;
            if let Some(t) = &stage.tally {
                let answered = answers.iter().filter(|r| r.is_ok()).count();
                t.answered.fetch_add(answered as u64, Ordering::Relaxed);
            }
            for (place, r) in rows.places.into_iter().zip(answers) {
                results[place] = Some((r, s));
            }
            break;
        };
        // A row passed on is not finished: its progress is counted by the stage that answers.
        let asked = AtomicUsize::new(0);
        let answers = ask(stage, rows.prompts.clone(), rows.items.clone(), &asked).await;
        let mut next = Asked {
            places: vec![],
            prompts: vec![],
            items: rows.items.as_ref().map(|_| vec![]),
        };
        let mut items = rows.items.map(|i| i.into_iter());
        let asked_rows = rows.places.len();
        let mut answered = 0;
        for ((place, prompt), r) in rows.places.into_iter().zip(rows.prompts).zip(answers) {
            let item = items.as_mut().and_then(Iterator::next);
            match kept(&r, min) {
                Some(r) => {
                    answered += usize::from(r.is_ok());
                    results[place] = Some((r, s));
                }
                None => {
                    next.places.push(place);
                    next.prompts.push(prompt);
                    if let (Some(all), Some(item)) = (next.items.as_mut(), item) {
                        all.push(item);
                    }
                }
            }
        }
        let done = asked
            .load(Ordering::Relaxed)
            .saturating_sub(next.places.len());
        progress.fetch_add(done, Ordering::Relaxed);
        count(stage, s, (asked_rows, done, answered));
        rows = next;
    }
    // What the cascade counted itself reaches a cluster's coordinator with the rest.
    stages[0].caller.report().await;
    results
        .into_iter()
        .map(|r| r.expect("every row has its result"))
        .collect()
}
