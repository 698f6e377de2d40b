//! Structural-schema handling as the API server does it for custom resources: prune unknown fields, apply
//! defaults, then validate types, required fields, enums, patterns and bounds.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use serde_json::{Map, Value};

/// One field-level failure, reported in a 422 Status's `details.causes`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

/// What happened to an object under its schema.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Validation failures (422).
    pub causes: Vec<Cause>,
    /// Fields dropped because the schema does not know them (strict field validation turns these into errors).
    pub unknown: Vec<String>,
}

static REGEXES: LazyLock<Mutex<HashMap<String, Option<regex::Regex>>>> = LazyLock::new(Default::default);

fn regex_matches(pattern: &str, s: &str) -> bool {
    let Ok(mut cache) = REGEXES.lock() else { return true };
    let re = cache.entry(pattern.to_string()).or_insert_with(|| regex::Regex::new(pattern).ok());
    re.as_ref().is_none_or(|re| re.is_match(s))
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 { format!("{}...", &s[..s.floor_char_boundary(80)]) } else { s }
}

/// Prunes, defaults and validates `obj` (a whole object) against a CRD version's openAPIV3Schema.
pub fn process(schema: &Value, obj: &mut Value) -> Outcome {
    let mut out = Outcome::default();
    let Some(map) = obj.as_object_mut() else {
        out.causes.push(Cause {
            reason: "FieldValueInvalid",
            field: "".into(),
            message: "object must be a JSON object".into(),
        });
        return out;
    };
    // apiVersion, kind and metadata are governed by the API machinery, not the CRD schema.
    let props = schema.get("properties").and_then(Value::as_object);
    let keys: Vec<String> = map.keys().cloned().collect();
    for k in keys {
        if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(&k)) {
            Some(sub) => {
                if map.get(&k).is_some_and(Value::is_null) && !nullable(sub) {
                    map.remove(&k);
                } else if let Some(v) = map.get_mut(&k) {
                    walk(sub, v, &k, &mut out);
                }
            }
            None if preserves(schema) => {}
            None => {
                map.remove(&k);
                out.unknown.push(k);
            }
        }
    }
    if let Some(props) = props {
        for (k, sub) in props {
            if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") || map.contains_key(k) {
                continue;
            }
            if let Some(d) = sub.get("default") {
                let mut d = d.clone();
                walk(sub, &mut d, k, &mut out);
                map.insert(k.clone(), d);
            }
        }
    }
    required(schema, map, "", &mut out);
    out
}

fn nullable(schema: &Value) -> bool {
    schema.get("nullable").and_then(Value::as_bool) == Some(true)
}

fn preserves(schema: &Value) -> bool {
    schema.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool) == Some(true)
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() { k.to_string() } else { format!("{path}.{k}") }
}

fn required(schema: &Value, map: &Map<String, Value>, path: &str, out: &mut Outcome) {
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                out.causes.push(Cause {
                    reason: "FieldValueRequired",
                    field: join(path, r),
                    message: "Required value".into(),
                });
            }
        }
    }
}

fn invalid(out: &mut Outcome, path: &str, v: &Value, msg: String) {
    out.causes.push(Cause {
        reason: "FieldValueInvalid",
        field: path.into(),
        message: format!("Invalid value: {}: {msg}", short(v)),
    });
}

fn walk(schema: &Value, v: &mut Value, path: &str, out: &mut Outcome) {
    if v.is_null() {
        if !nullable(schema) {
            invalid(out, path, v, format!("{path} in body must not be null"));
        }
        return;
    }
    let int_or_string = schema.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true);
    let ty = schema.get("type").and_then(Value::as_str);
    let type_ok = match (ty, &*v) {
        _ if int_or_string => v.is_i64() || v.is_u64() || v.is_string(),
        (None, _) => true,
        (Some("object"), Value::Object(_)) => true,
        (Some("array"), Value::Array(_)) => true,
        (Some("string"), Value::String(_)) => true,
        (Some("boolean"), Value::Bool(_)) => true,
        (Some("integer"), Value::Number(n)) => n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0),
        (Some("number"), Value::Number(_)) => true,
        _ => false,
    };
    if !type_ok {
        let got = match v {
            Value::Object(_) => "object",
            Value::Array(_) => "array",
            Value::String(_) => "string",
            Value::Bool(_) => "boolean",
            Value::Number(_) => "number",
            Value::Null => "null",
        };
        invalid(
            out,
            path,
            &Value::String(got.into()),
            format!("{path} in body must be of type {}: \"{got}\"", ty.unwrap_or("?")),
        );
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        out.causes.push(Cause {
            reason: "FieldValueNotSupported",
            field: path.into(),
            message: format!("Unsupported value: {}: supported values: {}", short(v), list.join(", ")),
        });
    }
    match v {
        Value::Object(map) => walk_object(schema, map, path, out),
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && n < min
            {
                invalid(out, path, &Value::from(n), format!("{path} in body should have at least {min} items"));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && n > max
            {
                invalid(out, path, &Value::from(n), format!("{path} in body should have at most {max} items"));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(item_schema, item, &format!("{path}[{i}]"), out);
                }
            }
            if let Some(keys) = crate::kubesim::fields::map_keys(schema) {
                let mut seen = std::collections::BTreeSet::new();
                for (i, item) in items.iter().enumerate() {
                    let key = crate::kubesim::fields::item_key(item, &keys);
                    if !seen.insert(key.clone()) {
                        out.causes.push(Cause {
                            reason: "FieldValueDuplicate",
                            field: format!("{path}[{i}]"),
                            message: format!("Duplicate value: {}", key.trim_start_matches("k:")),
                        });
                    }
                }
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            let sv = Value::String(s.clone());
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                invalid(out, path, &sv, format!("{path} in body should be at least {min} chars long"));
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                out.causes.push(Cause {
                    reason: "FieldValueTooLong",
                    field: path.into(),
                    message: format!("Too long: may not be more than {max} bytes"),
                });
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str)
                && !regex_matches(p, s)
            {
                invalid(out, path, &sv, format!("{path} in body should match '{p}'"));
            }
        }
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or_default();
            let num = Value::Number(n.clone());
            let excl_min = schema.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true);
            let excl_max = schema.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && (f < min || (excl_min && f == min))
            {
                invalid(out, path, &num, format!("{path} in body should be greater than or equal to {min}"));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && (f > max || (excl_max && f == max))
            {
                invalid(out, path, &num, format!("{path} in body should be less than or equal to {max}"));
            }
        }
        _ => {}
    }
}

fn walk_object(schema: &Value, map: &mut Map<String, Value>, path: &str, out: &mut Outcome) {
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    let keys: Vec<String> = map.keys().cloned().collect();
    for k in keys {
        let p = join(path, &k);
        let sub = props.and_then(|ps| ps.get(&k)).or(additional);
        match sub {
            Some(sub) => {
                if map.get(&k).is_some_and(Value::is_null) && !nullable(sub) {
                    map.remove(&k);
                } else if let Some(v) = map.get_mut(&k) {
                    walk(sub, v, &p, out);
                }
            }
            None if preserves(schema) || (props.is_none() && schema.get("type").is_none()) => {}
            None => {
                map.remove(&k);
                out.unknown.push(p);
            }
        }
    }
    if let Some(props) = props {
        for (k, sub) in props {
            if map.contains_key(k) {
                continue;
            }
            if let Some(d) = sub.get("default") {
                let mut d = d.clone();
                walk(sub, &mut d, &join(path, k), out);
                map.insert(k.clone(), d);
            }
        }
    }
    required(schema, map, path, out);
}
