//! The SQL faces of an LLM function: `name(...)`, its value, `name_error(...)`, the error
//! struct of the same call, and `name_model(...)`, the model that answered it — placeholders
//! that planning replaces.

use std::any::Any;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock};

use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::{Result, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};

use super::def::{FunctionDef, GENERIC_LLM};

/// The Arrow type of `<name>_error(...)` values.
pub(crate) static ERROR_TYPE: LazyLock<DataType> = LazyLock::new(|| {
    DataType::Struct(Fields::from(vec![
        Field::new("kind", DataType::Utf8, false),
        Field::new("message", DataType::Utf8, false),
        Field::new("attempts", DataType::UInt32, false),
        Field::new("http_status", DataType::UInt16, true),
        Field::new("finish_reason", DataType::Utf8, true),
        Field::new("model", DataType::Utf8, true),
    ]))
});

/// The SQL value type of a function's result.
pub(crate) fn value_type(def: &FunctionDef) -> DataType {
    def.output
        .as_ref()
        .map(|o| o.data_type.clone())
        .unwrap_or(DataType::Utf8)
}

/// Which of the two SQL faces of an LLM function a UDF is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Face {
    /// `name(...)`: the value.
    Value,
    /// `name_error(...)`: the error struct.
    Error,
    /// `name_model(...)`: the name of the model that answered (a cascade's, or the function's).
    Model,
}

/// A placeholder UDF for one face of an LLM function. Calling it directly is an error: the
/// optimizer rule replaces every call before execution.
impl Face {
    /// The SQL name of this face of `def`: `name` or `name_error`.
    pub(crate) fn sql_name(self, def: &FunctionDef) -> String {
        match self {
            Face::Value => def.name.clone(),
            Face::Error => format!("{}_error", def.name),
            Face::Model => format!("{}_model", def.name),
        }
    }
}

#[derive(Debug)]
pub(crate) struct LlmUdf {
    /// The definition.
    pub def: Arc<FunctionDef>,
    /// Value, error or model face.
    pub face: Face,
    name: String,
    signature: Signature,
}

impl PartialEq for LlmUdf {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && Arc::ptr_eq(&self.def, &other.def)
    }
}
impl Eq for LlmUdf {}
impl Hash for LlmUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl LlmUdf {
    /// The SQL functions (value, error and model faces) of `def`.
    pub fn faces(def: Arc<FunctionDef>) -> [ScalarUDF; 3] {
        let n = def.args.len();
        let signature = if def.name == GENERIC_LLM {
            Signature::one_of(
                vec![TypeSignature::Any(1), TypeSignature::Any(2)],
                Volatility::Volatile,
            )
        } else if n == 0 {
            Signature::nullary(Volatility::Volatile)
        } else {
            Signature::any(n, Volatility::Volatile)
        };
        [Face::Value, Face::Error, Face::Model].map(|face| {
            ScalarUDF::new_from_impl(LlmUdf {
                signature: signature.clone(),
                ..LlmUdf::face(def.clone(), face)
            })
        })
    }

    /// One face of `def` (any number of arguments).
    pub fn face(def: Arc<FunctionDef>, face: Face) -> LlmUdf {
        let name = face.sql_name(&def);
        LlmUdf {
            signature: Signature::variadic_any(Volatility::Volatile),
            def,
            face,
            name,
        }
    }

    /// If `udf` is an LLM function face, returns it.
    pub fn from_udf(udf: &ScalarUDF) -> Option<&LlmUdf> {
        let inner: &dyn Any = udf.inner().as_ref();
        inner.downcast_ref::<LlmUdf>()
    }
}

impl ScalarUDFImpl for LlmUdf {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        let expected = self.def.args.len();
        let ok = if self.def.name == GENERIC_LLM {
            (1..=2).contains(&arg_types.len())
        } else {
            arg_types.len() == expected
        };
        if !ok {
            return plan_err!(
                "{}() takes {} argument(s) ({}) as declared in {}, got {}",
                self.name,
                expected,
                self.def.args.join(", "),
                self.def.source.display(),
                arg_types.len()
            );
        }
        Ok(match self.face {
            Face::Value => value_type(&self.def),
            Face::Error => ERROR_TYPE.clone(),
            Face::Model => DataType::Utf8,
        })
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        datafusion::common::internal_err!(
            "LLM function {} reached execution without being planned by sluice; \
             build the session with sluice::engine",
            self.name
        )
    }
}
