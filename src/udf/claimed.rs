//! On a cluster, a scan whose input is handed out as the workers free up.
//!
//! datafusion-distributed gives every task of a stage a fixed share of the input (byte ranges
//! of the files), so a stage is as fast as its slowest worker. For a stage that reads files,
//! the coordinator instead cuts the files into chunks when it plans the statement, registers a
//! queue of that many chunks ([`crate::cache::WorkQueues`]), and sends every task the same
//! [`ClaimedScanExec`]: each of its partitions asks the coordinator for the next chunk when it
//! has read the last one, and reads it with the original scan's settings (projection, filters,
//! the table's format). The LLM node above reads ahead only as far as its calls free room, so
//! a worker whose calls finish sooner asks for more chunks: work goes where the capacity is.
//!
//! Chunks are byte ranges of uncompressed JSON-lines and Parquet files (a line, or a row
//! group, belongs to the range it starts in, as DataFusion's own splits do), and whole files
//! otherwise. Each chunk is handed out once; a task that dies holding chunks fails the
//! statement, which runs again with a new queue (see `engine/script.rs`).

use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, JsonSource, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties,
};
use datafusion_distributed::DistributedLeafExec;
use futures::StreamExt;

use crate::cache::{SharedCache, WorkQueues};
use crate::llm::Dispatcher;

/// A worker asks for another chunk once what waits to be sent is at most 1/this of what it has
/// on the wire (its pace, whatever limits it).
const WAITING_SHARE: u64 = 8;
/// Chunks aimed at per partition of every task: enough that the last chunks, read while the
/// others finish, are a small part of the work.
const CHUNKS_PER_PARTITION: u64 = 16;
/// Bounds of a chunk of JSON lines: at least a few long passages, at most a few thousand rows.
const JSON_CHUNK: (u64, u64) = (1 << 10, 1 << 20);
/// Bounds of a chunk of Parquet (a row group is read by the chunk its middle falls in).
const PARQUET_CHUNK: (u64, u64) = (1 << 20, 64 << 20);

/// One chunk: a file (its index among the scan's files) and its byte range (`None`: whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk {
    file: usize,
    range: Option<(i64, i64)>,
}

/// What every partition of a chunked scan reads from: the files, their chunks, the queue.
#[derive(Debug)]
struct Chunks {
    config: FileScanConfig,
    files: Vec<PartitionedFile>,
    chunk_bytes: u64,
    list: Vec<Chunk>,
    queue: String,
}

/// A scan of `template`'s files, a chunk at a time as the coordinator hands them out.
#[derive(Debug)]
pub(crate) struct ClaimedScanExec {
    /// The original scan over every file (the settings each chunk is read with).
    template: Arc<dyn ExecutionPlan>,
    chunks: Arc<Chunks>,
    /// On a worker: the client to the coordinator, and the dispatcher of the run's calls
    /// whose readiness paces the claims (`None` in a stage without LLM calls: claimed as read).
    worker: Option<(Arc<SharedCache>, Option<Dispatcher>)>,
    properties: Arc<PlanProperties>,
}

/// The file scan `plan` is, when it is one whose chunks may be handed out: not partitioned by
/// its files (a hash layout) and with no order to keep.
fn file_scan(plan: &Arc<dyn ExecutionPlan>) -> Option<&FileScanConfig> {
    let dse = plan.downcast_ref::<DataSourceExec>()?;
    let cfg = dse.data_source().downcast_ref::<FileScanConfig>()?;
    (cfg.output_partitioning.is_none() && cfg.output_ordering.is_empty()).then_some(cfg)
}

/// The bounds of a chunk of `cfg`'s files, when they may be cut into byte ranges.
fn range_bounds(cfg: &FileScanConfig) -> Option<(u64, u64)> {
    if cfg.file_compression_type.is_compressed() {
        return None;
    }
    let source = cfg.file_source.as_ref();
    if source.is::<JsonSource>() {
        Some(JSON_CHUNK)
    } else if source.is::<ParquetSource>() {
        Some(PARQUET_CHUNK)
    } else {
        None
    }
}

/// Cuts `files` into chunks of `chunk_bytes` (0: whole files).
fn cut(files: &[PartitionedFile], chunk_bytes: u64) -> Vec<Chunk> {
    let mut out = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let (start, end) = match &f.range {
            Some(r) => (r.start, r.end),
            None => (0, f.object_meta.size as i64),
        };
        if chunk_bytes == 0 || end - start <= chunk_bytes as i64 {
            out.push(Chunk {
                file: i,
                range: f.range.as_ref().map(|r| (r.start, r.end)),
            });
            continue;
        }
        let mut at = start;
        while at < end {
            let to = (at + chunk_bytes as i64).min(end);
            out.push(Chunk {
                file: i,
                range: Some((at, to)),
            });
            at = to;
        }
    }
    out
}

impl ClaimedScanExec {
    /// The scan of `template` (a file scan) in chunks of `chunk_bytes` (0: whole files), from
    /// the coordinator's queue `queue`.
    pub(crate) fn new(
        template: Arc<dyn ExecutionPlan>,
        chunk_bytes: u64,
        queue: String,
    ) -> Result<ClaimedScanExec> {
        let dse = template.downcast_ref::<DataSourceExec>();
        let Some(config) = dse.and_then(|d| d.data_source().downcast_ref::<FileScanConfig>())
        else {
            return Err(DataFusionError::Plan(format!(
                "a chunked scan reads files, not a {} node",
                template.name()
            )));
        };
        let config = config.clone();
        let files: Vec<PartitionedFile> = config
            .file_groups
            .iter()
            .flat_map(|g| g.iter().cloned())
            .collect();
        let list = cut(&files, chunk_bytes);
        let properties = template.properties().clone();
        Ok(ClaimedScanExec {
            template,
            chunks: Arc::new(Chunks {
                config,
                files,
                chunk_bytes,
                list,
                queue,
            }),
            worker: None,
            properties,
        })
    }

    /// The same scan on a worker: it asks `coordinator` for its chunks, each time few of the
    /// calls `dispatcher` has taken on are left waiting to be sent.
    pub(crate) fn on_worker(
        mut self,
        coordinator: Arc<SharedCache>,
        dispatcher: Dispatcher,
    ) -> ClaimedScanExec {
        self.worker = Some((coordinator, Some(dispatcher)));
        self
    }

    /// The same scan claiming its chunks as fast as they are read (a stage without LLM calls:
    /// nothing there to wait for).
    fn ungated(&self) -> ClaimedScanExec {
        let worker = self.worker.as_ref().map(|(c, _)| (c.clone(), None));
        ClaimedScanExec {
            worker,
            ..self.with_partitions(self.properties.partitioning.partition_count())
        }
    }

    /// The same scan with `n` partitions, each asking for chunks of its own.
    fn with_partitions(&self, n: usize) -> ClaimedScanExec {
        let mut properties = self.properties.as_ref().clone();
        properties.partitioning = Partitioning::UnknownPartitioning(n.max(1));
        ClaimedScanExec {
            template: self.template.clone(),
            chunks: self.chunks.clone(),
            worker: self.worker.clone(),
            properties: Arc::new(properties),
        }
    }

    pub(crate) fn template(&self) -> &Arc<dyn ExecutionPlan> {
        &self.template
    }

    pub(crate) fn chunk_bytes(&self) -> u64 {
        self.chunks.chunk_bytes
    }

    /// How many chunks the files are cut into.
    pub(crate) fn chunk_count(&self) -> u64 {
        self.chunks.list.len() as u64
    }

    pub(crate) fn queue(&self) -> &str {
        &self.chunks.queue
    }
}

impl Chunks {
    /// The scan of chunk `n` alone.
    fn scan(&self, n: u64) -> Result<Arc<dyn ExecutionPlan>> {
        let chunk = self.list.get(n as usize).ok_or_else(|| {
            DataFusionError::Execution(format!(
                "the coordinator handed out chunk {n} of a scan cut into {}",
                self.list.len()
            ))
        })?;
        let mut file = self.files[chunk.file].clone();
        if let Some((start, end)) = chunk.range {
            file = file.with_range(start, end);
        }
        let mut config = self.config.clone();
        config.file_groups = vec![FileGroup::new(vec![file])];
        Ok(DataSourceExec::from_data_source(config))
    }
}

/// On the coordinator: `plan` (a leaf of a stage of `tasks` tasks) as a chunked scan every
/// task shares, its queue registered in `work` (served by the coordinator's server, which the
/// workers reach through the run's `RunShare::cache_url`); `None` when `plan` is not a file
/// scan whose chunks may be handed out (datafusion-distributed then splits it).
pub(crate) fn chunked_leaf(
    plan: &Arc<dyn ExecutionPlan>,
    tasks: usize,
    work: &WorkQueues,
) -> Option<Result<Arc<dyn ExecutionPlan>>> {
    let cfg = file_scan(plan)?;
    if tasks < 2 {
        return None;
    }
    let total: u64 = cfg
        .file_groups
        .iter()
        .flat_map(|g| g.iter())
        .map(|f| f.effective_size())
        .sum();
    let partitions = plan.output_partitioning().partition_count().max(1) as u64;
    let chunk_bytes = range_bounds(cfg).map_or(0, |(min, max)| {
        (total / (tasks as u64 * partitions * CHUNKS_PER_PARTITION)).clamp(min, max)
    });
    let queue = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let scan = match ClaimedScanExec::new(plan.clone(), chunk_bytes, queue) {
        Ok(scan) => Arc::new(scan),
        Err(e) => return Some(Err(e)),
    };
    work.register(scan.queue(), scan.chunk_count());
    let variants = (0..tasks).map(|_| scan.clone() as Arc<dyn ExecutionPlan>);
    Some(DistributedLeafExec::try_new(plan.clone(), variants).map(|l| Arc::new(l) as _))
}

/// On a worker: `plan` with every round-robin repartition right above a chunked scan replaced
/// by the scan with that many partitions. A repartition reads its input as fast as it can,
/// whatever its consumers take, so it would claim every chunk at once; each partition of the
/// scan instead asks for a chunk only when the calls above it pull for more rows. Without
/// `calls` (a stage with no LLM call), the scans claim their chunks as fast as they read.
pub(crate) fn pulled_by_calls(
    plan: Arc<dyn ExecutionPlan>,
    calls: bool,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|p| {
        if !calls && let Some(scan) = p.downcast_ref::<ClaimedScanExec>() {
            let scan: Arc<dyn ExecutionPlan> = Arc::new(scan.ungated());
            return Ok(Transformed::yes(scan));
        }
        let Some(r) = p.downcast_ref::<RepartitionExec>() else {
            return Ok(Transformed::no(p));
        };
        let Partitioning::RoundRobinBatch(n) = r.partitioning() else {
            return Ok(Transformed::no(p));
        };
        let Some(scan) = r.input().downcast_ref::<ClaimedScanExec>() else {
            return Ok(Transformed::no(p));
        };
        let scan: Arc<dyn ExecutionPlan> = Arc::new(scan.with_partitions(*n));
        Ok(Transformed::yes(scan))
    })
    .map(|t| t.data)
}

impl DisplayAs for ClaimedScanExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let size = match self.chunks.chunk_bytes {
            0 => "whole files".to_string(),
            n => format!("up to {n} bytes each"),
        };
        write!(
            f,
            "ClaimedScanExec: {} chunks ({size}) handed out as tasks free up, of ",
            self.chunks.list.len()
        )?;
        self.template.fmt_as(t, f)
    }
}

impl ExecutionPlan for ClaimedScanExec {
    fn name(&self) -> &str {
        "ClaimedScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.template.apply_expressions(f)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "a chunked scan has no children".into(),
            ))
        }
    }

    fn execute(
        &self,
        _partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let Some((coordinator, dispatcher)) = self.worker.clone() else {
            return Err(DataFusionError::Execution(
                "a chunked scan runs on a worker, which asks the coordinator for its chunks".into(),
            ));
        };
        let chunks = self.chunks.clone();
        // The chunk being read, and whether one was claimed (the first is claimed at once).
        type State = (Option<SendableRecordBatchStream>, bool);
        let state: State = (None, false);
        let stream = futures::stream::try_unfold(state, move |(mut current, mut claimed)| {
            let (chunks, coordinator, dispatcher, context) = (
                chunks.clone(),
                coordinator.clone(),
                dispatcher.clone(),
                context.clone(),
            );
            async move {
                loop {
                    if let Some(s) = current.as_mut() {
                        match s.next().await {
                            Some(Ok(batch)) => return Ok(Some((batch, (current, claimed)))),
                            Some(Err(e)) => return Err(e),
                            None => {}
                        }
                    }
                    // More input only when this worker's calls are about to run out and the
                    // last chunk reached them, so that the input goes to the workers that free
                    // up first.
                    if let (true, Some(d)) = (claimed, &dispatcher) {
                        d.until_ready_for_input(WAITING_SHARE).await;
                    }
                    claimed = true;
                    let next = coordinator
                        .next_chunk(&chunks.queue)
                        .await
                        .map_err(DataFusionError::Execution)?;
                    let Some(n) = next else {
                        return Ok(None);
                    };
                    current = Some(chunks.scan(n)?.execute(0, context.clone())?);
                }
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.properties.eq_properties.schema().clone(),
            stream,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> PartitionedFile {
        PartitionedFile::new("data/t.jsonl".to_string(), size)
    }

    /// The file scan of a three-line JSON table.
    async fn json_scan(dir: &std::path::Path) -> Arc<dyn ExecutionPlan> {
        let path = dir.join("t.jsonl");
        std::fs::write(&path, "{\"p\": 1}\n{\"p\": 2}\n{\"p\": 3}\n").unwrap();
        let ctx = datafusion::prelude::SessionContext::new();
        let create = format!(
            "CREATE EXTERNAL TABLE t STORED AS JSON LOCATION '{}'",
            path.display()
        );
        ctx.sql(&create).await.unwrap();
        let plan = ctx
            .sql("SELECT p FROM t")
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let mut leaf = plan;
        while let Some(child) = leaf.children().first().map(|c| (*c).clone()) {
            leaf = child;
        }
        assert!(file_scan(&leaf).is_some(), "{}", leaf.name());
        leaf
    }

    #[tokio::test]
    async fn a_repartition_above_a_chunked_scan_becomes_its_partitions_gated_by_the_calls() {
        let dir = tempfile::tempdir().unwrap();
        let url = "http://127.0.0.1:9";
        let scan = ClaimedScanExec::new(json_scan(dir.path()).await, 0, "q".into())
            .unwrap()
            .on_worker(
                Arc::new(SharedCache::new(url, None, None)),
                Dispatcher::new(crate::config::DispatcherConfig::default()),
            );
        assert_eq!(scan.chunk_count(), 1, "one small file, whole");
        let repartitioned: Arc<dyn ExecutionPlan> = Arc::new(
            RepartitionExec::try_new(Arc::new(scan), Partitioning::RoundRobinBatch(3)).unwrap(),
        );
        let gated = |p: &Arc<dyn ExecutionPlan>| {
            let s = p
                .downcast_ref::<ClaimedScanExec>()
                .expect("the scan itself");
            assert_eq!(s.properties().partitioning.partition_count(), 3);
            s.worker.as_ref().is_some_and(|(_, d)| d.is_some())
        };
        let with_calls = pulled_by_calls(repartitioned.clone(), true).unwrap();
        assert!(gated(&with_calls), "a stage with LLM calls waits for them");
        let without = pulled_by_calls(repartitioned, false).unwrap();
        assert!(!gated(&without), "a stage without calls claims as it reads");
    }

    #[test]
    fn files_are_cut_into_ranges_that_cover_them_once() {
        let files = [file(25), file(10), file(7).with_range(2, 7)];
        let chunks = cut(&files, 10);
        let ranges: Vec<(usize, Option<(i64, i64)>)> =
            chunks.iter().map(|c| (c.file, c.range)).collect();
        assert_eq!(
            ranges,
            [
                (0, Some((0, 10))),
                (0, Some((10, 20))),
                (0, Some((20, 25))),
                (1, None),
                (2, Some((2, 7))),
            ]
        );
        // Whole files: one chunk each, a range kept as it was.
        let whole: Vec<Option<(i64, i64)>> = cut(&files, 0).iter().map(|c| c.range).collect();
        assert_eq!(whole, [None, None, Some((2, 7))]);
    }
}
