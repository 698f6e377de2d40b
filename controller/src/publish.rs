//! Building jobs from resources and publishing them on `NIO_JOBS` with dedup ids and trace context.

use async_nats::jetstream;
use bytes::Bytes;
use chrono::Utc;
use kube::ResourceExt;
use nio_shared::crd::{Machine, NixosConfiguration};
use nio_shared::protocol::{Action, Endpoint, FileContent, FileEntry, JOB_VERSION, Job, JobId, SecretFile, Source};
use nio_shared::seal::SealKey;
use nio_shared::validate;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::metrics::{Metrics, PublishLabels};
use crate::rollout::Work;

/// What a configuration wants on its machines right now.
#[derive(Debug, Clone)]
pub struct Desired {
    pub commit: String,
    pub generation: i64,
    /// What of the spec decides what a machine runs ([`deployed_spec`]).
    pub spec: String,
    /// SecretRef file contents by path (plaintext in memory only; sealed per machine).
    pub secrets: Vec<(String, Vec<u8>)>,
    pub secrets_hash: Option<String>,
}

impl Desired {
    /// `{commit}/{spec}[.{secretsHash8}]`: what a machine must have applied to be up to date.
    pub fn target(&self) -> String {
        match &self.secrets_hash {
            Some(h) => format!("{}/{}.{}", self.commit, self.spec, &h[..h.len().min(8)]),
            None => format!("{}/{}", self.commit, self.spec),
        }
    }
}

/// The part of a configuration's spec that decides what its machines run, hashed (8 hex digits): the repository,
/// flake attribute, subdirectory, action and additional files (Secrets' contents count through the secrets
/// hash). Nothing else: pausing, suspending or resuming a rollout, or changing its limits, waves, health check or
/// poll interval, is the same target, so it neither sends every machine a job again nor starts the rollout's
/// waves, and the halt and failures they record, over.
pub fn deployed_spec(spec: &nio_shared::crd::NixosConfigurationSpec) -> String {
    use sha2::Digest;
    let what = (&spec.git_repo, &spec.flake, &spec.configuration_subdir, spec.action, &spec.additional_files);
    let bytes = serde_json::to_vec(&what).unwrap_or_default();
    sha2::Sha256::digest(&bytes).iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// Job timeout for updates and removals.
const UPDATE_TIMEOUT: u64 = 3600;
/// Job timeout for full installs.
const INSTALL_TIMEOUT: u64 = 7200;
/// Job timeout for probes and scans.
const PROBE_TIMEOUT: u64 = 120;

/// How to reach `m`: its IP address (else host name), port, user, identity and pinned host key.
fn endpoint(m: &Machine) -> Endpoint {
    let host_key = m.spec.host_key.clone().or_else(|| m.status.as_ref().and_then(|s| s.host_key.clone()));
    Endpoint {
        host: m.spec.ip_address.clone().unwrap_or_else(|| m.spec.hostname.clone()),
        port: m.spec.port,
        user: m.spec.ssh_user.clone(),
        identity: m.spec.credential_ref.clone(),
        host_key,
    }
}

fn meta(m: &Machine) -> (String, String) {
    (m.metadata.namespace.clone().unwrap_or_default(), m.metadata.name.clone().unwrap_or_default())
}

/// The job bringing `m` to `desired` for configuration `cfg`.
pub fn apply_job(
    cluster: &str,
    cfg: &NixosConfiguration,
    m: &Machine,
    desired: &Desired,
    work: Work,
    seal: Option<&SealKey>,
) -> Result<Job> {
    let (ns, name) = meta(m);
    let action = match work {
        Work::Install => Action::Install,
        Work::Update => Action::from(cfg.spec.action),
    };
    let attr = validate::flake_attr("spec.flake", &cfg.spec.flake).map_err(nio_shared::validate::Invalid::from)?;
    let mut files = Vec::new();
    for f in &cfg.spec.additional_files {
        match f.value_type {
            nio_shared::crd::FileValueType::Inline => files.push(FileEntry {
                path: f.path.clone(),
                content: FileContent::Inline { content: f.inline.clone().unwrap_or_default() },
            }),
            nio_shared::crd::FileValueType::NixosFacter => {
                files.push(FileEntry { path: f.path.clone(), content: FileContent::NixosFacter })
            }
            nio_shared::crd::FileValueType::SecretRef => {}
        }
    }
    let mut secrets = Vec::new();
    if !desired.secrets.is_empty() {
        let key = seal.ok_or_else(|| Error::NoSealKey {
            namespace: ns.clone(),
            configuration: cfg.metadata.name.clone().unwrap_or_default(),
        })?;
        for (path, content) in &desired.secrets {
            let context = SecretFile::seal_context(cluster, &ns, &name, path);
            let file = cfg.spec.additional_files.iter().find(|f| &f.path == path);
            secrets.push(SecretFile {
                path: path.clone(),
                sealed: key.seal(content, &context)?,
                owner: file.and_then(|f| f.owner.clone()),
                group: file.and_then(|f| f.group.clone()),
                mode: file.and_then(|f| f.mode.clone()),
            });
        }
    }
    Ok(Job {
        v: JOB_VERSION,
        id: JobId::new(cluster, &ns, &name, &desired.target(), action).retry(transition(m, &cfg.name_any())),
        cluster: cluster.to_string(),
        namespace: ns,
        machine: name,
        configuration: cfg.metadata.name.clone(),
        generation: desired.generation,
        site: m.spec.site.clone(),
        endpoint: endpoint(m),
        source: Some(Source {
            repo: cfg.spec.git_repo.clone(),
            commit: desired.commit.clone(),
            subdir: cfg.spec.configuration_subdir.clone(),
            flake_attr: attr.to_string(),
            credentials: cfg.spec.credentials_ref.clone(),
        }),
        action,
        files,
        secrets,
        secrets_hash: desired.secrets_hash.clone(),
        health_check: cfg.spec.health_check.clone(),
        rollback: cfg.spec.auto_rollback,
        confirm_timeout_seconds: cfg.spec.confirm_timeout_seconds,
        budgets: vec![],
        timeout_seconds: if action == Action::Install { INSTALL_TIMEOUT } else { UPDATE_TIMEOUT },
        enqueued_at: Utc::now(),
    })
}

/// The job applying `onRemoveFlake` when `cfg` is deleted.
pub fn remove_job(cluster: &str, cfg: &NixosConfiguration, m: &Machine, commit: &str) -> Result<Job> {
    let flake = cfg.spec.on_remove_flake.clone().unwrap_or_default();
    let attr = validate::flake_attr("spec.onRemoveFlake", &flake).map_err(nio_shared::validate::Invalid::from)?;
    let (ns, name) = meta(m);
    let generation = cfg.metadata.generation.unwrap_or(0);
    Ok(Job {
        v: JOB_VERSION,
        id: JobId::new(cluster, &ns, &name, &format!("{commit}/{generation}"), Action::Remove),
        cluster: cluster.to_string(),
        namespace: ns,
        machine: name,
        configuration: cfg.metadata.name.clone(),
        generation,
        site: m.spec.site.clone(),
        endpoint: endpoint(m),
        source: Some(Source {
            repo: cfg.spec.git_repo.clone(),
            commit: commit.to_string(),
            subdir: cfg.spec.configuration_subdir.clone(),
            flake_attr: attr.to_string(),
            credentials: cfg.spec.credentials_ref.clone(),
        }),
        action: Action::Remove,
        files: vec![],
        secrets: vec![],
        secrets_hash: None,
        health_check: None,
        rollback: false,
        confirm_timeout_seconds: 30,
        budgets: vec![],
        timeout_seconds: UPDATE_TIMEOUT,
        enqueued_at: Utc::now(),
    })
}

/// A probe (reachability, version, current system) or scan (plus hardware facts) of `m`.
pub fn probe_job(cluster: &str, m: &Machine, action: Action) -> Job {
    let (ns, name) = meta(m);
    let now = Utc::now();
    Job {
        v: JOB_VERSION,
        id: JobId::probe(cluster, &ns, &name, now.timestamp(), action),
        cluster: cluster.to_string(),
        namespace: ns,
        machine: name,
        configuration: None,
        generation: m.metadata.generation.unwrap_or(0),
        site: m.spec.site.clone(),
        endpoint: endpoint(m),
        source: None,
        action,
        files: vec![],
        secrets: vec![],
        secrets_hash: None,
        health_check: None,
        rollback: false,
        confirm_timeout_seconds: 30,
        budgets: vec![],
        timeout_seconds: PROBE_TIMEOUT,
        enqueued_at: now,
    }
}

/// Which move a job makes: this Machine (its uid) from what it last applied, for `configuration` (two
/// configurations at the same commit and generation have the same target). Part of the job's id, so that
/// republishing the same move stays harmless (the queue drops it as a duplicate), while the same target as a
/// new move is a new job: a Machine deleted and created again, a rollback to the commit of a few minutes ago, a
/// branch pushed back. With the target alone, the queue dropped those as duplicates for 5 minutes after the
/// first, and the machine waited Queued for good.
/// (The same in every build and replica: a leader change must not turn a republish into a second job.)
fn transition(m: &Machine, configuration: &str) -> i64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(m.metadata.uid.as_deref().unwrap_or_default());
    h.update([0]);
    h.update(configuration);
    h.update([0]);
    h.update(m.status.as_ref().and_then(|s| s.applied_target.as_deref()).unwrap_or_default());
    // A job set aside (withdrawn from the queue, or failed and retried after a spec change) left its id in the
    // duplicate window: the same move published again is a new job.
    if let Some(w) = m.status.as_ref().and_then(|s| s.superseded_job_id.as_deref()) {
        h.update([0]);
        h.update(w);
    }
    let d = h.finalize();
    i64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]]))
}

/// Publishes jobs (one message per machine and kind; the dedup id makes republishing harmless).
pub struct Publisher {
    pub js: jetstream::Context,
    pub metrics: std::sync::Arc<Metrics>,
}

impl Publisher {
    /// Removes the apply job queued for machine `machine` of `namespace` (on any site's subject), if no
    /// executor took it yet; how many messages were removed. A job an executor holds is not stopped by this.
    pub async fn withdraw(&self, cluster: &str, namespace: &str, machine: &str) -> Result<u64> {
        use nio_shared::subjects::token;
        let filter = format!(
            "{}.*.{}.{}.{}.{}",
            nio_shared::subjects::JOBS_PREFIX,
            nio_shared::subjects::JobKind::Apply.as_str(),
            token(cluster),
            token(namespace),
            token(machine)
        );
        let stream = self
            .js
            .get_stream_no_info(nio_shared::subjects::JOBS_STREAM)
            .await
            .map_err(|e| Error::Withdraw(e.to_string()))?;
        let purged = stream.purge().filter(filter).await.map_err(|e| Error::Withdraw(e.to_string()))?;
        Ok(purged.purged)
    }

    pub async fn publish(&self, job: &Job) -> Result<()> {
        let subject = job.subject();
        let span = tracing::info_span!(
            "job.publish",
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.destination.name = %subject,
            nio.site = %job.site,
            nio.action = job.action.as_str(),
            nio.cluster = %job.cluster,
            nio.commit = job.source.as_ref().map(|s| s.commit.as_str()).unwrap_or(""),
        );
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", job.id.as_str());
        {
            let _e = span.enter();
            nio_shared::telemetry::inject(&mut headers);
        }
        let ack = async {
            let ack = self.js.publish_with_headers(subject, headers, Bytes::from(job.encode())).await?;
            Ok::<_, Error>(ack.await?)
        }
        .instrument(span)
        .await?;
        // (a duplicate is harmless, the queue holds the job once, but it is not a job published)
        let counter = if ack.duplicate { &self.metrics.jobs_duplicate } else { &self.metrics.jobs_published };
        counter.get_or_create(&PublishLabels { site: job.site.clone(), action: job.action.as_str().into() }).inc();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job published twice is on the queue once, and the metrics say so: one published, one duplicate.
    #[tokio::test]
    async fn a_job_published_again_counts_as_a_duplicate_not_a_second_job() {
        let nats = nio_loadtest::nats::NatsServer::start().await.expect("nats-server");
        let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
        nio_shared::nats::ensure_streams(&js, 1).await.expect("streams");
        let metrics = std::sync::Arc::new(Metrics::new("c1"));
        let publisher = Publisher { js: js.clone(), metrics: metrics.clone() };
        let spec = serde_json::from_value(serde_json::json!({"hostname": "m1", "site": "dc1"})).expect("spec");
        let mut m = Machine::new("m1", spec);
        m.metadata.namespace = Some("default".into());
        let job = probe_job("c1", &m, Action::Probe);
        publisher.publish(&job).await.expect("first");
        publisher.publish(&job).await.expect("again");
        let labels = PublishLabels { site: "dc1".into(), action: "probe".into() };
        let count = |f: &prometheus_client::metrics::family::Family<
            PublishLabels,
            prometheus_client::metrics::counter::Counter,
        >| { f.get_or_create(&labels).get() };
        assert_eq!((count(&metrics.jobs_published), count(&metrics.jobs_duplicate)), (1, 1));
        let mut stream = js.get_stream(nio_shared::subjects::JOBS_STREAM).await.expect("stream");
        assert_eq!(stream.info().await.expect("info").state.messages, 1);
    }

    /// Holding, resuming or tuning a rollout is the same target; what the machines run is not.
    #[test]
    fn only_what_machines_run_changes_the_target() {
        let spec = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"gitRepo": "https://example.org/fleet.git", "ref": "main", "flake": "#web",
                                           "machineSelector": {"matchLabels": {"role": "web"}}});
            for (k, x) in extra.as_object().into_iter().flatten() {
                v[k] = x.clone();
            }
            deployed_spec(&serde_json::from_value(v).expect("a spec"))
        };
        let base = spec(serde_json::json!({}));
        for same in [
            serde_json::json!({"rollout": {"pause": true}}),
            serde_json::json!({"suspend": true}),
            serde_json::json!({"rollout": {"maxParallel": 3, "waves": [{"name": "a", "count": 1}]}}),
            serde_json::json!({"pollInterval": "1h", "autoRollback": true, "ref": "release"}),
        ] {
            assert_eq!(spec(same.clone()), base, "{same}");
        }
        for other in [
            serde_json::json!({"flake": "#db"}),
            serde_json::json!({"action": "boot"}),
            serde_json::json!({"configurationSubdir": "hosts"}),
            serde_json::json!({"additionalFiles": [{"path": "motd", "valueType": "Inline", "inline": "hi"}]}),
        ] {
            assert_ne!(spec(other.clone()), base, "{other}");
        }
        assert_eq!(base.len(), 8);
    }
}
