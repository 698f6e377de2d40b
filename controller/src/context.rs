//! What every reconcile shares ([`Ctx`]) and the writes they all make: Events, Machine status (optimistic
//! concurrency from a known copy) and NixosConfiguration status (skipped when it would change nothing).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::{Resource, ResourceExt};
use nio_shared::crd::{Machine, MachineStatus, NixosConfiguration, NixosConfigurationStatus};

use crate::error::Result;
use crate::git::Resolver;
use crate::metrics::Metrics;
use crate::publish::Publisher;

/// Field manager of everything the controller writes.
pub const MANAGER: &str = "nio-controller";

/// Shared by every reconcile.
pub struct Ctx {
    pub client: kube::Client,
    pub cluster: String,
    pub publisher: Publisher,
    pub seal: Option<nio_shared::seal::SealKey>,
    pub resolver: Resolver,
    pub recorder: Recorders,
    pub metrics: Arc<Metrics>,
    pub probe_interval: Duration,
    /// Poll interval of configurations that set none.
    pub default_poll: Duration,
    /// Whether a routine success (an apply that succeeded, or found its target running) is an Event on the
    /// Machine. Off by default: the Machine's status records it (phase, appliedCommit, lastAppliedTime), the
    /// configuration's rollout Events summarise it, and at fleet scale an Event per machine per rollout is the
    /// one API request a success costs beyond its status writes (and thousands of Events per rollout in
    /// etcd). Failures, rollbacks, installs, removals, reboots, host keys, drift and unreachable machines are
    /// always Events.
    pub success_events: bool,
    /// The status this replica last wrote to each configuration (by uid). The cache a reconcile starts from can
    /// be older than our own last write; computing from it would repeat NewCommit/RolloutComplete Events and
    /// reset lastTransitionTime. Cleared at the start of each term as leader.
    pub written: std::sync::Mutex<std::collections::HashMap<String, NixosConfigurationStatus>>,
    /// This term's Machine caches, each with the namespace its watch covers (None: all). Fleet reconciles read
    /// their machines here: a LIST per reconcile was the largest API cost at 10,000 Machines.
    pub machines: std::sync::RwLock<Vec<Arc<crate::cache::MachineCache>>>,
    /// This term's watches of opted-in Secrets (one per namespace watched, or one for all).
    pub secrets: std::sync::RwLock<Vec<Arc<crate::cache::SecretCache>>>,
    /// This term's stores of configurations, each with the namespace its watch covers (None: all): who else
    /// targets a machine ([`crate::reconcile`]'s one-manager rule).
    pub configurations: std::sync::RwLock<Vec<(Option<String>, kube::runtime::reflector::Store<NixosConfiguration>)>>,
    /// Where waves' analyses are measured.
    pub prometheus: crate::analysis::Prometheus,
    /// Bounds the requests made per machine (status writes, Events, Secret reads) in flight at once: every
    /// connection in flight holds its own buffers, and a burst of status events once opened hundreds of them.
    /// Watches, the Lease and the few per-configuration requests do not take a slot.
    pub requests: tokio::sync::Semaphore,
    /// Status writes to one Machine in flight, one at a time ([`update_machine_status`]).
    pub machine_writes: MachineWrites,
}

/// Serializes this process's status writes to each Machine, and hands each writer what the previous one wrote.
/// A rollout's Queued mark and the executor's first events for the same machine are written within moments of
/// each other: each started from the cached copy, which the watch had not yet brought up to the other's write,
/// and lost to a conflict (a GET and a second write). Taking turns, and starting from this process's own last
/// write while the cache is behind it, the second writes once. A Machine's entry lives while a write to it is in
/// flight or waiting, and after it while the cache has not caught up with it (at most [`RECENT`]), so an idle
/// Machine costs nothing here.
#[derive(Default)]
pub struct MachineWrites(std::sync::Mutex<Gates>);

#[derive(Default)]
struct Gates {
    by_machine: std::collections::HashMap<(String, String), (Arc<MachineGate>, std::time::Instant)>,
    swept: Option<std::time::Instant>,
}

/// How long this process's last write to a Machine is kept for the next writer at most: well past the time the
/// watch takes to bring the cache up to it. An entry the cache has caught up with goes at the next sweep.
const RECENT: Duration = Duration::from_secs(3);

/// How often the entries are swept (when a write comes).
const SWEEP: Duration = Duration::from_millis(200);

/// One Machine's turn: what this process last wrote to it (resourceVersion, status), boxed: an entry without
/// one is a few words, not the size of a status.
type MachineGate = tokio::sync::Mutex<Option<Box<(String, MachineStatus)>>>;

impl MachineWrites {
    /// The gate of Machine `ns/name`. Sweeps now and then: an entry stays while a write to it is in flight or
    /// waiting, or while the cache is behind its last write (`cached` gives the cache's resourceVersion of a
    /// Machine), at most [`RECENT`]. At 10,000 Machines, keeping every entry for `RECENT` held a copy of every
    /// status written in a rollout's first seconds (a tenth of the controller's peak memory).
    fn gate(&self, ns: &str, name: &str, cached: impl Fn(&str, &str) -> Option<u64>) -> Arc<MachineGate> {
        self.gate_at(ns, name, cached, std::time::Instant::now())
    }

    /// [`MachineWrites::gate`] at `now`.
    fn gate_at(
        &self,
        ns: &str,
        name: &str,
        cached: impl Fn(&str, &str) -> Option<u64>,
        now: std::time::Instant,
    ) -> Arc<MachineGate> {
        let mut gates = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if gates.swept.is_none_or(|t| now.duration_since(t) > SWEEP) {
            gates.swept = Some(now);
            gates.by_machine.retain(|(ns, name), (g, at)| {
                if Arc::strong_count(g) > 1 {
                    return true;
                }
                let behind = match g.try_lock() {
                    Ok(last) => last.as_ref().is_some_and(|w| version(Some(&w.0)) > cached(ns, name)),
                    Err(_) => true,
                };
                behind && now.duration_since(*at) < RECENT
            });
        }
        let entry = gates.by_machine.entry((ns.to_string(), name.to_string())).or_insert_with(|| (Arc::default(), now));
        entry.1 = now;
        entry.0.clone()
    }

    /// `machines` of `ns` (from the cache) each brought up to this process's last write to it where the cache
    /// has not caught up with that yet: a reconcile planning from a copy older than its own last mark queued
    /// the machine again (the queue dropped the job as a duplicate, but it cost a publish; a fifth of the
    /// machines at 10,000 on a real API server). A write in flight is not waited for.
    pub fn overlay(&self, ns: &str, machines: &mut [Arc<Machine>]) {
        let gates = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if gates.by_machine.is_empty() {
            return;
        }
        let mut key = (ns.to_string(), String::new());
        for m in machines.iter_mut() {
            key.1.clear();
            key.1.push_str(m.metadata.name.as_deref().unwrap_or_default());
            let Some((gate, _)) = gates.by_machine.get(&key) else { continue };
            let Ok(last) = gate.try_lock() else { continue };
            let Some(w) = last.as_ref() else { continue };
            if version(Some(&w.0)) <= version(m.metadata.resource_version.as_deref()) {
                continue;
            }
            if let Some(Cow::Owned(n)) = latest(Some(m), Some((**w).clone())) {
                *m = Arc::new(n);
            }
        }
    }

    /// Machines with an entry (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().map(|g| g.by_machine.len()).unwrap_or_default()
    }
}

/// A Machine's resourceVersion as the number etcd makes it (None if it is not one: older than any number).
/// The API calls resourceVersions opaque; here the order only picks which copy a write starts from, and the
/// write's resourceVersion precondition keeps it correct whatever is picked (a wrong pick costs a conflict).
fn version(rv: Option<&str>) -> Option<u64> {
    rv.and_then(|v| v.parse().ok())
}

/// `known` brought up to this process's last write when the cache has not caught up with it yet (etcd's
/// resourceVersions are numbers; one that is not counts as older).
/// Borrowed when `known` is the latest: a copy is made only to bring it up.
fn latest(known: Option<&Machine>, written: Option<(String, MachineStatus)>) -> Option<Cow<'_, Machine>> {
    match (known, written) {
        (Some(m), Some((v, status))) if version(Some(&v)) > version(m.metadata.resource_version.as_deref()) => {
            let mut metadata = m.metadata.clone();
            metadata.resource_version = Some(v);
            Some(Cow::Owned(Machine { metadata, spec: m.spec.clone(), status: Some(status) }))
        }
        (known, _) => known.map(Cow::Borrowed),
    }
}

/// Requests made per machine that the controller has in flight at once (see [`Ctx::requests`]).
pub const MAX_REQUESTS_IN_FLIGHT: usize = 32;

/// kube-rs' event [`Recorder`], sharded by object. A Recorder keeps every Event of the last minutes to count
/// repeats into a series, and each publish scans all of them to expire old ones: with one Event per machine per
/// rollout that scan made a fleet's rollout quadratic in its machines (12 % of the controller's CPU at 5,000
/// Machines, by perf). The same object always lands on the same shard, so series still aggregate.
pub struct Recorders(Vec<Recorder>);

impl Recorders {
    const SHARDS: usize = 64;

    pub fn new(client: kube::Client, reporter: kube::runtime::events::Reporter) -> Self {
        Recorders((0..Self::SHARDS).map(|_| Recorder::new(client.clone(), reporter.clone())).collect())
    }

    fn shard(&self, r: &ObjectReference) -> &Recorder {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (&r.namespace, &r.name, &r.uid).hash(&mut h);
        &self.0[(h.finish() as usize) % self.0.len()]
    }
}

impl Ctx {
    /// The Machine cache of the watch that covers `ns`.
    pub fn machine_cache(&self, ns: &str) -> Option<Arc<crate::cache::MachineCache>> {
        self.machines.read().ok()?.iter().find(|c| c.scope.as_ref().is_none_or(|s| *s == ns)).cloned()
    }

    /// The watch of opted-in Secrets that covers `ns`.
    pub fn secret_cache(&self, ns: &str) -> Option<Arc<crate::cache::SecretCache>> {
        self.secrets.read().ok()?.iter().find(|c| c.scope.as_ref().is_none_or(|s| *s == ns)).cloned()
    }

    /// The configurations of `ns`, from the watch that covers it (none before the watch's first list).
    pub fn configurations(&self, ns: &str) -> Vec<Arc<NixosConfiguration>> {
        let Ok(stores) = self.configurations.read() else { return Vec::new() };
        let Some((_, store)) = stores.iter().find(|(scope, _)| scope.as_ref().is_none_or(|s| *s == ns)) else {
            return Vec::new();
        };
        store.state().into_iter().filter(|c| c.metadata.namespace.as_deref() == Some(ns)).collect()
    }

    /// Waits for one of the [`MAX_REQUESTS_IN_FLIGHT`] request slots; hold it for the request.
    pub async fn request_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.requests.acquire().await.ok()
    }

    /// Records a Kubernetes Event about `obj`; failures are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
        action: &str,
    ) {
        self.event_on(&obj.object_ref(&()), warning, reason, note, action).await;
    }

    /// Records a Kubernetes Event about the object `r` refers to; failures are logged, never fatal.
    pub async fn event_on(&self, r: &ObjectReference, warning: bool, reason: &str, note: String, action: &str) {
        let ev = KubeEvent {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.to_string(),
            note: Some(event_note(&note)),
            action: action.to_string(),
            secondary: None,
        };
        let _slot = self.request_slot().await;
        if let Err(e) = self.recorder.shard(r).publish(&ev, r).await {
            tracing::warn!(error = %e, reason, "recording an Event failed");
        }
    }
}

/// The apiserver refuses Event notes over 1024 bytes (bytes, not characters): cut longer ones on a character
/// boundary and mark the cut.
pub fn event_note(note: &str) -> String {
    const MAX: usize = 1024;
    if note.len() <= MAX {
        return note.to_string();
    }
    let mut end = MAX - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

/// Read-modify-write of a Machine's status with optimistic concurrency (retried on conflict). `known` is a copy
/// the caller already has (from the cache or a list): the first attempt writes from it with its
/// resourceVersion as precondition, and only a conflict costs a GET. A rollout thus costs one request per
/// machine write instead of two. Returns a reference to the Machine (for its Events; None: it no longer exists).
/// Nothing is copied from a Machine the caller or the cache already has unless this process's own last write
/// is newer.
pub async fn update_machine_status(
    ctx: &Ctx,
    ns: &str,
    name: &str,
    known: Option<&Machine>,
    f: impl Fn(&Machine) -> Option<MachineStatus>,
) -> Result<Option<ObjectReference>> {
    let cached_version = |ns: &str, name: &str| {
        ctx.machine_cache(ns)
            .and_then(|c| c.get(ns, name))
            .and_then(|m| version(m.metadata.resource_version.as_deref()))
    };
    let gate = ctx.machine_writes.gate(ns, name, cached_version);
    let mut last = gate.lock().await;
    // The caller's copy, the cache's if the watch has brought a newer one since, and this process's own last
    // write if the cache has not caught up with it yet.
    let cached = ctx.machine_cache(ns).and_then(|c| c.get(ns, name));
    let rv = |m: &Machine| version(m.metadata.resource_version.as_deref());
    let known = match (known.filter(|m| m.metadata.resource_version.is_some()), cached.as_deref()) {
        (Some(k), Some(c)) if rv(c) > rv(k) => Some(c),
        (Some(k), _) => Some(k),
        (None, c) => c,
    };
    let known = latest(known, last.take().map(|w| *w));
    let result = write_machine_status(ctx, ns, name, known, f).await;
    result.map(|w| {
        w.map(|w| {
            *last = w.last.map(Box::new);
            w.reference
        })
    })
}

/// What [`write_machine_status`] leaves: the Machine's reference, and the status and resourceVersion to start
/// this process's next write to it from (what it wrote, or a copy newer than the cache it started from).
struct Written {
    reference: ObjectReference,
    last: Option<(String, MachineStatus)>,
}

async fn write_machine_status(
    ctx: &Ctx,
    ns: &str,
    name: &str,
    mut known: Option<Cow<'_, Machine>>,
    f: impl Fn(&Machine) -> Option<MachineStatus>,
) -> Result<Option<Written>> {
    let api: Api<Machine> = Api::namespaced(ctx.client.clone(), ns);
    for attempt in 0..8 {
        let _slot = ctx.request_slot().await;
        let m = match known.take() {
            Some(m) => m,
            None => match api.get_opt(name).await? {
                Some(m) => Cow::Owned(m),
                None => return Ok(None),
            },
        };
        let Some(mut status) = f(&m) else {
            let reference = m.object_ref(&());
            let last = match m {
                Cow::Owned(m) => m.metadata.resource_version.zip(m.status),
                Cow::Borrowed(_) => None,
            };
            return Ok(Some(Written { reference, last }));
        };
        crate::kstatus::machine(&mut status);
        let patch = StatusPatch {
            api_version: "nixos.infra/v1alpha1",
            kind: "Machine",
            metadata: Some(PatchMeta { name, resource_version: m.metadata.resource_version.as_deref() }),
            status: &status,
        };
        match apply_status::<Machine>(&ctx.client, ns, name, &patch).await {
            Ok(resource_version) => {
                ctx.metrics
                    .machine_status_writes
                    .get_or_create(&crate::metrics::ResultLabel { result: "written".into() })
                    .inc();
                let last = resource_version.map(|rv| (rv, status));
                return Ok(Some(Written { reference: m.object_ref(&()), last }));
            }
            Err(kube::Error::Api(e)) if e.code == 409 && attempt < 7 => {
                ctx.metrics
                    .machine_status_writes
                    .get_or_create(&crate::metrics::ResultLabel { result: "conflict".into() })
                    .inc();
                continue;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// A status write's body, serialized straight from the status (a `serde_json::Value` of it first cost a tree of
/// allocations per write).
#[derive(serde::Serialize)]
struct StatusPatch<'a, S> {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<PatchMeta<'a>>,
    status: &'a S,
}

#[derive(serde::Serialize)]
struct PatchMeta<'a> {
    name: &'a str,
    /// The write's precondition: refused (409) if the object changed since.
    #[serde(rename = "resourceVersion", skip_serializing_if = "Option::is_none")]
    resource_version: Option<&'a str>,
}

/// Server-side apply of `patch` to the status of `K` `ns/name`, reading back only the new resourceVersion. The
/// response is the whole object, which the watch delivers anyway: decoding it too doubled the decoding a status
/// write costs the controller.
async fn apply_status<K: Resource<DynamicType = ()>>(
    client: &kube::Client,
    ns: &str,
    name: &str,
    patch: &impl serde::Serialize,
) -> kube::Result<Option<String>> {
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(rename = "resourceVersion")]
        resource_version: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Written {
        metadata: Meta,
    }
    let mut req = kube::core::Request::new(K::url_path(&(), Some(ns)))
        .patch_subresource("status", name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch))
        .map_err(kube::Error::BuildRequest)?;
    req.extensions_mut().insert("patch_status");
    let written: Written = client.request(req).await?;
    Ok(written.metadata.resource_version)
}

/// The latest status of `cfg`: what this replica last wrote, else what the cache holds.
pub fn latest_status(ctx: &Ctx, cfg: &NixosConfiguration) -> NixosConfigurationStatus {
    let uid = cfg.metadata.uid.clone().unwrap_or_default();
    ctx.written.lock().ok().and_then(|w| w.get(&uid).cloned()).or_else(|| cfg.status.clone()).unwrap_or_default()
}

/// Writes `status` unless it is what the configuration already has (a write that changes nothing would still
/// cost a request and, on some servers, wake every watcher).
pub async fn set_status(ctx: &Ctx, cfg: &NixosConfiguration, status: &NixosConfigurationStatus) -> Result<()> {
    let mut status = status.clone();
    crate::kstatus::configuration(&mut status);
    let status = &status;
    if latest_status(ctx, cfg) == *status {
        return Ok(());
    }
    let _slot = ctx.request_slot().await;
    let patch = StatusPatch { api_version: "nixos.infra/v1alpha1", kind: "NixosConfiguration", metadata: None, status };
    let ns = cfg.namespace().unwrap_or_default();
    apply_status::<NixosConfiguration>(&ctx.client, &ns, &cfg.name_any(), &patch).await?;
    if let (Ok(mut w), Some(uid)) = (ctx.written.lock(), cfg.metadata.uid.clone()) {
        w.insert(uid, status.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_notes_fit_1024_bytes_and_cut_on_a_character_boundary() {
        assert_eq!(event_note("short"), "short");
        let exact = "a".repeat(1024);
        assert_eq!(event_note(&exact), exact);
        for long in ["é".repeat(800), "a".repeat(5000), format!("a{}", "€".repeat(500)), "🦀".repeat(300)] {
            let cut = event_note(&long);
            assert!(cut.len() <= 1024 && cut.len() > 1000, "{} bytes", cut.len());
            assert!(cut.ends_with('…') && long.starts_with(cut.trim_end_matches('…')));
        }
    }

    #[test]
    fn a_machine_last_write_is_kept_only_while_the_cache_is_behind_it() {
        let writes = MachineWrites::default();
        let written = |rv: &str| Some(Box::new((rv.to_string(), MachineStatus::default())));
        // (the sweeps' clock is given, so a slow machine cannot turn one step into the next)
        let t0 = std::time::Instant::now();
        let at = |n: u32| t0 + (SWEEP + Duration::from_millis(50)) * n;
        let gate = writes.gate_at("ns", "m1", |_, _| None, at(0));
        *gate.try_lock().expect("free") = written("10");
        drop(gate);
        // the cache is at 9: m1's write is kept for its next writer
        drop(writes.gate_at("ns", "m2", |_, name| (name == "m1").then_some(9), at(1)));
        assert_eq!(writes.len(), 2);
        // the cache caught up with m1 (and m2 wrote nothing): both go
        drop(writes.gate_at("ns", "m3", |_, name| (name == "m1").then_some(10), at(2)));
        assert_eq!(writes.len(), 1, "only m3, just asked for");
        // an entry whose write is in flight stays whatever the cache says
        let held = writes.gate_at("ns", "m4", |_, _| None, at(3));
        drop(writes.gate_at("ns", "m5", |_, _| Some(u64::MAX), at(4)));
        assert_eq!(writes.len(), 2, "m4 (held) and m5");
        drop(held);
        // a write the cache never shows is kept RECENT at most
        let gate = writes.gate_at("ns", "m6", |_, _| None, at(5));
        *gate.try_lock().expect("free") = written("20");
        drop(gate);
        drop(writes.gate_at("ns", "m7", |_, _| None, at(5) + RECENT / 2));
        assert!(
            writes.len() >= 2 && writes.0.lock().expect("lock").by_machine.contains_key(&("ns".into(), "m6".into()))
        );
        drop(writes.gate_at("ns", "m8", |_, _| None, at(5) + RECENT + SWEEP));
        assert!(
            !writes.0.lock().expect("lock").by_machine.contains_key(&("ns".into(), "m6".into())),
            "gone after RECENT"
        );
    }

    /// A reconcile plans from this process's own last write where the cache is behind it (a machine it just
    /// marked Queued is not queued again), and from the cache where it is not.
    #[test]
    fn a_plan_sees_its_own_marks_before_the_cache_does() {
        use nio_shared::crd::MachinePhase::{Applied, Pending, Queued};
        let cached = |name: &str, rv: &str, phase| {
            let spec = serde_json::from_value(serde_json::json!({"hostname": name})).expect("spec");
            let mut m = Machine::new(name, spec);
            m.metadata.resource_version = Some(rv.into());
            m.status = Some(MachineStatus { phase: Some(phase), ..Default::default() });
            Arc::new(m)
        };
        let writes = MachineWrites::default();
        for (name, rv) in [("m1", "12"), ("m2", "12")] {
            let gate = writes.gate("ns", name, |_, _| None);
            *gate.try_lock().expect("free") =
                Some(Box::new((rv.to_string(), MachineStatus { phase: Some(Queued), ..Default::default() })));
        }
        let mut machines = vec![cached("m1", "10", Pending), cached("m2", "15", Applied), cached("m3", "3", Pending)];
        writes.overlay("ns", &mut machines);
        let seen: Vec<_> = machines
            .iter()
            .map(|m| (m.metadata.resource_version.as_deref(), m.status.as_ref().and_then(|s| s.phase)))
            .collect();
        assert_eq!(seen, [(Some("12"), Some(Queued)), (Some("15"), Some(Applied)), (Some("3"), Some(Pending))]);
    }

    #[test]
    fn a_write_starts_from_this_process_last_write_only_while_the_cache_is_behind_it() {
        let at = |rv: &str, phase: nio_shared::crd::MachinePhase| {
            let spec = serde_json::from_value(serde_json::json!({"hostname": "m1"})).expect("spec");
            let mut m = Machine::new("m1", spec);
            m.metadata.resource_version = Some(rv.into());
            m.status = Some(MachineStatus { phase: Some(phase), ..Default::default() });
            m
        };
        use nio_shared::crd::MachinePhase::{Applying, Queued};
        let written = || Some(("12".to_string(), MachineStatus { phase: Some(Queued), ..Default::default() }));
        // the cache is behind our write (rv 10 < 12): the write starts from ours
        let cached = at("10", Applying);
        let m = latest(Some(&cached), written()).unwrap();
        assert_eq!(
            (m.metadata.resource_version.as_deref(), m.status.as_ref().and_then(|s| s.phase)),
            (Some("12"), Some(Queued))
        );
        assert_eq!((m.metadata.name.as_deref(), &m.spec), (Some("m1"), &cached.spec), "the rest is the cache's");
        // the cache caught up or moved past it (rv 15): the cache's copy, not a copy of it
        let cached = at("15", Applying);
        let m = latest(Some(&cached), written()).unwrap();
        assert!(matches!(m, Cow::Borrowed(b) if std::ptr::eq(b, &cached)));
        // a version that is not a number never wins over one that is
        let m = latest(Some(&cached), Some(("x".into(), MachineStatus::default()))).unwrap();
        assert_eq!(m.metadata.resource_version.as_deref(), Some("15"));
    }
}
