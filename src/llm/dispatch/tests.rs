//! Tests of the dispatcher: dedup, release of everything a dropped call held, and hedging.
//!
//! They run on tokio's paused clock (`start_paused`): a provider's latency is exact, a wait
//! ends to the millisecond of tokio's timer, and a timeout fires only once every task waits.

use super::*;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Hedge;
use crate::llm::Provider;
use crate::llm::governor::tests::assert_waited;
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
            confidence: None,
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
        replicas: None,
        prefixes: None,
        tally: None,
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

#[tokio::test(start_paused = true)]
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
        confidence: false,
        function: "f".into(),
        prompt: RenderedPrompt {
            system: None,
            user: format!("prompt {i}"),
            cuts: Default::default(),
        },
        max_tokens: None,
        temperature: None,
        schema: None,
    }
}

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
async fn more_running_calls_than_the_dedup_capacity_are_all_shared() {
    // A batch job holds tens of thousands of calls waiting at once: none is forgotten while it
    // runs (and inserting stays cheap), so an identical call beyond the capacity is shared.
    // The timeout fires once every call waits (the clock is paused). Without hedging, which
    // would have each waiting call look again every 50 ms: seconds of polling for 20,010.
    let d = Dispatcher::new(DispatcherConfig {
        hedge: Hedge::Off,
        ..DispatcherConfig::default()
    });
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

/// Answers after `latency`, except the first attempt of a prompt starting with "hang", which
/// hangs for an hour (a connection that never answers).
#[derive(Debug)]
struct HangsFirst {
    latency: Duration,
    attempts: std::sync::Mutex<HashMap<String, u32>>,
}

impl HangsFirst {
    fn new(latency: Duration) -> Arc<HangsFirst> {
        Arc::new(HangsFirst {
            latency,
            attempts: Default::default(),
        })
    }
}

#[async_trait::async_trait]
impl Provider for HangsFirst {
    fn endpoint(&self) -> String {
        "hangs-first".into()
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap();
            let n = attempts.entry(req.prompt.user.clone()).or_default();
            *n += 1;
            *n
        };
        if attempt == 1 && req.prompt.user.starts_with("hang") {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        tokio::time::sleep(self.latency).await;
        Echo.complete(req).await
    }
}

fn asking(user: &str) -> LlmRequest {
    LlmRequest {
        prompt: RenderedPrompt {
            system: None,
            user: user.into(),
            cuts: Default::default(),
        },
        ..request(0)
    }
}

#[tokio::test(start_paused = true)]
async fn a_hung_request_is_hedged_after_hedge_after_ms_and_answered_once() {
    let d = Dispatcher::new(DispatcherConfig {
        hedge: Hedge::After(Duration::from_millis(200)),
        ..DispatcherConfig::default()
    });
    let m = model(HangsFirst::new(Duration::from_millis(10)), 4);
    let t = Instant::now();
    let value = d.call(&m, asking("hang 1")).await.unwrap();
    // Sent again at 200 ms, answered 10 ms later; the hung one is dropped with its slot.
    assert_waited(t.elapsed(), Duration::from_millis(210));
    assert_eq!(*value, serde_json::json!("hang 1"));
    let metrics = d.metrics();
    assert_eq!(metrics.hedges.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.requests.load(Ordering::Relaxed), 2);
    assert_eq!(m.governor.in_flight(), 0);
    // A request that answers in time is not hedged.
    let t = Instant::now();
    d.call(&m, asking("fine")).await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_millis(10));
    assert_eq!(metrics.hedges.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn the_adaptive_hedge_waits_for_samples_then_three_p99s_within_its_budget() {
    let d = Dispatcher::new(DispatcherConfig::default());
    let m = model(HangsFirst::new(Duration::from_millis(200)), 64);
    let hedges = || d.metrics().hedges.load(Ordering::Relaxed);
    // No threshold before 20 answers: a hung request is not hedged (in ten minutes).
    let early = tokio::time::timeout(Duration::from_secs(600), d.call(&m, asking("hang 0")));
    assert!(early.await.is_err(), "not hedged without samples");
    assert_eq!(hedges(), 0);
    // 20 answers of 200 ms: three times their p99 is 600 ms (the histogram's bucket edge,
    // within 5%).
    futures::future::join_all((0..20).map(|i| d.call(&m, request(i)))).await;
    let p99 = d.inner.metrics.function("f").latency.quantile_ms(0.99);
    let after = Duration::from_secs_f64(3.0 * p99.unwrap() / 1000.0);
    assert!(
        after >= Duration::from_millis(600) && after <= Duration::from_millis(630),
        "{after:?}"
    );
    let t = Instant::now();
    d.call(&m, asking("hang 1")).await.unwrap();
    assert_waited(t.elapsed(), after + Duration::from_millis(200));
    assert_eq!(hedges(), 1);
    // One hedge is the whole budget under 50 requests (2% of them, at least one): the next
    // hung request waits.
    let over = tokio::time::timeout(Duration::from_secs(600), d.call(&m, asking("hang 2")));
    assert!(over.await.is_err(), "over the budget, not hedged");
    assert_eq!(hedges(), 1);
}

/// Fails every request with a server error, at once.
#[derive(Debug)]
struct Fails;

#[async_trait::async_trait]
impl Provider for Fails {
    fn endpoint(&self) -> String {
        "fails".into()
    }

    async fn complete(&self, _req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        Err(LlmError::new(ErrorKind::ServerError, "500"))
    }
}

#[tokio::test(start_paused = true)]
async fn a_row_stops_retrying_at_its_deadline() {
    // Backoffs of 20 to 40 ms (full jitter under 40 ms) within a 300 ms deadline.
    let d = Dispatcher::new(DispatcherConfig {
        max_attempts: 50,
        backoff_base: Duration::from_millis(40),
        backoff_max: Duration::from_millis(40),
        row_deadline: Duration::from_millis(300),
        ..DispatcherConfig::default()
    });
    let m = model(Arc::new(Fails), 4);
    let t = Instant::now();
    let e = d.call(&m, asking("q")).await.unwrap_err();
    let waited = t.elapsed();
    assert!(e.message.contains("row deadline"), "{}", e.message);
    // No retry starts after the deadline (give or take the millisecond tokio's timer rounds a
    // wait up to), and the last one started less than a backoff before it.
    assert!(
        waited > Duration::from_millis(260) && waited <= Duration::from_millis(301),
        "{waited:?}"
    );
    assert!((8..=16).contains(&e.attempts), "{} attempts", e.attempts);
}

fn hangs_first(latency_ms: u64) -> HangsFirst {
    HangsFirst {
        latency: Duration::from_millis(latency_ms),
        attempts: Default::default(),
    }
}

/// Prompts starting with "hang": the first request hangs for an hour, the second (its hedge)
/// fails at once with a 503, the later ones answer after `latency`. Others answer after
/// `latency`.
#[derive(Debug)]
struct HangsThenFails(HangsFirst);

#[async_trait::async_trait]
impl Provider for HangsThenFails {
    fn endpoint(&self) -> String {
        "hangs-then-fails".into()
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        let attempts = self
            .0
            .attempts
            .lock()
            .unwrap()
            .get(&req.prompt.user)
            .copied();
        if attempts == Some(1) && req.prompt.user.starts_with("hang") {
            self.0
                .attempts
                .lock()
                .unwrap()
                .insert(req.prompt.user.clone(), 2);
            return Err(LlmError::new(ErrorKind::ServerError, "503"));
        }
        self.0.complete(req).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_hedge_of_a_hung_request_is_retried_without_waiting_for_the_hung_one() {
    // Backoff of 50 to 100 ms (full jitter under 100 ms).
    let d = Dispatcher::new(DispatcherConfig {
        hedge: Hedge::After(Duration::from_millis(200)),
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_millis(100),
        ..DispatcherConfig::default()
    });
    let m = model(Arc::new(HangsThenFails(hangs_first(10))), 4);
    let t = Instant::now();
    let value = d.call(&m, asking("hang 1")).await.unwrap();
    // Hedged at 200 ms, the hedge fails at once: the attempt fails with it (the hung request
    // is dropped with its slot), and the retry after its backoff answers 10 ms later — not an
    // hour later, when the hung one would have answered.
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(260) && waited <= Duration::from_millis(313),
        "{waited:?}"
    );
    assert_eq!(*value, serde_json::json!("hang 1"));
    let metrics = d.metrics();
    assert_eq!(metrics.hedges.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.requests.load(Ordering::Relaxed), 3);
    let retries = Metrics::names(&metrics.retries);
    assert_eq!(retries.get("server_error"), Some(&1), "{retries:?}");
    assert_eq!(m.governor.in_flight(), 0);
    assert_eq!(metrics.in_flight.load(Ordering::Relaxed), 0);
}

/// Prompts starting with "fail": the first request answers a 503 after 300 ms, the second
/// hangs for an hour, the later ones answer after `latency`. Others as [`HangsFirst`].
#[derive(Debug)]
struct FailsThenHangs(HangsFirst);

#[async_trait::async_trait]
impl Provider for FailsThenHangs {
    fn endpoint(&self) -> String {
        "fails-then-hangs".into()
    }

    async fn complete(&self, req: &LlmRequest) -> Result<LlmResponse, LlmError> {
        if !req.prompt.user.starts_with("fail") {
            return self.0.complete(req).await;
        }
        let n = {
            let mut attempts = self.0.attempts.lock().unwrap();
            let n = attempts.entry(req.prompt.user.clone()).or_default();
            *n += 1;
            *n
        };
        match n {
            // Slow, then a 503: hedged before it fails.
            1 => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Err(LlmError::new(ErrorKind::ServerError, "503"))
            }
            // The hedge hangs.
            2 => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Echo.complete(req).await
            }
            _ => {
                tokio::time::sleep(self.0.latency).await;
                Echo.complete(req).await
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_hedge_left_alone_is_hedged_in_its_turn() {
    let d = Dispatcher::new(DispatcherConfig {
        hedge: Hedge::After(Duration::from_millis(200)),
        ..DispatcherConfig::default()
    });
    let m = model(Arc::new(FailsThenHangs(hangs_first(10))), 4);
    // A hundred answers first: the budget then allows two hedges.
    futures::future::join_all((0..100).map(|i| d.call(&m, request(i)))).await;
    let t = Instant::now();
    let value = d.call(&m, asking("fail 1")).await.unwrap();
    // The first is hedged at 200 ms and fails at 300 ms; the hedge, hung, is hedged at 400 ms
    // (200 ms on the wire) and that third request answers 10 ms later, in the same attempt.
    assert_waited(t.elapsed(), Duration::from_millis(410));
    assert_eq!(*value, serde_json::json!("fail 1"));
    let metrics = d.metrics();
    assert_eq!(metrics.hedges.load(Ordering::Relaxed), 2);
    assert_eq!(metrics.requests.load(Ordering::Relaxed), 103);
    assert!(Metrics::names(&metrics.retries).is_empty());
    assert_eq!(m.governor.in_flight(), 0);
}

#[test]
fn counters_shipped_and_absorbed_make_the_same_snapshot() {
    use std::sync::atomic::Ordering::Relaxed;
    let worker = Metrics::default();
    worker.requests.fetch_add(7, Relaxed);
    worker.spent_nano_usd.fetch_add(1_234, Relaxed);
    Metrics::bump(&worker.retries, ErrorKind::RateLimited);
    let f = worker.function("answer_question");
    f.prompts.fetch_add(5, Relaxed);
    f.tokens_in.fetch_add(900, Relaxed);
    f.latency.record(Duration::from_millis(40));
    f.latency.record(Duration::from_millis(90));
    Metrics::bump(&f.errors, ErrorKind::Truncated);

    let coordinator = Metrics::default();
    coordinator.absorb(&worker.counters());
    assert_eq!(coordinator.snapshot(), worker.snapshot());
    // A second report carries only what changed; names nobody knows are ignored.
    worker.requests.fetch_add(2, Relaxed);
    let mut delta = std::collections::BTreeMap::from([("requests".to_string(), 2u64)]);
    delta.insert("no_such_counter".into(), 9);
    delta.insert("retry:no_such_kind".into(), 9);
    coordinator.absorb(&delta);
    assert_eq!(coordinator.snapshot(), worker.snapshot());
}
