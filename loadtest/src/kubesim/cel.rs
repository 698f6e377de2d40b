//! CEL validation rules (`x-kubernetes-validations`) of custom resources, evaluated as the API server does:
//! compiled once when the CRD is stored (a rule that does not compile rejects the CRD), run on every create
//! and update after pruning and defaulting, with the old object for transition rules. The evaluation itself is
//! kube-cel's, which implements the Kubernetes CEL libraries (`format.*`, lists, quantities, ...).

use std::sync::Arc;

use kube::core::cel::{CompiledSchema, Validator, compile_schema};
use serde_json::{Value, json};

/// The compiled rules of one CRD version.
#[derive(Clone)]
pub struct Rules(Arc<CompiledSchema>);

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rules")
    }
}

thread_local! {
    static VALIDATOR: Validator = Validator::new();
}

/// Compiles every rule of `schema`; None when it has none. Errors name each rule that does not compile.
pub fn compile(schema: &Value) -> Result<Option<Rules>, String> {
    if !schema.to_string().contains("x-kubernetes-validations") {
        return Ok(None);
    }
    let compiled = compile_schema(schema);
    let mut errors = Vec::new();
    compilation_errors(&compiled, &mut errors);
    if !errors.is_empty() {
        return Err(format!("x-kubernetes-validations: compilation failed: {}", errors.join("; ")));
    }
    Ok(Some(Rules(Arc::new(compiled))))
}

fn compilation_errors(c: &CompiledSchema, out: &mut Vec<String>) {
    out.extend(c.compilation_errors().iter().map(|e| e.to_string()));
    let children = c.properties.values().chain(c.items.as_deref()).chain(c.additional_properties.as_deref());
    for child in children.chain(&c.all_of).chain(&c.one_of).chain(&c.any_of) {
        compilation_errors(child, out);
    }
}

/// The 422 causes for `new` (and `old` on update), in the API server's form. As with the API server's
/// validation ratcheting, a failure on a value the update left unchanged does not count: an object stored before
/// a rule existed can still have its status written.
pub fn check(rules: &Rules, new: &Value, old: Option<&Value>) -> Vec<Value> {
    let Err(errors) = VALIDATOR.with(|v| v.validate_compiled(&rules.0, new, old)) else { return Vec::new() };
    errors
        .iter()
        .filter_map(|e| {
            let at = pointer(&e.field_path);
            let now = new.pointer(&at);
            // Ratcheting: a value the update left as it was does not fail it.
            if old.is_some_and(|o| o.pointer(&at) == now) {
                return None;
            }
            let value = match now {
                Some(v) if v.is_object() => "\"object\"".to_string(),
                Some(v) => v.to_string(),
                None => "null".into(),
            };
            Some(json!({
                "reason": e.reason.as_deref().unwrap_or("FieldValueInvalid"),
                "field": e.field_path,
                "message": format!("Invalid value: {value}: {}", e.message),
            }))
        })
        .collect()
}

/// `spec.a.b[2]` as a JSON pointer.
fn pointer(path: &str) -> String {
    let mut out = String::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, rest) = part.split_once('[').unwrap_or((part, ""));
        out.push('/');
        out.push_str(name);
        for idx in rest.split('[') {
            let idx = idx.trim_end_matches(']');
            if !idx.is_empty() {
                out.push('/');
                out.push_str(idx);
            }
        }
    }
    out
}
