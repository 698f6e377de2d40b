//! `nio-loadtest compare`: the same remote command (`nixos-rebuild switch --flake …`) at the same
//! concurrency against the same simulated fleet, pushed by parallel-ssh, by ansible, and by NIO's full
//! pipeline (Kubernetes → controller → NATS → executors → SSH).

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;

use crate::fleet::{Behaviour, Fleet, FleetOptions, Latency};
use crate::procs::free_port;
use crate::scenario::{self, Scenario};

/// Wall and CPU time of one tool.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Run {
    pub tool: String,
    pub wall_s: f64,
    pub cpu_s: f64,
    pub succeeded: usize,
    /// Wall time relative to NIO's (above 1: slower than NIO).
    pub vs_nio: f64,
}

/// CPU seconds used by waited-for children of this process so far.
fn children_cpu() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    let Some((_, after)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(13) + t(14)) / 100.0
}

async fn timed(tool: &str, mut cmd: tokio::process::Command) -> anyhow::Result<(f64, f64, String)> {
    let cpu0 = children_cpu();
    let t = Instant::now();
    let out = cmd.output().await.with_context(|| format!("running {tool} (run `make setup` to install it)"))?;
    let wall = t.elapsed().as_secs_f64();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((wall, children_cpu() - cpu0, text))
}

/// Runs the comparison and returns one row per tool (NIO first).
pub async fn run(machines: usize, concurrency: usize, latency: Latency, dir: &Path) -> anyhow::Result<Vec<Run>> {
    std::fs::create_dir_all(dir)?;
    // NIO first, on its own fleet (it uploads the source itself).
    let nio = Scenario {
        machines,
        sites: 1,
        site_limit: u32::try_from(concurrency).unwrap_or(u32::MAX),
        clusters: 1,
        executors: 1,
        switch_latency: latency.clone(),
        quiet: true,
        // The peers log in to every host; NIO does too here (the connections its executor kept from the warm-up
        // would spare it the handshakes the peers make).
        env: vec![("NIO_SSH_PERSIST".into(), "0".into())],
        ..Default::default()
    };
    let (report, _) = scenario::run(nio, None).await?;
    // The measured rollout only: the peers push once, and the warm-up install is not theirs to do either.
    let nio_cpu: f64 = report.processes.iter().map(|p| p.rollout_cpu_seconds).sum();
    let mut rows =
        vec![Run { tool: "nio".into(), wall_s: report.wall_s, cpu_s: nio_cpu, succeeded: report.updated, vs_nio: 1.0 }];

    // Peers push to a fresh fleet whose machines already hold the source (NIO's upload is not theirs to do).
    let key = russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)?;
    let key_file = dir.join("peer_key");
    std::fs::write(&key_file, key.to_openssh(russh::keys::ssh_key::LineEnding::LF)?.as_bytes())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    let fleet = Fleet::start(FleetOptions {
        machines,
        sites: 1,
        port: free_port()?,
        first_address: Ipv4Addr::new(127, 2, 0, 1),
        behaviour: Behaviour { switch_latency: latency, ..Default::default() },
        paths: Default::default(),
        authorized: vec![key.public_key().clone()],
    })
    .await?;
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let src = format!("/var/lib/nio/src/{commit}");
    for m in &fleet.machines {
        if let Ok(mut s) = m.state.lock() {
            s.dirs.insert(src.clone());
            s.files.insert(format!("{src}/flake.nix"), crate::fleet::File { data: b"{ }".to_vec(), mode: 0o644 });
        }
    }
    let command = format!("nixos-rebuild switch --flake path:{src}#web");
    let ssh_opts = format!(
        "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR -i {}",
        key_file.display()
    );
    let port = fleet.machines.first().map(|m| m.addr.port()).unwrap_or(22);

    let hosts = dir.join("pssh_hosts");
    std::fs::write(
        &hosts,
        fleet.machines.iter().map(|m| format!("{}:{port} root\n", m.addr.ip())).collect::<String>(),
    )?;
    let mut pssh = tokio::process::Command::new("parallel-ssh");
    pssh.arg("-h").arg(&hosts).args(["-p", &concurrency.to_string(), "-t", "0", "-x", &ssh_opts, &command]);
    let (wall, cpu, out) = timed("parallel-ssh", pssh).await?;
    let ok = out.lines().filter(|l| l.contains("[SUCCESS]")).count();
    rows.push(Run {
        tool: "parallel-ssh".into(),
        wall_s: wall,
        cpu_s: cpu,
        succeeded: ok,
        vs_nio: wall / report.wall_s.max(1e-9),
    });

    let inventory = dir.join("inventory.ini");
    let lines: String = fleet
        .machines
        .iter()
        .map(|m| {
            format!(
                "{} ansible_host={} ansible_port={port} ansible_user=root ansible_ssh_private_key_file={}\n",
                m.name,
                m.addr.ip(),
                key_file.display()
            )
        })
        .collect();
    std::fs::write(&inventory, format!("[fleet]\n{lines}"))?;
    let mut ansible = tokio::process::Command::new("ansible");
    ansible
        .args(["fleet", "-i"])
        .arg(&inventory)
        .args(["-f", &concurrency.to_string(), "-m", "raw", "-a", &command])
        .env("ANSIBLE_HOST_KEY_CHECKING", "False")
        .env("ANSIBLE_SSH_ARGS", "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
        .env("ANSIBLE_LOCAL_TEMP", dir.join("ansible-tmp"))
        .env("ANSIBLE_NOCOLOR", "1");
    let (wall, cpu, out) = timed("ansible", ansible).await?;
    let ok = out.lines().filter(|l| l.contains("| CHANGED") || l.contains("| SUCCESS")).count();
    rows.push(Run {
        tool: "ansible".into(),
        wall_s: wall,
        cpu_s: cpu,
        succeeded: ok,
        vs_nio: wall / report.wall_s.max(1e-9),
    });
    Ok(rows)
}

pub fn table(rows: &[Run]) -> String {
    let mut s = format!("{:<14} {:>9} {:>9} {:>10} {:>8}\n", "tool", "wall s", "cpu s", "succeeded", "vs nio");
    for r in rows {
        s.push_str(&format!(
            "{:<14} {:>9.2} {:>9.2} {:>10} {:>7.2}x\n",
            r.tool, r.wall_s, r.cpu_s, r.succeeded, r.vs_nio
        ));
    }
    s
}
