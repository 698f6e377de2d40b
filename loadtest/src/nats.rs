//! A real `nats-server -js` on loopback, started and stopped by tests, the load test and the demo.

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
        let s = NatsServer { child: Some(child), port, store, _dir: None, log };
        s.wait_ready().await?;
        Ok(s)
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

    /// Restarts on the same port with the same JetStream store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        let dir = self.store.parent().map(Path::to_path_buf).unwrap_or_default();
        let fresh = Self::start_in(&dir, self.port).await?;
        let mut fresh = fresh;
        self.child = fresh.child.take();
        Ok(())
    }
}
