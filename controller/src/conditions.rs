//! metav1.Condition helpers, and the Events that report condition changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A Kubernetes Event to record about the object whose status changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

pub fn note(warning: bool, reason: &str, message: String) -> Note {
    Note { warning, reason: reason.to_string(), message }
}

/// The condition types NIO sets. NixosConfiguration: Ready, Progressing, Degraded, Invalid. Machine: Ready,
/// Invalid, Failed, Drifted, HostKeyMismatch, Waiting. Both: Reconciling and Stalled (kstatus, see `kstatus.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Ready,
    Progressing,
    Degraded,
    Invalid,
    Failed,
    Drifted,
    HostKeyMismatch,
    Reconciling,
    Stalled,
    Waiting,
}

impl Type {
    pub fn as_str(self) -> &'static str {
        match self {
            Type::Ready => "Ready",
            Type::Progressing => "Progressing",
            Type::Degraded => "Degraded",
            Type::Invalid => "Invalid",
            Type::Failed => "Failed",
            Type::Drifted => "Drifted",
            Type::HostKeyMismatch => "HostKeyMismatch",
            Type::Reconciling => "Reconciling",
            Type::Stalled => "Stalled",
            Type::Waiting => "Waiting",
        }
    }
}

/// Sets condition `type_`, keeping its lastTransitionTime when the status does not change.
pub fn set(
    conds: &mut Vec<Condition>,
    type_: Type,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let now = time(chrono::Utc::now());
    let type_ = type_.as_str();
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.observed_generation = generation;
        }
        None => conds.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message: message.to_string(),
            observed_generation: generation,
            last_transition_time: now,
        }),
    }
}

/// Whether condition `type_` is True.
pub fn is_true(conds: &[Condition], type_: Type) -> bool {
    conds.iter().any(|c| c.type_ == type_.as_str() && c.status == "True")
}

/// The message of condition `type_`, if present.
pub fn message(conds: &[Condition], type_: Type) -> Option<&str> {
    conds.iter().find(|c| c.type_ == type_.as_str()).map(|c| c.message.as_str())
}

/// A Kubernetes timestamp from a chrono one.
pub fn time(t: chrono::DateTime<chrono::Utc>) -> Time {
    let nanos = t.timestamp_nanos_opt().unwrap_or_default();
    Time(
        k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(nanos))
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// A chrono timestamp from a Kubernetes one.
pub fn chrono_of(t: &k8s_openapi::jiff::Timestamp) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_nanos(i64::try_from(t.as_nanosecond()).unwrap_or_default())
}
