//! `/openapi/v2`: the Swagger 2.0 document kubectl still reads to validate the items of a `kind: List` on the
//! client (it asks for it as gnostic's `openapi_v2.Document` protobuf). Built from the same schemas as the v3
//! documents, converted as the API server converts CRD schemas for v2: no `nullable` (the type is dropped),
//! objects that keep unknown fields and int-or-string values become arbitrary values, `oneOf`/`anyOf`/`not`
//! are left out, and `$ref`s point into `#/definitions/`.
//!
//! The protobuf messages below are the subset of gnostic's OpenAPIv2.proto (github.com/google/gnostic-models,
//! `openapiv2/OpenAPIv2.proto`) that kubectl's validation reads, with the same field numbers.

use prost::Message;
use serde_json::{Map, Value, json};

/// What kubectl asks for (client-go still sends the old name with `@`, which Go's own MIME parser cannot read
/// back) and what the API server answers with.
pub const PROTOBUF_ACCEPTED: [&str; 2] = [
    "application/com.github.proto-openapi.spec.v2@v1.0+protobuf",
    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
];
pub const PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

#[derive(Clone, PartialEq, Message)]
struct Document {
    #[prost(string, tag = "1")]
    swagger: String,
    #[prost(message, optional, tag = "2")]
    info: Option<Info>,
    #[prost(message, optional, tag = "9")]
    definitions: Option<Definitions>,
}

#[derive(Clone, PartialEq, Message)]
struct Info {
    #[prost(string, tag = "1")]
    title: String,
    #[prost(string, tag = "2")]
    version: String,
}

#[derive(Clone, PartialEq, Message)]
struct Definitions {
    #[prost(message, repeated, tag = "1")]
    additional_properties: Vec<NamedSchema>,
}

#[derive(Clone, PartialEq, Message)]
struct NamedSchema {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    value: Option<Schema>,
}

#[derive(Clone, PartialEq, Message)]
struct Schema {
    #[prost(string, tag = "1")]
    reference: String,
    #[prost(string, tag = "2")]
    format: String,
    #[prost(string, tag = "4")]
    description: String,
    #[prost(string, repeated, tag = "19")]
    required: Vec<String>,
    #[prost(message, optional, boxed, tag = "21")]
    additional_properties: Option<Box<AdditionalPropertiesItem>>,
    #[prost(message, optional, tag = "22")]
    r#type: Option<TypeItem>,
    #[prost(message, optional, tag = "23")]
    items: Option<ItemsItem>,
    #[prost(message, optional, tag = "25")]
    properties: Option<Properties>,
    #[prost(message, repeated, tag = "31")]
    vendor_extension: Vec<NamedAny>,
}

#[derive(Clone, PartialEq, Message)]
struct AdditionalPropertiesItem {
    #[prost(oneof = "AdditionalProperties", tags = "1, 2")]
    oneof: Option<AdditionalProperties>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum AdditionalProperties {
    #[prost(message, tag = "1")]
    Schema(Box<Schema>),
    #[prost(bool, tag = "2")]
    Boolean(bool),
}

#[derive(Clone, PartialEq, Message)]
struct TypeItem {
    #[prost(string, repeated, tag = "1")]
    value: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ItemsItem {
    #[prost(message, repeated, tag = "1")]
    schema: Vec<Schema>,
}

#[derive(Clone, PartialEq, Message)]
struct Properties {
    #[prost(message, repeated, tag = "1")]
    additional_properties: Vec<NamedSchema>,
}

#[derive(Clone, PartialEq, Message)]
struct NamedAny {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    value: Option<AnyValue>,
}

/// gnostic's `Any`: kubectl reads extensions from their YAML text (JSON is YAML).
#[derive(Clone, PartialEq, Message)]
struct AnyValue {
    #[prost(string, tag = "2")]
    yaml: String,
}

/// The Swagger 2.0 document of the v3 component schemas `schemas` (name → schema), as JSON.
pub fn document(schemas: &Map<String, Value>) -> Value {
    let definitions: Map<String, Value> = schemas.iter().map(|(name, s)| (name.clone(), v2_schema(s))).collect();
    json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": {}, "definitions": definitions})
}

/// One v3 schema as v2 keeps it.
fn v2_schema(s: &Value) -> Value {
    let Some(o) = s.as_object() else { return json!({}) };
    if o.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        && o.get("x-kubernetes-group-version-kind").is_none()
        || o.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
    {
        return json!({});
    }
    let mut out = Map::new();
    if let Some(r) = o.get("$ref").and_then(Value::as_str) {
        out.insert("$ref".into(), to_definitions(r).into());
    }
    // `allOf: [{$ref}]` (how v3 wraps a reference with a description of its own) is the reference itself.
    if let Some([one]) = o.get("allOf").and_then(Value::as_array).map(Vec::as_slice)
        && let Some(r) = one.get("$ref").and_then(Value::as_str)
    {
        out.insert("$ref".into(), to_definitions(r).into());
    }
    let nullable = o.get("nullable") == Some(&Value::Bool(true));
    for key in ["type", "format", "description", "required", "x-kubernetes-group-version-kind"] {
        if let Some(v) = o.get(key)
            && !(key == "type" && nullable)
        {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(p) = o.get("properties").and_then(Value::as_object) {
        out.insert("properties".into(), p.iter().map(|(k, v)| (k.clone(), v2_schema(v))).collect());
    }
    if let Some(items) = o.get("items") {
        out.insert("items".into(), v2_schema(items));
    }
    match o.get("additionalProperties") {
        Some(Value::Bool(b)) => {
            out.insert("additionalProperties".into(), Value::Bool(*b));
        }
        Some(a @ Value::Object(_)) => {
            out.insert("additionalProperties".into(), v2_schema(a));
        }
        _ => {}
    }
    // A kind that keeps unknown fields (the simulator's built-in types): a map of anything, still found by its
    // group-version-kind.
    if o.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        out.remove("properties");
    }
    Value::Object(out)
}

fn to_definitions(r: &str) -> String {
    r.replace("#/components/schemas/", "#/definitions/")
}

/// `document(...)` as gnostic's protobuf.
pub fn encode(doc: &Value) -> Vec<u8> {
    let definitions = doc
        .get("definitions")
        .and_then(Value::as_object)
        .map(|d| d.iter().map(|(name, s)| NamedSchema { name: name.clone(), value: Some(schema(s)) }).collect())
        .unwrap_or_default();
    Document {
        swagger: "2.0".into(),
        info: Some(Info { title: "Kubernetes".into(), version: "v1.32.0".into() }),
        definitions: Some(Definitions { additional_properties: definitions }),
    }
    .encode_to_vec()
}

fn schema(s: &Value) -> Schema {
    let text = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let named = |p: &Map<String, Value>| {
        p.iter().map(|(k, v)| NamedSchema { name: k.clone(), value: Some(schema(v)) }).collect()
    };
    Schema {
        reference: text("$ref"),
        format: text("format"),
        description: text("description"),
        required: s
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default(),
        additional_properties: match s.get("additionalProperties") {
            Some(Value::Bool(b)) => {
                Some(Box::new(AdditionalPropertiesItem { oneof: Some(AdditionalProperties::Boolean(*b)) }))
            }
            Some(a @ Value::Object(_)) => Some(Box::new(AdditionalPropertiesItem {
                oneof: Some(AdditionalProperties::Schema(Box::new(schema(a)))),
            })),
            _ => None,
        },
        r#type: s.get("type").and_then(Value::as_str).map(|t| TypeItem { value: vec![t.to_string()] }),
        items: s.get("items").map(|i| ItemsItem { schema: vec![schema(i)] }),
        properties: s
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| Properties { additional_properties: named(p) }),
        vendor_extension: s
            .get("x-kubernetes-group-version-kind")
            .map(|gvk| NamedAny {
                name: "x-kubernetes-group-version-kind".into(),
                value: Some(AnyValue { yaml: gvk.to_string() }),
            })
            .into_iter()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_schemas_become_what_v2_can_say() {
        let schemas = json!({
            "m": {
                "type": "object",
                "x-kubernetes-group-version-kind": [{"group": "g", "version": "v1", "kind": "M"}],
                "properties": {
                    "metadata": {"allOf": [{"$ref": "#/components/schemas/meta"}]},
                    "spec": {"type": "object", "required": ["site"], "properties": {
                        "site": {"type": "string"},
                        "port": {"type": "integer", "nullable": true},
                        "any": {"type": "object", "x-kubernetes-preserve-unknown-fields": true, "properties": {"a": {"type": "string"}}},
                        "size": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]},
                    }},
                },
            },
        });
        let doc = document(schemas.as_object().expect("object"));
        let m = &doc["definitions"]["m"];
        assert_eq!(m["properties"]["metadata"], json!({"$ref": "#/definitions/meta"}));
        assert_eq!(m["properties"]["spec"]["required"], json!(["site"]));
        assert_eq!(m["properties"]["spec"]["properties"]["port"], json!({}), "nullable drops the type");
        assert_eq!(m["properties"]["spec"]["properties"]["any"], json!({}));
        assert_eq!(m["properties"]["spec"]["properties"]["size"], json!({}));
        let pb = Document::decode(&encode(&doc)[..]).expect("decodes");
        let defs = pb.definitions.expect("definitions").additional_properties;
        let m = defs[0].value.as_ref().expect("schema");
        assert_eq!(
            m.vendor_extension[0].value.as_ref().map(|v| v.yaml.as_str()),
            Some(r#"[{"group":"g","kind":"M","version":"v1"}]"#)
        );
        let props = &m.properties.as_ref().expect("properties").additional_properties;
        assert_eq!(props.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["metadata", "spec"]);
    }
}
