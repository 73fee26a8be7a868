//! The coordinator's pacing of its workers' requests, as its server ([`super::CacheServer`])
//! offers it: each model's governor at the coordinator is the cluster's one limit for that
//! model, and a worker asks it to admit each request it sends (see `llm::governor::remote`);
//! and the run's budgets, which the coordinator grants its workers a part at a time as they
//! spend (see `llm::dispatch::budget`).

use serde_json::Value;

/// How long the coordinator holds an admission request without room before it answers
/// "ask again" (well under the workers' client timeout).
pub const ADMIT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// The coordinator's pacing of the workers' requests: its governor of each model is the
/// cluster's one limit (implemented where the governors are, in the engine).
pub trait Pacing: Send + Sync {
    /// Waits up to `patience` for the governor of `model` to admit a request of `tokens` of
    /// the worker `by` (its URL in the coordinator's list, when it said): its lease, or `None`
    /// when there was no room in that time; an error for a model it does not pace.
    fn admit(
        &self,
        model: &str,
        tokens: u64,
        by_patience: (Option<&str>, std::time::Duration),
    ) -> futures::future::BoxFuture<'static, Result<Option<u64>, String>>;
    /// The request of `lease` ended with `outcome` (its wire form).
    fn finish(&self, lease: u64, outcome: &Value);
    /// Ends the leases of the workers `dead`, and those of workers that did not say who they
    /// are (a statement failed with requests of dead workers on the wire).
    fn end_of(&self, dead: &[&str]);
}

/// Tokens and nano-dollars (1e-9 USD) of a run's budgets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allowance {
    /// Tokens (prompt and completion).
    pub tokens: u64,
    /// Nano-dollars.
    pub nano_usd: u64,
}

/// The coordinator's pool of the run's budgets (implemented where the dispatcher is).
pub trait Grants: Send + Sync {
    /// Grants a worker at least `ask` of each budget the run has (more when the pool has room,
    /// so that it asks seldom): the grant, or `None` when a budget has less than `ask` left.
    fn grant(&self, ask: Allowance) -> Option<Allowance>;
}
