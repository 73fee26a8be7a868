//! The replicas' routing, ejection and probes, on tokio's paused clock.

use super::*;
use crate::llm::governor::GovernorConfig;
use crate::types::{LlmResponse, RenderedPrompt};

#[derive(Debug)]
struct Nothing;

#[async_trait::async_trait]
impl Provider for Nothing {
    fn endpoint(&self) -> String {
        "nothing".into()
    }
    async fn complete(&self, _: &LlmRequest) -> Result<LlmResponse, LlmError> {
        Err(LlmError::new(ErrorKind::Connect, "refused"))
    }
}

fn set(n: usize) -> ReplicaSet {
    let replicas = (0..n)
        .map(|i| {
            let g = Governor::new(GovernorConfig {
                max_concurrency: 4,
                rpm: None,
                tpm: None,
                adaptive: false,
            });
            let url = format!("http://user:pw@host{i}:80/v1?token=x");
            Replica::new(&url, Arc::new(Nothing), Arc::new(g))
        })
        .collect();
    ReplicaSet::new("m", replicas)
}

fn req(user: &str) -> LlmRequest {
    LlmRequest {
        confidence: false,
        function: "f".into(),
        prompt: RenderedPrompt {
            system: None,
            user: user.into(),
            cuts: Default::default(),
        },
        max_tokens: None,
        temperature: None,
        schema: None,
    }
}

/// The index `pick` routes `r` to (the lease dropped at once).
fn route(s: &ReplicaSet, r: &LlmRequest, tried: &[usize]) -> Option<usize> {
    match s.pick(r, tried).expect("a replica is up") {
        Pick::To(lease) => Some(lease.index()),
        Pick::AllTried => None,
    }
}

fn fail(s: &ReplicaSet, i: usize) -> Verdict {
    let refused = LlmError::new(ErrorKind::Connect, "refused");
    let mut lease = s.lease(i, false);
    lease.report(Err(&refused))
}

#[tokio::test(start_paused = true)]
async fn three_failures_in_a_row_eject_and_probes_back_off() {
    let s = set(2);
    let r = req("x");
    assert_eq!(fail(&s, 0), Verdict::Reroute);
    assert_eq!(fail(&s, 0), Verdict::Reroute);
    assert_eq!(s.replicas[0].snapshot().state, "up");
    fail(&s, 0);
    let snap = s.replicas[0].snapshot();
    assert_eq!(
        (snap.state, snap.ejections, snap.failures),
        ("ejected", 1, 3)
    );
    assert_eq!(
        snap.url, "http://host0/v1",
        "no credentials, query or default port"
    );
    for _ in 0..10 {
        assert_eq!(route(&s, &r, &[]), Some(1));
    }
    // Probed after the first rest; a failed probe doubles the rest.
    tokio::time::advance(PROBE_FIRST).await;
    let mut probe = match s.pick(&r, &[]).unwrap() {
        Pick::To(l) => l,
        Pick::AllTried => panic!("a probe is due"),
    };
    assert_eq!(probe.index(), 0);
    assert_eq!(route(&s, &r, &[]), Some(1), "one probe at a time");
    let refused = LlmError::new(ErrorKind::Connect, "refused");
    assert_eq!(probe.report(Err(&refused)), Verdict::Reroute);
    drop(probe);
    tokio::time::advance(PROBE_FIRST).await;
    assert_eq!(route(&s, &r, &[]), Some(1), "the rest doubled");
    tokio::time::advance(PROBE_FIRST).await;
    let mut probe = match s.pick(&r, &[]).unwrap() {
        Pick::To(l) => l,
        Pick::AllTried => panic!("a probe is due"),
    };
    assert_eq!(probe.report(Ok(())), Verdict::Stands);
    drop(probe);
    assert_eq!(s.replicas[0].snapshot().state, "up");
}

#[tokio::test(start_paused = true)]
async fn an_answer_resets_the_count_and_other_errors_stand() {
    let s = set(2);
    fail(&s, 0);
    fail(&s, 0);
    s.lease(0, false).report(Ok(()));
    fail(&s, 0);
    fail(&s, 0);
    assert_eq!(s.replicas[0].snapshot().state, "up");
    let invalid = LlmError::new(ErrorKind::InvalidOutput, "bad");
    assert_eq!(s.lease(0, false).report(Err(&invalid)), Verdict::Stands);
}

/// A prompt: `n`'s passage (1,000 bytes) after a fixed 300-byte instruction, then `q`.
fn ask(n: usize, q: &str) -> LlmRequest {
    let passage = format!("passage {n} ").repeat(100);
    req(&format!("{}{passage}{q}", "i".repeat(300)))
}

#[tokio::test(start_paused = true)]
async fn siblings_meet_where_their_passage_went_and_new_passages_spread_by_load() {
    let s = set(4);
    // Four passages in flight: one per replica (all were sent the instruction only).
    let leases: Vec<Lease<'_>> = (0..4)
        .map(|n| match s.pick(&ask(n, "Q1"), &[]).unwrap() {
            Pick::To(l) => l,
            Pick::AllTried => unreachable!(),
        })
        .collect();
    let mut firsts: Vec<usize> = leases.iter().map(Lease::index).collect();
    firsts.sort();
    assert_eq!(firsts, [0, 1, 2, 3], "spread by load");
    drop(leases);
    for n in 0..4 {
        let first = {
            let holders = s.holders.lock().unwrap();
            holders.deepest(&prefix_blocks(&ask(n, "Q1")), u64::MAX, 1)
        };
        for q in ["Q2", "Q3"] {
            let to = route(&s, &ask(n, q), &[]).unwrap();
            assert_eq!(
                bit(to),
                first,
                "passage {n} {q} goes where passage {n} went"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_preferred_replica_unless_loaded_over_the_mean() {
    let s = set(3);
    let r = ask(1, "the same opening");
    let want = route(&s, &r, &[]).unwrap();
    for _ in 0..5 {
        assert_eq!(route(&s, &r, &[]), Some(want), "idle: the preferred one");
    }
    let _held = s.lease(want, false);
    let other = route(&s, &r, &[]).unwrap();
    assert_ne!(other, want, "loaded over the mean: the least loaded");
    assert_eq!(route(&s, &r, &[0, 1, 2]), None);
}

#[tokio::test(start_paused = true)]
async fn every_replica_ejected_is_one_error_naming_them() {
    let s = set(2);
    for i in 0..2 {
        for _ in 0..EJECT_AFTER {
            fail(&s, i);
        }
    }
    assert!(s.is_down());
    let e = s.pick(&req("x"), &[]).expect_err("all down");
    assert_eq!(e.kind, ErrorKind::Connect);
    assert!(e.kind.is_systemic());
    assert!(
        e.message.contains("http://host0/v1, http://host1/v1"),
        "{}",
        e.message
    );
    assert!(!e.message.contains("pw") && !e.message.contains("token"));
}
