//! The `nixos.infra/v1alpha1` custom resources: `Machine` and `NixosConfiguration`.
//!
//! Field names follow the upstream NixOS operator conventions (hostname, ipAddress, sshUser, gitRepo, ref,
//! credentialsRef, flake, configurationSubdir, machineRef, fullInstall, onRemoveFlake, additionalFiles) so that
//! existing manifests keep working. Doc comments here become the CRD descriptions that `kubectl explain` shows.

// kube-derive's repeated `printcolumn(type_ = ..)` items look like duplicated attributes to clippy.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every NIO resource.
pub const GROUP: &str = "nixos.infra";
/// API version of the resources in this module.
pub const VERSION: &str = "v1alpha1";
/// Annotation on a NixosConfiguration: set it to a new value (a Git webhook can put the pushed commit or a
/// timestamp there) to re-resolve the ref now rather than at the next pollInterval.
pub const REFRESH_ANNOTATION: &str = "nixos.infra/refresh";
/// The W3C `traceparent` of the webhook delivery that set [`REFRESH_ANNOTATION`]: the reconcile it causes links
/// to that trace.
pub const REFRESH_TRACE_ANNOTATION: &str = "nixos.infra/refresh-traceparent";
/// Annotation on a NixosConfiguration approving a paused wave: `<wave>@<first 12 characters of the target
/// commit>` (naming the commit keeps an old approval from letting a later rollout through).
pub const APPROVE_ANNOTATION: &str = "nixos.infra/approve";
/// Annotation on a NixosConfiguration resuming a rollout halted over its failure budget: the first 12
/// characters of the target commit, optionally followed by `@` and anything (a second resume of the same commit
/// takes a new value). A resume forgives the failures so far; the budgets count the failures after it.
pub const RESUME_ANNOTATION: &str = "nixos.infra/resume";
/// Annotation on a Machine: set it to a new value to try its failed target again (a failure the machine has
/// recovered from since: it was down, its disk was full) without a new commit or a spec change. Handled once
/// per value (`status.lastHandledRetry`); on a machine that has not failed it does nothing.
pub const RETRY_ANNOTATION: &str = "nixos.infra/retry";
/// Finalizer the controller puts on configurations so removal runs `onRemoveFlake` first.
pub const FINALIZER: &str = "nixos.infra/finalizer";
/// The label a Secret needs (with value [`SECRET_OPT_IN_VALUE`]) before NIO reads it. Without it, anyone who may
/// create a NixosConfiguration in a namespace could have any Secret there shipped to a machine of their choice
/// or sent as Git credentials to any URL (a confused deputy).
pub const SECRET_OPT_IN_LABEL: &str = "nixos.infra/usable-by";
pub const SECRET_OPT_IN_VALUE: &str = "nio";

fn default_port() -> u16 {
    22
}
fn default_ssh_user() -> String {
    "root".into()
}
fn default_site() -> String {
    "default".into()
}
fn default_true() -> bool {
    true
}
fn default_health_timeout() -> u32 {
    300
}

/// Seconds a machine waits for the activation's confirmation before rolling itself back.
pub fn default_confirm_timeout() -> u32 {
    30
}

/// A physical or virtual NixOS host that NIO can reach over SSH.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "nixos.infra",
    version = "v1alpha1",
    kind = "Machine",
    plural = "machines",
    namespaced,
    status = "MachineStatus",
    derive = "PartialEq",
    shortname = "mach",
    category = "nio",
    doc = "A NixOS host managed by NIO over SSH.",
    printcolumn(
        name = "Site",
        type_ = "string",
        json_path = ".spec.site",
        description = "Site used for routing and limits"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the machine is in its current job"
    ),
    printcolumn(
        name = "Commit",
        type_ = "string",
        json_path = ".status.appliedCommitShort",
        description = "Commit of the configuration last applied"
    ),
    printcolumn(
        name = "Discoverable",
        type_ = "boolean",
        json_path = ".status.discoverable",
        description = "Whether the last probe reached the machine"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MachineSpec {
    /// DNS host name of the machine; used to connect when ipAddress is not set.
    #[schemars(length(min = 1, max = 253))]
    pub hostname: String,
    /// IP address to connect to (preferred over hostname when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 45))]
    pub ip_address: Option<String>,
    /// SSH port on the machine.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// User NIO logs in as; it needs root rights to switch the system.
    #[serde(default = "default_ssh_user")]
    #[schemars(length(min = 1, max = 32))]
    pub ssh_user: String,
    /// Site the machine belongs to. Jobs are routed and rate-limited per site.
    #[serde(default = "default_site")]
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub site: String,
    /// Name of the SSH identity (held by the executors, never stored in the cluster) used to log in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credential_ref: Option<String>,
    /// Pinned OpenSSH public host key ("ssh-ed25519 AAAA..."). When absent, the key seen on the first
    /// connection is recorded in status.hostKey and pinned from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8192))]
    pub host_key: Option<String>,
}

/// Where a machine is in its current job.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum MachinePhase {
    /// Known, nothing queued.
    #[default]
    Pending,
    /// A job is on the queue.
    Queued,
    /// A job is on the queue, but no executor serves the machine's site (see the Waiting condition).
    Waiting,
    /// An executor is working on the machine.
    Applying,
    /// The target configuration is active.
    Applied,
    /// The last job failed; see conditions.
    Failed,
}

impl MachinePhase {
    pub const ALL: [MachinePhase; 6] = [
        MachinePhase::Pending,
        MachinePhase::Queued,
        MachinePhase::Waiting,
        MachinePhase::Applying,
        MachinePhase::Applied,
        MachinePhase::Failed,
    ];

    /// The phase as written in status and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            MachinePhase::Pending => "Pending",
            MachinePhase::Queued => "Queued",
            MachinePhase::Waiting => "Waiting",
            MachinePhase::Applying => "Applying",
            MachinePhase::Applied => "Applied",
            MachinePhase::Failed => "Failed",
        }
    }
}

/// Hardware facts gathered by a `scan` job. Bounded in size.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct HardwareFacts {
    /// Nix system double, e.g. x86_64-linux.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// CPU model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    /// Number of logical CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    /// Installed memory in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Block devices, e.g. "nvme0n1 512110190592".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// Network interfaces with their MAC addresses, e.g. "eno1 0c:c4:7a:00:00:01".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_interfaces: Vec<String>,
    /// Virtualisation detected, if any (kvm, qemu, none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtualisation: Option<String>,
    /// Tool that produced the facts (nixos-facter or the built-in fact script).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Observed state of a Machine, written by the controller from executor reports. Defaults to
/// `{observedGeneration: 0}`, so GitOps tools read a new Machine as in progress until NIO has looked at it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("default" = {"observedGeneration": 0}))]
pub struct MachineStatus {
    /// Whether the last probe reached the machine over SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discoverable: Option<bool>,
    /// Whether a NixosConfiguration targets this machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_configuration: Option<bool>,
    /// Name of the NixosConfiguration last applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_configuration: Option<String>,
    /// Full Git commit of the configuration last applied. Never cleared by an outage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_commit: Option<String>,
    /// First 12 characters of appliedCommit, for printer columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_commit_short: Option<String>,
    /// Generation of the NixosConfiguration last applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_generation: Option<i64>,
    /// When the last successful apply finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_time: Option<Time>,
    /// Store path of the running system (readlink -f /run/current-system), from the last job or probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_system: Option<String>,
    /// Store path the machine booted (/run/booted-system): after a switch of the kernel or a boot it differs
    /// from currentSystem until the next reboot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_system: Option<String>,
    /// The machine's boot id (/proc/sys/kernel/random/boot_id) when last seen; a new one means it rebooted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Store path NIO last activated; a probe seeing another system marks the machine Drifted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_system: Option<String>,
    /// What was last applied successfully: `{commit}/{spec}[.{secretsHash}]` of its configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_target: Option<String>,
    /// What the job on the queue (or running) will apply, in the same form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_target: Option<String>,
    /// Id of the last job published for this machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_job_id: Option<String>,
    /// Id of the last job set aside: withdrawn from the queue before an executor took it (its configuration
    /// paused, suspended or deleted, or the Machine's spec changed), or failed and retried because the Machine's
    /// spec changed since. A job published for the same move later gets an id of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_job_id: Option<String>,
    /// Target whose job failed; it is not retried until the commit, spec or secrets change, or a retry is asked
    /// for (the `nixos.infra/retry` annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_target: Option<String>,
    /// The `nixos.infra/retry` annotation's value when it was last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // A `str`, not a `String`: 8 bytes more and a cached Machine no longer fits jemalloc's 1 KiB size class
    // (see the test `a_cached_machine_fits_a_kibibyte`).
    pub last_handled_retry: Option<Box<str>>,
    /// Time of the newest executor event applied (RFC 3339, nanoseconds); older events are ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_time: Option<String>,
    /// When the last probe was published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,
    /// Where the machine is in its current job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MachinePhase>,
    /// Host key recorded on first contact (trust on first use) or installed by a full install.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// Hardware facts from the last scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Boxed: the controller caches every Machine, and facts inline made each 168 bytes larger, set or not.
    pub hardware_facts: Option<Box<HardwareFacts>>,
    /// When a full install last completed. A full install runs once; later commits switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_at: Option<Time>,
    /// Conditions (one per type): Ready, Invalid, Failed, Drifted, HostKeyMismatch, and the kstatus conditions
    /// Reconciling and Stalled, present only while True.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Which action applies a new commit (switch-to-configuration's).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum RebuildAction {
    /// Build, activate now and make it the boot default.
    #[default]
    Switch,
    /// Build and make it the boot default without activating.
    Boot,
    /// Build and activate without making it the boot default.
    Test,
    /// Build and show what activation would change.
    DryActivate,
}

impl RebuildAction {
    /// The switch-to-configuration action.
    pub fn as_str(self) -> &'static str {
        match self {
            RebuildAction::Switch => "switch",
            RebuildAction::Boot => "boot",
            RebuildAction::Test => "test",
            RebuildAction::DryActivate => "dry-activate",
        }
    }
}

/// How a file is produced.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum FileValueType {
    /// Content given in `inline`.
    Inline,
    /// Content read from a Secret in the configuration's namespace; delivered outside the Nix store.
    SecretRef,
    /// A nixos-facter hardware report generated on the machine.
    NixosFacter,
}

/// A key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    /// Secret name (same namespace as the configuration).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A file added to the source tree (Inline, NixosFacter) or delivered as a secret (SecretRef).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdditionalFile {
    /// Relative path. Inline and NixosFacter files land in the source tree relative to configurationSubdir
    /// (where the flake sees them); SecretRef files land under /var/lib/nio/secrets on the machine (directories
    /// 0711: reachable by the file's owner, listed by nobody but root; kept across reboots; live with the
    /// activation that delivers them), mode 0400 unless `mode` says otherwise, never in the Nix store or the
    /// source tree.
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// Where the content comes from.
    pub value_type: FileValueType,
    /// Content for valueType Inline (at most 256 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub inline: Option<String>,
    /// Secret key for valueType SecretRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// SecretRef only: the file's owner (a user name on the machine; root when unset or unknown there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(r"^[a-z_][a-z0-9_-]*$"))]
    pub owner: Option<String>,
    /// SecretRef only: the file's group (a group name on the machine; root when unset or unknown there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(r"^[a-z_][a-z0-9_-]*$"))]
    pub group: Option<String>,
    /// SecretRef only: the file's mode in octal, e.g. "0440" (default "0400").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^0?[0-7]{3}$"))]
    pub mode: Option<String>,
}

/// How a new commit rolls out across the targeted machines.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Most machines of this configuration updated at once (site limits still apply). Unset: no extra limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_parallel: Option<u32>,
    /// Number of machines updated first; the rest wait until they succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000000))]
    pub canary: Option<u32>,
    /// Failed machines tolerated before the rollout stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000000))]
    pub failure_budget: Option<u32>,
    /// Hold the rollout: jobs in flight finish, no new ones start.
    #[serde(default)]
    pub pause: bool,
    /// Ordered waves: each starts once the one before it is applied, has soaked and (if it pauses) was
    /// approved. Machines fall into the first wave whose selector matches them, or whose count still has
    /// room, in name order; the last wave takes the rest. No waves: one wave of every machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub waves: Vec<WaveSpec>,
    /// Failed machines tolerated over the whole rollout: a number, or a percentage of the targeted machines
    /// (rounded down). Beyond it the rollout stops (see onFailure). `failureBudget` is the older spelling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_count_or_percent_schema")]
    pub max_failures: Option<IntOrString>,
    /// What a rollout over a failure budget does: Halt (no new jobs until a new commit or a resume), or
    /// RollbackAndHalt (also return the failing wave's machines to the last commit the whole fleet ran).
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Limits on machines under an operation at once that hold across every configuration and cluster naming
    /// the same budget: executors take a slot of the budget (in NATS KV, beside the machine locks) before they
    /// touch a machine, whoever published the job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub disruption_budgets: Vec<DisruptionBudget>,
}

/// "At most N (or N %) of these machines at once", or "one machine per rack".
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudget {
    /// The budget's name (a DNS label): configurations and clusters naming the same budget share it.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The machines it covers, by label (unset: every machine of this configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "wave_selector_schema")]
    pub selector: Option<LabelSelector>,
    /// A label whose every value is a budget of its own, e.g. `rack`: at most maxUnavailable per rack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub per_label: Option<String>,
    /// Most covered machines under an operation at once: a number, or a percentage of the covered machines of
    /// this configuration (rounded down, at least 1).
    #[schemars(schema_with = "count_or_percent_schema")]
    pub max_unavailable: IntOrString,
}

/// What NIO does about a machine that drifted from the system it applied.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum DriftPolicy {
    #[default]
    Report,
    Enforce,
}

/// What a rollout over its failure budget does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum OnFailure {
    #[default]
    Halt,
    RollbackAndHalt,
}

/// One wave of a rollout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct WaveSpec {
    /// Unique within the configuration (a DNS label); shown in status and named to approve a pause.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The machines of this wave, by label (among those not taken by an earlier wave).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "wave_selector_schema")]
    pub selector: Option<LabelSelector>,
    /// How many machines: a number, or a percentage of the targeted machines (rounded up, at least 1). With a
    /// selector: at most this many of those it matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_count_or_percent_schema")]
    pub count: Option<IntOrString>,
    /// Most machines of the wave updating at once: a number or a percentage of the wave (rounded down, at
    /// least 1). Unset: no limit beyond maxParallel and the site limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_count_or_percent_schema")]
    pub max_unavailable: Option<IntOrString>,
    /// Failed machines the wave tolerates: a number or a percentage of the wave (rounded down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_count_or_percent_schema")]
    pub max_failures: Option<IntOrString>,
    /// How long the wave must run the commit (e.g. `10m`) before the next one starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub soak: Option<String>,
    /// Wait for a person after the wave (and its soak): approve with the annotation
    /// `nixos.infra/approve: <wave>@<first 12 characters of the target commit>`.
    #[serde(default)]
    pub pause: bool,
    /// A fleet-level health gate during the soak: a PromQL query against the controller's Prometheus
    /// (`--prometheus-url`) that must hold; a failing analysis fails the wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<WaveAnalysis>,
}

/// A PromQL query run while a wave soaks (as Argo Rollouts' AnalysisTemplate).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WaveAnalysis {
    /// An instant query, e.g. `sum(rate(http_requests_total{code=~"5.."}[5m])) / sum(rate(http_requests_total[5m]))`.
    #[schemars(length(min = 1, max = 2048))]
    pub query: String,
    /// What every sample of the result must meet: `result` compared with a number, e.g. `result < 0.05`. An
    /// empty result is a failed measurement.
    #[schemars(length(max = 64), pattern(r"^\s*result\s*(<=|>=|==|!=|<|>)\s*-?[0-9]+(\.[0-9]+)?\s*$"))]
    pub success_condition: String,
    /// How often to measure during the soak, e.g. `30s` (default 30s, at least 1s). The soak ends only after
    /// at least one measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub interval: Option<String>,
    /// Failed measurements tolerated before the wave fails (default 0).
    #[serde(default)]
    #[schemars(range(max = 100))]
    pub failure_limit: u32,
}

/// Check run on the machine after activation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// Whether to run a health check at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Command as an argument vector, run as root; empty means: no failed systemd units (`systemctl list-units
    /// --state=failed`) other than `allowedFailedUnits`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub command: Vec<String>,
    /// Units that may be failed without failing the default check (known-flaky units), e.g. "fwupd.service".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 256), pattern(r"^[A-Za-z0-9:_.@-]+$")))]
    pub allowed_failed_units: Vec<String>,
    /// Seconds to wait for the check before it counts as failed.
    #[serde(default = "default_health_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            enabled: true,
            command: Vec::new(),
            allowed_failed_units: Vec::new(),
            timeout_seconds: default_health_timeout(),
        }
    }
}

/// What to run where: a flake at a Git ref applied to one machine or a labelled fleet.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "nixos.infra",
    version = "v1alpha1",
    kind = "NixosConfiguration",
    plural = "nixosconfigurations",
    namespaced,
    status = "NixosConfigurationStatus",
    derive = "PartialEq",
    shortname = "nixconf",
    category = "nio",
    doc = "A NixOS flake configuration pinned to a Git commit and applied to machines by NIO.",
    printcolumn(name = "Ref", type_ = "string", json_path = ".spec.ref", description = "Git ref followed"),
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".status.targetCommitShort",
        description = "Commit the ref resolved to"
    ),
    printcolumn(
        name = "Updated",
        type_ = "string",
        json_path = ".status.progress",
        description = "Machines at the target commit / machines targeted"
    ),
    printcolumn(
        name = "Wave",
        type_ = "string",
        json_path = ".status.currentWave",
        description = "The wave rolling out now"
    ),
    printcolumn(
        name = "Rollout",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Progressing\")].reason",
        description = "What the rollout does or waits for (JobsInFlight, Soaking, AwaitingApproval, FailureBudgetExceeded, ...)"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Every targeted machine runs the target commit"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.machineRef) != has(self.machineSelector)")
    .message("exactly one of machineRef and machineSelector must be set"))]
pub struct NixosConfigurationSpec {
    /// Git repository holding the flake (https, http, ssh, git or file URL; no credentials in the URL).
    #[schemars(length(min = 1, max = 2048))]
    pub git_repo: String,
    /// Branch, tag or full 40-character commit SHA. A branch is re-resolved every pollInterval.
    #[serde(rename = "ref")]
    #[schemars(length(min = 1, max = 255))]
    pub git_ref: String,
    /// Secret in the same namespace with Git credentials: `token` or `username`/`password` (HTTPS basic),
    /// `ca.crt` (PEM CA of a private HTTPS server), or `ssh-privatekey` with `known_hosts` (required: the
    /// server's host keys) for ssh:// and `user@host:path` remotes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_ref: Option<String>,
    /// Flake output to build, as `#attr` or `.#attr` (attr under nixosConfigurations).
    #[schemars(length(min = 2, max = 256))]
    pub flake: String,
    /// Directory inside the repository that holds flake.nix (relative, no ".."; letters, digits and
    /// -._~!$&'()*+,;=:@/ only, as it becomes part of a flake URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), pattern(r"^[A-Za-z0-9._~!$&'()*+,;=:@/-]+$"))]
    pub configuration_subdir: Option<String>,
    /// Name of one Machine in the same namespace. Exactly one of machineRef and machineSelector is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub machine_ref: Option<String>,
    /// Label selector over Machines in the same namespace (fleet mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "machine_selector_schema")]
    pub machine_selector: Option<LabelSelector>,
    /// Install NixOS from scratch (kexec, disko, nixos-install) on machines never installed by NIO.
    /// Runs once per machine; later commits switch.
    #[serde(default)]
    pub full_install: bool,
    /// Flake output (`#attr`) applied to a machine when this configuration is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 256))]
    pub on_remove_flake: Option<String>,
    /// Extra files placed in the source tree or delivered as secrets, one per path (server-side apply merges
    /// them by path, so several managers can each own some).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["path"]))]
    pub additional_files: Vec<AdditionalFile>,
    /// What an update does (switch-to-configuration's action): switch, boot, test or dry-activate.
    #[serde(default)]
    pub action: RebuildAction,
    /// Rollout pacing across machines.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Health check after activation, over a new SSH connection (default: no failed systemd units).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Roll back when activation fails, the health check fails, or no new SSH connection confirms the
    /// activation within `confirmTimeoutSeconds`: the machine itself re-activates what ran before and restores
    /// the boot default, also when it lost its network.
    #[serde(default)]
    pub auto_rollback: bool,
    /// With autoRollback: how long the machine waits for the confirming SSH connection after switch/test before
    /// it rolls itself back. Once the confirmation is there, the health check's own timeout bounds the wait.
    #[serde(default = "default_confirm_timeout")]
    #[schemars(range(min = 5, max = 3600))]
    pub confirm_timeout_seconds: u32,
    /// How often the ref is re-resolved, e.g. "30s", "5m", "1h". Unset: the controller's --default-poll-interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(r"^([0-9]+(ms|s|m|h))+$"))]
    pub poll_interval: Option<String>,
    /// Stop publishing new jobs for this configuration.
    #[serde(default)]
    pub suspend: bool,
    /// What a probe finding a machine running another system than NIO applied does: Report (the Drifted
    /// condition, an Event, the machines_drifted metric) or Enforce (also apply the target again, within the
    /// rollout's limits).
    #[serde(default)]
    pub drift_policy: DriftPolicy,
}

/// Observed state of a NixosConfiguration. Defaults to `{observedGeneration: 0}`, so GitOps tools read a new
/// configuration as in progress until NIO has looked at it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("default" = {"observedGeneration": 0}))]
pub struct NixosConfigurationStatus {
    /// Commit that spec.ref resolved to on the last poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_commit: Option<String>,
    /// First 12 characters of targetCommit, for printer columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_commit_short: Option<String>,
    /// Commit that every targeted machine runs, once they all do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_commit: Option<String>,
    /// Machines targeted.
    #[serde(default)]
    pub total: u32,
    /// Targeted machines at the target commit.
    #[serde(default)]
    pub updated: u32,
    /// Targeted machines whose last job failed.
    #[serde(default)]
    pub failed: u32,
    /// Targeted machines queued or applying.
    #[serde(default)]
    pub in_progress: u32,
    /// "updated/total", for printer columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// When a machine last finished applying this configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_time: Option<Time>,
    /// Conditions (one per type): Ready, Progressing, Degraded, Invalid, and the kstatus conditions Reconciling
    /// and Stalled, present only while True.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Each wave of the rollout of `targetCommit` (one wave of every machine when the spec has none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub waves: Vec<WaveStatus>,
    /// The wave rolling out now (the first not yet Succeeded), for printer columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_wave: Option<String>,
    /// The target (`{commit}/{generation}...`) the waves describe; a new target starts them over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves_target: Option<String>,
    /// The `nixos.infra/refresh` annotation's value when the ref was last resolved: equal to the annotation once
    /// a refresh request (a person's or a push webhook's) has been acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_refresh: Option<String>,
    /// The `nixos.infra/resume` annotation's value when it was last acted on: a resume forgives the failures so
    /// far once; another one takes a new value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_resume: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Where a wave is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum WaveState {
    /// Waiting for the waves before it.
    #[default]
    Pending,
    /// Jobs running or to start.
    Progressing,
    /// Applied; running the commit for `soak` before the next wave.
    Soaking,
    /// Applied and soaked; waiting for approval.
    Paused,
    /// Done: the next wave may start.
    Succeeded,
    /// Over its failure budget: the rollout is halted.
    Failed,
}

impl WaveState {
    pub const ALL: [WaveState; 6] = [
        WaveState::Pending,
        WaveState::Progressing,
        WaveState::Soaking,
        WaveState::Paused,
        WaveState::Succeeded,
        WaveState::Failed,
    ];

    /// The state as written in status and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            WaveState::Pending => "Pending",
            WaveState::Progressing => "Progressing",
            WaveState::Soaking => "Soaking",
            WaveState::Paused => "Paused",
            WaveState::Succeeded => "Succeeded",
            WaveState::Failed => "Failed",
        }
    }
}

/// The state of one wave.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct WaveStatus {
    /// The wave's name in the spec (`all` when the spec has no waves).
    pub name: String,
    pub state: WaveState,
    /// Machines in the wave.
    pub total: u32,
    /// Machines of the wave at the target.
    pub updated: u32,
    /// Machines of the wave that failed at the target.
    pub failed: u32,
    /// Machines of the wave with a job queued or running.
    pub in_progress: u32,
    /// Failures forgiven by a resume (`nixos.infra/resume`): the wave's budget counts only the failures after it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub forgiven: u32,
    /// When its first job was published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When every machine of it had run the commit (or failed within its budget): the soak starts here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<Time>,
    /// When it Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// What it waits for, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Its analysis during the soak, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisStatus>,
}

/// Measurements of a wave's analysis.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisStatus {
    /// Measurements taken.
    pub runs: u32,
    /// Measurements that did not meet the condition (or could not be taken).
    pub failures: u32,
    /// When the last one was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_time: Option<Time>,
    /// What the last one found, e.g. `0.012 (result < 0.05: met)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<String>,
}

/// `machineSelector`'s schema: the upstream LabelSelector with the bounds and rules the apiserver then enforces
/// (operators, values only where the operator takes them, valid label keys and values). Without them an
/// unknown operator or a malformed key would be stored and select the wrong fleet. The bounds also keep the CEL
/// rules' estimated cost under the apiserver's limit.
fn machine_selector_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    bounded_selector_schema(generator, 32, 64)
}

/// A wave's selector: as [`machine_selector_schema`], with tighter bounds (up to 20 waves each have one, and
/// the apiserver prices the rules by the product of every enclosing list's bound).
/// A count or a percentage (`IntOrString`): 0 to 1,000,000, or "0%" to "100%". Unbounded, a number above
/// 2^31 would be stored and then fail to decode (the type holds an i32).
fn count_or_percent_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        "minimum": 0,
        "maximum": 1_000_000,
        "maxLength": 4,
        "pattern": "^(100|[1-9]?[0-9])%$",
    })
}

fn optional_count_or_percent_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = count_or_percent_schema(generator);
    schema.insert("nullable".into(), true.into());
    schema
}

fn wave_selector_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    bounded_selector_schema(generator, 8, 16)
}

/// A LabelSelector schema with CEL rules, at most `expressions` matchExpressions (and matchLabels) of at most
/// `values` values each.
fn bounded_selector_schema(
    generator: &mut schemars::SchemaGenerator,
    expressions: u32,
    values: u32,
) -> schemars::Schema {
    use schemars::JsonSchema;
    use serde_json::json;
    let mut schema = LabelSelector::json_schema(generator);
    let key_ok = "!format.qualifiedName().validate(self.key).hasValue()";
    let rules = json!({
        "matchExpressions": {
            "maxItems": expressions,
            "items": {
                "properties": {
                    "key": {"maxLength": 317},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"maxItems": values, "items": {"maxLength": 63}},
                },
                "x-kubernetes-validations": [
                    {"rule": key_ok, "message": "key must be a valid label key (an optional DNS prefix and '/', then a name of at most 63 characters)"},
                    {"rule": "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
                     "message": "In and NotIn need at least one value; Exists and DoesNotExist take none"},
                    {"rule": "!has(self.values) || self.values.all(v, !format.labelValue().validate(v).hasValue())",
                     "message": "values must be valid label values"},
                ],
            },
        },
        "matchLabels": {
            "maxProperties": expressions,
            "additionalProperties": {"maxLength": 63},
            "x-kubernetes-validations": [
                {"rule": "self.all(k, !format.qualifiedName().validate(k).hasValue() && !format.labelValue().validate(self[k]).hasValue())",
                 "message": "matchLabels must map valid label keys to valid label values"},
            ],
        },
    });
    merge_schema(schema.ensure_object(), &rules, "properties");
    schema.insert("nullable".into(), true.into());
    schema
}

/// Deep-merges `extra` into the object schema `into`: each key of `extra` names a property of `into`.
fn merge_schema(into: &mut serde_json::Map<String, serde_json::Value>, extra: &serde_json::Value, via: &str) {
    let Some(extra) = extra.as_object() else { return };
    let Some(target) = into.get_mut(via).and_then(serde_json::Value::as_object_mut) else { return };
    for (name, add) in extra {
        let Some(prop) = target.get_mut(name).and_then(serde_json::Value::as_object_mut) else { continue };
        merge_value(prop, add);
    }
}

fn merge_value(into: &mut serde_json::Map<String, serde_json::Value>, add: &serde_json::Value) {
    let Some(add) = add.as_object() else { return };
    for (k, v) in add {
        match (into.get_mut(k), v) {
            (Some(serde_json::Value::Object(existing)), serde_json::Value::Object(_)) if k != "enum" => {
                merge_value(existing, v)
            }
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Length of the commit prefix shown in printer columns.
pub const SHORT_COMMIT_LEN: usize = 12;

/// The printer-column form of a commit.
pub fn short_commit(commit: &str) -> String {
    commit.chars().take(SHORT_COMMIT_LEN).collect()
}

/// The committed CRD files (`crds/{file}`) and their generated YAML.
pub fn yaml_files() -> Result<Vec<(&'static str, String)>, serde_saphyr::SerializeError> {
    use kube::CustomResourceExt;
    const HEADER: &str = "# Generated from shared/src/crd.rs by `make crds`; do not edit by hand.\n";
    Ok(vec![
        ("machine.yaml", format!("{HEADER}{}", serde_saphyr::to_string(&Machine::crd())?)),
        ("nixosconfiguration.yaml", format!("{HEADER}{}", serde_saphyr::to_string(&NixosConfiguration::crd())?)),
    ])
}
