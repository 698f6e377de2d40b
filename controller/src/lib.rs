//! nio-controller: turns Machines and NixosConfigurations into rebuild jobs and executor reports into status.
//!
//! - [`reconcile`]: NixosConfiguration reconcile and deletion; [`rollout`]: the pure planner.
//! - [`machine`]: Machine validation and probe scheduling; [`status`]: applying executor events.
//! - [`git`]: ref resolution; [`publish`]: job building and publishing; [`leader`]: leader election.
#![forbid(unsafe_code)]

pub mod conditions;
pub mod error;
pub mod git;
pub mod leader;
pub mod machine;
pub mod metrics;
pub mod publish;
pub mod reconcile;
pub mod rollout;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::{Controller, controller, watcher};
use nio_shared::crd::{Machine, MachinePhase, NixosConfiguration};
use tokio_util::sync::CancellationToken;

/// Everything `run` needs; the binary fills it from flags and environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub cluster: String,
    pub nats_url: String,
    pub nats_creds: Option<PathBuf>,
    /// Namespaces to watch; empty = all.
    pub namespaces: Vec<String>,
    pub seal_key_file: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    /// Serve /healthz and /readyz here too (when it differs from `metrics_addr`).
    pub health_addr: Option<SocketAddr>,
    pub leader_election: bool,
    pub lease_name: String,
    pub lease_namespace: String,
    pub lease_duration: Duration,
    pub identity: String,
    pub probe_interval: Duration,
    /// pollInterval of configurations that set none.
    pub default_poll_interval: Duration,
    pub jobs_replicas: usize,
    pub cache_dir: PathBuf,
    /// kube client configuration; None = from the environment (KUBECONFIG or in-cluster).
    pub kube_config: Option<kube::Config>,
}

/// Runs the controller until `shutdown`: as a candidate for the lease, as the leader (reconciling, publishing,
/// consuming status) while it holds it, and as a candidate again if it loses it.
pub async fn run(s: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut opts = async_nats::ConnectOptions::new().name(format!("nio-controller {} {}", s.cluster, s.identity));
    if let Some(c) = &s.nats_creds {
        opts = opts.credentials_file(c).await.with_context(|| format!("reading NATS credentials {}", c.display()))?;
    }
    let nats = opts.connect(&s.nats_url).await.with_context(|| format!("connecting to NATS at {}", s.nats_url))?;
    let js = async_nats::jetstream::new(nats);
    nio_shared::nats::ensure_streams(&js, s.jobs_replicas).await?;
    let client = match s.kube_config.clone() {
        Some(c) => kube::Client::try_from(c)?,
        None => kube::Client::try_default().await.context("connecting to Kubernetes")?,
    };
    let metrics = Arc::new(metrics::Metrics::new(&s.cluster));
    let health = Arc::new(Health::default());
    let probes = nio_shared::http::Probes {
        metrics: Arc::new({
            let m = metrics.clone();
            move || m.encode()
        }),
        ready: Arc::new({
            let h = health.clone();
            move || h.readiness()
        }),
    };
    nio_shared::http::serve(s.metrics_addr, s.health_addr, probes).await?;
    let seal = s.seal_key_file.as_deref().map(nio_shared::seal::SealKey::from_file).transpose()?;
    let ctx = Arc::new(reconcile::Ctx {
        client: client.clone(),
        cluster: s.cluster.clone(),
        publisher: publish::Publisher { js: js.clone(), metrics: metrics.clone() },
        seal,
        resolver: git::Resolver::new(s.cache_dir.join("git"), Duration::from_secs(2)),
        recorder: kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter { controller: "nio-controller".into(), instance: Some(s.identity.clone()) },
        ),
        metrics: metrics.clone(),
        probe_interval: s.probe_interval,
        default_poll: s.default_poll_interval,
        written: Default::default(),
    });

    let elector = s.leader_election.then(|| {
        let timing = leader::Timing::for_lease(s.lease_duration);
        leader::Elector::new(client.clone(), &s.lease_namespace, &s.lease_name, &s.identity, timing)
    });
    // A standby is ready (healthy, able to take over): readiness never depends on leadership, or a rolling
    // update would wait forever for a new replica that cannot lead while the old one holds the lease.
    health.started.store(true, Ordering::SeqCst);
    loop {
        if let Some(e) = &elector {
            tracing::info!(identity = %s.identity, lease = %s.lease_name, "waiting to become the leader");
            if !e.acquire(&shutdown).await {
                return Ok(());
            }
            tracing::info!(identity = %s.identity, "leading");
        }
        health.leading.store(true, Ordering::SeqCst);
        metrics.leader.set(1);
        match lead(&s, &ctx, &js, &client, &metrics, &health, elector.as_ref(), &shutdown).await? {
            leader::TermEnd::Stopped => {
                if let Some(e) = &elector {
                    e.release().await;
                }
                return Ok(());
            }
            leader::TermEnd::Lost => {
                tracing::warn!(identity = %s.identity, "lost leadership; standing by to lead again");
            }
        }
    }
}

/// What `/readyz` reports: the process is up, and (while leading) its watches can list.
#[derive(Debug, Default)]
pub struct Health {
    started: AtomicBool,
    leading: AtomicBool,
    /// Kinds whose watch last failed (cleared when that controller next reconciles).
    failing_watches: std::sync::Mutex<std::collections::BTreeSet<&'static str>>,
}

impl Health {
    fn readiness(&self) -> (bool, String) {
        if !self.started.load(Ordering::SeqCst) {
            return (false, "starting".into());
        }
        let failing = self.failing_watches.lock().map(|f| f.iter().copied().collect::<Vec<_>>()).unwrap_or_default();
        if self.leading.load(Ordering::SeqCst) && !failing.is_empty() {
            return (false, format!("leading; cannot watch {}", failing.join(", ")));
        }
        (true, if self.leading.load(Ordering::SeqCst) { "leading".into() } else { "standby".into() })
    }

    fn watch_result<T, E: std::fmt::Display>(
        &self,
        kind: &'static str,
        metrics: &metrics::Metrics,
        r: &Result<T, controller::Error<E, watcher::Error>>,
    ) {
        let Ok(mut failing) = self.failing_watches.lock() else { return };
        match r {
            Err(controller::Error::QueueError(e)) => {
                if failing.insert(kind) {
                    // The error text only: kube's own log line carries the whole response body.
                    tracing::error!(kind, error = %e, "watch failed; /readyz reports it until the watch recovers");
                }
                metrics.watch_errors.get_or_create(&metrics::KindLabel { kind: kind.into() }).inc();
            }
            _ => {
                failing.remove(kind);
            }
        }
    }
}

/// One term as leader: runs the controllers, the status consumer and the gauges until the lease is lost or
/// `shutdown`.
#[allow(clippy::too_many_arguments)]
async fn lead(
    s: &Settings,
    ctx: &Arc<reconcile::Ctx>,
    js: &async_nats::jetstream::Context,
    client: &kube::Client,
    metrics: &Arc<metrics::Metrics>,
    health: &Arc<Health>,
    elector: Option<&leader::Elector>,
    shutdown: &CancellationToken,
) -> anyhow::Result<leader::TermEnd> {
    let stop = CancellationToken::new();
    // Another replica may have written status while this one stood by.
    if let Ok(mut w) = ctx.written.lock() {
        w.clear();
    }
    let consumer = status::consumer::open(js, &s.cluster).await?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(status::consumer::run(ctx.clone(), consumer, stop.clone()));
    let (mut config_stores, mut machine_stores) = (Vec::new(), Vec::new());
    let secret_watch = watcher::Config::default().labels(&format!(
        "{}={}",
        nio_shared::crd::SECRET_OPT_IN_LABEL,
        nio_shared::crd::SECRET_OPT_IN_VALUE
    ));
    let scopes: Vec<Option<String>> =
        if s.namespaces.is_empty() { vec![None] } else { s.namespaces.iter().cloned().map(Some).collect() };
    for ns in scopes {
        let (configs, machines): (Api<NixosConfiguration>, Api<Machine>) = match &ns {
            Some(n) => (Api::namespaced(client.clone(), n), Api::namespaced(client.clone(), n)),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        // A short trailing debounce coalesces bursts of Machine updates without delaying a spec or refresh
        // change by much.
        let cfg_ctl = Controller::new(configs, watcher::Config::default())
            .with_config(controller::Config::default().debounce(Duration::from_millis(100)));
        let store = cfg_ctl.store();
        let cfg_ctl_store = store.clone();
        config_stores.push(store.clone());
        let secrets: Api<Secret> = match &ns {
            Some(n) => Api::namespaced(client.clone(), n),
            None => Api::all(client.clone()),
        };
        let cfg_ctl = cfg_ctl
            .watches(machines.clone(), watcher::Config::default(), move |m: Machine| {
                // A machine queued or applying changes nothing the configuration acts on (its own writes and
                // progress events); its end, a new machine, a label change or a deletion does.
                let busy = matches!(
                    m.status.as_ref().and_then(|s| s.phase),
                    Some(MachinePhase::Queued | MachinePhase::Applying)
                ) && m.metadata.deletion_timestamp.is_none();
                if busy {
                    return Vec::new();
                }
                // The configurations that select it now, and the one it last ran (its labels may have moved
                // it out of that one's selector).
                let applied = m.status.as_ref().and_then(|s| s.applied_configuration.clone());
                store
                    .state()
                    .into_iter()
                    .filter(|c| {
                        reconcile::targets(c, &m)
                            || (c.namespace() == m.namespace() && applied.as_deref() == c.metadata.name.as_deref())
                    })
                    .map(|c| kube::runtime::reflector::ObjectRef::from(&*c))
                    .collect::<Vec<_>>()
            })
            // A Secret a configuration reads changed (content, or its opt-in label): re-read it now, not at
            // the next poll. Only opted-in Secrets are watched; one losing the label shows as deleted.
            .watches(secrets, secret_watch.clone(), {
                let store = cfg_ctl_store.clone();
                move |secret: Secret| {
                    let (ns, name) = (secret.namespace(), secret.name_any());
                    store
                        .state()
                        .into_iter()
                        .filter(|c| c.namespace() == ns && reconcile::secrets_read(c).any(|s| s == name))
                        .map(|c| kube::runtime::reflector::ObjectRef::from(&*c))
                        .collect::<Vec<_>>()
                }
            })
            .graceful_shutdown_on({
                let stop = stop.clone();
                async move { stop.cancelled().await }
            })
            .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
            .for_each({
                let (health, metrics) = (health.clone(), metrics.clone());
                move |r| {
                    health.watch_result("NixosConfiguration", &metrics, &r);
                    async {}
                }
            });
        tasks.spawn(cfg_ctl);
        let m_ctl = Controller::new(machines, watcher::Config::default());
        machine_stores.push(m_ctl.store());
        let m_ctl = m_ctl
            .graceful_shutdown_on({
                let stop = stop.clone();
                async move { stop.cancelled().await }
            })
            .run(machine::reconcile, machine::error_policy, ctx.clone())
            .for_each({
                let (health, metrics) = (health.clone(), metrics.clone());
                move |r| {
                    health.watch_result("Machine", &metrics, &r);
                    async {}
                }
            });
        tasks.spawn(m_ctl);
    }
    tasks.spawn(phase_gauge(config_stores, machine_stores, ctx.clone(), stop.clone()));

    let end = match elector {
        Some(e) => e.hold(shutdown).await,
        None => {
            shutdown.cancelled().await;
            leader::TermEnd::Stopped
        }
    };
    // Stop acting before anything else: a replica that lost the lease must not publish.
    stop.cancel();
    health.leading.store(false, Ordering::SeqCst);
    metrics.leader.set(0);
    if tokio::time::timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!("controllers did not stop within 10 s; abandoning them");
        tasks.abort_all();
    }
    Ok(end)
}

/// Keeps `nio_controller_machines{phase}`, `machines_drifted` and `configurations_degraded{reason}` current,
/// from the controllers' caches (no API requests), for the namespaces this controller watches; forgets the
/// status written to deleted configurations.
async fn phase_gauge(
    configs: Vec<kube::runtime::reflector::Store<NixosConfiguration>>,
    machines: Vec<kube::runtime::reflector::Store<Machine>>,
    ctx: Arc<reconcile::Ctx>,
    stop: CancellationToken,
) {
    let metrics = ctx.metrics.clone();
    let mut reasons_seen = std::collections::BTreeSet::new();
    loop {
        // Forget the status written to configurations that are gone.
        let live: std::collections::HashSet<String> =
            configs.iter().flat_map(|s| s.state()).filter_map(|c| c.metadata.uid.clone()).collect();
        if let Ok(mut w) = ctx.written.lock() {
            w.retain(|uid, _| live.contains(uid));
        }
        let mut degraded: std::collections::BTreeMap<String, i64> =
            reasons_seen.iter().map(|r: &String| (r.clone(), 0)).collect();
        for c in configs.iter().flat_map(|s| s.state()) {
            let conds = c.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
            if let Some(d) = conds.iter().find(|d| d.type_ == "Degraded" && d.status == "True") {
                *degraded.entry(d.reason.clone()).or_default() += 1;
            }
        }
        for (reason, n) in degraded {
            metrics.configurations_degraded.get_or_create(&metrics::ReasonLabel { reason: reason.clone() }).set(n);
            reasons_seen.insert(reason);
        }
        let mut counts: std::collections::BTreeMap<String, i64> =
            ["Pending", "Queued", "Applying", "Applied", "Failed"].iter().map(|p| (p.to_string(), 0)).collect();
        let mut drifted = 0;
        for m in machines.iter().flat_map(|s| s.state()) {
            if m.status.as_ref().is_some_and(|s| conditions::is_true(&s.conditions, "Drifted")) {
                drifted += 1;
            }
            let phase = m.status.as_ref().and_then(|s| s.phase).map_or("Pending".to_string(), |p| format!("{p:?}"));
            *counts.entry(phase).or_default() += 1;
        }
        for (phase, n) in counts {
            metrics.machines.get_or_create(&metrics::PhaseLabel { phase }).set(n);
        }
        metrics.machines_drifted.set(drifted);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.cancelled() => return,
        }
    }
}
