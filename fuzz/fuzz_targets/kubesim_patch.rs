//! kubesim's patch handling (merge, JSON, strategic and server-side apply, main and status scopes) on a Machine
//! with arbitrary bodies: never panics, a refused patch changes nothing, and an accepted one leaves an object
//! that is still the same Machine (name, kind, uid) with a newer or equal resourceVersion.
#![no_main]

use kube::CustomResourceExt;
use libfuzzer_sys::fuzz_target;
use nio_loadtest::kubesim::{PatchKind, Scope, Store, WriteOpts};
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let Ok(body) = serde_json::from_slice::<Value>(body) else { return };
    let store = Store::new(16);
    let crd = serde_json::to_value(nio_shared::crd::Machine::crd()).expect("CRD");
    store.register_crd(crd).expect("the Machine CRD registers");
    let rt = store.resolve("nixos.infra", "v1alpha1", "machines").expect("machines are served");
    let opts = WriteOpts { manager: "fuzz".into(), ..Default::default() };
    let machine = json!({"apiVersion": "nixos.infra/v1alpha1", "kind": "Machine",
        "metadata": {"name": "m1", "namespace": "default", "labels": {"role": "web"}},
        "spec": {"hostname": "web-01", "site": "dc1"}});
    let (before, _) = store.create(&rt, Some("default"), machine, &opts).expect("the Machine is created");
    let kind = match selector % 5 {
        0 => PatchKind::Merge,
        1 => PatchKind::Json,
        2 => PatchKind::Strategic,
        3 => PatchKind::Apply { force: false },
        _ => PatchKind::Apply { force: true },
    };
    let scope = if selector & 0x80 == 0 { Scope::Main } else { Scope::Status };
    let result = store.patch(&rt, Some("default"), "m1", kind, &body, scope, &opts);
    let after = store.get(&rt, Some("default"), "m1").expect("the Machine is still there");
    match result {
        Err(_) => assert_eq!(after, before, "a refused patch changed the object"),
        Ok((returned, _)) => {
            assert_eq!(returned, after, "the returned object is not the stored one");
            for field in ["/metadata/name", "/metadata/uid", "/metadata/namespace", "/kind", "/apiVersion"] {
                assert_eq!(after.pointer(field), before.pointer(field), "{field} changed");
            }
            let rv = |v: &Value| v.pointer("/metadata/resourceVersion")?.as_str()?.parse::<u64>().ok();
            assert!(rv(&after) >= rv(&before), "resourceVersion went back");
        }
    }
});
