//! [`Lenient`]: a resource type whose watch decodes each object on its own. A typed watch fails a whole LIST
//! when one object does not decode (say, one stored before the CRD bounded a field), and with it the
//! reconciling of everything; an untyped watch (`DynamicObject`) avoids that but decodes every event three
//! times (JSON into a value tree, back into another, then into the type) and copied each object's metadata
//! on the way. A `Lenient<K>` takes each object's JSON as it is (a `RawValue`: one copy of its text), decodes
//! it straight into `K`, and keeps only the metadata and the error of an object that does not decode. (It
//! was an untagged enum first, which buffers every object into serde's generic tree before decoding it: a
//! tenth of the controller's CPU in a rollout.) It needs the JSON deserializer itself, as the client gives it
//! for LIST items and for watch events, whose `type` the apiserver writes before the `object`. Objects are
//! decoded without `metadata.managedFields` ([`WithoutManagedFields`]), which the controller never reads.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::Resource;
use kube::api::ObjectMeta;
use nio_shared::crd::{
    Machine, MachineSpec, MachineStatus, NixosConfiguration, NixosConfigurationSpec, NixosConfigurationStatus,
};
use serde::Deserialize;
use serde::de::Deserializer;

/// An object of kind `K` as a watch delivers it: decoded, or the metadata of one that is not.
#[derive(Clone, Debug)]
pub enum Lenient<K> {
    Decoded(K),
    Undecodable {
        metadata: Box<ObjectMeta>,
        /// What `K`'s decoder said (field and problem; never the object).
        error: String,
    },
}

/// Only the metadata of an object that does not decode as `K`.
#[derive(Deserialize)]
struct MetadataOnly {
    #[serde(default)]
    metadata: ObjectMeta,
}

impl<'de, K: WithoutManagedFields> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        Ok(match K::decode_without_managed_fields(raw.get()) {
            Ok(k) => Lenient::Decoded(k),
            Err(e) => {
                let metadata = serde_json::from_str::<MetadataOnly>(raw.get()).map(|m| m.metadata).unwrap_or_default();
                Lenient::Undecodable { metadata: Box::new(metadata), error: e.to_string() }
            }
        })
    }
}

/// A resource decoded without its `metadata.managedFields`: the server-side-apply bookkeeping (a tree of every
/// field path each manager owns, often most of a Machine's JSON) that the controller never reads. Skipping it
/// while decoding costs a scan; decoding it builds a generic JSON tree per entry, only to drop it (the stores
/// keep objects without it): 5–8 % of the controller's CPU in a rollout (perf), where every status write comes
/// back by the watch.
pub trait WithoutManagedFields: Sized {
    /// Decodes the object's JSON, leaving `metadata.managedFields` out.
    fn decode_without_managed_fields(json: &str) -> serde_json::Result<Self>;
}

/// [`ObjectMeta`] but `managedFields` (skipped as an unknown field). Every other field is kept: the conversion
/// names each one, so a field added to `ObjectMeta` fails to compile here instead of being dropped.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaWithoutManagedFields {
    annotations: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
    deletion_grace_period_seconds: Option<i64>,
    deletion_timestamp: Option<Time>,
    finalizers: Option<Vec<String>>,
    generate_name: Option<String>,
    generation: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
    name: Option<String>,
    namespace: Option<String>,
    owner_references: Option<Vec<OwnerReference>>,
    resource_version: Option<String>,
    self_link: Option<String>,
    uid: Option<String>,
}

impl From<MetaWithoutManagedFields> for ObjectMeta {
    fn from(m: MetaWithoutManagedFields) -> Self {
        ObjectMeta {
            annotations: m.annotations,
            creation_timestamp: m.creation_timestamp,
            deletion_grace_period_seconds: m.deletion_grace_period_seconds,
            deletion_timestamp: m.deletion_timestamp,
            finalizers: m.finalizers,
            generate_name: m.generate_name,
            generation: m.generation,
            labels: m.labels,
            managed_fields: None,
            name: m.name,
            namespace: m.namespace,
            owner_references: m.owner_references,
            resource_version: m.resource_version,
            self_link: m.self_link,
            uid: m.uid,
        }
    }
}

/// A custom resource's parts, as its JSON has them (`apiVersion` and `kind` are known from the type).
#[derive(Deserialize)]
struct Parts<Spec, Status> {
    metadata: MetaWithoutManagedFields,
    spec: Spec,
    status: Option<Status>,
}

impl WithoutManagedFields for Machine {
    fn decode_without_managed_fields(json: &str) -> serde_json::Result<Self> {
        let p: Parts<MachineSpec, MachineStatus> = serde_json::from_str(json)?;
        Ok(Machine { metadata: p.metadata.into(), spec: p.spec, status: p.status })
    }
}

impl WithoutManagedFields for NixosConfiguration {
    fn decode_without_managed_fields(json: &str) -> serde_json::Result<Self> {
        let p: Parts<NixosConfigurationSpec, NixosConfigurationStatus> = serde_json::from_str(json)?;
        Ok(NixosConfiguration { metadata: p.metadata.into(), spec: p.spec, status: p.status })
    }
}

impl<K: Resource> Resource for Lenient<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            Lenient::Decoded(k) => k.meta(),
            Lenient::Undecodable { metadata, .. } => metadata,
        }
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Lenient::Decoded(k) => k.meta_mut(),
            Lenient::Undecodable { metadata, .. } => metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    fn config(max_parallel: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration",
            "metadata": {"name": "web", "namespace": "ns", "resourceVersion": "7"},
            "spec": {"gitRepo": "https://example.org/r.git", "ref": "main", "flake": "#web", "machineRef": "m1",
                     "rollout": {"maxParallel": max_parallel}}
        })
    }

    /// Every metadata field but `managedFields`, as the apiserver writes them.
    fn metadata() -> serde_json::Value {
        json!({
            "name": "m1", "namespace": "ns", "uid": "0d6c1f0e-4f5a-4b8e-9f51-8d2b9d3c1a11", "resourceVersion": "42",
            "generation": 3, "generateName": "m", "selfLink": "/apis/x", "creationTimestamp": "2026-12-03T10:00:00Z",
            "deletionTimestamp": "2026-12-03T11:00:00Z", "deletionGracePeriodSeconds": 0,
            "labels": {"role": "web"}, "annotations": {"note": "\"managedFields\": [] in a value"},
            "finalizers": ["nixos.infra/cleanup"],
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "u-1"}],
            "managedFields": [{
                "manager": "nio-controller", "operation": "Apply", "apiVersion": "nixos.infra/v1alpha1",
                "time": "2026-12-03T10:00:01Z", "fieldsType": "FieldsV1", "subresource": "status",
                "fieldsV1": {"f:status": {"f:phase": {}, "f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}}}}}
            }]
        })
    }

    /// The same object as `K`'s own decoder makes it, less `managedFields`: every other metadata field, the
    /// spec and the status kept.
    fn check<K>(object: serde_json::Value)
    where
        K: WithoutManagedFields + DeserializeOwned + Resource + PartialEq + std::fmt::Debug,
    {
        let mut typed: K = serde_json::from_value(object.clone()).expect("decodes as its type");
        assert!(typed.meta().managed_fields.is_some());
        typed.meta_mut().managed_fields = None;
        let slim = K::decode_without_managed_fields(&object.to_string()).expect("decodes");
        assert_eq!(slim, typed);
        let m = slim.meta();
        let kept = [
            m.annotations.is_some(),
            m.creation_timestamp.is_some(),
            m.deletion_grace_period_seconds.is_some(),
            m.deletion_timestamp.is_some(),
            m.finalizers.is_some(),
            m.generate_name.is_some(),
            m.generation.is_some(),
            m.labels.is_some(),
            m.name.is_some(),
            m.namespace.is_some(),
            m.owner_references.is_some(),
            m.resource_version.is_some(),
            m.self_link.is_some(),
            m.uid.is_some(),
        ];
        assert!(kept.iter().all(|k| *k), "{m:?}");
        // Without a status, as the type's own decoder allows; without metadata or spec, refused as it is.
        for (drop, decodes) in [("status", true), ("metadata", false), ("spec", false)] {
            let mut part = object.clone();
            part.as_object_mut().map(|o| o.remove(drop));
            let typed = serde_json::from_value::<K>(part.clone());
            let slim = K::decode_without_managed_fields(&part.to_string());
            assert_eq!((typed.is_ok(), slim.is_ok()), (decodes, decodes), "without {drop}: {slim:?}");
            if let (Ok(mut typed), Ok(slim)) = (typed, slim) {
                typed.meta_mut().managed_fields = None;
                assert_eq!(slim, typed);
            }
        }
    }

    #[test]
    fn objects_decode_as_their_type_does_less_managed_fields() {
        check::<Machine>(json!({
            "apiVersion": "nixos.infra/v1alpha1", "kind": "Machine", "metadata": metadata(),
            "spec": {"hostname": "10.0.0.1", "site": "dc1"},
            "status": {"phase": "Applied", "appliedCommit": "0123456789abcdef0123456789abcdef01234567"}
        }));
        let mut config = config(json!(5));
        config["metadata"] = metadata();
        config["status"] = json!({"targetCommit": "0123456789abcdef0123456789abcdef01234567", "total": 2});
        check::<NixosConfiguration>(config);
    }

    #[test]
    fn a_list_with_one_bad_object_keeps_the_others_and_names_the_bad_one() {
        let list = json!({"items": [config(json!(5)), config(json!(99_999_999_999u64)), config(json!(7))]});
        #[derive(Deserialize)]
        struct List {
            items: Vec<Lenient<NixosConfiguration>>,
        }
        // As the client decodes a LIST page and a watch event: from bytes, objects in any key order.
        let items = serde_json::from_slice::<List>(list.to_string().as_bytes()).expect("the list decodes").items;
        let parallel = |l: &Lenient<NixosConfiguration>| match l {
            Lenient::Decoded(c) => c.spec.rollout.max_parallel,
            Lenient::Undecodable { error, .. } => panic!("{error}"),
        };
        assert_eq!(parallel(&items[0]), Some(5));
        assert_eq!(parallel(&items[2]), Some(7));
        let Lenient::Undecodable { metadata, error } = &items[1] else { panic!("decoded {:?}", items[1]) };
        assert_eq!((metadata.name.as_deref(), metadata.resource_version.as_deref()), (Some("web"), Some("7")));
        assert!(error.contains("99999999999"), "{error}");
        // A watch event as the apiserver writes it, `type` first; and one that does not decode.
        for (object, decoded) in [(config(json!(3)), true), (config(json!(-1)), false)] {
            let line = format!("{{\"type\":\"MODIFIED\",\"object\":{object}}}");
            let event: kube::core::WatchEvent<Lenient<NixosConfiguration>> =
                serde_json::from_str(&line).expect("the event decodes");
            let kube::core::WatchEvent::Modified(o) = event else { panic!("{line}") };
            assert_eq!(matches!(o, Lenient::Decoded(_)), decoded, "{o:?}");
            assert_eq!(o.meta().name.as_deref(), Some("web"));
        }
    }
}
