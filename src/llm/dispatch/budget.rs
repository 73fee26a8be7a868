//! The run's token and dollar budgets (`--budget-tokens`, `--budget-usd`): a request's
//! estimated usage is held against them while it is on the wire, and a request that would
//! exceed one is refused before it is sent. On a cluster, the budgets are the cluster's
//! ([`super::pool`]): a worker checks against what the coordinator granted it, asking for more
//! when that is short, and the coordinator against the budget less what its workers hold.

use std::sync::atomic::Ordering;

use super::call::ModelHandle;
use super::inner::Inner;
use super::metrics::Metrics;
use super::pool::{Pooled, budgets};
use crate::cache::Allowance;
use crate::types::{ErrorKind, LlmError, Usage};

/// A request over a budget: what it lacks, and the refusal's message.
struct Short {
    lacks: Allowance,
    message: String,
}

impl ModelHandle {
    /// Nano-dollars (1e-9 USD) that `usage` costs at this model's prices (0 without prices):
    /// its cached prompt tokens at the cached-input price, those written to the server's
    /// prompt cache at the cache write price.
    pub(super) fn nano_usd(&self, usage: Usage) -> u64 {
        self.prices
            .map_or(0, |p| (p.cost_of(&usage) * 1e9).ceil() as u64)
    }
}

/// Tokens and dollars held against the budgets while a request is on the wire; given back on
/// drop.
pub(super) struct BudgetReservation<'a> {
    metrics: &'a Metrics,
    tokens: u64,
    nano_usd: u64,
}

impl Drop for BudgetReservation<'_> {
    fn drop(&mut self) {
        self.metrics
            .reserved_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
        self.metrics
            .reserved_nano_usd
            .fetch_sub(self.nano_usd, Ordering::Relaxed);
    }
}

impl Inner {
    /// Counts a request's estimated usage (tokens and cost) against the run's budgets while it
    /// is on the wire, or refuses it when a budget would be exceeded (on a cluster's worker,
    /// once the coordinator grants no more).
    pub(super) async fn reserve_budget(
        &self,
        model: &ModelHandle,
        estimate: Usage,
    ) -> Result<Option<BudgetReservation<'_>>, LlmError> {
        if self.cfg.budget_tokens.is_none() && self.cfg.budget_usd.is_none() {
            return Ok(None);
        }
        let m = &self.metrics;
        let tokens = estimate.prompt_tokens + estimate.completion_tokens;
        let nano_usd = model.nano_usd(estimate);
        m.reserved_tokens.fetch_add(tokens, Ordering::Relaxed);
        m.reserved_nano_usd.fetch_add(nano_usd, Ordering::Relaxed);
        // Held from here: a refusal below gives it back on drop.
        let reservation = BudgetReservation {
            metrics: m,
            tokens,
            nano_usd,
        };
        loop {
            let Some(short) = self.over_budget(tokens, nano_usd) else {
                return Ok(Some(reservation));
            };
            let granted = match self.pooled.get() {
                Some(Pooled::Granted(g)) => g.more(short.lacks).await,
                _ => false,
            };
            if !granted {
                return Err(self.refuse(short.message));
            }
        }
    }

    /// What a request of `tokens` and `nano_usd`, already held, lacks to stay within the
    /// budgets; `None` when it does not.
    fn over_budget(&self, tokens: u64, nano_usd: u64) -> Option<Short> {
        let m = &self.metrics;
        let mut used = m.tokens_in.load(Ordering::Relaxed) + m.tokens_out.load(Ordering::Relaxed);
        let mut spent = m.spent_nano_usd.load(Ordering::Relaxed);
        let reserved = m.reserved_tokens.load(Ordering::Relaxed);
        let reserved_usd = m.reserved_nano_usd.load(Ordering::Relaxed);
        // The budgets as set, what this dispatcher may spend of them, and how a refusal says
        // whose they are.
        let mut budget = budgets(self.cfg.budget_tokens, self.cfg.budget_usd);
        let (mut token_limit, mut usd_limit) = budget;
        let (mut scope, mut by) = ("", "");
        match self.pooled.get() {
            None => {}
            Some(Pooled::Pool(pool)) => {
                let out = pool.outstanding();
                used += out.tokens;
                spent += out.nano_usd;
                budget = pool.budget;
                (token_limit, usd_limit) = budget;
                scope = " on the cluster";
            }
            Some(Pooled::Granted(g)) => {
                token_limit = token_limit.map(|_| g.tokens.load(Ordering::Relaxed));
                usd_limit = usd_limit.map(|_| g.nano_usd.load(Ordering::Relaxed));
                (scope, by) = (" on the cluster", " by this worker");
            }
        }
        let lacks = Allowance {
            tokens: token_limit.map_or(0, |l| (used + reserved).saturating_sub(l)),
            nano_usd: usd_limit.map_or(0, |l| (spent + reserved_usd).saturating_sub(l)),
        };
        let message = if lacks.tokens > 0 {
            format!(
                "token budget of {}{scope} reached ({used} tokens used{by}, {} held by requests \
                 in flight); {} --budget-tokens (or none)",
                budget.0.unwrap_or_default(),
                reserved - tokens,
                self.rerun_hint()
            )
        } else if lacks.nano_usd > 0 {
            format!(
                "cost budget of ${}{scope} reached (${:.4} spent{by}, ${:.4} held by requests \
                 in flight); {} --budget-usd (or none)",
                budget.1.unwrap_or_default() as f64 / 1e9,
                spent as f64 / 1e9,
                (reserved_usd - nano_usd) as f64 / 1e9,
                self.rerun_hint()
            )
        } else {
            return None;
        };
        Some(Short { lacks, message })
    }

    fn rerun_hint(&self) -> &'static str {
        if self.cache.is_some() && self.cache_mode.writes() {
            "every response received is in the cache: re-run with a larger"
        } else {
            "the cache is off, so a re-run starts over: re-run with a larger"
        }
    }

    fn refuse(&self, message: String) -> LlmError {
        self.metrics.budget_exhausted.store(true, Ordering::Relaxed);
        LlmError::new(ErrorKind::Budget, message)
    }
}
