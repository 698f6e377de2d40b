//! Field ownership for server-side apply: which manager set which leaf field, conflicts, and removal of fields a
//! manager stopped applying. Objects are tracked to their leaves. A list whose schema says
//! `x-kubernetes-list-type: map` is tracked item by item (an item is named `k:{"key":"value"}` by its
//! `x-kubernetes-list-map-keys`, as in `managedFields`), and applies merge into it by key; every other list is
//! atomic.

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

/// The key fields of a list whose schema makes it a map (`x-kubernetes-list-type: map`).
pub fn map_keys(schema: &Value) -> Option<Vec<String>> {
    if schema.get("x-kubernetes-list-type").and_then(Value::as_str) != Some("map") {
        return None;
    }
    let keys = schema.get("x-kubernetes-list-map-keys")?.as_array()?;
    Some(keys.iter().filter_map(|k| k.as_str().map(str::to_string)).collect())
}

/// The path element naming `item` of a map list: `k:{"name":"value",...}` (keys in order).
pub fn item_key(item: &Value, keys: &[String]) -> String {
    let mut m = Map::new();
    for k in keys {
        m.insert(k.clone(), item.get(k).cloned().unwrap_or(Value::Null));
    }
    format!("k:{}", Value::Object(m))
}

/// The key fields and values an item path element names.
fn parse_item_key(element: &str) -> Option<Map<String, Value>> {
    let json = element.strip_prefix("k:")?;
    serde_json::from_str::<Value>(json).ok()?.as_object().cloned()
}

/// The schema of `name` under the object schema `schema`.
fn child_schema<'a>(schema: Option<&'a Value>, name: &str) -> Option<&'a Value> {
    let s = schema?;
    s.get("properties").and_then(|p| p.get(name)).or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
}

/// Every leaf path of `v` in `scope`, items of the map lists `schema` declares tracked one by one.
pub fn leaves_with(v: &Value, scope: Scope, schema: Option<&Value>) -> BTreeSet<Path> {
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
                    collect(mv, vec!["metadata".into(), mk.clone()], None, &mut out);
                }
            }
        } else {
            collect(child, vec![k.clone()], child_schema(schema, k), &mut out);
        }
    }
    out
}

fn collect(v: &Value, path: Path, schema: Option<&Value>, out: &mut BTreeSet<Path>) {
    match (v, schema.and_then(map_keys)) {
        (Value::Object(m), _) => {
            // Empty objects own nothing; their fields are owned leaf by leaf.
            for (k, c) in m {
                let mut p = path.clone();
                p.push(k.clone());
                collect(c, p, child_schema(schema, k), out);
            }
        }
        (Value::Array(items), Some(keys)) => {
            let item_schema = schema.and_then(|s| s.get("items"));
            for item in items {
                let mut p = path.clone();
                p.push(item_key(item, &keys));
                collect(item, p, item_schema, out);
            }
        }
        _ => {
            out.insert(path);
        }
    }
}

/// The value at `path` (an element `k:{..}` is the map-list item with those keys).
pub fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, k| step(cur, k))
}

fn step<'a>(cur: &'a Value, element: &str) -> Option<&'a Value> {
    match (cur, parse_item_key(element)) {
        (Value::Array(items), Some(keys)) => items.iter().find(|i| keys.iter().all(|(k, v)| i.get(k) == Some(v))),
        _ => cur.get(element),
    }
}

/// The value at `path`, mutably.
fn get_mut<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |cur, k| step_mut(cur, k))
}

fn step_mut<'a>(cur: &'a mut Value, element: &str) -> Option<&'a mut Value> {
    match parse_item_key(element) {
        Some(keys) if cur.is_array() => {
            cur.as_array_mut()?.iter_mut().find(|i| keys.iter().all(|(k, v)| i.get(k) == Some(v)))
        }
        _ => cur.get_mut(element),
    }
}

/// Removes the value at `path`, and parents left empty by it (up to the top-level field). A map-list item
/// goes when nothing but its key fields is left; a key field alone is never removed from an item that still has
/// other fields.
pub fn remove(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else { return };
    let in_item = parents.last().and_then(|p| parse_item_key(p));
    if let Some(keys) = &in_item
        && keys.contains_key(last)
    {
        let others =
            get(v, parents).and_then(Value::as_object).is_some_and(|m| m.keys().any(|k| !keys.contains_key(k)));
        if !others {
            remove_item(v, parents);
        }
        return;
    }
    if let Some(m) = get_mut(v, parents).and_then(Value::as_object_mut) {
        m.remove(last);
    }
    let left = get(v, parents).and_then(Value::as_object);
    match &in_item {
        Some(keys) if left.is_some_and(|m| m.keys().all(|k| keys.contains_key(k))) => {}
        _ if parents.len() > 1 && left.is_some_and(Map::is_empty) => remove(v, parents),
        _ => {}
    }
}

/// Removes the map-list item at `path` (its last element is `k:{..}`), and the list if it is left empty.
fn remove_item(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else { return };
    let Some(keys) = parse_item_key(last) else { return };
    if let Some(items) = get_mut(v, parents).and_then(Value::as_array_mut) {
        items.retain(|i| !keys.iter().all(|(k, val)| i.get(k) == Some(val)));
        if items.is_empty() && parents.len() > 1 {
            remove(v, parents);
        }
    }
}

/// Deep-merges `patch` into `target`: objects merge, map lists (per `schema`) merge item by item by key,
/// everything else replaces.
fn merge_with(target: &mut Value, patch: &Value, schema: Option<&Value>) {
    if let (Some(keys), Some(t), Some(p)) = (schema.and_then(map_keys), target.as_array_mut(), patch.as_array()) {
        let item_schema = schema.and_then(|s| s.get("items"));
        for pi in p {
            let key = item_key(pi, &keys);
            match t.iter_mut().find(|ti| item_key(ti, &keys) == key) {
                Some(ti) => merge_with(ti, pi, item_schema),
                None => t.push(pi.clone()),
            }
        }
        return;
    }
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, pv) in p {
                let sub = child_schema(schema, k);
                match t.get_mut(k) {
                    Some(tv)
                        if (tv.is_object() && pv.is_object())
                            || (tv.is_array() && sub.and_then(map_keys).is_some()) =>
                    {
                        merge_with(tv, pv, sub)
                    }
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
    let children: Vec<(String, &Value)> = m
        .iter()
        .filter_map(|(k, c)| match k.strip_prefix("f:") {
            Some(name) => Some((name.to_string(), c)),
            None => k.starts_with("k:").then(|| (k.clone(), c)),
        })
        .collect();
    let other_items = m.keys().any(|k| k.starts_with("v:") || k.starts_with("i:"));
    if (children.is_empty() || other_items) && !path.is_empty() {
        out.insert(path);
        return;
    }
    for (k, c) in children {
        let mut p = path.clone();
        p.push(k);
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
                    let name = if k.starts_with("k:") { k.clone() } else { format!("f:{k}") };
                    cur = m.entry(name).or_insert_with(|| Value::Object(Map::new()));
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

/// Whether `path` ends at a key field of a map-list item.
fn is_item_key(path: &[String]) -> bool {
    match path {
        [.., item, field] => parse_item_key(item).is_some_and(|keys| keys.contains_key(field)),
        _ => false,
    }
}

/// Server-side apply of `intent` by `manager` onto `old` (None: the object is being created), with the map
/// lists `schema` declares. Returns the new object, or the conflicts when not forced.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    old: Option<&Value>,
    intent: &Value,
    manager: &str,
    scope: Scope,
    force: bool,
    api_version: &str,
    now: &str,
    schema: Option<&Value>,
) -> Result<Value, Vec<Conflict>> {
    let mut entries = old.map(decode).unwrap_or_default();
    let applied = leaves_with(intent, scope, schema);
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
        // An item's other fields go before its keys, so an item left with nothing but its keys goes too.
        let dropped: Vec<&Path> = prev.fields.difference(&applied).collect();
        let ordered = dropped.iter().filter(|p| !is_item_key(p)).chain(dropped.iter().filter(|p| is_item_key(p)));
        for p in ordered {
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
    merge_with(&mut new, &scoped, schema);
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
#[allow(clippy::too_many_arguments)]
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    scope: Scope,
    api_version: &str,
    now: &str,
    schema: Option<&Value>,
) {
    let mut entries = old.map(decode).unwrap_or_default();
    let before = old.map(|o| leaves_with(o, scope, schema)).unwrap_or_default();
    let after = leaves_with(new, scope, schema);
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
        let o1 = apply(None, &a1, "alice", Scope::Main, false, "v1", now, None).unwrap();
        // bob sets a different value for a field alice owns: conflict unless forced
        let b1 = json!({"metadata": {"name": "x"}, "spec": {"a": 5}});
        let err = apply(Some(&o1), &b1, "bob", Scope::Main, false, "v1", now, None).unwrap_err();
        assert_eq!(err[0].manager, "alice");
        assert_eq!(err[0].path, vec!["spec".to_string(), "a".to_string()]);
        // the same value is shared ownership, not a conflict
        let b2 = json!({"metadata": {"name": "x"}, "spec": {"b": 2, "c": 3}});
        let o2 = apply(Some(&o1), &b2, "bob", Scope::Main, false, "v1", now, None).unwrap();
        assert_eq!(o2["spec"], json!({"a": 1, "b": 2, "c": 3}));
        // alice stops applying a and b: a is removed, b stays because bob owns it too... (bob took it over)
        let a2 = json!({"metadata": {"name": "x"}, "spec": {}});
        let o3 = apply(Some(&o2), &a2, "alice", Scope::Main, false, "v1", now, None).unwrap();
        assert_eq!(o3["spec"], json!({"b": 2, "c": 3}));
        let forced = apply(Some(&o3), &json!({"spec": {"b": 9}}), "carol", Scope::Main, true, "v1", now, None).unwrap();
        assert_eq!(forced["spec"]["b"], 9);
        let owners: Vec<_> =
            decode(&forced).into_iter().filter(|e| e.fields.contains(&vec!["spec".into(), "b".into()])).collect();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].manager, "carol");
    }
}
