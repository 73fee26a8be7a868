//! Which of a cluster's workers a statement uses: all of them, until one is found dead after
//! a failed statement; the statement then runs again without it (see `script.rs`).

use std::sync::{Arc, Mutex};

use datafusion::common::{DataFusionError, Result};
use url::Url;

use crate::config::ClusterConfig;

/// The configured workers, in order, and which of them are taken as alive: a worker found
/// dead after a failed statement is passed over when that statement runs again, and every
/// worker is tried again from the next statement.
#[derive(Debug)]
pub(super) struct LiveWorkers {
    urls: Vec<Url>,
    dead: Mutex<Vec<bool>>,
}

impl LiveWorkers {
    /// `cluster`'s workers, all taken as alive.
    pub(super) fn new(cluster: &ClusterConfig) -> Arc<LiveWorkers> {
        Arc::new(LiveWorkers {
            urls: cluster.workers.clone(),
            dead: Mutex::new(vec![false; cluster.workers.len()]),
        })
    }

    /// Takes every worker as alive again (at the start of a statement).
    pub(super) fn revive_all(&self) {
        self.dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fill(false);
    }

    /// Passes over `gone`; returns how many workers are left.
    pub(super) fn pass_over(&self, gone: &[Url]) -> usize {
        let mut dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        for (i, url) in self.urls.iter().enumerate() {
            dead[i] |= gone.contains(url);
        }
        dead.iter().filter(|d| !**d).count()
    }

    /// The worker of each of `tasks` tasks: task i goes to worker i mod n, or, when that one is
    /// passed over, to a live one (spread over them).
    pub(super) fn route(&self, tasks: usize) -> Result<Vec<Url>> {
        let dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        let live: Vec<&Url> = (0..self.urls.len())
            .filter(|&k| !dead[k])
            .map(|k| &self.urls[k])
            .collect();
        if live.is_empty() {
            return Err(DataFusionError::Execution(
                "no worker is left to run the statement".into(),
            ));
        }
        Ok((0..tasks)
            .map(|i| {
                let k = i % self.urls.len();
                if dead[k] {
                    live[i % live.len()].clone()
                } else {
                    self.urls[k].clone()
                }
            })
            .collect())
    }
}
