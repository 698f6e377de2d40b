//! The Machines a term's watch holds, and a label index over them, so that a fleet reconcile reads only the
//! machines its selector can match: not a LIST per reconcile (the largest API cost at 10,000 Machines) and not
//! a scan of every cached Machine (which grows with fleets × machines).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use nio_shared::crd::Machine;

/// Stores `ev`'s Machine in the reflector store without its labels and passes the event on whole. The labels
/// of a stored Machine are in the cache's index ([`MachineCache::select`], [`MachineCache::labelled`]), interned:
/// each machine's own label map (a B-tree node of ~600 bytes however few labels it has) was a quarter of the cache
/// at 10,000 Machines.
pub fn store_unlabelled(writer: &mut Writer<Machine>, mut ev: watcher::Event<Machine>) -> watcher::Event<Machine> {
    use watcher::Event::{Apply, Delete, InitApply};
    let labels = match &mut ev {
        Apply(m) | InitApply(m) | Delete(m) => m.metadata.labels.take(),
        _ => None,
    };
    writer.apply_watcher_event(&ev);
    if let Apply(m) | InitApply(m) | Delete(m) = &mut ev {
        m.metadata.labels = labels;
    }
    ev
}

/// One watch's Machines: the reflector's store (Machines without their labels) and the label index kept beside
/// it.
pub struct MachineCache {
    /// The namespace the watch covers (None: all).
    pub scope: Option<String>,
    pub store: Store<Machine>,
    index: Mutex<Index>,
    /// Whether the watch's first list is in the store ([`MachineCache::ready`]).
    listed: tokio::sync::watch::Sender<bool>,
}

/// A string of the index, shared by every entry that holds it: a fleet's label keys and values repeat on
/// thousands of machines, and each machine's name appears once per label.
type Str = Arc<str>;

#[derive(Default)]
struct Index {
    /// Every string the index holds, once.
    strings: HashSet<Str>,
    /// (namespace, key, value) → names of the machines with that label.
    by_label: HashMap<(Str, Str, Str), BTreeSet<Str>>,
    /// namespace → names of its machines.
    by_namespace: HashMap<Str, BTreeSet<Str>>,
    /// (namespace, name) → the labels indexed for it.
    labels: HashMap<(Str, Str), Vec<(Str, Str)>>,
    /// The index being rebuilt by a (re)list, swapped in when the list is done.
    relist: Option<Box<Index>>,
}

impl Index {
    fn intern(&mut self, s: &str) -> Str {
        if let Some(known) = self.strings.get(s) {
            return known.clone();
        }
        let fresh: Str = Arc::from(s);
        self.strings.insert(fresh.clone());
        fresh
    }

    /// The labels indexed for `ns/name`.
    fn indexed(&self, ns: &str, name: &str) -> Option<&Vec<(Str, Str)>> {
        let (ns, name) = (self.strings.get(ns)?, self.strings.get(name)?);
        self.labels.get(&(ns.clone(), name.clone()))
    }

    /// Forgets `s` once nothing but the pool (and the caller's copy) holds it.
    fn release(&mut self, s: Str) {
        if Arc::strong_count(&s) <= 2 {
            self.strings.remove(&s);
        }
    }

    fn insert(&mut self, ns: &str, name: &str, labels: &BTreeMap<String, String>) {
        // Most watch events are status writes: nothing to do when the labels are the ones indexed.
        let same = self.indexed(ns, name).is_some_and(|old| {
            old.len() == labels.len() && old.iter().zip(labels).all(|((k, v), (k2, v2))| **k == **k2 && **v == **v2)
        });
        if same {
            return;
        }
        self.remove(ns, name);
        let (ns, name) = (self.intern(ns), self.intern(name));
        let mut indexed = Vec::with_capacity(labels.len());
        for (k, v) in labels {
            let (k, v) = (self.intern(k), self.intern(v));
            self.by_label.entry((ns.clone(), k.clone(), v.clone())).or_default().insert(name.clone());
            indexed.push((k, v));
        }
        self.by_namespace.entry(ns.clone()).or_default().insert(name.clone());
        self.labels.insert((ns, name), indexed);
    }

    fn remove(&mut self, ns: &str, name: &str) {
        let (Some(ns), Some(name)) = (self.strings.get(ns).cloned(), self.strings.get(name).cloned()) else { return };
        let Some(old) = self.labels.remove(&(ns.clone(), name.clone())) else { return };
        for (k, v) in old {
            let key = (ns.clone(), k, v);
            if let Some(names) = self.by_label.get_mut(&key) {
                names.remove(&name);
                if names.is_empty() {
                    self.by_label.remove(&key);
                }
            }
            let (_, k, v) = key;
            self.release(k);
            self.release(v);
        }
        if let Some(names) = self.by_namespace.get_mut(&ns) {
            names.remove(&name);
            if names.is_empty() {
                self.by_namespace.remove(&ns);
            }
        }
        self.release(name);
        self.release(ns);
    }

    /// Names in `ns` that can match `sel`: the smallest set one of its equality terms allows, else all.
    fn candidates(&self, ns: &str, sel: &LabelSelector) -> BTreeSet<Str> {
        let Some(ns) = self.strings.get(ns) else { return BTreeSet::new() };
        let label = |k: &str, v: &str| {
            let (k, v) = (self.strings.get(k)?, self.strings.get(v)?);
            self.by_label.get(&(ns.clone(), k.clone(), v.clone()))
        };
        let mut sets: Vec<BTreeSet<Str>> = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            sets.push(label(k, v).cloned().unwrap_or_default());
        }
        for e in sel.match_expressions.iter().flatten().filter(|e| e.operator == "In") {
            let values = e.values.iter().flatten();
            sets.push(values.filter_map(|v| label(&e.key, v)).flatten().cloned().collect());
        }
        sets.into_iter()
            .min_by_key(BTreeSet::len)
            .unwrap_or_else(|| self.by_namespace.get(ns).cloned().unwrap_or_default())
    }
}

fn key(m: &Machine) -> (String, String) {
    (m.metadata.namespace.clone().unwrap_or_default(), m.metadata.name.clone().unwrap_or_default())
}

impl MachineCache {
    pub fn new(scope: Option<String>, store: Store<Machine>) -> Self {
        MachineCache {
            scope,
            store,
            index: Mutex::new(Index::default()),
            listed: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Waits until the watch's first list is in the store. Any number of tasks may wait together: kube-runtime's
    /// own `Store::wait_until_ready` wakes only the task that polled it last (its readiness is a oneshot receiver
    /// behind a mutex, which keeps one waker), so a reconcile waiting beside the Machine controller's runner slept
    /// until its 30 s timeout.
    pub async fn ready(&self) {
        let mut listed = self.listed.subscribe();
        // The sender lives as long as `self`: this cannot fail while borrowed.
        let _ = listed.wait_for(|done| *done).await;
    }

    /// Keeps the index in step with the watch and says when the first list is done; call with each event after
    /// the store applied it.
    pub fn observe(&self, ev: &watcher::Event<Machine>) {
        self.index_event(ev);
        // After the index took the list in, and whatever became of the index: the store has the list.
        if matches!(ev, watcher::Event::InitDone) {
            self.listed.send_replace(true);
        }
    }

    fn index_event(&self, ev: &watcher::Event<Machine>) {
        let Ok(mut index) = self.index.lock() else { return };
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        fn labels(m: &Machine) -> &BTreeMap<String, String> {
            m.metadata.labels.as_ref().unwrap_or(&NONE)
        }
        match ev {
            watcher::Event::Init => index.relist = Some(Box::default()),
            watcher::Event::InitApply(m) => {
                let (ns, name) = key(m);
                match index.relist.as_mut() {
                    Some(fresh) => fresh.insert(&ns, &name, labels(m)),
                    None => index.insert(&ns, &name, labels(m)),
                }
            }
            watcher::Event::InitDone => {
                if let Some(fresh) = index.relist.take() {
                    *index = *fresh;
                }
            }
            watcher::Event::Apply(m) => {
                let (ns, name) = key(m);
                index.insert(&ns, &name, labels(m));
            }
            watcher::Event::Delete(m) => {
                let (ns, name) = key(m);
                index.remove(&ns, &name);
            }
        }
    }

    /// The cached Machine `ns/name` (shared with the cache, not copied).
    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<Machine>> {
        self.store.get(&ObjectRef::new(name).within(ns))
    }

    /// The cached Machines of `ns` whose labels match `sel`, looking only at those its equality terms allow;
    /// shared with the cache, not copied (a fleet reconcile copying its thousand machines was a fifth of the
    /// controller's memory at 10,000 Machines).
    pub fn select(&self, ns: &str, sel: &LabelSelector) -> Vec<Arc<Machine>> {
        let names: Vec<Str> = match self.index.lock() {
            Ok(index) => index
                .candidates(ns, sel)
                .into_iter()
                .filter(|name| {
                    let labels = index.indexed(ns, name).map(Vec::as_slice).unwrap_or_default();
                    crate::waves::selector_matches_by(sel, |k| {
                        labels.iter().find(|(key, _)| &**key == k).map(|(_, v)| &**v)
                    })
                })
                .collect(),
            Err(_) => return Vec::new(),
        };
        names.iter().filter_map(|name| self.store.get(&ObjectRef::new(name).within(ns))).collect()
    }

    /// The name and labels of each of `machines` of `ns` (the stored Machines carry none).
    pub fn labelled(&self, ns: &str, machines: &[Arc<Machine>]) -> Vec<(String, BTreeMap<String, String>)> {
        let index = self.index.lock().ok();
        let labels = |name: &str| -> BTreeMap<String, String> {
            let indexed = index.as_ref().and_then(|ix| ix.indexed(ns, name));
            indexed.into_iter().flatten().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        machines
            .iter()
            .map(|m| {
                let name = m.name_any();
                let labels = labels(&name);
                (name, labels)
            })
            .collect()
    }
}

/// One term's watch of the Secrets that opted in (label `nixos.infra/usable-by=nio`): what a reconcile reads a
/// configuration's Secrets from, so that it makes no request for them, and never reads one that did not opt in.
pub struct SecretCache {
    /// The namespace the watch covers (None: all).
    pub scope: Option<String>,
    store: Store<k8s_openapi::api::core::v1::Secret>,
    /// The store holds the watch's latest list and no error came since (else the reconcile asks the apiserver).
    current: std::sync::atomic::AtomicBool,
}

impl SecretCache {
    pub fn new(scope: Option<String>, store: Store<k8s_openapi::api::core::v1::Secret>) -> Self {
        SecretCache { scope, store, current: Default::default() }
    }

    /// Records how the watch is doing: current after a complete list, not after an error.
    pub fn set_current(&self, current: bool) {
        self.current.store(current, std::sync::atomic::Ordering::SeqCst);
    }

    /// `ns/name` as the watch has it: Some(Some) an opted-in Secret, Some(None) no opted-in Secret of that name,
    /// None when the watch cannot tell (not listed yet, or failing).
    pub fn get(&self, ns: &str, name: &str) -> Option<Option<Arc<k8s_openapi::api::core::v1::Secret>>> {
        if !self.current.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        Some(self.store.get(&ObjectRef::new(name).within(ns)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn machine(name: &str, labels: serde_json::Value) -> Machine {
        serde_json::from_value(json!({
            "apiVersion": "nixos.infra/v1alpha1", "kind": "Machine",
            "metadata": {"name": name, "namespace": "ns", "labels": labels},
            "spec": {"hostname": "h", "site": "dc1"}
        }))
        .expect("machine")
    }

    fn selector(v: serde_json::Value) -> LabelSelector {
        serde_json::from_value(v).expect("selector")
    }

    fn names(set: BTreeSet<Str>) -> Vec<String> {
        set.into_iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn candidates_follow_label_changes_deletes_and_relists() {
        let mut ix = Index::default();
        for (name, labels) in [
            ("a", json!({"role": "web", "rack": "r1"})),
            ("b", json!({"role": "web", "rack": "r2"})),
            ("c", json!({"role": "db"})),
        ] {
            let m = machine(name, labels);
            ix.insert("ns", name, m.metadata.labels.as_ref().expect("labels"));
        }
        let web = selector(json!({"matchLabels": {"role": "web"}}));
        assert_eq!(names(ix.candidates("ns", &web)), ["a", "b"]);
        // the smallest equality term narrows
        let web_r2 = selector(json!({"matchLabels": {"role": "web", "rack": "r2"}}));
        assert_eq!(names(ix.candidates("ns", &web_r2)), ["b"]);
        let either =
            selector(json!({"matchExpressions": [{"key": "role", "operator": "In", "values": ["db", "web"]}]}));
        assert_eq!(names(ix.candidates("ns", &either)), ["a", "b", "c"]);
        // no equality term: every machine of the namespace, none of another
        let not_db = selector(json!({"matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["db"]}]}));
        assert_eq!(names(ix.candidates("ns", &not_db)), ["a", "b", "c"]);
        assert!(ix.candidates("other", &not_db).is_empty());
        // a relabel moves a machine; a delete removes it
        ix.insert("ns", "a", &[("role".to_string(), "db".to_string())].into());
        assert_eq!(names(ix.candidates("ns", &web)), ["b"]);
        ix.remove("ns", "b");
        assert!(ix.candidates("ns", &web).is_empty());
        assert_eq!(names(ix.candidates("ns", &not_db)), ["a", "c"]);
        assert!(!ix.by_label.contains_key(&("ns".into(), "rack".into(), "r2".into())), "empty sets are dropped");
        // the strings of what is gone are forgotten, those still in use kept once
        let mut pool: Vec<String> = ix.strings.iter().map(|s| s.to_string()).collect();
        pool.sort();
        assert_eq!(pool, ["a", "c", "db", "ns", "role"]);
        ix.remove("ns", "a");
        ix.remove("ns", "c");
        assert!(ix.strings.is_empty() && ix.labels.is_empty() && ix.by_namespace.is_empty());
    }

    /// Reconciles wait for the first list beside the Machine controller's runner; every one of them must wake
    /// when it is done (the flake of `a_failure_with_a_long_utf8_log_still_gets_its_event::real_apiserver`:
    /// a reconcile slept through it, so no job for 30 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_task_waiting_for_the_first_list_wakes_when_it_is_done() {
        let (store, mut writer) = kube::runtime::reflector::store::<Machine>();
        let cache = Arc::new(MachineCache::new(None, store));
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.ready().await })
            })
            .collect();
        // Each waiter has polled (subscribing and parking happen in its first poll) before the list ends.
        while cache.listed.receiver_count() < waiters.len() {
            tokio::task::yield_now().await;
        }
        assert!(waiters.iter().all(|w| !w.is_finished()), "ready before the list");
        for ev in [watcher::Event::Init, watcher::Event::InitApply(machine("a", json!({}))), watcher::Event::InitDone] {
            let ev = store_unlabelled(&mut writer, ev);
            cache.observe(&ev);
        }
        for (i, w) in waiters.into_iter().enumerate() {
            tokio::time::timeout(std::time::Duration::from_secs(5), w)
                .await
                .unwrap_or_else(|_| panic!("waiter {i} slept through the end of the first list"))
                .expect("waiter");
        }
        assert!(cache.get("ns", "a").is_some(), "ready means listed");
        // Waiting again once ready returns at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), cache.ready()).await.expect("ready stays ready");
    }

    #[tokio::test]
    async fn a_relist_replaces_the_index_and_forgets_machines_deleted_meanwhile() {
        let (store, _writer) = kube::runtime::reflector::store::<Machine>();
        let cache = MachineCache::new(None, store);
        let web = selector(json!({"matchLabels": {"role": "web"}}));
        cache.observe(&watcher::Event::Apply(machine("a", json!({"role": "web"}))));
        cache.observe(&watcher::Event::Apply(machine("b", json!({"role": "web"}))));
        let candidates = || names(cache.index.lock().expect("index").candidates("ns", &web));
        assert_eq!(candidates(), ["a", "b"]);
        cache.observe(&watcher::Event::Init);
        cache.observe(&watcher::Event::InitApply(machine("b", json!({"role": "web"}))));
        assert_eq!(candidates(), ["a", "b"], "the old index serves until the list is done");
        cache.observe(&watcher::Event::InitDone);
        assert_eq!(candidates(), ["b"]);
    }

    /// The store keeps Machines without their labels, the watch's consumers get them whole, and selection and
    /// the labels a rollout reads come from the index.
    #[tokio::test]
    async fn stored_machines_leave_their_labels_to_the_index() {
        let (store, mut writer) = kube::runtime::reflector::store::<Machine>();
        let cache = MachineCache::new(None, store.clone());
        let mut seen = Vec::new();
        for (name, labels) in [("a", json!({"role": "web", "rack": "r1"})), ("b", json!({"role": "db"}))] {
            let ev = store_unlabelled(&mut writer, watcher::Event::Apply(machine(name, labels)));
            cache.observe(&ev);
            seen.push(ev);
        }
        let watcher::Event::Apply(passed) = &seen[0] else { panic!("an Apply") };
        assert_eq!(passed.labels().get("rack").map(String::as_str), Some("r1"), "the event keeps its labels");
        let stored = cache.get("ns", "a").expect("stored");
        assert!(stored.metadata.labels.is_none(), "the store does not");
        let web = selector(json!({"matchLabels": {"role": "web"}}));
        let picked: Vec<String> = cache.select("ns", &web).iter().map(|m| m.name_any()).collect();
        assert_eq!(picked, ["a"]);
        let not_web = selector(json!({"matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["web"]}]}));
        let picked: Vec<String> = cache.select("ns", &not_web).iter().map(|m| m.name_any()).collect();
        assert_eq!(picked, ["b"], "operators without an equality term are matched on the indexed labels");
        let labelled = cache.labelled("ns", &cache.select("ns", &web));
        assert_eq!(labelled[0].1.get("rack").map(String::as_str), Some("r1"));
        // a delete removes it from both
        let gone = store_unlabelled(&mut writer, watcher::Event::Delete(machine("a", json!({"role": "web"}))));
        cache.observe(&gone);
        assert!(cache.get("ns", "a").is_none() && cache.select("ns", &web).is_empty());
    }
}
