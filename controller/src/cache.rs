//! The Machines a term's watch holds, and a label index over them, so that a fleet reconcile reads only the
//! machines its selector can match: not a LIST per reconcile (the largest API cost at 10,000 Machines) and not
//! a scan of every cached Machine (which grows with fleets × machines).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use nio_shared::crd::Machine;

/// One watch's Machines: the reflector's store and the label index kept beside it.
pub struct MachineCache {
    /// The namespace the watch covers (None: all).
    pub scope: Option<String>,
    pub store: Store<Machine>,
    index: Mutex<Index>,
}

type Labels = BTreeMap<String, String>;

#[derive(Default)]
struct Index {
    /// (namespace, key, value) → names of the machines with that label.
    by_label: HashMap<(String, String, String), BTreeSet<String>>,
    /// namespace → names of its machines.
    by_namespace: HashMap<String, BTreeSet<String>>,
    /// (namespace, name) → the labels indexed for it.
    labels: HashMap<(String, String), Labels>,
    /// The index being rebuilt by a (re)list, swapped in when the list is done.
    relist: Option<Box<Index>>,
}

impl Index {
    fn insert(&mut self, ns: &str, name: &str, labels: Labels) {
        self.remove(ns, name);
        for (k, v) in &labels {
            self.by_label.entry((ns.into(), k.clone(), v.clone())).or_default().insert(name.into());
        }
        self.by_namespace.entry(ns.into()).or_default().insert(name.into());
        self.labels.insert((ns.into(), name.into()), labels);
    }

    fn remove(&mut self, ns: &str, name: &str) {
        let Some(old) = self.labels.remove(&(ns.into(), name.into())) else { return };
        for (k, v) in old {
            let key = (ns.to_string(), k, v);
            if let Some(names) = self.by_label.get_mut(&key) {
                names.remove(name);
                if names.is_empty() {
                    self.by_label.remove(&key);
                }
            }
        }
        if let Some(names) = self.by_namespace.get_mut(ns) {
            names.remove(name);
        }
    }

    /// Names in `ns` that can match `sel`: the smallest set one of its equality terms allows, else all.
    fn candidates(&self, ns: &str, sel: &LabelSelector) -> BTreeSet<String> {
        let label = |k: &str, v: &str| self.by_label.get(&(ns.into(), k.into(), v.into()));
        let mut sets: Vec<BTreeSet<String>> = Vec::new();
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
        MachineCache { scope, store, index: Mutex::new(Index::default()) }
    }

    /// Keeps the index in step with the watch; call with each event after the store applied it.
    pub fn observe(&self, ev: &watcher::Event<Machine>) {
        let Ok(mut index) = self.index.lock() else { return };
        let labels = |m: &Machine| m.metadata.labels.clone().unwrap_or_default();
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

    /// The cached Machine `ns/name`.
    pub fn get(&self, ns: &str, name: &str) -> Option<Machine> {
        self.store.get(&ObjectRef::new(name).within(ns)).map(|m| (*m).clone())
    }

    /// The cached Machines of `ns` for which `selects` holds, looking only at those `sel` can match.
    pub fn select(&self, ns: &str, sel: &LabelSelector, selects: impl Fn(&Machine) -> bool) -> Vec<Machine> {
        let names = match self.index.lock() {
            Ok(index) => index.candidates(ns, sel),
            Err(_) => return Vec::new(),
        };
        names
            .iter()
            .filter_map(|name| self.store.get(&ObjectRef::new(name).within(ns)))
            .filter(|m| selects(m))
            .map(|m| (*m).clone())
            .collect()
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

    fn names(set: BTreeSet<String>) -> Vec<String> {
        set.into_iter().collect()
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
            ix.insert("ns", name, m.metadata.labels.clone().unwrap_or_default());
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
        ix.insert("ns", "a", [("role".to_string(), "db".to_string())].into());
        assert_eq!(names(ix.candidates("ns", &web)), ["b"]);
        ix.remove("ns", "b");
        assert!(ix.candidates("ns", &web).is_empty());
        assert_eq!(names(ix.candidates("ns", &not_db)), ["a", "c"]);
        assert!(!ix.by_label.contains_key(&("ns".into(), "rack".into(), "r2".into())), "empty sets are dropped");
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
}
