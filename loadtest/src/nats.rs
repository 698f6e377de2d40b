//! A real `nats-server -js` on loopback, started and stopped by tests, the load test and the demo: one server, or
//! a JetStream cluster of several (routes on loopback, one store each).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// A running nats-server with JetStream. Killed when dropped.
pub struct NatsServer {
    child: Option<tokio::process::Child>,
    port: u16,
    store: PathBuf,
    _dir: Option<tempfile::TempDir>,
    log: PathBuf,
    /// Arguments beyond the single-server ones (a cluster member's name and routes), kept for restarts.
    extra: Vec<String>,
}

fn binary() -> String {
    std::env::var("NIO_NATS_SERVER").ok().unwrap_or_else(|| {
        crate::procs::tool_path("nats-server").map_or("nats-server".into(), |p| p.display().to_string())
    })
}

impl NatsServer {
    /// Starts a server with its JetStream store in a fresh temporary directory.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut s = Self::start_in(dir.path(), 0).await?;
        s._dir = Some(dir);
        Ok(s)
    }

    /// Starts a server storing JetStream data under `dir`, on `port` (0: a free one).
    pub async fn start_in(dir: &Path, port: u16) -> anyhow::Result<Self> {
        let s = Self::spawn(dir, port, Vec::new()).await?;
        s.wait_ready().await?;
        Ok(s)
    }

    /// Starts the process and waits until it listens (not until JetStream is ready: a cluster member is not
    /// ready before enough of the others run).
    async fn spawn(dir: &Path, port: u16, extra: Vec<String>) -> anyhow::Result<Self> {
        let store = dir.join("jetstream");
        let ports_dir = dir.join("ports");
        std::fs::create_dir_all(&ports_dir)?;
        let log = dir.join("nats-server.log");
        let port_arg = if port == 0 { "-1".to_string() } else { port.to_string() };
        let mut cmd = tokio::process::Command::new(binary());
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "--sd"])
            .arg(&store)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .arg("-l")
            .arg(&log)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {} (run `make setup` to install it)", binary()))?;
        let pid = child.id().unwrap_or_default();
        crate::procs::die_with_us(pid, None)?;
        let ports_file = ports_dir.join(format!("nats-server_{pid}.ports"));
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&ports_file)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(url) = v["nats"].as_array().and_then(|a| a.first()).and_then(|u| u.as_str())
                && let Some(p) = url.rsplit(':').next().and_then(|p| p.parse::<u16>().ok())
            {
                break p;
            }
            anyhow::ensure!(Instant::now() < deadline, "nats-server did not start; see {}", log.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(NatsServer { child: Some(child), port, store, _dir: None, log, extra })
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = async_nats::connect(self.url()).await {
                let js = async_nats::jetstream::new(c);
                if js.query_account().await.is_ok() {
                    return Ok(());
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "nats-server JetStream not ready; see {}", self.log.display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (SIGKILL: as abrupt as a crash).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Restarts on the same port with the same JetStream store (and, in a cluster, the same name and routes).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        let dir = self.store.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut fresh = Self::spawn(&dir, self.port, self.extra.clone()).await?;
        fresh.wait_ready().await?;
        self.child = fresh.child.take();
        Ok(())
    }

    /// Whether the process runs (it was not killed).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// A JetStream cluster on loopback: `n` servers named `nio-0` … with routes to each other. Clients take
/// [`NatsCluster::urls`] (all members, comma-separated).
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` members storing their data under `dir/node-{i}` and waits until JetStream answers on each.
    pub async fn start_in(dir: &Path, n: usize) -> anyhow::Result<Self> {
        let client: Vec<u16> = (0..n).map(|_| crate::procs::free_port()).collect::<anyhow::Result<_>>()?;
        let routes: Vec<u16> = (0..n).map(|_| crate::procs::free_port()).collect::<anyhow::Result<_>>()?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let others: Vec<String> =
                (0..n).filter(|j| *j != i).map(|j| format!("nats://127.0.0.1:{}", routes[j])).collect();
            let extra = vec![
                "--server_name".into(),
                format!("nio-{i}"),
                "--cluster_name".into(),
                "nio".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{}", routes[i]),
                "--routes".into(),
                others.join(","),
            ];
            nodes.push(NatsServer::spawn(&dir.join(format!("node-{i}")), client[i], extra).await?);
        }
        for node in &nodes {
            node.wait_ready().await?;
        }
        Ok(NatsCluster { nodes })
    }

    /// Every member's URL, comma-separated (what `--nats-url` takes).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }

    /// The member that leads `stream` now, asked of any running member.
    pub async fn stream_leader(&self, stream: &str) -> anyhow::Result<usize> {
        let live: Vec<String> = self.nodes.iter().filter(|n| n.running()).map(NatsServer::url).collect();
        let js = async_nats::jetstream::new(async_nats::connect(live).await?);
        let info = js.get_stream(stream).await?.info().await?.clone();
        let leader = info.cluster.and_then(|c| c.leader).context("the stream has no leader")?;
        let i = leader.strip_prefix("nio-").and_then(|i| i.parse().ok()).context("unknown member name")?;
        Ok(i)
    }
}
