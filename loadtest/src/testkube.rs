//! One cluster API for tests whose bodies run against both kubesim and a real kube-apiserver.
//!
//! kubesim: a fresh simulated cluster per test. Real: one etcd + kube-apiserver per test binary (started on
//! first use, stopped when the binary exits); each test gets its own namespace, so tests run in parallel
//! without seeing each other's objects. Use [`on_both!`](crate::on_both) to declare a test on both.

use std::sync::OnceLock;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::kubesim::{KubeSim, Options};
use crate::realkube::{Endpoint, RealKube};

/// Which API server a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sim,
    Real,
}

/// A cluster (simulated or real) and a namespace of the test's own.
pub struct TestCluster {
    pub backend: Backend,
    /// The test's namespace (created empty).
    pub namespace: String,
    /// Admin configuration whose default namespace is [`Self::namespace`].
    pub config: kube::Config,
    pub client: kube::Client,
    /// The real control plane, when `backend` is `Real`.
    pub endpoint: Option<Endpoint>,
    sim: Option<KubeSim>,
    /// The bearer token of [`crate::realkube::TESTER`], a user that may do only what RBAC objects grant it.
    pub tester_token: String,
    /// A control plane of the test's own (see [`TestCluster::start_with_crds`]).
    own: Option<(RealKube, tempfile::TempDir)>,
}

/// The test binary's real control plane.
#[derive(Debug, Clone)]
pub struct SharedReal {
    pub endpoint: Endpoint,
    /// A token of the `nio-system/nio-controller` ServiceAccount, which has exactly the permissions that
    /// `deploy/base` grants it.
    pub controller_token: String,
}

static SHARED: OnceLock<Result<SharedReal, String>> = OnceLock::new();

/// The repository's root (the tests run from a checkout).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Applies `deploy/base` as an operator would (`kubectl apply --server-side -k`), then asks the TokenRequest
/// API for a token of the controller's ServiceAccount.
async fn install_nio(kube: &RealKube) -> anyhow::Result<String> {
    let kubeconfig = kube.dir.join("admin.kubeconfig");
    kube.write_kubeconfig(&kubeconfig)?;
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["apply", "--server-side", "--force-conflicts", "-k"])
        .arg(repo_root().join("deploy/base"))
        .output()
        .context("running kubectl")?;
    anyhow::ensure!(out.status.success(), "kubectl apply -k deploy/base: {}", String::from_utf8_lossy(&out.stderr));
    let client = kube.client().await?;
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client, "nio-system");
    let req = k8s_openapi::api::authentication::v1::TokenRequest {
        spec: Some(k8s_openapi::api::authentication::v1::TokenRequestSpec {
            expiration_seconds: Some(4 * 3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let resp: k8s_openapi::api::authentication::v1::TokenRequest =
        sas.create_subresource("token", "nio-controller", &PostParams::default(), &req).await?;
    resp.status.and_then(|s| s.token).context("TokenRequest returned no token")
}

/// The test binary's real control plane, started on first use with the CRDs of `crds/` and `deploy/base`
/// (RBAC, namespace) installed.
pub fn shared_real() -> anyhow::Result<SharedReal> {
    SHARED
        .get_or_init(|| {
            // Started on a runtime of its own: the calling test's runtime ends with the test.
            std::thread::spawn(|| {
                let rt =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
                rt.block_on(async {
                    let dir = std::env::temp_dir().join(format!("nio-realkube-{}", uuid::Uuid::new_v4().simple()));
                    let kube = RealKube::start(&dir, 0).await?;
                    let client = kube.client().await?;
                    let crds = crate::kubesim::default_crds_dir().context("crds/ of the checkout not found")?;
                    crate::realkube::install_crds(&client, &crds).await?;
                    let controller_token = install_nio(&kube).await?;
                    Ok::<_, anyhow::Error>(SharedReal { endpoint: kube.detach(), controller_token })
                })
                .map_err(|e| format!("{e:#}"))
            })
            .join()
            .unwrap_or_else(|_| Err("starting the control plane panicked".into()))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("real kube-apiserver: {e}"))
}

impl TestCluster {
    pub async fn start(backend: Backend) -> anyhow::Result<Self> {
        Self::start_in(backend, None).await
    }

    /// A cluster of its own with the CRDs of `crds` (say, an older version of NIO's) instead of `crds/`. On the
    /// real backend that is a fresh control plane (a few seconds), with admin credentials only.
    pub async fn start_with_crds(backend: Backend, crds: &std::path::Path) -> anyhow::Result<Self> {
        Self::start_in(backend, Some(crds)).await
    }

    async fn start_in(backend: Backend, crds: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let namespace = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let mut own = None;
        let sim_tester = uuid::Uuid::new_v4().simple().to_string();
        let (mut config, endpoint, sim) = match (backend, crds) {
            (Backend::Sim, _) => {
                let mut opts = match crds {
                    Some(dir) => Options { crds_dir: Some(dir.to_path_buf()), ..Default::default() },
                    None => Options::default(),
                };
                let tester = crate::kubesim::auth::User { name: crate::realkube::TESTER.into(), groups: vec![] };
                opts.users.insert(sim_tester.clone(), tester);
                let sim = KubeSim::start(opts).await?;
                (kube::Config::new(sim.url().parse()?), None, Some(sim))
            }
            (Backend::Real, None) => {
                let endpoint = shared_real()?.endpoint;
                (endpoint.config().await?, Some(endpoint), None)
            }
            (Backend::Real, Some(dir)) => {
                let tmp = tempfile::tempdir()?;
                let kube = RealKube::start(&tmp.path().join("realkube"), 0).await?;
                crate::realkube::install_crds(&kube.client().await?, dir).await?;
                let endpoint = kube.endpoint.clone();
                own = Some((kube, tmp));
                (endpoint.config().await?, Some(endpoint), None)
            }
        };
        config.default_namespace = namespace.clone();
        let client = kube::Client::try_from(config.clone())?;
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(namespace.clone()), ..Default::default() },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .context("creating the test namespace")?;
        let tester_token = endpoint.as_ref().map_or(sim_tester, |e| e.tester_token.clone());
        Ok(TestCluster { backend, namespace, config, client, endpoint, sim, tester_token, own })
    }

    /// An admin kubeconfig whose context's namespace is the test's.
    pub fn kubeconfig(&self) -> String {
        match (&self.endpoint, &self.sim) {
            (Some(e), _) => e.kubeconfig_for("nio-admin", &e.admin_token, &self.namespace),
            (None, Some(sim)) => {
                sim.kubeconfig().replace("namespace: default", &format!("namespace: {}", self.namespace))
            }
            (None, None) => String::new(),
        }
    }

    /// What the controller runs with: on the real apiserver the `nio-controller` ServiceAccount's token,
    /// bound only by `deploy/base`'s RBAC (so a permission missing there fails the test); on kubesim, admin.
    pub async fn controller_config(&self) -> anyhow::Result<kube::Config> {
        match (&self.endpoint, &self.own) {
            (Some(e), None) => e.config_for(&shared_real()?.controller_token, &self.namespace).await,
            _ => Ok(self.config.clone()),
        }
    }

    /// A client acting as [`crate::realkube::TESTER`] (bearer token; default namespace the test's).
    pub fn tester_client(&self) -> anyhow::Result<kube::Client> {
        Ok(kube::Client::try_from(self.tester_config())?)
    }

    /// The configuration of [`Self::tester_client`]: a user with no permissions but what RBAC objects grant it.
    pub fn tester_config(&self) -> kube::Config {
        let mut config = self.config.clone();
        config.auth_info =
            kube::config::AuthInfo { token: Some(self.tester_token.clone().into()), ..Default::default() };
        config
    }

    /// The namespace the controller's leader-election Lease lives in (`deploy/base` grants Leases only in
    /// `nio-system`).
    pub fn lease_namespace(&self) -> &str {
        match (self.backend, &self.own) {
            (Backend::Real, None) => "nio-system",
            _ => &self.namespace,
        }
    }

    /// The simulator, when `backend` is `Sim`.
    pub fn sim(&self) -> Option<&KubeSim> {
        self.sim.as_ref()
    }

    /// A namespaced API in the test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

/// Declares, for each `async fn name(backend: Backend)`, a module `name` with two tests: `kubesim` and
/// `real_apiserver`, so `cargo test name::` runs both and a divergence shows as one of them failing.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn kubesim() {
                    super::$name($crate::testkube::Backend::Sim).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn real_apiserver() {
                    super::$name($crate::testkube::Backend::Real).await
                }
            }
        )*
    };
}
