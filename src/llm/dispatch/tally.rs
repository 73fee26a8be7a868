//! What each model of a function's cascade did in a run: rows asked and answered, and what
//! they cost, at its prices and at the cascade's last model's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// What one model of a function's cascade did in a run: rows asked and answered, what its
/// answers cost, and what the same tokens would have cost at the cascade's last model's prices.
#[derive(Debug)]
pub struct CascadeTally {
    /// The model's name in sluice.toml.
    pub model: String,
    /// The prices of the cascade's last model (for what answering alone would have cost).
    pub(crate) reference: Option<crate::config::Prices>,
    /// Rows asked of this model.
    pub asked: AtomicU64,
    /// Rows whose value this model gave (confident enough, or the last model).
    pub answered: AtomicU64,
    /// What its requests cost, in nano-USD.
    pub nano_usd: AtomicU64,
    /// What the same tokens would cost at the last model's prices, in nano-USD.
    pub reference_nano_usd: AtomicU64,
}

impl CascadeTally {
    /// The tally of `model`, its tokens also priced at `reference` (the cascade's last model).
    pub fn new(model: &str, reference: Option<crate::config::Prices>) -> CascadeTally {
        CascadeTally {
            model: model.to_string(),
            reference,
            asked: Default::default(),
            answered: Default::default(),
            nano_usd: Default::default(),
            reference_nano_usd: Default::default(),
        }
    }

    /// Counts a response's `usage`, which cost `nano_usd`.
    pub(crate) fn spent(&self, usage: crate::types::Usage, nano_usd: u64) {
        self.nano_usd.fetch_add(nano_usd, Ordering::Relaxed);
        let reference = self
            .reference
            .map_or(0, |p| (p.cost_of(&usage) * 1e9).ceil() as u64);
        self.reference_nano_usd
            .fetch_add(reference, Ordering::Relaxed);
    }
}

/// What one model of a function's cascade did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CascadeSnapshot {
    /// The model's name in sluice.toml.
    pub model: String,
    /// Rows asked of it.
    pub asked: u64,
    /// Rows whose value it gave.
    pub answered: u64,
    /// What its requests cost.
    pub cost_usd: f64,
    /// What the same tokens cost at the cascade's last model's prices.
    pub last_model_cost_usd: f64,
}

/// What each model of a function's cascade did (empty without one).
pub(super) fn snapshot(cascade: &Mutex<Vec<Arc<CascadeTally>>>) -> Vec<CascadeSnapshot> {
    let tallies = cascade.lock().unwrap_or_else(|e| e.into_inner());
    tallies
        .iter()
        .map(|t| CascadeSnapshot {
            model: t.model.clone(),
            asked: t.asked.load(Ordering::Relaxed),
            answered: t.answered.load(Ordering::Relaxed),
            cost_usd: t.nano_usd.load(Ordering::Relaxed) as f64 / 1e9,
            last_model_cost_usd: t.reference_nano_usd.load(Ordering::Relaxed) as f64 / 1e9,
        })
        .collect()
}

/// The counters of `model` in a function's `cascade` (created on first use), its tokens also
/// priced at `reference`.
pub(super) fn tally_of(
    cascade: &Mutex<Vec<Arc<CascadeTally>>>,
    model: &str,
    reference: Option<crate::config::Prices>,
) -> Arc<CascadeTally> {
    let mut tallies = cascade.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = tallies.iter().find(|t| t.model == model) {
        return t.clone();
    }
    let t = Arc::new(CascadeTally::new(model, reference));
    tallies.push(t.clone());
    t
}

/// What asking a cascade's last model alone would have cost (the first model's tokens — it is
/// asked every row — at the last model's prices), and what the cascade cost; none without a
/// cascade or without prices.
pub(super) fn costs(cascade: &[CascadeSnapshot]) -> Option<(f64, f64)> {
    let first = cascade.first()?;
    let spent: f64 = cascade.iter().map(|c| c.cost_usd).sum();
    (first.last_model_cost_usd > 0.0).then_some((first.last_model_cost_usd, spent))
}

/// A cascade's models as JSON (null without one).
pub(super) fn to_json(cascade: &[CascadeSnapshot]) -> Value {
    if cascade.is_empty() {
        return Value::Null;
    }
    let models: Vec<Value> = cascade
        .iter()
        .map(|c| {
            serde_json::json!({"model": c.model, "asked": c.asked,
                "answered": c.answered, "cost_usd": c.cost_usd})
        })
        .collect();
    serde_json::json!({
        "models": models,
        "last_model_alone_usd": costs(cascade).map(|(alone, _)| alone),
    })
}
