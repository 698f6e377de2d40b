//! NATS names: subjects, streams, consumers and lock keys (docs/design.md §3).
//!
//! Subject tokens are Kubernetes names with `.` replaced by `_`; Kubernetes names never contain `_`, so the
//! mapping is reversible.

use serde::{Deserialize, Serialize};

/// Subject kind of a job; each kind has its own one-message-per-machine slot in the stream.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Apply,
    Probe,
}

impl JobKind {
    /// Subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Apply => "apply",
            JobKind::Probe => "probe",
        }
    }
}

/// Stream of rebuild jobs (work queue, one message per machine and kind).
pub const JOBS_STREAM: &str = "NIO_JOBS";
/// Stream of status events (work queue, one durable consumer per cluster).
pub const STATUS_STREAM: &str = "NIO_STATUS";
/// KV bucket of per-machine locks.
pub const LOCKS_BUCKET: &str = "NIO_LOCKS";
/// KV bucket of disruption-budget slots: `{budget key}.{slot}`, held like machine locks.
pub const BUDGETS_BUCKET: &str = "NIO_BUDGETS";
/// KV bucket of executor heartbeats: a key per running executor process, gone a few seconds after it dies.
pub const EXECUTORS_BUCKET: &str = "NIO_EXECUTORS";
/// Prefix of every job subject.
pub const JOBS_PREFIX: &str = "nio.jobs";
/// Prefix of every status subject.
pub const STATUS_PREFIX: &str = "nio.status";

/// A Kubernetes name as a subject token (`.` → `_`).
pub fn token(name: &str) -> String {
    name.replace('.', "_")
}

/// The inverse of [`token`].
pub fn untoken(token: &str) -> String {
    token.replace('_', ".")
}

/// Subject of a job: `nio.jobs.{site}.{kind}.{cluster}.{namespace}.{machine}`.
pub fn job_subject(site: &str, kind: JobKind, cluster: &str, namespace: &str, machine: &str) -> String {
    format!(
        "{JOBS_PREFIX}.{}.{}.{}.{}.{}",
        token(site),
        kind.as_str(),
        token(cluster),
        token(namespace),
        token(machine)
    )
}

/// Filter of one site's jobs: `nio.jobs.{site}.>`.
pub fn site_jobs_filter(site: &str) -> String {
    format!("{JOBS_PREFIX}.{}.>", token(site))
}

/// Durable consumer name of one site's jobs (shared by every executor).
pub fn site_consumer(site: &str) -> String {
    format!("site-{}", token(site))
}

/// Subject of a status event: `nio.status.{cluster}.{namespace}.{machine}`.
pub fn status_subject(cluster: &str, namespace: &str, machine: &str) -> String {
    format!("{STATUS_PREFIX}.{}.{}.{}", token(cluster), token(namespace), token(machine))
}

/// A status subject taken apart: (cluster, namespace, machine).
pub fn parse_status_subject(subject: &str) -> Option<(String, String, String)> {
    let rest = subject.strip_prefix(STATUS_PREFIX)?.strip_prefix('.')?;
    let parts: Vec<&str> = rest.split('.').collect();
    let [cluster, namespace, machine] = parts.as_slice() else {
        return None;
    };
    Some((untoken(cluster), untoken(namespace), untoken(machine)))
}

/// Filter of one cluster's status events: `nio.status.{cluster}.>`.
pub fn cluster_status_filter(cluster: &str) -> String {
    format!("{STATUS_PREFIX}.{}.>", token(cluster))
}

/// Durable consumer name of one cluster's status events.
pub fn status_consumer(cluster: &str) -> String {
    format!("controller-{}", token(cluster))
}

/// Lock key of a machine endpoint: `{host}_{port}` (`:` of IPv6 addresses becomes `-`, which KV keys allow).
pub fn lock_key(host: &str, port: u16) -> String {
    format!("{}_{port}", host.replace(':', "-"))
}

/// A job subject taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSubject {
    pub site: String,
    pub kind: JobKind,
    pub cluster: String,
    pub namespace: String,
    pub machine: String,
}

/// Parses a job subject, so a job whose body cannot be decoded can still be reported against its machine.
pub fn parse_job_subject(subject: &str) -> Option<JobSubject> {
    let rest = subject.strip_prefix(JOBS_PREFIX)?.strip_prefix('.')?;
    let parts: Vec<&str> = rest.split('.').collect();
    let [site, kind, cluster, namespace, machine] = parts.as_slice() else {
        return None;
    };
    let kind = match *kind {
        "apply" => JobKind::Apply,
        "probe" => JobKind::Probe,
        _ => return None,
    };
    Some(JobSubject {
        site: untoken(site),
        kind,
        cluster: untoken(cluster),
        namespace: untoken(namespace),
        machine: untoken(machine),
    })
}
