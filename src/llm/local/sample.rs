//! Greedy choice of the next token under llama.cpp's repetition penalty, read from the logits
//! in place.

/// Repetition penalty on the last [`PENALTY_WINDOW`] tokens (llama.cpp's `repeat_penalty`):
/// small models fall into loops such as `0.00,0.00,...` without it.
const PENALTY: f32 = 1.15;
pub(super) const PENALTY_WINDOW: usize = 64;

pub(super) fn penalised(logit: f32) -> f32 {
    if logit > 0.0 {
        logit / PENALTY
    } else {
        logit * PENALTY
    }
}

/// The index and penalised logit of the best entry of `logits`, with the repetition penalty
/// applied to the `recent` indices (sorted, no repeats); the first of equal bests wins.
pub(super) fn best_penalised(logits: &[f32], recent: &[usize]) -> (usize, f32) {
    let mut best = (0usize, f32::NEG_INFINITY);
    let mut next = recent.iter().copied().peekable();
    for (t, &l) in logits.iter().enumerate() {
        let l = if next.next_if_eq(&t).is_some() {
            penalised(l)
        } else {
            l
        };
        if l > best.1 {
            best = (t, l);
        }
    }
    best
}

/// The log-probability of entry `token` under the softmax of `logits`, with the repetition
/// penalty applied to the `recent` indices (sorted, no repeats) as the choice saw them: how
/// sure the model was of the token among its whole vocabulary.
pub(super) fn log_prob(logits: &[f32], recent: &[usize], token: usize) -> f64 {
    // The logits as the choice saw them, penalty applied, in two passes (no copy of the
    // vocabulary): the largest, then the sum of exponentials below it.
    let seen = || {
        let mut next = recent.iter().copied().peekable();
        logits.iter().enumerate().map(move |(t, &l)| {
            f64::from(if next.next_if_eq(&t).is_some() {
                penalised(l)
            } else {
                l
            })
        })
    };
    let max = seen().fold(f64::NEG_INFINITY, f64::max);
    let Some(chosen) = seen().nth(token) else {
        return f64::NEG_INFINITY;
    };
    if !max.is_finite() {
        return f64::NEG_INFINITY;
    }
    let sum: f64 = seen().map(|v| (v - max).exp()).sum();
    chosen - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The penalty as a scan of the window per vocabulary entry applied it.
    fn by_scan(logits: &[f32], window: &[usize]) -> (usize, f32) {
        let mut best = (0usize, f32::NEG_INFINITY);
        for (t, &l) in logits.iter().enumerate() {
            let l = if window.contains(&t) { penalised(l) } else { l };
            if l > best.1 {
                best = (t, l);
            }
        }
        best
    }

    #[test]
    fn the_penalised_best_is_the_one_a_scan_of_the_window_finds() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..500 {
            let n = rng.usize(1..300);
            // Few distinct values, so that ties and penalised winners both occur.
            let logits: Vec<f32> = (0..n).map(|_| rng.i32(-4..5) as f32 * 0.5).collect();
            let window: Vec<usize> = (0..rng.usize(0..40)).map(|_| rng.usize(0..n)).collect();
            let mut sorted = window.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(
                best_penalised(&logits, &sorted),
                by_scan(&logits, &window),
                "{logits:?} {window:?}"
            );
        }
        // The window's best loses to a stranger once penalised.
        let lp = log_prob(&[0.0, 0.0], &[], 1);
        assert!((lp - 0.5f64.ln()).abs() < 1e-12);
        let lp = log_prob(&[2.0, 1.0, 0.0], &[0], 0);
        let z = (2.0f64 / 1.15).exp() + 1f64.exp() + 1.0;
        assert!((lp - ((2.0 / 1.15) - z.ln())).abs() < 1e-6, "{lp}");
        assert_eq!(log_prob(&[1.0], &[], 3), f64::NEG_INFINITY);
        assert_eq!(best_penalised(&[1.0, 1.1, 0.0], &[1]), (0, 1.0));
    }
}
