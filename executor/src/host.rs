//! A machine as the executor sees it: the [`Host`] trait (one SSH implementation in `ssh.rs`), what a command
//! returned, and running one step's command with its failure classified. The commands themselves are
//! [`nio_shared::remote::Commands`] (docs/design.md §4); nothing here builds a shell string: [`Host::exec`]
//! implementations quote each vector once with `nio_shared::quote`.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use nio_shared::protocol::{FailureCategory, Step, log_tail};
pub use nio_shared::remote::{Commands, FACT_SCRIPT};

use crate::error::{Error, Result};

/// What a remote command returned.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Exit status; None when the command was killed by a signal or the session ended first.
    pub status: Option<u32>,
    pub signal: Option<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }

    /// Bounded tail of stderr then stdout, for status events.
    pub fn tail(&self) -> Vec<String> {
        let mut text = String::from_utf8_lossy(&self.stdout).into_owned();
        text.push('\n');
        text.push_str(&String::from_utf8_lossy(&self.stderr));
        log_tail(&text)
    }

    fn how(&self) -> String {
        match (&self.status, &self.signal) {
            (Some(s), _) => format!("exited with status {s}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            (None, None) => "ended without an exit status".into(),
        }
    }
}

/// What the executor does to a machine. The SSH implementation lives in `ssh.rs`; tests and the fleet
/// simulator exercise the same trait.
pub trait Host: Send + Sync {
    /// Runs `argv` with optional standard input; kills it after `timeout`.
    fn exec(
        &self,
        argv: &[String],
        stdin: Option<Bytes>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Output>> + Send;
}

/// Runs one step's command and turns a failure into an error of that step.
pub async fn run<H: Host>(
    host: &H,
    step: Step,
    argv: Vec<String>,
    stdin: Option<Bytes>,
    timeout: Duration,
) -> Result<Output> {
    let out = output(host, step, &argv, stdin, timeout).await?;
    if out.success() {
        return Ok(out);
    }
    Err(exit_error(step, &argv, &out))
}

/// Runs `argv` like [`run`] but returns its output whatever its exit status (a script that reports its own
/// failure in records, which the caller reads before the status).
pub async fn output<H: Host>(
    host: &H,
    step: Step,
    argv: &[String],
    stdin: Option<Bytes>,
    timeout: Duration,
) -> Result<Output> {
    match tokio::time::timeout(timeout + Duration::from_secs(5), host.exec(argv, stdin, timeout)).await {
        Ok(r) => r.map_err(|e| match e {
            Error::Timeout { after, .. } => Error::Timeout { step, after },
            other => other,
        }),
        Err(_) => Err(Error::Timeout { step, after: timeout }),
    }
}

/// The error of a command at `step` that exited unsuccessfully with `out`.
pub fn exit_error(step: Step, argv: &[String], out: &Output) -> Error {
    let category = match (step, out.status) {
        (_, Some(127)) => FailureCategory::CommandFailed,
        (Step::Build, Some(4)) => FailureCategory::ActivationFailed,
        (Step::Build, _) | (Step::Install, _) | (Step::Disko, _) => FailureCategory::BuildFailed,
        (Step::Health, _) => FailureCategory::HealthCheckFailed,
        (Step::Activate, _) => FailureCategory::ActivationFailed,
        _ => FailureCategory::CommandFailed,
    };
    Error::command(step, argv.first().map_or("", String::as_str), out.how(), category).with_tail(out.tail())
}
