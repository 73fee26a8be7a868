//! Work handed out as workers free up: the coordinator's queues of input chunks.
//!
//! On a cluster, a scan that feeds LLM calls is not split into one fixed byte range per task.
//! The coordinator cuts its files into chunks when it plans the statement and registers a queue
//! of that many chunks here; every task of the stage then asks for the next chunk each time it
//! has read the last one (`POST /v1/next`), so a worker whose calls finish sooner reads more of
//! the input. A chunk is handed out once: a task that dies with chunks it was given fails the
//! statement, which runs again with a new queue.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Queues kept at once; the oldest is forgotten first (a statement's queue is used only while
/// it runs).
const KEPT: usize = 1024;

/// One queue: how many chunks it has, and how many were handed out.
#[derive(Debug)]
struct Queue {
    id: String,
    chunks: u64,
    handed: u64,
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
        });
    }

    /// The next chunk of queue `id`.
    pub fn next(&self, id: &str) -> Next {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let Some(q) = queues.iter_mut().find(|q| q.id == id) else {
            return Next::Unknown;
        };
        if q.handed >= q.chunks {
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

    #[test]
    fn every_chunk_is_handed_out_once_then_done() {
        let w = WorkQueues::default();
        w.register("a", 3);
        w.register("b", 1);
        assert_eq!(w.next("a"), Next::Chunk(0));
        assert_eq!(w.next("b"), Next::Chunk(0));
        assert_eq!(w.next("a"), Next::Chunk(1));
        assert_eq!(w.next("a"), Next::Chunk(2));
        assert_eq!(w.next("a"), Next::Done);
        assert_eq!(w.next("b"), Next::Done);
        assert_eq!(w.next("c"), Next::Unknown);
        assert_eq!(w.handed("a"), Some(3));
        // An empty queue is done at once.
        w.register("e", 0);
        assert_eq!(w.next("e"), Next::Done);
    }

    #[test]
    fn the_oldest_queue_is_forgotten_first() {
        let w = WorkQueues::default();
        for i in 0..=KEPT {
            w.register(&format!("q{i}"), 1);
        }
        assert_eq!(w.next("q0"), Next::Unknown);
        assert_eq!(w.next(&format!("q{KEPT}")), Next::Chunk(0));
    }
}
