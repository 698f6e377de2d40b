#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a measuring harness; it may panic
//! The real `nio-executor` binary against namespaced test hosts with real OpenSSH sshd and real Nix
//! (`nio_loadtest::testhost`). Queues `--jobs` switch jobs, one per host (each does the whole work: state read;
//! upload, `nix build`, profile, switch-to-configuration in its unit; health check and confirmation over a new
//! connection), starts the executor, and reports as JSON: jobs/s from executor start to the last final status,
//! per-job latency percentiles, executor CPU and peak RSS, the whole machine's CPU per job, SSH connections and exec channels per job by the
//! hosts' own sshd logs, the most activations running at once — and, from the same run against the same hosts,
//! parallel-ssh pushing one command (`nixos-version`) at the same concurrency.
//!
//! ```sh
//! cargo bench -p nio-executor --bench sshd -- --jobs 200 --site-limit 50
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use nio_shared::protocol::Phase;

#[derive(Parser)]
struct Args {
    /// Jobs to run, one test host each.
    #[arg(long, default_value_t = 200)]
    jobs: usize,
    /// The site's maxInFlight (and parallel-ssh's -p).
    #[arg(long, default_value_t = 50)]
    site_limit: u32,
    /// Also write the report here.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    // `cargo bench` passes `--bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// parallel-ssh pushing one command to every host at `concurrency`; hosts/s, the machine's CPU ms per host, and
/// failures.
async fn parallel_ssh(h: &Hosts, concurrency: u32) -> (f64, f64, usize) {
    let list = h.path("pssh_hosts");
    std::fs::write(&list, h.hosts.iter().map(|x| format!("root@{}\n", x.addr)).collect::<String>()).unwrap();
    let known = h.path("known_hosts");
    std::fs::write(&known, h.hosts.iter().map(|x| format!("{} {}\n", x.addr, x.host_key)).collect::<String>()).unwrap();
    let opts = format!(
        "-i {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o BatchMode=yes",
        h.identities().join("default").display(),
        known.display()
    );
    let t = Instant::now();
    let busy = nio_loadtest::procs::machine_busy_seconds().unwrap_or(0.0);
    let out = tokio::process::Command::new("parallel-ssh")
        .arg("-h")
        .arg(&list)
        .args(["-p", &concurrency.to_string(), "-t", "0", "-x", &opts, "nixos-version"])
        .output()
        .await
        .expect("parallel-ssh (make setup installs pssh)");
    let wall = t.elapsed().as_secs_f64();
    let busy = nio_loadtest::procs::machine_busy_seconds().unwrap_or(0.0) - busy;
    let failed = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("[FAILURE]")).count();
    (h.hosts.len() as f64 / wall, busy * 1000.0 / h.hosts.len() as f64, failed)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let n = args.jobs.max(1);
    eprintln!("starting {n} test hosts…");
    let t = Instant::now();
    let h = Hosts::start(n);
    eprintln!("{n} hosts in {:.1}s", t.elapsed().as_secs_f64());
    let nats = NatsServer::start().await.unwrap();
    let commit = h.commit();
    let before: Vec<(usize, usize)> = h.hosts.iter().map(|x| x.ssh_counts()).collect();
    let mut bus = Bus::connect(&nats).await;
    for i in 0..n {
        let mut j = job(&format!("m{i:05}"), &h.addr(i), 22, "dc1", &h.repo.url(), &commit);
        j.rollback = true;
        bus.publish(&j).await;
    }
    let mut cfg = config(&[("dc1", args.site_limit)]);
    cfg.ack_wait_seconds = 60;
    cfg.job_timeout_seconds = 600;
    let log = h.path("executor.log");
    let t0 = Instant::now();
    let busy0 = nio_loadtest::procs::machine_busy_seconds().unwrap_or(0.0);
    let started = chrono::Utc::now();
    let child = spawn_binary_logging(&h, &nats, &cfg, "bench", &[], &log, "warn");
    let pid = child.id().unwrap();
    let mut peak_rss = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(u) = nio_loadtest::procs::usage(pid) {
            peak_rss = peak_rss.max(u.peak_rss_mb);
        }
        let done = bus.seen.iter().filter(|e| e.phase.is_terminal()).count();
        if done >= n {
            break;
        }
        assert!(Instant::now() < deadline, "only {done} of {n} jobs finished in 10 minutes; see {}", log.display());
        bus.until(Duration::from_secs(600), |evs| evs.iter().filter(|e| e.phase.is_terminal()).count() > done).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let busy = nio_loadtest::procs::machine_busy_seconds().unwrap_or(0.0) - busy0;
    let usage = nio_loadtest::procs::usage(pid).unwrap_or_default();
    peak_rss = peak_rss.max(usage.peak_rss_mb);
    let finals: Vec<_> = bus.seen.iter().filter(|e| e.phase.is_terminal()).collect();
    let succeeded = finals.iter().filter(|e| e.phase == Phase::Succeeded).count();
    let mut failures = std::collections::BTreeMap::<String, usize>::new();
    for f in finals.iter().filter(|e| e.phase != Phase::Succeeded) {
        let what = format!("{:?} {:?}: {}", f.phase, f.category, f.message.as_deref().unwrap_or(""));
        *failures.entry(what).or_default() += 1;
    }
    // Per job: its Started event to its final event.
    let mut run_s: Vec<f64> = finals
        .iter()
        .filter_map(|f| {
            let s = bus.seen.iter().find(|e| e.job_id == f.job_id && e.phase == Phase::Started)?;
            Some((f.at - s.at).num_microseconds()? as f64 / 1e6)
        })
        .collect();
    run_s.sort_by(f64::total_cmp);
    // Queue to final: what a user waits for a job queued at the executor's start.
    let mut done_s: Vec<f64> =
        finals.iter().filter_map(|f| Some((f.at - started).num_microseconds()? as f64 / 1e6)).collect();
    done_s.sort_by(f64::total_cmp);
    let (mut logins, mut commands) = (0, 0);
    for (x, (l0, c0)) in h.hosts.iter().zip(&before) {
        let (l, c) = x.ssh_counts();
        logins += l - l0;
        commands += c - c0;
    }
    let spans: Vec<(f64, f64)> = h.hosts.iter().flat_map(|x| x.activation_spans()).collect();
    drop(child);
    let (pssh_rate, pssh_cpu_ms, pssh_failed) = parallel_ssh(&h, args.site_limit).await;
    let report = serde_json::json!({
        "jobs": n,
        "site_limit": args.site_limit,
        "succeeded": succeeded,
        "failures": failures,
        "wall_s": wall,
        "jobs_per_s": n as f64 / wall,
        "job_run_s": {"p50": percentile(&run_s, 0.5), "p95": percentile(&run_s, 0.95), "p99": percentile(&run_s, 0.99), "max": run_s.last()},
        "queued_to_done_s": {"p50": percentile(&done_s, 0.5), "p95": percentile(&done_s, 0.95), "max": done_s.last()},
        // Everything on this machine (executor, NATS, and the hosts' sshd, Nix and shells) per job: on a busy
        // machine the rate follows it, and it is steadier than the rate when the hypervisor steals time.
        "machine_cpu_ms_per_job": busy * 1000.0 / n as f64,
        "executor": {"cpu_s": usage.cpu_seconds, "peak_rss_mb": peak_rss, "cpu_ms_per_job": usage.cpu_seconds * 1000.0 / n as f64},
        "ssh_connections_per_job": logins as f64 / n as f64,
        "exec_channels_per_job": commands as f64 / n as f64,
        "max_concurrent_activations": max_concurrency(&spans),
        "parallel_ssh": {"command": "nixos-version", "hosts_per_s": pssh_rate, "machine_cpu_ms_per_host": pssh_cpu_ms, "failed": pssh_failed},
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    if let Some(p) = args.report {
        std::fs::write(p, text).unwrap();
    }
    assert_eq!(succeeded, n, "every job succeeded (see {})", log.display());
}
