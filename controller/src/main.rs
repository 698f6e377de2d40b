//! nio-controller: reconciles Machines and NixosConfigurations into jobs on NATS JetStream.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "NIO controller: turns NixosConfigurations into rebuild jobs")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd) => {
            for (_, yaml) in nio_shared::crd::yaml_files()? {
                print!("---\n{yaml}");
            }
            Ok(())
        }
        None => anyhow::bail!("the reconcile loop is not implemented yet (issue #4); only `nio-controller crd` works"),
    }
}
