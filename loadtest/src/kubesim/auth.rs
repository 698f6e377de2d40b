//! Authentication by bearer token and authorization by RBAC objects (Role, ClusterRole and their bindings), as
//! the apiserver's RBAC authorizer decides for resource requests. Simplified where no NIO client can tell:
//! requests without a token act as the admin (the simulator's convenience; a real server would treat them as
//! `system:anonymous`), discovery and OpenAPI are open to every authenticated user (the `system:discovery`
//! role), and aggregated ClusterRoles and escalation checks are not modelled.

use std::collections::HashMap;

use serde_json::Value;

use super::store::{ApiError, Store};

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    fn is_admin(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// Bearer token → user.
pub type Tokens = HashMap<String, User>;

/// The user behind the `Authorization` header: the admin when there is none, 401 for a token nobody has.
pub fn authenticate(tokens: &Tokens, header: Option<&str>) -> Result<User, ApiError> {
    let admin = || User { name: "kubesim-admin".into(), groups: vec!["system:masters".into()] };
    let Some(h) = header else { return Ok(admin()) };
    let token = h.strip_prefix("Bearer ").unwrap_or("");
    tokens.get(token).cloned().ok_or_else(|| ApiError::new(401, "Unauthorized", "Unauthorized"))
}

/// One resource request, as RBAC sees it.
pub struct Request<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// `machines` or `machines/status`.
    pub resource: String,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn rule_allows(rule: &Value, r: &Request) -> bool {
    let has = |key: &str, want: &str| strings(rule, key).iter().any(|x| x == "*" || x == want);
    let names = strings(rule, "resourceNames");
    has("apiGroups", r.group)
        && has("resources", &r.resource)
        && has("verbs", r.verb)
        && (names.is_empty() || r.name.is_some_and(|n| names.iter().any(|x| x == n)))
}

fn binds(binding: &Value, user: &User) -> bool {
    binding.get("subjects").and_then(Value::as_array).is_some_and(|subjects| {
        subjects.iter().any(|s| {
            let field = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("");
            match field("kind") {
                "User" => field("name") == user.name,
                "Group" => user.groups.iter().any(|g| g == field("name")),
                "ServiceAccount" => {
                    user.name == format!("system:serviceaccount:{}:{}", field("namespace"), field("name"))
                }
                _ => false,
            }
        })
    })
}

/// Whether RBAC in `store` lets `user` make request `r`; a 403 naming what was refused otherwise.
pub fn authorize(store: &Store, user: &User, r: &Request) -> Result<(), ApiError> {
    if user.is_admin() {
        return Ok(());
    }
    let objects = |plural: &str, ns: Option<&str>| -> Vec<std::sync::Arc<Value>> {
        store
            .types()
            .iter()
            .find(|t| t.group == "rbac.authorization.k8s.io" && t.plural == plural)
            .map(|t| store.list(t, ns, |_| true).0)
            .unwrap_or_default()
    };
    let role_rules = |role_ref: &Value, ns: Option<&str>| -> Vec<Value> {
        let (kind, name) = (
            role_ref.get("kind").and_then(Value::as_str).unwrap_or(""),
            role_ref.get("name").and_then(Value::as_str).unwrap_or(""),
        );
        let (plural, scope) = if kind == "ClusterRole" { ("clusterroles", None) } else { ("roles", ns) };
        objects(plural, scope)
            .iter()
            .filter(|o| o.pointer("/metadata/name").and_then(Value::as_str) == Some(name))
            .flat_map(|o| o.get("rules").and_then(Value::as_array).cloned().unwrap_or_default())
            .collect()
    };
    let mut allowed = objects("clusterrolebindings", None)
        .iter()
        .filter(|b| binds(b, user))
        .any(|b| b.get("roleRef").is_some_and(|rr| role_rules(rr, None).iter().any(|rule| rule_allows(rule, r))));
    if !allowed && let Some(ns) = r.namespace {
        allowed = objects("rolebindings", Some(ns)).iter().filter(|b| binds(b, user)).any(|b| {
            b.get("roleRef").is_some_and(|rr| role_rules(rr, Some(ns)).iter().any(|rule| rule_allows(rule, r)))
        });
    }
    if allowed {
        return Ok(());
    }
    let (resource, sub) = r.resource.split_once('/').map_or((r.resource.as_str(), None), |(a, b)| (a, Some(b)));
    let what = match (r.name, r.group) {
        (Some(n), "") => format!("{resource} \"{n}\""),
        (Some(n), g) => format!("{resource}.{g} \"{n}\""),
        (None, "") => resource.to_string(),
        (None, g) => format!("{resource}.{g}"),
    };
    let sub = sub.map(|s| format!("/{s}")).unwrap_or_default();
    let scope = match r.namespace {
        Some(ns) => format!(" in the namespace \"{ns}\""),
        None => " at the cluster scope".to_string(),
    };
    Err(ApiError::new(
        403,
        "Forbidden",
        format!(
            "{what} is forbidden: User \"{}\" cannot {} resource \"{resource}{sub}\" in API group \"{}\"{scope}",
            user.name, r.verb, r.group
        ),
    ))
}
