//! `nio-loadtest controller-bench`: reconcile throughput of the real nio-controller with many Machines and
//! one NixosConfiguration per Machine on the Kubernetes simulator.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, PostParams};
use nio_shared::crd::{Machine, NixosConfiguration};
use serde_json::json;

use crate::gitrepo::GitRepo;
use crate::kubesim::{KubeSim, Options};
use crate::nats::NatsServer;
use crate::procs::{Proc, Usage, bin_path, free_port};

#[derive(Debug, serde::Serialize)]
pub struct CtlReport {
    pub machines: usize,
    pub configurations: usize,
    /// From the first create to the last apply job on the queue.
    pub seconds_to_all_jobs: f64,
    pub configurations_per_s: f64,
    /// From the first create to every configuration's status naming its target commit.
    pub seconds_to_all_status: f64,
    pub controller: Usage,
}

async fn apply_jobs(js: &async_nats::jetstream::Context) -> usize {
    let Ok(stream) = js.get_stream(nio_shared::subjects::JOBS_STREAM).await else { return 0 };
    match stream.info_with_subjects("nio.jobs.*.apply.>").await {
        Ok(subjects) => subjects.try_collect::<Vec<_>>().await.map(|v| v.len()).unwrap_or(0),
        Err(_) => 0,
    }
}

pub async fn run(n: usize) -> anyhow::Result<CtlReport> {
    let dir = tempfile::tempdir()?;
    let nats = NatsServer::start().await?;
    let sim = KubeSim::start(Options::default()).await?;
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig)?;
    let repo = GitRepo::create(dir.path())?;
    let port = free_port()?;
    let args: Vec<String> = vec![
        "--cluster-name".into(),
        "bench".into(),
        "--nats-url".into(),
        nats.url(),
        "--cache-dir".into(),
        dir.path().join("cache").display().to_string(),
        "--probe-interval".into(),
        "1h".into(),
        "--metrics-addr".into(),
        format!("127.0.0.1:{port}"),
    ];
    let mut ctl = Proc::spawn(
        "controller",
        &bin_path("nio-controller")?,
        &args,
        &[("KUBECONFIG", kubeconfig.display().to_string())],
        dir.path(),
        port,
    )?;
    let client = sim.client()?;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    let machines: Api<Machine> = Api::namespaced(client.clone(), "default");
    let configs: Api<NixosConfiguration> = Api::namespaced(client.clone(), "default");
    let url = repo.url();
    let t0 = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (machines, configs, url) = (machines.clone(), configs.clone(), url.clone());
            async move {
                let m: Machine = serde_json::from_value(json!({
                    "apiVersion": "nixos.infra/v1alpha1", "kind": "Machine", "metadata": {"name": format!("m{i}")},
                    "spec": {"hostname": format!("m{i}.example.org"), "site": format!("dc{}", i % 4)}
                }))?;
                machines.create(&PostParams::default(), &m).await?;
                let c: NixosConfiguration = serde_json::from_value(json!({
                    "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration", "metadata": {"name": format!("c{i}")},
                    "spec": {"gitRepo": url, "ref": "main", "flake": "#web", "machineRef": format!("m{i}")}
                }))?;
                configs.create(&PostParams::default(), &c).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while apply_jobs(&js).await < n {
        anyhow::ensure!(Instant::now() < deadline, "only {} of {n} jobs after 10 minutes", apply_jobs(&js).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let jobs_s = t0.elapsed().as_secs_f64();
    loop {
        let list = configs.list(&Default::default()).await?;
        if list
            .items
            .iter()
            .filter(|c| c.status.as_ref().is_some_and(|s| s.target_commit.is_some() && s.in_progress > 0))
            .count()
            >= n
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "statuses not written after 10 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status_s = t0.elapsed().as_secs_f64();
    ctl.terminate(Duration::from_secs(10)).await;
    Ok(CtlReport {
        machines: n,
        configurations: n,
        seconds_to_all_jobs: jobs_s,
        configurations_per_s: n as f64 / jobs_s,
        seconds_to_all_status: status_s,
        controller: ctl.last,
    })
}
