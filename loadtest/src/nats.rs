//! A real `nats-server -js` on loopback, started and stopped by tests, the load test and the demo: one server, or
//! a JetStream cluster of several (routes on loopback, one store each), or a cluster whose members each have a
//! network namespace of their own, so that one can be partitioned from the rest.

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
    /// The address it listens on (127.0.0.1, or its address in its own network namespace).
    host: String,
    /// The network namespace it runs in, if not this one.
    netns: Option<String>,
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
        let s = Self::spawn(dir, ("127.0.0.1", None), port, Vec::new()).await?;
        s.wait_ready().await?;
        Ok(s)
    }

    /// Starts the process and waits until it listens (not until JetStream is ready: a cluster member is not
    /// ready before enough of the others run).
    async fn spawn(dir: &Path, at: (&str, Option<&str>), port: u16, extra: Vec<String>) -> anyhow::Result<Self> {
        let (host, netns) = at;
        let store = dir.join("jetstream");
        let ports_dir = dir.join("ports");
        std::fs::create_dir_all(&ports_dir)?;
        let log = dir.join("nats-server.log");
        let port_arg = if port == 0 { "-1".to_string() } else { port.to_string() };
        let mut cmd = match netns {
            // `ip netns exec` execs the server: the child is the server itself.
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns, &binary()]);
                c
            }
            None => tokio::process::Command::new(binary()),
        };
        cmd.args(["-js", "-a", host, "-p", &port_arg, "--sd"])
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
        Ok(NatsServer {
            child: Some(child),
            port,
            store,
            _dir: None,
            log,
            extra,
            host: host.to_string(),
            netns: netns.map(str::to_string),
        })
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
        format!("nats://{}:{}", self.host, self.port)
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
        let at = (self.host.as_str(), self.netns.as_deref());
        let mut fresh = Self::spawn(&dir, at, self.port, self.extra.clone()).await?;
        fresh.wait_ready().await?;
        self.child = fresh.child.take();
        Ok(())
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: a stall, as a VM paused by its host or a disk that
    /// blocks a write would cause, with every connection left open.
    pub fn freeze(&self, frozen: bool) -> anyhow::Result<()> {
        let pid = self.child.as_ref().and_then(tokio::process::Child::id).context("nats-server is not running")?;
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill").arg(signal).arg(pid.to_string()).status()?;
        anyhow::ensure!(status.success(), "kill {signal} {pid}: {status}");
        Ok(())
    }

    /// The server's CPU time and peak memory so far (None once killed).
    pub fn usage(&self) -> Option<crate::procs::Usage> {
        crate::procs::usage(self.child.as_ref()?.id()?)
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
    net: Option<MemberNet>,
}

impl NatsCluster {
    /// Starts `n` members storing their data under `dir/node-{i}` and waits until JetStream answers on each.
    pub async fn start_in(dir: &Path, n: usize) -> anyhow::Result<Self> {
        let client: Vec<u16> = (0..n).map(|_| crate::procs::free_port()).collect::<anyhow::Result<_>>()?;
        let routes: Vec<u16> = (0..n).map(|_| crate::procs::free_port()).collect::<anyhow::Result<_>>()?;
        let at = vec![("127.0.0.1".to_string(), None); n];
        Self::start_members(dir, &at, &client, &routes, None).await
    }

    /// Like [`NatsCluster::start_in`], but each member in a network namespace of its own on a bridge here (needs
    /// root and iproute2), so that [`NatsCluster::partition`] can cut one off.
    pub async fn start_partitionable(dir: &Path, n: usize) -> anyhow::Result<Self> {
        let net = MemberNet::create(n)?;
        let at: Vec<(String, Option<String>)> = (0..n).map(|i| (net.address(i), Some(net.netns(i)))).collect();
        // Each member has its own addresses: the standard ports everywhere.
        Self::start_members(dir, &at, &vec![4222; n], &vec![6222; n], Some(net)).await
    }

    async fn start_members(
        dir: &Path,
        at: &[(String, Option<String>)],
        client: &[u16],
        routes: &[u16],
        net: Option<MemberNet>,
    ) -> anyhow::Result<Self> {
        let n = at.len();
        let mut nodes = Vec::new();
        for i in 0..n {
            let others: Vec<String> =
                (0..n).filter(|j| *j != i).map(|j| format!("nats://{}:{}", at[j].0, routes[j])).collect();
            let extra = vec![
                "--server_name".into(),
                format!("nio-{i}"),
                "--cluster_name".into(),
                "nio".into(),
                "--cluster".into(),
                format!("nats://{}:{}", at[i].0, routes[i]),
                "--routes".into(),
                others.join(","),
            ];
            let member = (at[i].0.as_str(), at[i].1.as_deref());
            nodes.push(NatsServer::spawn(&dir.join(format!("node-{i}")), member, client[i], extra).await?);
        }
        for node in &nodes {
            node.wait_ready().await?;
        }
        Ok(NatsCluster { nodes, net })
    }

    /// Cuts member `i` off from everyone (clients and the other members), or (`false`) heals the partition: its
    /// link goes down, so packets to and from it are dropped while every connection stays open on both ends
    /// until its pings time out, as in a real partition. Only for a cluster from
    /// [`NatsCluster::start_partitionable`].
    pub fn partition(&self, i: usize, cut: bool) -> anyhow::Result<()> {
        let net = self.net.as_ref().context("this cluster's members share loopback: it cannot be partitioned")?;
        ip(&["link", "set", &net.veth(i), if cut { "down" } else { "up" }])
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

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip").args(args).stdin(Stdio::null()).output().context("running ip")?;
    anyhow::ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// The network of a partitionable cluster: bridge `nio-nb{k}` here with 10.214.k.1/24, and per member a network
/// namespace `nio-nats{k}-{i}` joined to it by a veth pair (`nn{k}x{i}` here), the member at 10.214.k.{i+2}.
/// Removed when dropped (the members are killed first: they are dropped before it).
struct MemberNet {
    k: u32,
    n: usize,
}

impl MemberNet {
    fn create(n: usize) -> anyhow::Result<MemberNet> {
        // Claim a free k: creating the bridge either succeeds or names one in use.
        let k = (1..=250u32)
            .find(|k| ip(&["link", "add", &format!("nio-nb{k}"), "type", "bridge"]).is_ok())
            .context("no free bridge nio-nb1..250 (or no permission to create one: the partition needs root)")?;
        let mut net = MemberNet { k, n: 0 };
        let bridge = format!("nio-nb{k}");
        ip(&["addr", "add", &format!("10.214.{k}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..n {
            let (ns, veth) = (net.netns(i), net.veth(i));
            let _ = ip(&["netns", "del", &ns]);
            ip(&["netns", "add", &ns])?;
            net.n = i + 1;
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["link", "set", &veth, "master", &bridge])?;
            ip(&["link", "set", &veth, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", net.address(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(net)
    }

    fn netns(&self, i: usize) -> String {
        format!("nio-nats{}-{i}", self.k)
    }

    fn veth(&self, i: usize) -> String {
        format!("nn{}x{i}", self.k)
    }

    fn address(&self, i: usize) -> String {
        format!("10.214.{}.{}", self.k, i + 2)
    }
}

impl Drop for MemberNet {
    fn drop(&mut self) {
        for i in 0..self.n {
            let _ = ip(&["link", "del", &self.veth(i)]);
            let _ = ip(&["netns", "del", &self.netns(i)]);
        }
        let _ = ip(&["link", "del", &format!("nio-nb{}", self.k)]);
    }
}
