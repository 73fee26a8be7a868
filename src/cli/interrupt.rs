//! Ctrl-C and SIGTERM as a clean stop: the first stops sending and lets the requests on the
//! wire finish for [`GRACE`] (their answers are cached), the second exits at once.

use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::engine::Engine;

/// How long the requests on the wire may take to finish after the first Ctrl-C.
pub(crate) const GRACE: Duration = Duration::from_secs(5);

/// Exit code after an interrupt (128 + SIGINT, as shells report it).
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

/// The process's SIGINT and SIGTERM, listened to from the start of a run (so that the default
/// action, killing the process with no word, never applies).
pub(crate) struct Interrupts {
    int: Option<Signal>,
    term: Option<Signal>,
}

impl Interrupts {
    /// Starts listening.
    pub(crate) fn listen() -> Interrupts {
        Interrupts {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    /// The next SIGINT or SIGTERM.
    pub(crate) async fn next(&mut self) {
        async fn recv(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.int) => {}
            _ = recv(&mut self.term) => {}
        }
    }
}

/// `work` to its end, or `None` once interrupted: then nothing more is sent, the requests on
/// the wire get [`GRACE`] to finish while `work` goes on, and `work` is dropped (which removes
/// any staged output). A second signal exits the process at once.
pub(crate) async fn run_until_interrupted<T>(
    engine: &Engine,
    interrupts: &mut Interrupts,
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::pin!(work);
    tokio::select! {
        done = &mut work => return Some(done),
        _ = interrupts.next() => {}
    }
    engine.stop_sending();
    eprintln!(
        "\ninterrupted: sending nothing more; waiting up to {}s for {} request(s) on the wire \
         (Ctrl-C again to exit at once)",
        GRACE.as_secs(),
        engine.requests_in_flight()
    );
    let drained = async {
        while engine.requests_in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        done = &mut work => return Some(done),
        _ = tokio::time::timeout(GRACE, drained) => {}
        _ = interrupts.next() => {
            eprintln!("interrupted again: exiting at once");
            std::process::exit(i32::from(EXIT_INTERRUPTED));
        }
    }
    None
}
