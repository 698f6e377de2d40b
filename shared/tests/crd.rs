#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! The committed CRDs match the Rust types, are valid CustomResourceDefinitions, and document every field.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use kube::{CustomResourceExt, Resource};
use nio_shared::crd::{Machine, NixosConfiguration};

fn crds_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

#[test]
fn committed_crds_match_generated_yaml() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/crds");
    for (file, generated) in nio_shared::crd::yaml_files().unwrap() {
        for dir in [crds_dir(), deploy.clone()] {
            let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            assert!(
                committed == generated,
                "{}/{file} differs from the Rust types in shared/src/crd.rs; run `make crds` and commit the result",
                dir.display()
            );
        }
    }
}

fn load(file: &str) -> CustomResourceDefinition {
    let text = std::fs::read_to_string(crds_dir().join(file)).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

/// Every property below `path` has a non-empty description (what `kubectl explain` shows).
fn undocumented(path: &str, schema: &JSONSchemaProps, out: &mut Vec<String>) {
    if let Some(props) = &schema.properties {
        for (name, prop) in props {
            let p = format!("{path}.{name}");
            if prop.description.as_deref().is_none_or(|d| d.trim().is_empty()) {
                out.push(p.clone());
            }
            undocumented(&p, prop, out);
        }
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &schema.items {
        undocumented(&format!("{path}[]"), items, out);
    }
}

#[test]
fn crd_files_parse_and_document_every_spec_and_status_field() {
    for (file, kind, short) in
        [("machine.yaml", "Machine", "mach"), ("nixosconfiguration.yaml", "NixosConfiguration", "nixconf")]
    {
        let crd = load(file);
        assert_eq!(crd.spec.group, "nixos.infra");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.names.short_names.as_deref(), Some(&[short.to_string()][..]));
        assert_eq!(crd.spec.names.categories.as_deref(), Some(&["nio".to_string()][..]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "{kind}: status subresource");
        let root = version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).unwrap();
        let props = root.properties.as_ref().unwrap();
        let mut missing = Vec::new();
        for top in ["spec", "status"] {
            let schema = props.get(top).unwrap_or_else(|| panic!("{kind} has no {top}"));
            undocumented(top, schema, &mut missing);
            assert!(schema.properties.as_ref().is_some_and(|p| p.len() >= 5), "{kind}.{top} has its fields");
        }
        assert!(missing.is_empty(), "{kind}: fields without description: {missing:?}");
    }
}

#[test]
fn printer_columns_answer_what_commit_is_where() {
    let crd = load("machine.yaml");
    let cols: Vec<_> =
        crd.spec.versions[0].additional_printer_columns.clone().unwrap().into_iter().map(|c| c.name).collect();
    assert_eq!(cols, ["Site", "Phase", "Commit", "Discoverable", "Age"]);
    let crd = load("nixosconfiguration.yaml");
    let cols: Vec<_> =
        crd.spec.versions[0].additional_printer_columns.clone().unwrap().into_iter().map(|c| c.name).collect();
    assert_eq!(cols, ["Ref", "Target", "Updated", "Wave", "Rollout", "Ready", "Age"]);
}

#[test]
fn group_version_kind_are_what_we_think() {
    assert_eq!(Machine::api_version(&()), "nixos.infra/v1alpha1");
    assert_eq!(Machine::kind(&()), "Machine");
    assert_eq!(Machine::plural(&()), "machines");
    assert_eq!(NixosConfiguration::api_version(&()), "nixos.infra/v1alpha1");
    assert_eq!(NixosConfiguration::plural(&()), "nixosconfigurations");
    assert_eq!(Machine::crd_name(), "machines.nixos.infra");
}

#[test]
fn schema_defaults_match_the_design() {
    let m: Machine = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixos.infra/v1alpha1", "kind": "Machine", "metadata": {"name": "m1"},
        "spec": {"hostname": "m1.example.org"}
    }))
    .unwrap();
    assert_eq!((m.spec.port, m.spec.ssh_user.as_str(), m.spec.site.as_str()), (22, "root", "default"));
    let c: NixosConfiguration = serde_json::from_value(serde_json::json!({
        "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration", "metadata": {"name": "c"},
        "spec": {"gitRepo": "https://example.org/r.git", "ref": "main", "flake": "#web", "machineRef": "m1"}
    }))
    .unwrap();
    assert_eq!(c.spec.action, nio_shared::crd::RebuildAction::Switch);
    assert_eq!(c.spec.poll_interval, None, "unset: the controller default applies");
    assert!(!c.spec.full_install && !c.spec.suspend && !c.spec.auto_rollback);
}

/// The phase names used as metric labels and in printer columns are the ones written in status.
#[test]
fn machine_phase_names_are_the_status_values() {
    for p in nio_shared::crd::MachinePhase::ALL {
        assert_eq!(serde_json::to_value(p).unwrap(), serde_json::json!(p.as_str()));
    }
    assert_eq!(nio_shared::crd::MachinePhase::default().as_str(), "Pending");
}
