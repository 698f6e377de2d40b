//! The crate's error type. Every variant maps to a small fixed category used as an Event reason,
//! condition reason and metric label.

use crate::validate::Invalid;

/// Errors from the shared crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A user-supplied value broke a rule; nothing was run.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// A message on the wire could not be understood; it is rejected, never guessed.
    #[error(transparent)]
    Protocol(#[from] crate::protocol::ProtocolError),
    /// Sealing or unsealing a secret failed.
    #[error(transparent)]
    Seal(#[from] crate::seal::SealError),
    /// An argument could not be quoted for the remote shell.
    #[error(transparent)]
    Quote(#[from] crate::quote::QuoteError),
    /// Telemetry could not be initialised.
    #[error("telemetry: {0}")]
    Telemetry(String),
    /// A configuration file could not be read or parsed.
    #[error("config {path}: {message}")]
    Config { path: String, message: String },
    /// A NATS stream could not be created, or exists with settings NIO cannot work with.
    #[error("NATS: {what}{}", cause(source))]
    Nats {
        what: String,
        #[source]
        source: Option<BoxError>,
    },
}

/// Any error, as a cause kept by another.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `": {cause}"`, or nothing: for messages that must carry their cause's text (status messages, Events) while
/// the error also keeps the cause itself as its `source`.
pub fn cause(source: &Option<BoxError>) -> String {
    source.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
}

impl Error {
    /// A NATS failure while doing `what`, keeping its cause.
    pub fn nats(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Nats { what: what.into(), source: Some(source.into()) }
    }
}

impl Error {
    /// Small fixed category for Event reasons, condition reasons and metric labels.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "InvalidSpec",
            Error::Protocol(_) => "InvalidMessage",
            Error::Seal(_) => "SealError",
            Error::Quote(_) => "InvalidArgument",
            Error::Telemetry(_) => "Telemetry",
            Error::Config { .. } => "InvalidConfig",
            Error::Nats { .. } => "Nats",
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
