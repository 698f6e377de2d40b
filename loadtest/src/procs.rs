//! Child processes of the load test (nio-controller, nio-executor) and their CPU and memory use.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context as _;

/// Where the NIO binaries are: `NIO_BIN_DIR`, else next to this executable (or one level up, for tests).
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(d) = std::env::var("NIO_BIN_DIR") {
        candidates.push(PathBuf::from(d).join(name));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(name));
        if let Some(up) = dir.parent() {
            candidates.push(up.join(name));
        }
    }
    candidates.iter().find(|p| p.exists()).cloned().with_context(|| {
        format!("{name} not found (looked in {candidates:?}); build the workspace first or set NIO_BIN_DIR")
    })
}

/// A supervised child process.
pub struct Proc {
    pub name: String,
    pub child: tokio::process::Child,
    pub log: PathBuf,
    pub metrics_port: u16,
    /// Usage sampled when the process ended (or last sampled).
    pub last: Usage,
    /// We killed or stopped it (an exit is then no crash).
    pub stopped: bool,
}

/// CPU time and peak memory of a process.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub peak_rss_mb: f64,
}

/// Reads /proc/{pid}: user+system CPU seconds and peak RSS.
pub fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(Usage { cpu_seconds: ticks / 100.0, peak_rss_mb: hwm_kb / 1024.0 })
}

/// The value of label `name` on a Prometheus text-format sample line.
pub fn metric_label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split(&format!("{name}=\"")).nth(1)?.split('"').next()
}

/// The value of a Prometheus text-format sample line (0 when it has none).
pub fn metric_value(line: &str) -> f64 {
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// CPU seconds the whole machine has spent busy since boot (/proc/stat: user, nice, system, irq, softirq; not idle,
/// I/O wait or time stolen by the hypervisor): the difference over a phase is what everything in it cost.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<f64> = stat.lines().next()?.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0.0)).collect();
    let busy = [0, 1, 2, 5, 6].iter().map(|&i| ticks.get(i).copied().unwrap_or(0.0)).sum::<f64>();
    Some(busy / 100.0)
}

impl Proc {
    /// Starts `binary` with `args` and `env`, logging to `{dir}/{name}.log`.
    pub fn spawn(
        name: &str,
        binary: &Path,
        args: &[String],
        env: &[(&str, String)],
        dir: &Path,
        metrics_port: u16,
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let mut cmd = tokio::process::Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", binary.display()))?;
        if let Some(pid) = child.id() {
            die_with_us(pid, None)?;
        }
        Ok(Proc { name: name.into(), child, log, metrics_port, last: Usage::default(), stopped: false })
    }

    pub fn sample(&mut self) {
        if let Some(pid) = self.child.id()
            && let Some(u) = usage(pid)
        {
            self.last = u;
        }
    }

    /// Sends SIGKILL (a crash).
    pub async fn kill(&mut self) {
        self.stopped = true;
        self.sample();
        let _ = self.child.kill().await;
    }

    /// Sends SIGTERM and waits up to `grace` for a clean exit.
    pub async fn terminate(&mut self, grace: std::time::Duration) {
        self.stopped = true;
        self.sample();
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }

    /// The process died on its own.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// When the process ended without being killed or stopped: how, with the end of its log.
    pub fn crashed(&mut self) -> Option<String> {
        if self.stopped {
            return None;
        }
        let status = self.exited()?;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        // The error it exited with (main's `Error: ...` and its causes, up to the backtrace), else the last lines.
        let lines: Vec<&str> = log.lines().collect();
        let shown: Vec<&str> = match lines.iter().rposition(|l| l.starts_with("Error: ")) {
            Some(i) => lines[i..].iter().take_while(|l| !l.starts_with("Stack backtrace")).take(12).copied().collect(),
            None => lines.iter().rev().take(8).rev().copied().collect(),
        };
        Some(format!("{} exited ({status}); its log ({}) says:\n{}", self.name, self.log.display(), shown.join("\n")))
    }
}

/// The tools directory `make setup` installs into: `$NIO_TOOLS_DIR/bin`, default `~/.cache/nio-tools/bin`.
pub fn tools_bin_dir() -> PathBuf {
    match std::env::var_os("NIO_TOOLS_DIR") {
        Some(d) => PathBuf::from(d).join("bin"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/nio-tools/bin"),
    }
}

/// A tool installed by `make setup`: from the tools directory, else from `PATH`. None when neither has it.
pub fn tool_path(name: &str) -> Option<PathBuf> {
    let in_tools = tools_bin_dir().join(name);
    if in_tools.is_file() {
        return Some(in_tools);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// A free TCP port on loopback, never one this process was given before: the port is only reserved once the
/// process it is meant for binds it, and two callers in between must not be handed the same one.
pub fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..64 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut given = GIVEN.lock().map_err(|_| anyhow::anyhow!("free_port: lock poisoned"))?;
        if given.insert(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port that was not handed out already")
}

/// OpenSSH's server binary (Debian puts it outside a normal user's PATH).
pub fn sshd_binary() -> &'static str {
    if Path::new("/usr/sbin/sshd").exists() { "/usr/sbin/sshd" } else { "sshd" }
}

/// Makes an ed25519 key pair at `path` (and `path.pub`) with `ssh-keygen`; returns the public key line.
pub fn keygen(path: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(path)
        .output()
        .context("ssh-keygen (install openssh-client: make setup)")?;
    anyhow::ensure!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    Ok(std::fs::read_to_string(path.with_extension("pub"))?.trim().to_string())
}

/// Waits for Ctrl-C, SIGTERM or SIGHUP: how a user or a supervisor asks a foreground command to stop.
pub async fn until_stopped() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (signal(SignalKind::terminate()), signal(SignalKind::hangup())) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = hup.recv() => {}
    }
}

/// `GET path` on a loopback port: (status code, body), or None when nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    c.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).await.ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    Some((status, body))
}

/// Makes process `pid` (a child of ours) end when this process ends, however it ends: `kill_on_drop` covers
/// a clean exit, but not SIGKILL or a panic that aborts. A small detached shell watches both; if we go first it
/// sends the child SIGTERM and, a few seconds later, SIGKILL, then removes `cleanup` (a directory the child
/// wrote); if the child goes first it just exits (so a reused pid is never signalled).
pub fn die_with_us(pid: u32, cleanup: Option<&Path>) -> anyhow::Result<()> {
    let script = r#"(
while kill -0 "$1" 2>/dev/null; do
  kill -0 "$2" 2>/dev/null || exit 0
  sleep 0.5
done
kill "$2" 2>/dev/null || exit 0
sleep 3
kill -9 "$2" 2>/dev/null
[ -z "$3" ] || rm -rf "$3"
) </dev/null >/dev/null 2>&1 &"#;
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("nio-reaper")
        .arg(std::process::id().to_string())
        .arg(pid.to_string())
        .arg(cleanup.unwrap_or(Path::new("")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("starting a reaper")?;
    anyhow::ensure!(status.success(), "starting a reaper: {status}");
    Ok(())
}

/// The objects `kubectl kustomize DIR` builds (a `deploy/` overlay, say), as JSON.
pub fn kustomize(dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = std::process::Command::new("kubectl").arg("kustomize").arg(dir).output().context("running kubectl")?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout)).context("parsing kubectl kustomize's output")
}
