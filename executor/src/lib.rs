//! nio-executor: takes jobs from NATS JetStream, applies them to NixOS machines over SSH, reports status.
//!
//! - [`worker`]: site consumers and the life of a job (where the per-site limit and retries live).
//! - [`lock`]: per-machine locks; [`limits`]: per-site connect rate.
//! - [`ssh`]: russh client with pinned host keys; [`remote`]: the remote command surface.
//! - [`source`]: Git mirror cache and tar export; [`actions`]: update, install, remove, probe, scan.
#![forbid(unsafe_code)]

pub mod actions;
pub mod error;
pub mod host;
pub mod limits;
pub mod lock;
pub mod metrics;
pub mod pool;
pub mod source;
pub mod ssh;
pub mod update;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use nio_shared::config::ExecutorConfig;
use tokio_util::sync::CancellationToken;

/// Everything `run` needs; the binary fills it from flags and environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub nats_url: String,
    pub nats_creds: Option<PathBuf>,
    pub config: ExecutorConfig,
    pub identities_dir: PathBuf,
    pub git_credentials_dir: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub executor_id: String,
    pub seal_key_file: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    /// Separate address for /healthz and /readyz (they are also served on the metrics address).
    pub health_addr: Option<SocketAddr>,
    pub host_key_policy: ssh::HostKeyPolicy,
    pub kexec_tarball: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Interval of SSH keepalives (three missed end the connection).
    pub ssh_keepalive: Duration,
    /// Idle connections kept for the machines' next jobs ([`pool`]).
    pub ssh_persist: pool::PoolLimits,
    pub shutdown_grace: Duration,
}

/// Connects to NATS, sets up consumers and runs until `shutdown` is cancelled.
pub async fn run(s: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    // The probes first: an executor waiting for NATS is alive (its liveness probe must not restart it) and its
    // /readyz says what it waits for.
    let metrics = Arc::new(metrics::Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let (m, r) = (metrics.clone(), ready.clone());
    let probes = nio_shared::http::Probes::new(
        "connecting to NATS",
        move || m.encode(),
        move || {
            let ok = r.load(std::sync::atomic::Ordering::SeqCst);
            (ok, if ok { "ready" } else { "not ready" }.to_string())
        },
    );
    let startup = probes.startup.clone();
    nio_shared::http::serve(s.metrics_addr, s.health_addr, probes).await?;
    // A NATS member that is still starting (or busy electing leaders) must not make the process exit: the JetStream
    // requests below retry for five minutes.
    let mut opts = nio_shared::nats::connect_options(format!("nio-executor {}", s.executor_id));
    if let Some(c) = &s.nats_creds {
        opts = opts.credentials_file(c).await.with_context(|| format!("reading NATS credentials {}", c.display()))?;
    }
    let client = opts
        .connect(nio_shared::nats::servers(&s.nats_url))
        .await
        .with_context(|| format!("connecting to NATS at {}", s.nats_url))?;
    let js = async_nats::jetstream::new(client);
    let consumers = worker::ensure_consumers(&js, &s.config).await?;
    // This process, as lock holder and in heartbeats: the executor id plus a per-process suffix, so a restarted
    // executor with the same id does not mistake its predecessor's locks for its own.
    let holder: String = format!("{}-{:08x}", s.executor_id, rand::random::<u32>())
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_=".contains(c) { c } else { '_' })
        .collect();
    // Beats until this function returns (not at shutdown: jobs finishing in the grace period keep their locks).
    let beat_stop = CancellationToken::new();
    let _beating = beat_stop.clone().drop_guard();
    let heartbeats = lock::Heartbeats::start(&js, holder.clone(), s.config.stream_replicas, beat_stop).await?;
    let locks = lock::Locks::open(
        &js,
        holder.clone(),
        Duration::from_secs(s.config.lock_ttl_seconds),
        s.config.stream_replicas,
    )
    .await?;
    let budgets = lock::Locks::open_budgets(
        &js,
        holder,
        Duration::from_secs(s.config.lock_ttl_seconds),
        s.config.stream_replicas,
    )
    .await?;
    let seal = s.seal_key_file.as_deref().map(nio_shared::seal::SealKey::from_file).transpose()?;
    let kexec_tarball = match &s.kexec_tarball {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading kexec tarball {}", p.display()))?),
        None => None,
    };
    let exec = Arc::new(worker::Executor {
        js,
        limits: limits::ConnectLimits::new(&s.config.sites),
        cmds: host::Commands { paths: s.config.remote.clone() },
        cfg: s.config.clone(),
        id: s.executor_id.clone(),
        locks,
        budgets,
        heartbeats,
        identities: ssh::Identities::new(s.identities_dir.clone()),
        sources: source::SourceCache::new(
            s.cache_dir.clone(),
            source::GitCredentials::new(s.git_credentials_dir.clone()),
        ),
        seal,
        connect: ssh::ConnectOptions {
            connect_timeout: s.connect_timeout,
            keepalive: s.ssh_keepalive,
            policy: s.host_key_policy,
        },
        metrics,
        kexec_tarball,
        ready,
        pool: pool::Pool::new(s.ssh_persist),
    });
    startup.done();
    tracing::info!(id = %s.executor_id, sites = ?s.config.sites.iter().map(|x| &x.name).collect::<Vec<_>>(), "executor ready");
    let sweep_stop = CancellationToken::new();
    let sweeping = tokio::spawn({
        let (exec, stop) = (exec.clone(), sweep_stop.clone());
        async move { exec.sweep_kept(stop).await }
    });
    let ran = exec.run(consumers, shutdown, s.shutdown_grace).await;
    sweep_stop.cancel();
    if let Err(e) = sweeping.await {
        tracing::warn!(error = %e, "closing the kept SSH connections failed");
    }
    ran?;
    Ok(())
}
