//! The sliding window of one partition: there is no barrier between record batches. Input
//! record batches are cut into slices, each slice's rows are submitted as soon as it is read, and the stream keeps reading
//! ahead while earlier slices still have rows in flight (slow responses, retries in backoff),
//! so the global budget stays full. Output order within a partition is the input order.
//!
//! Dropping the stream (a LIMIT satisfied, an error elsewhere, Ctrl-C) drops every slice's task,
//! and with it every call still running: nothing they held outlives the statement.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::runtime::SpawnedTask;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream};
use futures::{FutureExt, Stream, StreamExt};

use super::slice::{SliceContext, process_slice};

struct Slot {
    rows: usize,
    /// (row, call) pairs of this slice that have their result.
    finished_calls: Arc<AtomicUsize>,
    task: Option<SpawnedTask<Result<RecordBatch>>>,
    done: Option<Result<RecordBatch>>,
}

/// The output stream of one partition of an [`LlmExec`](super::exec::LlmExec).
pub(super) struct LlmStream {
    input: Option<SendableRecordBatchStream>,
    pending: VecDeque<Slot>,
    slice_rows: usize,
    unfinished_limit: usize,
    buffered_limit: usize,
    /// Rest of an input batch not yet submitted.
    leftover: Option<RecordBatch>,
    /// Submit only whole slices while input remains (a packed function: a short slice would
    /// make a short request).
    whole_slices: bool,
    ctx: Arc<SliceContext>,
}

impl Drop for LlmStream {
    fn drop(&mut self) {
        self.close_input();
    }
}

impl LlmStream {
    /// The input is exhausted (or abandoned): the functions' row totals are final for it.
    fn close_input(&mut self) {
        if self.input.take().is_some() {
            for c in &self.ctx.callers {
                c[0].caller
                    .metrics()
                    .open_inputs
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Rows whose calls are still running. A slice waiting on a few slow rows (a retry in
    /// backoff) counts only those rows, so later slices keep the budget full meanwhile.
    fn unfinished_rows(&self) -> usize {
        let calls = self.ctx.calls.len().max(1);
        self.pending
            .iter()
            .filter(|s| s.done.is_none())
            .map(|s| {
                let open =
                    s.rows * calls - s.finished_calls.load(Ordering::Relaxed).min(s.rows * calls);
                open.div_ceil(calls)
            })
            .sum()
    }

    fn submit(&mut self, batch: RecordBatch) {
        let ctx = self.ctx.clone();
        let rows = batch.num_rows();
        for c in &self.ctx.callers {
            c[0].caller
                .metrics()
                .rows_queued
                .fetch_add(rows as u64, Ordering::Relaxed);
        }
        let finished_calls = Arc::new(AtomicUsize::new(0));
        let progress = finished_calls.clone();
        let task = SpawnedTask::spawn(async move { process_slice(&ctx, batch, &progress).await });
        self.pending.push_back(Slot {
            rows,
            finished_calls,
            task: Some(task),
            done: None,
        });
    }

    fn poll_tasks(&mut self, cx: &mut Context<'_>) {
        for slot in self.pending.iter_mut() {
            if let Some(task) = slot.task.as_mut()
                && let Poll::Ready(res) = task.poll_unpin(cx)
            {
                slot.done = Some(match res {
                    Ok(r) => r,
                    Err(join) => Err(DataFusionError::External(Box::new(join))),
                });
                slot.task = None;
            }
        }
    }
}

impl Stream for LlmStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            this.poll_tasks(cx);
            // A slice failed the statement: submit nothing more, and let the requests already
            // on the wire finish (their responses reach the cache) before reporting it.
            if let Some(i) = this
                .pending
                .iter()
                .position(|s| matches!(s.done, Some(Err(_))))
            {
                if this.pending.iter().any(|s| s.task.is_some()) {
                    return Poll::Pending;
                }
                let slot = this.pending.remove(i).expect("failed slot");
                this.pending.clear();
                this.close_input();
                this.leftover = None;
                return Poll::Ready(slot.done);
            }
            // Emit the front slot as soon as it is complete.
            if this.pending.front().is_some_and(|s| s.done.is_some()) {
                let slot = this.pending.pop_front().expect("front exists");
                return Poll::Ready(slot.done);
            }
            // Read ahead while the budget has room.
            let room = this.unfinished_rows() < this.unfinished_limit
                && this.pending.len() < this.buffered_limit;
            if !room {
                return Poll::Pending;
            }
            if let Some(batch) = this.leftover.take() {
                if this.whole_slices && batch.num_rows() < this.slice_rows {
                    match this.fill(batch, cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                let n = this.slice_rows.min(batch.num_rows());
                if n < batch.num_rows() {
                    this.leftover = Some(batch.slice(n, batch.num_rows() - n));
                }
                this.submit(batch.slice(0, n));
                continue;
            }
            let Some(input) = this.input.as_mut() else {
                return if this.pending.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                };
            };
            match input.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(batch))) => {
                    if batch.num_rows() > 0 {
                        this.leftover = Some(batch);
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.close_input(),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl LlmStream {
    /// Tops up a short `rest` with the next input batch; at the end of the input it goes as
    /// it is. Pending (holding `rest`) while the input is.
    fn fill(&mut self, rest: RecordBatch, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let Some(input) = self.input.as_mut() else {
            self.whole_slices = false;
            self.leftover = Some(rest);
            return Poll::Ready(Ok(()));
        };
        match input.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(next))) => {
                let both =
                    datafusion::arrow::compute::concat_batches(&rest.schema(), [&rest, &next])?;
                self.leftover = Some(both);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(e)),
            Poll::Ready(None) => {
                self.close_input();
                self.leftover = Some(rest);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                self.leftover = Some(rest);
                Poll::Pending
            }
        }
    }
}

impl RecordBatchStream for LlmStream {
    fn schema(&self) -> SchemaRef {
        self.ctx.schema.clone()
    }
}

impl LlmStream {
    /// A stream over `input` whose slices have `slice_rows` rows, reading ahead while fewer
    /// than `unfinished_limit` rows have calls running.
    pub(super) fn new(
        input: SendableRecordBatchStream,
        ctx: SliceContext,
        slice_rows: usize,
        unfinished_limit: usize,
        whole_slices: bool,
    ) -> Self {
        for c in &ctx.callers {
            c[0].caller
                .metrics()
                .open_inputs
                .fetch_add(1, Ordering::Relaxed);
        }
        LlmStream {
            input: Some(input),
            pending: VecDeque::new(),
            slice_rows,
            unfinished_limit,
            // Enough slices for every unfinished row, and at least 64.
            buffered_limit: unfinished_limit.div_ceil(slice_rows.max(1)).max(64) + 1,
            leftover: None,
            whole_slices,
            ctx: Arc::new(ctx),
        }
    }
}
