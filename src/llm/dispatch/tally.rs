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
    /// Its place in the cascade (0: the first).
    pub position: usize,
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
    pub fn new(
        model: &str,
        position: usize,
        reference: Option<crate::config::Prices>,
    ) -> CascadeTally {
        CascadeTally {
            model: model.to_string(),
            position,
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
    let mut tallies = cascade.lock().unwrap_or_else(|e| e.into_inner()).clone();
    tallies.sort_by_key(|t| t.position);
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

/// The counters of `model`, at `position` in a function's `cascade` (created on first use), its
/// tokens also priced at `reference`.
pub(super) fn tally_of(
    cascade: &Mutex<Vec<Arc<CascadeTally>>>,
    (model, position): (&str, usize),
    reference: Option<crate::config::Prices>,
) -> Arc<CascadeTally> {
    let mut tallies = cascade.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = tallies.iter().find(|t| t.model == model) {
        return t.clone();
    }
    let t = Arc::new(CascadeTally::new(model, position, reference));
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

/// A cascade's counters as [`super::Metrics::counters`] names them, for function `f`:
/// `f:F:cascade:POSITION:MODEL:COUNTER`.
pub(super) fn counters(
    f: &str,
    cascade: &Mutex<Vec<Arc<CascadeTally>>>,
    out: &mut std::collections::BTreeMap<String, u64>,
) {
    let tallies = cascade.lock().unwrap_or_else(|e| e.into_inner());
    for t in tallies.iter() {
        for (name, a) in t.counters() {
            let key = format!("f:{f}:cascade:{}:{}:{name}", t.position, t.model);
            out.insert(key, a.load(Ordering::Relaxed));
        }
    }
}

/// Adds `n` to the counter `tail` (`POSITION:MODEL:COUNTER`, as [`counters`] names it) of a
/// function's `cascade`; a name it cannot read is ignored.
pub(super) fn absorb(cascade: &Mutex<Vec<Arc<CascadeTally>>>, tail: &str, n: u64) {
    let Some((position, rest)) = tail.split_once(':') else {
        return;
    };
    let (Ok(position), Some((model, counter))) = (position.parse(), rest.rsplit_once(':')) else {
        return;
    };
    let t = tally_of(cascade, (model, position), None);
    if let Some((_, a)) = t.counters().into_iter().find(|(k, _)| *k == counter) {
        a.fetch_add(n, Ordering::Relaxed);
    }
}

impl CascadeTally {
    fn counters(&self) -> [(&'static str, &AtomicU64); 4] {
        [
            ("asked", &self.asked),
            ("answered", &self.answered),
            ("nano_usd", &self.nano_usd),
            ("reference_nano_usd", &self.reference_nano_usd),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_s_cascade_counters_add_up_on_the_coordinator_in_order() {
        let worker: Mutex<Vec<Arc<CascadeTally>>> = Mutex::default();
        let small = tally_of(&worker, ("small:v2", 0), None);
        let large = tally_of(&worker, ("large", 1), None);
        small.asked.fetch_add(10, Ordering::Relaxed);
        small.answered.fetch_add(7, Ordering::Relaxed);
        large.asked.fetch_add(3, Ordering::Relaxed);
        large.nano_usd.fetch_add(500, Ordering::Relaxed);
        let mut out = std::collections::BTreeMap::new();
        counters("f", &worker, &mut out);
        let coordinator: Mutex<Vec<Arc<CascadeTally>>> = Mutex::default();
        for _ in 0..2 {
            for (k, n) in &out {
                let tail = k.strip_prefix("f:f:cascade:").unwrap();
                absorb(&coordinator, tail, *n);
            }
        }
        absorb(&coordinator, "x", 1);
        absorb(&coordinator, "1:large:unknown", 1);
        let s = snapshot(&coordinator);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].model.as_str(), s[0].asked, s[0].answered),
            ("small:v2", 20, 14)
        );
        assert_eq!((s[1].model.as_str(), s[1].asked), ("large", 6));
        assert!((s[1].cost_usd - 1e-6).abs() < 1e-15);
    }
}
