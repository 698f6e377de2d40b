//! `make demo`: NIO on its embedded default — two simulated clusters sharing one real NATS, a fleet in two
//! sites, the real controller and executor binaries — rolling out a commit, then left running to explore.

use std::time::Duration;

use crate::fleet::Latency;
use crate::scenario::{self, Scenario};

pub async fn run(machines: usize, exit: bool) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("nio-demo-{}", std::process::id()));
    let s = Scenario {
        machines,
        sites: 2,
        site_limit: 5,
        clusters: 2,
        executors: 2,
        switch_latency: Latency::Uniform(Duration::from_millis(300), Duration::from_millis(900)),
        failure_rate: 0.0,
        faults: vec![],
        nats_url: None,
        deadline: Duration::from_secs(300),
        quiet: false,
        work_dir: Some(work.clone()),
        keep_running: !exit,
        env: std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")).collect(),
    };
    eprintln!("NIO demo: state and logs in {}", work.display());
    let (report, running) = scenario::run(s, Some(&work.join("report.json"))).await?;
    eprint!("{}", scenario::summary(&report));
    eprintln!("report: {}", work.join("report.json").display());
    if let Some(p) = &report.plot {
        eprintln!("plot:   {p}");
    }
    let Some(mut running) = running else { return Ok(()) };
    eprintln!("\nNIO keeps running. Try:");
    for (name, kc) in running.kubeconfigs() {
        eprintln!("  KUBECONFIG={} kubectl get machines -n fleet        # {name}", kc.display());
    }
    if let Some((_, kc)) = running.kubeconfigs().first() {
        eprintln!("  KUBECONFIG={} kubectl get nixconf -n fleet -o wide", kc.display());
    }
    eprintln!("NATS: {}", running.nats_url);
    eprintln!("Metrics:");
    for (name, url) in running.metrics_endpoints() {
        eprintln!("  {name:<22} {url}");
    }
    match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(e) => eprintln!("Traces: exported by OTLP to {e} (service names nio-controller, nio-executor)"),
        Err(_) => eprintln!(
            "Traces: not exported; set OTEL_EXPORTER_OTLP_ENDPOINT (and OTEL_EXPORTER_OTLP_PROTOCOL=grpc|http/protobuf) before `make demo`"
        ),
    }
    eprintln!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    running.stop().await;
    Ok(())
}
