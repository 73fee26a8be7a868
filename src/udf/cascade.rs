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
    // The rows still asked (their places), with their prompts and items.
    let mut places: Vec<usize> = (0..n).collect();
    let mut prompts = prompts;
    let mut items = items;
    for (s, stage) in stages.iter().enumerate() {
        if places.is_empty() {
            break;
        }
        if let Some(t) = &stage.tally {
            t.asked.fetch_add(places.len() as u64, Ordering::Relaxed);
        }
        let Some(min) = stage.min_confidence else {
            // The last model: its result is the row's.
            let answers = ask(stage, prompts, items, progress).await;
            let answered = answers.iter().filter(|r| r.is_ok()).count();
            if let Some(t) = &stage.tally {
                t.answered.fetch_add(answered as u64, Ordering::Relaxed);
            }
            for (place, r) in places.into_iter().zip(answers) {
                results[place] = Some((r, s));
            }
            break;
        };
        // A row passed on is not finished: its progress is counted by the stage that answers.
        let asked_rows = places.len();
        let asked = AtomicUsize::new(0);
        let answers = ask(stage, prompts.clone(), items.clone(), &asked).await;
        let (mut next_places, mut next_prompts, mut next_items) = (vec![], vec![], vec![]);
        let mut old_items = items.map(|i| i.into_iter());
        for ((place, prompt), r) in places.into_iter().zip(prompts).zip(answers) {
            let item = old_items.as_mut().and_then(Iterator::next);
            let confident = match &r {
                Ok(v) => {
                    let (value, confidence) = split_confident(v);
                    (confidence >= min).then(|| Ok(Arc::new(value)))
                }
                // A failure of the model itself (its key refused, unreachable, a spent budget)
                // is the statement's, not a row's to pass on to a dearer model.
                Err(e) if e.kind.is_systemic() => Some(r.clone()),
                Err(_) => None,
            };
            match confident {
                Some(r) => results[place] = Some((r, s)),
                None if s + 1 == stages.len() => results[place] = Some((r, s)),
                None => {
                    next_places.push(place);
                    next_prompts.push(prompt);
                    next_items.extend(item);
                }
            }
        }
        let passed_on = next_places.len();
        let done = asked.load(Ordering::Relaxed).saturating_sub(passed_on);
        progress.fetch_add(done, Ordering::Relaxed);
        // The function's counters count a row once: asked of its first model, finished by
        // the model that answers it (the last model counts its own).
        let fm = stage.caller.metrics();
        if s == 0 {
            fm.prompts.fetch_add(asked_rows as u64, Ordering::Relaxed);
        }
        fm.rows_finished.fetch_add(done as u64, Ordering::Relaxed);
        if let Some(t) = &stage.tally {
            let answered = results.iter().flatten().filter(|(_, at)| *at == s).count();
            t.answered.fetch_add(answered as u64, Ordering::Relaxed);
        }
        places = next_places;
        prompts = next_prompts;
        items = old_items.map(|_| next_items);
    }
    // What the cascade counted itself reaches a cluster's coordinator with the rest.
    stages[0].caller.report().await;
    results
        .into_iter()
        .map(|r| r.expect("every row has its result"))
        .collect()
}
