//! The executor's configuration file: sites and their limits, and queue defaults.

use serde::{Deserialize, Serialize};

use crate::validate::{Invalid, ValidationError};

/// Limits of one site. The broker enforces `max_in_flight` across every executor (it is the site consumer's
/// `max_ack_pending`); each executor paces new SSH sessions with `connect_rate` and `burst`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SiteLimits {
    /// Site name, as in Machine spec.site.
    pub name: String,
    /// Most jobs of this site in flight at once, across all executors.
    pub max_in_flight: u32,
    /// New SSH sessions per second per executor.
    #[serde(default = "default_connect_rate")]
    pub connect_rate: f64,
    /// Sessions that may start at once before connectRate applies.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_connect_rate() -> f64 {
    20.0
}
fn default_burst() -> u32 {
    10
}
fn default_ack_wait() -> u64 {
    10
}
fn default_max_deliver() -> i64 {
    5
}
fn default_backoff() -> Vec<u64> {
    vec![5, 15, 60]
}
fn default_job_timeout() -> u64 {
    3600
}
fn default_stream_replicas() -> usize {
    1
}
fn default_lock_ttl() -> u64 {
    60
}

/// Where NIO keeps its files on machines. The fleet simulator and tests use the defaults or their own roots.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RemotePaths {
    /// Source trees (`{stateDir}/src/{commit}`) and the applied-commit marker.
    pub state_dir: String,
    /// Secrets (directory mode 0700), outside the Nix store, persisted so they survive a reboot.
    pub secrets_dir: String,
    /// Symlink to the running system.
    pub current_system: String,
    /// Symlink to the system the machine booted.
    pub booted_system: String,
    /// Symlink to the boot-default system profile.
    pub system_profile: String,
}

impl Default for RemotePaths {
    fn default() -> Self {
        RemotePaths {
            state_dir: "/var/lib/nio".into(),
            secrets_dir: "/var/lib/nio/secrets".into(),
            current_system: "/run/current-system".into(),
            booted_system: "/run/booted-system".into(),
            system_profile: "/nix/var/nix/profiles/system".into(),
        }
    }
}

/// Executor configuration file (`--config`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecutorConfig {
    /// Sites this executor serves.
    pub sites: Vec<SiteLimits>,
    /// Seconds before an unacknowledged job is redelivered: how long the jobs of an executor that died stay with
    /// it. Running jobs are kept by progress acks every third of it, so it can be short.
    #[serde(default = "default_ack_wait")]
    pub ack_wait_seconds: u64,
    /// Deliveries of one job before it is given up.
    #[serde(default = "default_max_deliver")]
    pub max_deliver: i64,
    /// Redelivery delays in seconds after transient failures, the last one repeating.
    #[serde(default = "default_backoff")]
    pub backoff_seconds: Vec<u64>,
    /// Default job timeout in seconds, when the job does not carry one.
    #[serde(default = "default_job_timeout")]
    pub job_timeout_seconds: u64,
    /// Seconds a machine lock outlives its holder's last refresh (an executor that died frees its machines
    /// after this). Fixed when the lock bucket is created.
    #[serde(default = "default_lock_ttl")]
    pub lock_ttl_seconds: u64,
    /// Replicas of the NIO_JOBS and NIO_STATUS streams and the NIO_LOCKS bucket when this executor is the one
    /// that creates them: 1 on a single NATS server, 3 on a cluster (as the controller's `--jobs-replicas`).
    #[serde(default = "default_stream_replicas")]
    pub stream_replicas: usize,
    /// Paths NIO uses on machines.
    #[serde(default)]
    pub remote: RemotePaths,
}

impl ExecutorConfig {
    /// Parses and validates a YAML configuration.
    pub fn from_yaml(text: &str) -> crate::Result<Self> {
        let cfg: ExecutorConfig = serde_saphyr::from_str(text)
            .map_err(|e| crate::Error::Config { path: "<yaml>".into(), message: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &std::path::Path) -> crate::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::Error::Config { path: path.display().to_string(), message: e.to_string() })?;
        Self::from_yaml(&text).map_err(|e| match e {
            crate::Error::Config { message, .. } => crate::Error::Config { path: path.display().to_string(), message },
            other => other,
        })
    }

    /// Checks every site and default.
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut errors = Vec::new();
        if self.sites.is_empty() {
            errors.push(ValidationError { field: "sites".into(), rule: "at least one site is needed".into() });
        }
        if !(1..=5).contains(&self.stream_replicas) {
            errors.push(ValidationError {
                field: "streamReplicas".into(),
                rule: "must be 1 to 5 (JetStream's limit)".into(),
            });
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, s) in self.sites.iter().enumerate() {
            if let Err(e) = crate::validate::site_name(&format!("sites[{i}].name"), &s.name) {
                errors.push(e);
            }
            if !names.insert(s.name.as_str()) {
                errors.push(ValidationError { field: format!("sites[{i}].name"), rule: "site is listed twice".into() });
            }
            if s.max_in_flight == 0 {
                errors.push(ValidationError {
                    field: format!("sites[{i}].maxInFlight"),
                    rule: "must be at least 1".into(),
                });
            }
            if !(s.connect_rate.is_finite() && s.connect_rate > 0.0) {
                errors.push(ValidationError {
                    field: format!("sites[{i}].connectRate"),
                    rule: "must be a positive number".into(),
                });
            }
            if s.burst == 0 {
                errors.push(ValidationError { field: format!("sites[{i}].burst"), rule: "must be at least 1".into() });
            }
        }
        if self.ack_wait_seconds == 0 {
            errors.push(ValidationError { field: "ackWaitSeconds".into(), rule: "must be at least 1".into() });
        }
        for (field, p) in [
            ("remote.stateDir", &self.remote.state_dir),
            ("remote.secretsDir", &self.remote.secrets_dir),
            ("remote.currentSystem", &self.remote.current_system),
            ("remote.bootedSystem", &self.remote.booted_system),
            ("remote.systemProfile", &self.remote.system_profile),
        ] {
            if !p.starts_with('/') || p.split('/').any(|c| c == "..") || p.chars().any(char::is_control) {
                errors.push(ValidationError {
                    field: field.into(),
                    rule: "must be an absolute path without `..`".into(),
                });
            }
        }
        if self.lock_ttl_seconds < 3 {
            errors.push(ValidationError { field: "lockTtlSeconds".into(), rule: "must be at least 3".into() });
        }
        if self.max_deliver < 1 {
            errors.push(ValidationError { field: "maxDeliver".into(), rule: "must be at least 1".into() });
        }
        if errors.is_empty() { Ok(()) } else { Err(Invalid(errors)) }
    }
}
