//! The resource types a simulated cluster serves: built-ins and CRD-defined types.

use serde_json::{Value, json};

/// A printer column of a CRD version (additionalPrinterColumns).
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub type_: String,
    pub format: Option<String>,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// One served resource type (one group/version/plural).
#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// openAPIV3Schema of a CRD version; None for built-ins (stored without validation).
    pub schema: Option<Value>,
    /// The schema's compiled CEL rules, if it has any.
    pub rules: Option<super::cel::Rules>,
    pub status_subresource: bool,
    pub columns: Vec<Column>,
    /// Defined by a CustomResourceDefinition (as opposed to built in).
    pub custom: bool,
}

impl ResourceType {
    /// `group/version`, or `v1` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    /// Storage key: objects of one group and plural share storage across versions.
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    /// Group-qualified resource name used in error messages (`machines.nixos.infra`).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    pub fn verbs(&self) -> Vec<&'static str> {
        vec!["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
    }

    /// Discovery entry (APIResource) for `/api/v1` or `/apis/{group}/{version}`.
    pub fn discovery(&self) -> Vec<Value> {
        let mut out = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": self.verbs(),
            "shortNames": self.short_names,
            "categories": self.categories,
            "storageVersionHash": "",
        })];
        if self.status_subresource {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }

    fn builtin(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool, short: &[&str]) -> Self {
        ResourceType {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            short_names: short.iter().map(|s| s.to_string()).collect(),
            categories: vec![],
            schema: None,
            rules: None,
            status_subresource: false,
            columns: vec![],
            custom: false,
        }
    }

    /// The built-in types every simulated cluster has.
    pub fn builtins() -> Vec<ResourceType> {
        let mut ns = Self::builtin("", "v1", "namespaces", "Namespace", false, &["ns"]);
        ns.status_subresource = true;
        vec![
            ns,
            Self::builtin("", "v1", "secrets", "Secret", true, &[]),
            Self::builtin("", "v1", "configmaps", "ConfigMap", true, &["cm"]),
            Self::builtin("", "v1", "events", "Event", true, &["ev"]),
            Self::builtin("events.k8s.io", "v1", "events", "Event", true, &["ev"]),
            Self::builtin("coordination.k8s.io", "v1", "leases", "Lease", true, &[]),
            Self::builtin("", "v1", "serviceaccounts", "ServiceAccount", true, &["sa"]),
            Self::builtin("rbac.authorization.k8s.io", "v1", "roles", "Role", true, &[]),
            Self::builtin("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", true, &[]),
            Self::builtin("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", false, &[]),
            Self::builtin("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", false, &[]),
            Self::builtin(
                "apiextensions.k8s.io",
                "v1",
                "customresourcedefinitions",
                "CustomResourceDefinition",
                false,
                &["crd", "crds"],
            ),
        ]
    }

    /// The served versions of a CustomResourceDefinition object.
    pub fn from_crd(crd: &Value) -> Result<Vec<ResourceType>, String> {
        let spec = crd.get("spec").ok_or("CustomResourceDefinition has no spec")?;
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let group = s(spec, "group").ok_or("spec.group is required")?;
        let names = spec.get("names").ok_or("spec.names is required")?;
        let plural = s(names, "plural").ok_or("spec.names.plural is required")?;
        let kind = s(names, "kind").ok_or("spec.names.kind is required")?;
        let singular = s(names, "singular").unwrap_or_else(|| kind.to_lowercase());
        let strings = |v: Option<&Value>| -> Vec<String> {
            v.and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                .unwrap_or_default()
        };
        let namespaced = s(spec, "scope").as_deref() != Some("Cluster");
        let expected_name = format!("{plural}.{group}");
        if crd.pointer("/metadata/name").and_then(Value::as_str) != Some(expected_name.as_str()) {
            return Err(format!("metadata.name must be spec.names.plural+\".\"+spec.group ({expected_name})"));
        }
        let versions = spec.get("versions").and_then(Value::as_array).ok_or("spec.versions is required")?;
        let mut out = Vec::new();
        for v in versions {
            if v.get("served").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            let version = s(v, "name").ok_or("spec.versions[].name is required")?;
            let columns = v
                .get("additionalPrinterColumns")
                .and_then(Value::as_array)
                .map(|cols| {
                    cols.iter()
                        .map(|c| Column {
                            name: s(c, "name").unwrap_or_default(),
                            type_: s(c, "type").unwrap_or_else(|| "string".into()),
                            format: s(c, "format"),
                            description: s(c, "description").unwrap_or_default(),
                            priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                            json_path: s(c, "jsonPath").unwrap_or_default(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(ResourceType {
                group: group.clone(),
                version,
                plural: plural.clone(),
                singular: singular.clone(),
                kind: kind.clone(),
                namespaced,
                short_names: strings(names.get("shortNames")),
                categories: strings(names.get("categories")),
                rules: match v.pointer("/schema/openAPIV3Schema") {
                    Some(schema) => super::cel::compile(schema)?,
                    None => None,
                },
                schema: v.pointer("/schema/openAPIV3Schema").cloned(),
                status_subresource: v.pointer("/subresources/status").is_some(),
                columns,
                custom: true,
            });
        }
        Ok(out)
    }
}
