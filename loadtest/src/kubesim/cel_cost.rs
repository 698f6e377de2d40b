//! The API server's static cost limit on a CRD's CEL rules. When a CRD is created or updated, the API server
//! estimates the worst-case cost of every `x-kubernetes-validations` rule from its expression and the sizes the
//! schema allows (maxLength, maxItems, maxProperties; an unbounded string or list is as large as a 3 MiB request
//! permits), multiplies it by how often the rule can run (the sizes of the lists and maps above it), and refuses
//! the CRD when one rule costs more than 10,000,000 or all rules of a version's schema more than 100,000,000.
//!
//! This follows the estimator of the Kubernetes sources (apiextensions-apiserver `validation.go` and
//! `schema/cel/compilation.go`, apiserver `pkg/cel/common/schemas.go`, `pkg/cel/library/cost.go`) and cel-go's
//! `checker/cost.go`: the same cost per node (identifiers and field selections 1, literals 0, list literals
//! 10, comprehensions `range + init + result + n × (condition + step)` over the macro expansion the `cel` crate's
//! parser produces, as cel-go's does), the same string traversal factors (0.1; 0.25 per regex character), the
//! same size rules and the same messages. Only the limits matter here: a cost may be off by one or two where a
//! function is priced differently, never by a factor.

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue, operators};
use serde_json::{Value, json};

/// Largest estimated cost of one rule (times how often it can run).
const RULE_LIMIT: u64 = 10_000_000;
/// Largest estimated cost of all rules of one schema.
const SCHEMA_LIMIT: u64 = 100_000_000;
/// The request size bound that sizes what the schema leaves unbounded.
const MAX_REQUEST: u64 = 3 * 1024 * 1024;
/// Rules costing at least this much are named when the schema's total is over its limit (at most four).
const NAMED_SHARE: u64 = SCHEMA_LIMIT / 100;
const HINT: &str = "(try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)";

/// The 422 causes the API server gives `crd` (an `apiextensions.k8s.io/v1` CustomResourceDefinition) for rules
/// over the cost limits; empty when within them. `old` is the stored CRD on update: a version whose schema it
/// leaves unchanged is exempt from the per-rule limit (so tightening the limits never strands a stored CRD).
pub fn check_crd(crd: &Value, old: Option<&Value>) -> Vec<Value> {
    let versions = crd.pointer("/spec/versions").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let schemas: Vec<Option<&Value>> = versions.iter().map(|v| v.pointer("/schema/openAPIV3Schema")).collect();
    let old_schema = |name: Option<&Value>| {
        old?.pointer("/spec/versions")?
            .as_array()?
            .iter()
            .find(|v| v.get("name") == name)?
            .pointer("/schema/openAPIV3Schema")
    };
    let mut causes = Vec::new();
    // A CRD whose versions share one schema is validated as that one schema (`spec.validation`).
    if !schemas.is_empty() && schemas.iter().all(|s| *s == schemas[0]) {
        if let Some(schema) = schemas[0] {
            let unchanged = versions.iter().all(|v| old_schema(v.get("name")) == Some(schema));
            check_schema(schema, "spec.validation.openAPIV3Schema", !unchanged, &mut causes);
        }
        return causes;
    }
    for (i, (v, schema)) in versions.iter().zip(&schemas).enumerate() {
        if let Some(schema) = schema {
            let unchanged = old_schema(v.get("name")) == Some(*schema);
            check_schema(schema, &format!("spec.versions[{i}].schema.openAPIV3Schema"), !unchanged, &mut causes);
        }
    }
    causes
}

/// One rule's (or message expression's) estimated cost, with where it is.
struct Costed {
    field: String,
    cost: u64,
}

fn check_schema(schema: &Value, path: &str, per_rule: bool, causes: &mut Vec<Value>) {
    let mut costs = Vec::new();
    walk(schema, path, Some(1), &mut costs);
    if per_rule {
        for c in costs.iter().filter(|c| c.cost > RULE_LIMIT) {
            let what = if c.field.ends_with("messageExpression") {
                "estimated messageExpression cost"
            } else {
                "estimated rule cost"
            };
            causes.push(forbidden(&c.field, &over_budget(what, c.cost, RULE_LIMIT)));
        }
    }
    let total = costs.iter().fold(0u64, |t, c| t.saturating_add(c.cost));
    if total > SCHEMA_LIMIT {
        let mut top: Vec<&Costed> = costs.iter().filter(|c| c.cost >= NAMED_SHARE).collect();
        top.sort_by_key(|c| std::cmp::Reverse(c.cost));
        for c in top.into_iter().take(4) {
            causes.push(forbidden(
                &c.field,
                "contributed to estimated rule cost total exceeding cost limit for entire OpenAPIv3 schema",
            ));
        }
        let what = "x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema";
        causes.push(forbidden(path, &over_budget(what, total, SCHEMA_LIMIT)));
    }
}

fn forbidden(field: &str, detail: &str) -> Value {
    json!({"reason": "FieldValueForbidden", "field": field, "message": format!("Forbidden: {detail}")})
}

/// `… exceeds budget by factor of 5.9x (try …)`, the factor printed as the API server prints it.
fn over_budget(what: &str, cost: u64, limit: u64) -> String {
    let factor = cost as f64 / limit as f64;
    let factor = if factor > 100.0 {
        "more than 100x".to_string()
    } else if factor < 1.5 {
        format!("{factor:.6}x")
    } else {
        format!("{factor:.1}x")
    };
    format!("{what} exceeds budget by factor of {factor} {HINT}")
}

/// Collects the cost of every rule at and below `node`. `cardinality` is how often a rule at `node` can run in
/// one object: the product of the bounds of the lists and maps above it, None when one of them is unbounded.
fn walk(node: &Value, path: &str, cardinality: Option<u64>, out: &mut Vec<Costed>) {
    if let Some(rules) = node.get("x-kubernetes-validations").and_then(Value::as_array) {
        let times = cardinality.unwrap_or(MAX_REQUEST / (min_size(node) + 1));
        for (i, rule) in rules.iter().enumerate() {
            let at = format!("{path}.x-kubernetes-validations[{i}]");
            if let Some(cost) = rule.get("rule").and_then(Value::as_str).and_then(|r| estimate(r, node)) {
                out.push(Costed { field: format!("{at}.rule"), cost: cost.saturating_mul(times) });
            }
            // A message expression runs once per failure of its rule: no multiplier.
            if let Some(cost) = rule.get("messageExpression").and_then(Value::as_str).and_then(|r| estimate(r, node)) {
                out.push(Costed { field: format!("{at}.messageExpression"), cost });
            }
        }
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            walk(child, &format!("{path}.properties[{name}]"), cardinality, out);
        }
    }
    let times =
        |bound: &str| cardinality.zip(node.get(bound).and_then(Value::as_u64)).map(|(c, b)| c.saturating_mul(b));
    if let Some(items) = node.get("items").filter(|i| i.is_object()) {
        walk(items, &format!("{path}.items"), times("maxItems"), out);
    }
    if let Some(values) = node.get("additionalProperties").filter(|a| a.is_object()) {
        walk(values, &format!("{path}.additionalProperties"), times("maxProperties"), out);
    }
}

fn type_of(node: &Value) -> &str {
    node.get("type").and_then(Value::as_str).unwrap_or_default()
}

fn int_or_string(node: &Value) -> bool {
    node.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true)
}

fn is_map(node: &Value) -> bool {
    type_of(node) == "object" && node.get("additionalProperties").is_some_and(Value::is_object)
}

/// The fewest bytes a value of `node` takes in JSON (`""`, `0`, `true`, `[]`, `{}` plus required fields).
fn min_size(node: &Value) -> u64 {
    if int_or_string(node) {
        return 1;
    }
    match (type_of(node), node.get("format").and_then(Value::as_str)) {
        ("string", Some("duration")) => 3,
        ("string", Some("date")) => 12,
        ("string", Some("date-time")) => 21,
        ("string", _) => 2,
        ("boolean", _) => 4,
        ("integer" | "number", _) => 1,
        ("array", _) => 2,
        ("object", _) if is_map(node) => 2,
        ("object", _) => {
            let required = node.get("required").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
            let props = node.get("properties");
            2 + required
                .iter()
                .filter_map(|r| {
                    let name = r.as_str()?;
                    let p = props?.get(name)?;
                    (p.get("default").is_none()).then(|| name.len() as u64 + min_size(p) + 4)
                })
                .sum::<u64>()
        }
        _ => 1,
    }
}

/// What the estimator knows of a value: its kind, the schema it comes from (if any) and its largest size
/// (characters of a string, elements of a list or map; 0 for schema scalars and objects, 1 for computed scalars);
/// for a list literal, the kind and largest size of its elements (cel-go's entry size).
#[derive(Clone, Copy)]
struct Ty<'s> {
    kind: Kind,
    schema: Option<&'s Value>,
    size: u64,
    items: Option<(Kind, u64)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Str,
    List,
    Map,
    Object,
    Scalar,
    Unknown,
}

impl<'s> Ty<'s> {
    const SCALAR: Ty<'static> = Ty { kind: Kind::Scalar, schema: None, size: 1, items: None };
    const UNKNOWN: Ty<'static> = Ty { kind: Kind::Unknown, schema: None, size: u64::MAX, items: None };

    fn computed(kind: Kind, size: u64) -> Self {
        Ty { kind, schema: None, size, items: None }
    }

    /// The type of a value of `node`, sized as the API server sizes it.
    fn of(node: &'s Value) -> Self {
        let unbounded = MAX_REQUEST - 2;
        let bound = |key: &str| node.get(key).and_then(Value::as_u64);
        let (kind, size) = if int_or_string(node) {
            (Kind::Str, bound("maxLength").map_or(unbounded, |l| l.saturating_mul(4)))
        } else {
            match type_of(node) {
                "string" => {
                    let size = match node.get("format").and_then(Value::as_str) {
                        Some("byte") => bound("maxLength").unwrap_or(unbounded),
                        Some("duration" | "date-time") => 32,
                        Some("date") => 12,
                        _ => match (bound("maxLength"), node.get("enum").and_then(Value::as_array)) {
                            (Some(l), _) => l.saturating_mul(4),
                            (None, Some(values)) => {
                                values.iter().filter_map(Value::as_str).map(|v| v.len() as u64).max().unwrap_or(0)
                            }
                            (None, None) => unbounded,
                        },
                    };
                    (Kind::Str, size)
                }
                "array" => {
                    let items = node.get("items").map_or(1, min_size);
                    (Kind::List, bound("maxItems").unwrap_or(unbounded / (items + 1)))
                }
                "object" if is_map(node) => {
                    let values = node.get("additionalProperties").map_or(1, min_size);
                    (Kind::Map, bound("maxProperties").unwrap_or(unbounded / (values + 6)))
                }
                "object" => (Kind::Object, 0),
                "integer" | "number" | "boolean" => (Kind::Scalar, 0),
                _ => (Kind::Unknown, 0),
            }
        };
        Ty { kind, schema: Some(node), size, items: None }
    }

    /// An element of a list (or a key of a map: the API server sizes map keys as 0).
    fn element(self) -> Ty<'s> {
        match (self.kind, self.schema, self.items) {
            (Kind::List, Some(s), _) => s.get("items").map_or(Ty::UNKNOWN, Ty::of),
            (Kind::Map, Some(_), _) => Ty::computed(Kind::Str, 0),
            (Kind::List, None, Some((kind, size))) => Ty::computed(kind, size),
            _ => Ty::UNKNOWN,
        }
    }

    /// `self[k]`: a list element or a map value.
    fn index(self) -> Ty<'s> {
        match (self.kind, self.schema) {
            (Kind::Map, Some(s)) => s.get("additionalProperties").map_or(Ty::UNKNOWN, Ty::of),
            _ => self.element(),
        }
    }

    fn field(self, name: &str) -> Ty<'s> {
        match self.schema.and_then(|s| s.get("properties")).and_then(|p| p.get(name)) {
            Some(p) => Ty::of(p),
            None => Ty::UNKNOWN,
        }
    }
}

/// `ceil(size × factor)`, saturating.
fn traverse(size: u64, factor: f64) -> u64 {
    if size == u64::MAX {
        return u64::MAX;
    }
    (size as f64 * factor).ceil() as u64
}

/// The estimated largest cost of `rule` run on a value of `node`; None when it does not parse (the compile step
/// reports that).
fn estimate(rule: &str, node: &Value) -> Option<u64> {
    let ast = cel::parser::Parser::new().enable_optional_syntax(true).parse(rule).ok()?;
    let mut env = vec![("self".to_string(), Ty::of(node)), ("oldSelf".to_string(), Ty::of(node))];
    Some(Coster { env: &mut env }.cost(&ast).0)
}

struct Coster<'e, 's> {
    /// Variables in scope (innermost last).
    env: &'e mut Vec<(String, Ty<'s>)>,
}

impl<'s> Coster<'_, 's> {
    fn lookup(&self, name: &str) -> Ty<'s> {
        self.env.iter().rev().find(|(n, _)| n == name).map_or(Ty::UNKNOWN, |(_, t)| *t)
    }

    /// (cost, type) of `e`.
    fn cost(&mut self, e: &IdedExpr) -> (u64, Ty<'s>) {
        match &e.expr {
            Expr::Unspecified => (0, Ty::UNKNOWN),
            Expr::Literal(l) => (0, literal(l)),
            Expr::Ident(name) => (1, self.lookup(name)),
            Expr::Select(s) => {
                let (c, t) = self.cost(&s.operand);
                // has(a.b) costs its operand only (the API server turns presence-test cost off).
                if s.test { (c, Ty::SCALAR) } else { (c.saturating_add(1), t.field(&s.field)) }
            }
            Expr::List(l) => {
                let mut sum = 10u64;
                let mut items: Option<(Kind, u64)> = None;
                for el in &l.elements {
                    let (c, t) = self.cost(el);
                    sum = sum.saturating_add(c);
                    items = Some(match items {
                        None => (t.kind, t.size),
                        Some((kind, size)) => (if kind == t.kind { kind } else { Kind::Unknown }, size.max(t.size)),
                    });
                }
                (sum, Ty { items, ..Ty::computed(Kind::List, l.elements.len() as u64) })
            }
            Expr::Map(m) => (self.entries(30, &m.entries), Ty::computed(Kind::Map, m.entries.len() as u64)),
            Expr::Struct(s) => (self.entries(40, &s.entries), Ty::UNKNOWN),
            Expr::Comprehension(c) => {
                let (range_cost, range) = self.cost(&c.iter_range);
                let (init_cost, accu) = self.cost(&c.accu_init);
                self.env.push((c.iter_var.clone(), range.element()));
                if let Some(v2) = &c.iter_var2 {
                    self.env.push((v2.clone(), range.index()));
                }
                self.env.push((c.accu_var.clone(), accu));
                let per_item = self.cost(&c.loop_cond).0.saturating_add(self.cost(&c.loop_step).0);
                let (result_cost, result) = self.cost(&c.result);
                self.env.truncate(self.env.len() - 2 - usize::from(c.iter_var2.is_some()));
                let cost = range_cost
                    .saturating_add(init_cost)
                    .saturating_add(result_cost)
                    .saturating_add(range.size.saturating_mul(per_item));
                // map and filter build a list as long as the range.
                let result = if accu.kind == Kind::List { Ty::computed(Kind::List, range.size) } else { result };
                (cost, result)
            }
            Expr::Call(call) => self.call(&call.func_name, call.target.as_deref(), &call.args),
        }
    }

    fn entries(&mut self, base: u64, entries: &[cel::common::ast::IdedEntryExpr]) -> u64 {
        let mut sum = base;
        for entry in entries {
            let c = match &entry.expr {
                EntryExpr::StructField(f) => self.cost(&f.value).0,
                EntryExpr::MapEntry(m) => self.cost(&m.key).0.saturating_add(self.cost(&m.value).0),
            };
            sum = sum.saturating_add(c);
        }
        sum
    }

    fn call(&mut self, name: &str, target: Option<&IdedExpr>, args: &[IdedExpr]) -> (u64, Ty<'s>) {
        // `format.dns1123Label()` is a namespaced function, not a member call on a variable `format`.
        let target = target.filter(|t| !matches!(&t.expr, Expr::Ident(i) if i == "format"));
        let (target_cost, this) = match target {
            Some(t) => self.cost(t),
            None => (0, Ty::UNKNOWN),
        };
        let costed: Vec<(u64, Ty<'s>)> = args.iter().map(|a| self.cost(a)).collect();
        let mut sum = costed.iter().fold(target_cost, |s, (c, _)| s.saturating_add(*c));
        let arg = |i: usize| costed.get(i).map_or(Ty::UNKNOWN, |(_, t)| *t);
        // The value a string function works on: the target of a member call, else the first argument.
        let subject = if target.is_some() { this } else { arg(0) };
        let (own, ty) = match name {
            operators::LOGICAL_AND | operators::LOGICAL_OR => (0, Ty::SCALAR),
            operators::CONDITIONAL => {
                // The condition plus the dearer branch.
                let branches = costed.get(1).map_or(0, |c| c.0).max(costed.get(2).map_or(0, |c| c.0));
                sum = costed.first().map_or(0, |c| c.0).saturating_add(branches);
                (0, arg(1))
            }
            operators::EQUALS | operators::NOT_EQUALS => (traverse(arg(0).size.min(arg(1).size), 0.1), Ty::SCALAR),
            operators::LESS | operators::LESS_EQUALS | operators::GREATER | operators::GREATER_EQUALS => {
                let own = if arg(0).kind == Kind::Str { traverse(arg(0).size.min(arg(1).size), 0.1) } else { 1 };
                (own, Ty::SCALAR)
            }
            operators::IN => (if arg(1).kind == Kind::List { arg(1).size } else { 1 }, Ty::SCALAR),
            operators::ADD => match arg(0).kind {
                Kind::Str => {
                    let size = arg(0).size.saturating_add(arg(1).size);
                    (traverse(size, 0.1), Ty::computed(Kind::Str, size))
                }
                Kind::List => (1, Ty::computed(Kind::List, arg(0).size.saturating_add(arg(1).size))),
                _ => (1, Ty::SCALAR),
            },
            operators::INDEX | operators::OPT_INDEX => (1, arg(0).index()),
            "startsWith" | "endsWith" => (traverse(arg(0).size, 0.1), Ty::SCALAR),
            "contains" if this.kind == Kind::Str => {
                (traverse(this.size, 0.1).saturating_mul(traverse(arg(0).size, 0.1)), Ty::SCALAR)
            }
            "matches" if target.is_some() => (regex(this, arg(0)), Ty::SCALAR),
            "find" => (regex(this, arg(0)), Ty::computed(Kind::Str, this.size)),
            "findAll" => (regex(this, arg(0)), Ty::computed(Kind::List, this.size)),
            "lowerAscii" | "upperAscii" | "substring" | "trim" => {
                (traverse(this.size, 0.1), Ty::computed(Kind::Str, this.size))
            }
            "replace" => (traverse(this.size, 0.2), Ty::computed(Kind::Str, u64::MAX)),
            "split" => (traverse(this.size, 0.2), Ty::computed(Kind::List, this.size)),
            "join" => {
                let element = this.element().size;
                let sep = arg(0).size.min(u64::MAX / 2);
                let size =
                    this.size.saturating_mul(element).saturating_add(sep.saturating_mul(this.size.saturating_sub(1)));
                (traverse(size, 0.1), Ty::computed(Kind::Str, size))
            }
            "indexOf" | "lastIndexOf" if this.kind == Kind::Str => (traverse(this.size, 0.1), Ty::SCALAR),
            "isSorted" | "sum" | "min" | "max" | "indexOf" | "lastIndexOf" if this.kind == Kind::List => {
                let element = this.element();
                let each = if element.kind == Kind::Str { 1 + traverse(element.size, 0.1) } else { 1 };
                (this.size.saturating_mul(each), if name == "isSorted" { Ty::SCALAR } else { element })
            }
            "url" => (traverse(subject.size, 0.1), Ty::UNKNOWN),
            "validate" => (traverse(arg(0).size, 0.1).saturating_mul(32), Ty::UNKNOWN),
            "size" => (1, Ty::SCALAR),
            _ => (1, Ty::UNKNOWN),
        };
        (sum.saturating_add(own), ty)
    }
}

/// `s.matches(re)`: a pass over the string per quarter character of the pattern.
fn regex(s: Ty, pattern: Ty) -> u64 {
    traverse(s.size.saturating_add(1), 0.1).saturating_mul(traverse(pattern.size, 0.25))
}

fn literal(l: &LiteralValue) -> Ty<'static> {
    match l {
        LiteralValue::String(s) => Ty::computed(Kind::Str, s.inner().chars().count() as u64),
        LiteralValue::Bytes(b) => Ty::computed(Kind::Str, b.inner().len() as u64),
        _ => Ty::SCALAR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(extra: Value) -> Value {
        let mut s = json!({"type": "array", "items": {"type": "string"}});
        for (k, v) in extra.as_object().unwrap() {
            if k == "maxLength" {
                s["items"]["maxLength"] = v.clone();
            } else {
                s[k] = v.clone();
            }
        }
        s
    }

    /// The API server's own figures (apiextensions-apiserver `compilation_test.go`, `TestCostEstimation`).
    #[test]
    fn estimates_match_the_api_servers() {
        let string = |max: Option<u64>| match max {
            Some(m) => json!({"type": "string", "maxLength": m}),
            None => json!({"type": "string"}),
        };
        assert_eq!(estimate("self.all(x, true)", &strings(json!({}))), Some(3_145_727));
        assert_eq!(estimate("self.all(x, true)", &strings(json!({"maxItems": 20}))), Some(62));
        assert_eq!(
            estimate("self.all(x, true)", &json!({"type": "array", "items": {"type": "number"}})),
            Some(4_718_591)
        );
        assert_eq!(estimate("self.contains('test')", &string(None)), Some(314_574));
        assert_eq!(estimate("self.contains('test')", &string(Some(10))), Some(5));
        assert_eq!(estimate("self.matches(\"x\")", &string(None)), Some(314_574));
        assert_eq!(estimate("self.matches(\"x\")", &string(Some(50))), Some(22));
        assert_eq!(estimate("self.startsWith('test')", &string(None)), Some(2));
        assert_eq!(estimate("size(self + \"hello\") > size(\"hello\")", &string(None)), Some(314_578));
        assert_eq!(estimate("size(self + \"hello\") > size(\"hello\")", &string(Some(4))), Some(7));
        assert_eq!(estimate("self == \"x\"", &string(None)), Some(2));
        assert_eq!(estimate("self == \"x\"", &string(Some(0))), Some(1));
        assert_eq!(estimate("self.size() < 10", &string(None)), Some(3));
    }

    /// The elements of a list literal are as large as its largest element, not unbounded (cel-go tracks
    /// entry sizes): range 10, result 1, two iterations of condition 2 + step (1 + x 1 + a 3-character string
    /// against an 8-character pattern, 1 × 2).
    #[test]
    fn list_literals_bound_their_elements() {
        let string = json!({"type": "string"});
        assert_eq!(estimate("['a', 'bb'].all(x, x.matches('^[a-z]+$'))", &string), Some(23));
        assert_eq!(estimate("['a', 'bb'].exists(x, x == self)", &string), Some(10 + 1 + 2 * (3 + 1 + 3)));
    }

    fn crd(schema: Value) -> Value {
        json!({"spec": {"versions": [{"name": "v1", "schema": {"openAPIV3Schema": {
            "type": "object", "properties": {"spec": {"type": "object", "properties": {"tags": schema}}}}}}]}})
    }

    #[test]
    fn an_unbounded_regex_over_a_list_is_refused_and_bounds_admit_it() {
        let rule = |schema: Value| {
            let mut s = schema;
            s["x-kubernetes-validations"] = json!([{"rule": "self.all(x, x.matches('^[a-z]+$'))"}]);
            check_crd(&crd(s), None)
        };
        let refused = rule(strings(json!({})));
        let at = "spec.validation.openAPIV3Schema.properties[spec].properties[tags].x-kubernetes-validations[0].rule";
        assert_eq!(refused[0]["field"], at);
        assert!(
            refused[0]["message"]
                .as_str()
                .unwrap()
                .contains("estimated rule cost exceeds budget by factor of more than 100x")
        );
        assert_eq!(
            refused[1]["message"],
            "Forbidden: contributed to estimated rule cost total exceeding cost limit for entire OpenAPIv3 schema"
        );
        assert_eq!(refused[2]["field"], "spec.validation.openAPIV3Schema");
        assert_eq!(refused.len(), 3);
        assert!(rule(strings(json!({"maxItems": 10, "maxLength": 63}))).is_empty());
        assert!(rule(strings(json!({"maxItems": 10}))).is_empty(), "6,291,502 is within the limit");
        let long = rule(strings(json!({"maxLength": 63})));
        assert!(long[0]["message"].as_str().unwrap().contains("by factor of 5.9x"), "{long:?}");
    }

    /// A rule on the items of an unbounded list runs once per item: the multiplier alone can refuse it.
    #[test]
    fn a_rule_under_an_unbounded_list_counts_once_per_item() {
        let schema = |max_items: Option<u64>| {
            let mut s = json!({"type": "array", "items": {"type": "string", "maxLength": 63,
                "x-kubernetes-validations": [{"rule": "self.matches('^[a-z]+$')"}]}});
            if let Some(m) = max_items {
                s["maxItems"] = json!(m);
            }
            s
        };
        let refused = check_crd(&crd(schema(None)), None);
        assert!(
            refused[0]["field"].as_str().unwrap().ends_with("properties[tags].items.x-kubernetes-validations[0].rule")
        );
        assert!(check_crd(&crd(schema(Some(10))), None).is_empty());
        // An update that leaves the schema as stored is not refused per rule (the total still counts).
        let stored = crd(schema(None));
        let per_rule = check_crd(&stored, Some(&stored));
        assert!(
            per_rule.iter().all(|c| !c["message"].as_str().unwrap().contains("estimated rule cost exceeds")),
            "{per_rule:?}"
        );
    }

    /// NIO's own CRDs are within the limits (the real API server accepts them).
    #[test]
    fn nios_crds_are_within_the_limits() {
        for file in ["machine.yaml", "nixosconfiguration.yaml"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds").join(file);
            let crd: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            assert_eq!(check_crd(&crd, None), Vec::<Value>::new(), "{file}");
        }
    }
}
