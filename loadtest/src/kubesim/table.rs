//! `meta.k8s.io/v1` Table responses from a type's printer columns, as `kubectl get` requests them.

use serde_json::{Value, json};

use super::registry::ResourceType;

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `.a[0]`, `.a[?(@.k=="v")].b`.
pub fn json_path(obj: &Value, path: &str) -> Option<Value> {
    let mut cur = vec![obj.clone()];
    let mut rest = path.trim().trim_start_matches('{').trim_end_matches('}').trim_start_matches('$');
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let key = &r[..end];
            cur = cur.iter().filter_map(|v| v.get(key).cloned()).collect();
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = &r[..end];
            rest = &r[end + 1..];
            if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (k, v) = filter.split_once("==")?;
                let want = v.trim().trim_matches(|c| c == '"' || c == '\'');
                cur = cur
                    .iter()
                    .filter_map(Value::as_array)
                    .flatten()
                    .filter(|item| item.get(k.trim()).and_then(Value::as_str) == Some(want))
                    .cloned()
                    .collect();
            } else if inner == "*" {
                cur = cur.iter().filter_map(Value::as_array).flatten().cloned().collect();
            } else {
                let i: usize = inner.parse().ok()?;
                cur = cur.iter().filter_map(|v| v.get(i).cloned()).collect();
            }
        } else {
            return None;
        }
    }
    match cur.len() {
        0 => None,
        1 => cur.pop(),
        _ => Some(Value::String(
            cur.iter().map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)).collect::<Vec<_>>().join(","),
        )),
    }
}

/// Human age of an RFC 3339 timestamp, as the API server's table convertor prints it.
pub fn age(ts: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(ts) else { return "<unknown>".into() };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 8 * 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s if s < 8 * 86400 => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn column_defs(rt: &ResourceType) -> Vec<Value> {
    let mut cols = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
    ];
    if rt.columns.is_empty() {
        cols.push(
            json!({"name": "Age", "type": "date", "format": "", "description": "Time since creation", "priority": 0}),
        );
    }
    for c in &rt.columns {
        cols.push(json!({"name": c.name, "type": c.type_, "format": c.format.clone().unwrap_or_default(), "description": c.description, "priority": c.priority}));
    }
    cols
}

fn row(rt: &ResourceType, obj: &Value, include_object: &str) -> Value {
    let name = obj.pointer("/metadata/name").cloned().unwrap_or(Value::Null);
    let mut cells = vec![name];
    let created = obj.pointer("/metadata/creationTimestamp").and_then(Value::as_str).unwrap_or_default();
    if rt.columns.is_empty() {
        cells.push(json!(age(created)));
    }
    for c in &rt.columns {
        let v = json_path(obj, &c.json_path);
        cells.push(match (c.type_.as_str(), v) {
            (_, None) => Value::Null,
            ("date", Some(Value::String(s))) => json!(age(&s)),
            ("string", Some(v)) => v.as_str().map_or_else(|| json!(v.to_string()), |s| json!(s)),
            (_, Some(v)) => v,
        });
    }
    let object = match include_object {
        "None" => Value::Null,
        "Object" => obj.clone(),
        _ => {
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({}))})
        }
    };
    json!({"cells": cells, "object": object})
}

/// A Table of `items`.
pub fn table(rt: &ResourceType, items: &[&Value], resource_version: Option<String>, include_object: &str) -> Value {
    let mut meta = json!({});
    if let Some(rv) = resource_version {
        meta["resourceVersion"] = json!(rv);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": column_defs(rt),
        "rows": items.iter().map(|o| row(rt, o, include_object)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_path_subset() {
        let o = json!({"spec": {"site": "dc1"}, "status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "X", "status": "False"}]}});
        assert_eq!(json_path(&o, ".spec.site"), Some(json!("dc1")));
        assert_eq!(json_path(&o, ".status.conditions[?(@.type==\"Ready\")].status"), Some(json!("True")));
        assert_eq!(json_path(&o, ".status.conditions[1].type"), Some(json!("X")));
        assert_eq!(json_path(&o, ".status.missing"), None);
    }
}
