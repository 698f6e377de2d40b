//! nio-controller: reconciles Machines and NixosConfigurations into jobs on NATS JetStream.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use nio_shared::telemetry::LogFormat;

#[derive(Parser, Debug)]
#[command(version, about = "NIO controller: turns NixosConfigurations into rebuild jobs")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Name of this cluster; unique among the clusters sharing a NATS system.
    #[arg(long, env = "NIO_CLUSTER_NAME")]
    cluster_name: Option<String>,
    /// NATS server URL, or the URLs of a cluster's servers separated by commas.
    #[arg(long, env = "NIO_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file.
    #[arg(long, env = "NIO_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// Namespace to watch (repeatable); default: all namespaces.
    #[arg(long = "namespace", env = "NIO_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Key shared with the executors for sealing secrets.
    #[arg(long, env = "NIO_SEAL_KEY_FILE")]
    seal_key_file: Option<PathBuf>,
    /// Address for /metrics.
    #[arg(long, env = "NIO_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Address for /healthz and /readyz (defaults to the metrics address).
    #[arg(long, env = "NIO_HEALTH_ADDR")]
    health_addr: Option<SocketAddr>,
    /// Elect a leader among replicas through a Lease.
    #[arg(long, env = "NIO_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    #[arg(long, env = "NIO_LEASE_NAME", default_value = "nio-controller")]
    lease_name: String,
    #[arg(long, env = "NIO_LEASE_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Lease duration in seconds. The leader renews every 2/15 of it and steps down when it cannot renew for
    /// 2/3 of it (client-go's 15 s / 10 s / 2 s); a standby takes over a lease unchanged for this long, or at
    /// once when the leader released it on shutdown.
    #[arg(long, env = "NIO_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// Identity in the Lease (default: host name and process id).
    #[arg(long, env = "NIO_IDENTITY")]
    identity: Option<String>,
    /// Default pollInterval for configurations (they set their own with spec.pollInterval).
    #[arg(long, env = "NIO_DEFAULT_POLL_INTERVAL", default_value = "5m")]
    default_poll_interval: String,
    /// How often each Machine is probed (jittered ±10 %).
    #[arg(long, env = "NIO_PROBE_INTERVAL", default_value = "5m")]
    probe_interval: String,
    /// Also record an Event on a Machine for each routine success (an apply that succeeded or found its target
    /// running). Off: such successes are in the Machine's status and the configuration's rollout Events, and a
    /// rollout costs one API request less per machine.
    #[arg(long, env = "NIO_MACHINE_SUCCESS_EVENTS")]
    machine_success_events: bool,
    /// Replicas of the NIO_JOBS and NIO_STATUS streams (1 dev, 3 prod).
    #[arg(long, env = "NIO_JOBS_REPLICAS", default_value_t = 1)]
    jobs_replicas: usize,
    /// Cache directory (Git objects for SHA checks).
    #[arg(long, env = "NIO_CACHE_DIR", default_value = "/var/cache/nio-controller")]
    cache_dir: PathBuf,
    /// Serve Git push webhooks (GitHub, GitLab, Gitea, Forgejo, generic) at this address, path /hooks/git.
    /// Off when unset.
    #[arg(long, env = "NIO_WEBHOOK_ADDR", requires = "webhook_secret_file")]
    webhook_addr: Option<SocketAddr>,
    /// File holding the webhook secret (HMAC key; GitLab's token), e.g. a mounted Secret.
    #[arg(long, env = "NIO_WEBHOOK_SECRET_FILE")]
    webhook_secret_file: Option<PathBuf>,
    /// Prometheus that waves' analyses query (plain HTTP), e.g. http://prometheus.monitoring:9090/.
    #[arg(long, env = "NIO_PROMETHEUS_URL")]
    prometheus_url: Option<url::Url>,
    #[arg(long, env = "NIO_LOG_FORMAT", value_enum, default_value = "human")]
    log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
}

/// jemalloc instead of glibc malloc: a quarter less CPU on the allocation-heavy paths (decoding watch events
/// and API responses), measured with `nio-loadtest controller-bench`.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Crd) = cli.command {
        for (_, yaml) in nio_shared::crd::yaml_files()? {
            print!("---\n{yaml}");
        }
        return Ok(());
    }
    let cluster =
        cli.cluster_name.clone().ok_or_else(|| anyhow::anyhow!("--cluster-name (NIO_CLUSTER_NAME) is required"))?;
    nio_shared::validate::dns_label("--cluster-name", &cluster)?;
    let probe_interval = nio_shared::validate::duration("--probe-interval", &cli.probe_interval)?;
    let default_poll_interval = nio_shared::validate::duration("--default-poll-interval", &cli.default_poll_interval)?;
    let identity = cli
        .identity
        .clone()
        .unwrap_or_else(|| format!("{}-{}", nio_shared::http::hostname("controller"), std::process::id()));
    let guard = nio_shared::telemetry::init(
        "nio-controller",
        cli.log_format,
        &[("nio.cluster", cluster.clone()), ("nio.identity", identity.clone())],
    )?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        on_signal.cancel();
    });
    let webhook = match (cli.webhook_addr, &cli.webhook_secret_file) {
        (Some(addr), Some(file)) => {
            let secret = std::fs::read(file)
                .map_err(|e| anyhow::anyhow!("reading the webhook secret {}: {e}", file.display()))?;
            let secret = secret.trim_ascii().to_vec();
            anyhow::ensure!(secret.len() >= 16, "the webhook secret in {} is shorter than 16 bytes", file.display());
            Some(nio_controller::webhook::Settings::new(addr, secret))
        }
        _ => None,
    };
    if let Some(u) = &cli.prometheus_url {
        anyhow::ensure!(
            u.scheme() == "http",
            "--prometheus-url {u}: only http:// is supported (an in-cluster address)"
        );
    }
    let settings = nio_controller::Settings {
        cluster,
        nats_url: cli.nats_url,
        nats_creds: cli.nats_creds,
        namespaces: cli.namespaces,
        seal_key_file: cli.seal_key_file,
        metrics_addr: cli.metrics_addr,
        health_addr: cli.health_addr,
        leader_election: cli.leader_election,
        lease_name: cli.lease_name,
        lease_namespace: cli.lease_namespace,
        lease_duration: Duration::from_secs(cli.lease_duration),
        identity,
        probe_interval,
        default_poll_interval,
        machine_success_events: cli.machine_success_events,
        jobs_replicas: cli.jobs_replicas,
        cache_dir: cli.cache_dir,
        kube_config: None,
        webhook,
        prometheus_url: cli.prometheus_url,
    };
    let result = nio_controller::run(settings, shutdown).await;
    tokio::task::spawn_blocking(move || guard.shutdown()).await?;
    result
}
