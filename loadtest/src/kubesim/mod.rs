//! A Kubernetes API simulator: enough of the API server for kube-rs controllers and `kubectl`, in memory.
//!
//! Each [`KubeSim`] is an independent cluster on its own loopback port; several can run in one process.
//! It serves discovery, OpenAPI v3, CRUD, list/watch with resourceVersion semantics and bookmarks, merge/JSON/
//! server-side-apply patches with field ownership, the status subresource, finalizers, schema defaulting and
//! validation for CRDs, Table output, and dry runs.

pub mod auth;
mod cel;
mod cel_cost;
mod fields;
mod http;
mod openapi;
mod openapi_v2;
pub mod protobuf;
mod registry;
mod schema;
mod selector;
mod store;
mod table;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

pub use fields::Scope;
pub use registry::ResourceType;
pub use store::{ApiError, PatchKind, Store, WriteOpts};

/// How to start a simulated cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// Cluster name (used in the kubeconfig).
    pub name: String,
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Directory of CRD YAML files registered at start.
    pub crds_dir: Option<PathBuf>,
    /// Watch events kept for resuming watches; older resourceVersions get 410 Gone (as after etcd compacts).
    /// Bounded: each event holds the object as it was, so history is most of the simulator's memory.
    pub history: usize,
    /// Interval between watch bookmarks for watches that ask for them.
    pub bookmark_interval: Duration,
    /// Bearer tokens and the users they stand for (authorized by the RBAC objects stored in the cluster;
    /// `system:masters` may do anything). Requests without a token act as the admin.
    pub users: auth::Tokens,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            name: "kubesim".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            crds_dir: default_crds_dir(),
            history: 50_000,
            bookmark_interval: Duration::from_secs(5),
            users: [(
                "kubesim".to_string(),
                auth::User { name: "kubesim-admin".into(), groups: vec!["system:masters".into()] },
            )]
            .into(),
        }
    }
}

/// `crds/` of the repository, when running from a checkout.
pub fn default_crds_dir() -> Option<PathBuf> {
    let candidates = [PathBuf::from("crds"), Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")];
    candidates.into_iter().find(|p| p.join("machine.yaml").exists())
}

/// A running simulated cluster. Stops when dropped.
pub struct KubeSim {
    addr: SocketAddr,
    name: String,
    sim: Arc<http::Sim>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl KubeSim {
    /// Starts a cluster on `opts.listen` and registers the CRDs from `opts.crds_dir`.
    pub async fn start(opts: Options) -> anyhow::Result<Self> {
        let listener =
            tokio::net::TcpListener::bind(opts.listen).await.with_context(|| format!("binding {}", opts.listen))?;
        let addr = listener.local_addr()?;
        let sim = Arc::new(http::Sim {
            store: Store::new(opts.history),
            bookmark_interval: opts.bookmark_interval,
            server_address: addr.to_string(),
            tokens: opts.users.clone(),
        });
        if let Some(dir) = &opts.crds_dir {
            load_crds(&sim.store, dir)?;
        }
        let app = axum::Router::new().fallback(http::handle).with_state(sim.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(KubeSim { addr, name: opts.name, sim, shutdown: Some(tx) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Direct access to the store (for invariant checks and benchmarks).
    pub fn store(&self) -> &Store {
        &self.sim.store
    }

    /// A kubeconfig pointing at this cluster.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {n}\n  cluster:\n    server: {u}\ncontexts:\n- name: {n}\n  context:\n    cluster: {n}\n    user: {n}\n    namespace: default\ncurrent-context: {n}\nusers:\n- name: {n}\n  user:\n    token: kubesim\npreferences: {{}}\n",
            n = self.name,
            u = self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// A kube-rs client for this cluster.
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        let config = kube::Config::new(self.url().parse()?);
        Ok(kube::Client::try_from(config)?)
    }
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// `dir/*.yaml` and `dir/*.yml`, sorted.
pub fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Registers every CRD in `dir/*.yaml`.
pub fn load_crds(store: &Store, dir: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    for f in yaml_files(dir)? {
        let text = std::fs::read_to_string(&f)?;
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).with_context(|| format!("parsing {}", f.display()))?;
        for doc in
            docs.into_iter().filter(|d| d.get("kind").and_then(Value::as_str) == Some("CustomResourceDefinition"))
        {
            store.register_crd(doc).map_err(|e| anyhow::anyhow!("{}: {}", f.display(), e.message))?;
            n += 1;
        }
    }
    Ok(n)
}
