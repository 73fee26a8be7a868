//! What stopped a statement, as a typed value inside the DataFusion error that fails it.
//!
//! A statement's error crosses DataFusion's operators and, on a cluster, the wire from a worker
//! to the coordinator, where datafusion-distributed re-encodes it: an external error becomes its
//! text, but a [`DataFusionError::Context`] keeps its structure and its description. So the
//! stop travels as a context whose description is its code (`sluice-stop:budget`), which
//! [`StatementStop::of`] reads back by exact match from the error's chain — never from its
//! message — and [`StatementStop::strip`] removes before the error is shown.

use datafusion::arrow::error::ArrowError;
use datafusion::common::DataFusionError;

/// Why a statement was stopped on purpose (anything else is an ordinary failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementStop {
    /// The run's token or cost budget was reached (`--budget-tokens`, `--budget-usd`).
    Budget,
    /// A model failed in a way every row would (no connection, authentication, unknown model,
    /// a failed batch job).
    Model,
    /// A row's call failed under `on_error = "fail"`.
    Row,
}

const ALL: [StatementStop; 3] = [
    StatementStop::Budget,
    StatementStop::Model,
    StatementStop::Row,
];

impl StatementStop {
    /// The code the stop travels as.
    pub fn code(self) -> &'static str {
        match self {
            StatementStop::Budget => "sluice-stop:budget",
            StatementStop::Model => "sluice-stop:model",
            StatementStop::Row => "sluice-stop:row",
        }
    }

    fn from_code(code: &str) -> Option<StatementStop> {
        ALL.into_iter().find(|s| s.code() == code)
    }

    /// `e`, marked as this stop.
    pub fn fail(self, e: DataFusionError) -> DataFusionError {
        DataFusionError::Context(self.code().to_string(), Box::new(e))
    }

    /// The stop `e` carries, if any (the outermost one in its chain of causes).
    pub fn of(e: &DataFusionError) -> Option<StatementStop> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cause {
            if let Some(DataFusionError::Context(code, _)) = c.downcast_ref::<DataFusionError>()
                && let Some(stop) = StatementStop::from_code(code)
            {
                return Some(stop);
            }
            cause = c.source();
        }
        None
    }

    /// `e` without the stops it carries, for its message.
    pub fn strip(e: DataFusionError) -> DataFusionError {
        match e {
            DataFusionError::Context(code, inner) if StatementStop::from_code(&code).is_some() => {
                StatementStop::strip(*inner)
            }
            DataFusionError::Context(desc, inner) => {
                DataFusionError::Context(desc, Box::new(StatementStop::strip(*inner)))
            }
            DataFusionError::Diagnostic(d, inner) => {
                DataFusionError::Diagnostic(d, Box::new(StatementStop::strip(*inner)))
            }
            DataFusionError::External(inner) => match inner.downcast::<DataFusionError>() {
                Ok(df) => StatementStop::strip(*df),
                Err(other) => DataFusionError::External(other),
            },
            DataFusionError::ArrowError(arrow, trace) => match *arrow {
                ArrowError::ExternalError(inner) => match inner.downcast::<DataFusionError>() {
                    Ok(df) => StatementStop::strip(*df),
                    Err(other) => DataFusionError::ArrowError(
                        Box::new(ArrowError::ExternalError(other)),
                        trace,
                    ),
                },
                other => DataFusionError::ArrowError(Box::new(other), trace),
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_is_read_back_through_wrappers_and_stripped_for_the_message() {
        let failed = StatementStop::Budget.fail(DataFusionError::Execution(
            "token budget of 10 reached".into(),
        ));
        assert_eq!(StatementStop::of(&failed), Some(StatementStop::Budget));
        let wrapped = DataFusionError::ArrowError(
            Box::new(ArrowError::ExternalError(Box::new(
                DataFusionError::Context("writing out.parquet".into(), Box::new(failed)),
            ))),
            None,
        );
        assert_eq!(StatementStop::of(&wrapped), Some(StatementStop::Budget));
        let shown = StatementStop::strip(wrapped).to_string();
        assert!(!shown.contains("sluice-stop"), "{shown}");
        assert!(shown.contains("token budget of 10 reached"), "{shown}");
        // A message that merely mentions a budget is not a stop.
        let plain = DataFusionError::Execution("sluice-stop:budget reached".into());
        assert_eq!(StatementStop::of(&plain), None);
        let other = DataFusionError::Context("reading x".into(), Box::new(plain));
        assert_eq!(StatementStop::of(&other), None);
    }
}
