//! How the `sluice` command ends: its exit codes, and a failed command's message and code.

/// Exit code for a failed statement.
pub const EXIT_STATEMENT_FAILED: u8 = 1;
/// Exit code for bad configuration, function definitions or usage.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code for a run stopped by `--budget-tokens` or `--budget-usd`.
pub const EXIT_BUDGET: u8 = 3;
/// Exit code for a run that left provider batch jobs running (`--wait false`): the same
/// command collects them later (`EX_TEMPFAIL`).
pub const EXIT_BATCHES_PENDING: u8 = 75;

/// A command that failed: the message printed after `error: ` and the exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// Bad configuration, definitions or usage.
    pub(crate) fn config(message: impl std::fmt::Display) -> Failure {
        Failure::new(EXIT_CONFIG, message.to_string())
    }

    /// A statement (or the command's work) failed.
    pub(crate) fn statement(message: impl std::fmt::Display) -> Failure {
        Failure::new(EXIT_STATEMENT_FAILED, message.to_string())
    }
}
