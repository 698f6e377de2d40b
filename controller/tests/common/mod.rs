//! Fixtures: the Kubernetes API simulator, a real nats-server, a real Git repository, and helpers that play
//! the executor's part (take jobs, publish status events).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use kube::api::{Api, PostParams};
use nio_loadtest::gitrepo::GitRepo;
use nio_loadtest::nats::NatsServer;
pub use nio_loadtest::testkube::Backend;
pub use nio_loadtest::testkube::TestCluster;
use nio_shared::crd::{Machine, NixosConfiguration};
use nio_shared::protocol::{Job, Phase, StatusEvent};
use serde_json::json;

pub struct Env {
    /// kubesim or the real apiserver; the test's objects live in `ns`, its own namespace.
    pub kube: TestCluster,
    pub client: kube::Client,
    pub ns: String,
    /// What the controller connects with (on the real apiserver: the ServiceAccount of `deploy/base`).
    pub controller_config: kube::Config,
    pub nats: NatsServer,
    pub js: jetstream::Context,
    pub dir: tempfile::TempDir,
    pub repo: GitRepo,
    pub key_file: std::path::PathBuf,
}

/// Logging and OpenTelemetry context for the in-process controller, as the binary sets them up.
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(guard) = nio_shared::telemetry::init_with_filter(
            "nio-controller-test",
            nio_shared::telemetry::LogFormat::Human,
            &[],
            "warn",
        ) {
            // Lives for the whole test process.
            std::mem::forget(guard);
        }
    });
}

impl Env {
    pub async fn start(backend: Backend) -> Self {
        init_logs();
        let nats = NatsServer::start().await.unwrap();
        Self::with_nats(backend, nats).await
    }

    pub async fn with_nats(backend: Backend, nats: NatsServer) -> Self {
        Self::with_cluster(TestCluster::start(backend).await.unwrap(), nats).await
    }

    pub async fn with_cluster(kube: TestCluster, nats: NatsServer) -> Self {
        let client = kube.client.clone();
        let ns = kube.namespace.clone();
        let controller_config = kube.controller_config().await.unwrap();
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let dir = tempfile::tempdir().unwrap();
        let repo = GitRepo::create(dir.path()).unwrap();
        let key_file = dir.path().join("seal.key");
        std::fs::write(&key_file, nio_shared::seal::SealKey::generate()).unwrap();
        Env { kube, client, ns, controller_config, nats, js, dir, repo, key_file }
    }

    /// Grants the test's RBAC-bound user ([`TestCluster::tester_config`]) `rules` in the test's namespace (a
    /// Role and its binding, created or replaced), and waits until the apiserver applies them.
    pub async fn grant_tester(&self, rules: serde_json::Value) {
        use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
        let name = "nio-controller-under-test";
        let role: Role =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "rules": rules})).unwrap();
        let binding: RoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": nio_loadtest::realkube::TESTER}]
        }))
        .unwrap();
        let ssa = kube::api::PatchParams::apply("nio-tests").force();
        self.kube.api::<Role>().patch(name, &ssa, &kube::api::Patch::Apply(&role)).await.unwrap();
        self.kube.api::<RoleBinding>().patch(name, &ssa, &kube::api::Patch::Apply(&binding)).await.unwrap();
        // RBAC changes reach a real apiserver's authorizer a moment later: wait until a review of each rule's
        // verbs gives what the rules say (kubesim authorizes from its store: at once)
        if self.kube.sim().is_some() {
            return;
        }
        let tester = self.kube.tester_client().unwrap();
        let rules = role.rules.unwrap_or_default();
        self.eventually(Duration::from_secs(30), "the Role in force", || async {
            for r in &rules {
                let group = r.api_groups.as_ref()?.first()?.clone();
                for resource in r.resources.as_ref()? {
                    let (res, sub) = resource.split_once('/').map_or((resource.as_str(), None), |(a, b)| (a, Some(b)));
                    for verb in ["get", "list", "watch", "patch", "update", "create"] {
                        let want = r.verbs.iter().any(|v| v == verb);
                        if allowed(&tester, &self.ns, &group, res, sub, verb).await? != want {
                            return None;
                        }
                    }
                }
            }
            Some(())
        })
        .await;
    }

    pub fn settings(&self, cluster: &str, identity: &str) -> nio_controller::Settings {
        nio_controller::Settings {
            cluster: cluster.into(),
            nats_url: self.nats.url(),
            nats_creds: None,
            namespaces: vec![self.ns.clone()],
            seal_key_file: Some(self.key_file.clone()),
            metrics_addr: None,
            health_addr: None,
            leader_election: false,
            lease_name: self.lease_name(),
            lease_namespace: self.kube.lease_namespace().into(),
            lease_duration: Duration::from_secs(3),
            identity: identity.into(),
            probe_interval: Duration::from_secs(3600),
            default_poll_interval: Duration::from_secs(300),
            machine_success_events: false,
            jobs_replicas: 1,
            cache_dir: self.dir.path().join(format!("cache-{identity}")),
            kube_config: Some(self.controller_config.clone()),
            webhook: None,
            prometheus_url: None,
        }
    }

    pub fn spawn(
        &self,
        s: nio_controller::Settings,
    ) -> (tokio_util::sync::CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let token = tokio_util::sync::CancellationToken::new();
        let t = token.clone();
        (
            token,
            tokio::spawn(async move {
                let r = nio_controller::run(s, t).await;
                if let Err(e) = &r {
                    eprintln!("controller stopped: {e:#}");
                }
                r
            }),
        )
    }

    /// A Machine to create: `env.machine("m1").label("role", "web").create().await` (site dc1 unless `.site(..)`).
    pub fn machine(&self, name: &str) -> MachineBuilder<'_> {
        MachineBuilder { env: self, name: name.into(), site: "dc1".into(), labels: serde_json::Map::new() }
    }

    pub async fn config(&self, name: &str, spec: serde_json::Value) -> NixosConfiguration {
        let mut full = json!({"gitRepo": self.repo.url(), "ref": "main", "flake": "#web", "pollInterval": "5s"});
        for (k, v) in spec.as_object().unwrap() {
            full[k] = v.clone();
        }
        // `null` removes a default (e.g. pollInterval, to use the controller's --default-poll-interval).
        full.as_object_mut().unwrap().retain(|_, v| !v.is_null());
        let c: NixosConfiguration = serde_json::from_value(json!({
            "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration",
            "metadata": {"name": name}, "spec": full
        }))
        .unwrap();
        self.configs().create(&PostParams::default(), &c).await.unwrap()
    }

    pub fn machines(&self) -> Api<Machine> {
        self.kube.api()
    }

    pub fn configs(&self) -> Api<NixosConfiguration> {
        self.kube.api()
    }

    /// The reasons of the Events recorded in the test's namespace so far.
    pub async fn event_reasons(&self) -> Vec<String> {
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(self.client.clone(), &self.ns);
        let list = events.list(&kube::api::ListParams::default()).await.unwrap();
        list.items.into_iter().filter_map(|e| e.reason).collect()
    }

    /// Waits until configuration `name` is Degraded; its (reason, message).
    pub async fn degraded(&self, name: &str) -> (String, String) {
        self.eventually(Duration::from_secs(20), "Degraded", || async {
            let c = self.configs().get(name).await.ok()?.status?.conditions;
            let d = c.into_iter().find(|c| c.type_ == "Degraded" && c.status == "True")?;
            Some((d.reason, d.message))
        })
        .await
    }

    /// Machines m1 and m2 (site dc1, role=web) and configuration `fleet` selecting role=web, plus `extra` spec
    /// fields; returns the two apply jobs once both are queued.
    pub async fn web_fleet_of_two(&self, extra: serde_json::Value) -> [Job; 2] {
        self.machine("m1").label("role", "web").create().await;
        self.machine("m2").label("role", "web").create().await;
        let mut spec = json!({"machineSelector": {"matchLabels": {"role": "web"}}});
        for (k, v) in extra.as_object().into_iter().flatten() {
            spec[k] = v.clone();
        }
        self.config("fleet", spec).await;
        self.eventually(Duration::from_secs(20), "two jobs", || async {
            let a = self.job_on(self.subject("dc1", "apply", "prod", "m1")).await?;
            let b = self.job_on(self.subject("dc1", "apply", "prod", "m2")).await?;
            Some([a.0, b.0])
        })
        .await
    }

    /// The leader-election Lease of this test's controllers (one per test: tests share a real apiserver).
    pub fn lease_name(&self) -> String {
        format!("nio-controller-{}", self.ns)
    }

    pub fn leases(&self) -> Api<k8s_openapi::api::coordination::v1::Lease> {
        Api::namespaced(self.client.clone(), self.kube.lease_namespace())
    }

    /// The subject of `machine`'s job of `kind` (`apply`, `probe`) published by `cluster`.
    pub fn subject(&self, site: &str, kind: &str, cluster: &str, machine: &str) -> String {
        format!("nio.jobs.{site}.{kind}.{cluster}.{}.{machine}", nio_shared::subjects::token(&self.ns))
    }

    /// Waits until `f` returns Some, polling every 100 ms.
    pub async fn eventually<T, F, Fut>(&self, timeout: Duration, what: &str, f: F) -> T
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asserts that `f` returns None for all of `period` (it proves a negative, so it has to wait), polling every
    /// 100 ms and failing as soon as `what` happens.
    pub async fn never<T: std::fmt::Debug, F, Fut>(&self, period: Duration, what: &str, f: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let end = Instant::now() + period;
        while Instant::now() < end {
            if let Some(v) = f().await {
                panic!("{what}: {v:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The job stored on `subject`, if any (without consuming it).
    pub async fn job_on(&self, subject: impl AsRef<str>) -> Option<(Job, async_nats::HeaderMap)> {
        let subject = subject.as_ref();
        let stream = self.js.get_stream(nio_shared::subjects::JOBS_STREAM).await.ok()?;
        let m = stream.get_last_raw_message_by_subject(subject).await.ok()?;
        Some((Job::decode(&m.payload).unwrap(), m.headers))
    }

    /// Removes every stored job (as executors would by taking them).
    pub async fn drain_jobs(&self) -> Vec<Job> {
        // Before the controller has created the stream there is nothing to drain.
        let Ok(stream) = self.js.get_stream(nio_shared::subjects::JOBS_STREAM).await else { return vec![] };
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                "test-executor",
                jetstream::consumer::pull::Config { durable_name: Some("test-executor".into()), ..Default::default() },
            )
            .await
            .unwrap();
        let mut out = vec![];
        let mut batch = consumer.fetch().max_messages(1000).messages().await.unwrap();
        while let Some(Ok(m)) = batch.next().await {
            out.push(Job::decode(&m.payload).unwrap());
            m.ack().await.unwrap();
        }
        out
    }

    /// The reasons of the Events recorded about object `name` in the test's namespace.
    pub async fn events_for(&self, name: &str) -> Vec<String> {
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(self.client.clone(), &self.ns);
        let list = events.list(&Default::default()).await.unwrap().items;
        list.into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter_map(|e| e.reason)
            .collect()
    }

    pub async fn stored_jobs(&self) -> u64 {
        let mut s = self.js.get_stream(nio_shared::subjects::JOBS_STREAM).await.unwrap();
        s.info().await.unwrap().state.messages
    }

    /// Publishes a status event as an executor would.
    pub async fn report(&self, job: &Job, phase: Phase, tweak: impl FnOnce(&mut StatusEvent)) {
        let mut ev = StatusEvent {
            v: 1,
            job_id: job.id.clone(),
            cluster: job.cluster.clone(),
            namespace: job.namespace.clone(),
            machine: job.machine.clone(),
            configuration: job.configuration.clone(),
            generation: job.generation,
            action: job.action,
            phase,
            step: None,
            category: None,
            commit: job.source.as_ref().map(|s| s.commit.clone()),
            system: Some("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-web".into()),
            booted_system: None,
            boot_id: None,
            host_key: None,
            nixos_version: Some("25.05".into()),
            facts: None,
            message: None,
            log_tail: vec![],
            executor: "test-executor".into(),
            started_at: chrono::Utc::now(),
            at: chrono::Utc::now(),
        };
        tweak(&mut ev);
        // As the executor sends it: the headers name the phase and action.
        let mut headers = async_nats::HeaderMap::new();
        ev.describe(&mut headers);
        self.js.publish_with_headers(ev.subject(), headers, ev.encode().into()).await.unwrap().await.unwrap();
    }
}

#[allow(unused_imports)] // not every test binary uses it
pub use nio_loadtest::procs::http_get;

/// A Machine being described for a test; [`MachineBuilder::create`] stores it.
pub struct MachineBuilder<'a> {
    env: &'a Env,
    name: String,
    site: String,
    labels: serde_json::Map<String, serde_json::Value>,
}

impl MachineBuilder<'_> {
    pub fn site(mut self, site: &str) -> Self {
        self.site = site.into();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), json!(value));
        self
    }

    pub async fn create(self) -> Machine {
        let m: Machine = serde_json::from_value(json!({
            "apiVersion": "nixos.infra/v1alpha1", "kind": "Machine",
            "metadata": {"name": self.name, "labels": self.labels},
            "spec": {"hostname": format!("{}.example.org", self.name), "ipAddress": "127.0.0.9", "site": self.site}
        }))
        .unwrap();
        self.env.machines().create(&PostParams::default(), &m).await.unwrap()
    }
}

/// Whether `client`'s user may `verb` the `resource` (subresource `sub`) of `group` in `ns`: a
/// SelfSubjectAccessReview, as `kubectl auth can-i` asks.
async fn allowed(
    client: &kube::Client,
    ns: &str,
    group: &str,
    resource: &str,
    sub: Option<&str>,
    verb: &str,
) -> Option<bool> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ns.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource: sub.map(str::to_string),
                verb: Some(verb.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    Some(api.create(&PostParams::default(), &review).await.ok()?.status?.allowed)
}
