//! Executor errors. Each maps to a failure category (reported in status, Events and metrics) and decides the
//! ack: transient errors are retried (`nak` with backoff), permanent ones end the job (`term` + Failed).

use std::time::Duration;

use nio_shared::protocol::{FailureCategory, Step};

/// Why a job (or a step of it) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "host key mismatch: the machine presented {seen}, expected {expected}; refusing to connect. If the machine was reinstalled, set spec.hostKey or delete status.hostKey to re-pin"
    )]
    HostKeyMismatch { expected: String, seen: String },
    #[error(
        "no pinned host key and the executor's host-key policy is `pinned`: set spec.hostKey, or run the executor with --host-key-policy tofu"
    )]
    HostKeyNotPinned,
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("authentication as {user} with identity {identity} was refused; check the machine's authorized_keys")]
    AuthFailed { user: String, identity: String },
    #[error("SSH identity {0}")]
    Identity(String),
    #[error("source: {0}")]
    Source(String),
    #[error("source: {0}")]
    SourceUnreachable(String),
    #[error("{step:?} failed: `{program}` {how}")]
    Command { step: Step, program: String, how: String, tail: Vec<String>, category: FailureCategory },
    #[error("{step:?} timed out after {after:?}")]
    Timeout { step: Step, after: Duration },
    #[error("SSH session: {0}")]
    Session(String),
    #[error("lock busy: another executor is working on this machine")]
    LockBusy,
    #[error("invalid job: {0}")]
    InvalidJob(String),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// A command at `step` that did not do what NIO needs; `how` says what it did instead.
    pub fn command(step: Step, program: &str, how: impl Into<String>, category: FailureCategory) -> Self {
        Error::Command { step, program: program.into(), how: how.into(), tail: Vec::new(), category }
    }

    /// The same error carrying the command's last output lines.
    pub fn with_tail(mut self, lines: Vec<String>) -> Self {
        if let Error::Command { tail, .. } = &mut self {
            *tail = lines;
        }
        self
    }

    /// Failure category reported in status.
    pub fn category(&self) -> FailureCategory {
        match self {
            Error::HostKeyMismatch { .. } | Error::HostKeyNotPinned => FailureCategory::HostKeyMismatch,
            Error::Unreachable(_) | Error::Session(_) => FailureCategory::Unreachable,
            Error::AuthFailed { .. } | Error::Identity(_) => FailureCategory::AuthFailed,
            Error::Source(_) | Error::SourceUnreachable(_) => FailureCategory::SourceUnavailable,
            Error::Command { category, .. } => *category,
            Error::Timeout { .. } => FailureCategory::Timeout,
            Error::InvalidJob(_) => FailureCategory::InvalidJob,
            Error::LockBusy | Error::Nats(_) | Error::Internal(_) => FailureCategory::Internal,
        }
    }

    /// Whether retrying later may succeed (network trouble, a busy lock) as opposed to a definite answer.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unreachable(_) | Error::Session(_) | Error::SourceUnreachable(_) | Error::LockBusy | Error::Nats(_)
        )
    }

    /// The step the error belongs to.
    pub fn step(&self) -> Step {
        match self {
            Error::HostKeyMismatch { .. }
            | Error::HostKeyNotPinned
            | Error::Unreachable(_)
            | Error::AuthFailed { .. }
            | Error::Identity(_)
            | Error::Session(_) => Step::Connect,
            Error::Source(_) | Error::SourceUnreachable(_) => Step::Upload,
            Error::Command { step, .. } | Error::Timeout { step, .. } => *step,
            Error::LockBusy => Step::Lock,
            _ => Step::Connect,
        }
    }

    /// Bounded output tail to carry in the status event.
    pub fn tail(&self) -> Vec<String> {
        match self {
            Error::Command { tail, .. } => tail.clone(),
            _ => vec![],
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
