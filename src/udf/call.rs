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
        }
    }
}
