//! nio-executor: applies jobs from NATS JetStream to NixOS machines over SSH.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use nio_executor::ssh::HostKeyPolicy;
use nio_shared::telemetry::LogFormat;

#[derive(Parser, Debug)]
#[command(version, about = "NIO executor: applies rebuild jobs to machines over SSH")]
struct Cli {
    /// NATS server URL, or the URLs of a cluster's servers separated by commas.
    #[arg(long, env = "NIO_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file.
    #[arg(long, env = "NIO_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// Site configuration (YAML): sites with maxInFlight, connectRate, burst; queue defaults.
    #[arg(long, env = "NIO_EXECUTOR_CONFIG")]
    config: PathBuf,
    /// Directory of SSH private keys, one file per identity name (Machine spec.credentialRef; `default` otherwise).
    #[arg(long, env = "NIO_IDENTITIES_DIR")]
    identities_dir: PathBuf,
    /// Directory of Git credentials by credentialsRef name: {name}/token, username, password, ssh-privatekey,
    /// known_hosts, ca.crt (a Secret mounted as a directory).
    #[arg(long, env = "NIO_GIT_CREDENTIALS_DIR")]
    git_credentials_dir: Option<PathBuf>,
    /// Cache directory (Git mirrors).
    #[arg(long, env = "NIO_CACHE_DIR", default_value = "/var/cache/nio-executor")]
    cache_dir: PathBuf,
    /// Executor id reported in status (default: host name).
    #[arg(long, env = "NIO_EXECUTOR_ID")]
    executor_id: Option<String>,
    /// Key shared with the controllers for sealed secrets.
    #[arg(long, env = "NIO_SEAL_KEY_FILE")]
    seal_key_file: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "NIO_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Address for /healthz and /readyz only (default: served on the metrics address).
    #[arg(long, env = "NIO_HEALTH_ADDR")]
    health_addr: Option<SocketAddr>,
    /// What to do when a machine has no pinned host key.
    #[arg(long, env = "NIO_HOST_KEY_POLICY", value_enum, default_value = "tofu")]
    host_key_policy: HostKeyPolicy,
    /// kexec installer tarball (nixos-images) used by full installs.
    #[arg(long, env = "NIO_KEXEC_TARBALL")]
    kexec_tarball: Option<PathBuf>,
    /// SSH connect timeout in seconds.
    #[arg(long, env = "NIO_CONNECT_TIMEOUT", default_value_t = 10)]
    connect_timeout: u64,
    /// Seconds between SSH keepalives; three unanswered ones end a connection (how fast a machine that lost
    /// its network during activation is noticed).
    #[arg(long, env = "NIO_SSH_KEEPALIVE", default_value_t = 5)]
    ssh_keepalive: u64,
    /// Seconds an SSH connection that ended a successful job is kept for the machine's next job, which then starts
    /// without a new login (as OpenSSH's ControlPersist; 0: every job logs in anew). Confirmations after an
    /// activation always log in anew.
    #[arg(long, env = "NIO_SSH_PERSIST", default_value_t = 60)]
    ssh_persist: u64,
    /// Most SSH connections kept idle at once (each is a TCP connection and, on OpenSSH, an sshd process on its
    /// machine); beyond it the longest idle one is closed.
    #[arg(long, env = "NIO_SSH_PERSIST_MAX", default_value_t = 1000)]
    ssh_persist_max: usize,
    /// Seconds to finish in-flight jobs after SIGTERM before returning them to the queue.
    #[arg(long, env = "NIO_SHUTDOWN_GRACE", default_value_t = 120)]
    shutdown_grace: u64,
    /// Log format.
    #[arg(long, env = "NIO_LOG_FORMAT", value_enum, default_value = "human")]
    log_format: LogFormat,
}

/// jemalloc instead of glibc malloc, as the controller: glibc's malloc and free were an eighth of the executor's
/// CPU in the 1,000-machine load test (SSH packets, key exchanges and status events allocate per message).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let id = cli.executor_id.clone().unwrap_or_else(|| nio_shared::http::hostname("executor"));
    let config = nio_shared::config::ExecutorConfig::load(&cli.config)?;
    let sites = config.sites.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(",");
    let guard = nio_shared::telemetry::init(
        "nio-executor",
        cli.log_format,
        &[("nio.executor", id.clone()), ("nio.sites", sites)],
    )?;
    // Every kept connection and every running job's connections hold a socket: the usual soft open-files limit
    // (1,024) would cap them below the defaults, so raise it to the hard limit and say when that is not enough.
    let need =
        cli.ssh_persist_max as u64 + 2 * config.sites.iter().map(|s| u64::from(s.max_in_flight)).sum::<u64>() + 100;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < need => tracing::warn!(
            limit,
            need,
            "the open-files limit is below what --ssh-persist-max and the sites' maxInFlight may use; raise it or lower them"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("signal received: shutting down");
        on_signal.cancel();
    });
    let settings = nio_executor::Settings {
        nats_url: cli.nats_url,
        nats_creds: cli.nats_creds,
        config,
        identities_dir: cli.identities_dir,
        git_credentials_dir: cli.git_credentials_dir,
        cache_dir: cli.cache_dir,
        executor_id: id,
        seal_key_file: cli.seal_key_file,
        metrics_addr: cli.metrics_addr,
        health_addr: cli.health_addr,
        host_key_policy: cli.host_key_policy,
        kexec_tarball: cli.kexec_tarball,
        connect_timeout: Duration::from_secs(cli.connect_timeout),
        ssh_keepalive: Duration::from_secs(cli.ssh_keepalive.max(1)),
        ssh_persist: nio_executor::pool::PoolLimits {
            persist: Duration::from_secs(cli.ssh_persist),
            max_idle: cli.ssh_persist_max,
        },
        shutdown_grace: Duration::from_secs(cli.shutdown_grace),
    };
    let result = nio_executor::run(settings, shutdown).await;
    tokio::task::spawn_blocking(move || guard.shutdown()).await?;
    result
}
