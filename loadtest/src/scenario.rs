//! `nio-loadtest run` and `demo`: NIO end to end on one machine — simulated clusters and fleet, a real
//! nats-server, the real nio-controller and nio-executor binaries — with invariant checks and a report.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kube::api::{Api, ListParams, PostParams};
use nio_shared::crd::{Machine, MachinePhase, NixosConfiguration};
use serde_json::json;

use crate::fleet::{Behaviour, Fleet, FleetOptions, Latency, Op};
use crate::gitrepo::GitRepo;
use crate::kubesim::{KubeSim, Options as SimOptions};
use crate::nats::{NatsCluster, NatsServer};
use crate::procs::{Proc, Usage, bin_path, free_port};

/// Namespace of the simulated fleet's resources in every cluster.
pub const NS: &str = "sim";

/// How the measured rollout's push is announced to the controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PushVia {
    /// The `nixos.infra/refresh` annotation, set through the API (as a person or a CI job would).
    #[default]
    Annotation,
    /// A signed GitHub-shaped push delivery to each controller's webhook.
    Webhook,
}

/// A fault injected when a share of the fleet has been updated.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    KillExecutor(f64),
    RestartNats(f64),
    RestartController(f64),
    /// Kills (for good) the cluster member that leads `NIO_JOBS` (needs `nats_nodes` ≥ 3).
    KillNatsNode(f64),
    /// Kills (for good) each cluster's leading controller replica; the standby must take over (needs
    /// `controller_replicas` 2).
    KillLeader(f64),
    /// Cuts the cluster member that leads `NIO_JOBS` off from clients and the other members for
    /// [`PARTITION`], then heals it (needs `nats_nodes` ≥ 3; the members then run in network namespaces).
    PartitionNatsNode(f64),
    /// Freezes the (single) NATS server for [`FREEZE`], then thaws it: every NIO process keeps its connection
    /// but gets no answer meanwhile.
    FreezeNats(f64),
}

/// How long `freeze-nats` stalls the server: past the executors' heartbeat TTL and JetStream's request timeout
/// (5 s), within the scenario's `ackWaitSeconds`.
pub const FREEZE: Duration = Duration::from_secs(6);

/// How long `partition-nats-node` keeps the member cut off.
pub const PARTITION: Duration = Duration::from_secs(15);

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (what, at) =
            s.split_once('@').ok_or_else(|| format!("{s}: expected kind@percent, e.g. kill-executor@50%"))?;
        let pct: f64 = at.trim_end_matches('%').parse().map_err(|_| format!("{s}: bad percentage"))?;
        if !(0.0..=100.0).contains(&pct) {
            return Err(format!("{s}: percentage must be 0-100"));
        }
        let at = pct / 100.0;
        match what {
            "kill-executor" => Ok(Fault::KillExecutor(at)),
            "restart-nats" => Ok(Fault::RestartNats(at)),
            "restart-controller" => Ok(Fault::RestartController(at)),
            "kill-nats-node" => Ok(Fault::KillNatsNode(at)),
            "kill-leader" => Ok(Fault::KillLeader(at)),
            "partition-nats-node" => Ok(Fault::PartitionNatsNode(at)),
            "freeze-nats" => Ok(Fault::FreezeNats(at)),
            other => Err(format!(
                "unknown fault {other}; use kill-executor, restart-nats, restart-controller, kill-nats-node, \
                 partition-nats-node, freeze-nats or kill-leader"
            )),
        }
    }
}

impl Fault {
    fn at(&self) -> f64 {
        match self {
            Fault::KillExecutor(a)
            | Fault::RestartNats(a)
            | Fault::RestartController(a)
            | Fault::KillNatsNode(a)
            | Fault::KillLeader(a)
            | Fault::PartitionNatsNode(a)
            | Fault::FreezeNats(a) => *a,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub machines: usize,
    pub sites: usize,
    pub site_limit: u32,
    pub clusters: usize,
    pub executors: usize,
    pub switch_latency: Latency,
    pub failure_rate: f64,
    pub faults: Vec<Fault>,
    pub nats_url: Option<String>,
    /// Controller replicas per cluster: 1, or 2 (a leader and a standby on a 5 s Lease).
    pub controller_replicas: usize,
    /// Malformed job messages (not JSON, an unknown version, oversized) published on the sites' job subjects
    /// while the measured rollout runs.
    pub poison: usize,
    /// NATS servers to start when no `nats_url` is given: 1, or a JetStream cluster of 3 (or 5) with every
    /// stream and the lock bucket replicated on 3.
    pub nats_nodes: usize,
    pub deadline: Duration,
    pub quiet: bool,
    pub work_dir: Option<PathBuf>,
    /// Keep everything running after the rollout (the demo).
    pub keep_running: bool,
    /// Extra environment for the NIO processes (e.g. OTEL_EXPORTER_OTLP_ENDPOINT).
    pub env: Vec<(String, String)>,
    pub push_via: PushVia,
    /// `spec.rollout` of the measured rollout (waves, budgets), set in the push's own write together with the
    /// moved ref (pushes announced by the annotation; a webhook push leaves the spec alone).
    pub rollout: Option<serde_json::Value>,
    /// Share of the machines on which the measured commit fails its health check (every ⌈1/share⌉-th machine).
    pub broken: f64,
    /// The executors' `ackWaitSeconds`: how long a dead executor's jobs stay with it (progress acks keep the
    /// live ones'); the lock of a dead executor is taken over once its heartbeat is gone.
    pub ack_wait_seconds: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            machines: 100,
            sites: 2,
            site_limit: 10,
            clusters: 1,
            executors: 2,
            switch_latency: Latency::Fixed(Duration::from_millis(200)),
            failure_rate: 0.0,
            faults: vec![],
            nats_url: None,
            poison: 0,
            controller_replicas: 1,
            nats_nodes: 1,
            deadline: Duration::from_secs(600),
            quiet: true,
            work_dir: None,
            keep_running: false,
            env: std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")).collect(),
            push_via: PushVia::Annotation,
            rollout: None,
            broken: 0.0,
            ack_wait_seconds: 10,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Percentiles {
    /// The earliest (for `first_command_ms`: how fast NIO reacted to the push).
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// One machine's line in the final table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub machine: String,
    pub cluster: String,
    pub site: String,
    pub commit: String,
    pub duration_ms: Option<f64>,
    pub outcome: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcReport {
    pub name: String,
    /// Since the process started (the warm-up rollout included), and its peak RSS.
    #[serde(flatten)]
    pub usage: Usage,
    /// CPU seconds spent from the measured rollout's start to the report: what the rollout cost the process.
    pub rollout_cpu_seconds: f64,
}

/// The JSON report.
/// A wave at the end of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WaveReport {
    pub name: String,
    pub state: String,
    pub total: u32,
    pub updated: u32,
    pub failed: u32,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub machines: usize,
    pub sites: usize,
    pub site_limit: u32,
    pub clusters: usize,
    pub executors: usize,
    pub switch_latency_mean_ms: f64,
    pub failure_rate: f64,
    pub faults: Vec<String>,
    /// How the push was announced (annotation or webhook).
    pub push_via: PushVia,
    /// Machines on which the measured commit was made to fail.
    pub broken: usize,
    /// The rollout stopped over a failure budget (every configuration Stalled, nothing running).
    pub halted: bool,
    /// Each wave at the end (summed over clusters).
    pub waves: Vec<WaveReport>,
    /// Machines that ran no activation during the measured rollout, by the machines' own records.
    pub untouched: usize,
    /// Machines back at the warm-up commit after running the measured one (RollbackAndHalt).
    pub rolled_back: usize,
    /// Malformed job messages published during the rollout, and how many the executors terminated and counted.
    pub poison_published: usize,
    pub poison_terminated: u64,
    /// Per fault: the longest time after it in which no machine finished (the stall it caused), in ms.
    pub fault_stalls_ms: Vec<f64>,
    /// Per fault: the machines mid-job when it struck (a command of the measured rollout run, the machine not yet
    /// done) and, over them, the time from the fault to each one's next command. After `kill-executor` the
    /// slowest of these are the dead executor's jobs being taken over by another.
    pub resumed_after_fault: Vec<Resumed>,
    pub updated: usize,
    pub failed: usize,
    pub lost: usize,
    pub wall_s: f64,
    pub machines_per_s: f64,
    pub ideal_s: f64,
    pub efficiency: f64,
    /// Commit bump → machine reports the new commit.
    pub latency_ms: Percentiles,
    /// Commit bump → first SSH command on the machine.
    pub first_command_ms: Percentiles,
    /// Where that time went: commit bump → the machine's job on the queue (seen by a subscriber to the job
    /// subjects), and → an executor logged in to the machine.
    pub published_ms: Percentiles,
    /// Commit bump → an executor's first new login to the machine (on a machine whose job started on a kept
    /// connection, the login of its confirmation).
    pub login_ms: Percentiles,
    /// Machines whose first command after the bump ran on an SSH connection an executor kept from the warm-up
    /// (no login before it; `nio-executor --ssh-persist`).
    #[serde(default)]
    pub first_command_on_kept_connection: usize,
    pub max_in_flight_per_site: BTreeMap<String, usize>,
    /// For each fleet-wide disruption budget of the rollout (no selector, no perLabel): most machines under
    /// an update at once across every cluster, by the machines' own operation records.
    #[serde(default)]
    pub max_in_flight_per_budget: BTreeMap<String, usize>,
    pub processes: Vec<ProcReport>,
    /// What else shared the box during the run, in the same form: the NATS servers (`nats-{i}`; a member
    /// restarted by a fault counts from its restart) and `simulators`, this process (the simulated API server,
    /// the simulated machines' SSH servers, the recorders). On a real fleet these run elsewhere; here they compete
    /// with NIO's processes for the same cores.
    pub harness: Vec<ProcReport>,
    pub nats_jobs_published: u64,
    pub nats_status_published: u64,
    /// Machine status writes the controllers made during the measured rollout, and how many of them were
    /// refused as stale and retried (`nio_controller_machine_status_writes_total`).
    pub machine_status_writes: u64,
    pub machine_status_conflicts: u64,
    /// Kubernetes API requests the controllers made for the measured rollout, by "VERB resource"
    /// (`nio_controller_api_requests_total`, read once they stopped changing after the last machine reported),
    /// and their sum divided by the machines.
    pub api_requests: BTreeMap<String, u64>,
    pub api_requests_per_machine: f64,
    pub violations: Vec<String>,
    pub plot: Option<String>,
    /// Per machine (only for fleets of at most 200 machines).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rows: Vec<Row>,
}

/// See [`Report::resumed_after_fault`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Resumed {
    /// Machines mid-job at the fault.
    pub machines: usize,
    /// Of those, machines whose job needed no further command (their last one had already started).
    pub finished_without_more: usize,
    /// Fault → the next command, over the machines that ran one, in ms.
    pub ms: Percentiles,
    pub max_ms: f64,
}

fn resumed_after(
    at: Instant,
    t0: Instant,
    ops: &[crate::fleet::Op],
    fleet: &Fleet,
    seen: &BTreeMap<String, Instant>,
) -> Resumed {
    let done_before = |m: usize| fleet.machines.get(m).and_then(|x| seen.get(&x.name)).is_some_and(|t| *t <= at);
    let mut mid: BTreeMap<usize, Option<Instant>> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.start >= t0 && o.start <= at && !done_before(o.machine)) {
        mid.insert(o.machine, None);
    }
    for o in ops.iter().filter(|o| o.start > at) {
        if let Some(next) = mid.get_mut(&o.machine) {
            *next = Some(next.map_or(o.start, |t| t.min(o.start)));
        }
    }
    let waits: Vec<f64> = mid.values().flatten().map(|t| t.duration_since(at).as_secs_f64() * 1000.0).collect();
    let max_ms = waits.iter().copied().fold(0.0, f64::max);
    Resumed {
        machines: mid.len(),
        finished_without_more: mid.values().filter(|t| t.is_none()).count(),
        ms: pct(waits),
        max_ms,
    }
}

fn ms_since(t0: Instant, t: Instant) -> f64 {
    t.saturating_duration_since(t0).as_secs_f64() * 1000.0
}

type Published = (Arc<Mutex<BTreeMap<String, Instant>>>, tokio::task::JoinHandle<()>);

/// When each machine's first apply job from now on is published (a core subscription to the job subjects sees
/// every message JetStream stores); the task ends when aborted.
async fn watch_published(servers: &[String]) -> anyhow::Result<Published> {
    let client = async_nats::connect(servers.to_vec()).await.context("connecting to NATS")?;
    let mut sub = client.subscribe(format!("{}.*.apply.>", nio_shared::subjects::JOBS_PREFIX)).await?;
    client.flush().await?;
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let into = seen.clone();
    let task = tokio::spawn(async move {
        use futures::StreamExt;
        let _client = client;
        while let Some(m) = sub.next().await {
            let at = Instant::now();
            if let (Some(s), Ok(mut seen)) = (nio_shared::subjects::parse_job_subject(&m.subject), into.lock()) {
                seen.entry(s.machine).or_insert(at);
            }
        }
    });
    Ok((seen, task))
}

fn pct(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles { min: 0.0, p50: 0.0, p90: 0.0, p99: 0.0 };
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    Percentiles { min: v[0], p50: at(0.5), p90: at(0.9), p99: at(0.99) }
}

struct Cluster {
    sim: KubeSim,
    client: kube::Client,
    kubeconfig: PathBuf,
    controller: Proc,
    /// The second replica, when there are two (identity `{name}-1`; the first is `{name}-0`).
    standby: Option<Proc>,
    /// The first replica's webhook port, with `--push-via webhook`.
    webhook_port: Option<u16>,
    name: String,
}

/// Everything running for a scenario.
pub struct Running {
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub nats: Option<NatsServer>,
    pub nats_cluster: Option<NatsCluster>,
    pub nats_url: String,
    /// When each fault was injected.
    injected: Vec<Instant>,
    /// A partitioned NATS member and when to heal it.
    partitioned: Option<(usize, Instant)>,
    /// When to thaw a frozen NATS server.
    frozen: Option<Instant>,
    pub fleet: Fleet,
    clusters: Vec<Cluster>,
    executors: Vec<Proc>,
    repo: GitRepo,
    scenario: Scenario,
    exec_args: Vec<String>,
    ctl_args: Vec<Vec<String>>,
    /// The warm-up commit, and on how many machines the measured one was made to fail.
    first_commit: String,
    broken: usize,
    /// Each process's CPU seconds when the measured rollout started (by name; NIO's and the harness's).
    cpu_at_start: BTreeMap<String, f64>,
    /// [`Running::harness`] when the measured rollout ended (NIO's processes keep theirs in [`Proc::last`]).
    harness_at_end: BTreeMap<String, Usage>,
}

fn machine_cluster(i: usize, clusters: usize) -> usize {
    i % clusters.max(1)
}

impl Running {
    /// Starts NATS, the fleet, the clusters, the controllers and executors, and creates the resources.
    pub async fn start(s: Scenario) -> anyhow::Result<Self> {
        let (tmp, dir) = match &s.work_dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.clone())
            }
            // NIO_SCENARIO_KEEP keeps the processes' logs for a look after the run.
            None if std::env::var_os("NIO_SCENARIO_KEEP").is_some() => {
                let p = tempfile::tempdir()?.keep();
                eprintln!("scenario work dir (kept): {}", p.display());
                (None, p)
            }
            None => {
                let t = tempfile::tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let (nats, nats_cluster, nats_url) = match &s.nats_url {
            Some(u) => (None, None, u.clone()),
            None if s.nats_nodes > 1 => {
                let c = if s.faults.iter().any(|f| matches!(f, Fault::PartitionNatsNode(_))) {
                    NatsCluster::start_partitionable(&dir.join("nats"), s.nats_nodes).await?
                } else {
                    NatsCluster::start_in(&dir.join("nats"), s.nats_nodes).await?
                };
                let u = c.urls();
                (None, Some(c), u)
            }
            None => {
                let n = NatsServer::start_in(&dir.join("nats"), 0).await?;
                let u = n.url();
                (Some(n), None, u)
            }
        };
        let replicas = if s.nats_nodes > 1 { 3 } else { 1 };
        // The executors' SSH identity; the fleet authorizes its public key.
        let identity = russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)?;
        std::fs::create_dir_all(dir.join("identities"))?;
        let pem = identity.to_openssh(russh::keys::ssh_key::LineEnding::LF)?;
        std::fs::write(dir.join("identities/default"), pem.as_bytes())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("identities/default"), std::fs::Permissions::from_mode(0o600))?;
        std::fs::write(dir.join("identities/default.pub"), format!("{}\n", identity.public_key().to_openssh()?))?;
        let behaviour =
            Behaviour { switch_latency: s.switch_latency.clone(), failure_rate: s.failure_rate, ..Default::default() };
        let fleet = Fleet::start(FleetOptions {
            machines: s.machines,
            sites: s.sites,
            port: free_port()?,
            first_address: Ipv4Addr::new(127, 1, 0, 1),
            behaviour,
            paths: Default::default(),
            authorized: vec![identity.public_key().clone()],
        })
        .await?;
        let repo = GitRepo::create(&dir)?;
        std::fs::write(dir.join("seal.key"), nio_shared::seal::SealKey::generate())?;
        let sites: Vec<serde_json::Value> = (0..s.sites)
            .map(|i| json!({"name": Fleet::site_name(i), "maxInFlight": s.site_limit, "connectRate": 1000.0, "burst": 200}))
            .collect();
        let cfg = json!({"sites": sites, "ackWaitSeconds": s.ack_wait_seconds, "maxDeliver": 5, "backoffSeconds": [1, 2, 5], "jobTimeoutSeconds": 600, "lockTtlSeconds": 10, "streamReplicas": replicas});
        std::fs::write(dir.join("executor.yaml"), cfg.to_string())?;

        let ctl_bin = bin_path("nio-controller")?;
        let webhook_secret = dir.join("webhook.secret");
        std::fs::write(&webhook_secret, format!("{:032x}", rand::random::<u128>()))?;
        let mut clusters = Vec::new();
        let mut ctl_args = Vec::new();
        for c in 0..s.clusters.max(1) {
            let name = format!("cluster-{c}");
            let sim = KubeSim::start(SimOptions { name: name.clone(), ..Default::default() }).await?;
            let kubeconfig = dir.join(format!("{name}.kubeconfig"));
            sim.write_kubeconfig(&kubeconfig)?;
            let client = sim.client()?;
            let args = vec![
                "--cluster-name".into(),
                name.clone(),
                "--nats-url".into(),
                nats_url.clone(),
                "--seal-key-file".into(),
                dir.join("seal.key").display().to_string(),
                "--cache-dir".into(),
                dir.join(format!("cache-{name}")).display().to_string(),
                "--probe-interval".into(),
                "10m".into(),
                "--jobs-replicas".into(),
                replicas.to_string(),
            ];
            let mut env: Vec<(&str, String)> = s.env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            env.push(("KUBECONFIG", kubeconfig.display().to_string()));
            let mut args = args;
            let webhook_port = match s.push_via {
                PushVia::Webhook => Some(free_port()?),
                PushVia::Annotation => None,
            };
            if let Some(p) = webhook_port {
                // The first replica's (and a restarted one's) webhook; a standby gets its own port below.
                args.extend(["--webhook-secret-file".into(), webhook_secret.display().to_string()]);
                args.extend(["--webhook-addr".into(), format!("127.0.0.1:{p}")]);
            }
            let replica = |i: usize| -> anyhow::Result<Proc> {
                let port = free_port()?;
                let mut full = args.clone();
                if i > 0 && webhook_port.is_some() {
                    full.extend(["--webhook-addr".into(), format!("127.0.0.1:{}", free_port()?)]);
                }
                full.extend(["--metrics-addr".into(), format!("127.0.0.1:{port}"), "--identity".into()]);
                full.push(format!("{name}-{i}"));
                if s.controller_replicas > 1 {
                    full.extend(["--lease-duration".into(), "5".into()]);
                }
                let proc_name = if i == 0 { format!("controller-{c}") } else { format!("controller-{c}-standby") };
                Proc::spawn(&proc_name, &ctl_bin, &full, &env, &dir, port)
            };
            let controller = replica(0)?;
            let standby = if s.controller_replicas > 1 { Some(replica(1)?) } else { None };
            ctl_args.push(args);
            clusters.push(Cluster { sim, client, kubeconfig, controller, standby, webhook_port, name });
        }
        let exec_args = vec![
            "--nats-url".into(),
            nats_url.clone(),
            "--config".into(),
            dir.join("executor.yaml").display().to_string(),
            "--identities-dir".into(),
            dir.join("identities").display().to_string(),
            "--seal-key-file".into(),
            dir.join("seal.key").display().to_string(),
            "--host-key-policy".into(),
            "pinned".into(),
            "--shutdown-grace".into(),
            "5".into(),
        ];
        let mut running = Running {
            dir,
            _tmp: tmp,
            nats,
            nats_cluster,
            nats_url,
            injected: Vec::new(),
            partitioned: None,
            frozen: None,
            fleet,
            clusters,
            executors: vec![],
            repo,
            scenario: s.clone(),
            exec_args,
            ctl_args,
            first_commit: String::new(),
            cpu_at_start: BTreeMap::new(),
            harness_at_end: BTreeMap::new(),
            broken: 0,
        };
        for i in 0..s.executors.max(1) {
            running.spawn_executor(i)?;
        }
        running.create_resources().await?;
        Ok(running)
    }

    fn spawn_executor(&mut self, i: usize) -> anyhow::Result<()> {
        let bin = bin_path("nio-executor")?;
        let port = free_port()?;
        let mut args = self.exec_args.clone();
        args.extend([
            "--executor-id".into(),
            format!("executor-{i}"),
            "--cache-dir".into(),
            self.dir.join(format!("exec-cache-{i}")).display().to_string(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{port}"),
        ]);
        let name = format!("executor-{i}-{}", self.executors.len());
        let env: Vec<(&str, String)> = self.scenario.env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        self.executors.push(Proc::spawn(&name, &bin, &args, &env, &self.dir, port)?);
        Ok(())
    }

    async fn create_resources(&self) -> anyhow::Result<()> {
        for (ci, c) in self.clusters.iter().enumerate() {
            let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(c.client.clone());
            ns.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NS}}))?).await?;
            let machines: Api<Machine> = Api::namespaced(c.client.clone(), NS);
            for m in self.fleet.machines.iter().filter(|m| machine_cluster(m.index, self.clusters.len()) == ci) {
                let obj: Machine = serde_json::from_value(json!({
                    "apiVersion": "nixos.infra/v1alpha1", "kind": "Machine",
                    "metadata": {"name": m.name, "labels": {"role": "web", "nixos.infra/site": Fleet::site_name(m.site)}},
                    "spec": {"hostname": format!("{}.sim", m.name), "ipAddress": m.addr.ip().to_string(), "port": m.addr.port(),
                             "site": Fleet::site_name(m.site), "hostKey": m.host_key()}
                }))?;
                machines.create(&PostParams::default(), &obj).await?;
            }
            // A scenario with a rollout policy pins the first commit and moves the ref in the push's own write,
            // together with the policy (announce_push): following `main`, any reconcile between the commit and
            // that write (each resolves the ref anew once the resolver's short cache expires) would publish the
            // new commit's first jobs without the policy.
            let git_ref = if self.pinned() { self.repo.head()? } else { "main".to_string() };
            let cfg: NixosConfiguration = serde_json::from_value(json!({
                "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration",
                "metadata": {"name": "web"},
                "spec": {"gitRepo": self.repo.url(), "ref": git_ref, "flake": "#web", "pollInterval": "5s",
                         "machineSelector": {"matchLabels": {"role": "web"}},
                         "additionalFiles": [{"path": "extra.nix", "valueType": "Inline", "inline": "{ }"}]}
            }))?;
            Api::<NixosConfiguration>::namespaced(c.client.clone(), NS).create(&PostParams::default(), &cfg).await?;
        }
        Ok(())
    }

    /// Whether every cluster's rollout halted (Stalled, nothing queued or applying anywhere), and the waves
    /// summed over clusters.
    async fn waves(&self) -> anyhow::Result<(bool, Vec<WaveReport>)> {
        let mut halted = true;
        let mut waves: Vec<WaveReport> = Vec::new();
        for c in &self.clusters {
            let cfg = Api::<NixosConfiguration>::namespaced(c.client.clone(), NS).get("web").await?;
            let st = cfg.status.unwrap_or_default();
            let is = |t: &str| st.conditions.iter().any(|c| c.type_ == t && c.status == "True");
            // Halted and done: no jobs of the target in flight and no rollback still under way.
            halted &= is("Stalled") && !is("Progressing");
            for w in &st.waves {
                let state = format!("{:?}", w.state);
                match waves.iter_mut().find(|x| x.name == w.name) {
                    Some(x) => {
                        (x.total, x.updated, x.failed) =
                            (x.total + w.total, x.updated + w.updated, x.failed + w.failed);
                        if state == "Failed" {
                            x.state = state;
                        }
                    }
                    None => waves.push(WaveReport {
                        name: w.name.clone(),
                        state,
                        total: w.total,
                        updated: w.updated,
                        failed: w.failed,
                    }),
                }
            }
            let busy =
                Api::<Machine>::namespaced(c.client.clone(), NS).list(&ListParams::default()).await?.items.iter().any(
                    |m| {
                        matches!(
                            m.status.as_ref().and_then(|s| s.phase),
                            Some(MachinePhase::Queued | MachinePhase::Waiting | MachinePhase::Applying)
                        )
                    },
                );
            halted &= !busy;
        }
        Ok((halted, waves))
    }

    /// Machines among `touched` (fleet indices) whose status reports `commit` and no failure: returned there.
    async fn back_at(&self, commit: &str, touched: &std::collections::BTreeSet<usize>) -> anyhow::Result<usize> {
        let mut n = 0;
        for c in &self.clusters {
            for m in Api::<Machine>::namespaced(c.client.clone(), NS).list(&ListParams::default()).await?.items {
                let idx: Option<usize> = m.metadata.name.as_deref().and_then(|n| n.strip_prefix("sim-")?.parse().ok());
                let st = m.status.clone().unwrap_or_default();
                let at = st.applied_commit.as_deref() == Some(commit) && st.phase == Some(MachinePhase::Applied);
                n += usize::from(at && idx.is_some_and(|i| touched.contains(&i)));
            }
        }
        Ok(n)
    }

    /// Machines (across clusters) whose status reports `commit`, and those failed at it.
    async fn progress(&self, commit: &str) -> anyhow::Result<(Vec<(String, usize)>, Vec<String>)> {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for c in &self.clusters {
            let list = Api::<Machine>::namespaced(c.client.clone(), NS).list(&ListParams::default()).await?;
            for m in list.items {
                let s = m.status.unwrap_or_default();
                let name = m.metadata.name.unwrap_or_default();
                if s.applied_commit.as_deref() == Some(commit) {
                    let idx = name.trim_start_matches("sim-").parse().unwrap_or(0);
                    done.push((name, idx));
                } else if s.phase == Some(MachinePhase::Failed)
                    && s.failed_target.as_deref().is_some_and(|t| t.starts_with(commit))
                {
                    failed.push(name);
                }
            }
        }
        Ok((done, failed))
    }

    /// Waits until every machine reports `commit` (or failed at it), injecting faults along the way.
    async fn rollout(
        &mut self,
        commit: &str,
        faults: &[Fault],
        bars: Option<&Bars>,
    ) -> anyhow::Result<BTreeMap<String, Instant>> {
        let start = Instant::now();
        let mut seen: BTreeMap<String, Instant> = BTreeMap::new();
        let mut pending: Vec<Fault> = faults.to_vec();
        pending.sort_by(|a, b| a.at().total_cmp(&b.at()));
        let n = self.fleet.machines.len();
        loop {
            self.check_processes()?;
            let (done, failed) = self.progress(commit).await?;
            let now = Instant::now();
            for (name, idx) in &done {
                if !seen.contains_key(name) {
                    seen.insert(name.clone(), now);
                    if let Some(b) = bars {
                        b.inc(self.fleet.machines.get(*idx).map_or(0, |m| m.site));
                    }
                }
            }
            let share = done.len() as f64 / n.max(1) as f64;
            while pending.first().is_some_and(|f| share >= f.at()) {
                let f = pending.remove(0);
                self.inject(&f).await?;
            }
            if let Some((member, at)) = self.partitioned
                && now >= at
                && let Some(c) = &self.nats_cluster
            {
                tracing::info!(member, "healing the NATS partition");
                c.partition(member, false)?;
                self.partitioned = None;
            }
            if self.frozen.is_some_and(|at| now >= at) {
                self.thaw()?;
            }
            if done.len() + failed.len() >= n {
                self.thaw()?;
                return Ok(seen);
            }
            // A rollout policy may halt the rollout on purpose: done once every cluster's is halted and idle.
            if self.scenario.rollout.is_some() && self.waves().await?.0 {
                self.thaw()?;
                return Ok(seen);
            }
            if start.elapsed() > self.scenario.deadline {
                self.thaw()?;
                return Ok(seen);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails the run when a NIO process died on its own (a crash, a port taken), instead of waiting for the
    /// deadline.
    fn check_processes(&mut self) -> anyhow::Result<()> {
        for c in &mut self.clusters {
            for p in std::iter::once(&mut c.controller).chain(c.standby.as_mut()) {
                if let Some(why) = p.crashed() {
                    anyhow::bail!(why);
                }
            }
        }
        for e in &mut self.executors {
            if let Some(why) = e.crashed() {
                anyhow::bail!(why);
            }
        }
        Ok(())
    }

    /// Thaws a frozen NATS server: when its freeze is over, and at the end of a rollout.
    fn thaw(&mut self) -> anyhow::Result<()> {
        if self.frozen.take().is_some()
            && let Some(n) = &self.nats
        {
            tracing::info!("thawing the NATS server");
            n.freeze(false)?;
        }
        Ok(())
    }

    /// Waits up to `patience` for an executor to report a machine's Build step (the activation follows at once
    /// and takes the switch latency) and returns its index in [`Running::executors`] about 30 ms later.
    async fn activating_executor(&self, patience: Duration) -> Option<usize> {
        use futures::StreamExt;
        let client = async_nats::connect(nio_shared::nats::servers(&self.nats_url)).await.ok()?;
        let mut sub = client.subscribe(format!("{}.>", nio_shared::subjects::STATUS_PREFIX)).await.ok()?;
        let building = async {
            while let Some(m) = sub.next().await {
                let Ok(ev) = nio_shared::protocol::StatusEvent::decode(&m.payload) else { continue };
                if ev.phase == nio_shared::protocol::Phase::Step && ev.step == Some(nio_shared::protocol::Step::Build) {
                    // executor ids are `executor-{index}` (spawn_executor)
                    if let Some(i) = ev.executor.strip_prefix("executor-").and_then(|i| i.parse().ok()) {
                        return Some(i);
                    }
                }
            }
            None
        };
        let i = tokio::time::timeout(patience, building).await.ok().flatten()?;
        tokio::time::sleep(Duration::from_millis(30)).await;
        Some(i)
    }

    async fn inject(&mut self, f: &Fault) -> anyhow::Result<()> {
        tracing::info!(?f, "injecting fault");
        self.injected.push(Instant::now());
        match f {
            Fault::KillExecutor(_) => {
                // An executor in the middle of an activation (it reported a machine's Build step, and the
                // activation takes the switch latency), so that the kill interrupts a job with commands still to
                // run; any running one if none shows up within 10 s.
                let victim = self.activating_executor(Duration::from_secs(10)).await;
                let alive = |e: &mut Proc| e.exited().is_none();
                let i = match victim {
                    Some(i) if self.executors.get_mut(i).is_some_and(alive) => Some(i),
                    _ => self.executors.iter_mut().position(alive),
                };
                if let Some(i) = i {
                    tracing::info!(executor = %self.executors[i].name, "killing an executor");
                    if let Some(at) = self.injected.last_mut() {
                        *at = Instant::now();
                    }
                    self.executors[i].kill().await;
                }
                // A replacement comes up, as a Deployment would bring one back.
                let i = self.executors.len();
                self.spawn_executor(i)?;
            }
            Fault::RestartNats(_) => {
                if let Some(n) = self.nats.as_mut() {
                    n.restart().await?;
                }
            }
            Fault::KillLeader(_) => {
                for c in self.clusters.iter_mut() {
                    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
                        Api::namespaced(c.client.clone(), "default");
                    let holder = leases.get("nio-controller").await?.spec.and_then(|s| s.holder_identity);
                    tracing::info!(cluster = %c.name, ?holder, "killing the leading controller");
                    match (&mut c.standby, holder) {
                        (Some(standby), Some(h)) if h == format!("{}-1", c.name) => standby.kill().await,
                        _ => c.controller.kill().await,
                    }
                }
            }
            Fault::KillNatsNode(_) => {
                let c = self.nats_cluster.as_mut().context("kill-nats-node needs a NATS cluster (--nats-nodes 3)")?;
                let leader = c.stream_leader(nio_shared::subjects::JOBS_STREAM).await?;
                tracing::info!(node = leader, "killing the NIO_JOBS leader's NATS server");
                if let Some(node) = c.nodes.get_mut(leader) {
                    node.kill().await;
                }
            }
            Fault::PartitionNatsNode(_) => {
                let c =
                    self.nats_cluster.as_ref().context("partition-nats-node needs a NATS cluster (--nats-nodes 3)")?;
                let leader = c.stream_leader(nio_shared::subjects::JOBS_STREAM).await?;
                tracing::info!(node = leader, "partitioning the NIO_JOBS leader's NATS server");
                c.partition(leader, true)?;
                self.partitioned = Some((leader, Instant::now() + PARTITION));
            }
            Fault::FreezeNats(_) => {
                let n = self.nats.as_ref().context("freeze-nats needs the single NATS server (--nats-nodes 1)")?;
                tracing::info!("freezing the NATS server");
                n.freeze(true)?;
                self.frozen = Some(Instant::now() + FREEZE);
            }
            Fault::RestartController(_) => {
                let bin = bin_path("nio-controller")?;
                for (i, c) in self.clusters.iter_mut().enumerate() {
                    c.controller.kill().await;
                    let port = free_port()?;
                    let mut args = self.ctl_args[i].clone();
                    args.extend(["--metrics-addr".into(), format!("127.0.0.1:{port}")]);
                    let mut env: Vec<(&str, String)> =
                        self.scenario.env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                    env.push(("KUBECONFIG", c.kubeconfig.display().to_string()));
                    c.controller =
                        Proc::spawn(&format!("controller-{i}-restarted"), &bin, &args, &env, &self.dir, port)?;
                }
            }
        }
        Ok(())
    }

    /// Tells every cluster's controller that `commit` was pushed: through the refresh annotation (with the
    /// scenario's rollout policy, when it has one, in the same write), or as a signed GitHub push delivery to
    /// its webhook.
    /// Whether the configurations pin a commit that the push moves (a scenario with a rollout policy, pushed
    /// by the annotation), rather than follow `main`.
    fn pinned(&self) -> bool {
        self.scenario.rollout.is_some() && self.scenario.push_via == PushVia::Annotation
    }

    async fn announce_push(&self, commit: &str) -> anyhow::Result<()> {
        for c in &self.clusters {
            match c.webhook_port {
                None => {
                    let mut patch = json!({"metadata": {"annotations": {nio_shared::crd::REFRESH_ANNOTATION: commit}}});
                    if let Some(rollout) = self.scenario.rollout.as_ref().filter(|_| self.pinned()) {
                        patch["spec"] = json!({ "rollout": rollout, "ref": commit });
                    }
                    Api::<NixosConfiguration>::namespaced(c.client.clone(), NS)
                        .patch("web", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
                        .await?;
                }
                Some(port) => {
                    use hmac::{KeyInit, Mac};
                    let secret = std::fs::read(self.dir.join("webhook.secret"))?;
                    let body = serde_json::to_vec(&json!({
                        "ref": "refs/heads/main", "after": commit,
                        "repository": {"clone_url": self.repo.url()},
                    }))?;
                    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&secret)?;
                    mac.update(&body);
                    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
                    let resp = reqwest::Client::new()
                        .post(format!("http://127.0.0.1:{port}/hooks/git"))
                        .header("x-github-event", "push")
                        .header("x-github-delivery", format!("{}-{commit}", c.name))
                        .header("x-hub-signature-256", signature)
                        .body(body)
                        .send()
                        .await?;
                    let code = resp.status();
                    anyhow::ensure!(
                        code.as_u16() == 202,
                        "{}'s webhook answered {code}: {}",
                        c.name,
                        resp.text().await?
                    );
                }
            }
        }
        Ok(())
    }

    fn sample(&mut self) {
        for c in &mut self.clusters {
            c.controller.sample();
            if let Some(s) = c.standby.as_mut() {
                s.sample();
            }
        }
        for e in &mut self.executors {
            e.sample();
        }
    }

    /// The usage of what is not NIO: the NATS servers running now, and this process (`simulators`).
    fn harness(&self) -> BTreeMap<String, Usage> {
        let nodes = self.nats.iter().chain(self.nats_cluster.iter().flat_map(|c| c.nodes.iter()));
        let mut u: BTreeMap<String, Usage> =
            nodes.enumerate().filter_map(|(i, n)| Some((format!("nats-{i}"), n.usage()?))).collect();
        if let Some(me) = crate::procs::usage(std::process::id()) {
            u.insert("simulators".into(), me);
        }
        u
    }

    /// The controllers (standbys included) and executors.
    fn procs(&self) -> impl Iterator<Item = &Proc> {
        self.clusters
            .iter()
            .flat_map(|c| std::iter::once(&c.controller).chain(c.standby.as_ref()))
            .chain(self.executors.iter())
    }

    /// Kubeconfig files, one per cluster.
    pub fn kubeconfigs(&self) -> Vec<(String, PathBuf)> {
        self.clusters.iter().map(|c| (c.name.clone(), c.kubeconfig.clone())).collect()
    }

    /// Waits (up to a minute) until the executors have terminated `expected` malformed jobs; returns how many
    /// they counted (`nio_executor_malformed_jobs_total`, summed over the running executors).
    async fn malformed_terminated(&self, expected: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ports = self.executors.iter().map(|e| e.metrics_port);
            let total = metric_sum(ports, "nio_executor_malformed_jobs_total", "").await;
            if total >= expected || Instant::now() > deadline {
                return total;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The controllers' counters so far, each controller read once (so the figures agree with each other):
    /// API requests by "VERB resource" (`nio_controller_api_requests_total`), and Machine status writes under
    /// [`WRITTEN`] and [`CONFLICTS`] (`nio_controller_machine_status_writes_total`).
    async fn controller_counts(&self) -> BTreeMap<String, u64> {
        use crate::procs::{metric_label, metric_value};
        let mut out = BTreeMap::new();
        for c in &self.clusters {
            let Some((_, text)) = crate::procs::http_get(c.controller.metrics_port, "/metrics").await else { continue };
            for line in text.lines() {
                let key = if line.starts_with("nio_controller_api_requests_total{") {
                    let (Some(verb), Some(resource)) = (metric_label(line, "verb"), metric_label(line, "resource"))
                    else {
                        continue;
                    };
                    format!("{verb} {resource}")
                } else if line.starts_with("nio_controller_machine_status_writes_total{") {
                    match metric_label(line, "result") {
                        Some("written") => WRITTEN.to_string(),
                        Some("conflict") => CONFLICTS.to_string(),
                        _ => continue,
                    }
                } else {
                    continue;
                };
                *out.entry(key).or_default() += metric_value(line) as u64;
            }
        }
        out
    }

    /// The counts since `before`, once they have not changed for a second (the last machine's Event and the
    /// configurations' final status follow its report); at most 10 s.
    async fn controller_counts_since(&self, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = self.controller_counts().await;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = self.controller_counts().await;
            if now == last || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        last.into_iter()
            .map(|(k, n)| {
                let d = n.saturating_sub(before.get(&k).copied().unwrap_or(0));
                (k, d)
            })
            .filter(|(_, d)| *d > 0)
            .collect()
    }

    /// Metrics endpoints of the NIO processes.
    pub fn metrics_endpoints(&self) -> Vec<(String, String)> {
        self.clusters
            .iter()
            .map(|c| (c.controller.name.clone(), c.controller.metrics_port))
            .chain(self.executors.iter().map(|e| (e.name.clone(), e.metrics_port)))
            .map(|(n, p)| (n, format!("http://127.0.0.1:{p}/metrics")))
            .collect()
    }

    pub fn cluster_urls(&self) -> Vec<String> {
        self.clusters.iter().map(|c| c.sim.url()).collect()
    }

    /// Stops NIO's processes.
    pub async fn stop(&mut self) {
        self.sample();
        for e in &mut self.executors {
            e.terminate(Duration::from_secs(10)).await;
        }
        for c in &mut self.clusters {
            c.controller.terminate(Duration::from_secs(10)).await;
            if let Some(s) = c.standby.as_mut() {
                s.terminate(Duration::from_secs(10)).await;
            }
        }
    }
}

/// Progress bars per site.
pub struct Bars {
    _multi: indicatif::MultiProgress,
    bars: Vec<indicatif::ProgressBar>,
}

impl Bars {
    fn new(fleet: &Fleet, sites: usize) -> Self {
        let multi = indicatif::MultiProgress::new();
        let style = indicatif::ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        let bars = (0..sites)
            .map(|s| {
                let n = fleet.machines.iter().filter(|m| m.site == s).count() as u64;
                let b = multi.add(indicatif::ProgressBar::new(n));
                b.set_style(style.clone());
                b.set_prefix(Fleet::site_name(s));
                b
            })
            .collect();
        Bars { _multi: multi, bars }
    }

    fn inc(&self, site: usize) {
        if let Some(b) = self.bars.get(site) {
            b.inc(1);
        }
    }

    fn finish(&self) {
        for b in &self.bars {
            b.finish();
        }
    }
}

/// The sum of the samples of `metric` whose labels include `label` ("" for all) on the processes' `/metrics`.
async fn metric_sum(ports: impl IntoIterator<Item = u16>, metric: &str, label: &str) -> u64 {
    let mut total = 0.0;
    for port in ports {
        let Some((_, text)) = crate::procs::http_get(port, "/metrics").await else { continue };
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(metric) else { continue };
            // The metric itself, not one whose name it begins (`_total` vs `_total_created`).
            if !(rest.starts_with('{') || rest.starts_with(' ')) || !rest.contains(label) {
                continue;
            }
            total += crate::procs::metric_value(line);
        }
    }
    total as u64
}

async fn stream_seq(js: &async_nats::jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
        Err(_) => 0,
    }
}

/// [`Running::controller_counts`]' keys of the Machine status writes (not API requests: no space).
const WRITTEN: &str = "status-writes:written";
const CONFLICTS: &str = "status-writes:conflict";

/// Runs a scenario: warm-up rollout of the first commit, then the measured rollout of a new commit.
pub async fn run(s: Scenario, report_path: Option<&Path>) -> anyhow::Result<(Report, Option<Running>)> {
    let mut r = Running::start(s.clone()).await?;
    if !s.quiet {
        eprintln!(
            "{} machines in {} sites, {} cluster(s), {} executor(s); NATS at {}",
            s.machines, s.sites, s.clusters, s.executors, r.nats_url
        );
        eprintln!("warm-up: every machine installs the first commit");
    }
    let first = r.repo.head()?;
    r.first_commit = first.clone();
    r.rollout(&first, &[], None).await?;
    let servers = nio_shared::nats::servers(&r.nats_url);
    let js = async_nats::jetstream::new(async_nats::connect(servers.clone()).await.context("connecting to NATS")?);
    let jobs0 = stream_seq(&js, nio_shared::subjects::JOBS_STREAM).await;
    let status0 = stream_seq(&js, nio_shared::subjects::STATUS_STREAM).await;
    let counts0 = r.controller_counts().await;
    if let Ok(mut ops) = r.fleet.recorder.ops.lock() {
        ops.clear();
    }
    if let Ok(mut logins) = r.fleet.recorder.logins.lock() {
        logins.clear();
    }
    let published = watch_published(&servers).await?;
    let bars = (!s.quiet).then(|| Bars::new(&r.fleet, s.sites));
    if !s.quiet {
        eprintln!("measured rollout: bumping the commit");
    }
    r.sample();
    r.cpu_at_start = r.procs().map(|p| (p.name.clone(), p.last.cpu_seconds)).collect();
    r.cpu_at_start.extend(r.harness().into_iter().map(|(name, u)| (name, u.cpu_seconds)));
    let t0 = Instant::now();
    let commit = r.repo.bump("load test")?;
    if s.broken > 0.0 {
        let every = (1.0 / s.broken).round().max(1.0) as usize;
        r.broken = r.fleet.break_commit(&commit, |m| m.index % every == 0);
    }
    // Announce the push (pollInterval remains the fallback).
    r.announce_push(&commit).await?;
    let poison = tokio::spawn(publish_poison(js.clone(), s.sites, s.poison));
    let seen = r.rollout(&commit, &s.faults, bars.as_ref()).await?;
    let wall = t0.elapsed().as_secs_f64();
    let poison_published = poison.await??;
    let poison_terminated = r.malformed_terminated(poison_published as u64).await;
    if let Some(b) = &bars {
        b.finish();
    }
    r.sample();
    r.harness_at_end = r.harness();
    let jobs = stream_seq(&js, nio_shared::subjects::JOBS_STREAM).await.saturating_sub(jobs0);
    let statuses = stream_seq(&js, nio_shared::subjects::STATUS_STREAM).await.saturating_sub(status0);
    let mut requests = r.controller_counts_since(&counts0).await;
    let writes = (requests.remove(WRITTEN).unwrap_or(0), requests.remove(CONFLICTS).unwrap_or(0));
    // The plot goes next to the report, or into a work directory that outlives the run.
    let plot = match (report_path, &s.work_dir) {
        (Some(p), _) => Some(p.with_extension("svg")),
        (None, Some(d)) => Some(d.join("rollout.svg")),
        (None, None) => None,
    };
    let mut report = analyse(&mut r, &commit, &seen, t0, wall, jobs, statuses, plot.as_deref()).await?;
    published.1.abort();
    let published: Vec<f64> =
        published.0.lock().map(|p| p.values().map(|t| ms_since(t0, *t)).collect()).unwrap_or_default();
    report.published_ms = pct(published);
    (report.poison_published, report.poison_terminated) = (poison_published, poison_terminated);
    (report.machine_status_writes, report.machine_status_conflicts) = writes;
    report.api_requests_per_machine = requests.values().sum::<u64>() as f64 / s.machines.max(1) as f64;
    report.api_requests = requests;
    if let Some(p) = report_path {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    if s.keep_running {
        return Ok((report, Some(r)));
    }
    r.stop().await;
    Ok((report, None))
}

#[allow(clippy::too_many_arguments)]
async fn analyse(
    r: &mut Running,
    commit: &str,
    seen: &BTreeMap<String, Instant>,
    t0: Instant,
    wall: f64,
    jobs: u64,
    statuses: u64,
    plot: Option<&Path>,
) -> anyhow::Result<Report> {
    let s = r.scenario.clone();
    let mut violations = Vec::new();
    let (done, failed) = r.progress(commit).await?;
    let updated = done.len();
    let (halted, waves) = r.waves().await?;
    let ops_now = r.fleet.recorder.ops.lock().map(|o| o.clone()).unwrap_or_default();
    let touched: std::collections::BTreeSet<usize> =
        ops_now.iter().filter(|o| o.program == "nio-activate").map(|o| o.machine).collect();
    let untouched = s.machines.saturating_sub(touched.len());
    let rolled_back = r.back_at(&r.first_commit, &touched).await?;
    // A halted rollout leaves the waves after the failed one alone, and with RollbackAndHalt returns the failed
    // wave to the first commit: those machines are accounted for, not lost.
    let lost = if halted {
        s.machines.saturating_sub(updated + failed.len() + untouched + rolled_back)
    } else {
        s.machines.saturating_sub(updated + failed.len())
    };
    if lost > 0 {
        violations
            .push(format!("{lost} machine(s) neither reached {commit} nor reported a failure before the deadline"));
    }
    if halted {
        // The waves after the failed one: not one of their machines may have run the new commit.
        let failed_at = waves.iter().position(|w| w.state == "Failed");
        let later: u32 = failed_at.map_or(0, |i| waves[i + 1..].iter().map(|w| w.total).sum());
        if (untouched as u32) < later {
            violations.push(format!(
                "the rollout halted in wave {:?}, but only {untouched} machines were left alone; the later waves have {later}",
                failed_at.map(|i| waves[i].name.clone())
            ));
        }
    }
    if s.failure_rate == 0.0 && r.broken == 0 && !failed.is_empty() {
        violations.push(format!(
            "{} machine(s) failed with no failure injected: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        ));
    }
    if let Ok(o) = r.fleet.recorder.overlaps.lock() {
        violations.extend(o.iter().take(20).cloned());
    }
    let ops = r.fleet.recorder.ops.lock().map(|o| o.clone()).unwrap_or_default();
    for m in invariants::overlapping_machines(&ops) {
        violations.push(format!("sim-{m} ran two commands at once"));
    }
    // Site limit: machines with a command running at once, per site.
    let mut max_in_flight = BTreeMap::new();
    for site in 0..s.sites {
        let max = invariants::max_concurrent(&ops, site);
        if max > s.site_limit as usize {
            violations.push(format!(
                "site {} had {max} machines busy at once; its limit is {} ({})",
                Fleet::site_name(site),
                s.site_limit,
                describe(&invariants::busy_at_peak(&ops, |o| o.site == site), t0)
            ));
        }
        max_in_flight.insert(Fleet::site_name(site), max);
    }
    // Disruption budgets covering the whole fleet: machines under an update (activation or confirmation) at once.
    let mut per_budget = BTreeMap::new();
    for (name, max) in fleet_budgets(s.rollout.as_ref()) {
        let busy =
            invariants::max_concurrent_where(&ops, |o| matches!(o.program.as_str(), "nio-activate" | "nio-confirm"));
        if busy > max {
            let peak = invariants::busy_at_peak(&ops, |o| matches!(o.program.as_str(), "nio-activate" | "nio-confirm"));
            violations.push(format!(
                "disruption budget {name}: {busy} machines under an update at once; it allows {max} ({})",
                describe(&peak, t0)
            ));
        }
        per_budget.insert(name, busy);
    }
    // Status agrees with the fleet.
    let mut rows = Vec::new();
    for c in &r.clusters {
        let list = Api::<Machine>::namespaced(c.client.clone(), NS).list(&ListParams::default()).await?;
        for m in list.items {
            let name = m.metadata.name.clone().unwrap_or_default();
            let Some(sim) = r.fleet.machines.iter().find(|x| x.name == name) else { continue };
            let st = m.status.unwrap_or_default();
            if st.applied_commit.as_deref() == Some(commit)
                && st.current_system.as_deref() != Some(sim.current_system().as_str())
            {
                violations.push(format!(
                    "{name}: status says {:?}, the machine runs {}",
                    st.current_system,
                    sim.current_system()
                ));
            }
            if s.machines <= 200 {
                rows.push(Row {
                    machine: name.clone(),
                    cluster: c.name.clone(),
                    site: Fleet::site_name(sim.site),
                    commit: st.applied_commit_short.clone().unwrap_or_default(),
                    duration_ms: seen.get(&name).map(|t| t.duration_since(t0).as_secs_f64() * 1000.0),
                    outcome: st.phase.unwrap_or_default().as_str().into(),
                });
            }
        }
    }
    let latencies: Vec<f64> = seen.values().map(|t| t.duration_since(t0).as_secs_f64() * 1000.0).collect();
    let mut first_cmd: BTreeMap<usize, Instant> = BTreeMap::new();
    for o in &ops {
        first_cmd.entry(o.machine).and_modify(|t| *t = (*t).min(o.start)).or_insert(o.start);
    }
    let first: Vec<f64> = first_cmd.values().map(|t| t.saturating_duration_since(t0).as_secs_f64() * 1000.0).collect();
    let mut first_login: BTreeMap<usize, Instant> = BTreeMap::new();
    for (m, t) in r.fleet.recorder.logins.lock().map(|l| l.clone()).unwrap_or_default() {
        first_login.entry(m).and_modify(|l| *l = (*l).min(t)).or_insert(t);
    }
    let on_kept = first_cmd.iter().filter(|(m, t)| first_login.get(m).is_none_or(|l| l > *t)).count();
    let mean = s.switch_latency.mean().as_secs_f64();
    let ideal = (0..s.sites)
        .map(|site| {
            let n = r.fleet.machines.iter().filter(|m| m.site == site).count();
            (n as f64 / f64::from(s.site_limit.max(1))).ceil() * mean
        })
        .fold(0.0, f64::max);
    let report = |name: &str, usage: Usage| {
        let before = r.cpu_at_start.get(name).copied().unwrap_or(0.0);
        // A process restarted under the same name during the rollout (a NATS member) started counting again.
        let during = if usage.cpu_seconds >= before { usage.cpu_seconds - before } else { usage.cpu_seconds };
        ProcReport { name: name.to_string(), usage, rollout_cpu_seconds: during }
    };
    let processes: Vec<ProcReport> = r.procs().map(|p| report(&p.name, p.last)).collect();
    let harness: Vec<ProcReport> = r.harness_at_end.iter().map(|(name, u)| report(name, *u)).collect();
    let plotted = plot
        .and_then(|p| crate::plot::rollout_svg(p, &r.fleet, seen, t0, s.sites).ok().map(|_| p.display().to_string()));
    Ok(Report {
        machines: s.machines,
        sites: s.sites,
        site_limit: s.site_limit,
        clusters: s.clusters,
        executors: s.executors,
        switch_latency_mean_ms: mean * 1000.0,
        failure_rate: s.failure_rate,
        faults: s.faults.iter().map(|f| format!("{f:?}")).collect(),
        push_via: s.push_via,
        broken: r.broken,
        halted,
        waves,
        untouched,
        rolled_back,
        fault_stalls_ms: r.injected.iter().map(|at| stall_after(*at, seen)).collect(),
        resumed_after_fault: r.injected.iter().map(|at| resumed_after(*at, t0, &ops, &r.fleet, seen)).collect(),
        poison_published: 0,
        poison_terminated: 0,
        updated,
        failed: failed.len(),
        lost,
        wall_s: wall,
        machines_per_s: if wall > 0.0 { updated as f64 / wall } else { 0.0 },
        ideal_s: ideal,
        efficiency: if wall > 0.0 { ideal / wall } else { 0.0 },
        latency_ms: pct(latencies),
        first_command_ms: pct(first),
        published_ms: pct(vec![]),
        login_ms: pct(first_login.values().map(|t| ms_since(t0, *t)).collect()),
        first_command_on_kept_connection: on_kept,
        max_in_flight_per_site: max_in_flight,
        max_in_flight_per_budget: per_budget,
        processes,
        harness,
        nats_jobs_published: jobs,
        nats_status_published: statuses,
        machine_status_writes: 0,
        api_requests: BTreeMap::new(),
        api_requests_per_machine: 0.0,
        machine_status_conflicts: 0,
        violations,
        plot: plotted,
        rows,
    })
}

/// Publishes `n` malformed job messages on the sites' apply subjects, for machines that do not exist: a third
/// are not JSON, a third carry an unknown version, a third are 200 KB of junk. Returns how many the stream took.
async fn publish_poison(js: async_nats::jetstream::Context, sites: usize, n: usize) -> anyhow::Result<usize> {
    use futures::StreamExt;
    let junk = format!("{{\"v\":1,\"id\":\"{}\"", "x".repeat(200 * 1024));
    let published = futures::stream::iter(0..n)
        .map(|i| {
            let (js, junk) = (js.clone(), junk.clone());
            async move {
                let site = Fleet::site_name(i % sites.max(1));
                let subject = nio_shared::subjects::job_subject(
                    &site,
                    nio_shared::protocol::JobKind::Apply,
                    "cluster-0",
                    NS,
                    &format!("poison-{i}"),
                );
                let body = match i % 3 {
                    0 => b"this is not a job {{{".to_vec(),
                    1 => br#"{"v":99,"id":"from-the-future","action":"switch"}"#.to_vec(),
                    _ => junk.into_bytes(),
                };
                js.publish(subject, body.into()).await?.await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let ok = published.iter().filter(|r| r.is_ok()).count();
    if let Some(Err(e)) = published.into_iter().find(Result::is_err) {
        tracing::warn!(error = %e, "publishing a poison message failed");
    }
    Ok(ok)
}

/// The longest time, from `at` until the last machine finished, in which no machine finished (ms): the stall a
/// fault injected at `at` caused.
fn stall_after(at: Instant, seen: &BTreeMap<String, Instant>) -> f64 {
    let mut times: Vec<Instant> = seen.values().filter(|t| **t >= at).copied().collect();
    times.sort();
    let mut last = at;
    let mut longest = Duration::ZERO;
    for t in times {
        longest = longest.max(t.duration_since(last));
        last = t;
    }
    longest.as_secs_f64() * 1000.0
}

/// The per-machine table (machine, cluster, site, commit, duration, outcome).
pub fn table(r: &Report) -> String {
    let mut rows = r.rows.clone();
    rows.sort_by(|a, b| a.cluster.cmp(&b.cluster).then(a.site.cmp(&b.site)).then(a.machine.cmp(&b.machine)));
    let mut s = format!(
        "{:<10} {:<10} {:<8} {:<13} {:>9}  {}\n",
        "MACHINE", "CLUSTER", "SITE", "COMMIT", "DURATION", "OUTCOME"
    );
    for row in rows {
        let d = row.duration_ms.map_or("-".to_string(), |d| format!("{:.1}s", d / 1000.0));
        s.push_str(&format!(
            "{:<10} {:<10} {:<8} {:<13} {:>9}  {}\n",
            row.machine, row.cluster, row.site, row.commit, d, row.outcome
        ));
    }
    s
}

/// Human summary of a report.
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "{} machines ({} sites, limit {} per site, {} cluster(s), {} executor(s)): {} updated, {} failed, {} lost in {:.1}s\n\
         throughput {:.1} machines/s; ideal {:.1}s → efficiency {:.0}%\n\
         latency to applied p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms; to first command p50 {:.0} ms \
         (job published p50 {:.0} ms, executor logged in p50 {:.0} ms; {} started on a kept connection)\n\
         machine status writes {} ({} refused as stale and retried); API requests {:.2} per machine\n",
        r.machines,
        r.sites,
        r.site_limit,
        r.clusters,
        r.executors,
        r.updated,
        r.failed,
        r.lost,
        r.wall_s,
        r.machines_per_s,
        r.ideal_s,
        r.efficiency * 100.0,
        r.latency_ms.p50,
        r.latency_ms.p90,
        r.latency_ms.p99,
        r.first_command_ms.p50,
        r.published_ms.p50,
        r.login_ms.p50,
        r.first_command_on_kept_connection,
        r.machine_status_writes,
        r.machine_status_conflicts,
        r.api_requests_per_machine
    );
    if !r.waves.is_empty() && (r.waves.len() > 1 || r.halted) {
        let waves: Vec<String> = r
            .waves
            .iter()
            .map(|w| format!("{} {} {}/{} ({} failed)", w.name, w.state, w.updated, w.total, w.failed))
            .collect();
        s.push_str(&format!("waves: {}\n", waves.join(", ")));
    }
    if r.halted {
        s.push_str(&format!(
            "halted over a failure budget: {} machines broken, {} left untouched, {} rolled back\n",
            r.broken, r.untouched, r.rolled_back
        ));
    }
    for p in r.processes.iter().chain(&r.harness) {
        s.push_str(&format!(
            "  {:<22} cpu {:>6.2}s (the measured rollout {:.2}s)  peak rss {:>6.1} MB\n",
            p.name, p.usage.cpu_seconds, p.rollout_cpu_seconds, p.usage.peak_rss_mb
        ));
    }
    if r.violations.is_empty() {
        s.push_str("invariants: all held\n");
    } else {
        s.push_str(&format!("invariants VIOLATED ({}):\n", r.violations.len()));
        for v in &r.violations {
            s.push_str(&format!("  - {v}\n"));
        }
    }
    s
}

/// The invariant checks over recorded operations, separated so they can be tested on planted histories.
/// Operations as a violation names them: machine, command, and when it ran (seconds after the push, `t0`).
fn describe(ops: &[&Op], t0: Instant) -> String {
    let at = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
    let each: Vec<String> =
        ops.iter().map(|o| format!("sim-{} {} {:.2}–{:.2} s", o.machine, o.program, at(o.start), at(o.end))).collect();
    format!("at the peak: {}", each.join(", "))
}

/// The rollout's disruption budgets that cover every machine (no selector, no perLabel, a number): (name, max).
fn fleet_budgets(rollout: Option<&serde_json::Value>) -> Vec<(String, usize)> {
    let Some(budgets) = rollout.and_then(|r| r["disruptionBudgets"].as_array()) else { return vec![] };
    budgets
        .iter()
        .filter(|b| b.get("selector").is_none() && b.get("perLabel").is_none())
        .filter_map(|b| Some((b["name"].as_str()?.to_string(), usize::try_from(b["maxUnavailable"].as_u64()?).ok()?)))
        .collect()
}

pub mod invariants {
    use std::time::Instant;

    use crate::fleet::Op;

    /// Most operations running at once in `site`.
    pub fn max_concurrent(ops: &[Op], site: usize) -> usize {
        max_concurrent_where(ops, |o| o.site == site)
    }

    /// Most operations that `keep` selects running at once.
    pub fn max_concurrent_where(ops: &[Op], keep: impl Fn(&Op) -> bool) -> usize {
        busy_at_peak(ops, keep).len()
    }

    /// The operations `keep` selects that ran at the moment most of them ran at once: what a breached limit
    /// names, so a failure says which machines and commands broke it.
    pub fn busy_at_peak(ops: &[Op], keep: impl Fn(&Op) -> bool) -> Vec<&Op> {
        let kept: Vec<&Op> = ops.iter().filter(|o| keep(o)).collect();
        let mut edges: Vec<(Instant, i64)> = kept.iter().flat_map(|o| [(o.start, 1), (o.end, -1)]).collect();
        edges.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        let (mut cur, mut max, mut at) = (0i64, 0i64, None);
        for (t, d) in edges {
            cur += d;
            if cur > max {
                (max, at) = (cur, Some(t));
            }
        }
        let Some(at) = at else { return Vec::new() };
        kept.into_iter().filter(|o| o.start <= at && at < o.end).collect()
    }

    /// Machines on which two operations overlapped in time.
    pub fn overlapping_machines(ops: &[Op]) -> Vec<usize> {
        let mut by_machine: std::collections::BTreeMap<usize, Vec<&Op>> = Default::default();
        for o in ops {
            by_machine.entry(o.machine).or_default().push(o);
        }
        by_machine
            .into_iter()
            .filter(|(_, ops)| {
                let mut ops = ops.clone();
                ops.sort_by_key(|o| o.start);
                ops.windows(2).any(|w| w[1].start < w[0].end)
            })
            .map(|(m, _)| m)
            .collect()
    }

    #[cfg(test)]
    mod tests {
        use std::time::Duration;

        use super::*;

        fn op(machine: usize, site: usize, from_ms: u64, to_ms: u64, t0: Instant) -> Op {
            Op {
                machine,
                connection: 0,
                site,
                program: "nio-activate".into(),
                start: t0 + Duration::from_millis(from_ms),
                end: t0 + Duration::from_millis(to_ms),
                status: 0,
            }
        }

        #[test]
        fn a_planted_overlap_and_a_planted_limit_breach_are_caught() {
            let t0 = Instant::now();
            let clean = vec![op(0, 0, 0, 10, t0), op(0, 0, 10, 20, t0), op(1, 0, 5, 15, t0), op(2, 1, 0, 30, t0)];
            assert!(overlapping_machines(&clean).is_empty());
            assert_eq!(max_concurrent(&clean, 0), 2);
            let mut planted = clean.clone();
            planted.push(op(1, 0, 12, 18, t0)); // machine 1 runs two commands at once
            assert_eq!(overlapping_machines(&planted), vec![1]);
            planted.push(op(3, 0, 6, 9, t0)); // three busy in site 0
            assert_eq!(max_concurrent(&planted, 0), 3);
            let peak: Vec<usize> = busy_at_peak(&planted, |o| o.site == 0).iter().map(|o| o.machine).collect();
            assert_eq!(peak, [0, 1, 3], "the machines busy at the first peak");
        }
    }
}
