#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! NIO as GitOps tools see it: the kstatus library (Flux's health checks, kpt) and NIO's Argo CD health checks
//! (`deploy/argocd/*.lua`, run in Lua 5.1 as Argo CD's gopher-lua does) read NIO objects in each state on
//! kubesim and on the real apiserver, and must agree with what NIO means.

mod common;

nio_loadtest::on_both!(
    gitops_tools_read_each_state_as_nio_means_it,
    a_signed_push_refreshes_exactly_the_configurations_that_follow_it
);

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use kube::api::{Api, ApiResource, DynamicObject};
use nio_shared::protocol::{FailureCategory, Phase};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

fn repo_file(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

/// What kstatus computes for each object: (name, status, message).
fn kstatus(objects: &[Value]) -> Vec<(String, String, String)> {
    let bin = nio_loadtest::procs::tool_path("nio-kstatus").expect("nio-kstatus (make setup builds it)");
    let mut child = Command::new(bin).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(&serde_json::to_vec(objects).unwrap()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "nio-kstatus failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut f = l.splitn(3, '\t').map(str::to_string);
            (f.next().unwrap(), f.next().unwrap(), f.next().unwrap_or_default())
        })
        .collect()
}

/// What NIO's Argo CD health check for `kind` says of `obj`: (status, message).
fn argo_health(kind: &str, obj: &Value) -> (String, String) {
    let script = repo_file(&format!("deploy/argocd/health-{}.lua", kind.to_lowercase()));
    // Argo CD sets the global `obj` to the live object and reads the table the script returns.
    let harness = "local cjson = require('cjson'); obj = cjson.decode(io.read('*a')); \
                   local hs = dofile(os.getenv('HEALTH_LUA')); io.write(hs.status, '\\t', hs.message or '')";
    let mut child = Command::new("lua5.1")
        .args(["-e", harness])
        .env("HEALTH_LUA", &script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("lua5.1 (make setup installs it)");
    child.stdin.take().unwrap().write_all(&serde_json::to_vec(obj).unwrap()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{} failed on {obj}", script.display());
    let text = String::from_utf8(out.stdout).unwrap();
    let (s, m) = text.split_once('\t').unwrap();
    (s.to_string(), m.to_string())
}

/// The object as stored, read as any client would (untyped JSON).
async fn raw(env: &Env, kind: &str, name: &str) -> Value {
    let ar = ApiResource {
        group: "nixos.infra".into(),
        version: "v1alpha1".into(),
        api_version: "nixos.infra/v1alpha1".into(),
        kind: kind.into(),
        plural: format!("{}s", kind.to_lowercase()),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), &env.ns, &ar);
    let mut v = serde_json::to_value(api.get(name).await.unwrap()).unwrap();
    v["apiVersion"] = json!("nixos.infra/v1alpha1");
    v["kind"] = json!(kind);
    v
}

/// Asserts that kstatus and Argo CD read `name` (a `kind`) as `want` = (kstatus status, Argo CD status), and that
/// both messages say why (`why` in each).
async fn reads_as(env: &Env, kind: &str, name: &str, want: (&str, &str), why: &str) {
    let obj = raw(env, kind, name).await;
    let k = kstatus(std::slice::from_ref(&obj)).remove(0);
    let a = argo_health(kind, &obj);
    let got = ((k.1.as_str(), a.0.as_str()), (k.2.as_str(), a.1.as_str()));
    assert_eq!(got.0, want, "{kind} {name}: kstatus {k:?}, Argo CD {a:?}; status {:#}", obj["status"]);
    // kstatus says "Resource is Ready" of everything Ready.
    let k_why = k.1 == "Current" || k.2.contains(why);
    assert!(k_why && a.1.contains(why), "{kind} {name}: messages {:?} should say {why:?}", got.1);
}

async fn gitops_tools_read_each_state_as_nio_means_it(backend: Backend) {
    let env = Env::start(backend).await;
    // new: nothing has looked at it yet. Without the CRDs' status default kstatus would call it Current.
    env.machine("m-roll").label("role", "roll").create().await;
    env.config("rolling", json!({"machineSelector": {"matchLabels": {"role": "roll"}}})).await;
    reads_as(&env, "NixosConfiguration", "rolling", ("InProgress", "Progressing"), "generation").await;
    reads_as(&env, "Machine", "m-roll", ("InProgress", "Progressing"), "").await;

    env.machine("m-pause").label("role", "pause").create().await;
    let paused = json!({"machineSelector": {"matchLabels": {"role": "pause"}}, "rollout": {"pause": true}});
    env.config("paused", paused).await;
    env.machine("m-deg").label("role", "deg").create().await;
    let unreachable =
        json!({"machineSelector": {"matchLabels": {"role": "deg"}}, "gitRepo": "https://127.0.0.1:9/nope.git"});
    env.config("unreachable", unreachable).await;
    env.machine("m-b1").label("role", "budget").create().await;
    env.machine("m-b2").label("role", "budget").create().await;
    let budget = json!({"machineSelector": {"matchLabels": {"role": "budget"}}, "rollout": {"maxParallel": 1, "failureBudget": 0}});
    env.config("budget", budget).await;
    env.machine("m-soak").label("role", "soak").create().await;
    let soak = json!({"machineSelector": {"matchLabels": {"role": "soak"}}, "rollout": {"waves": [{"name": "one", "soak": "1h"}]}});
    env.config("soaking", soak).await;
    env.machine("m-gate").label("role", "gate").create().await;
    let gate = json!({"machineSelector": {"matchLabels": {"role": "gate"}}, "rollout": {"waves": [{"name": "one", "pause": true}]}});
    env.config("gated", gate).await;

    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    let job = |m: &'static str| {
        let env = &env;
        async move {
            env.eventually(T, &format!("a job for {m}"), || async {
                env.job_on(env.subject("dc1", "apply", "prod", m)).await
            })
            .await
            .0
        }
    };
    // progressing: a job queued, no executor has reported yet
    let roll = job("m-roll").await;
    env.eventually(T, "rolling observed", || async {
        let v = raw(&env, "NixosConfiguration", "rolling").await;
        (v["status"]["inProgress"] == json!(1)).then_some(())
    })
    .await;
    reads_as(&env, "NixosConfiguration", "rolling", ("InProgress", "Progressing"), "0/1").await;
    reads_as(&env, "Machine", "m-roll", ("InProgress", "Progressing"), "queued").await;
    // (the controller reconciles each configuration in its own time: wait until it has seen these)
    for name in ["paused", "unreachable"] {
        env.eventually(T, &format!("{name} observed"), || async {
            let v = raw(&env, "NixosConfiguration", name).await;
            (v["status"]["observedGeneration"] == v["metadata"]["generation"]).then_some(())
        })
        .await;
    }
    // paused by its owner: Argo CD's Suspended
    reads_as(&env, "NixosConfiguration", "paused", ("InProgress", "Suspended"), "aused").await;
    // Git unreachable: degraded, and retried by NIO on its own
    reads_as(&env, "NixosConfiguration", "unreachable", ("InProgress", "Degraded"), "GitUnreachable").await;
    // failed: over the failure budget, nothing moves until a new commit or spec
    let b1 = job("m-b1").await;
    env.report(&b1, Phase::Failed, |e| {
        e.category = Some(FailureCategory::BuildFailed);
        e.message = Some("builder for '/nix/store/…-etc.drv' failed".into());
    })
    .await;
    env.eventually(T, "budget exceeded", || async {
        let v = raw(&env, "NixosConfiguration", "budget").await;
        (v["status"]["failed"] == json!(1)).then_some(())
    })
    .await;
    reads_as(&env, "NixosConfiguration", "budget", ("Failed", "Degraded"), "FailureBudgetExceeded").await;
    // waves: one applied and soaking, one applied and waiting for a person
    for (m, name) in [("m-soak", "soaking"), ("m-gate", "gated")] {
        env.report(&job(m).await, Phase::Succeeded, |_| {}).await;
        env.eventually(T, &format!("{name} applied"), || async {
            let v = raw(&env, "NixosConfiguration", name).await;
            (v["status"]["waves"][0]["updated"] == json!(1)).then_some(())
        })
        .await;
    }
    reads_as(&env, "NixosConfiguration", "soaking", ("InProgress", "Progressing"), "Soaking").await;
    reads_as(&env, "NixosConfiguration", "gated", ("InProgress", "Suspended"), "nixos.infra/approve=one@").await;
    reads_as(&env, "Machine", "m-b1", ("Failed", "Degraded"), "BuildFailed").await;
    reads_as(&env, "Machine", "m-b2", ("InProgress", "Progressing"), "Pending").await;
    // done
    env.report(&roll, Phase::Succeeded, |_| {}).await;
    env.eventually(T, "rolling done", || async {
        let v = raw(&env, "NixosConfiguration", "rolling").await;
        (v["status"]["updated"] == json!(1)).then_some(())
    })
    .await;
    reads_as(&env, "NixosConfiguration", "rolling", ("Current", "Healthy"), "1/1").await;
    reads_as(&env, "Machine", "m-roll", ("Current", "Healthy"), "running").await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// `deploy/argocd` is a Kustomize component: added to the kustomization that installs Argo CD, its argocd-cm
/// carries both health checks, byte for byte the scripts the test above runs, next to the settings it had.
#[test]
fn the_argo_cd_component_puts_both_health_checks_into_argocd_cm() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("nio-argocd");
    std::fs::create_dir(&copy).unwrap();
    for f in std::fs::read_dir(repo_file("deploy/argocd")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), copy.join(f.file_name())).unwrap();
    }
    std::fs::write(
        dir.path().join("argocd-cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: argocd-cm}\ndata: {url: https://argocd.example.org}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "namespace: argocd\nresources: [argocd-cm.yaml]\ncomponents: [nio-argocd]\n",
    )
    .unwrap();
    let out = Command::new("kubectl").arg("kustomize").arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cm: Value = serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(cm["metadata"]["namespace"], "argocd");
    assert_eq!(cm["data"]["url"], "https://argocd.example.org", "Argo CD's own settings stay");
    for kind in ["NixosConfiguration", "Machine"] {
        let script = std::fs::read_to_string(repo_file(&format!("deploy/argocd/health-{}.lua", kind.to_lowercase())));
        let key = format!("resource.customizations.health.nixos.infra_{kind}");
        assert_eq!(cm["data"][&key].as_str(), Some(script.unwrap().as_str()), "{key}");
    }
}

const SECRET: &[u8] = b"webhook-secret-0123456789";

fn hmac_hex(body: &[u8], key: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Posts `body` to the webhook as Gitea does (event, delivery id, signature), with `headers` replacing any of
/// those; returns the status code and the JSON answer.
async fn deliver(port: u16, body: &[u8], headers: &[(&str, String)]) -> (u16, Value) {
    try_deliver(port, body, headers).await.unwrap()
}

/// [`deliver`], with a failure to send returned rather than a panic.
async fn try_deliver(port: u16, body: &[u8], headers: &[(&str, String)]) -> Result<(u16, Value), reqwest::Error> {
    let mut h: Vec<(&str, String)> = vec![
        ("x-gitea-event", "push".into()),
        ("x-gitea-delivery", format!("d-{}", rand_id())),
        ("x-gitea-signature", hmac_hex(body, SECRET)),
    ];
    for (k, v) in headers {
        h.retain(|(hk, _)| hk != k);
        if !v.is_empty() {
            h.push((k, v.clone()));
        }
    }
    let mut req = reqwest::Client::new().post(format!("http://127.0.0.1:{port}/hooks/git")).body(body.to_vec());
    for (k, v) in h {
        req = req.header(k, v);
    }
    let resp = req.send().await?;
    let code = resp.status().as_u16();
    Ok((code, resp.json().await.unwrap_or(Value::Null)))
}

fn rand_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// Headers that replace the defaults of [`deliver`] (an empty value removes one).
type Headers<'a> = Vec<(&'a str, String)>;

/// Whether `job` applies `commit`.
fn at(job: &nio_shared::protocol::Job, commit: &str) -> bool {
    job.source.as_ref().is_some_and(|s| s.commit == commit)
}

fn push_body(repo: &str, git_ref: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"ref": git_ref, "after": "0000", "repository": {"clone_url": repo}})).unwrap()
}

/// A Gitea-shaped, signed push to the controller's webhook refreshes the configuration that follows the pushed
/// repository and branch, and its machine gets a job for the new commit at once (pollInterval is an hour).
/// Unsigned, wrongly signed, replayed, oversize, other-repository and other-branch deliveries change nothing:
/// no annotation, no job; each is counted by outcome.
async fn a_signed_push_refreshes_exactly_the_configurations_that_follow_it(backend: Backend) {
    let env = Env::start(backend).await;
    let (hook_port, metrics_port) =
        (nio_loadtest::procs::free_port().unwrap(), nio_loadtest::procs::free_port().unwrap());
    let mut settings = env.settings("prod", "c1");
    settings.webhook =
        Some(nio_controller::webhook::Settings::new(([127, 0, 0, 1], hook_port).into(), SECRET.to_vec()));
    settings.metrics_addr = Some(([127, 0, 0, 1], metrics_port).into());
    let (stop, task) = env.spawn(settings);
    let other = nio_loadtest::gitrepo::GitRepo::create(&env.dir.path().join("other")).unwrap();
    env.machine("m1").create().await;
    env.machine("m2").create().await;
    env.machine("m3").create().await;
    env.config("follows", json!({"machineRef": "m1", "pollInterval": "1h"})).await;
    env.config("other-repo", json!({"machineRef": "m2", "pollInterval": "1h", "gitRepo": other.url()})).await;
    env.config("other-branch", json!({"machineRef": "m3", "pollInterval": "1h", "ref": "refs/heads/main-2"})).await;
    let first = env.repo.head().unwrap();
    let job_for = |m: &'static str| {
        let env = &env;
        async move { env.job_on(env.subject("dc1", "apply", "prod", m)).await.map(|j| j.0) }
    };
    env.eventually(T, "the first jobs", || async { job_for("m1").await.filter(|j| at(j, &first)) }).await;
    env.eventually(T, "the webhook serving", || async {
        let (code, _) = deliver(hook_port, b"{}", &[("x-gitea-event", "ping".into())]).await;
        (code == 200).then_some(())
    })
    .await;
    let annotations = || async {
        let mut out = Vec::new();
        for name in ["follows", "other-repo", "other-branch"] {
            let c = env.configs().get(name).await.unwrap();
            out.push(c.metadata.annotations.unwrap_or_default().get("nixos.infra/refresh").cloned());
        }
        out
    };
    let next = env.repo.bump("pushed").unwrap();
    let body = push_body(&env.repo.url(), "refs/heads/main");

    // Refused or irrelevant deliveries first: none may refresh anything.
    let cases: Vec<(&str, Vec<u8>, Headers, u16)> = vec![
        ("unsigned", body.clone(), vec![("x-gitea-signature", String::new())], 401),
        ("wrong signature", body.clone(), vec![("x-gitea-signature", hmac_hex(&body, b"guessed-secret-value"))], 401),
        ("no delivery id", body.clone(), vec![("x-gitea-delivery", String::new())], 400),
        ("oversize", vec![b' '; 2 << 20], vec![], 413),
        ("other repository", push_body("https://git.example.org/ops/unrelated.git", "refs/heads/main"), vec![], 200),
        ("other branch", push_body(&env.repo.url(), "refs/heads/feature"), vec![], 200),
    ];
    for (name, body, headers, code) in cases {
        // An oversize body is read to its end before the 413 goes out, so the sender reads the answer instead of
        // losing the connection while it still writes.
        let (got, answer) = try_deliver(hook_port, &body, &headers).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, code, "{name}: {answer}");
        if code == 200 {
            assert_eq!(answer["refreshed"], json!([]), "{name}");
        }
    }
    assert_eq!(annotations().await, [None, None, None], "nothing was refreshed");

    // The real push: answered 202 naming the one configuration; its machine gets a job for the new commit.
    let start = std::time::Instant::now();
    let delivery = format!("d-{}", rand_id());
    let (code, answer) = deliver(hook_port, &body, &[("x-gitea-delivery", delivery.clone())]).await;
    assert_eq!((code, &answer["refreshed"]), (202, &json!([format!("{}/follows", env.ns)])), "{answer}");
    env.eventually(Duration::from_secs(5), "a job for the pushed commit", || async {
        job_for("m1").await.filter(|j| at(j, &next))
    })
    .await;
    eprintln!("push delivery to job for the new commit: {:?}", start.elapsed());
    let token = format!("gitea:{delivery}");
    assert_eq!(annotations().await, [Some(token.clone()), None, None]);
    env.eventually(T, "the refresh handled", || async {
        let c = env.configs().get("follows").await.unwrap();
        (c.status?.last_handled_refresh.as_deref() == Some(token.as_str())).then_some(())
    })
    .await;

    // The same delivery again (a replay) changes nothing, not even the object.
    // (A handled delivery would write its own trace context; the controller's status writes go on meanwhile.)
    let trace = || async {
        let c = env.configs().get("follows").await.unwrap();
        c.metadata.annotations.unwrap_or_default().get("nixos.infra/refresh-traceparent").cloned()
    };
    let before = trace().await;
    assert!(before.is_some());
    let (code, answer) = deliver(hook_port, &body, &[("x-gitea-delivery", delivery.clone())]).await;
    assert_eq!((code, &answer["duplicate"]), (200, &json!(true)), "{answer}");
    assert_eq!(trace().await, before);
    for (job, machine) in [(job_for("m2").await, "m2"), (job_for("m3").await, "m3")] {
        assert!(job.is_none_or(|j| !at(&j, &next)), "{machine} got the push");
    }

    let (_, text) = http_get(metrics_port, "/metrics").await.unwrap();
    for (outcome, n) in
        [("unauthorized", 2), ("bad_request", 1), ("too_large", 1), ("no_match", 2), ("refreshed", 1), ("duplicate", 1)]
    {
        let series = format!(
            "nio_controller_webhook_deliveries_total{{cluster=\"prod\",provider=\"gitea\",outcome=\"{outcome}\"}} {n}"
        );
        assert!(
            text.contains(&series),
            "{series} in\n{}",
            text.lines().filter(|l| l.contains("webhook")).collect::<Vec<_>>().join("\n")
        );
    }
    stop.cancel();
    task.await.unwrap().unwrap();
}
