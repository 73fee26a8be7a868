//! The wire form of an [`LlmExec`], for a plan stage that runs on a `sluice worker`
//! (datafusion-distributed ships stages between processes as protobuf; a
//! `PhysicalExtensionCodec` carries the nodes DataFusion does not know).
//!
//! An encoded node carries, per call: the function's name and its definition (templates,
//! output schema, `on_error`, generation settings), the model's name and its settings without
//! secrets ([`crate::config::ModelConfig::fingerprint`]), and the argument expressions; plus
//! the node's output schema, its join gate and the coordinator's [`RunShare`]. It never carries
//! an API key: a worker calls its models with the keys of its own environment.
//!
//! A worker rebuilds the node with its own definitions and models, and refuses a task whose
//! function or model differs from the coordinator's (compared by hash), naming which.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::physical_plan::{
    PhysicalExtensionCodec, PhysicalPlanDecodeContext, PhysicalProtoConverterExtension,
};
use datafusion_proto::protobuf::PhysicalExprNode;
use prost::Message;
use sha2::{Digest, Sha256};

use super::call::{LlmRuntime, PhysicalCall};
use super::claimed::ClaimedScanExec;
use super::def::FunctionDef;
use super::exec::LlmExec;
use crate::config::Config;

/// What a coordinator tells every worker about the run a task belongs to: the run (so the
/// tasks of one run share one dispatcher on a worker), how many workers share the model
/// limits, and the run's budgets (each worker gets its share).
#[derive(Clone, PartialEq, Eq, Hash, Message)]
pub struct RunShare {
    /// The coordinator's run, unique per `sluice run`.
    #[prost(string, tag = "1")]
    pub run: String,
    /// Workers the run spreads over: each gets `1 / workers` of every limit and budget.
    #[prost(uint32, tag = "2")]
    pub workers: u32,
    /// `--budget-tokens` of the whole run.
    #[prost(uint64, optional, tag = "3")]
    pub budget_tokens: Option<u64>,
    /// `--budget-usd` of the whole run, in micro-dollars.
    #[prost(uint64, optional, tag = "4")]
    pub budget_micro_usd: Option<u64>,
    /// The coordinator's shared cache tier (`http://host:port`), when it serves one.
    #[prost(string, optional, tag = "5")]
    pub cache_url: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct CallProto {
    #[prost(string, tag = "1")]
    function: String,
    #[prost(string, tag = "2")]
    definition: String,
    #[prost(string, tag = "3")]
    model: String,
    #[prost(string, tag = "4")]
    model_settings: String,
    #[prost(bool, tag = "5")]
    embedding: bool,
    #[prost(message, repeated, tag = "6")]
    args: Vec<PhysicalExprNode>,
}

#[derive(Clone, PartialEq, Message)]
struct LlmExecProto {
    #[prost(message, repeated, tag = "1")]
    calls: Vec<CallProto>,
    #[prost(message, optional, tag = "2")]
    schema: Option<datafusion_proto::protobuf::Schema>,
    #[prost(uint64, optional, tag = "3")]
    gate: Option<u64>,
    #[prost(message, optional, tag = "4")]
    run: Option<RunShare>,
}

/// A chunked file scan ([`ClaimedScanExec`]): the original scan, how it is cut, and where its
/// chunks are handed out.
#[derive(Clone, PartialEq, Message)]
struct ClaimedScanProto {
    #[prost(message, optional, tag = "1")]
    template: Option<datafusion_proto::protobuf::PhysicalPlanNode>,
    #[prost(uint64, tag = "2")]
    chunk_bytes: u64,
    #[prost(string, tag = "3")]
    queue: String,
    #[prost(uint64, tag = "5")]
    chunks: u64,
    #[prost(message, optional, tag = "6")]
    run: Option<RunShare>,
}

/// The first byte of an encoded node: which node it is.
const LLM_EXEC: u8 = 1;
const CLAIMED_SCAN: u8 = 2;

/// A function's definition as one line: everything that decides its prompts, its output and
/// its failures (not its description or file path).
pub(crate) fn definition_text(def: &FunctionDef) -> String {
    format!(
        "name={} args={:?} model={} cascade={:?} kind={} max_tokens={:?} temperature={:?} \
         on_error={:?} output={} reduce={:?} packing={} templates: {}",
        def.name,
        def.args,
        def.model,
        def.cascade
            .iter()
            .map(|s| (s.model.as_str(), s.min_confidence))
            .collect::<Vec<_>>(),
        def.kind.name(),
        def.max_tokens,
        def.temperature,
        def.on_error,
        def.output
            .as_ref()
            .map_or_else(|| "text".to_string(), |o| o.json.to_string()),
        def.kind.reduce(),
        def.kind
            .packing()
            .map_or_else(|| "none".to_string(), |p| p.identity()),
        def.template_sources()
    )
}

/// The first 16 hex digits of the SHA-256 of `text`.
pub(crate) fn short_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// What a worker offers the codec: its definitions and models, and a runtime per run.
pub(crate) trait WorkerSide: Send + Sync + fmt::Debug {
    /// How this worker names itself in errors (`worker 127.0.0.1:50051`).
    fn name(&self) -> &str;
    /// Its definition of `function`.
    fn function(&self, function: &str) -> Option<Arc<FunctionDef>>;
    /// Its settings of `model` ([`crate::config::ModelConfig::fingerprint`]), or why it cannot
    /// run it (not defined, model file missing).
    fn model(&self, model: &str) -> Result<String, String>;
    /// The dispatcher and models the tasks of `run` share on this worker, with the run's share
    /// of every limit.
    fn runtime(&self, run: &RunShare) -> Result<Arc<LlmRuntime>, String>;
    /// The client to the coordinator's server of `run` (for the chunks of a scan).
    fn coordinator(&self, run: &RunShare) -> Result<Arc<crate::cache::SharedCache>, String>;
}

/// Which end of the wire a codec serves.
#[derive(Debug, Clone)]
enum Side {
    /// Encodes nodes: the run's share, and the settings of each model by name.
    Coordinator {
        share: RunShare,
        models: Arc<BTreeMap<String, String>>,
    },
    /// Decodes them.
    Worker(Arc<dyn WorkerSide>),
}

/// The codec of [`LlmExec`] (registered on both ends).
#[derive(Debug, Clone)]
pub(crate) struct LlmCodec {
    side: Side,
}

impl LlmCodec {
    /// The coordinator's codec, carrying the settings of each model of `config`.
    pub(crate) fn coordinator(share: RunShare, config: &Config) -> LlmCodec {
        let models = config
            .models
            .iter()
            .map(|(name, m)| (name.clone(), m.fingerprint()))
            .collect();
        LlmCodec {
            side: Side::Coordinator {
                share,
                models: Arc::new(models),
            },
        }
    }

    /// A worker's codec.
    pub(crate) fn worker(side: Arc<dyn WorkerSide>) -> LlmCodec {
        LlmCodec {
            side: Side::Worker(side),
        }
    }
}

fn codec_err(message: impl Into<String>) -> DataFusionError {
    DataFusionError::Plan(message.into())
}

impl LlmCodec {
    fn encode_exec(
        &self,
        exec: &LlmExec,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<LlmExecProto> {
        let Side::Coordinator { share, models } = &self.side else {
            return Err(codec_err("a sluice worker does not send LLM stages on"));
        };
        let mut calls = Vec::with_capacity(exec.calls().len());
        for c in exec.calls() {
            let settings = models
                .get(&c.model_name)
                .cloned()
                .ok_or_else(|| codec_err(format!("model {:?} is not configured", c.model_name)))?;
            let args = c
                .args
                .iter()
                .map(|a| converter.physical_expr_to_proto(a, self))
                .collect::<Result<Vec<_>>>()?;
            calls.push(CallProto {
                function: c.def.name.clone(),
                definition: definition_text(&c.def),
                model: c.model_name.clone(),
                model_settings: settings,
                embedding: c.embedding,
                args,
            });
        }
        let schema = datafusion_proto::protobuf::Schema::try_from(exec.schema().as_ref())
            .map_err(|e| codec_err(format!("cannot encode an LLM node's schema: {e}")))?;
        Ok(LlmExecProto {
            calls,
            schema: Some(schema),
            gate: exec.gate(),
            run: Some(share.clone()),
        })
    }

    fn decode_exec(
        &self,
        node: LlmExecProto,
        input: Arc<dyn ExecutionPlan>,
        ctx: &TaskContext,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let Side::Worker(worker) = &self.side else {
            return Err(codec_err("only a sluice worker runs LLM stages it is sent"));
        };
        let who = worker.name();
        let run = node
            .run
            .ok_or_else(|| codec_err(format!("{who}: an LLM stage came without its run")))?;
        let schema: SchemaRef = match &node.schema {
            Some(s) => Arc::new(Schema::try_from(s).map_err(|e| {
                codec_err(format!("{who}: cannot decode an LLM node's schema: {e}"))
            })?),
            None => {
                return Err(codec_err(format!(
                    "{who}: an LLM node came without its schema"
                )));
            }
        };
        let runtime = worker.runtime(&run).map_err(codec_err)?;
        let decode_ctx = PhysicalPlanDecodeContext::new(ctx, self);
        let input_schema = input.schema();
        let mut calls = Vec::with_capacity(node.calls.len());
        for c in node.calls {
            let def = checked_function(worker.as_ref(), &c)?;
            let settings = worker
                .model(&c.model)
                .map_err(|e| codec_err(format!("{who}: model {:?}: {e}", c.model)))?;
            if settings != c.model_settings {
                return Err(codec_err(format!(
                    "{who}: model {:?} differs from the coordinator's (settings {} there, {} \
                     here); give every machine the same sluice.toml",
                    c.model,
                    short_hash(&c.model_settings),
                    short_hash(&settings)
                )));
            }
            let model = runtime.models.get(&c.model).ok_or_else(|| {
                codec_err(format!("{who}: model {:?} is not configured", c.model))
            })?;
            let args = c
                .args
                .iter()
                .map(|a| converter.proto_to_physical_expr(a, &input_schema, &decode_ctx))
                .collect::<Result<Vec<_>>>()?;
            let cascade = super::call::resolve_cascade(&def, &runtime.models)
                .map_err(|e| codec_err(format!("{who}: {e}")))?;
            calls.push(Arc::new(PhysicalCall {
                def,
                model: model.for_kind(c.embedding),
                model_name: c.model,
                embedding: c.embedding,
                args,
                cascade,
            }));
        }
        Ok(Arc::new(
            LlmExec::new(input, calls, schema, runtime.dispatcher.clone()).gated(node.gate),
        ))
    }
}

/// The worker's definition of the call's function, if it is the coordinator's.
fn checked_function(worker: &dyn WorkerSide, c: &CallProto) -> Result<Arc<FunctionDef>> {
    let who = worker.name();
    let Some(def) = worker.function(&c.function) else {
        return Err(codec_err(format!(
            "{who}: function {}() is not defined here; give every machine the same udfs/",
            c.function
        )));
    };
    let mine = definition_text(&def);
    if mine != c.definition {
        return Err(codec_err(format!(
            "{who}: function {}() differs from the coordinator's (definition {} there, {} in {}); \
             give every machine the same udfs/",
            c.function,
            short_hash(&c.definition),
            short_hash(&mine),
            def.source.display()
        )));
    }
    Ok(def)
}

impl LlmCodec {
    fn encode_scan(
        &self,
        scan: &ClaimedScanExec,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<ClaimedScanProto> {
        let Side::Coordinator { share, .. } = &self.side else {
            return Err(codec_err("a sluice worker does not send scans on"));
        };
        Ok(ClaimedScanProto {
            run: Some(share.clone()),
            template: Some(converter.execution_plan_to_proto(scan.template(), self)?),
            chunk_bytes: scan.chunk_bytes(),
            queue: scan.queue().to_string(),
            chunks: scan.chunk_count(),
        })
    }

    fn decode_scan(
        &self,
        node: ClaimedScanProto,
        ctx: &TaskContext,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let Side::Worker(worker) = &self.side else {
            return Err(codec_err(
                "only a sluice worker runs chunked scans it is sent",
            ));
        };
        let who = worker.name();
        let template = node
            .template
            .ok_or_else(|| codec_err(format!("{who}: a chunked scan came without its scan")))?;
        let decode_ctx = PhysicalPlanDecodeContext::new(ctx, self);
        let template = converter.proto_to_execution_plan(&template, &decode_ctx)?;
        let scan = ClaimedScanExec::new(template, node.chunk_bytes, node.queue)?;
        if scan.chunk_count() != node.chunks {
            return Err(codec_err(format!(
                "{who}: a chunked scan cut into {} chunks here and {} on the coordinator; give \
                 every machine the same sluice version",
                scan.chunk_count(),
                node.chunks
            )));
        }
        let run = node
            .run
            .ok_or_else(|| codec_err(format!("{who}: a chunked scan came without its run")))?;
        let runtime = worker.runtime(&run).map_err(codec_err)?;
        let coordinator = worker.coordinator(&run).map_err(codec_err)?;
        Ok(Arc::new(
            scan.on_worker(coordinator, runtime.dispatcher.clone()),
        ))
    }
}

fn encoded(tag: u8, node: &impl Message, buf: &mut Vec<u8>) -> Result<()> {
    buf.push(tag);
    node.encode(buf)
        .map_err(|e| codec_err(format!("cannot encode a sluice node: {e}")))
}

impl PhysicalExtensionCodec for LlmCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match buf.split_first() {
            Some((&LLM_EXEC, body)) => {
                let node = LlmExecProto::decode(body)
                    .map_err(|e| codec_err(format!("cannot decode an LLM node: {e}")))?;
                let [input] = inputs else {
                    return Err(codec_err(format!(
                        "an LLM node has one input, got {}",
                        inputs.len()
                    )));
                };
                self.decode_exec(node, input.clone(), ctx, converter)
            }
            Some((&CLAIMED_SCAN, body)) => {
                let node = ClaimedScanProto::decode(body)
                    .map_err(|e| codec_err(format!("cannot decode a chunked scan: {e}")))?;
                self.decode_scan(node, ctx, converter)
            }
            _ => Err(codec_err(
                "a node of another sluice version (give every machine the same sluice)",
            )),
        }
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        if let Some(exec) = node.downcast_ref::<LlmExec>() {
            return encoded(LLM_EXEC, &self.encode_exec(exec, converter)?, buf);
        }
        if let Some(scan) = node.downcast_ref::<ClaimedScanExec>() {
            return encoded(CLAIMED_SCAN, &self.encode_scan(scan, converter)?, buf);
        }
        Err(codec_err(format!(
            "sluice cannot send a {} node to a worker",
            node.name()
        )))
    }
}
