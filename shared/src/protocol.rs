//! Job and status messages on NATS (docs/design.md §3). Bodies are JSON with a version field `v`; a message with an
//! unknown version, action, phase or step is rejected with a clear error, never guessed at.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crd::{HardwareFacts, HealthCheck, RebuildAction};
use crate::seal::Sealed;
pub use crate::subjects::JobKind;

/// The job wire-format version this build reads and writes.
pub const JOB_VERSION: u32 = 1;
/// The status wire-format version this build reads and writes.
pub const STATUS_VERSION: u32 = 1;
/// Most log lines carried in a status event.
pub const LOG_TAIL_LINES: usize = 40;
/// Most bytes of log carried in a status event.
pub const LOG_TAIL_BYTES: usize = 8 * 1024;

/// A message that could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The body is not JSON or lacks the version field.
    #[error("{what}: not a NIO message: {source}")]
    NotAMessage { what: &'static str, source: serde_json::Error },
    /// The version is not one this build understands.
    #[error("{what}: unsupported version v={got} (this build understands v={supported}); upgrade the reader")]
    UnsupportedVersion { what: &'static str, got: u64, supported: u32 },
    /// The body has the right version but a missing or unknown field value.
    #[error("{what}: malformed v{version} message: {source}")]
    Malformed { what: &'static str, version: u32, source: serde_json::Error },
}

/// What a job does to a machine.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// nixos-rebuild switch.
    Switch,
    /// nixos-rebuild boot.
    Boot,
    /// nixos-rebuild test.
    Test,
    /// nixos-rebuild dry-activate.
    DryActivate,
    /// Full install: kexec, disko, nixos-install, reboot.
    Install,
    /// Apply onRemoveFlake when a configuration is deleted.
    Remove,
    /// Reachability, NixOS version and current system.
    Probe,
    /// Hardware facts.
    Scan,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 8] = [
        Action::Switch,
        Action::Boot,
        Action::Test,
        Action::DryActivate,
        Action::Install,
        Action::Remove,
        Action::Probe,
        Action::Scan,
    ];

    /// The action of wire name `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// Lower-case wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Switch => "switch",
            Action::Boot => "boot",
            Action::Test => "test",
            Action::DryActivate => "dry-activate",
            Action::Install => "install",
            Action::Remove => "remove",
            Action::Probe => "probe",
            Action::Scan => "scan",
        }
    }

    /// Subject kind: probes and scans never displace a queued apply.
    pub fn kind(self) -> JobKind {
        match self {
            Action::Probe | Action::Scan => JobKind::Probe,
            _ => JobKind::Apply,
        }
    }
}

impl From<RebuildAction> for Action {
    fn from(a: RebuildAction) -> Self {
        match a {
            RebuildAction::Switch => Action::Switch,
            RebuildAction::Boot => Action::Boot,
            RebuildAction::Test => Action::Test,
            RebuildAction::DryActivate => Action::DryActivate,
        }
    }
}

/// How to reach the machine over SSH. (Not to be confused with a rollout target, the commit and generation a job
/// brings the machine to.)
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// IP address or host name to connect to.
    pub host: String,
    pub port: u16,
    pub user: String,
    /// SSH identity name held by the executors; None = the executor's default identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Pinned host key (spec.hostKey, else status.hostKey); None = trust on first use if the executor allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
}

/// What to build.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    pub repo: String,
    /// Full commit SHA.
    pub commit: String,
    /// Directory holding flake.nix, relative to the repository root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdir: Option<String>,
    /// Attribute under nixosConfigurations.
    pub flake_attr: String,
    /// Name of the Git credentials the executors hold for this repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
}

/// Content of a non-secret file added to the source tree.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum FileContent {
    /// Given content.
    Inline { content: String },
    /// A nixos-facter report generated on the machine.
    NixosFacter,
}

/// A non-secret file added to the source tree at `path`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    pub path: String,
    #[serde(flatten)]
    pub content: FileContent,
}

/// A secret file delivered to `/var/lib/nio/secrets/{path}` with mode 0400 (the executor's `remote.secretsDir`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretFile {
    pub path: String,
    pub sealed: Sealed,
    /// Owner and group names on the machine (root when absent or unknown there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Octal mode, e.g. "0440"; absent: "0400".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl SecretFile {
    /// The file mode to write (0400 unless given; anything unparsable is 0400 too).
    pub fn file_mode(&self) -> u32 {
        self.mode.as_deref().and_then(|m| u32::from_str_radix(m, 8).ok()).filter(|m| *m <= 0o777).unwrap_or(0o400)
    }
}

impl SecretFile {
    /// Associated data that binds a sealed secret to its machine and path.
    pub fn seal_context(cluster: &str, namespace: &str, machine: &str, path: &str) -> String {
        format!("{cluster}/{namespace}/{machine}/{path}")
    }
}

/// One disruption budget a job counts against: `key` names it (`{budget}` or `{budget}.{label value}`), `max`
/// is how many machines it allows under an operation at once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BudgetClaim {
    pub key: String,
    pub max: u32,
}

/// A job's id, also its `Nats-Msg-Id` (so a republished job is deduplicated by the stream):
/// `{cluster}/{namespace}/{machine}/{target}/{action}`. The target is what the job brings the machine to:
/// `{commit}/{spec}[.{files hash}]` for an apply (`spec`: what of the configuration's spec decides what runs), `{commit}/{generation}` for a removal, and
/// `probe/{unix seconds}` for a probe or scan. A retry appends `-{n}` so it gets past the duplicate window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// The id of a job bringing `machine` to `target` with `action`.
    pub fn new(cluster: &str, namespace: &str, machine: &str, target: &str, action: Action) -> Self {
        JobId(format!("{cluster}/{namespace}/{machine}/{target}/{}", action.as_str()))
    }

    /// A probe or scan started at `unix_seconds`.
    pub fn probe(cluster: &str, namespace: &str, machine: &str, unix_seconds: i64, action: Action) -> Self {
        Self::new(cluster, namespace, machine, &format!("probe/{unix_seconds}"), action)
    }

    /// The same job under a fresh id (attempt `n`).
    pub fn retry(&self, n: i64) -> Self {
        JobId(format!("{}-{n}", self.0))
    }

    /// The target part (see the type's docs); None for an id of another shape.
    pub fn target(&self) -> Option<&str> {
        let mut parts = self.0.splitn(4, '/');
        let rest = parts.nth(3)?;
        let (target, _action) = rest.rsplit_once('/')?;
        (!target.is_empty()).then_some(target)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for JobId {
    fn from(s: String) -> Self {
        JobId(s)
    }
}

impl From<&str> for JobId {
    fn from(s: &str) -> Self {
        JobId(s.to_string())
    }
}

/// A rebuild, install, removal, probe or scan of one machine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// Wire-format version ([`JOB_VERSION`]).
    pub v: u32,
    /// Unique id; also the `Nats-Msg-Id`.
    pub id: JobId,
    pub cluster: String,
    pub namespace: String,
    pub machine: String,
    /// NixosConfiguration that asked for the job (None for probes and scans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration: Option<String>,
    /// metadata.generation of the configuration.
    #[serde(default)]
    pub generation: i64,
    pub site: String,
    /// On the wire as `target`.
    #[serde(rename = "target")]
    pub endpoint: Endpoint,
    /// Source tree to apply (None for probes and scans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretFile>,
    /// SHA-256 over the secret contents (never the contents), so a Secret change triggers a re-apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Roll back when activation or the health check fails.
    #[serde(default)]
    pub rollback: bool,
    /// Disruption-budget slots the executor must hold while it works on the machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetClaim>,
    /// With `rollback`: seconds the machine waits for the confirmation before it rolls itself back.
    #[serde(default = "crate::crd::default_confirm_timeout")]
    pub confirm_timeout_seconds: u32,
    /// Give up after this many seconds.
    pub timeout_seconds: u64,
    /// When the controller published the job.
    pub enqueued_at: DateTime<Utc>,
}

/// Phase of a status event.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    Started,
    Step,
    Succeeded,
    Failed,
    Skipped,
    RolledBack,
}

impl Phase {
    /// Every phase.
    pub const ALL: [Phase; 6] =
        [Phase::Started, Phase::Step, Phase::Succeeded, Phase::Failed, Phase::Skipped, Phase::RolledBack];

    /// Wire name (as in the JSON body).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Started => "Started",
            Phase::Step => "Step",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Skipped => "Skipped",
            Phase::RolledBack => "RolledBack",
        }
    }

    /// The phase of wire name `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// Whether the job is over after this event.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Skipped | Phase::RolledBack)
    }
}

/// Step of a job a status event refers to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Lock,
    Connect,
    Upload,
    Build,
    Activate,
    Health,
    Rollback,
    Kexec,
    Disko,
    Install,
    Reboot,
    Probe,
    Scan,
}

/// Why a job failed: a small fixed set used as Event reason, condition reason and metric label.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureCategory {
    /// The machine presented a host key other than the pinned one; nothing was run.
    HostKeyMismatch,
    /// No host key is pinned for the machine and the executor trusts no first key (`--host-key-policy pinned`);
    /// nothing was run.
    HostKeyNotPinned,
    /// Connection refused or timed out after retries.
    Unreachable,
    /// The SSH server refused the identity.
    AuthFailed,
    /// The source could not be fetched at the commit.
    SourceUnavailable,
    /// The source at the commit cannot be built as given: e.g. its flake.lock is missing or out of date.
    SourceInvalid,
    /// The SSH user may not run commands as root (no passwordless sudo); nothing was changed.
    PermissionDenied,
    /// nixos-rebuild (or nixos-install) failed to build.
    BuildFailed,
    /// Activation failed.
    ActivationFailed,
    /// The health check failed after activation.
    HealthCheckFailed,
    /// A step ran past its timeout.
    Timeout,
    /// The job itself was invalid or undecodable.
    InvalidJob,
    /// A remote command failed in a way not listed above.
    CommandFailed,
    /// A bug or unexpected condition in NIO.
    Internal,
    /// A category this build does not know (an executor newer than this controller reported it): the event is
    /// still applied, as a failure.
    #[serde(other)]
    Unknown,
}

impl FailureCategory {
    /// Name as used in Events, conditions and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCategory::HostKeyMismatch => "HostKeyMismatch",
            FailureCategory::HostKeyNotPinned => "HostKeyNotPinned",
            FailureCategory::Unreachable => "Unreachable",
            FailureCategory::AuthFailed => "AuthFailed",
            FailureCategory::SourceUnavailable => "SourceUnavailable",
            FailureCategory::SourceInvalid => "SourceInvalid",
            FailureCategory::PermissionDenied => "PermissionDenied",
            FailureCategory::BuildFailed => "BuildFailed",
            FailureCategory::ActivationFailed => "ActivationFailed",
            FailureCategory::HealthCheckFailed => "HealthCheckFailed",
            FailureCategory::Timeout => "Timeout",
            FailureCategory::InvalidJob => "InvalidJob",
            FailureCategory::CommandFailed => "CommandFailed",
            FailureCategory::Internal => "Internal",
            FailureCategory::Unknown => "Unknown",
        }
    }
}

/// An executor's report about one job, published on `nio.status.{cluster}.{namespace}.{machine}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusEvent {
    /// Wire-format version ([`STATUS_VERSION`]).
    pub v: u32,
    pub job_id: JobId,
    pub cluster: String,
    pub namespace: String,
    pub machine: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration: Option<String>,
    #[serde(default)]
    pub generation: i64,
    pub action: Action,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<FailureCategory>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Store path of the system now running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Store path the machine booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_system: Option<String>,
    /// The machine's boot id when the job read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Host key the machine presented (or was installed with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nixos_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<HardwareFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Last lines of output, bounded by [`LOG_TAIL_LINES`] and [`LOG_TAIL_BYTES`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_tail: Vec<String>,
    pub executor: String,
    /// When the job started on the executor.
    pub started_at: DateTime<Utc>,
    /// When this event happened; events are applied in this order.
    pub at: DateTime<Utc>,
}

#[derive(Deserialize)]
struct Envelope {
    v: u64,
}

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, supported: u32, body: &[u8]) -> Result<T, ProtocolError> {
    let env: Envelope = serde_json::from_slice(body).map_err(|source| ProtocolError::NotAMessage { what, source })?;
    if env.v != u64::from(supported) {
        return Err(ProtocolError::UnsupportedVersion { what, got: env.v, supported });
    }
    serde_json::from_slice(body).map_err(|source| ProtocolError::Malformed { what, version: supported, source })
}

impl Job {
    /// Decodes a job body, rejecting unknown versions and actions.
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        decode("job", JOB_VERSION, body)
    }

    /// Encodes the job as its wire JSON.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The subject this job is published on.
    pub fn subject(&self) -> String {
        crate::subjects::job_subject(&self.site, self.action.kind(), &self.cluster, &self.namespace, &self.machine)
    }
}

/// Header of a status message naming its event's phase (`Started`, `Step`, …): a consumer can tell a progress
/// step from the rest without decoding the body. The body stays the record; the header only says what it is.
pub const PHASE_HEADER: &str = "Nio-Phase";

/// Header of a status message naming its event's action (`switch`, `install`, …).
pub const ACTION_HEADER: &str = "Nio-Action";

/// The action of a status message whose headers say it is a progress step; None for any other phase, or
/// a message without (or with unknown) headers: such a message needs its body decoded.
pub fn progress_step(headers: Option<&async_nats::HeaderMap>) -> Option<Action> {
    let h = headers?;
    if Phase::from_name(h.get(PHASE_HEADER)?.as_str())? != Phase::Step {
        return None;
    }
    Action::from_name(h.get(ACTION_HEADER)?.as_str())
}

impl StatusEvent {
    /// Decodes a status body, rejecting unknown versions, phases and steps.
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        decode("status event", STATUS_VERSION, body)
    }

    /// Encodes the event as its wire JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The subject this event is published on.
    pub fn subject(&self) -> String {
        crate::subjects::status_subject(&self.cluster, &self.namespace, &self.machine)
    }

    /// Headers naming the event's phase and action ([`PHASE_HEADER`], [`ACTION_HEADER`]), added to `headers`.
    pub fn describe(&self, headers: &mut async_nats::HeaderMap) {
        headers.insert(PHASE_HEADER, self.phase.as_str());
        headers.insert(ACTION_HEADER, self.action.as_str());
    }

    /// Its `Nats-Msg-Id`: the job, the phase and the moment it was made, so a republished event is dropped by
    /// the stream and two events of a job never are.
    pub fn message_id(&self) -> String {
        let at = self.at.timestamp_nanos_opt().unwrap_or_else(|| self.at.timestamp_micros());
        format!("{}.{:?}.{at}", self.job_id, self.phase)
    }
}

/// The last lines of `output`, at most [`LOG_TAIL_LINES`] lines and [`LOG_TAIL_BYTES`] bytes, each line cut at
/// a character boundary.
pub fn log_tail(output: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut bytes = 0;
    for line in output.lines().rev().filter(|l| !l.trim().is_empty()) {
        if lines.len() == LOG_TAIL_LINES || bytes >= LOG_TAIL_BYTES {
            break;
        }
        let budget = LOG_TAIL_BYTES - bytes;
        let mut cut = line.len().min(budget);
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        bytes += cut;
        lines.push(line[..cut].to_string());
    }
    lines.reverse();
    lines
}
