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
            tokio::signal::ctrl_c().await?;
            Ok(())
        }
        Command::KubesimBench { objects, watchers, concurrency } => {
            let report = nio_loadtest::bench::run(objects, watchers, concurrency).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}
