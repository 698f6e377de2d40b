//! Test fixtures: a real OpenSSH `sshd` on loopback with stub NixOS tools, a real Git repository, a real
//! nats-server, and helpers to publish jobs and read status events.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
pub use nio_loadtest::nats::NatsServer;
use nio_loadtest::procs::{free_port, keygen, sshd_binary};
use nio_shared::config::{ExecutorConfig, RemotePaths, SiteLimits};
use nio_shared::protocol::{Action, Endpoint, Job, JobId, StatusEvent};

/// Loopback addresses the sshd listens on; each is a distinct "machine" (distinct lock key).
pub const ADDRESSES: usize = 12;

pub fn addr(i: usize) -> String {
    format!("127.0.0.{}", 2 + i)
}

const STUB_PRELUDE: &str = r#"#!/bin/bash
log="$NIO_STUB_DIR/calls.log"
me=$(basename "$0")
srv=$(echo "$SSH_CONNECTION" | cut -d' ' -f3)
echo "start $(date +%s.%N) $$ $me ${srv:--} $*" >> "$log"
finish() { echo "end $(date +%s.%N) $$ $me ${srv:--} $*" >> "$log"; exit "$1"; }
trap 'finish 129' HUP TERM INT PIPE
"#;

const NIXOS_REBUILD: &str = r#"
case "$1" in
  switch|boot|test|dry-activate)
    if [ "$2" = "--rollback" ]; then
      ln -sfn "$NIO_STUB_DIR/store/prev-system" "$NIO_STUB_DIR/current-system"
      echo "rolled back"; finish 0
    fi
    [ "$2" = "--flake" ] || { echo "nixos-rebuild: expected --flake" >&2; finish 2; }
    flake="$3"; dir="${flake#path:}"; dir="${dir%%#*}"; attr="${flake##*#}"
    [ -f "$dir/flake.nix" ] || { echo "error: path '$dir' does not contain a 'flake.nix'" >&2; finish 1; }
    sleep "$(cat "$NIO_STUB_DIR/rebuild_sleep" 2>/dev/null || echo 0)"
    code=$(cat "$NIO_STUB_DIR/rebuild_exit" 2>/dev/null || echo 0)
    if [ "$code" != 0 ]; then
      echo "building the system configuration..."
      echo "error: builder for '/nix/store/abc-nixos-system-$attr.drv' failed with exit code 1" >&2
      finish "$code"
    fi
    sys="$NIO_STUB_DIR/store/$(printf %s "$flake" | sha1sum | cut -c1-32)-nixos-system-$attr"
    mkdir -p "$sys"
    case "$1" in switch|test) ln -sfn "$sys" "$NIO_STUB_DIR/current-system";; esac
    case "$1" in switch|boot) ln -sfn "$sys" "$NIO_STUB_DIR/system-profile";; esac
    echo "building the system configuration..."
    finish 0;;
  *) echo "nixos-rebuild: unknown action $1" >&2; finish 2;;
esac
"#;

const NIXOS_VERSION: &str = r#"
[ "$1" = "--json" ] && echo '{"nixosVersion":"25.05.20261101.abcdef0","nixpkgsRevision":"abcdef0"}' || echo "25.05.20261101.abcdef0 (Warbler)"
finish 0
"#;

const SYSTEMCTL: &str = r#"
if [ "$1" = "is-system-running" ]; then
  sleep "$(cat "$NIO_STUB_DIR/health_sleep" 2>/dev/null || echo 0)"
  code=$(cat "$NIO_STUB_DIR/health_exit" 2>/dev/null || echo 0)
  [ "$code" = 0 ] && echo running || echo degraded
  finish "$code"
fi
finish 0
"#;

const NIXOS_FACTER: &str = r#"
echo '{"version":1,"system":"x86_64-linux","virtualisation":"kvm","hardware":{"cpu":[{"model_name":"AMD EPYC 7302","units":16}],"disk":[{"unix_device_name":"/dev/vda"}],"network_interface":[{"unix_device_name":"eth0"}],"memory":[{"resources":[{"type":"phys_mem","range":8589934592}]}]}}'
finish 0
"#;

/// OpenSSH sshd on loopback, with stub nixos-rebuild, nixos-version, systemctl and nixos-facter on PATH.
pub struct Sshd {
    child: tokio::process::Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub host_key: String,
}

impl Sshd {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["bin", "identities", "store/prev-system"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::os::unix::fs::symlink(d.join("store/prev-system"), d.join("current-system")).unwrap();
        let host_key = keygen(&d.join("host_key")).unwrap();
        let client = keygen(&d.join("identities/default")).unwrap();
        keygen(&d.join("identities/stranger")).unwrap();
        std::fs::write(d.join("authorized_keys"), format!("{client}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for (name, body) in [
            ("nixos-rebuild", NIXOS_REBUILD),
            ("nixos-version", NIXOS_VERSION),
            ("systemctl", SYSTEMCTL),
            ("nixos-facter", NIXOS_FACTER),
        ] {
            let p = d.join("bin").join(name);
            std::fs::write(&p, format!("{STUB_PRELUDE}{body}")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = free_port().unwrap();
        let listen: String = (0..ADDRESSES).map(|i| format!("ListenAddress {}:{port}\n", addr(i))).collect();
        let config = format!(
            "{listen}ListenAddress 127.0.0.1:{port}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile {d}/sshd.pid\n\
             SetEnv PATH={d}/bin:/usr/local/bin:/usr/bin:/bin NIO_STUB_DIR={d} HOME={d}\nMaxStartups 200:30:400\nMaxSessions 200\nLogLevel ERROR\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let child = tokio::process::Command::new(sshd_binary())
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("sshd (install openssh-server: make setup)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Sshd { child, dir, port, host_key }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Sets a stub behaviour file (rebuild_exit, rebuild_sleep, health_exit, health_sleep).
    pub fn set(&self, name: &str, value: &str) {
        std::fs::write(self.path(name), value).unwrap();
    }

    pub fn remote_paths(&self) -> RemotePaths {
        RemotePaths {
            state_dir: self.path("var-lib-nio").display().to_string(),
            secrets_dir: self.path("run-nio-secrets").display().to_string(),
            current_system: self.path("current-system").display().to_string(),
            booted_system: self.path("booted-system").display().to_string(),
            system_profile: self.path("system-profile").display().to_string(),
        }
    }

    /// Recorded invocations: (program, args, start, end).
    pub fn calls(&self) -> Vec<Call> {
        let text = std::fs::read_to_string(self.path("calls.log")).unwrap_or_default();
        let mut open: Vec<Call> = Vec::new();
        let mut done = Vec::new();
        for line in text.lines() {
            let mut parts = line.splitn(6, ' ');
            let (kind, t, pid, prog, host) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
            );
            let args = parts.next().unwrap_or("").to_string();
            let t: f64 = t.parse().unwrap();
            if kind == "start" {
                open.push(Call { program: prog.into(), host: host.into(), args, pid: pid.into(), start: t, end: None });
            } else if let Some(i) = open.iter().position(|c| c.pid == pid && c.program == prog) {
                let mut c = open.remove(i);
                c.end = Some(t);
                done.push(c);
            }
        }
        done.extend(open);
        done.sort_by(|a, b| a.start.total_cmp(&b.start));
        done
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[derive(Debug, Clone)]
pub struct Call {
    pub program: String,
    /// The address the machine was reached at (sshd's SSH_CONNECTION server address).
    pub host: String,
    pub args: String,
    pub pid: String,
    pub start: f64,
    pub end: Option<f64>,
}

/// Most calls of `program` running at the same time.
pub fn max_concurrency(calls: &[Call], program: &str) -> usize {
    let mut edges: Vec<(f64, i32)> = calls
        .iter()
        .filter(|c| c.program == program)
        .flat_map(|c| [(c.start, 1), (c.end.unwrap_or(f64::MAX), -1)])
        .collect();
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in edges {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

/// A Git repository with an example flake; returns (file:// URL, commit).
pub fn git_repo(dir: &Path) -> (String, String) {
    let repo = nio_loadtest::gitrepo::GitRepo::create(dir).unwrap();
    (repo.url(), repo.head().unwrap())
}

/// Adds `n` more commits to the repository made by [`git_repo`]; returns them oldest first.
pub fn more_commits(dir: &Path, n: usize) -> Vec<String> {
    let repo = nio_loadtest::gitrepo::GitRepo { path: dir.join("repo") };
    (0..n).map(|i| repo.bump(&format!("bump {i}")).unwrap()).collect()
}

pub fn config(sshd: &Sshd, sites: &[(&str, u32)]) -> ExecutorConfig {
    ExecutorConfig {
        sites: sites
            .iter()
            .map(|(n, m)| SiteLimits { name: n.to_string(), max_in_flight: *m, connect_rate: 1000.0, burst: 100 })
            .collect(),
        ack_wait_seconds: 10,
        max_deliver: 3,
        backoff_seconds: vec![1],
        job_timeout_seconds: 120,
        lock_ttl_seconds: 6,
        stream_replicas: 1,
        remote: sshd.remote_paths(),
    }
}

pub fn settings(sshd: &Sshd, nats: &NatsServer, cfg: ExecutorConfig, id: &str) -> nio_executor::Settings {
    nio_executor::Settings {
        nats_url: nats.url(),
        nats_creds: None,
        config: cfg,
        identities_dir: sshd.path("identities"),
        git_credentials_dir: None,
        cache_dir: sshd.path(&format!("cache-{id}")),
        executor_id: id.into(),
        seal_key_file: None,
        metrics_addr: None,
        health_addr: None,
        host_key_policy: nio_executor::ssh::HostKeyPolicy::Tofu,
        kexec_tarball: None,
        connect_timeout: Duration::from_secs(3),
        ssh_keepalive: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(30),
    }
}

/// Runs an executor in this process until the returned token is cancelled.
pub fn spawn_executor(
    s: nio_executor::Settings,
) -> (tokio_util::sync::CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    (
        token,
        tokio::spawn(async move {
            let r = nio_executor::run(s, t).await;
            if let Err(e) = &r {
                eprintln!("executor stopped with an error: {e:#}");
            }
            r
        }),
    )
}

pub fn job(machine: &str, host: &str, port: u16, site: &str, repo: &str, commit: &str) -> Job {
    Job {
        v: 1,
        id: JobId::new("test", "default", machine, &format!("{commit}/1"), Action::Switch),
        cluster: "test".into(),
        namespace: "default".into(),
        machine: machine.into(),
        configuration: Some("web".into()),
        generation: 1,
        site: site.into(),
        endpoint: Endpoint { host: host.into(), port, user: "root".into(), identity: None, host_key: None },
        source: Some(nio_shared::protocol::Source {
            repo: repo.into(),
            commit: commit.into(),
            subdir: None,
            flake_attr: "web".into(),
            credentials: None,
        }),
        action: Action::Switch,
        files: vec![],
        secrets: vec![],
        secrets_hash: None,
        health_check: None,
        rollback: false,
        confirm_timeout_seconds: 30,
        timeout_seconds: 60,
        enqueued_at: chrono::Utc::now(),
    }
}

pub struct Bus {
    pub js: jetstream::Context,
    status: jetstream::consumer::PullConsumer,
    pub seen: Vec<StatusEvent>,
}

impl Bus {
    /// Connects and creates the streams and a status consumer for cluster `test`.
    pub async fn connect(nats: &NatsServer) -> Self {
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        js.get_or_create_stream(nio_shared::nats::jobs_stream(1)).await.unwrap();
        let stream = js.get_or_create_stream(nio_shared::nats::status_stream(1)).await.unwrap();
        let status =
            stream.get_or_create_consumer("controller-test", nio_shared::nats::status_consumer("test")).await.unwrap();
        Bus { js, status, seen: vec![] }
    }

    /// Deletes the status stream (and its consumer): JetStream refuses status events until [`Bus::restore_status`].
    pub async fn drop_status(&self) {
        self.js.delete_stream(nio_shared::subjects::STATUS_STREAM).await.unwrap();
    }

    /// Creates the status stream and the consumer again.
    pub async fn restore_status(&mut self) {
        let stream = self.js.get_or_create_stream(nio_shared::nats::status_stream(1)).await.unwrap();
        self.status =
            stream.get_or_create_consumer("controller-test", nio_shared::nats::status_consumer("test")).await.unwrap();
    }

    pub async fn publish(&self, job: &Job) {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", job.id.as_str());
        self.js.publish_with_headers(job.subject(), h, job.encode().into()).await.unwrap().await.unwrap();
    }

    pub async fn publish_raw(&self, subject: &str, body: &[u8]) {
        self.js.publish(subject.to_string(), body.to_vec().into()).await.unwrap().await.unwrap();
    }

    /// Reads status events until `done` holds for the collected events, or panics after `timeout`.
    pub async fn until(&mut self, timeout: Duration, done: impl Fn(&[StatusEvent]) -> bool) -> Vec<StatusEvent> {
        let deadline = Instant::now() + timeout;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out; events so far: {:#?}",
                self.seen.iter().map(|e| (&e.machine, e.phase, e.step, e.category, &e.message)).collect::<Vec<_>>()
            );
            let mut batch =
                self.status.fetch().max_messages(100).expires(Duration::from_millis(200)).messages().await.unwrap();
            while let Some(Ok(m)) = batch.next().await {
                self.seen.push(StatusEvent::decode(&m.payload).unwrap());
                m.ack().await.unwrap();
            }
        }
        self.seen.clone()
    }

    /// The final event of `machine`, once it arrives.
    pub async fn final_of(&mut self, machine: &str, timeout: Duration) -> StatusEvent {
        let m = machine.to_string();
        let evs = self.until(timeout, |evs| evs.iter().any(|e| e.machine == m && e.phase.is_terminal())).await;
        evs.into_iter().rev().find(|e| e.machine == machine && e.phase.is_terminal()).unwrap()
    }

    /// Waits (up to 5 s) for the stream to drain: executors ack just after reporting the final status.
    pub async fn jobs_drained(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self.jobs_pending().await;
            if n == 0 || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn jobs_pending(&self) -> u64 {
        let mut s = self.js.get_stream(nio_shared::subjects::JOBS_STREAM).await.unwrap();
        s.info().await.unwrap().state.messages
    }
}

/// Runs the real `nio-executor` binary; its stderr (logs at `RUST_LOG=trace`) goes to `log`.
pub fn spawn_binary(
    sshd: &Sshd,
    nats: &NatsServer,
    cfg: &ExecutorConfig,
    id: &str,
    extra: &[&str],
    log: &Path,
) -> tokio::process::Child {
    spawn_binary_logging(sshd, nats, cfg, id, extra, log, "trace")
}

/// [`spawn_binary`] with the given `RUST_LOG`.
pub fn spawn_binary_logging(
    sshd: &Sshd,
    nats: &NatsServer,
    cfg: &ExecutorConfig,
    id: &str,
    extra: &[&str],
    log: &Path,
    rust_log: &str,
) -> tokio::process::Child {
    let cfg_path = sshd.path(&format!("executor-{id}.yaml"));
    std::fs::write(&cfg_path, serde_json::to_string(cfg).unwrap()).unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_nio-executor"))
        .args(["--nats-url", &nats.url(), "--executor-id", id, "--connect-timeout", "3"])
        .arg("--config")
        .arg(&cfg_path)
        .arg("--identities-dir")
        .arg(sshd.path("identities"))
        .arg("--cache-dir")
        .arg(sshd.path(&format!("cache-{id}")))
        .args(extra)
        .env("RUST_LOG", rust_log)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

pub fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
}
