//! Tests of the governor: slots, buckets, the pause rule, advertised limits, learned limits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

fn cfg(max: usize) -> GovernorConfig {
    GovernorConfig {
        max_concurrency: max,
        rpm: None,
        tpm: None,
        adaptive: true,
    }
}

fn done() -> Outcome {
    Outcome::Done {
        tokens: None,
        rate: RateLimits::default(),
    }
}

fn refused(retry_after: Option<Duration>) -> Outcome {
    Outcome::RateLimited {
        retry_after,
        rate: RateLimits::default(),
    }
}

#[tokio::test]
async fn limits_in_flight_and_wakes_waiters() {
    let g = Arc::new(Governor::new(cfg(2)));
    let a = g.admit(1).await;
    let b = g.admit(1).await;
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.admit(1).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiter.is_finished(), "a third request waits");
    a.finish(done());
    let c = tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("woken")
        .unwrap();
    b.finish(Outcome::Failed);
    c.finish(Outcome::Failed);
}

#[tokio::test]
async fn a_dropped_admission_gives_its_slot_back() {
    let g = Arc::new(Governor::new(cfg(1)));
    let a = g.admit(1).await;
    assert_eq!(g.in_flight(), 1);
    drop(a);
    assert_eq!(g.in_flight(), 0);
    // A request cancelled while it waits for admission takes nothing.
    let held = g.admit(1).await;
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.admit(1).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    waiter.abort();
    let _ = waiter.await;
    held.finish(done());
    assert_eq!(g.in_flight(), 0);
    let again = tokio::time::timeout(Duration::from_secs(1), g.admit(1)).await;
    assert!(again.is_ok(), "the slot is free");
}

/// Admits `n` requests, one after another, without ending any.
async fn admit_all(g: &Arc<Governor>, n: usize) -> Vec<Admission> {
    let mut adms = Vec::with_capacity(n);
    for _ in 0..n {
        adms.push(g.admit(1).await);
    }
    adms
}

/// Admits `n` at once, then ends all but `cap` of them as refused at once (a server that
/// takes `cap` requests at a time) and the rest as done 20 ms later.
async fn round_trip_against_a_cap(g: &Arc<Governor>, n: usize, cap: usize) {
    let mut adms = admit_all(g, n).await;
    for a in adms.drain(cap.min(n)..) {
        a.finish(refused(Some(Duration::from_millis(1))));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    for a in adms {
        a.finish(done());
    }
}

#[tokio::test]
async fn a_concurrency_cap_is_learned_and_kept_by_the_ceiling_alone() {
    let g = Arc::new(Governor::new(cfg(64)));
    round_trip_against_a_cap(&g, 64, 32).await;
    // One burst: the refusals after the first ones were of requests sent before the cap
    // was learned, and teach nothing more.
    assert_eq!(g.saturations(), 1);
    // Refused from the 33rd in flight on: a cap of 32, kept by the ceiling alone.
    assert_eq!((g.limit(), g.pace()), (32, None));
    // At the cap nothing is refused and nothing changes.
    for _ in 0..10 {
        round_trip_against_a_cap(&g, 32, 32).await;
    }
    assert_eq!((g.limit(), g.saturations()), (32, 1));
}

#[test]
fn a_probe_past_a_cap_is_trimmed_back() {
    use super::learn::Learner;
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let mut l = Learner::new(t0);
    // 64 sent at once; the provider serves 32 and refuses the rest.
    for _ in 0..64 {
        l.sent();
    }
    for level in 33..=64 {
        l.refused(t0, level, Some(Duration::from_secs(1)), ms(1));
        if let Some(pause) = l.judge(l.limit(64), ms(1)) {
            assert!(pause <= Duration::from_millis(100), "{pause:?}");
        }
    }
    assert_eq!((l.limit(64), l.saturations), (32, 1));
    for _ in 0..32 {
        l.ok(t0, ms(20));
        assert_eq!(l.judge(l.limit(64), ms(20)), None);
    }
    // After the quiet period, one more is tried; the provider refuses the first request sent
    // at 33 in flight, which undoes the probe at once.
    l.probe(64, ms(30));
    assert_eq!(l.limit(64), 32, "not probed before the quiet period");
    let later = ms(10_000);
    l.probe(64, later);
    assert_eq!(l.limit(64), 33);
    let answered = later + Duration::from_millis(1);
    for i in 0..33 {
        l.sent();
        if i < 3 {
            l.refused(later, 33, Some(Duration::from_secs(1)), answered);
            assert_eq!(l.limit(64), 32, "the probe is undone by its first refusal");
        } else {
            l.ok(later, later + Duration::from_millis(20));
        }
        assert_eq!(
            l.judge(l.limit(64), answered),
            None,
            "an undone probe is no burst"
        );
    }
    // The two refused after it were sent before it was undone: they trim nothing.
    assert_eq!((l.limit(64), l.saturations), (32, 1));
    // A burst at the top slot after the probe's trial (each refusal's slot taken again at
    // once): one less, and still a cap, not a rate.
    let again = later + Duration::from_secs(30);
    l.probe(64, again);
    assert_eq!(l.limit(64), 33);
    // Served at once, as the client counts it (its intervals overlap by one more than the
    // provider's).
    for _ in 0..33 {
        l.ok(later, again);
    }
    let after_trial = again + Duration::from_millis(200);
    for _ in 0..16 {
        l.sent();
        l.refused(after_trial, 33, Some(Duration::from_secs(1)), after_trial);
        if l.judge(l.limit(64), after_trial).is_some() {
            break;
        }
    }
    assert_eq!((l.limit(64), l.saturations), (32, 2));
    assert!(l.pace.is_none(), "a cap has no pace");
}

#[tokio::test]
async fn refused_slots_are_held_until_the_refusals_are_judged() {
    let g = Arc::new(Governor::new(cfg(64)));
    let mut adms = admit_all(&g, 64).await;
    // Nothing answered yet: each refused request keeps its slot from new requests, which a
    // provider over its cap would refuse too.
    for _ in 0..5 {
        adms.pop()
            .unwrap()
            .finish(refused(Some(Duration::from_secs(1))));
    }
    assert_eq!(g.in_flight(), 64);
    // Enough refusals to judge (a fifth of 64): a cap under the lowest level refused, and
    // the held slots come back.
    for _ in 0..8 {
        adms.pop()
            .unwrap()
            .finish(refused(Some(Duration::from_secs(1))));
    }
    assert_eq!((g.saturations(), g.limit()), (1, 51));
    assert_eq!(g.in_flight(), 51);
    for a in adms {
        a.finish(done());
    }
    assert_eq!(g.in_flight(), 0);
    // A provider that refuses everything: the slots come back with the last refusal.
    let g = Arc::new(Governor::new(cfg(4)));
    let adms = [g.admit(1).await, g.admit(1).await, g.admit(1).await];
    for a in adms {
        a.finish(refused(None));
    }
    assert_eq!(g.in_flight(), 0);
    let again = tokio::time::timeout(Duration::from_secs(1), g.admit(1)).await;
    assert!(again.is_ok(), "the slots are free");
}

#[tokio::test]
async fn scattered_429s_pause_nobody_and_teach_nothing() {
    let g = Arc::new(Governor::new(cfg(64)));
    for i in 0..2000 {
        let a = g.admit(1).await;
        // One in twenty refused, at any level: a provider refusing at random.
        a.finish(if i % 20 == 0 {
            refused(Some(Duration::from_millis(500)))
        } else {
            done()
        });
    }
    assert_eq!(g.saturations(), 0);
    assert_eq!((g.limit(), g.pace()), (64, None));
    let t = Instant::now();
    g.admit(1).await.finish(done());
    assert!(t.elapsed() < Duration::from_millis(50), "not paused");
}

#[tokio::test]
async fn a_burst_pauses_the_model_for_a_round_trip_not_for_retry_after() {
    let g = Arc::new(Governor::new(cfg(16)));
    // Successes that take ~20 ms teach the round trip.
    let warm = admit_all(&g, 16).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for a in warm {
        a.finish(done());
    }
    // A whole round trip refused, each asking for 5 s.
    let adms = admit_all(&g, 16).await;
    for a in adms {
        a.finish(refused(Some(Duration::from_secs(5))));
    }
    assert_eq!(g.saturations(), 1);
    let t = Instant::now();
    g.admit(1).await.finish(done());
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(20) && waited < Duration::from_millis(500),
        "{waited:?}"
    );
}

/// A provider that takes 200 requests a second (a bucket holding 20) and answers in 20 ms.
struct RateProvider {
    tokens: f64,
    at: Instant,
}

impl RateProvider {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * 200.0).min(20.0);
        self.at = now;
        let ok = self.tokens >= 1.0;
        if ok {
            self.tokens -= 1.0;
        }
        ok
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_is_learned_from_what_gets_through_while_refusing() {
    let g = Arc::new(Governor::new(cfg(64)));
    let provider = Arc::new(std::sync::Mutex::new(RateProvider {
        tokens: 20.0,
        at: Instant::now(),
    }));
    let refusals = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let started = Instant::now();
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (g, provider, refusals) = (g.clone(), provider.clone(), refusals.clone());
            tokio::spawn(async move {
                while started.elapsed() < Duration::from_millis(2500) {
                    let a = g.admit(1).await;
                    let ok = provider.lock().unwrap().take();
                    if ok {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        a.finish(done());
                    } else {
                        refusals.lock().unwrap().push(Instant::now());
                        a.finish(refused(Some(Duration::from_millis(5))));
                        // The dispatcher retries a refused row after its Retry-After.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    // A pace under the provider's rate (its speed is measured in benches/; timing here is
    // too loose to pin it), and the refusals stopped.
    let pace = g.pace().expect("a pace was learned");
    assert!(
        (60.0..=240.0).contains(&pace),
        "pace {pace:.0}/s for a 200/s provider"
    );
    // 200 a second at 20 ms is 4 at once: the ceiling leaves room for that.
    assert!(g.limit() >= 4, "limit {}", g.limit());
    // Settled: the last second refused next to nothing.
    let late = refusals
        .lock()
        .unwrap()
        .iter()
        .filter(|t| t.duration_since(started) > Duration::from_millis(1500))
        .count();
    assert!(late <= 10, "{late} refusals in the last second");
}

#[tokio::test]
async fn rpm_and_tpm_buckets_pace_requests() {
    // 600 requests per minute = one per 100 ms once the bucket is empty.
    let g = Arc::new(Governor::new(GovernorConfig {
        rpm: Some(600),
        ..cfg(1000)
    }));
    for _ in 0..600 {
        g.admit(1).await.finish(done());
    }
    let t = Instant::now();
    g.admit(1).await.finish(done());
    assert!(
        t.elapsed() >= Duration::from_millis(80),
        "{:?}",
        t.elapsed()
    );

    // 6,000 tokens per minute: reported usage smaller than the estimate gives the
    // difference back.
    let g = Arc::new(Governor::new(GovernorConfig {
        tpm: Some(6000),
        ..cfg(1000)
    }));
    let a = g.admit(6000).await;
    a.finish(Outcome::Done {
        tokens: Some(5900),
        rate: RateLimits::default(),
    });
    let t = Instant::now();
    let a = g.admit(100).await;
    assert!(t.elapsed() < Duration::from_millis(50), "refund made room");
    a.finish(done());
}

fn advertised(limit: u64, remaining: u64, reset_ms: u64) -> RateLimits {
    RateLimits {
        requests: RateWindow {
            limit: Some(limit),
            remaining: Some(remaining),
            reset: Some(Duration::from_millis(reset_ms)),
        },
        tokens: RateWindow::default(),
    }
}

#[tokio::test]
async fn advertised_limits_pace_before_any_refusal() {
    let g = Arc::new(Governor::new(cfg(100)));
    // The provider says 600 a minute and 3 left: three go now, the fourth waits ~100 ms.
    g.admit(1).await.finish(Outcome::Done {
        tokens: None,
        rate: advertised(600, 3, 500),
    });
    let t = Instant::now();
    for _ in 0..3 {
        g.admit(1).await.finish(done());
    }
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
    g.admit(1).await.finish(done());
    assert!(
        t.elapsed() >= Duration::from_millis(80),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_spent_key_pauses_the_model_until_its_reset() {
    let g = Arc::new(Governor::new(cfg(100)));
    g.admit(1).await.finish(Outcome::RateLimited {
        retry_after: Some(Duration::from_millis(10)),
        rate: advertised(60_000, 0, 150),
    });
    let t = Instant::now();
    g.admit(1).await.finish(done());
    assert!(
        t.elapsed() >= Duration::from_millis(140),
        "{:?}",
        t.elapsed()
    );
    // A huge advertised reset pauses at most MAX_PAUSE, and garbage is not a pause.
    let g = Arc::new(Governor::new(cfg(100)));
    g.admit(1).await.finish(Outcome::Done {
        tokens: None,
        rate: RateLimits {
            requests: RateWindow {
                limit: None,
                remaining: Some(5),
                reset: Some(Duration::MAX),
            },
            tokens: RateWindow::default(),
        },
    });
    let t = Instant::now();
    g.admit(1).await.finish(done());
    assert!(t.elapsed() < Duration::from_millis(50));
}
