//! Request bodies in Kubernetes' protobuf encoding (`application/vnd.kubernetes.protobuf`), which kubectl's typed
//! commands (`kubectl create namespace|secret|configmap|serviceaccount|role|rolebinding|...`) send for built-in
//! types. The API server accepts it for every built-in type and never for custom resources (415). The body is
//! the 4-byte magic `k8s\0` and a `runtime.Unknown` envelope naming apiVersion and kind around the object's own
//! message; the messages are k8s-pb's (prost) and each kind the simulator serves is turned into the JSON
//! object the API server would have decoded.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_pb::api::core::v1 as core;
use k8s_pb::api::rbac::v1 as rbac;
use k8s_pb::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message;
use serde_json::{Value, json};

pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";

/// The JSON object in a protobuf request body, or why it cannot be read (as the API server words it).
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let envelope = body.strip_prefix(MAGIC).ok_or("the protobuf body does not start with the k8s magic")?;
    let unknown = Unknown::decode(envelope).map_err(|e| format!("error decoding protobuf envelope: {e}"))?;
    let tm = unknown.type_meta.unwrap_or_default();
    let (api_version, kind) = (tm.api_version.unwrap_or_default(), tm.kind.unwrap_or_default());
    let raw = unknown.raw.unwrap_or_default();
    let bad = |e: prost::DecodeError| format!("error decoding {kind} from protobuf: {e}");
    let mut obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => {
            let ns = core::Namespace::decode(&raw[..]).map_err(bad)?;
            json!({"metadata": meta(ns.metadata), "spec": {"finalizers": ns.spec.map(|s| s.finalizers)}})
        }
        ("v1", "ConfigMap") => {
            let cm = core::ConfigMap::decode(&raw[..]).map_err(bad)?;
            json!({"metadata": meta(cm.metadata), "data": cm.data, "binaryData": b64(cm.binary_data), "immutable": cm.immutable})
        }
        ("v1", "Secret") => {
            let s = core::Secret::decode(&raw[..]).map_err(bad)?;
            json!({"metadata": meta(s.metadata), "type": s.r#type, "data": b64(s.data), "stringData": s.string_data, "immutable": s.immutable})
        }
        ("v1", "ServiceAccount") => {
            let sa = core::ServiceAccount::decode(&raw[..]).map_err(bad)?;
            let secrets: Vec<Value> = sa
                .secrets
                .into_iter()
                .map(|r| json!({"kind": r.kind, "namespace": r.namespace, "name": r.name, "uid": r.uid, "apiVersion": r.api_version, "resourceVersion": r.resource_version, "fieldPath": r.field_path}))
                .collect();
            let pulls: Vec<Value> = sa.image_pull_secrets.into_iter().map(|r| json!({"name": r.name})).collect();
            json!({"metadata": meta(sa.metadata), "secrets": secrets, "imagePullSecrets": pulls, "automountServiceAccountToken": sa.automount_service_account_token})
        }
        ("rbac.authorization.k8s.io/v1", "Role") => {
            let r = rbac::Role::decode(&raw[..]).map_err(bad)?;
            json!({"metadata": meta(r.metadata), "rules": rules(r.rules)})
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            let r = rbac::ClusterRole::decode(&raw[..]).map_err(bad)?;
            let aggregation = r.aggregation_rule.map(|a| {
                json!({"clusterRoleSelectors": a.cluster_role_selectors.into_iter().map(selector).collect::<Vec<_>>()})
            });
            json!({"metadata": meta(r.metadata), "rules": rules(r.rules), "aggregationRule": aggregation})
        }
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            let b = rbac::RoleBinding::decode(&raw[..]).map_err(bad)?;
            json!({"metadata": meta(b.metadata), "subjects": subjects(b.subjects), "roleRef": b.role_ref.map(role_ref)})
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            let b = rbac::ClusterRoleBinding::decode(&raw[..]).map_err(bad)?;
            json!({"metadata": meta(b.metadata), "subjects": subjects(b.subjects), "roleRef": b.role_ref.map(role_ref)})
        }
        _ => return Err(format!("the simulator cannot decode {api_version}/{kind} from protobuf; send JSON")),
    };
    prune(&mut obj);
    if let Some(o) = obj.as_object_mut() {
        o.insert("apiVersion".into(), api_version.into());
        o.insert("kind".into(), kind.into());
    }
    Ok(obj)
}

fn meta(m: Option<ObjectMeta>) -> Value {
    let m = m.unwrap_or_default();
    let owners: Vec<Value> = m
        .owner_references
        .into_iter()
        .map(|o| json!({"apiVersion": o.api_version, "kind": o.kind, "name": o.name, "uid": o.uid, "controller": o.controller, "blockOwnerDeletion": o.block_owner_deletion}))
        .collect();
    json!({
        "name": m.name,
        "generateName": m.generate_name,
        "namespace": m.namespace,
        "uid": m.uid,
        "resourceVersion": m.resource_version,
        "generation": m.generation,
        "creationTimestamp": m.creation_timestamp.and_then(time),
        "deletionTimestamp": m.deletion_timestamp.and_then(time),
        "deletionGracePeriodSeconds": m.deletion_grace_period_seconds,
        "labels": m.labels,
        "annotations": m.annotations,
        "ownerReferences": owners,
        "finalizers": m.finalizers,
    })
}

fn time(t: Time) -> Option<String> {
    let at = chrono::DateTime::from_timestamp(t.seconds.unwrap_or(0), 0)?;
    Some(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn b64(data: BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    data.into_iter().map(|(k, v)| (k, base64::engine::general_purpose::STANDARD.encode(v))).collect()
}

fn rules(rules: Vec<rbac::PolicyRule>) -> Vec<Value> {
    rules
        .into_iter()
        .map(|r| json!({"verbs": r.verbs, "apiGroups": r.api_groups, "resources": r.resources, "resourceNames": r.resource_names, "nonResourceURLs": r.non_resource_ur_ls}))
        .collect()
}

fn subjects(subjects: Vec<rbac::Subject>) -> Vec<Value> {
    subjects
        .into_iter()
        .map(|s| json!({"kind": s.kind, "apiGroup": s.api_group, "name": s.name, "namespace": s.namespace}))
        .collect()
}

fn role_ref(r: rbac::RoleRef) -> Value {
    json!({"apiGroup": r.api_group, "kind": r.kind, "name": r.name})
}

fn selector(s: LabelSelector) -> Value {
    let exprs: Vec<Value> = s
        .match_expressions
        .into_iter()
        .map(|e| json!({"key": e.key, "operator": e.operator, "values": e.values}))
        .collect();
    json!({"matchLabels": s.match_labels, "matchExpressions": exprs})
}

/// Drops what protobuf cannot leave out but JSON would: nulls, empty lists and empty maps (an unset field and
/// an empty one are the same on the wire).
fn prune(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for x in o.values_mut() {
                prune(x);
            }
            o.retain(|_, x| !is_empty(x));
        }
        Value::Array(a) => a.iter_mut().for_each(prune),
        _ => {}
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protobuf request body as kubectl builds it, for tests of the decoding.
    fn encode<M: Message>(api_version: &str, kind: &str, object: &M) -> Vec<u8> {
        use k8s_pb::apimachinery::pkg::runtime::TypeMeta;
        let unknown = Unknown {
            type_meta: Some(TypeMeta { api_version: Some(api_version.into()), kind: Some(kind.into()) }),
            raw: Some(object.encode_to_vec()),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut out = MAGIC.to_vec();
        out.extend(unknown.encode_to_vec());
        out
    }

    #[test]
    fn a_secret_decodes_to_the_json_the_api_server_would_store() {
        let secret = core::Secret {
            metadata: Some(ObjectMeta {
                name: Some("creds".into()),
                namespace: Some("fleet".into()),
                labels: [("nixos.infra/usable-by".to_string(), "nio".to_string())].into(),
                ..Default::default()
            }),
            data: [("token".to_string(), b"s3cr\xffet".to_vec())].into(),
            r#type: Some("Opaque".into()),
            ..Default::default()
        };
        let v = decode(&encode("v1", "Secret", &secret)).expect("decodes");
        assert_eq!(
            v,
            json!({
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": "creds", "namespace": "fleet", "labels": {"nixos.infra/usable-by": "nio"}},
                "data": {"token": base64::engine::general_purpose::STANDARD.encode(b"s3cr\xffet")},
            })
        );
    }

    #[test]
    fn bodies_that_are_not_a_served_kind_or_not_protobuf_are_refused_with_a_reason() {
        assert!(decode(b"{\"kind\":\"Namespace\"}").unwrap_err().contains("magic"));
        assert!(decode(b"k8s\0\xff\xff").unwrap_err().contains("envelope"));
        let pod = core::Pod::default();
        assert!(decode(&encode("v1", "Pod", &pod)).unwrap_err().contains("v1/Pod"));
    }
}
