#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a measuring harness; it may panic
//! The real `nio-executor` binary against one real OpenSSH `sshd` on loopback with the stub NixOS tools of the
//! integration tests (no added latency unless `--rebuild-sleep`). Queues `--jobs` switch jobs, each for its own
//! machine and commit (so every job does the whole work: connect, read the current system, upload the tree,
//! `nixos-rebuild switch`, health check, write the marker), starts the executor, and reports as JSON: jobs/s
//! from executor start to the last final status, per-job latency percentiles, executor CPU and peak RSS, and
//! the most rebuilds seen running at once. Every machine has its own loopback address (one OpenSSH
//! configuration; past 12 addresses further sshd processes serve it, as OpenSSH listens on 16 at most).
//!
//! ```sh
//! cargo bench -p nio-executor --bench sshd -- --jobs 300 --site-limit 50
//! cargo bench -p nio-executor --bench sshd -- --jobs 200 --site-limit 200 --rebuild-sleep 5   # RSS, 200 in flight
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use nio_shared::protocol::Phase;

#[derive(Parser)]
struct Args {
    /// Jobs to run (one machine and one commit each).
    #[arg(long, default_value_t = 300)]
    jobs: usize,
    /// The site's maxInFlight.
    #[arg(long, default_value_t = 50)]
    site_limit: u32,
    /// Distinct machine addresses (default: one per job). The fixture's sshd listens on 12; more are served by
    /// further sshd processes with the same configuration (OpenSSH listens on at most 16 addresses each).
    #[arg(long)]
    addresses: Option<usize>,
    /// Seconds the stub nixos-rebuild sleeps (0: as fast as the stub runs).
    #[arg(long, default_value = "0")]
    rebuild_sleep: String,
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

/// `wanted` loopback addresses on `sshd.port`: the fixture's, then 127.0.2.x… served by more sshd processes
/// with the fixture's configuration (same keys, stubs and state directory).
async fn addresses(sshd: &Sshd, wanted: usize) -> (Vec<String>, Vec<tokio::process::Child>) {
    let mut all: Vec<String> = (0..ADDRESSES.min(wanted)).map(addr).collect();
    let base = std::fs::read_to_string(sshd.path("sshd_config")).unwrap();
    let base: String = base
        .lines()
        .filter(|l| !l.starts_with("ListenAddress") && !l.starts_with("PidFile"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut children = Vec::new();
    let extra: Vec<String> =
        (0..wanted.saturating_sub(all.len())).map(|i| format!("127.0.{}.{}", 2 + i / 250, 1 + i % 250)).collect();
    for (n, chunk) in extra.chunks(16).enumerate() {
        let listen: String = chunk.iter().map(|a| format!("ListenAddress {a}:{}\n", sshd.port)).collect();
        let cfg = sshd.path(&format!("sshd_config.{n}"));
        std::fs::write(&cfg, format!("{listen}PidFile {}\n{base}", sshd.path(&format!("sshd.{n}.pid")).display()))
            .unwrap();
        let child = tokio::process::Command::new(nio_loadtest::procs::sshd_binary())
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stdin(std::process::Stdio::null())
            .stderr(std::fs::File::create(sshd.path(&format!("sshd.{n}.log"))).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        children.push(child);
        for a in chunk {
            let deadline = Instant::now() + Duration::from_secs(10);
            while tokio::net::TcpStream::connect((a.as_str(), sshd.port)).await.is_err() {
                assert!(Instant::now() < deadline, "sshd on {a} did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        all.extend(chunk.iter().cloned());
    }
    (all, children)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (nats, sshd) = (NatsServer::start().await.unwrap(), Sshd::start().await);
    sshd.set("rebuild_sleep", &args.rebuild_sleep);
    eprintln!("preparing {} commits…", args.jobs);
    let (repo, first) = git_repo(sshd.dir.path());
    let mut commits = vec![first];
    commits.extend(more_commits(sshd.dir.path(), args.jobs.saturating_sub(1)));
    let wanted = args.addresses.unwrap_or(args.jobs).max(1);
    let (addresses, _more_sshds) = addresses(&sshd, wanted).await;
    let mut bus = Bus::connect(&nats).await;
    for (i, commit) in commits.iter().enumerate() {
        let machine = format!("m{i:05}");
        bus.publish(&job(&machine, &addresses[i % addresses.len()], sshd.port, "dc1", &repo, commit)).await;
    }
    let mut cfg = config(&sshd, &[("dc1", args.site_limit)]);
    cfg.ack_wait_seconds = 60;
    cfg.job_timeout_seconds = 600;
    let log = sshd.path("executor.log");
    let t0 = Instant::now();
    let started = chrono::Utc::now();
    let child = spawn_binary_logging(&sshd, &nats, &cfg, "bench", &[], &log, "warn");
    let pid = child.id().unwrap();
    let mut peak_rss = 0.0f64;
    let n = args.jobs;
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
    let report = serde_json::json!({
        "jobs": n,
        "site_limit": args.site_limit,
        "addresses": addresses.len(),
        "rebuild_sleep_s": args.rebuild_sleep,
        "succeeded": succeeded,
        "failures": failures,
        "wall_s": wall,
        "jobs_per_s": n as f64 / wall,
        "job_run_s": {"p50": percentile(&run_s, 0.5), "p95": percentile(&run_s, 0.95), "p99": percentile(&run_s, 0.99), "max": run_s.last()},
        "queued_to_done_s": {"p50": percentile(&done_s, 0.5), "p95": percentile(&done_s, 0.95), "max": done_s.last()},
        "executor": {"cpu_s": usage.cpu_seconds, "peak_rss_mb": peak_rss, "cpu_ms_per_job": usage.cpu_seconds * 1000.0 / n as f64},
        "max_concurrent_rebuilds": max_concurrency(&sshd.calls(), "nixos-rebuild"),
    });
    // The slowest job's events, to see where its time went.
    if let Some(slow) = finals.iter().max_by_key(|f| f.at) {
        for e in bus.seen.iter().filter(|e| e.job_id == slow.job_id) {
            eprintln!("{} {:?} {:?} {}", e.at.format("%T%.3f"), e.phase, e.step, e.message.as_deref().unwrap_or(""));
        }
    }
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    if let Some(p) = args.report {
        std::fs::write(p, text).unwrap();
    }
    assert_eq!(succeeded, n, "every job succeeded (see {})", log.display());
    drop(child);
}
