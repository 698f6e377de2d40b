#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! Every example deserializes into the shared types, passes validation, and refers only to objects that exist.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use nio_shared::config::ExecutorConfig;
use nio_shared::crd::{FileValueType, Machine, NixosConfiguration};

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[derive(Default)]
struct Seen {
    machines: Vec<Machine>,
    configurations: Vec<NixosConfiguration>,
    secrets: Vec<Secret>,
    namespaces: BTreeSet<String>,
}

fn load_all() -> Seen {
    let mut seen = Seen::default();
    let mut files: Vec<_> = std::fs::read_dir(examples())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "examples missing: {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        for doc in docs {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let name = format!("{}: {kind} {}", file.display(), doc["metadata"]["name"]);
            match kind.as_str() {
                "Machine" => {
                    let m: Machine = serde_json::from_value(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
                    nio_shared::validate::machine_spec(&m.spec).unwrap_or_else(|e| panic!("{name}: {e}"));
                    seen.machines.push(m);
                }
                "NixosConfiguration" => {
                    let c: NixosConfiguration = serde_json::from_value(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
                    nio_shared::validate::configuration_spec(&c.spec).unwrap_or_else(|e| panic!("{name}: {e}"));
                    seen.configurations.push(c);
                }
                "Secret" => seen.secrets.push(serde_json::from_value(doc).unwrap_or_else(|e| panic!("{name}: {e}"))),
                "Namespace" => {
                    let ns: Namespace = serde_json::from_value(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
                    seen.namespaces.insert(ns.metadata.name.unwrap());
                }
                other => panic!("{name}: unexpected kind {other}"),
            }
        }
    }
    seen
}

#[test]
fn every_example_parses_and_validates() {
    let seen = load_all();
    let sites: BTreeSet<_> = seen.machines.iter().map(|m| m.spec.site.as_str()).collect();
    assert!(sites.len() >= 2, "machines in two sites");
    assert!(seen.machines.iter().any(|m| m.spec.host_key.is_some()), "one machine with a pinned host key");
    assert!(seen.machines.iter().any(|m| m.spec.host_key.is_none()), "one TOFU machine");
    let c = &seen.configurations;
    assert!(c.iter().any(|c| c.spec.machine_ref.is_some() && !c.spec.full_install), "single-machine mode");
    assert!(c.iter().any(|c| c.spec.machine_selector.is_some()), "fleet mode");
    let install = c.iter().find(|c| c.spec.full_install).expect("a full-install example");
    assert!(install.spec.on_remove_flake.is_some());
    let kinds: BTreeSet<_> = install.spec.additional_files.iter().map(|f| format!("{:?}", f.value_type)).collect();
    assert_eq!(kinds.len(), 3, "all three additionalFiles types: {kinds:?}");
}

#[test]
fn examples_refer_only_to_objects_that_exist() {
    let seen = load_all();
    let ns_of = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| meta.namespace.clone().unwrap();
    let secret = |ns: &str, name: &str, key: &str| {
        seen.secrets.iter().any(|s| {
            ns_of(&s.metadata) == ns
                && s.metadata.name.as_deref() == Some(name)
                && s.string_data.as_ref().is_some_and(|d| d.contains_key(key))
        })
    };
    for m in &seen.machines {
        assert!(seen.namespaces.contains(&ns_of(&m.metadata)));
    }
    for c in &seen.configurations {
        let ns = ns_of(&c.metadata);
        assert!(seen.namespaces.contains(&ns));
        if let Some(name) = &c.spec.machine_ref {
            assert!(seen.machines.iter().any(|m| m.metadata.name.as_ref() == Some(name) && ns_of(&m.metadata) == ns));
        }
        if let Some(cred) = &c.spec.credentials_ref {
            assert!(secret(&ns, cred, "token"), "credentials Secret {cred} with key token");
        }
        for f in c.spec.additional_files.iter().filter(|f| f.value_type == FileValueType::SecretRef) {
            let r = f.secret_ref.as_ref().unwrap();
            assert!(secret(&ns, &r.name, &r.key), "Secret {}/{} key {}", ns, r.name, r.key);
        }
    }
    let flake = std::fs::read_to_string(examples().join("nix/flake.nix")).unwrap();
    for c in &seen.configurations {
        for f in [Some(&c.spec.flake), c.spec.on_remove_flake.as_ref()].into_iter().flatten() {
            let attr = nio_shared::validate::flake_attr("flake", f).unwrap();
            assert!(flake.contains(&format!("{attr} = host")), "flake.nix defines {attr}");
        }
    }
    assert!(examples().join("nix/disko.nix").exists());
}

#[test]
fn executor_site_config_example_loads() {
    let cfg = ExecutorConfig::load(&examples().join("executor/config.yaml")).unwrap();
    let names: Vec<_> = cfg.sites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["dc1", "dc2", "default"]);
    assert_eq!(cfg.sites[2].connect_rate, 20.0, "defaults applied");
}

#[test]
fn executor_config_errors_name_the_field() {
    let err = ExecutorConfig::from_yaml("sites:\n  - name: DC1\n    maxInFlight: 0\n").unwrap_err().to_string();
    assert!(err.contains("sites[0].name") && err.contains("sites[0].maxInFlight"), "{err}");
    let err = ExecutorConfig::from_yaml("sites: []\nbogus: 1\n").unwrap_err().to_string();
    assert!(err.contains("bogus"), "{err}");
    let err = ExecutorConfig::from_yaml("sites:\n  - name: dc1\n    maxInFlight: 5\nstreamReplicas: 7\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("streamReplicas"), "{err}");
    let cfg = ExecutorConfig::from_yaml("sites:\n  - name: dc1\n    maxInFlight: 5\nstreamReplicas: 3\n").unwrap();
    assert_eq!(cfg.stream_replicas, 3);
}
