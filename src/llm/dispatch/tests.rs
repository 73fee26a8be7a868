//! Tests of the dispatcher: dedup, and release of everything a dropped call held.

use super::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::llm::Provider;
use crate::llm::governor::{Governor, GovernorConfig};
use crate::types::{LlmError, LlmResponse};

/// Answers every prompt with its own text.
#[derive(Debug)]
struct Echo;

#[async_trait::async_trait]
impl Provider for Echo {
    fn endpoint(&self) -> String {
        "echo".into()
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        Ok(LlmResponse {
            content: req.prompt.user.clone(),
            finish_reason: Some("stop".into()),
            usage: None,
            rate: Default::default(),
        })
    }
}

fn model(provider: Arc<dyn Provider>, concurrency: usize) -> ModelHandle {
    ModelHandle {
        batch: None,
        embedder: None,
        tokens: None,
        provider,
        governor: Arc::new(Governor::new(GovernorConfig {
            max_concurrency: concurrency,
            rpm: None,
            tpm: None,
            adaptive: false,
        })),
        prices: None,
    }
}

/// Answers after a long time (a request on the wire when its statement is dropped).
#[derive(Debug)]
struct Slow;

#[async_trait::async_trait]
impl Provider for Slow {
    fn endpoint(&self) -> String {
        "slow".into()
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Echo.complete(req).await
    }
}

#[tokio::test]
async fn a_call_dropped_on_the_wire_gives_everything_back() {
    let d = Dispatcher::new(DispatcherConfig::default());
    let m = model(Arc::new(Slow), 2);
    for round in 0..3 {
        // Two calls fill the model's concurrency; dropping them (a LIMIT satisfied) must free
        // it, or the third round never gets a slot.
        let calls = futures::future::join_all((0..2).map(|i| d.call(&m, request(i))));
        let cut = tokio::time::timeout(Duration::from_millis(50), calls).await;
        assert!(cut.is_err(), "round {round}: the calls are still running");
        assert_eq!(
            m.governor.in_flight(),
            0,
            "round {round}: admissions given back"
        );
        assert_eq!(d.metrics().in_flight.load(Ordering::Relaxed), 0);
    }
    // Each round sent the calls again: the dropped ones left no result to share.
    assert_eq!(d.metrics().requests.load(Ordering::Relaxed), 6);
}

fn request(i: usize) -> LlmRequest {
    LlmRequest {
        function: "f".into(),
        prompt: RenderedPrompt {
            system: None,
            user: format!("prompt {i}"),
        },
        max_tokens: None,
        temperature: None,
        schema: None,
    }
}

#[tokio::test]
async fn the_dedup_map_forgets_completed_calls_when_full() {
    let d = Dispatcher::new(DispatcherConfig::default());
    let model = model(Arc::new(Echo), 8);
    for i in 0..dedup::CAPACITY + 100 {
        d.call(&model, request(i)).await.unwrap();
    }
    let remembered = d.inner.dedup.len();
    assert!(
        remembered <= 101,
        "completed calls forgotten: {remembered} kept"
    );
    // A recent identical call is still shared; a forgotten one is made again.
    d.call(&model, request(dedup::CAPACITY + 99)).await.unwrap();
    assert_eq!(d.metrics().deduplicated.load(Ordering::Relaxed), 1);
    d.call(&model, request(0)).await.unwrap();
    assert_eq!(
        d.metrics().requests.load(Ordering::Relaxed),
        (dedup::CAPACITY + 101) as u64
    );
}

#[tokio::test]
async fn more_running_calls_than_the_dedup_capacity_are_all_shared() {
    // A batch job holds tens of thousands of calls waiting at once: none is forgotten while it
    // runs (and inserting stays cheap), so an identical call beyond the capacity is shared.
    let d = Dispatcher::new(DispatcherConfig::default());
    let m = model(Arc::new(Slow), 1);
    let n = dedup::CAPACITY + 10;
    let calls = (0..n)
        .chain([n - 5])
        .map(|i| d.call(&m, request(i)))
        .collect::<Vec<_>>();
    let cut = tokio::time::timeout(Duration::from_millis(500), futures::future::join_all(calls));
    assert!(cut.await.is_err(), "the calls are still running");
    assert_eq!(d.metrics().deduplicated.load(Ordering::Relaxed), 1);
}
