//! `make demo`: NIO on its embedded default — two simulated clusters sharing one real NATS, 60 machines in
//! three sites, two controllers and two executors (the real binaries) — rolling out a commit, with live
//! per-site progress and a final table. `--hold` keeps everything running to explore with kubectl.

use std::path::Path;
use std::time::Duration;

use crate::fleet::Latency;
use crate::scenario::{self, Scenario};

/// Applies `examples/` to a cluster with kubectl, as a user would (their machines are in sites no demo
/// executor serves, so nothing connects to their addresses; their Git remote is not reachable from here, so
/// their configurations show how NIO reports that).
fn apply_examples(kubeconfig: &Path) -> anyhow::Result<String> {
    let examples = Path::new("examples");
    if !examples.join("10-machines.yaml").exists() {
        return Ok("examples/ not found here; skipped".into());
    }
    let out = std::process::Command::new("kubectl")
        .arg("apply")
        .arg("-f")
        .arg(examples)
        .env("KUBECONFIG", kubeconfig)
        .output()?;
    anyhow::ensure!(out.status.success(), "kubectl apply -f examples/: {}", String::from_utf8_lossy(&out.stderr));
    Ok(format!("{} objects applied", String::from_utf8_lossy(&out.stdout).lines().count()))
}

pub async fn run(machines: usize, hold: bool) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("nio-demo-{}", std::process::id()));
    let s = Scenario {
        machines,
        sites: 3,
        site_limit: 5,
        clusters: 2,
        executors: 2,
        switch_latency: Latency::Uniform(Duration::from_millis(300), Duration::from_millis(900)),
        failure_rate: 0.0,
        faults: vec![],
        nats_url: None,
        nats_nodes: 1,
        poison: 0,
        controller_replicas: 1,
        deadline: Duration::from_secs(300),
        quiet: false,
        work_dir: Some(work.clone()),
        keep_running: true,
        env: std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")).collect(),
        // The demo's controllers serve the Git push webhook, and the demo's push goes through it.
        push_via: crate::scenario::PushVia::Webhook,
        rollout: None,
        broken: 0.0,
        ..Scenario::default()
    };
    eprintln!("NIO demo: state and logs in {}", work.display());
    let (report, running) = scenario::run(s, Some(&work.join("report.json"))).await?;
    let Some(mut running) = running else { anyhow::bail!("the demo stopped early") };
    for (name, kc) in running.kubeconfigs() {
        eprintln!("{name}: kubectl apply -f examples/ → {}", apply_examples(&kc)?);
    }
    print!("{}", scenario::table(&report));
    eprint!("{}", scenario::summary(&report));
    eprintln!("report: {}", work.join("report.json").display());
    if let Some(p) = &report.plot {
        eprintln!("plot:   {p}");
    }
    eprintln!("NATS:   {}", running.nats_url);
    eprintln!("Metrics:");
    for (name, url) in running.metrics_endpoints() {
        eprintln!("  {name:<22} {url}");
    }
    match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(e) => eprintln!("Traces: exported by OTLP to {e} (service names nio-controller, nio-executor)"),
        Err(_) => eprintln!(
            "Traces: not exported; set OTEL_EXPORTER_OTLP_ENDPOINT (and OTEL_EXPORTER_OTLP_PROTOCOL=grpc|http/protobuf) to send them to a collector"
        ),
    }
    if hold {
        eprintln!("\nNIO keeps running. In another terminal:");
        for (name, kc) in running.kubeconfigs() {
            eprintln!("  kubectl --kubeconfig {} get machines -A        # {name}", kc.display());
        }
        if let Some((_, kc)) = running.kubeconfigs().first() {
            eprintln!("  kubectl --kubeconfig {} get nixconf -A", kc.display());
        }
        eprintln!("Press Ctrl-C to stop.");
        crate::procs::until_stopped().await;
    }
    running.stop().await;
    anyhow::ensure!(report.violations.is_empty(), "{} invariant violation(s)", report.violations.len());
    Ok(())
}
