//! Test fixtures: namespaced test hosts with real Nix and real OpenSSH sshd, a real Git repository of fixture
//! systems, a real nats-server, and helpers to publish jobs and read status events.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
pub use nio_loadtest::nats::NatsServer;
use nio_loadtest::procs::keygen;
pub use nio_loadtest::testhost::{HostOptions, SystemRepo, TestHost};
use nio_shared::config::{ExecutorConfig, RemotePaths, SiteLimits};
use nio_shared::protocol::{Action, Endpoint, Job, JobId, StatusEvent};

/// Namespaced test hosts with real Nix and real sshd (`nio_loadtest::testhost`), sharing one identities
/// directory (`default`, authorized everywhere, and `stranger`, authorized nowhere), and a repository of the
/// fixture systems.
pub struct Hosts {
    pub dir: tempfile::TempDir,
    pub hosts: Vec<TestHost>,
    pub repo: SystemRepo,
}

impl Hosts {
    /// `n` hosts (the first `sudo_less` of them without sudo for `deploy`).
    pub fn start(n: usize) -> Hosts {
        let dir = tempfile::tempdir().unwrap();
        let ids = dir.path().join("identities");
        std::fs::create_dir_all(&ids).unwrap();
        keygen(&ids.join("default")).unwrap();
        keygen(&ids.join("stranger")).unwrap();
        let opts = HostOptions { identities: Some(ids), ..Default::default() };
        // Four at a time: each is mostly waiting on ip, nsenter and a small nix build.
        let mut hosts = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(4) {
            std::thread::scope(|s| {
                let started: Vec<_> = chunk.iter().map(|_| s.spawn(|| TestHost::start(&opts))).collect();
                for h in started {
                    hosts.push(h.join().unwrap().expect("test host (needs root, iproute2, nix-bin: make setup)"));
                }
            });
        }
        let repo = SystemRepo::create(dir.path()).unwrap();
        Hosts { dir, hosts, repo }
    }

    pub fn addr(&self, i: usize) -> String {
        self.hosts[i].addr.clone()
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn identities(&self) -> PathBuf {
        self.path("identities")
    }

    /// A new commit of the fixture systems (new store paths), so a job finds nothing applied yet.
    pub fn commit(&self) -> String {
        self.repo.bump().unwrap()
    }
}

/// Most spans running at the same time.
pub fn max_concurrency(spans: &[(f64, f64)]) -> usize {
    let mut edges: Vec<(f64, i32)> = spans.iter().flat_map(|(a, b)| [(*a, 1), (*b, -1)]).collect();
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

pub fn config(sites: &[(&str, u32)]) -> ExecutorConfig {
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
        remote: RemotePaths::default(),
    }
}

pub fn settings(hosts: &Hosts, nats: &NatsServer, cfg: ExecutorConfig, id: &str) -> nio_executor::Settings {
    settings_with(hosts.identities(), hosts.path(&format!("cache-{id}")), nats, cfg, id)
}

/// Executor settings for tests: fast connect timeouts and keepalives (a lost machine is noticed in seconds).
pub fn settings_with(
    identities: PathBuf,
    cache: PathBuf,
    nats: &NatsServer,
    cfg: ExecutorConfig,
    id: &str,
) -> nio_executor::Settings {
    nio_executor::Settings {
        nats_url: nats.url(),
        nats_creds: None,
        config: cfg,
        identities_dir: identities,
        git_credentials_dir: None,
        cache_dir: cache,
        executor_id: id.into(),
        seal_key_file: None,
        metrics_addr: None,
        health_addr: None,
        host_key_policy: nio_executor::ssh::HostKeyPolicy::Tofu,
        kexec_tarball: None,
        connect_timeout: Duration::from_secs(3),
        ssh_keepalive: Duration::from_secs(1),
        ssh_persist: nio_executor::pool::PoolLimits { persist: Duration::from_secs(60), max_idle: 100 },
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

/// A switch of configuration `web` at `commit` on `host`, as root.
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
        budgets: vec![],
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
                let ev = StatusEvent::decode(&m.payload).unwrap();
                // Every event's headers name its phase and action as its body does (the controller acks
                // progress steps by them, without decoding the body).
                let header = |k: &str| m.headers.as_ref().and_then(|h| h.get(k)).map(|v| v.as_str().to_string());
                assert_eq!(header(nio_shared::protocol::PHASE_HEADER).as_deref(), Some(ev.phase.as_str()), "{ev:?}");
                assert_eq!(header(nio_shared::protocol::ACTION_HEADER).as_deref(), Some(ev.action.as_str()), "{ev:?}");
                self.seen.push(ev);
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

    /// Waits (up to 30 s: the broker confirms the settlement first, slowly on a busy machine) until no job holds
    /// the machine at `host:22`: an executor reports a job's outcome, then settles its message, then releases the
    /// machine, so a probe published on the outcome alone may find the machine still held and be skipped.
    pub async fn machine_released(&self, host: &str) {
        let kv = self.js.get_key_value(nio_shared::subjects::LOCKS_BUCKET).await.unwrap();
        let key = nio_shared::subjects::lock_key(host, 22);
        let deadline = Instant::now() + Duration::from_secs(30);
        while kv.get(&key).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "{key} still held 30 s after its job's outcome");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn jobs_pending(&self) -> u64 {
        let mut s = self.js.get_stream(nio_shared::subjects::JOBS_STREAM).await.unwrap();
        s.info().await.unwrap().state.messages
    }
}

/// Runs the real `nio-executor` binary; its stderr (logs at `RUST_LOG=trace`) goes to `log`.
pub fn spawn_binary(
    hosts: &Hosts,
    nats: &NatsServer,
    cfg: &ExecutorConfig,
    id: &str,
    extra: &[&str],
    log: &Path,
) -> tokio::process::Child {
    spawn_binary_logging(hosts, nats, cfg, id, extra, log, "trace")
}

/// [`spawn_binary`] with the given `RUST_LOG`.
pub fn spawn_binary_logging(
    hosts: &Hosts,
    nats: &NatsServer,
    cfg: &ExecutorConfig,
    id: &str,
    extra: &[&str],
    log: &Path,
    rust_log: &str,
) -> tokio::process::Child {
    let cfg_path = hosts.path(&format!("executor-{id}.yaml"));
    std::fs::write(&cfg_path, serde_json::to_string(cfg).unwrap()).unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_nio-executor"))
        .args(["--nats-url", &nats.url(), "--executor-id", id, "--connect-timeout", "3", "--ssh-keepalive", "1"])
        .arg("--config")
        .arg(&cfg_path)
        .arg("--identities-dir")
        .arg(hosts.identities())
        .arg("--cache-dir")
        .arg(hosts.path(&format!("cache-{id}")))
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

/// A kexec tarball shaped like nixos-images' (gzip, entry point `kexec/run`) whose entry point, like the real
/// one, returns at once and has the machine kexec into the installer a moment later (here by asking the test
/// host's power watcher, see `nio_loadtest::testhost`).
pub fn kexec_tarball(dir: &Path) -> PathBuf {
    let run = b"#!/bin/sh\n# stands in for nixos-images' kexec/run: returns now, kexecs into the installer shortly\necho kexec > /run/nio-power\n";
    let mut tb = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut h = tar::Header::new_gnu();
    h.set_size(run.len() as u64);
    h.set_mode(0o755);
    tb.append_data(&mut h, "kexec/run", &run[..]).unwrap();
    let path = dir.join("kexec.tar.gz");
    std::fs::write(&path, tb.into_inner().unwrap().finish().unwrap()).unwrap();
    path
}
