//! `nio-loadtest controller-bench`: what the real nio-controller costs with many Machines: time to publish
//! every job, its CPU and peak memory, and (on a real kube-apiserver) the API requests it makes by verb during
//! the rollout and in steady state afterwards, read from the apiserver's own `apiserver_request_total`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, PostParams};
use nio_shared::crd::{Machine, NixosConfiguration};
use serde_json::json;

use crate::gitrepo::GitRepo;
use crate::kubesim::{KubeSim, Options};
use crate::nats::NatsServer;
use crate::procs::{Proc, Usage, bin_path, free_port};
use crate::realkube::RealKube;
use crate::testkube::Backend;

/// What to measure.
#[derive(Debug, Clone)]
pub struct CtlBench {
    pub machines: usize,
    /// Fleet configurations, each selecting machines by label; 0: one configuration per machine (machineRef).
    pub configurations: usize,
    pub backend: Backend,
    /// How long to watch the idle controller after the rollout.
    pub steady: Duration,
    /// Keep the controller's log and metrics here (default: a temporary directory).
    pub work_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, serde::Serialize)]
pub struct CtlReport {
    pub backend: String,
    pub machines: usize,
    pub configurations: usize,
    /// From the first create to the last apply job on the queue.
    pub seconds_to_all_jobs: f64,
    pub machines_per_s: f64,
    /// From the first create to every configuration's status counting its machines in progress.
    pub seconds_to_all_status: f64,
    /// CPU and peak RSS of the controller over the whole run (rollout and steady state).
    pub controller: Usage,
    /// Controller CPU when every job was published.
    pub controller_cpu_seconds_rollout: f64,
    pub controller_cpu_ms_per_machine: f64,
    /// Requests the apiserver served during the rollout by verb (with `--steady`, until the controller settled),
    /// the bench's own creates and polls removed (real apiserver only).
    pub rollout_requests: BTreeMap<String, u64>,
    pub rollout_requests_per_machine: f64,
    /// Requests per minute by verb while idle after the rollout (real apiserver only).
    pub steady_requests_per_minute: BTreeMap<String, f64>,
    pub steady_seconds: f64,
    /// From the first create to the controller's last write before steady state (None: not measured, or it
    /// never settled).
    pub seconds_to_settle: Option<f64>,
    /// Apply jobs the controller published per machine, duplicates the queue dropped included (its
    /// `nio_controller_jobs_published_total` and `_jobs_duplicate_total`, probes and scans left out): 1 when every
    /// machine was queued once.
    pub apply_jobs_published_per_machine: f64,
    /// Machine status writes per machine during the whole run (`nio_controller_machine_status_writes_total`).
    pub machine_status_writes_per_machine: f64,
    /// Requests answered 429 (throttled by priority and fairness) during the whole run.
    pub throttled: u64,
}

async fn apply_jobs(js: &async_nats::jetstream::Context) -> usize {
    let Ok(stream) = js.get_stream(nio_shared::subjects::JOBS_STREAM).await else { return 0 };
    match stream.info_with_subjects("nio.jobs.*.apply.>").await {
        Ok(subjects) => subjects.try_collect::<Vec<_>>().await.map(|v| v.len()).unwrap_or(0),
        Err(_) => 0,
    }
}

/// `apiserver_request_total` summed by (verb, code) for NIO's resources and the ones the controller uses.
async fn request_counts(client: &kube::Client) -> anyhow::Result<BTreeMap<(String, String), u64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let label = |name: &str| crate::procs::metric_label(line, name).unwrap_or("").to_string();
        let resource = label("resource");
        if !["machines", "nixosconfigurations", "events", "leases", "secrets"].contains(&resource.as_str()) {
            continue;
        }
        *out.entry((label("verb"), label("code"))).or_default() += crate::procs::metric_value(line) as u64;
    }
    Ok(out)
}

fn by_verb(after: &BTreeMap<(String, String), u64>, before: &BTreeMap<(String, String), u64>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for ((verb, code), n) in after {
        let d = n.saturating_sub(before.get(&(verb.clone(), code.clone())).copied().unwrap_or(0));
        if d > 0 {
            *out.entry(verb.clone()).or_default() += d;
        }
    }
    out
}

fn throttled(counts: &BTreeMap<(String, String), u64>) -> u64 {
    counts.iter().filter(|((_, code), _)| code == "429").map(|(_, n)| *n).sum()
}

/// How long the controller writes nothing before it counts as settled.
const SETTLED: Duration = Duration::from_secs(10);

/// The controller's writes so far (its `nio_controller_api_requests_total` for every verb that writes).
async fn writes(port: u16) -> Option<f64> {
    let (_, text) = crate::procs::http_get(port, "/metrics").await?;
    let writing = |l: &&str| {
        l.starts_with("nio_controller_api_requests_total{")
            && matches!(crate::procs::metric_label(l, "verb"), Some("APPLY" | "CREATE" | "PATCH" | "DELETE"))
    };
    Some(text.lines().filter(writing).map(crate::procs::metric_value).sum())
}

/// Waits until the controller (metrics on `port`) has written nothing for [`SETTLED`]; Err at `deadline`.
async fn settle(port: u16, deadline: Instant) -> anyhow::Result<()> {
    let (mut last, mut since) = (writes(port).await, Instant::now());
    while since.elapsed() < SETTLED {
        anyhow::ensure!(Instant::now() < deadline, "the controller kept writing for 30 minutes");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = writes(port).await;
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    Ok(())
}

pub async fn run(b: CtlBench) -> anyhow::Result<CtlReport> {
    let tmp = tempfile::tempdir()?;
    let dir = b.work_dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let dir = &dir;
    let nats = NatsServer::start().await?;
    let kubeconfig = dir.as_path().join("kubeconfig");
    let (_sim, real, client) = match b.backend {
        Backend::Sim => {
            let sim = KubeSim::start(Options::default()).await?;
            sim.write_kubeconfig(&kubeconfig)?;
            let client = sim.client()?;
            (Some(sim), None, client)
        }
        Backend::Real => {
            let real = RealKube::start(&dir.as_path().join("realkube"), 0).await?;
            real.write_kubeconfig(&kubeconfig)?;
            let client = real.client().await?;
            let crds = crate::kubesim::default_crds_dir().ok_or_else(|| anyhow::anyhow!("crds/ not found"))?;
            crate::realkube::install_crds(&client, &crds).await?;
            (None, Some(real), client)
        }
    };
    let counts = || async {
        match &real {
            Some(_) => request_counts(&client).await.unwrap_or_default(),
            None => BTreeMap::new(),
        }
    };
    let repo = GitRepo::create(dir.as_path())?;
    let port = free_port()?;
    let args: Vec<String> = vec![
        "--cluster-name".into(),
        "bench".into(),
        "--nats-url".into(),
        nats.url(),
        "--cache-dir".into(),
        dir.as_path().join("cache").display().to_string(),
        "--probe-interval".into(),
        "1h".into(),
        "--metrics-addr".into(),
        format!("127.0.0.1:{port}"),
        "--lease-namespace".into(),
        "default".into(),
    ];
    let mut ctl = Proc::spawn(
        "controller",
        &bin_path("nio-controller")?,
        &args,
        &[("KUBECONFIG", kubeconfig.display().to_string())],
        dir.as_path(),
        port,
    )?;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    let machines: Api<Machine> = Api::namespaced(client.clone(), "default");
    let configs: Api<NixosConfiguration> = Api::namespaced(client.clone(), "default");
    let url = repo.url();
    let n = b.machines;
    let fleets = b.configurations;
    let before = counts().await;
    let t0 = Instant::now();
    let creates = futures::stream::iter(0..n)
        .map(|i| {
            let (machines, configs, url) = (machines.clone(), configs.clone(), url.clone());
            async move {
                let fleet = if fleets == 0 { format!("f{i}") } else { format!("f{}", i % fleets) };
                let m: Machine = serde_json::from_value(json!({
                    "apiVersion": "nixos.infra/v1alpha1", "kind": "Machine",
                    "metadata": {"name": format!("m{i}"), "labels": {"fleet": fleet}},
                    "spec": {"hostname": format!("m{i}.example.org"), "site": format!("dc{}", i % 4)}
                }))?;
                machines.create(&PostParams::default(), &m).await?;
                if fleets == 0 || i < fleets {
                    let target = if fleets == 0 {
                        json!({"machineRef": format!("m{i}")})
                    } else {
                        json!({"machineSelector": {"matchLabels": {"fleet": fleet}}})
                    };
                    let mut spec = json!({"gitRepo": url, "ref": "main", "flake": "#web"});
                    for (k, v) in target.as_object().into_iter().flatten() {
                        spec[k] = v.clone();
                    }
                    let c: NixosConfiguration = serde_json::from_value(json!({
                        "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration",
                        "metadata": {"name": format!("c{i}")}, "spec": spec
                    }))?;
                    configs.create(&PostParams::default(), &c).await?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>();
    creates.await?;
    let deadline = Instant::now() + Duration::from_secs(1800);
    while apply_jobs(&js).await < n {
        anyhow::ensure!(Instant::now() < deadline, "only {} of {n} jobs after 30 minutes", apply_jobs(&js).await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let jobs_s = t0.elapsed().as_secs_f64();
    ctl.sample();
    let cpu_rollout = ctl.last.cpu_seconds;
    let n_configs = if fleets == 0 { n } else { fleets };
    let mut polls = 0u64;
    loop {
        polls += 1;
        let list = configs.list(&Default::default()).await?;
        let written = list
            .items
            .iter()
            .filter(|c| c.status.as_ref().is_some_and(|s| s.target_commit.is_some() && s.in_progress > 0))
            .count();
        if written >= n_configs {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "statuses not written after 30 minutes");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let status_s = t0.elapsed().as_secs_f64();
    // With a steady window, the rollout lasts until the controller has settled: no write of its own for SETTLED
    // (machines of sites no executor serves are marked Waiting after their jobs, and the configurations count
    // them); what it writes until then is the rollout's.
    let settled_s = match b.steady.is_zero() {
        true => None,
        false => settle(ctl.metrics_port, deadline).await.ok().map(|()| (t0.elapsed() - SETTLED).as_secs_f64()),
    };
    let after_rollout = counts().await;
    let mut rollout = by_verb(&after_rollout, &before);
    // the bench's own requests: one create per machine and per configuration, its status polls
    for (verb, own) in [("POST", (n + n_configs) as u64), ("LIST", polls)] {
        if let Some(v) = rollout.get_mut(verb) {
            *v = v.saturating_sub(own);
        }
    }
    let steady_start = Instant::now();
    tokio::time::sleep(b.steady).await;
    let steady_s = steady_start.elapsed().as_secs_f64();
    let after_steady = counts().await;
    let steady = by_verb(&after_steady, &after_rollout)
        .into_iter()
        .map(|(verb, n)| (verb, n as f64 * 60.0 / steady_s.max(1.0)))
        .collect();
    let metrics = crate::procs::http_get(ctl.metrics_port, "/metrics").await.map(|(_, text)| text).unwrap_or_default();
    std::fs::write(dir.join("controller-metrics.txt"), &metrics)?;
    let sum = |name: &str, keep: &dyn Fn(&str) -> bool| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && keep(l))
            .map(crate::procs::metric_value)
            .sum()
    };
    let apply = |l: &str| !matches!(crate::procs::metric_label(l, "action"), Some("probe" | "scan"));
    let apply_jobs =
        sum("nio_controller_jobs_published_total", &apply) + sum("nio_controller_jobs_duplicate_total", &apply);
    let status_writes = sum("nio_controller_machine_status_writes_total", &|l| {
        crate::procs::metric_label(l, "result") == Some("written")
    });
    ctl.terminate(Duration::from_secs(10)).await;
    let total: u64 = rollout.values().sum();
    Ok(CtlReport {
        backend: format!("{:?}", b.backend).to_lowercase(),
        machines: n,
        configurations: n_configs,
        seconds_to_all_jobs: jobs_s,
        machines_per_s: n as f64 / jobs_s,
        seconds_to_all_status: status_s,
        controller: ctl.last,
        controller_cpu_seconds_rollout: cpu_rollout,
        controller_cpu_ms_per_machine: cpu_rollout * 1000.0 / n as f64,
        rollout_requests: rollout,
        rollout_requests_per_machine: total as f64 / n as f64,
        steady_requests_per_minute: steady,
        steady_seconds: steady_s,
        seconds_to_settle: settled_s,
        apply_jobs_published_per_machine: apply_jobs / n as f64,
        machine_status_writes_per_machine: status_writes / n as f64,
        throttled: throttled(&after_steady),
    })
}
