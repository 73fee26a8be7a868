//! Waiting to the deadline a test server was told to answer by.
//!
//! Tokio's timer counts whole milliseconds and rounds a deadline up to the next one, and its
//! driver parks with a millisecond timeout that rounds up again: a 20 ms `tokio::time::sleep`
//! ends 21–22 ms later, which made a server "answering in 20 ms" answer in 22 on average and
//! bounded every latency-bound benchmark about 10% under its nominal limit. Here one thread
//! keeps the deadlines and wakes each waiter when its deadline passes, to within the
//! kernel's timer slack (tens of microseconds).
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::OnceLock;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::Instant;

use tokio::sync::oneshot;

/// A waiter: its deadline, the order it came in (to break ties), and whom to wake.
struct Waiter(Instant, u64, oneshot::Sender<()>);

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        (self.0, self.1) == (other.0, other.1)
    }
}

impl Eq for Waiter {}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(other.0, other.1))
    }
}

fn timer() -> &'static Sender<(Instant, oneshot::Sender<()>)> {
    static TIMER: OnceLock<Sender<(Instant, oneshot::Sender<()>)>> = OnceLock::new();
    TIMER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(Instant, oneshot::Sender<()>)>();
        std::thread::Builder::new()
            .name("mock-clock".into())
            .spawn(move || {
                let mut due: BinaryHeap<Reverse<Waiter>> = BinaryHeap::new();
                let mut seq = 0u64;
                loop {
                    let now = Instant::now();
                    while due.peek().is_some_and(|Reverse(w)| w.0 <= now) {
                        if let Some(Reverse(Waiter(_, _, wake))) = due.pop() {
                            // A waiter that was dropped (its connection closed) needs no wake.
                            let _ = wake.send(());
                        }
                    }
                    let next = match due.peek() {
                        Some(Reverse(w)) => rx.recv_timeout(w.0.saturating_duration_since(now)),
                        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    };
                    match next {
                        Ok((at, wake)) => {
                            seq += 1;
                            due.push(Reverse(Waiter(at, seq, wake)));
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .expect("the mock clock's thread starts");
        tx
    })
}

/// Waits until `deadline`, to within tens of microseconds.
pub(crate) async fn sleep_until(deadline: Instant) {
    let (wake, woken) = oneshot::channel();
    if deadline <= Instant::now() || timer().send((deadline, wake)).is_err() {
        return;
    }
    let _ = woken.await;
}
