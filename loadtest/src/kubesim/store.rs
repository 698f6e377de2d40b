//! The in-memory object store of one simulated cluster: resource versions, status subresource semantics,
//! generation, finalizers, schema processing, field ownership, and the event history that watches resume from.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::fields::{self, Scope};
use super::registry::ResourceType;
use super::schema;

/// An API error, rendered as a `metav1.Status`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into(), details: None }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        let mut e = Self::new(404, "NotFound", format!("{} \"{name}\" not found", rt.qualified()));
        e.details = Some(json!({"name": name, "group": rt.group, "kind": rt.plural}));
        e
    }
    pub fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {} \"{name}\": {why}", rt.qualified()),
        );
        e.details = Some(json!({"name": name, "group": rt.group, "kind": rt.plural}));
        e
    }
    /// The `metav1.Status` body.
    pub fn status(&self) -> Value {
        let mut v = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// How unknown fields are treated (`fieldValidation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

/// Options of one write.
#[derive(Debug, Clone)]
pub struct WriteOpts {
    pub dry_run: bool,
    pub manager: String,
    pub validation: FieldValidation,
}

impl Default for WriteOpts {
    fn default() -> Self {
        WriteOpts { dry_run: false, manager: "unknown".into(), validation: FieldValidation::Warn }
    }
}

/// Patch flavours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
    Strategic,
    Apply { force: bool },
}

/// A change, as watchers receive it. The JSON line is built once and shared by every watcher.
#[derive(Debug)]
pub struct WatchEvent {
    pub rv: u64,
    pub key: String,
    pub kind: &'static str,
    pub object: Arc<Value>,
    /// The object before a MODIFIED event (a selector watch turns it into ADDED or DELETED when the change
    /// moves the object into or out of the selection).
    pub prev: Option<Arc<Value>>,
    line: OnceLock<Bytes>,
}

impl WatchEvent {
    fn new(rv: u64, key: String, kind: &'static str, object: Arc<Value>) -> Arc<Self> {
        Arc::new(WatchEvent { rv, key, kind, object, prev: None, line: OnceLock::new() })
    }

    fn modified(rv: u64, key: String, object: Arc<Value>, prev: Option<Arc<Value>>) -> Arc<Self> {
        Arc::new(WatchEvent { rv, key, kind: "MODIFIED", object, prev, line: OnceLock::new() })
    }

    /// `{"type":..,"object":..}\n`, serialised on first use.
    pub fn json_line(&self) -> Bytes {
        self.line.get_or_init(|| Self::line_of(self.kind, &self.object)).clone()
    }

    /// The event's type as a watch that selects with `matches` sees it: a modification that moves the object
    /// into the selection is ADDED, out of it DELETED (as the apiserver's watch cache does); None when the object
    /// is not selected before or after.
    pub fn kind_through(&self, matches: impl Fn(&Value) -> bool) -> Option<&'static str> {
        let now = matches(&self.object);
        match (self.kind, &self.prev) {
            ("MODIFIED", Some(prev)) => match (matches(prev), now) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            },
            (kind, _) => now.then_some(kind),
        }
    }

    /// The line a watch that selects with `matches` receives, if any.
    pub fn seen_through(&self, matches: impl Fn(&Value) -> bool) -> Option<Bytes> {
        match self.kind_through(matches)? {
            k if k == self.kind => Some(self.json_line()),
            k => Some(Self::line_of(k, &self.object)),
        }
    }

    /// A watch stream's line, `type` first as the apiserver writes it (Go encodes the struct's fields in order;
    /// a client can then decode the object as it reads it, without buffering it first).
    pub fn line_of(kind: &str, object: &Value) -> Bytes {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(b"{\"type\":\"");
        buf.extend_from_slice(kind.as_bytes());
        buf.extend_from_slice(b"\",\"object\":");
        let _ = serde_json::to_writer(&mut buf, object);
        buf.extend_from_slice(b"}\n");
        Bytes::from(buf)
    }

    pub fn namespace(&self) -> &str {
        self.object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("")
    }
}

/// Events to replay, the live feed, and the resource version the feed starts after.
pub type WatchStart = (Vec<Arc<WatchEvent>>, broadcast::Receiver<Arc<WatchEvent>>, u64);

type Objects = BTreeMap<(String, String), Arc<Value>>;

struct State {
    rv: u64,
    types: Vec<Arc<ResourceType>>,
    objects: HashMap<String, Objects>,
    history: VecDeque<Arc<WatchEvent>>,
    history_cap: usize,
    evicted_upto: u64,
}

/// One simulated cluster's storage.
pub struct Store {
    state: Mutex<State>,
    tx: broadcast::Sender<Arc<WatchEvent>>,
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn meta_str<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get("metadata").and_then(|m| m.get(k)).and_then(Value::as_str)
}

fn meta_mut(v: &mut Value) -> &mut Map<String, Value> {
    if !v.get("metadata").is_some_and(Value::is_object) {
        v["metadata"] = json!({});
    }
    match v.get_mut("metadata").and_then(Value::as_object_mut) {
        Some(m) => m,
        None => unreachable_meta(),
    }
}

#[allow(clippy::panic)]
fn unreachable_meta() -> ! {
    panic!("metadata was just made an object")
}

fn finalizers(v: &Value) -> usize {
    v.pointer("/metadata/finalizers").and_then(Value::as_array).map_or(0, Vec::len)
}

/// Everything but metadata and status: a change here bumps metadata.generation.
fn spec_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl Store {
    pub fn new(history_cap: usize) -> Self {
        let (tx, _) = broadcast::channel(65_536);
        let mut types: Vec<Arc<ResourceType>> = ResourceType::builtins().into_iter().map(Arc::new).collect();
        types.shrink_to_fit();
        let store = Store {
            state: Mutex::new(State {
                rv: 1,
                types,
                objects: HashMap::new(),
                history: VecDeque::new(),
                history_cap,
                evicted_upto: 0,
            }),
            tx,
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let _ = store.create_namespace(ns);
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn create_namespace(&self, name: &str) -> ApiResult<()> {
        let rt =
            self.resolve("", "v1", "namespaces").ok_or_else(|| ApiError::new(500, "InternalError", "no namespaces"))?;
        self.create(
            &rt,
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
            &WriteOpts::default(),
        )
        .map(|_| ())
    }

    /// All served types.
    pub fn types(&self) -> Vec<Arc<ResourceType>> {
        self.lock().types.clone()
    }

    /// The type served at group/version/plural.
    pub fn resolve(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.lock().types.iter().find(|t| t.group == group && t.version == version && t.plural == plural).cloned()
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Registers a CRD object's types (used at start for `crds/`, and when CRDs are written).
    pub fn register_crd(&self, crd: Value) -> ApiResult<Arc<Value>> {
        let rt = self
            .resolve("apiextensions.k8s.io", "v1", "customresourcedefinitions")
            .ok_or_else(|| ApiError::new(500, "InternalError", "no CRD type"))?;
        let name = meta_str(&crd, "name").unwrap_or_default().to_string();
        let opts = WriteOpts { manager: "kubesim".into(), ..Default::default() };
        match self.get(&rt, None, &name) {
            Ok(_) => {
                self.patch(&rt, None, &name, PatchKind::Apply { force: true }, &crd, Scope::Main, &opts).map(|(v, _)| v)
            }
            Err(_) => self.create(&rt, None, crd, &opts).map(|(v, _)| v),
        }
    }

    fn emit(&self, st: &mut State, ev: Arc<WatchEvent>) {
        st.history.push_back(ev.clone());
        while st.history.len() > st.history_cap {
            if let Some(old) = st.history.pop_front() {
                st.evicted_upto = old.rv;
            }
        }
        let _ = self.tx.send(ev);
    }

    fn check_namespace(st: &State, rt: &ResourceType, ns: Option<&str>) -> ApiResult<String> {
        if !rt.namespaced {
            return Ok(String::new());
        }
        let ns = ns.ok_or_else(|| {
            ApiError::bad_request("the server could not find the requested resource: a namespace is required")
        })?;
        let nsobj = st.objects.get("/namespaces").and_then(|m| m.get(&(String::new(), ns.to_string())));
        match nsobj {
            None => {
                let mut e = ApiError::new(404, "NotFound", format!("namespaces \"{ns}\" not found"));
                e.details = Some(json!({"name": ns, "kind": "namespaces"}));
                Err(e)
            }
            Some(o) if o.pointer("/metadata/deletionTimestamp").is_some() => Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    rt.qualified()
                ),
            )),
            Some(_) => Ok(ns.to_string()),
        }
    }

    pub fn get(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> ApiResult<Arc<Value>> {
        let st = self.lock();
        st.objects
            .get(&rt.key())
            .and_then(|m| m.get(&(ns.unwrap_or("").to_string(), name.to_string())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Objects of a type (in one namespace, or all), filtered, with the list resource version.
    pub fn list(&self, rt: &ResourceType, ns: Option<&str>, keep: impl Fn(&Value) -> bool) -> (Vec<Arc<Value>>, u64) {
        let st = self.lock();
        let items = match st.objects.get(&rt.key()) {
            None => vec![],
            Some(m) => match ns {
                Some(ns) => m
                    .range((ns.to_string(), String::new())..)
                    .take_while(|((n, _), _)| n == ns)
                    .map(|(_, v)| v)
                    .filter(|v| keep(v))
                    .cloned()
                    .collect(),
                None => m.values().filter(|v| keep(v)).cloned().collect(),
            },
        };
        (items, st.rv)
    }

    /// Starts a watch: the events to send first, and the live feed.
    pub fn watch(&self, rt: &ResourceType, from: Option<u64>) -> ApiResult<WatchStart> {
        let st = self.lock();
        let key = rt.key();
        let initial = match from {
            None | Some(0) => st
                .objects
                .get(&key)
                .map(|m| {
                    m.values()
                        .map(|o| {
                            let rv = meta_str(o, "resourceVersion").and_then(|s| s.parse().ok()).unwrap_or(0);
                            WatchEvent::new(rv, key.clone(), "ADDED", o.clone())
                        })
                        .collect()
                })
                .unwrap_or_default(),
            Some(r) => {
                if r < st.evicted_upto {
                    return Err(ApiError::new(
                        410,
                        "Expired",
                        format!("too old resource version: {r} ({})", st.evicted_upto + 1),
                    ));
                }
                st.history.iter().filter(|e| e.rv > r && e.key == key).cloned().collect()
            }
        };
        Ok((initial, self.tx.subscribe(), st.rv))
    }

    pub fn create(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        mut obj: Value,
        opts: &WriteOpts,
    ) -> ApiResult<(Arc<Value>, Vec<String>)> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body of the request was not a JSON object"));
        }
        if let Some(k) = obj.get("kind").and_then(Value::as_str)
            && k != rt.kind
        {
            return Err(ApiError::bad_request(format!("the kind {k} does not match the resource {}", rt.qualified())));
        }
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        if let (Some(body_ns), Some(path_ns)) = (meta_str(&obj, "namespace"), ns)
            && body_ns != path_ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut st = self.lock();
        let ns = Self::check_namespace(&st, rt, ns)?;
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            (Some(n), _) if !n.is_empty() => n.to_string(),
            (_, Some(prefix)) => {
                let suffix: String = uuid::Uuid::new_v4()
                    .simple()
                    .to_string()
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric())
                    .take(5)
                    .collect();
                format!("{prefix}{suffix}")
            }
            _ => {
                return Err(self.invalid(
                    rt,
                    "",
                    vec![cause(
                        "FieldValueRequired",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    )],
                ));
            }
        };
        if !valid_name(&name) {
            return Err(self.invalid(rt, &name, vec![cause("FieldValueInvalid", "metadata.name", &format!("Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"))]));
        }
        if st.objects.get(&rt.key()).is_some_and(|m| m.contains_key(&(ns.clone(), name.clone()))) {
            let mut e = ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", rt.qualified()));
            e.details = Some(json!({"name": name, "group": rt.group, "kind": rt.plural}));
            return Err(e);
        }
        let meta = meta_mut(&mut obj);
        meta.insert("name".into(), json!(name));
        if rt.namespaced {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.remove("deletionTimestamp");
        if rt.status_subresource
            && rt.custom
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        let scope = if rt.status_subresource { Scope::Main } else { Scope::All };
        if meta_str(&obj, "managedFields").is_none() && obj.pointer("/metadata/managedFields").is_none() {
            fields::record_update(None, &mut obj, &opts.manager, scope, &rt.api_version(), &now(), rt.schema.as_ref());
        }
        self.commit(&mut st, rt, &ns, &name, None, obj, opts)
    }

    fn invalid(&self, rt: &ResourceType, name: &str, causes: Vec<Value>) -> ApiError {
        let msgs: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c["field"].as_str().unwrap_or(""), c["message"].as_str().unwrap_or("")))
            .collect();
        let joined = if msgs.len() == 1 { msgs[0].clone() } else { format!("[{}]", msgs.join(", ")) };
        let gk = if rt.group.is_empty() { rt.kind.clone() } else { format!("{}.{}", rt.kind, rt.group) };
        let mut e = ApiError::new(422, "Invalid", format!("{gk} \"{name}\" is invalid: {joined}"));
        e.details = Some(json!({"name": name, "group": rt.group, "kind": rt.kind, "causes": causes}));
        e
    }

    /// Validates, stamps and stores `new` (replacing `old`), emitting the watch event.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &self,
        st: &mut State,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        old: Option<&Arc<Value>>,
        mut new: Value,
        opts: &WriteOpts,
    ) -> ApiResult<(Arc<Value>, Vec<String>)> {
        let mut warnings = Vec::new();
        if let Some(schema) = &rt.schema {
            let outcome = schema::process(schema, &mut new);
            if !outcome.unknown.is_empty() {
                match opts.validation {
                    FieldValidation::Strict => {
                        let list: Vec<String> =
                            outcome.unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
                        return Err(ApiError::bad_request(format!(
                            "{} in body: strict decoding error: {}",
                            rt.kind,
                            list.join(", ")
                        )));
                    }
                    FieldValidation::Warn => {
                        warnings.extend(outcome.unknown.iter().map(|f| format!("unknown field \"{f}\"")))
                    }
                    FieldValidation::Ignore => {}
                }
            }
            if !outcome.causes.is_empty() {
                let causes = outcome
                    .causes
                    .iter()
                    .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                    .collect();
                return Err(self.invalid(rt, name, causes));
            }
            if let Some(rules) = &rt.rules {
                let causes = super::cel::check(rules, &new, old.map(|o| &**o));
                if !causes.is_empty() {
                    return Err(self.invalid(rt, name, causes));
                }
            }
        }
        let causes = builtin_rules(rt, old.map(|o| &**o), &new);
        if !causes.is_empty() {
            return Err(self.invalid(rt, name, causes));
        }
        if rt.kind == "Secret" {
            secret_string_data(&mut new);
        }
        if rt.kind == "Namespace" && new.pointer("/status/phase").is_none() {
            new["status"] = json!({"phase": "Active"});
        }
        let crd_types = if rt.kind == "CustomResourceDefinition" {
            let types = ResourceType::from_crd(&new)
                .map_err(|m| self.invalid(rt, name, vec![cause("FieldValueInvalid", "spec", &m)]))?;
            let too_costly = super::cel_cost::check_crd(&new, old.map(|v| &**v));
            if !too_costly.is_empty() {
                return Err(self.invalid(rt, name, too_costly));
            }
            establish_crd(&mut new);
            Some(types)
        } else {
            None
        };
        let generation = match old {
            None => 1,
            Some(o) => {
                let g = o.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
                if spec_part(o) != spec_part(&new) { g + 1 } else { g }
            }
        };
        let rv = st.rv + 1;
        {
            let meta = meta_mut(&mut new);
            meta.insert("generation".into(), json!(generation));
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            match old {
                Some(o) => {
                    for k in ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds"] {
                        match o.pointer(&format!("/metadata/{k}")) {
                            Some(v) => meta.insert(k.into(), v.clone()),
                            None => meta.remove(k),
                        };
                    }
                }
                None => {
                    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
                    meta.insert("creationTimestamp".into(), json!(now()));
                }
            }
        }
        // Like etcd3's GuaranteedUpdate: a write that changes nothing (timestamps of managedFields aside) stores
        // nothing, keeps the resourceVersion and notifies no watcher.
        if let Some(o) = old
            && unchanged(o, &new)
        {
            return Ok((o.clone(), warnings));
        }
        if opts.dry_run {
            return Ok((Arc::new(new), warnings));
        }
        st.rv = rv;
        let key = rt.key();
        let deleting = new.pointer("/metadata/deletionTimestamp").is_some() && finalizers(&new) == 0;
        let new = Arc::new(new);
        if deleting {
            st.objects.entry(key.clone()).or_default().remove(&(ns.to_string(), name.to_string()));
            self.emit(st, WatchEvent::new(rv, key, "DELETED", new.clone()));
            self.after_delete(st, rt, ns, &new);
            return Ok((new, warnings));
        }
        st.objects.entry(key.clone()).or_default().insert((ns.to_string(), name.to_string()), new.clone());
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        let ev = match old {
            Some(o) => WatchEvent::modified(rv, key, new.clone(), Some(o.clone())),
            None => WatchEvent::new(rv, key, kind, new.clone()),
        };
        self.emit(st, ev);
        self.mirror_event(st, rt, ns, name, &new, kind);
        if let Some(types) = crd_types {
            let plural_group = types.first().map(|t| (t.group.clone(), t.plural.clone()));
            st.types
                .retain(|t| !(t.custom && plural_group.as_ref().is_some_and(|(g, p)| &t.group == g && &t.plural == p)));
            st.types.extend(types.into_iter().map(Arc::new));
        }
        Ok((new, warnings))
    }

    /// PUT: replaces the object (or its status), with optimistic concurrency on metadata.resourceVersion.
    pub fn update(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
        scope: Scope,
        opts: &WriteOpts,
    ) -> ApiResult<(Arc<Value>, Vec<String>)> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body of the request was not a JSON object"));
        }
        if meta_str(&obj, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request("the name of the object does not match the name on the URL"));
        }
        let mut st = self.lock();
        let nskey = ns.unwrap_or("").to_string();
        let old = st.objects.get(&rt.key()).and_then(|m| m.get(&(nskey.clone(), name.to_string()))).cloned();
        let Some(old) = old else { return Err(ApiError::not_found(rt, name)) };
        if let Some(rv) = meta_str(&obj, "resourceVersion")
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(
                rt,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        let mut new = scoped(rt, &old, obj, scope);
        meta_mut(&mut new).insert("name".into(), json!(name));
        if rt.namespaced {
            meta_mut(&mut new).insert("namespace".into(), json!(nskey));
        }
        // managedFields in the body are ignored; ownership is recomputed.
        if let Some(mf) = old.pointer("/metadata/managedFields") {
            meta_mut(&mut new).insert("managedFields".into(), mf.clone());
        }
        fields::record_update(
            Some(&old),
            &mut new,
            &opts.manager,
            effective(rt, scope),
            &rt.api_version(),
            &now(),
            rt.schema.as_ref(),
        );
        self.commit(&mut st, rt, &nskey, name, Some(&old), new, opts)
    }

    /// PATCH: merge, JSON, strategic-merge (treated as merge) or server-side apply.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: PatchKind,
        body: &Value,
        scope: Scope,
        opts: &WriteOpts,
    ) -> ApiResult<(Arc<Value>, Vec<String>)> {
        let nskey = ns.unwrap_or("").to_string();
        let old = {
            let st = self.lock();
            st.objects.get(&rt.key()).and_then(|m| m.get(&(nskey.clone(), name.to_string()))).cloned()
        };
        let scope = effective(rt, scope);
        match kind {
            PatchKind::Apply { force } => {
                if !body.is_object() {
                    return Err(ApiError::bad_request("apply patches must be objects"));
                }
                if meta_str(body, "name").is_some_and(|n| n != name) {
                    return Err(ApiError::bad_request("the name of the object does not match the name on the URL"));
                }
                if let Some(k) = body.get("kind").and_then(Value::as_str)
                    && k != rt.kind
                {
                    return Err(ApiError::bad_request(format!(
                        "the kind {k} does not match the resource {}",
                        rt.qualified()
                    )));
                }
                let mut intent = body.clone();
                intent["apiVersion"] = json!(rt.api_version());
                intent["kind"] = json!(rt.kind);
                let new = fields::apply(old.as_deref(), &intent, &opts.manager, scope, force, &rt.api_version(), &now(), rt.schema.as_ref()).map_err(|conflicts| {
                    let causes: Vec<Value> = conflicts
                        .iter()
                        .map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\"", c.manager), "field": format!(".{}", c.path.join("."))}))
                        .collect();
                    let list: Vec<String> = conflicts.iter().map(|c| format!("conflict with \"{}\": .{}", c.manager, c.path.join("."))).collect();
                    let mut e = ApiError::new(
                        409,
                        "Conflict",
                        format!("Apply failed with {} conflict{}: {}", conflicts.len(), if conflicts.len() == 1 { "" } else { "s" }, list.join("\n")),
                    );
                    e.details = Some(json!({"name": name, "group": rt.group, "kind": rt.plural, "causes": causes}));
                    e
                })?;
                match old {
                    None => {
                        if scope == Scope::Status {
                            return Err(ApiError::not_found(rt, name));
                        }
                        if meta_str(body, "name").is_none() {
                            return Err(ApiError::bad_request(format!(
                                "the name of the object ({name} based on URL) was undeterminable: name must be provided"
                            )));
                        }
                        let mut new = new;
                        meta_mut(&mut new).insert("name".into(), json!(name));
                        self.create(rt, ns, new, opts)
                    }
                    Some(old) => {
                        let mut st = self.lock();
                        if st
                            .objects
                            .get(&rt.key())
                            .and_then(|m| m.get(&(nskey.clone(), name.to_string())))
                            .is_none_or(|cur| !Arc::ptr_eq(cur, &old))
                        {
                            drop(st);
                            return self.patch(rt, ns, name, kind, body, scope, opts);
                        }
                        if let Some(rv) = meta_str(body, "resourceVersion")
                            && Some(rv) != meta_str(&old, "resourceVersion")
                        {
                            return Err(ApiError::conflict(
                                rt,
                                name,
                                "the object has been modified; please apply your changes to the latest version and try again",
                            ));
                        }
                        let new = scoped(rt, &old, new, scope);
                        self.commit(&mut st, rt, &nskey, name, Some(&old), new, opts)
                    }
                }
            }
            _ => {
                let Some(old) = old else { return Err(ApiError::not_found(rt, name)) };
                let mut patched = (*old).clone();
                match kind {
                    PatchKind::Json => {
                        let p = json_patch_ops(&patched, body)?;
                        json_patch::patch(&mut patched, &p).map_err(|e| {
                            ApiError::new(
                                422,
                                "Invalid",
                                format!("the server rejected our request due to an error in our request: {e}"),
                            )
                        })?;
                    }
                    _ => {
                        if !body.is_object() {
                            return Err(ApiError::bad_request("merge patches must be JSON objects"));
                        }
                        json_patch::merge(&mut patched, body);
                    }
                }
                let mut st = self.lock();
                let cur = st.objects.get(&rt.key()).and_then(|m| m.get(&(nskey.clone(), name.to_string()))).cloned();
                if cur.as_ref().is_none_or(|c| !Arc::ptr_eq(c, &old)) {
                    drop(st);
                    return self.patch(rt, ns, name, kind, body, scope, opts);
                }
                if let Some(rv) = meta_str(&patched, "resourceVersion")
                    && Some(rv) != meta_str(&old, "resourceVersion")
                {
                    return Err(ApiError::conflict(
                        rt,
                        name,
                        "the object has been modified; please apply your changes to the latest version and try again",
                    ));
                }
                // As the real apiserver's custom resource strategy: a patch may not move the object to another
                // kind or version, nor change its uid (found by fuzzing: kubesim used to store either).
                let causes = if rt.custom { identity_causes(rt, &old, &patched) } else { Vec::new() };
                if !causes.is_empty() {
                    return Err(self.invalid(rt, name, causes));
                }
                let mut new = scoped(rt, &old, patched, scope);
                for k in ["name", "namespace", "uid"] {
                    if let Some(v) = old.pointer(&format!("/metadata/{k}")) {
                        meta_mut(&mut new).insert(k.into(), v.clone());
                    }
                }
                if let Some(mf) = old.pointer("/metadata/managedFields") {
                    meta_mut(&mut new).insert("managedFields".into(), mf.clone());
                }
                fields::record_update(
                    Some(&old),
                    &mut new,
                    &opts.manager,
                    scope,
                    &rt.api_version(),
                    &now(),
                    rt.schema.as_ref(),
                );
                self.commit(&mut st, rt, &nskey, name, Some(&old), new, opts)
            }
        }
    }

    /// DELETE: objects with finalizers get a deletionTimestamp and stay until the last finalizer goes.
    pub fn delete(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        precondition_rv: Option<&str>,
        precondition_uid: Option<&str>,
        dry_run: bool,
    ) -> ApiResult<Arc<Value>> {
        let mut st = self.lock();
        let nskey = ns.unwrap_or("").to_string();
        let old = st.objects.get(&rt.key()).and_then(|m| m.get(&(nskey.clone(), name.to_string()))).cloned();
        let Some(old) = old else { return Err(ApiError::not_found(rt, name)) };
        if precondition_rv.is_some_and(|rv| Some(rv) != meta_str(&old, "resourceVersion")) {
            return Err(ApiError::conflict(
                rt,
                name,
                "the ResourceVersion in the precondition does not match the ResourceVersion in record. The object might have been modified",
            ));
        }
        if precondition_uid.is_some_and(|uid| Some(uid) != meta_str(&old, "uid")) {
            return Err(ApiError::conflict(
                rt,
                name,
                "the UID in the precondition does not match the UID in record. The object might have been deleted and then recreated",
            ));
        }
        if dry_run {
            return Ok(old);
        }
        self.delete_locked(&mut st, rt, &nskey, name, &old)
    }

    fn delete_locked(
        &self,
        st: &mut State,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        old: &Arc<Value>,
    ) -> ApiResult<Arc<Value>> {
        let rv = st.rv + 1;
        let key = rt.key();
        let mut new = (**old).clone();
        let terminating = rt.kind == "Namespace" && self.namespace_has_objects(st, name);
        if finalizers(old) > 0 || terminating {
            if old.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(old.clone());
            }
            st.rv = rv;
            let meta = meta_mut(&mut new);
            meta.insert("deletionTimestamp".into(), json!(now()));
            meta.insert("deletionGracePeriodSeconds".into(), json!(0));
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            if rt.custom {
                let g = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
                meta.insert("generation".into(), json!(g + 1));
            }
            if rt.kind == "Namespace" {
                new["status"] = json!({"phase": "Terminating"});
            }
            let new = Arc::new(new);
            st.objects.entry(key.clone()).or_default().insert((ns.to_string(), name.to_string()), new.clone());
            self.emit(st, WatchEvent::modified(rv, key, new.clone(), Some(old.clone())));
            if rt.kind == "Namespace" {
                self.delete_namespace_contents(st, name);
            }
            return Ok(new);
        }
        st.rv = rv;
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        let new = Arc::new(new);
        st.objects.entry(key.clone()).or_default().remove(&(ns.to_string(), name.to_string()));
        self.emit(st, WatchEvent::new(rv, key, "DELETED", new.clone()));
        self.mirror_event(st, rt, ns, name, &new, "DELETED");
        self.after_delete(st, rt, ns, &new);
        Ok(new)
    }

    fn namespace_has_objects(&self, st: &State, ns: &str) -> bool {
        st.types.iter().filter(|t| t.namespaced).any(|t| {
            st.objects
                .get(&t.key())
                .is_some_and(|m| m.range((ns.to_string(), String::new())..).next().is_some_and(|((n, _), _)| n == ns))
        })
    }

    fn delete_namespace_contents(&self, st: &mut State, ns: &str) {
        let types: Vec<Arc<ResourceType>> = st.types.iter().filter(|t| t.namespaced).cloned().collect();
        for t in types {
            let victims: Vec<(String, Arc<Value>)> = st
                .objects
                .get(&t.key())
                .map(|m| {
                    m.range((ns.to_string(), String::new())..)
                        .take_while(|((n, _), _)| n == ns)
                        .map(|((_, name), v)| (name.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            for (name, obj) in victims {
                let _ = self.delete_locked(st, &t, ns, &name, &obj);
            }
        }
    }

    /// Side effects of an object leaving the store.
    /// core/v1 and events.k8s.io/v1 Events are one resource in two shapes (as on the real server): a write to
    /// either is visible, converted, through the other.
    fn mirror_event(&self, st: &mut State, rt: &ResourceType, ns: &str, name: &str, obj: &Value, kind: &'static str) {
        if rt.kind != "Event" || !(rt.group.is_empty() || rt.group == "events.k8s.io") {
            return;
        }
        let (other_key, converted) = if rt.group.is_empty() {
            ("events.k8s.io/events".to_string(), convert_event(obj, true))
        } else {
            ("/events".to_string(), convert_event(obj, false))
        };
        let converted = Arc::new(converted);
        let entry = st.objects.entry(other_key.clone()).or_default();
        if kind == "DELETED" {
            entry.remove(&(ns.to_string(), name.to_string()));
        } else {
            entry.insert((ns.to_string(), name.to_string()), converted.clone());
        }
        let rv = st.rv;
        self.emit(st, WatchEvent::new(rv, other_key, kind, converted));
    }

    fn after_delete(&self, st: &mut State, rt: &ResourceType, ns: &str, obj: &Value) {
        if rt.kind == "CustomResourceDefinition" {
            if let (Some(group), Some(plural)) = (
                obj.pointer("/spec/group").and_then(Value::as_str),
                obj.pointer("/spec/names/plural").and_then(Value::as_str),
            ) {
                st.types.retain(|t| !(t.custom && t.group == group && t.plural == plural));
                st.objects.remove(&format!("{group}/{plural}"));
            }
            return;
        }
        if rt.namespaced && !ns.is_empty() {
            let nsobj = st.objects.get("/namespaces").and_then(|m| m.get(&(String::new(), ns.to_string()))).cloned();
            if let Some(nsobj) = nsobj
                && nsobj.pointer("/metadata/deletionTimestamp").is_some()
                && !self.namespace_has_objects(st, ns)
                && let Some(nsrt) = st.types.iter().find(|t| t.kind == "Namespace").cloned()
            {
                let mut final_ns = (*nsobj).clone();
                if let Some(m) = final_ns.pointer_mut("/metadata").and_then(Value::as_object_mut) {
                    m.remove("finalizers");
                }
                let _ = self.delete_locked(st, &nsrt, "", ns, &Arc::new(final_ns));
            }
        }
    }
}

/// Parses a JSON patch. Like the API server, a `test` for `null` passes when the path is absent (kube-rs'
/// finalizer helper relies on this).
/// What the real apiserver refuses in a patched object: `apiVersion` or `kind` other than the resource's
/// ("must be …"), a changed `metadata.uid` ("field is immutable").
fn identity_causes(rt: &ResourceType, old: &Value, patched: &Value) -> Vec<Value> {
    let mut causes = Vec::new();
    for (field, want) in [("apiVersion", rt.api_version()), ("kind", rt.kind.clone())] {
        let got = patched.get(field);
        if got.and_then(Value::as_str) != Some(want.as_str()) {
            let shown = got.map_or("null".to_string(), |v| v.as_str().map_or(v.to_string(), str::to_string));
            causes.push(json!({"reason": "FieldValueInvalid", "field": field,
                "message": format!("Invalid value: \"{shown}\": must be {want}")}));
        }
    }
    let uid = |v: &Value| v.pointer("/metadata/uid").cloned();
    if let Some(new_uid) = uid(patched)
        && Some(&new_uid) != uid(old).as_ref()
    {
        let shown = new_uid.as_str().map_or(new_uid.to_string(), str::to_string);
        causes.push(json!({"reason": "FieldValueInvalid", "field": "metadata.uid",
            "message": format!("Invalid value: \"{shown}\": field is immutable")}));
    }
    causes
}

fn json_patch_ops(target: &Value, body: &Value) -> ApiResult<json_patch::Patch> {
    let ops = body.as_array().ok_or_else(|| ApiError::bad_request("a JSON patch must be an array of operations"))?;
    let kept: Vec<Value> = ops
        .iter()
        .filter(|op| {
            let null_test =
                op.get("op").and_then(Value::as_str) == Some("test") && op.get("value").is_some_and(Value::is_null);
            let absent =
                op.get("path").and_then(Value::as_str).is_some_and(|p| target.pointer(p).is_none_or(Value::is_null));
            !(null_test && absent)
        })
        .cloned()
        .collect();
    serde_json::from_value(Value::Array(kept)).map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))
}

/// core/v1 Event field ↔ events.k8s.io/v1 Event field.
const EVENT_FIELDS: [(&str, &str); 7] = [
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

/// An Event in the other API's shape: to events.k8s.io/v1 when `to_new`, else to core/v1.
fn convert_event(obj: &Value, to_new: bool) -> Value {
    let mut out = obj.clone();
    let Some(m) = out.as_object_mut() else { return out };
    for (core, new) in EVENT_FIELDS {
        let (from, to) = if to_new { (core, new) } else { (new, core) };
        if let Some(v) = m.remove(from) {
            m.insert(to.into(), v);
        }
    }
    m.insert("apiVersion".into(), json!(if to_new { "events.k8s.io/v1" } else { "v1" }));
    out
}

/// Whether `new` is `old` apart from its resourceVersion and the times in managedFields.
fn unchanged(old: &Value, new: &Value) -> bool {
    // Compared in place (this runs on every write): equal maps except under the keys `skip` ignores.
    fn same_except(a: &Value, b: &Value, skip: impl Fn(&str, &Value, &Value) -> bool) -> bool {
        match (a.as_object(), b.as_object()) {
            (Some(a), Some(b)) => {
                a.len() == b.len() && a.iter().all(|(k, av)| b.get(k).is_some_and(|bv| skip(k, av, bv) || av == bv))
            }
            _ => a == b,
        }
    }
    let managed_fields = |a: &Value, b: &Value| match (a.as_array(), b.as_array()) {
        (Some(a), Some(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_except(x, y, |k, _, _| k == "time"))
        }
        _ => a == b,
    };
    same_except(old, new, |k, a, b| {
        k == "metadata"
            && same_except(a, b, |k, a, b| k == "resourceVersion" || (k == "managedFields" && managed_fields(a, b)))
    })
}

/// Rules the real apiserver enforces on every object or on built-in kinds, beyond the schema.
fn builtin_rules(rt: &ResourceType, old: Option<&Value>, new: &Value) -> Vec<Value> {
    let mut causes = Vec::new();
    let list = |v: &Value| -> Vec<String> {
        v.pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|f| f.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    if let Some(o) = old
        && o.pointer("/metadata/deletionTimestamp").is_some()
    {
        let before = list(o);
        if list(new).iter().any(|f| !before.contains(f)) {
            causes.push(cause(
                "FieldValueForbidden",
                "metadata.finalizers",
                "Forbidden: no new finalizers can be added if the object is being deleted",
            ));
        }
    }
    if rt.kind == "Lease" && rt.group == "coordination.k8s.io" {
        // ValidateLeaseSpec: a duration above zero, transitions not negative.
        let int = |k: &str| new.pointer(&format!("/spec/{k}")).and_then(Value::as_i64);
        if let Some(d) = int("leaseDurationSeconds").filter(|d| *d <= 0) {
            causes.push(cause(
                "FieldValueInvalid",
                "spec.leaseDurationSeconds",
                &format!("Invalid value: {d}: must be greater than 0"),
            ));
        }
        if let Some(t) = int("leaseTransitions").filter(|t| *t < 0) {
            causes.push(cause(
                "FieldValueInvalid",
                "spec.leaseTransitions",
                &format!("Invalid value: {t}: must be greater than or equal to 0"),
            ));
        }
    }
    if rt.kind == "Event" {
        // ValidateEventCreate: the involved object (core/v1) or `regarding` (events.k8s.io/v1) is in the
        // Event's namespace; events.k8s.io also requires a type and caps the note at 1024 bytes.
        let new_api = rt.group == "events.k8s.io";
        let ns = meta_str(new, "namespace").unwrap_or("");
        let pointer = if new_api { "/regarding/namespace" } else { "/involvedObject/namespace" };
        let involved = new.pointer(pointer).and_then(Value::as_str).unwrap_or("");
        let ok = if involved.is_empty() { ns.is_empty() || ns == "default" } else { involved == ns };
        if !ok {
            causes.push(cause(
                "FieldValueInvalid",
                "involvedObject.namespace",
                &format!("Invalid value: \"{involved}\": does not match event.namespace"),
            ));
        }
        if new_api {
            let ty = new.get("type").and_then(Value::as_str).unwrap_or("");
            if ty != "Normal" && ty != "Warning" {
                causes.push(cause(
                    "FieldValueInvalid",
                    "type",
                    &format!("Invalid value: \"{ty}\": has invalid value: {ty}"),
                ));
            }
            let note = new.get("note").and_then(Value::as_str).unwrap_or("");
            if note.len() > 1024 {
                causes.push(cause(
                    "FieldValueInvalid",
                    "message",
                    "Invalid value: \"\": can have at most 1024 characters",
                ));
            }
        }
    }
    causes
}

fn cause(reason: &str, field: &str, message: &str) -> Value {
    json!({"reason": reason, "field": field, "message": message})
}

/// The scope a write actually has: types without a status subresource are written whole.
fn effective(rt: &ResourceType, scope: Scope) -> Scope {
    match (rt.status_subresource, scope) {
        (false, _) => Scope::All,
        (true, Scope::All) => Scope::Main,
        (true, s) => s,
    }
}

/// Applies status-subresource rules: main writes keep the stored status; status writes keep everything else.
fn scoped(rt: &ResourceType, old: &Value, mut new: Value, scope: Scope) -> Value {
    match effective(rt, scope) {
        Scope::All => new,
        Scope::Main => {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            new
        }
        Scope::Status => {
            let mut out = old.clone();
            match new.get_mut("status").map(Value::take) {
                Some(s) if !s.is_null() => out["status"] = s,
                _ => {
                    if let Some(m) = out.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            if let Some(mf) = new.pointer("/metadata/managedFields") {
                meta_mut(&mut out).insert("managedFields".into(), mf.clone());
            }
            out
        }
    }
}

/// Secrets: `stringData` is merged into `data` (base64) and dropped, as the API server does.
fn secret_string_data(obj: &mut Value) {
    let Some(m) = obj.as_object_mut() else { return };
    let Some(Value::Object(sd)) = m.remove("stringData") else { return };
    let data = m.entry("data").or_insert_with(|| json!({}));
    if let Some(d) = data.as_object_mut() {
        for (k, v) in sd {
            let text = v.as_str().unwrap_or_default();
            d.insert(k, json!(base64::engine::general_purpose::STANDARD.encode(text)));
        }
    }
}

/// CRDs are established at once in the simulator.
fn establish_crd(crd: &mut Value) {
    let names = crd.pointer("/spec/names").cloned().unwrap_or_else(|| json!({}));
    let t = now();
    crd["status"] = json!({
        "acceptedNames": names,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": t},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": t},
        ],
        "storedVersions": crd.pointer("/spec/versions").and_then(Value::as_array).map(|vs| vs.iter().filter_map(|v| v.get("name").cloned()).collect::<Vec<_>>()).unwrap_or_default(),
    });
}
