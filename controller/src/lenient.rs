//! [`Lenient`]: a resource type whose watch decodes each object on its own. A typed watch fails a whole LIST
//! when one object does not decode (say, one stored before the CRD bounded a field), and with it the
//! reconciling of everything; an untyped watch (`DynamicObject`) avoids that but decodes every event three
//! times (JSON into a value tree, back into another, then into the type) and copied each object's metadata
//! on the way. A `Lenient<K>` takes each object's JSON as it is (a `RawValue`: one copy of its text), decodes
//! it straight into `K`, and keeps only the metadata and the error of an object that does not decode. (It
//! was an untagged enum first, which buffers every object into serde's generic tree before decoding it: a
//! tenth of the controller's CPU in a rollout.) It needs the JSON deserializer itself, as the client gives it
//! for LIST items and for watch events, whose `type` the apiserver writes before the `object`.

use std::borrow::Cow;

use kube::Resource;
use kube::api::ObjectMeta;
use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer};

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

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        Ok(match serde_json::from_str::<K>(raw.get()) {
            Ok(k) => Lenient::Decoded(k),
            Err(e) => {
                let metadata = serde_json::from_str::<MetadataOnly>(raw.get()).map(|m| m.metadata).unwrap_or_default();
                Lenient::Undecodable { metadata: Box::new(metadata), error: e.to_string() }
            }
        })
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
    use nio_shared::crd::NixosConfiguration;
    use serde_json::json;

    fn config(max_parallel: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration",
            "metadata": {"name": "web", "namespace": "ns", "resourceVersion": "7"},
            "spec": {"gitRepo": "https://example.org/r.git", "ref": "main", "flake": "#web", "machineRef": "m1",
                     "rollout": {"maxParallel": max_parallel}}
        })
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
