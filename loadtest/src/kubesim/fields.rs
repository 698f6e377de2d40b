//! Field ownership for server-side apply: which manager set which leaf field, conflicts, and removal of fields a
//! manager stopped applying. Objects are tracked to their leaves; lists are atomic.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// A leaf field path, e.g. `["spec", "hostname"]`.
pub type Path = Vec<String>;

/// Which part of an object a write may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything but `.status` (for types with a status subresource).
    Main,
    /// Only `.status`.
    Status,
    /// Everything (types without a status subresource).
    All,
}

impl Scope {
    pub fn subresource(self) -> &'static str {
        if self == Scope::Status { "status" } else { "" }
    }
}

/// Metadata fields owned by the API machinery, never by a manager.
const SYSTEM_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
];

/// Every leaf path of `v` in `scope`.
pub fn leaves(v: &Value, scope: Scope) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    let Some(map) = v.as_object() else { return out };
    for (k, child) in map {
        let included = match k.as_str() {
            "apiVersion" | "kind" => false,
            "status" => scope != Scope::Main,
            _ => scope != Scope::Status,
        };
        if !included {
            continue;
        }
        if k == "metadata" {
            if let Some(meta) = child.as_object() {
                for (mk, mv) in meta.iter().filter(|(mk, _)| !SYSTEM_META.contains(&mk.as_str())) {
                    collect(mv, vec!["metadata".into(), mk.clone()], &mut out);
                }
            }
        } else {
            collect(child, vec![k.clone()], &mut out);
        }
    }
    out
}

fn collect(v: &Value, path: Path, out: &mut BTreeSet<Path>) {
    match v.as_object() {
        Some(m) => {
            // Empty objects own nothing; their fields are owned leaf by leaf.
            for (k, c) in m {
                let mut p = path.clone();
                p.push(k.clone());
                collect(c, p, out);
            }
        }
        None => {
            out.insert(path);
        }
    }
}

/// The value at `path`.
pub fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, k| cur.get(k))
}

/// Removes the value at `path`, and parents left empty by it (up to the top-level field).
pub fn remove(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut cur = &mut *v;
    for k in parents {
        match cur.get_mut(k) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
    if parents.len() > 1 && get(v, parents).and_then(Value::as_object).is_some_and(Map::is_empty) {
        remove(v, parents);
    }
}

/// Deep-merges `patch` into `target`: objects merge, everything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, pv) in p {
                match t.get_mut(k) {
                    Some(tv) if tv.is_object() && pv.is_object() => merge(tv, pv),
                    _ => {
                        t.insert(k.clone(), pv.clone());
                    }
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// One manager's ownership, as in `metadata.managedFields`.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub subresource: String,
    pub api_version: String,
    pub time: String,
    pub fields: BTreeSet<Path>,
}

/// Reads `metadata.managedFields`.
pub fn decode(obj: &Value) -> Vec<Entry> {
    let Some(list) = obj.pointer("/metadata/managedFields").and_then(Value::as_array) else { return vec![] };
    list.iter()
        .map(|e| {
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
            let mut fields = BTreeSet::new();
            if let Some(f) = e.get("fieldsV1") {
                decode_fields(f, vec![], &mut fields);
            }
            Entry {
                manager: s("manager"),
                operation: s("operation"),
                subresource: s("subresource"),
                api_version: s("apiVersion"),
                time: s("time"),
                fields,
            }
        })
        .collect()
}

fn decode_fields(v: &Value, path: Path, out: &mut BTreeSet<Path>) {
    let Some(m) = v.as_object() else { return };
    let children: Vec<_> = m.iter().filter_map(|(k, c)| k.strip_prefix("f:").map(|k| (k, c))).collect();
    let has_items = m.keys().any(|k| k.starts_with("k:") || k.starts_with("v:") || k.starts_with("i:"));
    if (children.is_empty() || has_items) && !path.is_empty() {
        out.insert(path);
        return;
    }
    for (k, c) in children {
        let mut p = path.clone();
        p.push(k.to_string());
        decode_fields(c, p, out);
    }
}

/// Writes entries back to `metadata.managedFields` (dropping empty ones).
pub fn encode(obj: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut root = Value::Object(Map::new());
            for p in &e.fields {
                let mut cur = &mut root;
                for k in p {
                    let Some(m) = cur.as_object_mut() else { break };
                    cur = m.entry(format!("f:{k}")).or_insert_with(|| Value::Object(Map::new()));
                }
            }
            let mut v = json!({
                "manager": e.manager, "operation": e.operation, "apiVersion": e.api_version,
                "time": e.time, "fieldsType": "FieldsV1", "fieldsV1": root,
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// A field another manager owns with a different value.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub manager: String,
    pub path: Path,
}

/// Server-side apply of `intent` by `manager` onto `old` (None: the object is being created).
/// Returns the new object, or the conflicts when not forced.
pub fn apply(
    old: Option<&Value>,
    intent: &Value,
    manager: &str,
    scope: Scope,
    force: bool,
    api_version: &str,
    now: &str,
) -> Result<Value, Vec<Conflict>> {
    let mut entries = old.map(decode).unwrap_or_default();
    let applied = leaves(intent, scope);
    let sub = scope.subresource();
    let is_mine = |e: &Entry| e.manager == manager && e.operation == "Apply" && e.subresource == sub;
    if let Some(old) = old {
        let mut conflicts = Vec::new();
        for e in entries.iter().filter(|e| !is_mine(e) && e.subresource == sub) {
            for q in &e.fields {
                for p in applied.iter().filter(|p| overlaps(p, q)) {
                    let at = if p.len() < q.len() { p } else { q };
                    if get(old, at) != get(intent, at) {
                        conflicts.push(Conflict { manager: e.manager.clone(), path: q.clone() });
                    }
                }
            }
        }
        if !conflicts.is_empty() && !force {
            conflicts.dedup();
            return Err(conflicts);
        }
    }
    for e in entries.iter_mut().filter(|e| !is_mine(e) && e.subresource == sub) {
        e.fields.retain(|q| !applied.iter().any(|p| overlaps(p, q)));
    }
    let mut new = old.cloned().unwrap_or_else(|| json!({}));
    if let Some(prev) = entries.iter().find(|e| is_mine(e)) {
        for p in prev.fields.difference(&applied) {
            let owned_elsewhere = entries.iter().any(|e| !is_mine(e) && e.fields.iter().any(|q| overlaps(p, q)));
            if !owned_elsewhere {
                remove(&mut new, p);
            }
        }
    }
    let mut scoped = intent.clone();
    if let Some(m) = scoped.as_object_mut() {
        match scope {
            Scope::Main => {
                m.remove("status");
            }
            Scope::Status => m.retain(|k, _| matches!(k.as_str(), "status" | "apiVersion" | "kind")),
            Scope::All => {}
        }
        // Identity and system metadata come from the stored object, not the intent.
        if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.retain(|k, _| !SYSTEM_META.contains(&k.as_str()) || k == "name" || k == "namespace");
        }
    }
    merge(&mut new, &scoped);
    entries.retain(|e| !is_mine(e));
    entries.push(Entry {
        manager: manager.into(),
        operation: "Apply".into(),
        subresource: sub.into(),
        api_version: api_version.into(),
        time: now.into(),
        fields: applied,
    });
    encode(&mut new, &entries);
    Ok(new)
}

/// Records a non-apply write (create, update, merge or JSON patch) by `manager`: it takes the fields it
/// changed; fields that disappeared leave every manager.
pub fn record_update(old: Option<&Value>, new: &mut Value, manager: &str, scope: Scope, api_version: &str, now: &str) {
    let mut entries = old.map(decode).unwrap_or_default();
    let before = old.map(|o| leaves(o, scope)).unwrap_or_default();
    let after = leaves(new, scope);
    let changed: BTreeSet<Path> =
        after.iter().filter(|p| old.is_none_or(|o| get(o, p) != get(new, p))).cloned().collect();
    let gone: Vec<&Path> = before.difference(&after).collect();
    let sub = scope.subresource();
    for e in entries.iter_mut() {
        e.fields.retain(|q| !gone.iter().any(|g| overlaps(g, q)));
        if e.subresource == sub {
            e.fields.retain(|q| !changed.iter().any(|p| overlaps(p, q)));
        }
    }
    if !changed.is_empty() {
        match entries.iter_mut().find(|e| e.manager == manager && e.operation == "Update" && e.subresource == sub) {
            Some(e) => {
                e.fields.extend(changed);
                e.time = now.into();
            }
            None => entries.push(Entry {
                manager: manager.into(),
                operation: "Update".into(),
                subresource: sub.into(),
                api_version: api_version.into(),
                time: now.into(),
                fields: changed,
            }),
        }
    }
    encode(new, &entries);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_conflicts_force_and_removal() {
        let now = "2026-01-01T00:00:00Z";
        let a1 = json!({"metadata": {"name": "x"}, "spec": {"a": 1, "b": 2}});
        let o1 = apply(None, &a1, "alice", Scope::Main, false, "v1", now).unwrap();
        // bob sets a different value for a field alice owns: conflict unless forced
        let b1 = json!({"metadata": {"name": "x"}, "spec": {"a": 5}});
        let err = apply(Some(&o1), &b1, "bob", Scope::Main, false, "v1", now).unwrap_err();
        assert_eq!(err[0].manager, "alice");
        assert_eq!(err[0].path, vec!["spec".to_string(), "a".to_string()]);
        // the same value is shared ownership, not a conflict
        let b2 = json!({"metadata": {"name": "x"}, "spec": {"b": 2, "c": 3}});
        let o2 = apply(Some(&o1), &b2, "bob", Scope::Main, false, "v1", now).unwrap();
        assert_eq!(o2["spec"], json!({"a": 1, "b": 2, "c": 3}));
        // alice stops applying a and b: a is removed, b stays because bob owns it too... (bob took it over)
        let a2 = json!({"metadata": {"name": "x"}, "spec": {}});
        let o3 = apply(Some(&o2), &a2, "alice", Scope::Main, false, "v1", now).unwrap();
        assert_eq!(o3["spec"], json!({"b": 2, "c": 3}));
        let forced = apply(Some(&o3), &json!({"spec": {"b": 9}}), "carol", Scope::Main, true, "v1", now).unwrap();
        assert_eq!(forced["spec"]["b"], 9);
        let owners: Vec<_> =
            decode(&forced).into_iter().filter(|e| e.fields.contains(&vec!["spec".into(), "b".into()])).collect();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].manager, "carol");
    }
}
