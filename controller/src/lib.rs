//! nio-controller: turns Machines and NixosConfigurations into rebuild jobs and executor reports into status.
//!
//! - [`reconcile`]: NixosConfiguration reconcile and deletion; [`rollout`]: the pure planner.
//! - [`context`]: what reconciles share and the status writes they make; [`cache`]: the Machine cache and its
//!   label index.
//! - [`machine`]: Machine validation and probe scheduling; [`status`]: the pure status transition;
//!   [`status_consumer`]: applying executor events.
//! - [`git`]: ref resolution; [`publish`]: job building and publishing; [`leader`]: leader election.
#![forbid(unsafe_code)]

pub mod analysis;
pub mod apirequests;
pub mod budgets;
pub mod cache;
pub mod conditions;
pub mod config_status;
pub mod context;
pub mod error;
pub mod git;
pub mod kstatus;
pub mod leader;
pub mod lenient;
pub mod machine;
pub mod metrics;
pub mod publish;
pub mod reconcile;
pub mod rollout;
pub mod sites;
pub mod status;
pub mod status_consumer;
pub mod throttle;
pub mod waves;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, controller, reflector, watcher};
use nio_shared::crd::{Machine, MachinePhase, NixosConfiguration};
use tokio_util::sync::CancellationToken;

/// Configurations reconciled at once (each publishes its machines' jobs with its own bounded concurrency).
const CONFIG_CONCURRENCY: u16 = 16;
/// How often one configuration is reconciled at most from its triggers ([`throttle::per_key`]): a reconcile
/// costs in proportion to the machines it targets, so the window grows with them (0.25 ms each) from 100 ms up
/// to 5 s, and a stream of triggers costs a configuration the same small share of a core however large its
/// fleet.
fn trigger_window(machines: u32) -> Duration {
    (Duration::from_micros(250) * machines).clamp(Duration::from_millis(100), Duration::from_secs(5))
}
/// Machines reconciled at once: bounds memory and API request rate when thousands of Machines appear together.
const MACHINE_CONCURRENCY: u16 = 32;

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
    /// Record an Event on a Machine for each routine success too (an apply that succeeded or found the target
    /// running), not only for what needs attention or changes the machine's record (see
    /// [`context::Ctx::success_events`]).
    pub machine_success_events: bool,
    pub jobs_replicas: usize,
    pub cache_dir: PathBuf,
    /// kube client configuration; None = from the environment (KUBECONFIG or in-cluster).
    pub kube_config: Option<kube::Config>,
    /// Serve Git push webhooks (every replica does; the leader reconciles what they refresh).
    pub webhook: Option<webhook::Settings>,
    /// The Prometheus that waves' analyses query (its base URL, e.g. `http://prometheus:9090/`).
    pub prometheus_url: Option<url::Url>,
}

/// Runs the controller until `shutdown`: as a candidate for the lease, as the leader (reconciling, publishing,
/// consuming status) while it holds it, and as a candidate again if it loses it.
pub async fn run(s: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    // The probes first: a replica waiting for NATS (or the apiserver) is alive and says what it waits for.
    let metrics = Arc::new(metrics::Metrics::new(&s.cluster));
    let health = Arc::new(Health::default());
    let (m, h) = (metrics.clone(), health.clone());
    let probes = nio_shared::http::Probes::new("connecting to NATS", move || m.encode(), move || h.readiness());
    let startup = probes.startup.clone();
    nio_shared::http::serve(s.metrics_addr, s.health_addr, probes).await?;
    let mut opts = nio_shared::nats::connect_options(format!("nio-controller {} {}", s.cluster, s.identity));
    if let Some(c) = &s.nats_creds {
        opts = opts.credentials_file(c).await.with_context(|| format!("reading NATS credentials {}", c.display()))?;
    }
    let nats = opts
        .connect(nio_shared::nats::servers(&s.nats_url))
        .await
        .with_context(|| format!("connecting to NATS at {}", s.nats_url))?;
    let js = async_nats::jetstream::new(nats);
    nio_shared::nats::ensure_streams(&js, s.jobs_replicas).await?;
    startup.stage("connecting to Kubernetes");
    let config = match s.kube_config.clone() {
        Some(c) => c,
        None => kube::Config::infer().await.context("connecting to Kubernetes")?,
    };
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&apirequests::CountRequests(metrics.api_requests.clone()))
        .build();
    if let Some(w) = s.webhook.clone() {
        webhook::serve(w, client.clone(), s.namespaces.clone(), metrics.clone()).await?;
    }
    let seal = s.seal_key_file.as_deref().map(nio_shared::seal::SealKey::from_file).transpose()?;
    let ctx = Arc::new(context::Ctx {
        client: client.clone(),
        cluster: s.cluster.clone(),
        publisher: publish::Publisher { js: js.clone(), metrics: metrics.clone() },
        seal,
        resolver: git::Resolver::new(s.cache_dir.join("git"), Duration::from_secs(2)),
        recorder: context::Recorders::new(
            client.clone(),
            kube::runtime::events::Reporter { controller: "nio-controller".into(), instance: Some(s.identity.clone()) },
        ),
        metrics: metrics.clone(),
        probe_interval: s.probe_interval,
        default_poll: s.default_poll_interval,
        success_events: s.machine_success_events,
        written: Default::default(),
        machines: Default::default(),
        secrets: Default::default(),
        configurations: Default::default(),
        prometheus: analysis::Prometheus::new(s.prometheus_url.clone()),
        requests: tokio::sync::Semaphore::new(context::MAX_REQUESTS_IN_FLIGHT),
        machine_writes: Default::default(),
    });

    let elector = s.leader_election.then(|| {
        let timing = leader::Timing::for_lease(s.lease_duration);
        leader::Elector::new(client.clone(), &s.lease_namespace, &s.lease_name, &s.identity, timing)
    });
    // A standby is ready (healthy, able to take over): readiness never depends on leadership, or a rolling
    // update would wait forever for a new replica that cannot lead while the old one holds the lease.
    startup.done();
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

/// A watch of `K` (in namespace `ns`, or all) that decodes objects one at a time. An object that does not
/// decode (say, stored before the CRD bounded one of its fields) is skipped and reported (log line naming it,
/// `undecodable_objects_total`, a Warning Event on it); every other object is still watched. A typed watch
/// would fail the whole LIST and stop reconciling everything.
fn decoded<K>(
    client: &kube::Client,
    ns: Option<&str>,
    ctx: Arc<context::Ctx>,
    kind: &'static str,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + lenient::WithoutManagedFields
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<lenient::Lenient<K>> = match ns {
        Some(n) => Api::namespaced(client.clone(), n),
        None => Api::all(client.clone()),
    };
    watcher(api, watcher::Config::default()).filter_map(move |ev| {
        let decode = |o: lenient::Lenient<K>| -> Option<K> {
            match o {
                lenient::Lenient::Decoded(k) => Some(k),
                lenient::Lenient::Undecodable { metadata, error } => {
                    report_undecodable(&ctx, kind, &metadata, &error);
                    None
                }
            }
        };
        std::future::ready(match ev {
            Ok(watcher::Event::Apply(o)) => decode(o).map(|k| Ok(watcher::Event::Apply(k))),
            Ok(watcher::Event::InitApply(o)) => decode(o).map(|k| Ok(watcher::Event::InitApply(k))),
            Ok(watcher::Event::Delete(o)) => decode(o).map(|k| Ok(watcher::Event::Delete(k))),
            Ok(watcher::Event::Init) => Some(Ok(watcher::Event::Init)),
            Ok(watcher::Event::InitDone) => Some(Ok(watcher::Event::InitDone)),
            Err(e) => Some(Err(e)),
        })
    })
}

fn report_undecodable(ctx: &Arc<context::Ctx>, kind: &'static str, meta: &ObjectMeta, error: &str) {
    let (ns, name) = (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default());
    tracing::warn!(kind, namespace = %ns, name = %name, error, "skipping an object that does not decode; fix or delete it");
    ctx.metrics.undecodable.get_or_create(&metrics::KindLabel { kind: kind.into() }).inc();
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(format!("{}/{}", nio_shared::crd::GROUP, nio_shared::crd::VERSION)),
        kind: Some(kind.into()),
        name: Some(name),
        namespace: Some(ns),
        uid: meta.uid.clone(),
        ..Default::default()
    };
    let (ctx, note) = (ctx.clone(), format!("NIO cannot read this {kind} and ignores it until it is fixed: {error}"));
    tokio::spawn(async move { ctx.event_on(&reference, true, "Undecodable", note, "Watch").await });
}

/// The Machine a watch event changed, for mapping to configurations (a deletion shows as a machine being
/// deleted).
fn touched(ev: &watcher::Event<Machine>) -> Option<Machine> {
    match ev {
        watcher::Event::Apply(m) | watcher::Event::InitApply(m) => Some(m.clone()),
        watcher::Event::Delete(m) => {
            let mut m = m.clone();
            if m.metadata.deletion_timestamp.is_none() {
                m.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
            }
            Some(m)
        }
        _ => None,
    }
}

/// A hash of what a rollout plan reads from a Machine: labels, spec (generation), deletion, the targets in its
/// status and whether it drifted.
fn plan_fingerprint(m: &Machine) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.metadata.labels.hash(&mut h);
    m.metadata.generation.hash(&mut h);
    m.metadata.deletion_timestamp.is_some().hash(&mut h);
    if let Some(s) = &m.status {
        (&s.applied_target, &s.applied_configuration, &s.queued_target, &s.failed_target).hash(&mut h);
        (s.installed_at.is_some(), s.has_configuration, s.phase.map(|p| p as u8)).hash(&mut h);
        // A drift matters to configurations that enforce their system.
        s.conditions.iter().any(|c| c.type_ == "Drifted" && c.status == "True").hash(&mut h);
    }
    h.finish()
}

/// What the caches keep of an object: not its managedFields nor kubectl's last-applied copy (together often
/// more than the object itself), which the controller never reads.
fn slim<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
    if let Some(a) = o.meta_mut().annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// The backoff of a watch's retries, as client-go's reflector backs off: 0.8 s doubling to 30 s (with jitter), back
/// to the start only after two minutes without a retry. kube-runtime's `default_backoff` also starts over at
/// every event that is not an error, and each relist begins with one (`Init`, sent before the list is tried):
/// a list that keeps failing (RBAC, an apiserver that answers 5xx) was retried every 0.8 s for good.
#[derive(Default)]
struct ListBackoff(watcher::DefaultBackoff);

impl Iterator for ListBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        self.0.next()
    }
}

impl kube::runtime::utils::Backoff for ListBackoff {
    /// Not on a success: the inner timer starts over after two calm minutes.
    fn reset(&mut self) {}
}

/// What `/readyz` reports: the process is up, and (while leading) its watches can list.
#[derive(Debug, Default)]
pub struct Health {
    leading: AtomicBool,
    /// Kinds whose watch last failed (cleared when that controller next reconciles).
    failing_watches: std::sync::Mutex<std::collections::BTreeSet<&'static str>>,
}

impl Health {
    fn readiness(&self) -> (bool, String) {
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
        match r {
            Err(controller::Error::QueueError(e)) => self.watch_failed(kind, metrics, e),
            _ => self.watch_ok(kind),
        }
    }

    /// A watch of `kind` failed: counted, logged once until it recovers, and reported by /readyz.
    fn watch_failed(&self, kind: &'static str, metrics: &metrics::Metrics, e: &watcher::Error) {
        let Ok(mut failing) = self.failing_watches.lock() else { return };
        if failing.insert(kind) {
            // The error text only: kube's own log line carries the whole response body.
            tracing::error!(kind, error = %e, "watch failed; /readyz reports it until the watch recovers");
        }
        metrics.watch_errors.get_or_create(&metrics::KindLabel { kind: kind.into() }).inc();
    }

    fn watch_ok(&self, kind: &'static str) {
        if let Ok(mut failing) = self.failing_watches.lock() {
            failing.remove(kind);
        }
    }
}

/// One term as leader: runs the controllers, the status consumer and the gauges until the lease is lost or
/// `shutdown`.
#[allow(clippy::too_many_arguments)]
async fn lead(
    s: &Settings,
    ctx: &Arc<context::Ctx>,
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
    if let Ok(mut caches) = ctx.machines.write() {
        caches.clear();
    }
    if let Ok(mut caches) = ctx.secrets.write() {
        caches.clear();
    }
    if let Ok(mut stores) = ctx.configurations.write() {
        stores.clear();
    }
    let consumer = status_consumer::open(js, &s.cluster).await?;
    let mut tasks = tokio::task::JoinSet::new();
    let (mut config_stores, mut machine_stores) = (Vec::new(), Vec::new());
    let scopes: Vec<Option<String>> =
        if s.namespaces.is_empty() { vec![None] } else { s.namespaces.iter().cloned().map(Some).collect() };
    let term = Term { ctx, client, metrics, health, stop: &stop };
    for ns in scopes {
        // One Machine watch feeds the Machine controller, the cache fleet reconciles read their machines from,
        // and the configuration triggers. A trigger is sent only after the cache holds the change, so the
        // reconcile it causes sees it.
        let (m_store, mut m_writer) = reflector::store();
        let m_cache = Arc::new(cache::MachineCache::new(ns.clone(), m_store.clone()));
        let (touch_tx, touch_rx) = tokio::sync::mpsc::channel::<Machine>(1024);
        let m_stream = decoded::<Machine>(client, ns.as_deref(), ctx.clone(), "Machine")
            .backoff(ListBackoff::default())
            .modify(slim)
            .map_ok(move |ev| cache::store_unlabelled(&mut m_writer, ev))
            .then({
                let m_cache = m_cache.clone();
                move |ev| {
                    let tx = touch_tx.clone();
                    if let Ok(ev) = &ev {
                        m_cache.observe(ev);
                    }
                    async move {
                        if let Some(m) = ev.as_ref().ok().and_then(touched)
                            && tx.send(m).await.is_err()
                        {
                            tracing::debug!("configuration controller stopped; Machine change not forwarded");
                        }
                        ev
                    }
                }
            })
            .applied_objects();
        if let Ok(mut caches) = ctx.machines.write() {
            caches.push(m_cache);
        }
        config_stores.push(term.spawn_configuration_controller(&mut tasks, ns.as_deref(), touch_rx));
        // The Machine controller sees only the changes it has work for, and the probes falling due.
        let probe_interval = s.probe_interval;
        let m_stream = m_stream.try_filter(move |m| std::future::ready(machine::wants_reconcile(m, probe_interval)));
        let (due_tx, due_rx) = tokio::sync::mpsc::channel::<Machine>(256);
        tasks.spawn(machine::probe_sweep(m_store.clone(), due_tx, probe_interval, stop.clone()));
        let m_ctl = Controller::for_stream(m_stream, m_store.clone())
            .with_config(controller::Config::default().concurrency(MACHINE_CONCURRENCY))
            .watches_stream(tokio_stream::wrappers::ReceiverStream::new(due_rx).map(Ok), |m: Machine| {
                Some(ObjectRef::from(&m))
            })
            .graceful_shutdown_on(stop.clone().cancelled_owned())
            .run(machine::reconcile, machine::error_policy, ctx.clone())
            .for_each(term.watch_reporter("Machine"));
        tasks.spawn(m_ctl);
        machine_stores.push(m_store);
    }
    tasks.spawn(status_consumer::run(ctx.clone(), consumer, machine_stores.clone(), stop.clone()));
    tasks.spawn(sites::run(ctx.clone(), js.clone(), machine_stores.clone(), stop.clone()));
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
        while tasks.join_next().await.is_some() {}
    }
    metrics.forget_fleet();
    Ok(end)
}

/// What one term as leader shares among its controllers.
struct Term<'a> {
    ctx: &'a Arc<context::Ctx>,
    client: &'a kube::Client,
    metrics: &'a Arc<metrics::Metrics>,
    health: &'a Arc<Health>,
    stop: &'a CancellationToken,
}

impl Term<'_> {
    /// Reports each reconcile result of the `kind` controller to /readyz and the watch error metric.
    fn watch_reporter<T, E: std::fmt::Display>(
        &self,
        kind: &'static str,
    ) -> impl FnMut(Result<T, controller::Error<E, watcher::Error>>) -> std::future::Ready<()> + use<T, E> {
        let (health, metrics) = (self.health.clone(), self.metrics.clone());
        move |r| {
            health.watch_result(kind, &metrics, &r);
            std::future::ready(())
        }
    }

    /// Spawns the NixosConfiguration controller of namespace `ns` (None: all): triggered by its own watch,
    /// by the Machine changes `touches` forwards and by opted-in Secrets. Returns its cache.
    fn spawn_configuration_controller(
        &self,
        tasks: &mut tokio::task::JoinSet<()>,
        ns: Option<&str>,
        touches: tokio::sync::mpsc::Receiver<Machine>,
    ) -> reflector::Store<NixosConfiguration> {
        let (ctx, client) = (self.ctx, self.client);
        let (store, writer) = reflector::store();
        if let Ok(mut stores) = ctx.configurations.write() {
            stores.push((ns.map(str::to_string), store.clone()));
        }
        let own = decoded::<NixosConfiguration>(client, ns, ctx.clone(), "NixosConfiguration")
            .backoff(ListBackoff::default())
            .modify(slim)
            .reflect(writer)
            .applied_objects()
            .flat_map({
                let mut peers = conflicted_peers(store.clone());
                move |r| futures::stream::iter(peers(r))
            });
        // The configurations a Machine change concerns, as triggers beside the configurations' own changes.
        let mut concerned = configurations_touched(store.clone());
        let touched = tokio_stream::wrappers::ReceiverStream::new(touches)
            .flat_map(move |m| futures::stream::iter(concerned(m).into_iter().map(Ok)));
        // Every trigger of a configuration goes through one throttle: a push (or any first change after a quiet
        // moment) is reconciled at once, and a stream of them (a rollout's finished machines, the echo of its
        // own status write) at most once per window, never postponed while the stream lasts.
        // A user's request (a new spec, a refresh, approve or resume annotation, a deletion) is never held.
        let stream = throttle::per_key(futures::stream::select(own, touched), trigger_key(store.clone()), |r| {
            trigger_window(r.as_ref().ok().and_then(|c| c.status.as_ref()).map_or(0, |s| s.total))
        });
        let secrets: Api<Secret> = match ns {
            Some(n) => Api::namespaced(client.clone(), n),
            None => Api::all(client.clone()),
        };
        let opted_in = watcher::Config::default().labels(&format!(
            "{}={}",
            nio_shared::crd::SECRET_OPT_IN_LABEL,
            nio_shared::crd::SECRET_OPT_IN_VALUE
        ));
        // Its own backoff, and its errors reported here, not passed on: in the controller's trigger stream an
        // error pauses every trigger (kube-runtime backs the whole stream off, up to 30 s), so a Secret watch
        // that cannot list (RBAC granting only `get`, say) would hold back every configuration's changes.
        // The watch also keeps the opted-in Secrets the reconciles read (cache::SecretCache).
        let (secret_store, secret_writer) = reflector::store();
        let secret_cache = Arc::new(cache::SecretCache::new(ns.map(str::to_string), secret_store));
        if let Ok(mut caches) = ctx.secrets.write() {
            caches.push(secret_cache.clone());
        }
        let secret_changes = {
            let (health, metrics) = (self.health.clone(), self.metrics.clone());
            let watch = watcher(secrets, opted_in).backoff(ListBackoff::default()).modify(slim).reflect(secret_writer);
            watch.filter_map(move |ev| {
                let changed = match ev {
                    Err(e) => {
                        secret_cache.set_current(false);
                        health.watch_failed("Secret", &metrics, &e);
                        None
                    }
                    // (`Init` is sent before the list is tried: it proves nothing)
                    Ok(watcher::Event::Init) => None,
                    Ok(watcher::Event::InitDone) => {
                        secret_cache.set_current(true);
                        health.watch_ok("Secret");
                        None
                    }
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s) | watcher::Event::Delete(s)) => {
                        health.watch_ok("Secret");
                        Some(Ok(s))
                    }
                };
                std::future::ready(changed)
            })
        };
        let config = controller::Config::default().concurrency(CONFIG_CONCURRENCY);
        let ctl = Controller::for_stream(stream, store.clone())
            .with_config(config)
            // A Secret a configuration reads changed (content, or its opt-in label): re-read it now, not at
            // the next poll. Only opted-in Secrets are watched; one losing the label shows as deleted.
            .watches_stream(secret_changes, {
                let store = store.clone();
                move |secret: Secret| {
                    let (ns, name) = (secret.namespace(), secret.name_any());
                    let reads =
                        |c: &NixosConfiguration| c.namespace() == ns && reconcile::secrets_read(c).any(|s| s == name);
                    store.state().into_iter().filter(|c| reads(c)).map(|c| ObjectRef::from(&*c)).collect::<Vec<_>>()
                }
            })
            .graceful_shutdown_on(self.stop.clone().cancelled_owned())
            .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
            .for_each(self.watch_reporter("NixosConfiguration"));
        tasks.spawn(ctl);
        store
    }
}

/// The throttle key of a configuration trigger ([`throttle::per_key`]): none, so it passes at once, for a watch
/// error and for a change of what the user asks for (generation, annotations, deletion) since this configuration
/// was last seen; its reference otherwise (status echoes, Machine changes). What was asked of configurations
/// that are gone from `store` is forgotten whenever the record has grown to twice the configurations there.
fn trigger_key(
    store: reflector::Store<NixosConfiguration>,
) -> impl FnMut(&Result<NixosConfiguration, watcher::Error>) -> Option<ObjectRef<NixosConfiguration>> {
    use std::hash::{Hash, Hasher};
    let mut asked = std::collections::HashMap::<ObjectRef<NixosConfiguration>, u64>::new();
    move |r| {
        let c = r.as_ref().ok()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (c.metadata.generation, &c.metadata.annotations, c.metadata.deletion_timestamp.is_some()).hash(&mut h);
        let (key, ask) = (ObjectRef::from(c), h.finish());
        if asked.len() >= 2 * store.len() + 64 {
            asked.retain(|k, _| store.get(k).is_some());
        }
        (asked.insert(key.clone(), ask) == Some(ask)).then_some(key)
    }
}

/// Passes each configuration trigger on and, when what a configuration asks for changed (its spec, or its
/// deletion began), also triggers the configurations of its namespace that are Degraded, as those that report
/// machines managed by another configuration (MachineConflict) are: the change may have let those machines go (a narrower selector),
/// and the Machines themselves do not change until the next configuration runs something on them.
fn conflicted_peers(
    store: reflector::Store<NixosConfiguration>,
) -> impl FnMut(Result<NixosConfiguration, watcher::Error>) -> Vec<Result<NixosConfiguration, watcher::Error>> {
    let mut asked = std::collections::HashMap::<ObjectRef<NixosConfiguration>, (Option<i64>, bool)>::new();
    move |r| {
        let Ok(c) = &r else { return vec![r] };
        let ask = (c.metadata.generation, c.metadata.deletion_timestamp.is_some());
        if asked.len() >= 2 * store.len() + 64 {
            asked.retain(|k, _| store.get(k).is_some());
        }
        let changed = asked.insert(ObjectRef::from(c), ask).is_some_and(|before| before != ask);
        let (ns, name) = (c.namespace(), c.name_any());
        let peers: Vec<_> = if changed {
            store
                .state()
                .into_iter()
                .filter(|p| p.namespace() == ns && p.name_any() != name)
                .filter(|p| {
                    // (the conflict shares Degraded with failed machines, whose reason comes first)
                    let conds = p.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
                    conds.iter().any(|c| c.type_ == "Degraded" && c.status == "True")
                })
                .map(|p| Ok((*p).clone()))
                .collect()
        } else {
            Vec::new()
        };
        std::iter::once(r).chain(peers).collect()
    }
}

/// Maps a Machine change to the configurations to reconcile: those that select it now, those that selected it
/// at its last change and the one it last ran (its labels may have moved it out of their selectors). Only changes that can change a plan count: not
/// probe times, facts or progress steps, and nothing while the machine is queued or applying (its own writes
/// and progress events); its end, a new machine, a label change or a deletion does.
fn configurations_touched(
    store: reflector::Store<NixosConfiguration>,
) -> impl FnMut(Machine) -> Vec<NixosConfiguration> {
    // Per machine: the fingerprint of what can change a plan, and the configurations that selected it when it
    // last triggered (a paused or waiting fleet never sent it a job, so the machine itself records nothing of it).
    // (Both by a hash, uid and names: the strings were two thirds of this record, a megabyte at 10,000 Machines.)
    let mut seen = std::collections::HashMap::<u64, (u64, Vec<u64>)>::new();
    move |m: Machine| {
        let fingerprint = plan_fingerprint(&m);
        let deleted = m.metadata.deletion_timestamp.is_some();
        let uid = hash_of(m.metadata.uid.as_deref().unwrap_or_default());
        // a machine seen for the first time counts as changed
        let record = seen.entry(uid).or_insert_with(|| (fingerprint.wrapping_add(1), Vec::new()));
        let changed = deleted || record.0 != fingerprint;
        record.0 = fingerprint;
        // A machine that starts or stops waiting for its site's executor does trigger: the configuration names it.
        let busy =
            matches!(m.status.as_ref().and_then(|s| s.phase), Some(MachinePhase::Queued | MachinePhase::Applying))
                && !deleted;
        if busy || !changed {
            return Vec::new();
        }
        let ns = m.namespace();
        let all: Vec<Arc<NixosConfiguration>> = store.state().into_iter().filter(|c| c.namespace() == ns).collect();
        let now: Vec<&Arc<NixosConfiguration>> = all.iter().filter(|c| reconcile::targets(c, &m)).collect();
        let name_of = |c: &NixosConfiguration| hash_of(c.metadata.name.as_deref().unwrap_or_default());
        let before = std::mem::replace(&mut record.1, now.iter().map(|c| name_of(c)).collect());
        if deleted {
            seen.remove(&uid);
        }
        let applied = m.status.as_ref().and_then(|s| s.applied_configuration.as_deref());
        let left = |c: &&Arc<NixosConfiguration>| {
            let name = c.metadata.name.as_deref();
            ((applied.is_some() && applied == name) || before.contains(&name_of(c)))
                && !now.iter().any(|n| n.metadata.name.as_deref() == name)
        };
        now.iter().copied().chain(all.iter().filter(left)).map(|c| (**c).clone()).collect()
    }
}

/// A 64-bit hash of `s` (the same within this process).
pub(crate) fn hash_of(s: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(s)
}

/// Keeps `nio_controller_machines{phase}`, `machines_drifted` and `configurations_degraded{reason}` current,
/// from the controllers' caches (no API requests), for the namespaces this controller watches; forgets the
/// status written to deleted configurations.
async fn phase_gauge(
    configs: Vec<kube::runtime::reflector::Store<NixosConfiguration>>,
    machines: Vec<kube::runtime::reflector::Store<Machine>>,
    ctx: Arc<context::Ctx>,
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
            if let Some(d) = conds.iter().find(|d| d.type_ == conditions::Type::Degraded.as_str() && d.status == "True")
            {
                *degraded.entry(d.reason.clone()).or_default() += 1;
            }
        }
        for (reason, n) in degraded {
            metrics.configurations_degraded.get_or_create(&metrics::ReasonLabel { reason: reason.clone() }).set(n);
            reasons_seen.insert(reason);
        }
        let mut counts: std::collections::BTreeMap<String, i64> =
            MachinePhase::ALL.iter().map(|p| (p.as_str().to_string(), 0)).collect();
        let mut drifted = 0;
        for m in machines.iter().flat_map(|s| s.state()) {
            if m.status.as_ref().is_some_and(|s| conditions::is_true(&s.conditions, conditions::Type::Drifted)) {
                drifted += 1;
            }
            let phase = m.status.as_ref().and_then(|s| s.phase).unwrap_or_default().as_str().to_string();
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

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn configuration(
        generation: i64,
        refresh: Option<&str>,
        observed: i64,
    ) -> Result<NixosConfiguration, watcher::Error> {
        let mut c: NixosConfiguration = serde_json::from_value(serde_json::json!({
            "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration",
            "metadata": {"name": "web", "namespace": "fleet", "generation": generation},
            "spec": {"gitRepo": "https://example.org/fleet.git", "ref": "main", "flake": "#web", "machineRef": "m1"},
            "status": {"observedGeneration": observed},
        }))
        .expect("a configuration");
        if let Some(r) = refresh {
            c.metadata.annotations = Some([(nio_shared::crd::REFRESH_ANNOTATION.to_string(), r.to_string())].into());
        }
        Ok(c)
    }

    #[test]
    fn requests_pass_the_throttle_and_echoes_and_machine_changes_are_throttled() {
        let mut key = trigger_key(reflector::store().0);
        // First sight, then the same again (a status echo, or the copy a Machine change triggers).
        assert_eq!(key(&configuration(1, None, 0)), None);
        assert!(key(&configuration(1, None, 1)).is_some(), "a status-only change is throttled");
        assert!(key(&configuration(1, None, 1)).is_some());
        // A push (refresh annotation), a new one, and a spec edit each pass at once, once.
        assert_eq!(key(&configuration(1, Some("abc"), 1)), None);
        assert!(key(&configuration(1, Some("abc"), 1)).is_some());
        assert_eq!(key(&configuration(1, Some("def"), 1)), None);
        assert_eq!(key(&configuration(2, Some("def"), 1)), None);
        assert!(key(&configuration(2, Some("def"), 2)).is_some());
    }

    #[test]
    fn what_was_asked_of_deleted_configurations_is_forgotten_and_of_live_ones_kept() {
        let (store, mut writer) = reflector::store();
        let live = configuration(1, Some("abc"), 1).expect("a configuration");
        writer.apply_watcher_event(&watcher::Event::Apply(live.clone()));
        let mut key = trigger_key(store);
        assert_eq!(key(&Ok(live.clone())), None);
        let gone = |i: usize| {
            let mut c = live.clone();
            c.metadata.name = Some(format!("gone-{i}"));
            Ok(c)
        };
        assert_eq!(key(&gone(0)), None);
        for i in 1..100 {
            key(&gone(i));
        }
        // The record was pruned to what the store holds: a gone configuration is new again, the live one is not.
        assert_eq!(key(&gone(0)), None, "forgotten");
        assert!(key(&Ok(live)).is_some(), "kept");
    }

    #[test]
    fn large_fleets_are_reconciled_less_often_from_their_triggers() {
        assert_eq!(trigger_window(0), Duration::from_millis(100));
        assert_eq!(trigger_window(100), Duration::from_millis(100));
        assert_eq!(trigger_window(1_000), Duration::from_millis(250));
        assert_eq!(trigger_window(10_000), Duration::from_millis(2_500));
        assert_eq!(trigger_window(u32::MAX), Duration::from_secs(5));
    }
}
