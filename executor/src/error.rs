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
    #[error("SSH session: {what}: {source}")]
    Session {
        what: String,
        #[source]
        source: russh::Error,
    },
    #[error("lock busy: another executor is working on this machine")]
    LockBusy,
    #[error("invalid job: {0}")]
    InvalidJob(String),
    #[error("NATS: {what}{}", nio_shared::error::cause(source))]
    Nats {
        what: String,
        #[source]
        source: Option<nio_shared::error::BoxError>,
    },
    #[error("{what}{}", nio_shared::error::cause(source))]
    Internal {
        what: String,
        #[source]
        source: Option<nio_shared::error::BoxError>,
    },
}

impl Error {
    /// A NATS failure while doing `what`, keeping its cause.
    pub fn nats(what: impl Into<String>, source: impl Into<nio_shared::error::BoxError>) -> Self {
        Error::Nats { what: what.into(), source: Some(source.into()) }
    }

    /// The SSH session failed while doing `what`.
    pub fn session(what: impl Into<String>, source: russh::Error) -> Self {
        Error::Session { what: what.into(), source }
    }

    /// A failure inside the executor (not the machine's, not the job's), keeping its cause if it has one.
    pub fn internal(what: impl Into<String>, source: Option<nio_shared::error::BoxError>) -> Self {
        Error::Internal { what: what.into(), source }
    }

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
            Error::HostKeyMismatch { .. } => FailureCategory::HostKeyMismatch,
            Error::HostKeyNotPinned => FailureCategory::HostKeyNotPinned,
            Error::Unreachable(_) | Error::Session { .. } => FailureCategory::Unreachable,
            Error::AuthFailed { .. } | Error::Identity(_) => FailureCategory::AuthFailed,
            Error::Source(_) | Error::SourceUnreachable(_) => FailureCategory::SourceUnavailable,
            Error::Command { category, .. } => *category,
            Error::Timeout { .. } => FailureCategory::Timeout,
            Error::InvalidJob(_) => FailureCategory::InvalidJob,
            Error::LockBusy | Error::Nats { .. } | Error::Internal { .. } => FailureCategory::Internal,
        }
    }

    /// Whether retrying later may succeed (network trouble, a busy lock) as opposed to a definite answer.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unreachable(_)
                | Error::Session { .. }
                | Error::SourceUnreachable(_)
                | Error::LockBusy
                | Error::Nats { .. }
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
            | Error::Session { .. } => Step::Connect,
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
