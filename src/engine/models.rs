//! Building the models of `sluice.toml`: each model's provider (by kind) and its governor,
//! or — for `sluice explain` — a provider that answers with placeholders and counts tokens
//! with the model's tokenizer.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::error::EngineError;
use crate::cache::{ResponseCache, SharedCache};
use crate::config::{Config, ModelConfig, ModelMode, ModelPart, ProviderKind};
use crate::llm::anthropic::AnthropicProvider;
use crate::llm::batch::{BatchApi, BatchQueue};
use crate::llm::dispatch::{ModelHandle, PrefixOrder};
use crate::llm::estimate::{EstimateProvider, TokenCounter};
use crate::llm::gemini::GeminiProvider;
use crate::llm::gemini_embed::GeminiEmbedder;
use crate::llm::governor::{Governor, GovernorConfig, RemotePacing};
use crate::llm::lamini::LaminiProvider;
use crate::llm::openai::{CompletionsProvider, OpenAiProvider};
use crate::llm::replicas::{Replica, ReplicaSet};
use crate::llm::{Provider, SetupError};

/// Who answers an engine's LLM calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answers {
    /// The configured models.
    Models,
    /// Placeholders with counted tokens (`sluice explain`).
    Estimates,
}

/// The configured models, and (when estimating) how each counts tokens.
pub(super) struct Models {
    /// Handles by model name.
    pub handles: BTreeMap<String, ModelHandle>,
    /// `tiktoken o200k_base`, `GGUF vocabulary of ...` by model name (estimates only).
    pub token_counters: BTreeMap<String, String>,
    /// The models in batch mode, by name.
    pub batch_plans: BTreeMap<String, BatchPlan>,
}

/// What `sluice explain` needs of a batch-mode model.
#[derive(Debug, Clone, Copy)]
pub(super) struct BatchPlan {
    /// Most requests per file.
    pub max_requests: usize,
    /// Largest file.
    pub max_bytes: u64,
    /// The live prices, for the comparison.
    pub live_prices: Option<crate::config::Prices>,
}

/// The provider that talks to model `m`, with `pool` connections.
fn provider(m: &ModelConfig, pool: usize) -> Result<Arc<dyn Provider>, SetupError> {
    let id = &m.model;
    Ok(match (&m.part, m.kind) {
        (ModelPart::Server(s), ProviderKind::Openai | ProviderKind::AzureOpenai) => {
            Arc::new(OpenAiProvider::new(id, s, pool)?)
        }
        (ModelPart::Server(s), ProviderKind::Anthropic) => {
            Arc::new(AnthropicProvider::new(id, s, pool)?)
        }
        (ModelPart::Server(s), ProviderKind::Gemini) => Arc::new(GeminiProvider::new(id, s, pool)?),
        (ModelPart::Server(s), ProviderKind::OpenaiCompletions) => {
            Arc::new(CompletionsProvider::new(id, s, pool)?)
        }
        (ModelPart::Server(s), ProviderKind::Lamini) => Arc::new(LaminiProvider::new(id, s, pool)?),
        (ModelPart::Server(s), ProviderKind::OpenaiEmbeddings) => Arc::new(
            crate::llm::embeddings::EmbeddingsProvider::new(id, s, pool)?,
        ),
        #[cfg(feature = "local")]
        (ModelPart::Local(l), _) => {
            Arc::new(crate::llm::local::LocalProvider::new(id, m.concurrency, l))
        }
        #[cfg(not(feature = "local"))]
        (ModelPart::Local(_), _) => {
            return Err(SetupError::Unavailable(
                "this sluice was built without the local model (cargo feature `local`)".into(),
            ));
        }
        (ModelPart::Server(_), ProviderKind::Local) => {
            return Err(SetupError::Unavailable(
                "a local model has no server settings".into(),
            ));
        }
    })
}

/// The embeddings of a model that also completes: the local model's (its own worker), a
/// Gemini model's (`batchEmbedContents`), with `pool` connections.
fn embedder(m: &ModelConfig, pool: usize) -> Result<Option<Arc<dyn Provider>>, SetupError> {
    Ok(match (&m.part, m.kind) {
        #[cfg(feature = "local")]
        (ModelPart::Local(l), _) => Some(Arc::new(
            crate::llm::local::LocalProvider::new(&m.model, m.concurrency, l).embedder(),
        )),
        (ModelPart::Server(s), ProviderKind::Gemini) => {
            Some(Arc::new(GeminiEmbedder::new(&m.model, s, pool)?))
        }
        _ => None,
    })
}

/// A batch-mode model: its chat provider (for live retries) and its queue.
type BatchModel = (Arc<dyn Provider>, Arc<BatchQueue>);

/// The batch queue of model `m` in batch mode (which only OpenAI, Azure OpenAI, Anthropic
/// and Gemini chat models can be), with its chat provider; `cache` stores its jobs.
fn batch_queue(
    m: &ModelConfig,
    pool: usize,
    cache: Option<&Arc<ResponseCache>>,
) -> Result<Option<BatchModel>, SetupError> {
    let (ModelMode::Batch, ModelPart::Server(s)) = (m.mode, &m.part) else {
        return Ok(None);
    };
    if cache.is_none() {
        tracing::warn!(
            "models.{}: batch mode without the response cache: a run stopped while it waits \
             cannot resume its jobs",
            m.name
        );
    }
    let (chat, api) = BatchApi::of_model(m, s, pool)?;
    let queue = BatchQueue::new(
        &m.name,
        chat.endpoint(),
        api,
        m.batch.clone(),
        cache.cloned(),
        m.batch.wait,
    );
    Ok(Some((chat, Arc::new(queue))))
}

/// The replicas of model `m` when several servers serve it and `answers` are the models':
/// each with its own provider (its URL and key, `pool` connections) and a governor of
/// `1 / share` of the model's limits. (`sluice explain` sends nothing: it counts with the
/// first replica's provider, whose cache identity is the model's.)
fn replica_set(
    config: &Config,
    m: &ModelConfig,
    answers: Answers,
    (pool, share): (usize, usize),
) -> Result<Option<Arc<ReplicaSet>>, SetupError> {
    let ModelPart::Server(s) = &m.part else {
        return Ok(None);
    };
    if !s.replicated() || m.mode == ModelMode::Batch || answers == Answers::Estimates {
        return Ok(None);
    }
    let mut replicas = Vec::with_capacity(s.replicas.len());
    for (i, r) in s.replicas.iter().enumerate() {
        let mut one = m.clone();
        one.part = ModelPart::Server(s.replica(i).unwrap_or_else(|| s.clone()));
        let governor = Arc::new(Governor::new(live_governor(config, m, share)));
        replicas.push(Replica::new(&r.base_url, provider(&one, pool)?, governor));
    }
    Ok(Some(Arc::new(ReplicaSet::new(&m.name, replicas))))
}

/// The governor of model `m` with `1 / share` of its limits (rounded down, at least 1).
fn live_governor(config: &Config, m: &ModelConfig, share: usize) -> GovernorConfig {
    let share = share.max(1);
    let pool = m.concurrency.min(config.dispatcher.concurrency);
    GovernorConfig {
        max_concurrency: (pool / share).max(1),
        rpm: m.rpm.map(|r| (r / share as u64).max(1)),
        tpm: m.tpm.map(|t| (t / share as u64).max(1)),
        adaptive: m.adaptive_concurrency,
    }
}

/// The models of one worker's share of a cluster run: the same providers (and batch queues)
/// with governors of their own. A model each machine answers itself
/// ([`ModelConfig::per_worker`]) is paced by all of its limits here; the others by the
/// coordinator behind `coordinator` (the cluster's one governor per model and replica), or,
/// without it or once it fails, by `1 / workers` of their limits.
pub(super) fn shared_models(
    config: &Config,
    handles: &BTreeMap<String, ModelHandle>,
    workers: usize,
    coordinator: Option<&Arc<SharedCache>>,
) -> BTreeMap<String, ModelHandle> {
    // Every handle was built from a configured model (`build_models`).
    handles
        .iter()
        .filter_map(|(name, h)| {
            let m = config.models.get(name)?;
            let own = m.per_worker();
            let share = if own { 1 } else { workers };
            let cfg = live_governor(config, m, share);
            // `per_worker` covers the embedded model: every model paced here has a server.
            let remote = coordinator.filter(|_| !own);
            let count = h.replicas.as_ref().map_or(1, |r| r.replicas().len());
            let mut keys = super::pacing::pacing_keys(name, count).into_iter();
            let mut governor = || match remote {
                Some(c) => {
                    let key = keys.next().unwrap_or_else(|| name.clone());
                    Governor::paced_by(cfg, RemotePacing::new(c.clone(), key))
                }
                None => Governor::new(cfg),
            };
            let replicas = h
                .replicas
                .as_ref()
                .map(|r| Arc::new(r.with_governors(&mut governor)));
            let governor = match &replicas {
                Some(r) => r.replicas()[0].governor.clone(),
                None => Arc::new(governor()),
            };
            let handle = ModelHandle {
                governor,
                replicas,
                ..h.clone()
            };
            Some((name.clone(), handle))
        })
        .collect()
}

/// The order of a model's prompts that share prefixes: live requests to a server feed its
/// prompt cache in order (`share_prefixes`).
fn prefix_order(m: &ModelConfig, answers: Answers, batch: bool) -> Option<Arc<PrefixOrder>> {
    match (&m.part, answers, batch) {
        (ModelPart::Server(s), Answers::Models, false) if s.share_prefixes => {
            Some(Arc::new(PrefixOrder::default()))
        }
        _ => None,
    }
}

/// What a batch-mode model's jobs are made of (none for a live model).
fn batch_plan(m: &ModelConfig) -> Option<BatchPlan> {
    (m.mode == ModelMode::Batch).then_some(BatchPlan {
        max_requests: m.batch.max_requests,
        max_bytes: m.batch.max_bytes,
        live_prices: m.prices,
    })
}

/// Every model of `config`, answering as `answers` says, each governed by `1 / share` of its
/// limits; batch-mode models store their jobs in `cache`.
pub(super) fn build_models(
    config: &Config,
    answers: Answers,
    cache: Option<&Arc<ResponseCache>>,
    share: usize,
) -> Result<Models, EngineError> {
    let mut out = Models {
        handles: BTreeMap::new(),
        token_counters: BTreeMap::new(),
        batch_plans: BTreeMap::new(),
    };
    for (name, m) in &config.models {
        let model_err = |source| EngineError::Model {
            model: name.clone(),
            source,
        };
        let pool = m.concurrency.min(config.dispatcher.concurrency);
        if let Some(plan) = batch_plan(m) {
            out.batch_plans.insert(name.clone(), plan);
        }
        let batch = match answers {
            Answers::Models => batch_queue(m, pool, cache).map_err(model_err)?,
            Answers::Estimates => None,
        };
        let (real, batch) = match batch {
            Some((chat, queue)) => (chat, Some(queue)),
            None => (provider(m, pool).map_err(model_err)?, None),
        };
        let replicas = replica_set(config, m, answers, (pool, share)).map_err(model_err)?;
        let (provider, governor): (Arc<dyn Provider>, _) = match answers {
            Answers::Estimates => {
                // Nothing is sent: no pacing, the whole budget in flight.
                let counter = TokenCounter::for_model(m).map_err(model_err)?;
                out.token_counters.insert(name.clone(), counter.describe());
                let governor = GovernorConfig {
                    max_concurrency: config.dispatcher.concurrency,
                    rpm: None,
                    tpm: None,
                    adaptive: false,
                };
                (Arc::new(EstimateProvider::new(real, counter)), governor)
            }
            Answers::Models => (real, live_governor(config, m, share)),
        };
        let embedder = match (embedder(m, pool).map_err(model_err)?, answers) {
            (Some(e), Answers::Estimates) => {
                let counter = TokenCounter::for_model(m).map_err(model_err)?;
                Some(Arc::new(EstimateProvider::new(e, counter)) as Arc<dyn Provider>)
            }
            (e, _) => e,
        };
        let prefixes = prefix_order(m, answers, batch.is_some());
        // A replicated model's own provider and governor are its first replica's.
        let (provider, governor) = match replicas.as_ref().map(|r| &r.replicas()[0]) {
            Some(first) => (first.provider.clone(), first.governor.clone()),
            None => (provider, Arc::new(Governor::new(governor))),
        };
        out.handles.insert(
            name.clone(),
            ModelHandle {
                provider,
                governor,
                replicas,
                prefixes,
                prices: m.effective_prices(),
                batch,
                embedder,
                tokens: Some(Arc::new(crate::llm::estimate::LazyCounter::new(m.clone()))),
                tally: None,
            },
        );
    }
    Ok(out)
}
