//! What `explain` says of a function's model cascade: the rows asked of each model and what
//! they cost. Placeholder answers have no confidence, so an estimate asks every model of every
//! row (an upper bound); `explain --sample N` measures the share of rows each later model is
//! asked on a real run over a sample, and scales the estimate by it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use crate::llm::Metrics;

/// One model of a cascade in an estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct CascadeEstimate {
    /// The model's name in sluice.toml.
    pub model: String,
    /// Rows asked of it.
    pub rows: u64,
    /// What its requests cost, when the model has prices.
    pub cost_usd: Option<f64>,
    /// The share of the rows asked of the first model that reach it: measured on a sample, or
    /// 1 (every row, an upper bound) without one.
    pub share: f64,
    /// Whether `share` was measured on a sample.
    pub measured: bool,
}

impl CascadeEstimate {
    /// The estimate as JSON (`explain --json`).
    pub(super) fn to_json(&self) -> Value {
        json!({"model": self.model, "rows": self.rows, "cost_usd": self.cost_usd,
               "share": self.share, "measured": self.measured})
    }
}

/// Per function with a cascade, per model in order: its name, the rows asked of it and what
/// they cost in nano-USD so far.
pub(super) type Counters = BTreeMap<String, Vec<(String, u64, u64)>>;

/// The cascade counters of every function of `metrics`.
pub(super) fn counters(metrics: &Metrics) -> Counters {
    metrics
        .functions()
        .into_iter()
        .filter_map(|(name, f)| {
            let tallies = f.cascade.lock().unwrap_or_else(|e| e.into_inner());
            let stages: Vec<(String, u64, u64)> = tallies
                .iter()
                .map(|t| {
                    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                    (t.model.clone(), load(&t.asked), load(&t.nano_usd))
                })
                .collect();
            (!stages.is_empty()).then_some((name, stages))
        })
        .collect()
}

/// What `function`'s cascade did between `before` and `after` (`priced`: whether a model has
/// prices); empty without a cascade.
pub(super) fn delta(
    before: &Counters,
    after: &Counters,
    function: &str,
    priced: impl Fn(&str) -> bool,
) -> Vec<CascadeEstimate> {
    let Some(now) = after.get(function) else {
        return Vec::new();
    };
    let then = before.get(function);
    now.iter()
        .map(|(model, asked, nano)| {
            let (asked0, nano0) = then
                .and_then(|t| t.iter().find(|(m, _, _)| m == model))
                .map_or((0, 0), |(_, a, n)| (*a, *n));
            CascadeEstimate {
                model: model.clone(),
                rows: asked - asked0,
                cost_usd: priced(model).then(|| (nano - nano0) as f64 / 1e9),
                share: 1.0,
                measured: false,
            }
        })
        .collect()
}

/// Adds `o`'s rows and costs to `total`'s (the same function's cascade).
pub(super) fn add(total: &mut Vec<CascadeEstimate>, o: &[CascadeEstimate]) {
    if total.is_empty() {
        total.extend(o.iter().map(|s| CascadeEstimate {
            rows: 0,
            cost_usd: s.cost_usd.map(|_| 0.0),
            ..s.clone()
        }));
    }
    for (t, s) in total.iter_mut().zip(o) {
        t.rows += s.rows;
        t.cost_usd = t.cost_usd.zip(s.cost_usd).map(|(a, b)| a + b);
    }
}

/// The share of the first model's rows each model was asked on a sample.
pub(super) fn shares(sample: &[CascadeEstimate]) -> Option<Vec<f64>> {
    let first = sample.first()?.rows;
    (first > 0).then(|| {
        sample
            .iter()
            .map(|s| s.rows as f64 / first as f64)
            .collect()
    })
}

/// Scales an estimate that asked every model of every row by the `shares` measured on a
/// sample: each later model's rows and cost. Returns the factor by which the function's
/// requests and tokens shrink (each model's share of the calls, assuming the models' prompts
/// are alike), and the cascade's cost (none when a model has no prices).
pub(super) fn scale(stages: &mut [CascadeEstimate], shares: &[f64]) -> (f64, Option<f64>) {
    let first = stages.first().map_or(0, |s| s.rows);
    for (s, share) in stages.iter_mut().zip(shares) {
        s.rows = (first as f64 * share).round() as u64;
        s.cost_usd = s.cost_usd.map(|c| c * share);
        s.share = *share;
        s.measured = true;
    }
    let factor = shares.iter().sum::<f64>() / stages.len().max(1) as f64;
    let cost = stages.iter().map(|s| s.cost_usd).sum::<Option<f64>>();
    (factor, cost)
}

/// `    cascade: small 200 rows, large 36 rows (18% of rows, measured on a sample)`.
pub(super) fn line(stages: &[CascadeEstimate]) -> String {
    let parts: Vec<String> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let share = match (i, s.measured) {
                (0, _) => String::new(),
                (_, true) => format!(" ({:.0}% of rows, measured on the sample)", s.share * 100.0),
                (_, false) => " (every row: an upper bound; --sample N measures the share)".into(),
            };
            format!("{} {} rows{share}", s.model, s.rows)
        })
        .collect();
    format!("    cascade: {}\n", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(model: &str, rows: u64, cost: f64) -> CascadeEstimate {
        CascadeEstimate {
            model: model.into(),
            rows,
            cost_usd: Some(cost),
            share: 1.0,
            measured: false,
        }
    }

    #[test]
    fn a_sample_s_shares_scale_the_later_models() {
        let sample = [stage("small", 200, 0.1), stage("large", 36, 0.2)];
        let shares = shares(&sample).unwrap();
        assert_eq!(shares, vec![1.0, 0.18]);
        let mut full = [stage("small", 2000, 1.0), stage("large", 2000, 20.0)];
        let (factor, cost) = scale(&mut full, &shares);
        assert_eq!(full[1].rows, 360);
        assert!((full[1].cost_usd.unwrap() - 3.6).abs() < 1e-9);
        assert!((factor - 0.59).abs() < 1e-9);
        assert!((cost.unwrap() - 4.6).abs() < 1e-9);
        assert!(
            line(&full).contains("large 360 rows (18% of rows"),
            "{}",
            line(&full)
        );
        assert_eq!(super::shares(&[stage("small", 0, 0.0)]), None);
    }

    #[test]
    fn deltas_and_sums_per_model() {
        let before: Counters = [(
            "f".into(),
            vec![("small".into(), 10, 5), ("large".into(), 4, 9)],
        )]
        .into_iter()
        .collect();
        let after: Counters = [(
            "f".into(),
            vec![("small".into(), 30, 7), ("large".into(), 9, 19)],
        )]
        .into_iter()
        .collect();
        let d = delta(&before, &after, "f", |m| m == "small");
        assert_eq!((d[0].rows, d[1].rows), (20, 5));
        assert_eq!(d[0].cost_usd, Some(2e-9));
        assert_eq!(d[1].cost_usd, None);
        let mut total = Vec::new();
        add(&mut total, &d);
        add(&mut total, &d);
        assert_eq!((total[0].rows, total[1].rows), (40, 10));
        assert!(delta(&before, &after, "g", |_| true).is_empty());
    }
}
