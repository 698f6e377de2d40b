//! A real Kubernetes control plane on loopback: etcd + kube-apiserver, built from their Go modules by
//! `scripts/setup` (see `loadtest/realkube/`), started the way a real cluster runs them: TLS with a private CA,
//! bearer-token authentication, the RBAC authorizer, a service-account token issuer and signing key, the
//! default admission plugins and API priority and fairness. There is no kube-controller-manager: nothing
//! garbage-collects, no namespace controller, no service-account token controller (tokens come from the
//! TokenRequest API, which the apiserver serves itself).
//!
//! Each process has a reaper ([`crate::procs::die_with_us`]) that kills it, and removes the directory, when the
//! owning process exits, however it exits (a test binary never runs destructors of statics; a demo may be `kill -9`ed).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};

use crate::gitserve::TestCa;
use crate::procs::{free_port, tool_path};

/// The admin's bearer token (group `system:masters`), valid only on this loopback control plane.
const ADMIN_USER: &str = "nio-admin";

/// Where a running control plane is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    pub ca_pem: Vec<u8>,
    pub admin_token: String,
    /// The token of [`TESTER`], a user with no permissions but what RBAC objects grant it.
    pub tester_token: String,
}

/// A user without any group beyond `system:authenticated`, for tests of what RBAC grants.
pub const TESTER: &str = "nio-tester";

impl Endpoint {
    /// A kubeconfig for `user` with `token` (the admin's by default), namespace `namespace`.
    pub fn kubeconfig_for(&self, user: &str, token: &str, namespace: &str) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: realkube\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\ncontexts:\n- name: {user}\n  context:\n    cluster: realkube\n    user: {user}\n    namespace: {namespace}\ncurrent-context: {user}\nusers:\n- name: {user}\n  user:\n    token: {token}\npreferences: {{}}\n",
            url = self.url,
        )
    }

    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_for(ADMIN_USER, &self.admin_token, "default")
    }

    /// A kube-rs configuration with `token`.
    pub async fn config_for(&self, token: &str, namespace: &str) -> anyhow::Result<kube::Config> {
        let kc: kube::config::Kubeconfig = serde_saphyr::from_str(&self.kubeconfig_for("user", token, namespace))?;
        Ok(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?)
    }

    /// The admin's kube-rs configuration.
    pub async fn config(&self) -> anyhow::Result<kube::Config> {
        self.config_for(&self.admin_token, "default").await
    }
}

/// A running etcd + kube-apiserver. Stopped (and its directory removed) when dropped, or by their reapers when
/// the process that started it exits.
pub struct RealKube {
    pub endpoint: Endpoint,
    pub dir: PathBuf,
    etcd: Child,
    apiserver: Child,
}

/// Whether kube-apiserver and etcd are installed (by `make setup`).
pub fn installed() -> bool {
    tool_path("kube-apiserver").is_some() && tool_path("etcd").is_some()
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    tool_path(name).with_context(|| {
        format!("{name} is not installed: run `make setup` (it builds kube-apiserver and etcd from Go modules)")
    })
}

/// Starts `bin`, reaped (and `cleanup` removed) when this process ends.
fn spawn(bin: &Path, args: &[String], log: &Path, cleanup: Option<&Path>) -> anyhow::Result<Child> {
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log)?)
        .stderr(std::fs::File::create(log.with_extension("err"))?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    crate::procs::die_with_us(child.id(), cleanup)?;
    Ok(child)
}

/// The errors (klog `E`/`F` lines) a component logged, else its last lines.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path.with_extension("err")).unwrap_or_default();
    let mut lines: Vec<&str> = text.lines().filter(|l| l.starts_with('E') || l.starts_with('F')).collect();
    if lines.is_empty() {
        lines = text.lines().collect();
    }
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl RealKube {
    /// Starts etcd and kube-apiserver in `dir` (created; removed on drop), the apiserver on `port` (0: a free
    /// one), and waits until `/readyz` answers ok. Takes about 5–10 s.
    pub async fn start(dir: &Path, port: u16) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (etcd_bin, api_bin) = (binary("etcd")?, binary("kube-apiserver")?);
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let port = if port == 0 { free_port()? } else { port };
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args: Vec<String> = vec![
            "--name=nio".into(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=nio={peer_url}"),
            "--log-level=warn".into(),
            // Test data: durability across power loss is not what these tests are about.
            "--unsafe-no-fsync".into(),
        ];
        let ca = TestCa::create(dir, "apiserver")?;
        let sa_key = dir.join("sa.key");
        let out = Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
            .arg(&sa_key)
            .output()
            .context("openssl (make setup installs it)")?;
        anyhow::ensure!(out.status.success(), "openssl genpkey: {}", String::from_utf8_lossy(&out.stderr));
        let admin_token = uuid::Uuid::new_v4().simple().to_string();
        let tester_token = uuid::Uuid::new_v4().simple().to_string();
        let tokens = dir.join("tokens.csv");
        std::fs::write(
            &tokens,
            format!("{admin_token},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n{tester_token},{TESTER},{TESTER}\n"),
        )?;
        let api_args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            // No kubernetes.default Service endpoints to keep: nothing in these clusters dials the apiserver
            // through a Service, and its reconciler refuses loopback addresses.
            "--endpoint-reconciler-type=none".into(),
            format!("--secure-port={port}"),
            format!("--tls-cert-file={}", ca.cert_path().display()),
            format!("--tls-private-key-file={}", ca.key_path().display()),
            format!("--token-auth-file={}", tokens.display()),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", sa_key.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--enable-priority-and-fairness=true".into(),
            "--profiling=false".into(),
            "--v=0".into(),
        ];
        // When this process ends however it ends, etcd's reaper also removes `dir`.
        let etcd = spawn(&etcd_bin, &etcd_args, &dir.join("etcd.log"), Some(dir))?;
        let apiserver = match spawn(&api_bin, &api_args, &dir.join("kube-apiserver.log"), None) {
            Ok(c) => c,
            Err(e) => {
                let mut etcd = etcd;
                let _ = etcd.kill();
                let _ = etcd.wait();
                return Err(e);
            }
        };
        let endpoint =
            Endpoint { url: format!("https://127.0.0.1:{port}"), ca_pem: ca.ca_pem.clone(), admin_token, tester_token };
        let mut kube = RealKube { endpoint, dir: dir.to_path_buf(), etcd, apiserver };
        kube.wait_ready().await?;
        Ok(kube)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let kubeconfig = self.dir.join("admin.kubeconfig");
        self.write_kubeconfig(&kubeconfig)?;
        loop {
            if let Some(status) = self.etcd.try_wait()? {
                anyhow::bail!("etcd exited ({status}):\n{}", tail(&self.dir.join("etcd.log")));
            }
            if let Some(status) = self.apiserver.try_wait()? {
                anyhow::bail!("kube-apiserver exited ({status}):\n{}", tail(&self.dir.join("kube-apiserver.log")));
            }
            // kubectl rather than a kube client: the client logs every 500 of a starting server as an error.
            let out = tokio::process::Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["get", "--raw", "/readyz", "--request-timeout=2s"])
                .output()
                .await
                .context("running kubectl")?;
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok" {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "kube-apiserver not ready after 90 s:\n{}",
                tail(&self.dir.join("kube-apiserver.log"))
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An admin client.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(kube::Client::try_from(self.endpoint.config().await?)?)
    }

    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.endpoint.kubeconfig())
    }

    /// Leaves the processes to their reapers (they stop when this process exits).
    pub fn detach(self) -> Endpoint {
        let endpoint = self.endpoint.clone();
        std::mem::forget(self);
        endpoint
    }
}

impl Drop for RealKube {
    fn drop(&mut self) {
        for c in [&mut self.apiserver, &mut self.etcd] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Applies every CustomResourceDefinition in `dir/*.yaml` (server-side) and waits until each is Established.
pub async fn install_crds(client: &kube::Client, dir: &Path) -> anyhow::Result<usize> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for f in crate::kubesim::yaml_files(dir)? {
        let text = std::fs::read_to_string(&f)?;
        let docs: Vec<CustomResourceDefinition> =
            serde_saphyr::from_multiple(&text).with_context(|| format!("parsing {}", f.display()))?;
        for crd in docs {
            let name = crd.metadata.name.clone().context("a CRD without a name")?;
            api.patch(&name, &PatchParams::apply("nio-tests").force(), &Patch::Apply(&crd)).await?;
            names.push(name);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in &names {
        loop {
            let crd = api.get(name).await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "CRD {name} not Established after 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(names.len())
}
