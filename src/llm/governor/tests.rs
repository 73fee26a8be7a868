//! Tests of the governor: slots, buckets, the pause rule, advertised limits, learned limits.
//!
//! They run on tokio's paused clock (`start_paused`): time moves only when every task waits,
//! straight to the next timer, so each wait is asserted to the millisecond of tokio's timer
//! (a computed wait of 40 ms may end on the 41st), however loaded the machine is, and the
//! simulated providers answer in exactly their latency.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

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

/// Asserts that `waited` is `expected`, to the millisecond tokio's timer rounds a deadline up to.
#[track_caller]
pub(crate) fn assert_waited(waited: Duration, expected: Duration) {
    assert!(
        waited >= expected && waited <= expected + Duration::from_millis(1),
        "waited {waited:?}, expected {expected:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn limits_in_flight_and_wakes_waiters() {
    let g = Arc::new(Governor::new(cfg(2)));
    let a = g.admit(1).await;
    let b = g.admit(1).await;
    let g2 = g.clone();
    let waiter = tokio::spawn(async move { g2.admit(1).await });
    // An hour passes (at once, on the paused clock) while the waiter has run and waits.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!waiter.is_finished(), "a third request waits");
    a.finish(done());
    let t = Instant::now();
    let c = waiter.await.unwrap();
    assert_eq!(t.elapsed(), Duration::ZERO, "woken by the release, at once");
    b.finish(Outcome::Failed);
    c.finish(Outcome::Failed);
}

#[tokio::test(start_paused = true)]
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
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!waiter.is_finished(), "it waits for the held slot");
    waiter.abort();
    let _ = waiter.await;
    held.finish(done());
    assert_eq!(g.in_flight(), 0);
    let t = Instant::now();
    g.admit(1).await.finish(done());
    assert_eq!(t.elapsed(), Duration::ZERO, "the slot is free");
}

/// Admits `n` requests, one after another, without ending any.
async fn admit_all(g: &Arc<Governor>, n: usize) -> Vec<Admission> {
    let mut adms = Vec::with_capacity(n);
    for _ in 0..n {
        adms.push(g.admit(1).await);
    }
    adms
}

/// Admits `n` at once, then ends all but `cap` of them as refused 1 ms later (a server that
/// takes `cap` requests at a time) and the rest as done 20 ms after they were sent.
async fn round_trip_against_a_cap(g: &Arc<Governor>, n: usize, cap: usize) {
    let mut adms = admit_all(g, n).await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    for a in adms.drain(cap.min(n)..) {
        a.finish(refused(Some(Duration::from_millis(1))));
    }
    tokio::time::sleep(Duration::from_millis(19)).await;
    for a in adms {
        a.finish(done());
    }
}

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
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
    let t = Instant::now();
    g.admit(1).await.finish(done());
    assert_eq!(t.elapsed(), Duration::ZERO, "the slots are free");
}

#[tokio::test(start_paused = true)]
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
    assert_eq!(t.elapsed(), Duration::ZERO, "not paused");
}

#[tokio::test(start_paused = true)]
async fn a_burst_pauses_the_model_for_round_trips_not_for_retry_after() {
    let g = Arc::new(Governor::new(cfg(16)));
    // Successes that take 20 ms teach the round trip.
    let warm = admit_all(&g, 16).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for a in warm {
        a.finish(done());
    }
    // A whole round trip refused 1 ms after it was sent, each asking for 5 s.
    let adms = admit_all(&g, 16).await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    for a in adms {
        a.finish(refused(Some(Duration::from_secs(5))));
    }
    assert_eq!(g.saturations(), 1);
    // Refused at every level while the 16 allowed were all being served: a rate. The model
    // pauses four round trips (after which what gets through measures the rate), not 5 s.
    assert_eq!(g.limit_kind(), Some(LimitKind::Rate));
    let t = Instant::now();
    g.admit(1).await.finish(done());
    assert_waited(t.elapsed(), Duration::from_millis(80));
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

/// What 64 rows sent through `g` to a [`RateProvider`] for `run` met: when each request
/// sent was answered and when each was refused.
async fn send_to_a_rate(g: &Arc<Governor>, run: Duration) -> (Vec<Instant>, Vec<Instant>) {
    let provider = Arc::new(std::sync::Mutex::new(RateProvider {
        tokens: 20.0,
        at: Instant::now(),
    }));
    let seen = Arc::new(std::sync::Mutex::new((Vec::new(), Vec::new())));
    let started = Instant::now();
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (g, provider, seen) = (g.clone(), provider.clone(), seen.clone());
            tokio::spawn(async move {
                while started.elapsed() < run {
                    let a = g.admit(1).await;
                    let ok = provider.lock().unwrap().take();
                    if ok {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        seen.lock().unwrap().0.push(Instant::now());
                        a.finish(done());
                    } else {
                        seen.lock().unwrap().1.push(Instant::now());
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
    let seen = seen.lock().unwrap();
    (seen.0.clone(), seen.1.clone())
}

#[tokio::test(start_paused = true)]
async fn a_rate_is_learned_from_what_gets_through_while_refusing() {
    let g = Arc::new(Governor::new(cfg(64)));
    let started = Instant::now();
    let (answered, refused) = send_to_a_rate(&g, Duration::from_millis(2500)).await;
    // The pace is under the provider's 200 a second, and within a tenth of it (the margin
    // is 5%).
    let pace = g.pace().expect("a pace was learned");
    assert!(
        (180.0..=200.0).contains(&pace),
        "pace {pace:.1}/s for a 200/s provider"
    );
    assert_eq!(g.limit_kind(), Some(LimitKind::Rate));
    // 200 a second at 20 ms is 4 at once: the ceiling leaves room for that.
    assert!(g.limit() >= 4, "limit {}", g.limit());
    // Settled: over the last second (1.5 s to 2.5 s) the pace is what got through, and
    // nothing was refused from then on.
    let in_last_second = |t: &&Instant| {
        let at = t.duration_since(started);
        at > Duration::from_millis(1500) && at <= Duration::from_millis(2500)
    };
    let got_through = answered.iter().filter(in_last_second).count();
    assert!(
        (180..=200).contains(&got_through),
        "{got_through} answered in the last second"
    );
    let late = refused
        .iter()
        .filter(|t| t.duration_since(started) > Duration::from_millis(1500))
        .count();
    assert_eq!(late, 0, "{late} refused after 1.5 s");
}

#[tokio::test(start_paused = true)]
async fn rpm_and_tpm_buckets_pace_requests() {
    // 600 requests per minute = one per 100 ms once the bucket is empty.
    let g = Arc::new(Governor::new(GovernorConfig {
        rpm: Some(600),
        ..cfg(1000)
    }));
    let t = Instant::now();
    for _ in 0..600 {
        g.admit(1).await.finish(done());
    }
    assert_eq!(t.elapsed(), Duration::ZERO, "a full bucket sends at once");
    for _ in 0..3 {
        let t = Instant::now();
        g.admit(1).await.finish(done());
        assert_waited(t.elapsed(), Duration::from_millis(100));
    }

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
    assert_eq!(t.elapsed(), Duration::ZERO, "refund made room");
    a.finish(done());
    // Nothing is left: the next 100 tokens wait for their refill (100 a second).
    let t = Instant::now();
    g.admit(100).await.finish(done());
    assert_waited(t.elapsed(), Duration::from_secs(1));
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

#[tokio::test(start_paused = true)]
async fn advertised_limits_pace_before_any_refusal() {
    let g = Arc::new(Governor::new(cfg(100)));
    // The provider says 600 a minute and 3 left: three go now, the fourth waits 100 ms.
    g.admit(1).await.finish(Outcome::Done {
        tokens: None,
        rate: advertised(600, 3, 500),
    });
    let t = Instant::now();
    for _ in 0..3 {
        g.admit(1).await.finish(done());
    }
    assert_eq!(t.elapsed(), Duration::ZERO);
    g.admit(1).await.finish(done());
    assert_waited(t.elapsed(), Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn a_spent_key_pauses_the_model_until_its_reset() {
    let g = Arc::new(Governor::new(cfg(100)));
    g.admit(1).await.finish(Outcome::RateLimited {
        retry_after: Some(Duration::from_millis(10)),
        rate: advertised(60_000, 0, 150),
    });
    let t = Instant::now();
    g.admit(1).await.finish(done());
    assert_waited(t.elapsed(), Duration::from_millis(150));
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
    assert_eq!(t.elapsed(), Duration::ZERO);
    // A spent key with a huge reset: paused for MAX_PAUSE, no longer.
    g.admit(1).await.finish(Outcome::RateLimited {
        retry_after: None,
        rate: advertised(60_000, 0, u64::MAX / 2),
    });
    let t = Instant::now();
    g.admit(1).await.finish(done());
    assert_waited(t.elapsed(), MAX_PAUSE);
}
