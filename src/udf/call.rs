//! What executing LLM calls needs: the session's runtime ([`LlmRuntime`]) and each call
//! resolved to its function, model and argument expressions ([`PhysicalCall`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::physical_expr::PhysicalExpr;

use super::def::FunctionDef;
use crate::llm::Dispatcher;
use crate::llm::dispatch::{CallSpec, ModelHandle, Packer};

/// What LLM execution needs from the session: the dispatcher and the configured models.
#[derive(Debug, Clone)]
pub struct LlmRuntime {
    /// The shared scheduler.
    pub dispatcher: Dispatcher,
    /// Models by name (`[models.NAME]` in sluice.toml).
    pub models: BTreeMap<String, ModelHandle>,
    /// Most calls over the rows of a join (`[execution] max_join_calls`).
    pub max_join_calls: u64,
}

/// One call of an [`LlmExec`], resolved for execution.
#[derive(Debug)]
pub struct PhysicalCall {
    /// The function.
    pub def: Arc<FunctionDef>,
    /// The model it runs on.
    pub model: ModelHandle,
    /// The model's name in sluice.toml.
    pub model_name: String,
    /// Whether it runs on the model's embeddings.
    pub embedding: bool,
    /// Argument expressions over the input batch.
    pub args: Vec<Arc<dyn PhysicalExpr>>,
    /// Its cascade's models, in order (empty without one; `model` is then the first's).
    pub cascade: Vec<CascadeModel>,
}

/// One model of a call's cascade, resolved.
#[derive(Debug, Clone)]
pub struct CascadeModel {
    /// The model's name in sluice.toml.
    pub name: String,
    /// The model.
    pub model: ModelHandle,
    /// Below this confidence a row goes on to the next model (none: the last).
    pub min_confidence: Option<f64>,
}

/// The models of `def`'s cascade among `models` (none without a cascade), or why not: a model
/// sluice.toml does not define.
pub(crate) fn resolve_cascade(
    def: &FunctionDef,
    models: &BTreeMap<String, ModelHandle>,
) -> Result<Vec<CascadeModel>, String> {
    def.cascade
        .iter()
        .map(|stage| {
            let model = models.get(&stage.model).ok_or_else(|| {
                format!(
                    "{}() ({}) names model {:?} in its cascade, which sluice.toml does not \
                     define; add a [models.{}] table",
                    def.name,
                    def.source.display(),
                    stage.model,
                    stage.model
                )
            })?;
            Ok(CascadeModel {
                name: stage.model.clone(),
                model: model.clone(),
                min_confidence: stage.min_confidence,
            })
        })
        .collect()
}

impl PhysicalCall {
    /// What the dispatcher needs of the function for every call.
    pub(super) fn spec(&self) -> CallSpec {
        CallSpec {
            function: self.def.name.clone(),
            max_tokens: self.def.max_tokens,
            temperature: self.def.temperature,
            schema: self.def.output.clone().map(Arc::new),
            pack: self
                .def
                .kind
                .packing()
                .map(|p| p.clone() as Arc<dyn Packer>),
            confidence: false,
            in_cascade: false,
        }
    }
}
