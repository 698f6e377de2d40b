//! HTTP front end: discovery, OpenAPI, and the REST verbs of every served type.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::fields::Scope;
use super::openapi;
use super::registry::ResourceType;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{ApiError, FieldValidation, PatchKind, Store, WatchEvent, WriteOpts};
use super::table;

/// Shared state of one simulated cluster's server.
pub struct Sim {
    pub store: Store,
    pub bookmark_interval: Duration,
    pub server_address: String,
    pub tokens: super::auth::Tokens,
}

type Query = HashMap<String, String>;

fn json_response(code: u16, body: &Value, warnings: &[String]) -> Response {
    let mut resp = (StatusCode::from_u16(code).unwrap_or(StatusCode::OK), body.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"{}\"", w.replace('"', "\\\""))) {
            h.append(header::WARNING, v);
        }
    }
    resp
}

fn error(e: &ApiError) -> Response {
    json_response(e.code, &e.status(), &[])
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("as=Table"))
}

/// The client asked for metadata only (`as=PartialObjectMetadata` or `…List`): what `kubectl get -o name` and
/// kube's `get_metadata`/`list_metadata` ask for, and all a real apiserver then sends (no spec, data or status).
fn wants_metadata(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("as=PartialObjectMetadata"))
}

/// An object as PartialObjectMetadata: its kind and metadata only.
fn metadata_only(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({}))})
}

fn user_manager(headers: &HeaderMap) -> String {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    if content_type(headers).starts_with(super::protobuf::CONTENT_TYPE) {
        return super::protobuf::decode(body).map_err(ApiError::bad_request);
    }
    match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(json_err) => {
            let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("body is not UTF-8"))?;
            if ct.contains("yaml") {
                serde_saphyr::from_str::<Value>(text)
                    .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
            } else {
                Err(ApiError::bad_request(format!("error decoding JSON: {json_err}")))
            }
        }
    }
}

fn content_type(headers: &HeaderMap) -> &str {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// The object in a create or update: JSON, YAML, or protobuf for built-in types (as the API server, which has
/// no protobuf schema for custom resources and answers 415 for them).
fn parse_object(rt: &ResourceType, headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    if rt.custom && content_type(headers).starts_with(super::protobuf::CONTENT_TYPE) {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml",
        ));
    }
    parse_body(headers, body)
}

/// Entry point for every request.
pub async fn handle(
    State(sim): State<Arc<Sim>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: Query = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect();
    let path = uri.path().trim_matches('/');
    let segs: Vec<&str> = if path.is_empty() { vec![] } else { path.split('/').collect() };
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let user = match super::auth::authenticate(&sim.tokens, auth) {
        Ok(u) => u,
        Err(e) => return error(&e),
    };
    match route(&sim, &user, &method, &segs, &query, &headers, &body) {
        Ok(Routed::Response(r)) => r,
        Ok(Routed::Watch(rt, ns)) => watch(sim.clone(), rt, ns, &query, &headers).unwrap_or_else(|e| error(&e)),
        Err(e) => error(&e),
    }
}

enum Routed {
    Response(Response),
    Watch(Arc<ResourceType>, Option<String>),
}

fn ok(v: &Value) -> Result<Routed, ApiError> {
    Ok(Routed::Response(json_response(200, v, &[])))
}

#[allow(clippy::too_many_arguments)]
fn route(
    sim: &Sim,
    user: &super::auth::User,
    method: &Method,
    segs: &[&str],
    q: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Routed, ApiError> {
    let store = &sim.store;
    let not_found = || ApiError::new(404, "NotFound", "the server could not find the requested resource");
    match segs {
        ["version"] => ok(&json!({
            "major": "1", "minor": "32", "gitVersion": "v1.32.0-nio-kubesim", "gitCommit": "", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64",
        })),
        ["healthz"] | ["livez"] | ["readyz"] => Ok(Routed::Response((StatusCode::OK, "ok").into_response())),
        ["api"] => ok(
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": sim.server_address}]}),
        ),
        ["apis"] => ok(&group_list(store)),
        ["apis", group] => group_list(store)["groups"]
            .as_array()
            .and_then(|gs| gs.iter().find(|g| g["name"] == *group))
            .map(|g| {
                let mut g = g.clone();
                g["kind"] = json!("APIGroup");
                g["apiVersion"] = json!("v1");
                g
            })
            .ok_or_else(not_found)
            .and_then(|g| ok(&g)),
        ["api", "v1"] => ok(&resource_list(store, "", "v1")),
        ["apis", group, version] => {
            if store.types().iter().any(|t| t.group == *group && t.version == *version) {
                ok(&resource_list(store, group, version))
            } else {
                Err(not_found())
            }
        }
        ["openapi", "v2"] => {
            let types = store.types();
            let all: Vec<&ResourceType> = types.iter().map(|t| &**t).collect();
            let v3 = openapi::group_version_doc(&all);
            let doc =
                super::openapi_v2::document(v3["components"]["schemas"].as_object().unwrap_or(&Default::default()));
            let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
            if !super::openapi_v2::PROTOBUF_ACCEPTED.iter().any(|t| accept.contains(t)) {
                return ok(&doc);
            }
            let mut resp = Response::new(Body::from(super::openapi_v2::encode(&doc)));
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(super::openapi_v2::PROTOBUF));
            Ok(Routed::Response(resp))
        }
        ["openapi", "v3"] => ok(&openapi_index(store)),
        ["openapi", "v3", rest @ ..] => {
            let (group, version) = match rest {
                ["api", v] => ("", *v),
                ["apis", g, v] => (*g, *v),
                _ => return Err(not_found()),
            };
            let types = store.types();
            let gv: Vec<&ResourceType> =
                types.iter().filter(|t| t.group == group && t.version == version).map(|t| &**t).collect();
            if gv.is_empty() {
                return Err(not_found());
            }
            ok(&openapi::group_version_doc(&gv))
        }
        ["api", "v1", rest @ ..] => resource(sim, user, "", "v1", rest, method, q, headers, body),
        ["apis", group, version, rest @ ..] => resource(sim, user, group, version, rest, method, q, headers, body),
        _ => Err(not_found()),
    }
}

fn group_list(store: &Store) -> Value {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in store.types().iter().filter(|t| !t.group.is_empty()) {
        let vs = groups.entry(t.group.clone()).or_default();
        if !vs.contains(&t.version) {
            vs.push(t.version.clone());
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> =
                vs.iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(store: &Store, group: &str, version: &str) -> Value {
    let resources: Vec<Value> =
        store.types().iter().filter(|t| t.group == group && t.version == version).flat_map(|t| t.discovery()).collect();
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn openapi_index(store: &Store) -> Value {
    let types = store.types();
    let mut gvs: BTreeMap<String, Vec<&ResourceType>> = BTreeMap::new();
    for t in types.iter() {
        gvs.entry(openapi::gv_path(&t.group, &t.version)).or_default().push(t);
    }
    let paths: serde_json::Map<String, Value> = gvs
        .into_iter()
        .map(|(p, ts)| {
            let h = openapi::hash(&openapi::group_version_doc(&ts));
            (p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={h}")}))
        })
        .collect();
    json!({"paths": paths})
}

fn write_opts(q: &Query, headers: &HeaderMap) -> Result<WriteOpts, ApiError> {
    let validation = match q.get("fieldValidation").map(String::as_str) {
        None | Some("") | Some("Warn") => FieldValidation::Warn,
        Some("Ignore") => FieldValidation::Ignore,
        Some("Strict") => FieldValidation::Strict,
        Some(other) => {
            return Err(ApiError::bad_request(format!("fieldValidation must be Ignore, Warn or Strict, not {other}")));
        }
    };
    Ok(WriteOpts {
        dry_run: q.get("dryRun").is_some_and(|d| d == "All"),
        manager: q.get("fieldManager").cloned().unwrap_or_else(|| user_manager(headers)),
        validation,
    })
}

#[allow(clippy::too_many_arguments)]
fn resource(
    sim: &Sim,
    user: &super::auth::User,
    group: &str,
    version: &str,
    rest: &[&str],
    method: &Method,
    q: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Routed, ApiError> {
    let store = &sim.store;
    let not_found = || ApiError::new(404, "NotFound", "the server could not find the requested resource");
    let (legacy_watch, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let (ns, rest): (Option<&str>, &[&str]) = match rest {
        ["namespaces", ns, plural, ..] if store.resolve(group, version, plural).is_some_and(|t| t.namespaced) => {
            (Some(*ns), &rest[2..])
        }
        r => (None, r),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(*n), None),
        [p, n, s] => (*p, Some(*n), Some(*s)),
        _ => return Err(not_found()),
    };
    let rt = store.resolve(group, version, plural).ok_or_else(not_found)?;
    let scope = match sub {
        None => Scope::Main,
        Some("status") if rt.status_subresource => Scope::Status,
        Some(_) => return Err(not_found()),
    };
    if rt.namespaced && name.is_some() && ns.is_none() {
        return Err(not_found());
    }
    let watching = legacy_watch || q.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (method.clone(), name) {
        (Method::GET, None) if watching => "watch",
        (Method::GET, None) => "list",
        (Method::GET, Some(_)) => "get",
        (Method::POST, _) => "create",
        (Method::PUT, _) => "update",
        (Method::PATCH, _) => "patch",
        (Method::DELETE, None) => "deletecollection",
        (Method::DELETE, Some(_)) => "delete",
        _ => "",
    };
    let request = super::auth::Request {
        verb,
        group,
        resource: sub.map_or_else(|| plural.to_string(), |s| format!("{plural}/{s}")),
        namespace: ns,
        name,
    };
    super::auth::authorize(store, user, &request)?;
    let table = wants_table(headers);
    let metadata = !table && wants_metadata(headers);
    let include = q.get("includeObject").map(String::as_str).unwrap_or("Metadata");
    let respond = |code: u16, obj: &Value, warnings: &[String]| -> Result<Routed, ApiError> {
        let out = if table {
            table::table(&rt, &[obj], None, include)
        } else if metadata {
            metadata_only(obj)
        } else {
            obj.clone()
        };
        Ok(Routed::Response(json_response(code, &out, warnings)))
    };
    match (method.clone(), name) {
        (Method::GET, None) => {
            if legacy_watch || q.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return Ok(Routed::Watch(rt.clone(), ns.map(str::to_string)));
            }
            let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
                .map_err(ApiError::bad_request)?;
            let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
                .map_err(ApiError::bad_request)?;
            let (mut items, mut rv) = store.list(&rt, ns, |o| labels.matches(o) && fields.matches(o));
            let mut page = Page::default();
            if let Some(token) = q.get("continue").filter(|t| !t.is_empty()) {
                let (snapshot, after) = Page::decode(token)?;
                rv = snapshot;
                items.retain(|o| object_key(o) > after);
            }
            if let Some(limit) = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0)
                && items.len() > limit
            {
                page.remaining = items.len() - limit;
                items.truncate(limit);
                page.next = items.last().map(|o| Page::encode(rv, &object_key(o)));
            }
            if table {
                let refs: Vec<&Value> = items.iter().map(|a| &**a).collect();
                return ok(&table::table(&rt, &refs, Some(rv.to_string()), include));
            }
            if metadata {
                let items: Vec<Value> = items.iter().map(|o| metadata_only(o)).collect();
                let mut meta = json!({"resourceVersion": rv.to_string()});
                if let Some(token) = &page.next {
                    meta["continue"] = json!(token);
                    meta["remainingItemCount"] = json!(page.remaining);
                }
                return ok(
                    &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "items": items}),
                );
            }
            Ok(Routed::Response(list_response(&rt, &items, rv, &page)))
        }
        (Method::GET, Some(n)) => respond(200, &*store.get(&rt, ns, n)?, &[]),
        (Method::POST, None) => {
            let opts = write_opts(q, headers)?;
            let (obj, warnings) = store.create(&rt, ns, parse_object(&rt, headers, body)?, &opts)?;
            respond(201, &obj, &warnings)
        }
        (Method::PUT, Some(n)) => {
            let opts = write_opts(q, headers)?;
            let (obj, warnings) = store.update(&rt, ns, n, parse_object(&rt, headers, body)?, scope, &opts)?;
            respond(200, &obj, &warnings)
        }
        (Method::PATCH, Some(n)) => {
            let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            let force = q.get("force").is_some_and(|f| f == "true");
            let kind = if ct.starts_with("application/apply-patch") {
                if !q.contains_key("fieldManager") {
                    return Err(ApiError::bad_request("PATCH with apply-patch requires fieldManager"));
                }
                PatchKind::Apply { force }
            } else if ct.starts_with("application/json-patch+json") {
                PatchKind::Json
            } else if ct.starts_with("application/merge-patch+json") {
                PatchKind::Merge
            } else if ct.starts_with("application/strategic-merge-patch+json") {
                if rt.custom {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    ));
                }
                PatchKind::Strategic
            } else {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the body of the request was in an unknown format: {ct}"),
                ));
            };
            let opts = write_opts(q, headers)?;
            let (obj, warnings) = store.patch(&rt, ns, n, kind, &parse_body(headers, body)?, scope, &opts)?;
            respond(200, &obj, &warnings)
        }
        (Method::DELETE, Some(n)) => {
            let opts = parse_body(headers, body)?;
            let rv = opts.pointer("/preconditions/resourceVersion").and_then(Value::as_str);
            let uid = opts.pointer("/preconditions/uid").and_then(Value::as_str);
            let dry = q.get("dryRun").is_some_and(|d| d == "All")
                || opts.get("dryRun").and_then(Value::as_array).is_some_and(|a| a.iter().any(|d| d == "All"));
            respond(200, &*store.delete(&rt, ns, n, rv, uid, dry)?, &[])
        }
        (Method::DELETE, None) => {
            let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
                .map_err(ApiError::bad_request)?;
            let (items, _) = store.list(&rt, ns, |o| labels.matches(o));
            let mut deleted = Vec::new();
            for o in items {
                let n = o.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
                let ons = o.pointer("/metadata/namespace").and_then(Value::as_str);
                if let Ok(d) = store.delete(&rt, ons, n, None, None, q.get("dryRun").is_some_and(|d| d == "All")) {
                    deleted.push(d);
                }
            }
            Ok(Routed::Response(list_response(&rt, &deleted, store.resource_version(), &Page::default())))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource: {method}"),
        )),
    }
}

/// Where a paged LIST (`limit`) stops: the `continue` token and how many items are left.
#[derive(Default)]
struct Page {
    next: Option<String>,
    remaining: usize,
}

impl Page {
    /// The token names the list's resourceVersion and the last (namespace, name) returned. Unlike etcd, later
    /// pages read current data, not a snapshot at that version.
    fn encode(rv: u64, after: &(String, String)) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(json!({"rv": rv, "ns": after.0, "name": after.1}).to_string())
    }

    fn decode(token: &str) -> Result<(u64, (String, String)), ApiError> {
        use base64::Engine as _;
        let bad = || ApiError::bad_request("continue key is not valid: incorrect encoded start resourceVersion");
        let bytes = base64::engine::general_purpose::STANDARD.decode(token).map_err(|_| bad())?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string).ok_or_else(bad);
        Ok((v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?, (text("ns")?, text("name")?)))
    }
}

/// The order the store keeps (and lists) objects in.
fn object_key(o: &Value) -> (String, String) {
    let meta = |k: &str| o.pointer(&format!("/metadata/{k}")).and_then(Value::as_str).unwrap_or("").to_string();
    (meta("namespace"), meta("name"))
}

/// A `{Kind}List`, serialised item by item without cloning the stored objects.
fn list_response(rt: &ResourceType, items: &[Arc<Value>], rv: u64, page: &Page) -> Response {
    let mut buf = Vec::with_capacity(items.len() * 512 + 128);
    let paging = match &page.next {
        Some(token) => format!(",\"continue\":\"{token}\",\"remainingItemCount\":{}", page.remaining),
        None => String::new(),
    };
    buf.extend_from_slice(
        format!(
            "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{rv}\"{paging}}},\"items\":[",
            rt.kind,
            rt.api_version()
        )
        .as_bytes(),
    );
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        let _ = serde_json::to_writer(&mut buf, &**item);
    }
    buf.extend_from_slice(b"]}");
    let mut resp = (StatusCode::OK, buf).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn watch(
    sim: Arc<Sim>,
    rt: Arc<ResourceType>,
    ns: Option<String>,
    q: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let labels =
        LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str)).map_err(ApiError::bad_request)?;
    let fields =
        FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str)).map_err(ApiError::bad_request)?;
    let from = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") => None,
        Some(s) => Some(s.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {s:?}")))?),
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).unwrap_or(1800);
    let table = wants_table(headers);
    let include = q.get("includeObject").cloned().unwrap_or_else(|| "Metadata".into());
    let (initial, mut rx, start_rv) = match sim.store.watch(&rt, from) {
        Ok(w) => w,
        // As the API server does: a watch from an expired version is accepted, then ends with an ERROR event.
        Err(e) if e.code == 410 => {
            let mut resp = Response::new(Body::from(WatchEvent::line_of("ERROR", &e.status())));
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return Ok(resp);
        }
        Err(e) => return Err(e),
    };
    let (tx, out_rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    let key = rt.key();
    let scoped = move |ev: &WatchEvent| -> bool { ev.key == key && ns.as_deref().is_none_or(|n| ev.namespace() == n) };
    let selected = move |o: &Value| -> bool { labels.matches(o) && fields.matches(o) };
    let render = {
        let rt = rt.clone();
        move |ev: &WatchEvent| -> Option<Bytes> {
            if !scoped(ev) {
                return None;
            }
            if table {
                let kind = ev.kind_through(&selected)?;
                let t = table::table(&rt, &[&ev.object], None, &include);
                Some(WatchEvent::line_of(kind, &t))
            } else {
                ev.seen_through(&selected)
            }
        }
    };
    let interval = sim.bookmark_interval;
    tokio::spawn(async move {
        let mut last_rv = start_rv;
        for line in initial.iter().filter_map(|e| render(e)) {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= start_rv { continue; }
                        last_rv = last_rv.max(ev.rv);
                        if let Some(line) = render(&ev) && tx.send(Ok(line)).await.is_err() { return; }
                    }
                    // A watcher that falls behind is closed; the client resumes from its last resourceVersion.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let b = json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": {"resourceVersion": last_rv.to_string()}});
                    if tx.send(Ok(WatchEvent::line_of("BOOKMARK", &b))).await.is_err() { return; }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(ReceiverStream::new(out_rx)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}
