//! The exit codes (README "Commands"), in one place, and how each error maps to one.

use referral_rewards::config::ConfigError;
use referral_rewards::engine::EngineError;
use referral_rewards::report::ReportError;
use referral_rewards::serve::ServeError;
use referral_rewards::store::StoreError;

/// The exit codes, in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    RunFailed = 1,
    Usage = 2,
    Refused = 3,
    /// Every referrer was written but some, whose values cannot be stored (the summary lists
    /// them); for a dry run, an apply would leave them unwritten.
    Partial = 4,
    /// The run committed (its row says succeeded), but what it was to leave behind afterwards
    /// (its report, its saved plan, its summary on stdout) could not be written. Not 1: that
    /// says nothing was written.
    CommittedOutputFailed = 5,
}

/// An error on its way out: one line on stderr and an exit code.
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure {
            exit: Exit::Usage,
            message: e.to_string(),
        }
    }
}

impl From<ServeError> for Failure {
    fn from(e: ServeError) -> Self {
        let exit = match e {
            ServeError::Config { .. } => Exit::Usage,
            ServeError::Runtime(_) => Exit::RunFailed,
        };
        Failure {
            exit,
            message: e.to_string(),
        }
    }
}

impl From<ReportError> for Failure {
    fn from(e: ReportError) -> Self {
        let exit = match e {
            ReportError::Usage(_) | ReportError::ReadPlan { .. } => Exit::Usage,
            ReportError::Write { .. } => Exit::RunFailed,
        };
        Failure {
            exit,
            message: e.to_string(),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let exit = match e {
            StoreError::Invalid(_) => Exit::Usage,
            _ => Exit::RunFailed,
        };
        Failure {
            exit,
            message: e.to_string(),
        }
    }
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        let exit = match &e {
            EngineError::Locked | EngineError::DigestMismatch { .. } => Exit::Refused,
            EngineError::UnknownReferrer(_) => Exit::Usage,
            EngineError::Store(StoreError::Invalid(_)) => Exit::Usage,
            // Only a shutdown or a lost connection cuts a run short; the CLI never aborts.
            EngineError::RunFailed { .. }
            | EngineError::CommittedBeforeAbort { .. }
            | EngineError::Aborted
            | EngineError::Store(_)
            | EngineError::Compute(_)
            | EngineError::Panicked(_) => Exit::RunFailed,
        };
        Failure {
            exit,
            message: e.to_string(),
        }
    }
}
