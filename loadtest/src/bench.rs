//! `nio-loadtest kubesim-bench`: throughput of the Kubernetes API simulator with concurrent watchers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use nio_shared::crd::{Machine, MachineSpec};
use serde_json::json;

use crate::kubesim::{KubeSim, Options};

/// Figures of one run.
#[derive(Debug, serde::Serialize)]
pub struct BenchReport {
    pub objects: usize,
    pub watchers: usize,
    pub concurrency: usize,
    pub creates_per_s: f64,
    pub status_patches_per_s: f64,
    /// Time from the first create until every watcher saw every create.
    pub watch_fanout_s: f64,
    pub list_all_ms: f64,
    pub events_delivered: usize,
}

async fn run_ops<F, Fut>(n: usize, concurrency: usize, op: F) -> anyhow::Result<f64>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    futures::stream::iter(0..n).map(op).buffer_unordered(concurrency).try_collect::<Vec<()>>().await?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Creates `objects` Machines and patches each one's status, with `watchers` watches open.
pub async fn run(objects: usize, watchers: usize, concurrency: usize) -> anyhow::Result<BenchReport> {
    let sim = KubeSim::start(Options::default()).await?;
    let client = sim.client()?;
    let api: Api<Machine> = Api::namespaced(client, "default");
    let seen = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let mut stream = api.watch(&WatchParams::default().timeout(290), "0").await?.boxed();
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(ev)) = stream.try_next().await {
                if matches!(ev, WatchEvent::Added(_) | WatchEvent::Modified(_)) {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let start = Instant::now();
    let creates_per_s = run_ops(objects, concurrency, |i| {
        let api = api.clone();
        async move {
            let spec: MachineSpec = serde_json::from_value(
                json!({"hostname": format!("m{i}.example.org"), "site": format!("dc{}", i % 4)}),
            )?;
            api.create(&PostParams::default(), &Machine::new(&format!("m{i}"), spec)).await?;
            Ok(())
        }
    })
    .await?;
    let want = objects * watchers;
    while seen.load(Ordering::Relaxed) < want {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(300),
            "watchers saw {} of {want} events",
            seen.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let watch_fanout_s = start.elapsed().as_secs_f64();
    let t = Instant::now();
    let all = api.list(&ListParams::default()).await?;
    let list_all_ms = t.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(all.items.len() == objects, "list returned {} of {objects}", all.items.len());
    let status_patches_per_s = run_ops(objects, concurrency, |i| {
        let api = api.clone();
        async move {
            let p = Patch::Apply(
                json!({"apiVersion": "nixos.infra/v1alpha1", "kind": "Machine", "status": {"phase": "Applied"}}),
            );
            api.patch_status(&format!("m{i}"), &PatchParams::apply("bench").force(), &p).await?;
            Ok(())
        }
    })
    .await?;
    while seen.load(Ordering::Relaxed) < 2 * want {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "watchers saw {} of {} events",
            seen.load(Ordering::Relaxed),
            2 * want
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.abort();
    }
    Ok(BenchReport {
        objects,
        watchers,
        concurrency,
        creates_per_s,
        status_patches_per_s,
        watch_fanout_s,
        list_all_ms,
        events_delivered: seen.load(Ordering::Relaxed),
    })
}
