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
    #[error("NATS: {0}")]
    Nats(String),
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
            Error::Nats(_) => "Nats",
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
