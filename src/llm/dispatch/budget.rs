//! The run's token and dollar budgets (`--budget-tokens`, `--budget-usd`): a request's
//! estimated usage is held against them while it is on the wire, and a request that would
//! exceed one is refused before it is sent.

use std::sync::atomic::Ordering;

use super::call::ModelHandle;
use super::inner::Inner;
use super::metrics::Metrics;
use crate::types::{ErrorKind, LlmError, Usage};

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
    /// is on the wire, or refuses it when a budget would be exceeded.
    pub(super) fn reserve_budget(
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
        let used = m.tokens_in.load(Ordering::Relaxed) + m.tokens_out.load(Ordering::Relaxed);
        let reserved = m.reserved_tokens.fetch_add(tokens, Ordering::Relaxed) + tokens;
        let spent = m.spent_nano_usd.load(Ordering::Relaxed);
        let reserved_usd = m.reserved_nano_usd.fetch_add(nano_usd, Ordering::Relaxed) + nano_usd;
        // Held from here: a refusal below gives it back on drop.
        let reservation = BudgetReservation {
            metrics: m,
            tokens,
            nano_usd,
        };
        if let Some(budget) = self.cfg.budget_tokens
            && used + reserved > budget
        {
            return Err(self.refuse(format!(
                "token budget of {budget} reached ({used} tokens used, {} held by requests in \
                 flight); {} --budget-tokens (or none)",
                reserved - tokens,
                self.rerun_hint()
            )));
        }
        if let Some(budget) = self.cfg.budget_usd
            && (spent + reserved_usd) as f64 > budget * 1e9
        {
            return Err(self.refuse(format!(
                "cost budget of ${budget} reached (${:.4} spent, ${:.4} held by requests in \
                 flight); {} --budget-usd (or none)",
                spent as f64 / 1e9,
                (reserved_usd - nano_usd) as f64 / 1e9,
                self.rerun_hint()
            )));
        }
        Ok(Some(reservation))
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
