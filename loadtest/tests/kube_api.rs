#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! kube-rs against the Kubernetes API simulator and a real kube-apiserver, from the same test bodies: what a
//! controller relies on behaves the same on both (a divergence is a kubesim bug).

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use nio_loadtest::kubesim::{KubeSim, Options};
use nio_loadtest::on_both;
use nio_loadtest::testkube::{Backend, TestCluster};
use nio_shared::crd::{Machine, MachinePhase, MachineSpec, MachineStatus, NixosConfiguration};
use serde_json::json;

async fn cluster() -> (KubeSim, kube::Client) {
    let sim = KubeSim::start(Options::default()).await.unwrap();
    let client = sim.client().unwrap();
    (sim, client)
}

/// A cluster of `backend` and an API of `K` in the test's own namespace.
async fn on<K>(backend: Backend) -> (TestCluster, Api<K>)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    let c = TestCluster::start(backend).await.unwrap();
    let api = c.api::<K>();
    (c, api)
}

on_both!(
    crud_defaults_generation_and_optimistic_concurrency,
    invalid_objects_get_422_naming_the_field,
    namespaces_must_exist_and_dry_run_stores_nothing,
    merge_json_and_server_side_apply_patches,
    status_subresource_is_separate_from_the_spec,
    finalizer_helper_runs_apply_then_cleanup,
    watch_resumes_from_a_version,
    watch_lines_name_the_event_type_before_the_object,
    label_filtered_watches_see_only_matching_objects,
    secrets_string_data_becomes_data,
    metadata_only_reads_carry_no_data,
    generate_name_leases_and_both_event_apis,
    integers_and_strings_a_user_sets_are_bounded_by_the_schema,
    lists_page_with_limit_and_continue,
    rbac_grants_exactly_what_a_role_says,
    unknown_bearer_tokens_are_unauthorized,
    writes_that_change_nothing_store_nothing,
    cel_rules_refuse_selectors_that_would_pick_the_wrong_fleet,
    server_side_apply_merges_map_lists_by_key,
    patches_cannot_change_kind_api_version_or_uid,
    crds_whose_rules_cost_too_much_are_refused,
);

fn machine(name: &str) -> Machine {
    let spec: MachineSpec =
        serde_json::from_value(json!({"hostname": format!("{name}.example.org"), "site": "dc1"})).unwrap();
    Machine::new(name, spec)
}

fn api_error(e: kube::Error) -> (u16, String, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn crud_defaults_generation_and_optimistic_concurrency(backend: Backend) {
    let (_c, api) = on::<Machine>(backend).await;
    let created = api.create(&PostParams::default(), &machine("m1")).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    // schema defaults applied by the server
    assert_eq!((created.spec.port, created.spec.ssh_user.as_str()), (22, "root"));

    let err = api.create(&PostParams::default(), &machine("m1")).await.unwrap_err();
    assert_eq!(api_error(err).1, "AlreadyExists");

    let mut stale = created.clone();
    let mut fresh = created.clone();
    fresh.spec.port = 2222;
    let updated = api.replace("m1", &PostParams::default(), &fresh).await.unwrap();
    assert_eq!(updated.metadata.generation, Some(2), "spec change bumps generation");
    stale.spec.port = 2200;
    let (code, reason, _) = api_error(api.replace("m1", &PostParams::default(), &stale).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));

    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert!(list.metadata.resource_version.is_some());
    api.delete("m1", &DeleteParams::default()).await.unwrap();
    assert_eq!(api_error(api.get("m1").await.unwrap_err()).0, 404);
}

async fn invalid_objects_get_422_naming_the_field(backend: Backend) {
    let (c, api) = on::<Machine>(backend).await;
    let mut m = machine("bad");
    m.spec.site = "Not A Label".into();
    let (code, reason, message) = api_error(api.create(&PostParams::default(), &m).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert!(message.contains("spec.site"), "{message}");
    // a missing required field
    let dynamic: Api<kube::api::DynamicObject> =
        Api::namespaced_with(c.client.clone(), &c.namespace, &kube::api::ApiResource::erase::<Machine>(&()));
    let obj: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "nixos.infra/v1alpha1", "kind": "Machine", "metadata": {"name": "nohost"}, "spec": {"port": 22}
    }))
    .unwrap();
    let (code, _, message) = api_error(dynamic.create(&PostParams::default(), &obj).await.unwrap_err());
    assert_eq!(code, 422);
    assert!(message.contains("spec.hostname: Required value"), "{message}");
    // nothing was stored
    assert!(api.list(&ListParams::default()).await.unwrap().items.is_empty());
}

async fn namespaces_must_exist_and_dry_run_stores_nothing(backend: Backend) {
    let (c, api) = on::<Machine>(backend).await;
    let nowhere: Api<Machine> = Api::namespaced(c.client.clone(), "nowhere");
    assert_eq!(api_error(nowhere.create(&PostParams::default(), &machine("m")).await.unwrap_err()).0, 404);
    let pp = PostParams { dry_run: true, ..Default::default() };
    let dry = api.create(&pp, &machine("dry")).await.unwrap();
    assert_eq!(dry.spec.port, 22);
    assert_eq!(api_error(api.get("dry").await.unwrap_err()).0, 404);
    let nss: Api<Namespace> = Api::all(c.client.clone());
    let names: Vec<_> =
        nss.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|n| n.metadata.name).collect();
    assert!(names.contains(&"default".to_string()) && names.contains(&c.namespace), "{names:?}");
}

async fn merge_json_and_server_side_apply_patches(backend: Backend) {
    let (_c, api) = on::<Machine>(backend).await;
    api.create(&PostParams::default(), &machine("m1")).await.unwrap();
    let m = api
        .patch("m1", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"role": "web"}}})))
        .await
        .unwrap();
    assert_eq!(m.metadata.labels.unwrap()["role"], "web");
    assert_eq!(m.metadata.generation, Some(1), "metadata changes do not bump generation");
    let p: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/spec/port", "value": 2022}])).unwrap();
    let m = api.patch("m1", &PatchParams::default(), &Patch::<()>::Json(p)).await.unwrap();
    assert_eq!(m.spec.port, 2022);

    // server-side apply creates missing objects; alice then owns spec.site and bob changing it conflicts
    let alice = PatchParams::apply("alice");
    let m = api
        .patch("m3", &alice, &Patch::Apply(json!({"apiVersion": "nixos.infra/v1alpha1", "kind": "Machine", "metadata": {"name": "m3"}, "spec": {"hostname": "m3.example.org", "site": "dc2"}})))
        .await
        .unwrap();
    assert_eq!(m.metadata.generation, Some(1));
    // creating by apply needs the name in the body, not only in the URL
    let (code, _, message) = api_error(
        api.patch("m4", &alice, &Patch::Apply(json!({"apiVersion": "nixos.infra/v1alpha1", "kind": "Machine", "spec": {"hostname": "m4.example.org"}})))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 400, "{message}");
    assert!(message.contains("name must be provided"), "{message}");
    assert_eq!(m.spec.site, "dc2");
    let managers: Vec<_> = m.metadata.managed_fields.unwrap().into_iter().filter_map(|f| f.manager).collect();
    assert!(managers.contains(&"alice".to_string()), "{managers:?}");
    let bob = json!({"apiVersion": "nixos.infra/v1alpha1", "kind": "Machine", "spec": {"hostname": "m3.example.org", "site": "dc3"}});
    let (code, reason, message) =
        api_error(api.patch("m3", &PatchParams::apply("bob"), &Patch::Apply(bob.clone())).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(message.contains("alice") && message.contains(".spec.site"), "{message}");
    let m = api.patch("m3", &PatchParams::apply("bob").force(), &Patch::Apply(bob)).await.unwrap();
    assert_eq!(m.spec.site, "dc3");
    assert_eq!(m.metadata.generation, Some(2));

    // alice stops applying spec.site... but bob owns it now, so it stays; a field only alice owned goes away
    let m = api
        .patch("m3", &alice, &Patch::Apply(json!({"apiVersion": "nixos.infra/v1alpha1", "kind": "Machine", "spec": {"hostname": "m3.example.org", "credentialRef": "k"}})))
        .await
        .unwrap();
    assert_eq!((m.spec.site.as_str(), m.spec.credential_ref.as_deref()), ("dc3", Some("k")));
    let m = api
        .patch("m3", &alice, &Patch::Apply(json!({"apiVersion": "nixos.infra/v1alpha1", "kind": "Machine", "spec": {"hostname": "m3.example.org"}})))
        .await
        .unwrap();
    assert_eq!(m.spec.credential_ref, None, "a field its only manager stopped applying is removed");
}

/// Found by fuzzing kubesim's patch handling: a merge or JSON patch that changes `apiVersion`, `kind` or
/// `metadata.uid` is refused with 422 naming the field, and the object stays as it was.
async fn patches_cannot_change_kind_api_version_or_uid(backend: Backend) {
    let (_c, api) = on::<Machine>(backend).await;
    let before = api.create(&PostParams::default(), &machine("m1")).await.unwrap();
    let moved: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/apiVersion", "value": "nixos.infra/v2"}])).unwrap();
    let attempts = [
        ("apiVersion", Patch::Merge(json!({"apiVersion": "nix:os.infra/v1alpha1"}))),
        ("kind", Patch::Merge(json!({"kind": "Other"}))),
        ("apiVersion", Patch::Json(moved)),
        ("metadata.uid", Patch::Merge(json!({"metadata": {"uid": "x"}}))),
    ];
    for (field, patch) in attempts {
        let (code, reason, message) = api_error(api.patch("m1", &PatchParams::default(), &patch).await.unwrap_err());
        assert_eq!((code, reason.as_str()), (422, "Invalid"), "{message}");
        assert!(message.contains(&format!("{field}: Invalid value")), "{message}");
    }
    let after = api.get("m1").await.unwrap();
    assert_eq!(after.metadata.resource_version, before.metadata.resource_version, "nothing was written");
}

async fn status_subresource_is_separate_from_the_spec(backend: Backend) {
    let (_c, api) = on::<Machine>(backend).await;
    let mut m = machine("m1");
    m.status = Some(MachineStatus { phase: Some(MachinePhase::Applied), ..Default::default() });
    let created = api.create(&PostParams::default(), &m).await.unwrap();
    let unobserved = MachineStatus { observed_generation: Some(0), ..Default::default() };
    assert_eq!(created.status, Some(unobserved), "status is dropped on create; the CRD's default takes its place");

    let st = api
        .patch_status(
            "m1",
            &PatchParams::apply("nio-controller").force(),
            &Patch::Apply(json!({
                "apiVersion": "nixos.infra/v1alpha1", "kind": "Machine",
                "status": {"phase": "Queued", "appliedCommit": "abc"}, "spec": {"port": 9}
            })),
        )
        .await
        .unwrap();
    assert_eq!(st.status.as_ref().unwrap().phase, Some(MachinePhase::Queued));
    assert_eq!(st.spec.port, 22, "status writes ignore the spec");
    assert_eq!(st.metadata.generation, Some(1), "status changes do not bump generation");

    let main = api
        .patch(
            "m1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"port": 23}, "status": {"phase": "Failed"}})),
        )
        .await
        .unwrap();
    assert_eq!(main.spec.port, 23);
    assert_eq!(main.status.unwrap().phase, Some(MachinePhase::Queued), "main writes ignore the status");
    let merged = api
        .patch_status("m1", &PatchParams::default(), &Patch::Merge(json!({"status": {"discoverable": true}})))
        .await
        .unwrap();
    let s = merged.status.unwrap();
    assert_eq!((s.discoverable, s.applied_commit.as_deref()), (Some(true), Some("abc")));
}

async fn finalizer_helper_runs_apply_then_cleanup(backend: Backend) {
    let (_c, api) = on::<NixosConfiguration>(backend).await;
    let c: NixosConfiguration = serde_json::from_value(json!({
        "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration", "metadata": {"name": "c1"},
        "spec": {"gitRepo": "https://example.org/r.git", "ref": "main", "flake": "#web", "machineRef": "m1"}
    }))
    .unwrap();
    api.create(&PostParams::default(), &c).await.unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<&'static str>::new()));
    let run = |obj: NixosConfiguration| {
        let seen = seen.clone();
        let api = api.clone();
        async move {
            finalizer(&api, "nixos.infra/finalizer", std::sync::Arc::new(obj), |ev| async move {
                seen.lock().unwrap().push(match ev {
                    Finalizer::Apply(_) => "apply",
                    Finalizer::Cleanup(_) => "cleanup",
                });
                Ok::<_, std::convert::Infallible>(Action::await_change())
            })
            .await
        }
    };
    run(api.get("c1").await.unwrap()).await.unwrap(); // adds the finalizer
    let with = api.get("c1").await.unwrap();
    assert_eq!(with.metadata.finalizers.as_deref(), Some(&["nixos.infra/finalizer".to_string()][..]));
    run(with).await.unwrap(); // apply
    api.delete("c1", &DeleteParams::default()).await.unwrap();
    let terminating = api.get("c1").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some(), "finalizer keeps the object");
    assert_eq!(terminating.metadata.generation, Some(2), "deletion start bumps generation");
    run(terminating).await.unwrap(); // cleanup removes the finalizer
    assert_eq!(api_error(api.get("c1").await.unwrap_err()).0, 404, "object gone once the finalizer is removed");
    assert_eq!(*seen.lock().unwrap(), ["apply", "cleanup"]);
}

async fn watch_resumes_from_a_version(backend: Backend) {
    let (_c, api) = on::<Machine>(backend).await;
    let first = api.create(&PostParams::default(), &machine("w0")).await.unwrap();
    let rv0 = first.metadata.resource_version.clone().unwrap();
    api.create(&PostParams::default(), &machine("w1")).await.unwrap();
    // resume right after w0: only w1 is replayed
    let mut stream = api.watch(&WatchParams::default().timeout(5), &rv0).await.unwrap().boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Added(m)) => assert_eq!(m.metadata.name.as_deref(), Some("w1")),
        other => panic!("expected w1 added, got {other:?}"),
    }
}

/// The apiserver writes each watch event `type` first (Go encodes the struct's fields in order); a client can
/// then decode the object as it reads it. kubesim wrote `object` first (its JSON maps sort their keys), which
/// made every client buffer every event.
async fn watch_lines_name_the_event_type_before_the_object(backend: Backend) {
    let (c, api) = on::<Machine>(backend).await;
    let first = api.create(&PostParams::default(), &machine("t0")).await.unwrap();
    let rv0 = first.metadata.resource_version.clone().unwrap();
    api.create(&PostParams::default(), &machine("t1")).await.unwrap();
    api.delete("t1", &DeleteParams::default()).await.unwrap();
    let path = format!(
        "/apis/nixos.infra/v1alpha1/namespaces/{}/machines?watch=true&resourceVersion={rv0}&timeoutSeconds=2&allowWatchBookmarks=true",
        c.namespace
    );
    let text = c.client.request_text(http::Request::get(path).body(Vec::new()).unwrap()).await.unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 2, "{text}");
    for line in &lines {
        assert!(line.starts_with("{\"type\":\""), "{line}");
        let ty: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(["ADDED", "MODIFIED", "DELETED", "BOOKMARK"].contains(&ty["type"].as_str().unwrap()), "{line}");
    }
    assert!(lines.iter().any(|l| l.starts_with("{\"type\":\"DELETED\"")), "{text}");
}

/// kubesim only: forcing a real etcd to compact is not what this test is about.
#[tokio::test]
async fn watches_from_versions_older_than_the_history_are_gone() {
    let sim = KubeSim::start(Options { history: 5, ..Default::default() }).await.unwrap();
    let api: Api<Machine> = Api::namespaced(sim.client().unwrap(), "default");
    let first = api.create(&PostParams::default(), &machine("w0")).await.unwrap();
    let rv0 = first.metadata.resource_version.clone().unwrap();
    for i in 1..12 {
        api.create(&PostParams::default(), &machine(&format!("w{i}"))).await.unwrap();
    }
    let mut stale = api.watch(&WatchParams::default().timeout(5), &rv0).await.unwrap().boxed();
    match stale.try_next().await {
        Ok(Some(WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

async fn label_filtered_watches_see_only_matching_objects(backend: Backend) {
    let (_c, api) = on::<Machine>(backend).await;
    let wp = WatchParams::default().labels("role=web").timeout(10);
    let mut stream = api.watch(&wp, "0").await.unwrap().boxed();
    let mut m = machine("db");
    api.create(&PostParams::default(), &m).await.unwrap();
    m = machine("web");
    m.metadata.labels = Some([("role".to_string(), "web".to_string())].into());
    api.create(&PostParams::default(), &m).await.unwrap();
    let mut next = async || loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await.unwrap().unwrap() {
            Some(WatchEvent::Bookmark(_)) => continue,
            Some(WatchEvent::Added(m)) => break ("ADDED", m.metadata.name.unwrap()),
            Some(WatchEvent::Modified(m)) => break ("MODIFIED", m.metadata.name.unwrap()),
            Some(WatchEvent::Deleted(m)) => break ("DELETED", m.metadata.name.unwrap()),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(next().await, ("ADDED", "web".into()));
    // a change that moves an object out of the selection is a DELETED for this watch, into it an ADDED
    let relabel = |role: &str| Patch::Merge(json!({"metadata": {"labels": {"role": role}}}));
    api.patch("web", &PatchParams::default(), &relabel("db")).await.unwrap();
    assert_eq!(next().await, ("DELETED", "web".into()));
    api.patch("db", &PatchParams::default(), &relabel("web")).await.unwrap();
    assert_eq!(next().await, ("ADDED", "db".into()));
    api.patch("db", &PatchParams::default(), &Patch::Merge(json!({"spec": {"port": 2222}}))).await.unwrap();
    assert_eq!(next().await, ("MODIFIED", "db".into()));
}

/// kubesim only: the real server sends bookmarks about once a minute.
#[tokio::test]
async fn watches_send_bookmarks_and_label_filtered_events() {
    let sim =
        KubeSim::start(Options { bookmark_interval: Duration::from_millis(200), ..Default::default() }).await.unwrap();
    let api: Api<Machine> = Api::namespaced(sim.client().unwrap(), "default");
    let wp = WatchParams { bookmarks: true, ..WatchParams::default().labels("role=web").timeout(10) };
    let mut stream = api.watch(&wp, "0").await.unwrap().boxed();
    let mut m = machine("db");
    api.create(&PostParams::default(), &m).await.unwrap();
    m = machine("web");
    m.metadata.labels = Some([("role".to_string(), "web".to_string())].into());
    api.create(&PostParams::default(), &m).await.unwrap();
    let (mut added, mut bookmark) = (vec![], false);
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(3), stream.try_next()).await.unwrap() {
        match ev {
            WatchEvent::Added(m) => added.push(m.metadata.name.unwrap()),
            WatchEvent::Bookmark(_) => bookmark = true,
            _ => {}
        }
        if bookmark && !added.is_empty() {
            break;
        }
    }
    assert_eq!(added, ["web"]);
    assert!(bookmark);
}

async fn secrets_string_data_becomes_data(backend: Backend) {
    let (_c, api) = on::<Secret>(backend).await;
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": "s"}, "stringData": {"token": "abc"}})).unwrap();
    let created = api.create(&PostParams::default(), &s).await.unwrap();
    assert_eq!(created.data.unwrap()["token"].0, b"abc");
    assert!(created.string_data.is_none());
}

/// A metadata-only read (`as=PartialObjectMetadata`, kube's `get_metadata`/`list_metadata`) sends the object's
/// metadata and nothing of its data: how the controller learns whether a Secret opted in without reading it.
async fn metadata_only_reads_carry_no_data(backend: Backend) {
    let (c, api) = on::<Secret>(backend).await;
    let s: Secret = serde_json::from_value(
        json!({"metadata": {"name": "s", "labels": {"team": "db"}}, "stringData": {"password": "hunter2"}}),
    )
    .unwrap();
    api.create(&PostParams::default(), &s).await.unwrap();
    let read = |path: String, accept: &'static str| {
        let client = c.client.clone();
        async move {
            let req = http::Request::get(path).header(http::header::ACCEPT, accept).body(Vec::new()).unwrap();
            serde_json::from_str::<serde_json::Value>(&client.request_text(req).await.unwrap()).unwrap()
        }
    };
    let base = format!("/api/v1/namespaces/{}/secrets", c.namespace);
    let one = read(format!("{base}/s"), "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1").await;
    assert_eq!(
        (one["kind"].as_str(), one["apiVersion"].as_str()),
        (Some("PartialObjectMetadata"), Some("meta.k8s.io/v1"))
    );
    assert_eq!(one["metadata"]["labels"]["team"], "db", "{one}");
    assert!(one.get("data").is_none() && !one.to_string().contains("aHVudGVyMg"), "{one}");
    let list = read(base, "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1").await;
    assert_eq!(list["kind"].as_str(), Some("PartialObjectMetadataList"), "{list}");
    assert!(list["metadata"]["resourceVersion"].as_str().is_some_and(|rv| !rv.is_empty()), "{list}");
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["metadata"]["name"], "s");
    assert!(!list.to_string().contains("aHVudGVyMg"), "{list}");
    // kube's typed call decodes it
    let meta = api.get_metadata("s").await.unwrap();
    assert_eq!(meta.metadata.labels.unwrap()["team"], "db");
}

#[tokio::test]
async fn two_clusters_in_one_process_are_independent() {
    let (a, ca) = cluster().await;
    let (b, cb) = cluster().await;
    assert_ne!(a.addr(), b.addr());
    let api_a: Api<Machine> = Api::namespaced(ca, "default");
    let api_b: Api<Machine> = Api::namespaced(cb, "default");
    api_a.create(&PostParams::default(), &machine("only-in-a")).await.unwrap();
    assert!(api_b.get("only-in-a").await.is_err());
    api_b.create(&PostParams::default(), &machine("only-in-a")).await.unwrap();
    api_b.delete("only-in-a", &DeleteParams::default()).await.unwrap();
    assert!(api_a.get("only-in-a").await.is_ok());
    assert!(a.store().resource_version() != 0 && b.store().resource_version() != 0);
}

async fn generate_name_leases_and_both_event_apis(backend: Backend) {
    let (c, api) = on::<Machine>(backend).await;
    let mut m = machine("");
    m.metadata.name = None;
    m.metadata.generate_name = Some("gen-".into());
    let a = api.create(&PostParams::default(), &m).await.unwrap();
    let b = api.create(&PostParams::default(), &m).await.unwrap();
    let (na, nb) = (a.metadata.name.unwrap(), b.metadata.name.unwrap());
    assert!(na.starts_with("gen-") && nb.starts_with("gen-") && na != nb, "{na} {nb}");

    use k8s_openapi::api::coordination::v1::Lease;
    let leases: Api<Lease> = c.api();
    let lease: Lease = serde_json::from_value(
        json!({"metadata": {"name": "nio-controller"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}),
    )
    .unwrap();
    let l = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut stale = l.clone();
    let mut taken = l.clone();
    taken.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases.replace("nio-controller", &PostParams::default(), &taken).await.unwrap();
    stale.spec.as_mut().unwrap().holder_identity = Some("c".into());
    assert_eq!(
        api_error(leases.replace("nio-controller", &PostParams::default(), &stale).await.unwrap_err()).0,
        409,
        "only one replica wins a lease"
    );
    // a lease that lasts no time is refused
    let zero: Lease = serde_json::from_value(
        json!({"metadata": {"name": "zero"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 0}}),
    )
    .unwrap();
    let (code, _, message) = api_error(leases.create(&PostParams::default(), &zero).await.unwrap_err());
    assert_eq!(code, 422, "{message}");
    assert!(message.contains("spec.leaseDurationSeconds"), "{message}");

    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use k8s_openapi::api::events::v1::Event as NewEvent;
    let core: Api<CoreEvent> = c.api();
    let ev: CoreEvent = serde_json::from_value(json!({"metadata": {"generateName": "m1."}, "reason": "Applied", "message": "ok", "involvedObject": {"kind": "Machine", "name": "m1", "namespace": c.namespace}})).unwrap();
    core.create(&PostParams::default(), &ev).await.unwrap();
    // the involved object must be in the Event's namespace
    let mut elsewhere = ev.clone();
    elsewhere.involved_object.namespace = Some("kube-system".into());
    let (code, _, message) = api_error(core.create(&PostParams::default(), &elsewhere).await.unwrap_err());
    assert_eq!(code, 422, "{message}");
    assert!(message.contains("involvedObject.namespace"), "{message}");
    let newer: Api<NewEvent> = c.api();
    let ev: NewEvent = serde_json::from_value(json!({"metadata": {"name": "m1.1"}, "type": "Normal", "reason": "Applied", "note": "ok", "action": "Apply", "reportingController": "nio", "reportingInstance": "x", "eventTime": "2026-11-25T00:00:00.000000Z", "regarding": {"kind": "Machine", "name": "m1", "namespace": c.namespace}})).unwrap();
    newer.create(&PostParams::default(), &ev).await.unwrap();
    // a note is at most 1024 bytes (not characters): 600 two-byte characters are too many
    let mut long = ev.clone();
    long.metadata.name = Some("m1.2".into());
    long.note = Some("é".repeat(600));
    let (code, _, message) = api_error(newer.create(&PostParams::default(), &long).await.unwrap_err());
    assert_eq!(code, 422, "{message}");
    assert!(message.contains("at most 1024"), "{message}");
    // one resource in two shapes: what `kubectl get events` (core/v1) shows includes what a controller
    // recorded through events.k8s.io/v1, and the other way round
    let core_list = core.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(core_list.len(), 2);
    let recorded = core_list.iter().find(|e| e.metadata.name.as_deref() == Some("m1.1")).unwrap();
    assert_eq!((recorded.message.as_deref(), recorded.involved_object.name.as_deref()), (Some("ok"), Some("m1")));
    let newer_list = newer.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(newer_list.len(), 2);
    assert!(newer_list.iter().any(|e| e.note.as_deref() == Some("ok") && e.regarding.is_some()));
}

/// `format: uint32` alone bounds nothing on a real apiserver (it drops unknown formats): without `maximum` a
/// value above 2^32 is stored and then every LIST of configurations fails to decode. Each integer and string a
/// user sets has a bound the server enforces.
async fn integers_and_strings_a_user_sets_are_bounded_by_the_schema(backend: Backend) {
    let (c, _api) = on::<NixosConfiguration>(backend).await;
    let dynamic: Api<kube::api::DynamicObject> =
        Api::namespaced_with(c.client.clone(), &c.namespace, &kube::api::ApiResource::erase::<NixosConfiguration>(&()));
    let with = |name: &str, extra: serde_json::Value| -> kube::api::DynamicObject {
        let mut spec =
            json!({"gitRepo": "https://example.org/r.git", "ref": "main", "flake": "#web", "machineRef": "m1"});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        serde_json::from_value(json!({
            "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration", "metadata": {"name": name}, "spec": spec
        }))
        .unwrap()
    };
    for (name, extra, field) in [
        ("huge-parallel", json!({"rollout": {"maxParallel": 99_999_999_999u64}}), "spec.rollout.maxParallel"),
        ("huge-canary", json!({"rollout": {"canary": 4_294_967_296u64}}), "spec.rollout.canary"),
        ("huge-budget", json!({"rollout": {"failureBudget": 10_000_000}}), "spec.rollout.failureBudget"),
        ("long-remove", json!({"onRemoveFlake": format!("#{}", "a".repeat(300))}), "spec.onRemoveFlake"),
        ("long-subdir", json!({"configurationSubdir": "a/".repeat(600)}), "spec.configurationSubdir"),
        ("url-subdir", json!({"configurationSubdir": "hosts#web"}), "spec.configurationSubdir"),
        // counts or percentages (int-or-string): a number past 2^31 would be stored and then not decode
        ("huge-failures", json!({"rollout": {"maxFailures": 3_000_000_000u64}}), "spec.rollout.maxFailures"),
        ("odd-percent", json!({"rollout": {"maxFailures": "150%"}}), "spec.rollout.maxFailures"),
        ("wave-count", json!({"rollout": {"waves": [{"name": "a", "count": -1}]}}), "spec.rollout.waves[0].count"),
    ] {
        let (code, _, message) =
            api_error(dynamic.create(&PostParams::default(), &with(name, extra)).await.unwrap_err());
        assert_eq!(code, 422, "{name}: {message}");
        assert!(message.contains(field), "{name}: {message}");
    }
    // in range: stored, and every configuration still lists
    let fine =
        json!({"rollout": {"maxParallel": 1_000_000, "maxFailures": "10%", "waves": [{"name": "a", "count": 5}]}});
    dynamic.create(&PostParams::default(), &with("fine", fine)).await.unwrap();
    let typed: Api<NixosConfiguration> = c.api();
    assert_eq!(typed.list(&ListParams::default()).await.unwrap().items.len(), 1);
}

/// The CRD's CEL rules (`x-kubernetes-validations`): a configuration names exactly one of machineRef and
/// machineSelector, and its selector uses a known operator, values only where the operator takes them, and
/// valid label keys and values. Each bad spec is refused with the rule's message; nothing is stored.
async fn cel_rules_refuse_selectors_that_would_pick_the_wrong_fleet(backend: Backend) {
    let (c, typed) = on::<NixosConfiguration>(backend).await;
    let dynamic: Api<kube::api::DynamicObject> =
        Api::namespaced_with(c.client.clone(), &c.namespace, &kube::api::ApiResource::erase::<NixosConfiguration>(&()));
    let with = |name: &str, target: serde_json::Value| -> kube::api::DynamicObject {
        let mut spec = json!({"gitRepo": "https://example.org/r.git", "ref": "main", "flake": "#web"});
        for (k, v) in target.as_object().unwrap() {
            spec[k] = v.clone();
        }
        serde_json::from_value(json!({
            "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration", "metadata": {"name": name}, "spec": spec
        }))
        .unwrap()
    };
    let expr = |key: &str, op: &str, values: serde_json::Value| json!({"machineSelector": {"matchExpressions": [{"key": key, "operator": op, "values": values}]}});
    for (name, target, says) in [
        ("neither", json!({}), "exactly one of machineRef and machineSelector"),
        ("both", json!({"machineRef": "m1", "machineSelector": {}}), "exactly one of machineRef and machineSelector"),
        ("bad-operator", expr("role", "Matches", json!(["web"])), "Unsupported value"),
        ("in-without-values", expr("role", "In", json!([])), "In and NotIn need at least one value"),
        ("exists-with-values", expr("role", "Exists", json!(["web"])), "Exists and DoesNotExist take none"),
        ("bang-key", expr("!role", "Exists", json!(null)), "key must be a valid label key"),
        ("bad-value", expr("role", "In", json!(["web server"])), "values must be valid label values"),
        (
            "bad-match-labels",
            json!({"machineSelector": {"matchLabels": {"role": "a/b"}}}),
            "matchLabels must map valid label keys to valid label values",
        ),
    ] {
        let (code, _, message) =
            api_error(dynamic.create(&PostParams::default(), &with(name, target)).await.unwrap_err());
        assert_eq!(code, 422, "{name}: {message}");
        assert!(message.contains(says), "{name}: {message}");
    }
    for (name, target) in [
        ("one-machine", json!({"machineRef": "m1"})),
        ("fleet", expr("example.org/role", "NotIn", json!(["db", "web-1"]))),
        ("all-labelled", json!({"machineSelector": {"matchLabels": {"tier": "edge"}}})),
    ] {
        dynamic.create(&PostParams::default(), &with(name, target)).await.unwrap();
    }
    let mut names: Vec<String> =
        typed.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|c| c.metadata.name).collect();
    names.sort();
    assert_eq!(names, ["all-labelled", "fleet", "one-machine"]);
}

/// Server-side apply merges `additionalFiles` by path (`x-kubernetes-list-type: map`), as GitOps tools and
/// people applying the same configuration rely on: each manager owns its own files, one that stops applying its
/// file removes only that file, the same path with another content conflicts, and one path twice is refused.
async fn server_side_apply_merges_map_lists_by_key(backend: Backend) {
    let (_c, api) = on::<NixosConfiguration>(backend).await;
    let file = |path: &str, content: &str| json!({"path": path, "valueType": "Inline", "inline": content});
    let full = |files: serde_json::Value| {
        json!({"apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration", "metadata": {"name": "web"},
               "spec": {"gitRepo": "https://example.org/r.git", "ref": "main", "flake": "#web", "machineRef": "m1",
                        "additionalFiles": files}})
    };
    let only_files = |files: serde_json::Value| {
        json!({"apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration", "metadata": {"name": "web"},
               "spec": {"additionalFiles": files}})
    };
    let paths = |c: NixosConfiguration| -> Vec<(String, String)> {
        c.spec.additional_files.into_iter().map(|f| (f.path, f.inline.unwrap_or_default())).collect()
    };
    let apply = |manager: &str, body: serde_json::Value| {
        let api = api.clone();
        let params = PatchParams::apply(manager);
        async move { api.patch("web", &params, &Patch::Apply(&body)).await }
    };
    apply("alice", full(json!([file("a.nix", "A")]))).await.unwrap();
    let both = apply("bob", only_files(json!([file("b.nix", "B")]))).await.unwrap();
    assert_eq!(paths(both), [("a.nix".into(), "A".into()), ("b.nix".into(), "B".into())], "merged by path");
    let dropped = apply("alice", full(json!([]))).await.unwrap();
    assert_eq!(paths(dropped), [("b.nix".into(), "B".into())], "alice's file went, bob's stayed");
    let (code, _, message) = api_error(apply("carol", only_files(json!([file("b.nix", "C")]))).await.unwrap_err());
    assert_eq!(code, 409, "{message}");
    assert!(message.contains("bob"), "{message}");
    let dup = serde_json::from_value::<NixosConfiguration>(json!({
        "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration", "metadata": {"name": "dup"},
        "spec": {"gitRepo": "https://example.org/r.git", "ref": "main", "flake": "#web", "machineRef": "m1",
                 "additionalFiles": [file("x.nix", "1"), file("x.nix", "2")]}
    }))
    .unwrap();
    let (code, _, message) = api_error(api.create(&PostParams::default(), &dup).await.unwrap_err());
    assert_eq!(code, 422, "{message}");
    assert!(message.contains("Duplicate value"), "{message}");
}

/// Large lists come in pages (kube-rs's watcher asks for 500 at a time): `limit` caps a page, `continue`
/// resumes after it, and the pages together hold every object once.
async fn lists_page_with_limit_and_continue(backend: Backend) {
    let (_c, api) = on::<Machine>(backend).await;
    for i in 0..5 {
        api.create(&PostParams::default(), &machine(&format!("p{i}"))).await.unwrap();
    }
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut lp = ListParams::default().limit(2);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 2);
        names.extend(page.items.into_iter().filter_map(|m| m.metadata.name));
        match page.metadata.continue_.filter(|t| !t.is_empty()) {
            Some(t) => {
                assert!(page.metadata.remaining_item_count.is_some_and(|n| n > 0));
                token = Some(t);
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["p0", "p1", "p2", "p3", "p4"]);
    let (code, _, _) =
        api_error(api.list(&ListParams::default().limit(2).continue_token("not-a-token")).await.unwrap_err());
    assert_eq!(code, 400);
}

/// A user with a Role that allows reading Machines in one namespace may read them there, and nothing else:
/// writing, other resources and other namespaces are 403 Forbidden, naming the user and the verb.
async fn rbac_grants_exactly_what_a_role_says(backend: Backend) {
    let (c, admin) = on::<Machine>(backend).await;
    admin.create(&PostParams::default(), &machine("m1")).await.unwrap();
    let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(json!({
        "metadata": {"name": "machine-reader"},
        "rules": [{"apiGroups": ["nixos.infra"], "resources": ["machines"], "verbs": ["get", "list", "watch"]}]
    }))
    .unwrap();
    let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "tester-reads-machines"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "machine-reader"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": nio_loadtest::realkube::TESTER}]
    }))
    .unwrap();
    c.api::<k8s_openapi::api::rbac::v1::Role>().create(&PostParams::default(), &role).await.unwrap();
    c.api::<k8s_openapi::api::rbac::v1::RoleBinding>().create(&PostParams::default(), &binding).await.unwrap();
    let tester = c.tester_client().unwrap();
    let machines: Api<Machine> = Api::namespaced(tester.clone(), &c.namespace);
    // RBAC changes reach the authorizer's cache a moment later on a real apiserver
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while machines.get("m1").await.is_err() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(machines.get("m1").await.unwrap().metadata.name.as_deref(), Some("m1"));
    assert_eq!(machines.list(&ListParams::default()).await.unwrap().items.len(), 1);
    let forbidden = |e: kube::Error| {
        let (code, reason, message) = api_error(e);
        assert_eq!((code, reason.as_str()), (403, "Forbidden"), "{message}");
        message
    };
    let message = forbidden(machines.delete("m1", &DeleteParams::default()).await.unwrap_err());
    assert!(message.contains(nio_loadtest::realkube::TESTER) && message.contains("delete"), "{message}");
    forbidden(machines.create(&PostParams::default(), &machine("m2")).await.unwrap_err());
    let status = Patch::Merge(json!({"status": {"phase": "Applied"}}));
    forbidden(machines.patch_status("m1", &PatchParams::default(), &status).await.unwrap_err());
    let secrets: Api<Secret> = Api::namespaced(tester.clone(), &c.namespace);
    forbidden(secrets.list(&ListParams::default()).await.unwrap_err());
    let elsewhere: Api<Machine> = Api::namespaced(tester, "default");
    forbidden(elsewhere.list(&ListParams::default()).await.unwrap_err());
}

async fn unknown_bearer_tokens_are_unauthorized(backend: Backend) {
    let (mut c, _api) = on::<Machine>(backend).await;
    c.tester_token = "not-a-token-anyone-has".into();
    let machines: Api<Machine> = Api::namespaced(c.tester_client().unwrap(), &c.namespace);
    let (code, _, _) = api_error(machines.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(code, 401);
}

/// A write that changes nothing (the same status applied again, the same spec replaced) keeps the
/// resourceVersion and wakes no watcher; a controller that re-applies its status must not trigger itself.
async fn writes_that_change_nothing_store_nothing(backend: Backend) {
    let (_c, api) = on::<Machine>(backend).await;
    let created = api.create(&PostParams::default(), &machine("m1")).await.unwrap();
    let status = Patch::Apply(json!({
        "apiVersion": "nixos.infra/v1alpha1", "kind": "Machine", "status": {"phase": "Queued", "appliedCommit": "abc"}
    }));
    let pp = PatchParams::apply("nio-controller").force();
    let first = api.patch_status("m1", &pp, &status).await.unwrap();
    let rv = first.metadata.resource_version.clone().unwrap();
    assert_ne!(Some(&rv), created.metadata.resource_version.as_ref());
    let mut stream = api.watch(&WatchParams::default().timeout(10), &rv).await.unwrap().boxed();
    let again = api.patch_status("m1", &pp, &status).await.unwrap();
    assert_eq!(again.metadata.resource_version.as_deref(), Some(rv.as_str()), "same status applied again");
    let replaced = api.replace("m1", &PostParams::default(), &again).await.unwrap();
    assert_eq!(replaced.metadata.resource_version.as_deref(), Some(rv.as_str()), "same object replaced");
    // the next event a watcher sees is the next real change, not the no-ops
    api.patch("m1", &PatchParams::default(), &Patch::Merge(json!({"spec": {"port": 2222}}))).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await.unwrap().unwrap() {
            Some(WatchEvent::Bookmark(_)) => continue,
            Some(WatchEvent::Modified(m)) => break assert_eq!(m.spec.port, 2222, "a no-op write reached the watch"),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The API server estimates each CEL rule's worst-case cost from the sizes the schema allows and refuses a CRD
/// whose rule could cost more than its budget: a regex over every string of an unbounded list is refused (with
/// the rule's path and the hint to add maxItems and maxLength); the same rule with those bounds is accepted.
async fn crds_whose_rules_cost_too_much_are_refused(backend: Backend) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let c = TestCluster::start(backend).await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    // CRDs are cluster-wide: the names carry the test's namespace.
    let group = format!("{}.costs.example.org", c.namespace);
    let crd = |plural: &str, tags: serde_json::Value| -> CustomResourceDefinition {
        serde_json::from_value(json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.{group}")},
            "spec": {"group": group, "scope": "Namespaced",
                "names": {"plural": plural, "singular": plural.trim_end_matches('s'), "kind": "Widget", "listKind": "WidgetList"},
                "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                    "type": "object", "properties": {"spec": {"type": "object", "properties": {"tags": tags}}}}}}]}
        }))
        .unwrap()
    };
    let rule = json!([{"rule": "self.all(x, x.matches('^[a-z]+$'))"}]);
    let unbounded = json!({"type": "array", "items": {"type": "string"}, "x-kubernetes-validations": rule});
    let (code, _, message) =
        api_error(crds.create(&PostParams::default(), &crd("widgets", unbounded)).await.unwrap_err());
    assert_eq!(code, 422, "{message}");
    for says in [
        "spec.validation.openAPIV3Schema.properties[spec].properties[tags].x-kubernetes-validations[0].rule: Forbidden: estimated rule cost exceeds budget by factor of more than 100x",
        "adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared",
        "x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema exceeds budget",
    ] {
        assert!(message.contains(says), "{says}: {message}");
    }
    // Bounded strings alone are not enough: a million of them still cost 5.9 times the budget.
    let long_list =
        json!({"type": "array", "items": {"type": "string", "maxLength": 63}, "x-kubernetes-validations": rule});
    let (code, _, message) =
        api_error(crds.create(&PostParams::default(), &crd("gadgets", long_list)).await.unwrap_err());
    assert_eq!(code, 422, "{message}");
    assert!(message.contains("estimated rule cost exceeds budget by factor of 5.9x"), "{message}");
    assert!(!message.contains("total for entire"), "58,720,202 is within the schema's total: {message}");
    let bounded = json!({"type": "array", "maxItems": 10, "items": {"type": "string", "maxLength": 63}, "x-kubernetes-validations": rule});
    crds.create(&PostParams::default(), &crd("widgets", bounded)).await.unwrap();
    crds.delete(&format!("widgets.{group}"), &DeleteParams::default()).await.unwrap();
}
