//! Work handed out as workers free up: the coordinator's queues of input chunks.
//!
//! On a cluster, a scan that feeds LLM calls is not split into one fixed byte range per task.
//! The coordinator cuts its files into chunks when it plans the statement and registers a queue
//! of that many chunks here; every task of the stage then asks for the next chunk each time it
//! has read the last one (`POST /v1/next`), so a worker whose calls finish sooner reads more of
//! the input. A chunk is handed out once: a task that dies with chunks it was given fails the
//! statement, which runs again with a new queue.
//!
//! **The last chunks go to the workers that finish them first.** Each worker (its tasks share
//! one claimer id) claims at its own pace; the queue keeps the mean interval between its claims
//! since its first. In the last eighth of the chunks, a worker is told "done" while chunks are
//! left when the workers faster than it would take every chunk left within two of its own
//! intervals (`AHEAD`): a chunk it took then would end the statement later than leaving it to
//! them. The fastest worker is never told so, so every chunk is still handed out.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Queues kept at once; the oldest is forgotten first (a statement's queue is used only while
/// it runs).
const KEPT: usize = 1024;

/// How much shorter a worker's interval must be than another's to count as faster (claims of
/// same-speed workers vary by more than their speeds do).
const FASTER: f64 = 1.25;

/// How many of its intervals a chunk a worker takes now adds to its end: it asks while the
/// calls of its last chunk are still on the wire, and the new one's take an interval more.
const AHEAD: f64 = 2.0;

/// Claims a worker makes before its interval counts (its tasks' first claims come at once).
const MEASURED_AFTER: u64 = 4;

/// The share of a queue's chunks left below which a worker may be told "done" early (with
/// intervals measured over the rest, a bound that only a mismeasured interval could reach).
const ENDGAME_SHARE: u64 = 8;

/// A worker taking chunks from a queue.
#[derive(Debug)]
struct Claimer {
    id: u64,
    first: Instant,
    last: Instant,
    claims: u64,
    /// Told "done": it asks no more.
    done: bool,
}

impl Claimer {
    /// The mean interval between its claims, in seconds, once it has made enough of them.
    fn interval(&self) -> Option<f64> {
        if self.claims < MEASURED_AFTER {
            return None;
        }
        let span = self
            .last
            .saturating_duration_since(self.first)
            .as_secs_f64();
        Some(span / (self.claims - 1) as f64).filter(|i| *i > 0.0)
    }
}

/// One queue: how many chunks it has, how many were handed out, and to whom.
#[derive(Debug)]
struct Queue {
    id: String,
    chunks: u64,
    handed: u64,
    claimers: Vec<Claimer>,
}

impl Queue {
    /// Records a claim of `claimer` at `now`; returns its index.
    fn claim(&mut self, claimer: u64, now: Instant) -> usize {
        match self.claimers.iter().position(|c| c.id == claimer) {
            Some(i) => {
                let c = &mut self.claimers[i];
                c.claims += 1;
                c.last = now;
                i
            }
            None => {
                self.claimers.push(Claimer {
                    id: claimer,
                    first: now,
                    last: now,
                    claims: 1,
                    done: false,
                });
                self.claimers.len() - 1
            }
        }
    }

    /// Whether the chunks left are better left to the workers faster than claimer `i`: they
    /// take them all within `AHEAD` of its intervals.
    fn better_left_to_others(&self, i: usize) -> bool {
        let left = self.chunks.saturating_sub(self.handed);
        if left * ENDGAME_SHARE > self.chunks {
            return false;
        }
        let Some(mine) = self.claimers[i].interval() else {
            return false;
        };
        // Chunks a second that the faster workers take.
        let faster: f64 = self
            .claimers
            .iter()
            .enumerate()
            .filter(|(j, c)| *j != i && !c.done)
            .filter_map(|(_, c)| c.interval())
            .filter(|d| d * FASTER < mine)
            .map(|d| 1.0 / d)
            .sum();
        faster > 0.0 && left as f64 / faster <= AHEAD * mine
    }
}

/// What a task is told when it asks for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Read this chunk.
    Chunk(u64),
    /// Every chunk is handed out: the task's scan ends.
    Done,
    /// The queue is not known here (the coordinator restarted, or forgot it).
    Unknown,
}

/// The coordinator's work queues, by id.
#[derive(Debug, Default)]
pub struct WorkQueues {
    queues: Mutex<VecDeque<Queue>>,
}

impl WorkQueues {
    /// Registers queue `id` of `chunks` chunks (again: starts it over).
    pub fn register(&self, id: &str, chunks: u64) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.retain(|q| q.id != id);
        if queues.len() >= KEPT {
            queues.pop_front();
        }
        queues.push_back(Queue {
            id: id.to_string(),
            chunks,
            handed: 0,
            claimers: Vec::new(),
        });
    }

    /// The next chunk of queue `id` for the worker `claimer` (the id its tasks share).
    pub fn next(&self, id: &str, claimer: u64) -> Next {
        self.next_at(id, claimer, Instant::now())
    }

    fn next_at(&self, id: &str, claimer: u64, now: Instant) -> Next {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let Some(q) = queues.iter_mut().find(|q| q.id == id) else {
            return Next::Unknown;
        };
        let i = q.claim(claimer, now);
        if q.handed >= q.chunks || q.better_left_to_others(i) {
            q.claimers[i].done = true;
            return Next::Done;
        }
        q.handed += 1;
        Next::Chunk(q.handed - 1)
    }

    /// Chunks of queue `id` handed out so far (`None`: not known).
    pub fn handed(&self, id: &str) -> Option<u64> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.iter().find(|q| q.id == id).map(|q| q.handed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_chunk_is_handed_out_once_then_done() {
        let w = WorkQueues::default();
        w.register("a", 3);
        w.register("b", 1);
        assert_eq!(w.next("a", 1), Next::Chunk(0));
        assert_eq!(w.next("b", 1), Next::Chunk(0));
        assert_eq!(w.next("a", 2), Next::Chunk(1));
        assert_eq!(w.next("a", 1), Next::Chunk(2));
        assert_eq!(w.next("a", 2), Next::Done);
        assert_eq!(w.next("b", 1), Next::Done);
        assert_eq!(w.next("c", 1), Next::Unknown);
        assert_eq!(w.handed("a"), Some(3));
        // An empty queue is done at once.
        w.register("e", 0);
        assert_eq!(w.next("e", 1), Next::Done);
    }

    /// Claims of workers `fast` (every 100 ms) and `slow` (every 300 ms) from `at` until the
    /// queue tells each one "done"; returns the chunks each took.
    fn race(w: &WorkQueues, id: &str, at: Instant) -> (u64, u64, Vec<(u64, u64)>) {
        let (mut fast, mut slow) = (0, 0);
        let mut told = Vec::new();
        let (mut fast_on, mut slow_on) = (true, true);
        for tick in 0..1000u64 {
            let now = at + Duration::from_millis(100 * tick);
            if fast_on {
                match w.next_at(id, 1, now) {
                    Next::Chunk(_) => fast += 1,
                    _ => fast_on = false,
                }
            }
            if slow_on && tick % 3 == 0 {
                match w.next_at(id, 2, now) {
                    Next::Chunk(_) => slow += 1,
                    _ => {
                        slow_on = false;
                        told.push((tick, w.handed(id).unwrap()));
                    }
                }
            }
            if !fast_on && !slow_on {
                break;
            }
        }
        (fast, slow, told)
    }

    #[test]
    fn the_last_chunks_go_to_the_faster_worker_and_every_chunk_is_handed_out() {
        let w = WorkQueues::default();
        w.register("q", 60);
        let (fast, slow, told) = race(&w, "q", Instant::now());
        assert_eq!(fast + slow, 60, "every chunk handed out");
        // The slow worker stops when the fast one takes the rest within two of its 300 ms (6
        // chunks left or fewer; its claims fall at 7 left, then at 3).
        let (_, handed_then) = told[0];
        assert!((57..=59).contains(&handed_then), "{told:?}");
        assert!(slow < 15, "{slow} of 60: a quarter would be 15");
        // A worker alone is never told "done" before the end.
        w.register("alone", 5);
        let at = Instant::now();
        let got: Vec<Next> = (0..6)
            .map(|i| w.next_at("alone", 7, at + Duration::from_secs(i)))
            .collect();
        assert_eq!(got[4], Next::Chunk(4));
        assert_eq!(got[5], Next::Done);
    }

    #[test]
    fn workers_of_one_speed_take_chunks_to_the_end() {
        let w = WorkQueues::default();
        w.register("q", 40);
        let at = Instant::now();
        let mut handed = 0;
        for tick in 0..20u64 {
            for claimer in [1, 2] {
                let now = at + Duration::from_millis(100 * tick + 10 * claimer);
                if let Next::Chunk(_) = w.next_at("q", claimer, now) {
                    handed += 1;
                }
            }
        }
        assert_eq!(handed, 40, "neither was told done early");
    }

    #[test]
    fn the_oldest_queue_is_forgotten_first() {
        let w = WorkQueues::default();
        for i in 0..=KEPT {
            w.register(&format!("q{i}"), 1);
        }
        assert_eq!(w.next("q0", 1), Next::Unknown);
        assert_eq!(w.next(&format!("q{KEPT}"), 1), Next::Chunk(0));
    }
}
