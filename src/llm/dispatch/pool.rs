//! A cluster's budgets: the run's token and dollar budgets are the cluster's, not 1/N per
//! worker. The coordinator holds them in a [`BudgetPool`] and grants each worker a part at a
//! time as it spends: at least what its request lacks, and an eighth of what is left, divided
//! by the workers, when there is room, so that a worker asks seldom. A worker that reads more
//! of the input spends more, and the cluster stops when its budget does, not when one worker's
//! 1/N does. A worker checks its requests against what it was granted ([`Granted`]); the
//! coordinator's own calls against the budget less what the workers were granted and have not
//! yet reported spent. A worker that cannot reach the coordinator takes 1/N of the budgets,
//! once, and says so.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::metrics::Metrics;
use crate::cache::{Allowance, Grants, SharedCache};

/// The budgets `tokens` and `usd` (as set) in tokens and nano-dollars.
pub(super) fn budgets(tokens: Option<u64>, usd: Option<f64>) -> (Option<u64>, Option<u64>) {
    (tokens, usd.map(|u| (u * 1e9) as u64))
}

/// Where a dispatcher's budgets come from, beyond its own settings.
#[derive(Debug)]
pub(crate) enum Pooled {
    /// A cluster's coordinator: the pool it grants its workers from.
    Pool(Arc<BudgetPool>),
    /// A cluster's worker: what the coordinator granted it.
    Granted(Granted),
}

/// The coordinator's pool of the run's budgets (see [`super::pool`]).
#[derive(Debug)]
pub(crate) struct BudgetPool {
    /// The run's budgets: tokens, nano-dollars.
    pub(super) budget: (Option<u64>, Option<u64>),
    /// The coordinator's counters, the workers' reports added.
    metrics: Arc<Metrics>,
    /// What the workers were granted, and what they reported spent.
    state: Mutex<(Allowance, Allowance)>,
    workers: u64,
}

impl BudgetPool {
    /// The pool of `budget` (tokens, dollars) for `workers` workers, whose reports reach
    /// `metrics`.
    pub(crate) fn new(
        metrics: Arc<Metrics>,
        (tokens, usd): (Option<u64>, Option<f64>),
        workers: usize,
    ) -> BudgetPool {
        BudgetPool {
            budget: budgets(tokens, usd),
            metrics,
            state: Mutex::default(),
            workers: workers.max(1) as u64,
        }
    }

    /// Adds a worker's report (its counters' change) to what the workers spent.
    pub(crate) fn reported(&self, delta: &BTreeMap<String, u64>) {
        let n = |k: &str| delta.get(k).copied().unwrap_or(0);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1.tokens += n("tokens_in") + n("tokens_out");
        state.1.nano_usd += n("spent_nano_usd");
    }

    /// Granted to the workers and not yet reported spent.
    pub(super) fn outstanding(&self) -> Allowance {
        held(*self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// What the workers hold of their grants: `granted` less what they reported `spent`.
fn held((granted, spent): (Allowance, Allowance)) -> Allowance {
    Allowance {
        tokens: granted.tokens.saturating_sub(spent.tokens),
        nano_usd: granted.nano_usd.saturating_sub(spent.nano_usd),
    }
}

impl Grants for BudgetPool {
    fn grant(&self, ask: Allowance) -> Option<Allowance> {
        let m = &self.metrics;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let outstanding = held(*state);
        // Taken: what was spent (every worker's reports included) and is held by the
        // coordinator's own requests, and what the workers hold of their grants.
        let used = m.tokens_in.load(Ordering::Relaxed)
            + m.tokens_out.load(Ordering::Relaxed)
            + m.reserved_tokens.load(Ordering::Relaxed)
            + outstanding.tokens;
        let cost = m.spent_nano_usd.load(Ordering::Relaxed)
            + m.reserved_nano_usd.load(Ordering::Relaxed)
            + outstanding.nano_usd;
        let give = |budget: Option<u64>, taken: u64, ask: u64| match budget {
            None => Some(0),
            Some(b) => {
                let left = b.saturating_sub(taken);
                (ask <= left).then(|| ask.max(left / (8 * self.workers)).min(left))
            }
        };
        let tokens = give(self.budget.0, used, ask.tokens)?;
        let nano_usd = give(self.budget.1, cost, ask.nano_usd)?;
        state.0.tokens += tokens;
        state.0.nano_usd += nano_usd;
        Some(Allowance { tokens, nano_usd })
    }
}

/// What a cluster's worker was granted of the run's budgets (see [`super::pool`]).
#[derive(Debug)]
pub(crate) struct Granted {
    coordinator: Arc<SharedCache>,
    pub(super) tokens: AtomicU64,
    pub(super) nano_usd: AtomicU64,
    /// 1/N of the budgets, taken once should the coordinator not answer.
    fallback: Allowance,
    fell_back: AtomicBool,
}

impl Granted {
    /// Budgets granted by `coordinator`, with `fallback` should it not answer.
    pub(crate) fn new(coordinator: Arc<SharedCache>, fallback: Allowance) -> Granted {
        Granted {
            coordinator,
            tokens: AtomicU64::new(0),
            nano_usd: AtomicU64::new(0),
            fallback,
            fell_back: AtomicBool::new(false),
        }
    }

    /// Asks the coordinator for at least `ask` more: whether it was granted.
    pub(super) async fn more(&self, ask: Allowance) -> bool {
        let add = |a: Allowance| {
            self.tokens.fetch_add(a.tokens, Ordering::Relaxed);
            self.nano_usd.fetch_add(a.nano_usd, Ordering::Relaxed);
        };
        match self.coordinator.grant(ask).await {
            Ok(Some(granted)) => {
                add(granted);
                true
            }
            Ok(None) => false,
            Err(e) if !self.fell_back.swap(true, Ordering::Relaxed) => {
                tracing::warn!(
                    "the coordinator did not grant budget ({e}); this worker takes its share of \
                     the run's budgets"
                );
                add(self.fallback);
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(tokens: u64) -> Allowance {
        Allowance {
            tokens,
            nano_usd: 0,
        }
    }

    #[test]
    fn the_pool_grants_at_least_the_ask_and_never_more_than_is_left() {
        let metrics = Arc::new(Metrics::default());
        let pool = BudgetPool::new(metrics.clone(), (Some(16_000), None), 2);
        // An eighth of what is left, per worker, when that is more than the ask.
        assert_eq!(pool.grant(ask(10)), Some(ask(1_000)));
        assert_eq!(pool.grant(ask(5_000)), Some(ask(5_000)));
        assert_eq!(pool.outstanding(), ask(6_000));
        // The coordinator's own spending counts: 9,000 taken, 7,000 left.
        metrics.tokens_in.store(3_000, Ordering::Relaxed);
        assert_eq!(pool.grant(ask(7_001)), None, "more than is left");
        assert_eq!(pool.grant(ask(7_000)), Some(ask(7_000)));
        assert_eq!(pool.grant(ask(1)), None, "all of it granted");
        // A worker's report: what it spent is in the coordinator's counters from now on, and no
        // longer held by its grant.
        let report = [
            ("tokens_in".to_string(), 500),
            ("tokens_out".to_string(), 100),
        ];
        pool.reported(&report.into_iter().collect());
        metrics.tokens_in.store(3_600, Ordering::Relaxed);
        assert_eq!(pool.outstanding(), ask(12_400));
        assert_eq!(pool.grant(ask(1)), None, "spent is still taken");
    }

    #[test]
    fn a_budget_the_run_does_not_have_is_never_short() {
        let pool = BudgetPool::new(Arc::new(Metrics::default()), (None, Some(1.0)), 1);
        let both = Allowance {
            tokens: u64::MAX,
            nano_usd: 1_000,
        };
        let granted = pool.grant(both).unwrap();
        assert_eq!(granted.tokens, 0, "no token budget: nothing to grant");
        assert_eq!(granted.nano_usd, 1_000_000_000 / 8);
        let too_much = Allowance {
            tokens: 0,
            nano_usd: 1_000_000_000,
        };
        assert_eq!(pool.grant(too_much), None);
    }

    #[tokio::test]
    async fn a_worker_is_granted_over_the_coordinators_server_and_takes_its_share_without_it() {
        let pool = Arc::new(BudgetPool::new(
            Arc::new(Metrics::default()),
            (Some(8_000), None),
            1,
        ));
        let counters: crate::cache::Counters = Arc::new(|_| {});
        let token = crate::config::Secret::new("t".repeat(24));
        let guard = (Some(token.clone()), None);
        let server =
            crate::cache::CacheServer::start(None, ([127, 0, 0, 1], 0).into(), guard, counters)
                .unwrap();
        let client = Arc::new(SharedCache::new(&server.url(), Some(token.clone()), None));
        // Without a pool, the server holds no budget: the worker takes its share, once.
        let g = Granted::new(client.clone(), ask(2_000));
        assert!(g.more(ask(100)).await);
        assert_eq!(g.tokens.load(Ordering::Relaxed), 2_000);
        assert!(!g.more(ask(100)).await, "taken once");
        server.grant_with(pool.clone());
        let g = Granted::new(client, ask(2_000));
        assert!(g.more(ask(100)).await);
        assert_eq!(g.tokens.load(Ordering::Relaxed), 1_000);
        assert!(g.more(ask(7_000)).await);
        assert!(!g.more(ask(1)).await, "the cluster's budget is all granted");
        assert_eq!(g.tokens.load(Ordering::Relaxed), 8_000);
    }
}
