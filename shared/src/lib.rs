//! NIO's shared vocabulary: everything that crosses a process boundary is defined here, once.
//!
//! - [`crd`]: the `nixos.infra/v1alpha1` custom resources.
//! - [`protocol`]: job and status messages on NATS (versioned JSON).
//! - [`subjects`]: subject, stream, consumer and lock-key names.
//! - [`validate`]: checks for every user-supplied string that can reach a machine or a path.
//! - [`quote`]: the one place an argument vector becomes a remote shell string.
//! - [`seal`]: authenticated encryption of Secret contents carried in jobs.
//! - [`config`]: the executor's site configuration file.
//! - [`gitauth`]: Git credentials and server identity (CA, known_hosts) for the controller and executor.
//! - [`http`]: the `/metrics`, `/healthz` and `/readyz` endpoints both binaries serve.
//! - [`telemetry`]: tracing/OpenTelemetry set-up and trace-context propagation over NATS headers.
#![forbid(unsafe_code)]

pub mod analysis;
pub mod config;
pub mod crd;
pub mod error;
pub mod gitauth;
pub mod http;
pub mod nats;
pub mod protocol;
pub mod quote;
pub mod remote;
pub mod seal;
pub mod subjects;
pub mod telemetry;
pub mod validate;

pub use error::{Error, Result};
