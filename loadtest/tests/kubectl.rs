#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! The real `kubectl` as a user would drive it, against the simulator and a real kube-apiserver (a fresh
//! control plane per test: these tests install CRDs and cluster-wide objects like a user on a new cluster).

use std::path::{Path, PathBuf};
use std::time::Duration;

use nio_loadtest::kubesim::{KubeSim, Options};
use nio_loadtest::on_both;
use nio_loadtest::realkube::RealKube;
use nio_loadtest::testkube::Backend;

struct Kubectl {
    dir: tempfile::TempDir,
    _sim: Option<KubeSim>,
    _real: Option<RealKube>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

on_both!(
    typed_create_commands_send_protobuf_and_work,
    a_json_list_applies_each_item_after_client_side_validation,
    get_events_shows_what_a_controller_recorded_through_events_k8s_io,
    apply_crds_and_examples_then_get_shows_printer_columns,
    explain_and_server_side_validation,
    delete_waits_for_finalizers_and_watch_sees_updates,
);

impl Kubectl {
    async fn start(backend: Backend) -> Self {
        // No CRDs at start: the test installs them with kubectl like a user would.
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        let (sim, real) = match backend {
            Backend::Sim => {
                let sim = KubeSim::start(Options { crds_dir: None, ..Default::default() }).await.unwrap();
                sim.write_kubeconfig(&kubeconfig).unwrap();
                (Some(sim), None)
            }
            Backend::Real => {
                let real = RealKube::start(&dir.path().join("realkube"), 0).await.unwrap();
                real.write_kubeconfig(&kubeconfig).unwrap();
                (None, Some(real))
            }
        };
        Kubectl { dir, _sim: sim, _real: real }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("kubectl");
        c.args(args)
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .env("HOME", self.dir.path())
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .current_dir(repo())
            .kill_on_drop(true);
        c
    }

    /// Runs kubectl; returns (success, stdout, stderr).
    async fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = tokio::time::timeout(Duration::from_secs(60), self.command(args).output())
            .await
            .expect("kubectl hung")
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args).await;
        assert!(ok, "kubectl {args:?} failed:\n{out}\n{err}");
        out
    }
}

async fn apply_crds_and_examples_then_get_shows_printer_columns(backend: Backend) {
    let k = Kubectl::start(backend).await;
    let out = k.ok(&["apply", "-f", "crds/"]).await;
    assert!(out.contains("customresourcedefinition.apiextensions.k8s.io/machines.nixos.infra created"), "{out}");
    let out = k.ok(&["apply", "-f", "examples/"]).await;
    for line in [
        "namespace/fleet created",
        "machine.nixos.infra/web-01 created",
        "nixosconfiguration.nixos.infra/db-01 created",
        "secret/db-secrets created",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // idempotent re-apply
    let out = k.ok(&["apply", "-f", "examples/"]).await;
    assert!(out.contains("machine.nixos.infra/web-01 unchanged"), "{out}");

    let out = k.ok(&["get", "machines", "-A"]).await;
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAMESPACE", "NAME", "SITE", "PHASE", "COMMIT", "DISCOVERABLE", "AGE"]);
    let web01 = out.lines().find(|l| l.contains("web-01")).unwrap();
    assert!(web01.starts_with("fleet") && web01.contains("dc1"), "{web01}");
    assert_eq!(out.lines().count(), 4, "{out}");

    let out = k.ok(&["get", "nixconf", "-n", "fleet"]).await;
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "REF", "TARGET", "UPDATED", "WAVE", "ROLLOUT", "READY", "AGE"]);

    // short names and categories resolve through discovery
    let out = k.ok(&["get", "mach", "-n", "fleet", "-o", "name"]).await;
    assert!(out.contains("machine.nixos.infra/db-01"), "{out}");
    let out = k.ok(&["get", "nio", "-n", "fleet", "-o", "name"]).await;
    assert!(
        out.contains("machine.nixos.infra/web-02") && out.contains("nixosconfiguration.nixos.infra/web-fleet"),
        "{out}"
    );

    // secrets written with stringData are stored as data
    let out = k.ok(&["get", "secret", "infra-git", "-n", "fleet", "-o", "jsonpath={.data.token}"]).await;
    assert_eq!(out, "cmVwbGFjZS13aXRoLWEtcmVhZC1vbmx5LXRva2Vu");
}

async fn explain_and_server_side_validation(backend: Backend) {
    let k = Kubectl::start(backend).await;
    k.ok(&["apply", "-f", "crds/"]).await;
    // as a user must on any cluster: a new CRD is served once Established, and explain finds it once the
    // apiserver has published its OpenAPI (a moment later)
    k.ok(&["wait", "--for=condition=Established", "crd/machines.nixos.infra", "crd/nixosconfigurations.nixos.infra"])
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !k.run(&["explain", "machine.spec.hostname"]).await.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let out = k.ok(&["explain", "machine.spec.hostname"]).await;
    assert!(out.contains("DNS host name of the machine"), "{out}");
    let out = k.ok(&["explain", "nixosconfiguration.spec.action"]).await;
    assert!(out.contains("switch-to-configuration's action"), "{out}");

    let bad = k.dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: nixos.infra/v1alpha1\nkind: Machine\nmetadata: {name: bad, namespace: default}\nspec: {hostname: h, port: 70000}\n").unwrap();
    let (ok, _, err) = k.run(&["apply", "-f", bad.to_str().unwrap()]).await;
    assert!(!ok && err.contains("spec.port") && err.contains("65535"), "{err}");
    std::fs::write(&bad, "apiVersion: nixos.infra/v1alpha1\nkind: Machine\nmetadata: {name: bad, namespace: default}\nspec: {hostname: h, prot: 22}\n").unwrap();
    let (ok, _, err) = k.run(&["apply", "-f", bad.to_str().unwrap()]).await;
    assert!(!ok && err.contains("unknown field \"spec.prot\""), "strict field validation: {err}");
    let (ok, out, _) = k.run(&["get", "machine", "bad", "-n", "default"]).await;
    assert!(!ok, "nothing stored: {out}");
    // schema defaults are visible to the user
    std::fs::write(&bad, "apiVersion: nixos.infra/v1alpha1\nkind: Machine\nmetadata: {name: good, namespace: default}\nspec: {hostname: h}\n").unwrap();
    k.ok(&["apply", "-f", bad.to_str().unwrap()]).await;
    let out = k.ok(&["get", "machine", "good", "-o", "jsonpath={.spec.port} {.spec.sshUser} {.spec.site}"]).await;
    assert_eq!(out, "22 root default");
}

async fn delete_waits_for_finalizers_and_watch_sees_updates(backend: Backend) {
    let k = Kubectl::start(backend).await;
    k.ok(&["apply", "-f", "crds/"]).await;
    k.ok(&["apply", "-f", "examples/00-namespace.yaml", "-f", "examples/10-machines.yaml"]).await;

    let mut watch =
        k.command(&["get", "machines", "-n", "fleet", "--watch", "--output-watch-events", "--request-timeout", "30s"]);
    watch.stdout(std::process::Stdio::piped());
    let child = watch.spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    k.ok(&["label", "machine", "web-02", "-n", "fleet", "team=blue"]).await;

    k.ok(&[
        "patch",
        "machine",
        "db-01",
        "-n",
        "fleet",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["nixos.infra/finalizer"]}}"#,
    ])
    .await;
    k.ok(&["delete", "machine", "db-01", "-n", "fleet", "--wait=false"]).await;
    let out = k.ok(&["get", "machine", "db-01", "-n", "fleet", "-o", "jsonpath={.metadata.deletionTimestamp}"]).await;
    assert!(!out.is_empty(), "db-01 is Terminating, held by its finalizer");
    k.ok(&[
        "patch",
        "machine",
        "db-01",
        "-n",
        "fleet",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])
    .await;
    let (ok, _, err) = k.run(&["get", "machine", "db-01", "-n", "fleet"]).await;
    assert!(!ok && err.contains("NotFound"), "{err}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut child = child;
    let _ = child.start_kill();
    let out = child.wait_with_output().await.unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    let events: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(
        out.lines().any(|l| l.starts_with("MODIFIED") && l.contains("web-02")),
        "watch saw the label change:\n{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("DELETED") && l.contains("db-01")), "watch saw the deletion:\n{out}");
    assert!(events.iter().filter(|e| **e == "ADDED").count() >= 3, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubesim_command_serves_a_cluster_and_writes_a_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let crds = repo().join("crds");
    let args = ["kubesim", "--listen", "127.0.0.1:0", "--kubeconfig", path(&kubeconfig), "--crds", path(&crds)];
    let (mut child, first) = serve(&args, Duration::from_secs(20)).await;
    assert!(first.starts_with("kubesim serving http://127.0.0.1:"), "{first}");
    let names = kubectl_at(dir.path(), &kubeconfig, &["get", "crds", "-o", "name"]).await;
    assert!(names.contains("machines.nixos.infra") && names.contains("nixosconfigurations.nixos.infra"), "{names}");
    child.kill().await.unwrap();
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Starts `nio-loadtest ARGS` and returns it with the first line it prints.
async fn serve(args: &[&str], within: Duration) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_nio-loadtest"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(within, lines.next_line()).await.unwrap().unwrap().unwrap();
    (child, first)
}

/// kubectl ARGS against `kubeconfig` (cache under `dir`): its stdout.
async fn kubectl_at(dir: &Path, kubeconfig: &Path, args: &[&str]) -> String {
    let out = tokio::process::Command::new("kubectl")
        .args(args)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .env("KUBECONFIG", kubeconfig)
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn deploy_overlays_build_with_kustomize() {
    for overlay in [
        "deploy/overlays/dev",
        "deploy/overlays/prod",
        "deploy/multi-cluster/controller-only",
        "deploy/gitops/clusters/eu",
        "deploy/gitops/clusters/us",
    ] {
        let out =
            std::process::Command::new("kubectl").args(["kustomize", overlay]).current_dir(repo()).output().unwrap();
        assert!(out.status.success(), "{overlay}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        for kind in [
            "kind: CustomResourceDefinition",
            "name: machines.nixos.infra",
            "name: nio-controller",
            "kind: ClusterRole",
        ] {
            assert!(text.contains(kind), "{overlay} lacks {kind}");
        }
        assert!(
            !text.contains("nio-executor") || text.contains("automountServiceAccountToken: false"),
            "executors get no Kubernetes credentials"
        );
    }
}

/// The GitOps example: each cluster's directory gets its own cluster name, the push webhook and its own fleet,
/// and the Flux Kustomizations and the Argo CD ApplicationSet point at exactly those directories.
#[test]
fn the_gitops_example_gives_each_cluster_its_name_its_webhook_and_its_fleet() {
    let build = |dir: &str| nio_loadtest::procs::kustomize(&repo().join(dir)).unwrap();
    for cluster in ["eu", "us"] {
        let docs = build(&format!("deploy/gitops/clusters/{cluster}"));
        let find = |kind: &str, name: &str| {
            docs.iter()
                .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
                .cloned()
                .unwrap_or_else(|| panic!("{cluster}: no {kind} {name}"))
        };
        let env = find("Deployment", "nio-controller")["spec"]["template"]["spec"]["containers"][0]["env"].clone();
        let var = |n: &str| env.as_array().unwrap().iter().find(|e| e["name"] == n).map(|e| e["value"].clone());
        assert_eq!(var("NIO_CLUSTER_NAME"), Some(serde_json::json!(cluster)));
        assert_eq!(var("NIO_WEBHOOK_ADDR"), Some(serde_json::json!("0.0.0.0:8080")), "{cluster}");
        assert_eq!(find("Service", "nio-controller-webhook")["metadata"]["namespace"], "nio-system");
        let machines: Vec<&str> =
            docs.iter().filter(|d| d["kind"] == "Machine").filter_map(|d| d["metadata"]["name"].as_str()).collect();
        assert_eq!(machines, [format!("web-{cluster}-01"), format!("web-{cluster}-02")], "{cluster}");
        assert_eq!(find("NixosConfiguration", "web")["metadata"]["namespace"], "fleet");
    }
    for cluster in ["eu", "us"] {
        let text = std::fs::read_to_string(repo().join(format!("deploy/gitops/flux/{cluster}.yaml"))).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        let ks = docs.iter().find(|d| d["kind"] == "Kustomization").unwrap();
        assert_eq!(ks["spec"]["path"], format!("./deploy/gitops/clusters/{cluster}"));
        assert_eq!(ks["spec"]["wait"], true, "Flux checks NIO objects' health (kstatus)");
    }
    let text = std::fs::read_to_string(repo().join("deploy/gitops/argocd/applicationset.yaml")).unwrap();
    let set: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    let path = set["spec"]["template"]["spec"]["source"]["path"].as_str().unwrap();
    let values = &set["spec"]["generators"][0]["clusters"]["selector"]["matchExpressions"][0]["values"];
    for cluster in values.as_array().unwrap() {
        let dir = path.replace(r#"{{ index .metadata.labels "nixos.infra/cluster" }}"#, cluster.as_str().unwrap());
        assert!(repo().join(&dir).join("kustomization.yaml").is_file(), "the ApplicationSet points at {dir}");
    }
}

/// Every overlay in deploy/ is accepted by a real apiserver (`kubectl apply --server-side --dry-run=server`):
/// schema, RBAC objects, Deployments and StatefulSets as the apiserver validates them, not only as kustomize
/// builds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_deploy_overlay_passes_a_server_side_dry_run_on_a_real_apiserver() {
    let real = nio_loadtest::testkube::shared_real().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, real.endpoint.kubeconfig()).unwrap();
    let kubectl = |args: &[&str]| {
        let out = std::process::Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", dir.path())
            .current_dir(repo())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) =
        kubectl(&["apply", "--server-side", "-f", "loadtest/tests/fixtures/prometheus-operator-crds.yaml"]);
    assert!(ok, "{err}");
    let (ok, _, err) = kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    ]);
    assert!(ok, "{err}");
    // A dry run creates no namespace, and the GitOps example puts its fleet into one of its own.
    let (ok, _, err) = kubectl(&["create", "namespace", "fleet"]);
    assert!(ok || err.contains("AlreadyExists"), "{err}");
    for overlay in [
        "deploy/base",
        "deploy/overlays/dev",
        "deploy/overlays/prod",
        "deploy/multi-cluster/controller-only",
        "deploy/gitops/clusters/eu",
        "deploy/gitops/clusters/us",
    ] {
        let (ok, out, err) =
            kubectl(&["apply", "--server-side", "--force-conflicts", "--dry-run=server", "-k", overlay]);
        assert!(ok, "{overlay} rejected by the apiserver:\n{out}\n{err}");
        assert!(out.contains("deployment.apps/nio-controller serverside-applied (server dry run)"), "{overlay}: {out}");
    }
}

/// `nio-loadtest realkube` serves a real control plane with NIO's CRDs, and SIGTERM stops it and its etcd and
/// apiserver (no orphans) and removes its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_realkube_command_serves_a_cluster_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let data = dir.path().join("data");
    let (mut child, first) =
        serve(&["realkube", "--kubeconfig", path(&kubeconfig), "--dir", path(&data)], Duration::from_secs(90)).await;
    assert!(first.starts_with("kube-apiserver serving https://127.0.0.1:"), "{first}");
    let names = kubectl_at(dir.path(), &kubeconfig, &["get", "crds", "-o", "name"]).await;
    assert!(names.contains("machines.nixos.infra") && names.contains("nixosconfigurations.nixos.infra"), "{names}");
    // the admin is authenticated by its token and authorized through RBAC (system:masters)
    let who = kubectl_at(dir.path(), &kubeconfig, &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]);
    assert_eq!(who.await, "nio-admin");
    let pids = |name: &str| {
        let out = std::process::Command::new("pgrep")
            .args(["-a", "-f", &format!("bin/{name} .*{}", data.display())])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.lines().count(), text)
    };
    assert_eq!((pids("etcd").0, pids("kube-apiserver").0), (1, 1), "{:?}", (pids("etcd"), pids("kube-apiserver")));
    std::process::Command::new("kill").args(["-TERM", &child.id().unwrap().to_string()]).status().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!((pids("etcd").0, pids("kube-apiserver").0), (0, 0), "etcd and the apiserver stop with the command");
    assert!(!data.exists(), "its data is removed");
}

/// kubectl's typed `create` commands send built-in objects as protobuf; what they create is what a user reads
/// back as JSON.
async fn typed_create_commands_send_protobuf_and_work(backend: Backend) {
    let k = Kubectl::start(backend).await;
    let out = k.ok(&["create", "namespace", "fleet"]).await;
    assert_eq!(out.trim(), "namespace/fleet created");
    k.ok(&["create", "secret", "generic", "git", "-n", "fleet", "--from-literal=token=s3cret"]).await;
    k.ok(&["label", "secret", "git", "-n", "fleet", "nixos.infra/usable-by=nio"]).await;
    k.ok(&["create", "configmap", "facts", "-n", "fleet", "--from-literal=site=dc1"]).await;
    k.ok(&["create", "serviceaccount", "nio-controller", "-n", "fleet"]).await;
    k.ok(&["create", "role", "machines", "-n", "fleet", "--verb=get,list", "--resource=secrets"]).await;
    k.ok(&[
        "create",
        "rolebinding",
        "machines",
        "-n",
        "fleet",
        "--role=machines",
        "--serviceaccount=fleet:nio-controller",
    ])
    .await;
    k.ok(&["create", "clusterrole", "nio-read", "--verb=get", "--resource=namespaces"]).await;
    k.ok(&[
        "create",
        "clusterrolebinding",
        "nio-read",
        "--clusterrole=nio-read",
        "--serviceaccount=fleet:nio-controller",
    ])
    .await;

    let token = k.ok(&["get", "secret", "git", "-n", "fleet", "-o", "jsonpath={.data.token} {.metadata.labels}"]).await;
    assert_eq!(token, r#"czNjcmV0 {"nixos.infra/usable-by":"nio"}"#);
    let site = k.ok(&["get", "configmap", "facts", "-n", "fleet", "-o", "jsonpath={.data.site}"]).await;
    assert_eq!(site, "dc1");
    let rule = k
        .ok(&["get", "role", "machines", "-n", "fleet", "-o", "jsonpath={.rules[0].verbs} {.rules[0].resources}"])
        .await;
    assert_eq!(rule, r#"["get","list"] ["secrets"]"#);
    let subject = k
        .ok(&["get", "rolebinding", "machines", "-n", "fleet", "-o", "jsonpath={.subjects[0].name} {.roleRef.name}"])
        .await;
    assert_eq!(subject, "nio-controller machines");
    let rule = k
        .ok(&["get", "clusterrolebinding", "nio-read", "-o", "jsonpath={.subjects[0].namespace} {.roleRef.kind}"])
        .await;
    assert_eq!(rule, "fleet ClusterRole");
    let sa = k.ok(&["get", "serviceaccount", "nio-controller", "-n", "fleet", "-o", "jsonpath={.metadata.name}"]).await;
    assert_eq!(sa, "nio-controller");
    let out = k.ok(&["delete", "namespace", "fleet", "--wait=false"]).await;
    assert_eq!(out.trim(), "namespace \"fleet\" deleted");
}

/// A JSON `kind: List` is validated item by item on the client (against the served OpenAPI v2), then applied.
async fn a_json_list_applies_each_item_after_client_side_validation(backend: Backend) {
    let k = Kubectl::start(backend).await;
    k.ok(&["apply", "-f", "crds/"]).await;
    k.ok(&["wait", "--for=condition=Established", "crd/machines.nixos.infra"]).await;
    let list = k.dir.path().join("list.json");
    let machine = |name: &str, extra: &str| {
        format!(
            r#"{{"apiVersion": "nixos.infra/v1alpha1", "kind": "Machine", "metadata": {{"name": "{name}", "namespace": "default"}},
               "spec": {{"hostname": "{name}.example", "site": "dc1"{extra}}}}}"#
        )
    };
    let items = [
        r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "facts", "namespace": "default"}, "data": {"a": "1"}}"#.to_string(),
        machine("web-01", ""),
    ];
    std::fs::write(&list, format!(r#"{{"apiVersion": "v1", "kind": "List", "items": [{}]}}"#, items.join(",")))
        .unwrap();
    let out = k.ok(&["apply", "-f", list.to_str().unwrap()]).await;
    assert!(out.contains("configmap/facts created") && out.contains("machine.nixos.infra/web-01 created"), "{out}");
    let site = k.ok(&["get", "machine", "web-01", "-o", "jsonpath={.spec.site}"]).await;
    assert_eq!(site, "dc1");

    // an unknown field in an item is refused before anything is sent
    let bad =
        format!(r#"{{"apiVersion": "v1", "kind": "List", "items": [{}]}}"#, machine("web-02", r#", "sitee": "dc2""#));
    std::fs::write(&list, bad).unwrap();
    let (ok, out, err) = k.run(&["apply", "-f", list.to_str().unwrap()]).await;
    assert!(!ok, "{out}");
    assert!(err.contains("sitee"), "{err}");
    let (found, _, _) = k.run(&["get", "machine", "web-02"]).await;
    assert!(!found, "nothing of a refused list is created");
}

/// Controllers record Events through events.k8s.io/v1; users read them with `kubectl get events` (core/v1):
/// one resource, two shapes.
async fn get_events_shows_what_a_controller_recorded_through_events_k8s_io(backend: Backend) {
    let k = Kubectl::start(backend).await;
    let ev = k.dir.path().join("event.yaml");
    std::fs::write(
        &ev,
        "apiVersion: events.k8s.io/v1\nkind: Event\nmetadata: {name: web-01.1, namespace: default}\n\
         type: Warning\nreason: BuildFailed\nnote: switch abc123 failed\naction: ApplyStatus\n\
         reportingController: nio-controller\nreportingInstance: c1\neventTime: 2026-11-26T10:00:00.000000Z\n\
         regarding: {apiVersion: nixos.infra/v1alpha1, kind: Machine, name: web-01, namespace: default}\n",
    )
    .unwrap();
    k.ok(&["apply", "-f", ev.to_str().unwrap()]).await;
    // Only this Event: the namespace is shared with the apiserver's own (e.g. its IP allocator's repair Events).
    let ours =
        r#"{.items[?(@.involvedObject.name=="web-01")].reason} {.items[?(@.involvedObject.name=="web-01")].message}"#;
    let out = k.ok(&["get", "events", "-n", "default", "-o", &format!("jsonpath={ours}")]).await;
    assert_eq!(out, "BuildFailed switch abc123 failed");
}

/// The prod overlay runs NATS as a 3-member JetStream cluster that NIO uses as such: each member's config (as the
/// real nats-server reads it, with its pod name) is valid and routes to all three; the StatefulSet has three pods
/// behind a headless Service; controllers and executors are given every member and replicate on 3.
#[test]
fn the_prod_overlay_runs_nats_as_a_jetstream_cluster_of_three() {
    let docs = nio_loadtest::procs::kustomize(&repo().join("deploy/overlays/prod")).unwrap();
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    let sts = find("StatefulSet", "nats");
    assert_eq!(sts["spec"]["replicas"], 3);
    let headless = find("Service", sts["spec"]["serviceName"].as_str().unwrap());
    assert_eq!(headless["spec"]["clusterIP"], "None");

    let conf = find("ConfigMap", "nats-config")["data"]["nats.conf"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nats.conf");
    std::fs::write(&path, &conf).unwrap();
    let nats = nio_loadtest::procs::tool_path("nats-server").expect("nats-server (make setup)");
    for pod in ["nats-0", "nats-1", "nats-2"] {
        let check =
            std::process::Command::new(&nats).arg("-c").arg(&path).arg("-t").env("POD_NAME", pod).output().unwrap();
        assert!(
            check.status.success(),
            "{pod}: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        assert!(conf.contains(&format!("nats://{pod}.nats-headless:6222")), "a route to {pod}");
    }

    let env = |deployment: &str, var: &str| -> String {
        let d = find("Deployment", deployment);
        let env = d["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap().clone();
        let e = env.iter().find(|e| e["name"] == var).unwrap_or_else(|| panic!("{deployment} has no {var}"));
        e["value"].as_str().unwrap_or_default().to_string()
    };
    for deployment in ["nio-controller", "nio-executor"] {
        let urls = nio_shared::nats::servers(&env(deployment, "NIO_NATS_URL"));
        assert_eq!(urls.len(), 3, "{deployment}: {urls:?}");
    }
    assert_eq!(env("nio-controller", "NIO_JOBS_REPLICAS"), "3");
    let sites = find("ConfigMap", "nio-executor-sites")["data"]["sites.yaml"].as_str().unwrap().to_string();
    assert_eq!(nio_shared::config::ExecutorConfig::from_yaml(&sites).unwrap().stream_replicas, 3);
}
