//! nio-loadtest: Kubernetes API simulator, fleet simulator and load test.
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use nio_loadtest::kubesim;

#[derive(Parser)]
#[command(version, about = "Run NIO without a cluster or machines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one simulated Kubernetes cluster until interrupted.
    Kubesim {
        /// Address to listen on (loopback; port 0 picks a free port).
        #[arg(long, env = "NIO_KUBESIM_LISTEN", default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Write a kubeconfig for the cluster here.
        #[arg(long, env = "NIO_KUBESIM_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Directory of CRD YAML registered at start (default: crds/ of the checkout).
        #[arg(long, env = "NIO_KUBESIM_CRDS")]
        crds: Option<PathBuf>,
        /// Cluster name used in the kubeconfig.
        #[arg(long, default_value = "kubesim")]
        name: String,
    },
    /// Start a real control plane (etcd + kube-apiserver built by `make setup`) on loopback with TLS, RBAC,
    /// a service-account issuer and priority and fairness, install NIO's CRDs, and serve until interrupted.
    Realkube {
        /// Write an admin kubeconfig here.
        #[arg(long, env = "NIO_REALKUBE_KUBECONFIG")]
        kubeconfig: PathBuf,
        /// Address for the apiserver (loopback; port 0 picks a free port).
        #[arg(long, env = "NIO_REALKUBE_LISTEN", default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Directory of CRD YAML to install (default: crds/ of the checkout; `none` installs nothing).
        #[arg(long)]
        crds: Option<PathBuf>,
        /// Keep etcd's data and the logs here (default: a temporary directory, removed at exit).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run NIO end to end against a simulated fleet and report throughput, latency and invariants.
    Run(RunArgs),
    /// NIO on its embedded default: two simulated clusters, 60 machines in three sites, real NATS.
    Demo {
        /// Keep everything running after the rollout (until Ctrl-C) to explore with kubectl.
        #[arg(long)]
        hold: bool,
        #[arg(long, default_value_t = 60)]
        machines: usize,
    },
    /// The same rebuild command at the same concurrency pushed by NIO, parallel-ssh and ansible.
    Compare {
        #[arg(long, default_value_t = 100)]
        machines: usize,
        #[arg(long, default_value_t = 20)]
        concurrency: usize,
        #[arg(long, default_value = "200ms")]
        switch_latency: nio_loadtest::fleet::Latency,
        /// Write the rows as JSON here.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Reconcile throughput of nio-controller: N Machines, one NixosConfiguration each.
    ControllerBench {
        #[arg(long, default_value_t = 1000)]
        machines: usize,
        /// Fleet configurations selecting the machines by label; 0: one configuration per machine.
        #[arg(long, default_value_t = 0)]
        configurations: usize,
        /// `sim` (kubesim) or `real` (etcd + kube-apiserver from `make setup`; reports API requests by verb).
        #[arg(long, default_value = "sim", value_parser = ["sim", "real"])]
        backend: String,
        /// Seconds to watch the idle controller after the rollout (steady-state requests).
        #[arg(long, default_value_t = 0)]
        steady: u64,
        /// Keep the controller's log and final metrics here.
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// Measure the simulator: creates and status patches per second with concurrent watchers.
    KubesimBench {
        #[arg(long, default_value_t = 10_000)]
        objects: usize,
        #[arg(long, default_value_t = 4)]
        watchers: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    #[arg(long, default_value_t = 100)]
    machines: usize,
    #[arg(long, default_value_t = 2)]
    sites: usize,
    /// maxInFlight per site.
    #[arg(long, default_value_t = 10)]
    site_limit: u32,
    #[arg(long, default_value_t = 1)]
    clusters: usize,
    #[arg(long, default_value_t = 2)]
    executors: usize,
    /// Activation duration (build + switch-to-configuration): `200ms`, `100ms..300ms` or `exp:200ms`.
    #[arg(long, default_value = "200ms")]
    switch_latency: nio_loadtest::fleet::Latency,
    /// Probability that a machine's build fails.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// Fault to inject, e.g. kill-executor@50%, restart-nats@30%, restart-controller@40%, kill-nats-node@50%
    /// (the member leading NIO_JOBS, with --nats-nodes 3), partition-nats-node@50% (that member cut off from
    /// everyone for 15 s, then healed; the members run in network namespaces, needs root), freeze-nats@50% (the
    /// single server stopped with SIGSTOP for 6 s, then continued) (repeatable).
    #[arg(long)]
    fault: Vec<nio_loadtest::scenario::Fault>,
    /// Use this NATS instead of starting nats-server.
    #[arg(long)]
    nats_url: Option<String>,
    /// Controller replicas per cluster (2: a leader and a standby on a 5 s Lease, for --fault kill-leader@P).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    controller_replicas: u8,
    /// Malformed job messages to publish during the measured rollout (each must be terminated and counted).
    #[arg(long, default_value_t = 0)]
    poison: usize,
    /// NATS servers to start: 1, or a JetStream cluster (3 or 5) with streams and locks on 3 replicas.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    nats_nodes: u8,
    /// How the measured push reaches the controllers: the refresh annotation, or a signed push delivery to
    /// each controller's webhook.
    #[arg(long, value_enum, default_value = "annotation")]
    push_via: nio_loadtest::scenario::PushVia,
    /// The executors' ackWaitSeconds: how long a killed executor's jobs stay with it before they are redelivered.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=600))]
    ack_wait_seconds: u64,
    /// The measured rollout's `spec.rollout` as JSON (waves, maxFailures, onFailure), set with the push.
    #[arg(long, value_parser = parse_json)]
    rollout: Option<serde_json::Value>,
    /// Share of the machines on which the measured commit fails its health check (every ⌈1/share⌉-th machine).
    #[arg(long, default_value_t = 0.0)]
    broken: f64,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Seconds to wait for the rollout.
    #[arg(long, default_value_t = 600)]
    deadline: u64,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Keep logs and state here (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

fn parse_json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))
}

/// jemalloc, as in NIO's own binaries: the simulators (kubesim, the fleet) should cost the shared cores as
/// little as they can, so that the figures measure NIO.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Kubesim { listen, kubeconfig, crds, name } => {
            let opts = kubesim::Options {
                name,
                listen,
                crds_dir: crds.or_else(kubesim::default_crds_dir),
                ..Default::default()
            };
            let sim = kubesim::KubeSim::start(opts).await?;
            if let Some(path) = &kubeconfig {
                sim.write_kubeconfig(path)?;
            }
            println!(
                "kubesim serving {} (kubeconfig: {})",
                sim.url(),
                kubeconfig.map_or("-".into(), |p| p.display().to_string())
            );
            nio_loadtest::procs::until_stopped().await;
            Ok(())
        }
        Command::Realkube { kubeconfig, listen, crds, dir } => {
            anyhow::ensure!(listen.ip().is_loopback(), "--listen must be a loopback address");
            let tmp = tempfile::tempdir()?;
            let dir = dir.unwrap_or_else(|| tmp.path().join("realkube"));
            let kube = nio_loadtest::realkube::RealKube::start(&dir, listen.port()).await?;
            kube.write_kubeconfig(&kubeconfig)?;
            let crds = match crds {
                Some(p) if p.as_os_str() == "none" => None,
                Some(p) => Some(p),
                None => kubesim::default_crds_dir(),
            };
            if let Some(crds) = crds {
                let n = nio_loadtest::realkube::install_crds(&kube.client().await?, &crds).await?;
                eprintln!("installed {n} CRDs from {}", crds.display());
            }
            println!(
                "kube-apiserver serving {} (kubeconfig: {}, data: {})",
                kube.endpoint.url,
                kubeconfig.display(),
                dir.display()
            );
            nio_loadtest::procs::until_stopped().await;
            drop(kube);
            Ok(())
        }
        Command::Run(a) => {
            let scenario = nio_loadtest::scenario::Scenario {
                machines: a.machines,
                sites: a.sites,
                site_limit: a.site_limit,
                clusters: a.clusters,
                executors: a.executors,
                switch_latency: a.switch_latency,
                failure_rate: a.failure_rate,
                faults: a.fault,
                nats_url: a.nats_url,
                nats_nodes: usize::from(a.nats_nodes),
                poison: a.poison,
                controller_replicas: usize::from(a.controller_replicas),
                deadline: std::time::Duration::from_secs(a.deadline),
                quiet: a.quiet,
                work_dir: a.work_dir,
                keep_running: false,
                env: std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")).collect(),
                push_via: a.push_via,
                rollout: a.rollout,
                broken: a.broken,
                ack_wait_seconds: a.ack_wait_seconds,
            };
            let (report, _) = nio_loadtest::scenario::run(scenario, a.report.as_deref()).await?;
            eprint!("{}", nio_loadtest::scenario::summary(&report));
            println!("{}", serde_json::to_string_pretty(&report)?);
            anyhow::ensure!(report.violations.is_empty(), "{} invariant violation(s)", report.violations.len());
            Ok(())
        }
        Command::Compare { machines, concurrency, switch_latency, report } => {
            let dir = tempfile::tempdir()?;
            let rows = nio_loadtest::compare::run(machines, concurrency, switch_latency, dir.path()).await?;
            eprint!("{}", nio_loadtest::compare::table(&rows));
            if let Some(p) = report {
                std::fs::write(p, serde_json::to_string_pretty(&rows)?)?;
            }
            Ok(())
        }
        Command::ControllerBench { machines, configurations, backend, steady, work_dir } => {
            let backend = if backend == "real" {
                nio_loadtest::testkube::Backend::Real
            } else {
                nio_loadtest::testkube::Backend::Sim
            };
            let bench = nio_loadtest::ctlbench::CtlBench {
                machines,
                configurations,
                backend,
                steady: std::time::Duration::from_secs(steady),
                work_dir,
            };
            let report = nio_loadtest::ctlbench::run(bench).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Demo { hold, machines } => nio_loadtest::demo::run(machines, hold).await,
        Command::KubesimBench { objects, watchers, concurrency } => {
            let report = nio_loadtest::bench::run(objects, watchers, concurrency).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}
