#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! Rollout policy against kubesim and the real apiserver: waves that soak, pause for approval and keep to
//! their maxUnavailable; a wave over its failure budget halting the rollout and rolling its machines back.

mod common;

nio_loadtest::on_both!(
    a_resume_forgives_the_failures_so_far_and_a_new_failure_halts_again,
    waves_soak_wait_for_approval_and_keep_to_their_limit,
    a_wave_over_its_failure_budget_halts_the_rollout_and_rolls_its_machines_back,
    a_machine_whose_site_no_executor_serves_says_so_until_one_does,
    drift_is_reported_or_enforced_as_the_configuration_says,
    a_wave_whose_analysis_fails_halts_and_one_whose_analysis_holds_goes_on,
    jobs_carry_their_machines_disruption_budget_claims,
);

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use kube::api::{Patch, PatchParams};
use nio_shared::crd::{NixosConfiguration, WaveState, short_commit};
use nio_shared::protocol::{FailureCategory, Job, JobKind, Phase};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

/// Takes every stored apply job (as executors would), by machine.
async fn take_apply_jobs(env: &Env) -> BTreeMap<String, Job> {
    env.drain_jobs()
        .await
        .into_iter()
        .filter(|j| j.action.kind() == JobKind::Apply)
        .map(|j| (j.machine.clone(), j))
        .collect()
}

/// Waits until apply jobs for exactly `machines` have been taken, then returns them.
async fn jobs_for(env: &Env, machines: &[&str]) -> BTreeMap<String, Job> {
    let got = std::sync::Mutex::new(BTreeMap::new());
    env.eventually(T, &format!("apply jobs for exactly {machines:?}"), || async {
        let taken = take_apply_jobs(env).await;
        let mut got = got.lock().unwrap();
        got.extend(taken);
        got.keys().map(String::as_str).eq(machines.iter().copied()).then(|| got.clone())
    })
    .await
}

fn commit_of(j: &Job) -> &str {
    j.source.as_ref().map(|s| s.commit.as_str()).unwrap_or_default()
}

async fn config(env: &Env, name: &str) -> NixosConfiguration {
    env.configs().get(name).await.unwrap()
}

fn wave_states(c: &NixosConfiguration) -> Vec<(String, WaveState)> {
    c.status.iter().flat_map(|s| s.waves.iter().map(|w| (w.name.clone(), w.state))).collect()
}

async fn annotate(env: &Env, name: &str, key: &str, value: &str) {
    let patch = json!({"metadata": {"annotations": {key: value}}});
    env.configs().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

/// A canary wave (by label) soaks for 2 s, then waits for approval naming it and the commit; the rest goes at
/// most two machines at a time. Nothing of a later wave starts early, and every transition is an Event.
async fn waves_soak_wait_for_approval_and_keep_to_their_limit(backend: Backend) {
    let env = Env::start(backend).await;
    let metrics_port = nio_loadtest::procs::free_port().unwrap();
    let mut settings = env.settings("prod", "c1");
    settings.metrics_addr = Some(([127, 0, 0, 1], metrics_port).into());
    let (stop, task) = env.spawn(settings);
    env.machine("c1").label("role", "web").label("ring", "canary").create().await;
    for m in ["r1", "r2", "r3", "r4"] {
        env.machine(m).label("role", "web").create().await;
    }
    env.config(
        "web",
        json!({"machineSelector": {"matchLabels": {"role": "web"}}, "pollInterval": "1h", "rollout": {"waves": [
            {"name": "canary", "selector": {"matchLabels": {"ring": "canary"}}, "soak": "2s", "pause": true},
            {"name": "rest", "maxUnavailable": 2},
        ]}}),
    )
    .await;
    let commit = env.repo.head().unwrap();
    let canary = jobs_for(&env, &["c1"]).await;
    // The status is written after the jobs are out.
    let c = env
        .eventually(T, "the canary wave Progressing", || async {
            let c = config(&env, "web").await;
            (wave_states(&c).first().map(|w| w.1) == Some(WaveState::Progressing)).then_some(c)
        })
        .await;
    assert_eq!(wave_states(&c), [("canary".into(), WaveState::Progressing), ("rest".into(), WaveState::Pending)]);
    assert_eq!(c.status.as_ref().unwrap().current_wave.as_deref(), Some("canary"));

    env.report(&canary["c1"], Phase::Succeeded, |_| {}).await;
    env.eventually(T, "the canary soaking", || async {
        (wave_states(&config(&env, "web").await)[0].1 == WaveState::Soaking).then_some(())
    })
    .await;
    env.eventually(T, "the canary waiting for approval", || async {
        (wave_states(&config(&env, "web").await)[0].1 == WaveState::Paused).then_some(())
    })
    .await;
    let c = config(&env, "web").await;
    let status = c.status.clone().unwrap();
    let approve = format!("canary@{}", short_commit(&commit));
    let message = status.waves[0].message.clone().unwrap_or_default();
    assert!(message.contains(&format!("nixos.infra/approve={approve}")), "{message}");
    let progressing = status.conditions.iter().find(|c| c.type_ == "Progressing").unwrap();
    assert_eq!(progressing.reason, "AwaitingApproval");
    let (_, text) = http_get(metrics_port, "/metrics").await.unwrap();
    let ns = &env.ns;
    for series in [
        format!(
            "nio_controller_wave_state{{cluster=\"prod\",namespace=\"{ns}\",configuration=\"web\",wave=\"canary\",state=\"Paused\"}} 1"
        ),
        format!(
            "nio_controller_wave_state{{cluster=\"prod\",namespace=\"{ns}\",configuration=\"web\",wave=\"rest\",state=\"Pending\"}} 1"
        ),
        format!(
            "nio_controller_wave_machines{{cluster=\"prod\",namespace=\"{ns}\",configuration=\"web\",wave=\"canary\",state=\"updated\"}} 1"
        ),
        format!(
            "nio_controller_wave_machines{{cluster=\"prod\",namespace=\"{ns}\",configuration=\"web\",wave=\"rest\",state=\"total\"}} 4"
        ),
    ] {
        assert!(
            text.contains(&series),
            "{series} in\n{}",
            text.lines().filter(|l| l.contains("wave")).collect::<Vec<_>>().join("\n")
        );
    }
    env.never(Duration::from_secs(2), "a job of the next wave before approval", || async {
        let jobs = take_apply_jobs(&env).await;
        (!jobs.is_empty()).then_some(jobs.into_keys().collect::<Vec<_>>())
    })
    .await;

    // An approval of another commit does nothing; the right one releases two machines, then the next two.
    annotate(&env, "web", "nixos.infra/approve", "canary@000000000000").await;
    env.never(Duration::from_secs(2), "a job after a wrong approval", || async {
        let jobs = take_apply_jobs(&env).await;
        (!jobs.is_empty()).then_some(jobs.into_keys().collect::<Vec<_>>())
    })
    .await;
    annotate(&env, "web", "nixos.infra/approve", &approve).await;
    let first = jobs_for(&env, &["r1", "r2"]).await;
    env.never(Duration::from_secs(1), "a third machine of the rest while two run", || async {
        let jobs = take_apply_jobs(&env).await;
        (!jobs.is_empty()).then_some(jobs.into_keys().collect::<Vec<_>>())
    })
    .await;
    for j in first.values() {
        env.report(j, Phase::Succeeded, |_| {}).await;
    }
    let second = jobs_for(&env, &["r3", "r4"]).await;
    for j in second.values() {
        env.report(j, Phase::Succeeded, |_| {}).await;
    }
    env.eventually(T, "every wave done", || async {
        let c = config(&env, "web").await;
        let done = wave_states(&c).iter().all(|w| w.1 == WaveState::Succeeded);
        (done && c.status?.current_wave.is_none()).then_some(())
    })
    .await;
    let events = env.events_for("web").await;
    for reason in ["WaveProgressing", "WaveSoaking", "WavePaused", "WaveSucceeded", "RolloutComplete"] {
        assert!(events.iter().any(|e| e == reason), "no {reason} Event in {events:?}");
    }
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A fleet at commit C1 gets C2 in two waves; the first tolerates no failure and one of its machines fails.
/// The rollout halts (nothing of the second wave is touched, Stalled with FailureBudgetExceeded) and, with
/// RollbackAndHalt, the first wave's machines get jobs back to C1.
async fn a_wave_over_its_failure_budget_halts_the_rollout_and_rolls_its_machines_back(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    for m in ["w1", "w2", "w3", "w4"] {
        env.machine(m).label("role", "web").create().await;
    }
    env.config("web", json!({"machineSelector": {"matchLabels": {"role": "web"}}, "pollInterval": "1h"})).await;
    let c1 = env.repo.head().unwrap();
    for j in jobs_for(&env, &["w1", "w2", "w3", "w4"]).await.values() {
        env.report(j, Phase::Succeeded, |_| {}).await;
    }
    env.eventually(T, "C1 everywhere", || async {
        (config(&env, "web").await.status?.applied_commit.as_deref() == Some(c1.as_str())).then_some(())
    })
    .await;

    let c2 = env.repo.bump("C2").unwrap();
    // The waves and the push at once (the refresh makes the controller ask Git again at once).
    let patch = json!({
        "metadata": {"annotations": {"nixos.infra/refresh": c2}},
        "spec": {"rollout": {"onFailure": "RollbackAndHalt", "waves": [
            {"name": "first", "count": 2, "maxFailures": 0}, {"name": "rest"}]}},
    });
    env.configs().patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let first = jobs_for(&env, &["w1", "w2"]).await;
    assert!(first.values().all(|j| commit_of(j) == c2));
    env.report(&first["w1"], Phase::Succeeded, |_| {}).await;
    env.report(&first["w2"], Phase::Failed, |e| {
        e.category = Some(FailureCategory::HealthCheckFailed);
        e.message = Some("nginx.service failed".into());
    })
    .await;

    let back = jobs_for(&env, &["w1", "w2"]).await;
    assert!(back.values().all(|j| commit_of(j) == c1), "rolled back to C1: {back:?}");
    // The configuration's status is written after its jobs are out: wait for it.
    let c = env
        .eventually(T, "the first wave Failed", || async {
            let c = config(&env, "web").await;
            (wave_states(&c).first().map(|w| w.1) == Some(WaveState::Failed)).then_some(c)
        })
        .await;
    assert_eq!(wave_states(&c), [("first".into(), WaveState::Failed), ("rest".into(), WaveState::Pending)]);
    let stalled = c.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Stalled").cloned();
    assert_eq!(stalled.map(|s| s.reason).as_deref(), Some("FailureBudgetExceeded"));
    for j in back.values() {
        env.report(j, Phase::Succeeded, |_| {}).await;
    }
    env.eventually(T, "the first wave back at C1", || async {
        let c = config(&env, "web").await;
        let msg = c.status?.waves.first()?.message.clone()?;
        msg.contains(&format!("rolling back to {}: 2 returned", short_commit(&c1))).then_some(msg)
    })
    .await;
    env.never(Duration::from_secs(2), "C2 for the second wave of a halted rollout", || async {
        let jobs = take_apply_jobs(&env).await;
        (!jobs.is_empty()).then_some(jobs.into_keys().collect::<Vec<_>>())
    })
    .await;
    let events = env.events_for("web").await;
    assert!(events.iter().any(|e| e == "WaveFailed"), "{events:?}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A machine in a site no executor serves: its job waits on the queue, and instead of sitting Queued in
/// silence the machine says Waiting (condition NoExecutorForSite) and its configuration counts it; once an
/// executor pulls from the site's consumer, it is Queued again.
async fn a_machine_whose_site_no_executor_serves_says_so_until_one_does(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    env.machine("lonely").site("dc9").create().await;
    env.config("web", json!({"machineRef": "lonely"})).await;
    env.eventually(T, "the machine waiting for its site", || async {
        let m = env.machines().get("lonely").await.unwrap();
        let s = m.status?;
        let c = s.conditions.iter().find(|c| c.type_ == "Waiting" && c.status == "True")?.clone();
        (s.phase == Some(nio_shared::crd::MachinePhase::Waiting)).then_some(c)
    })
    .await;
    let c = env.machines().get("lonely").await.unwrap().status.unwrap();
    let waiting = c.conditions.iter().find(|c| c.type_ == "Waiting").unwrap();
    assert_eq!(waiting.reason, "NoExecutorForSite");
    assert!(waiting.message.contains("site dc9"), "{}", waiting.message);
    env.eventually(T, "the configuration counting it", || async {
        let c = config(&env, "web").await.status?;
        let p = c.conditions.iter().find(|c| c.type_ == "Progressing")?.message.clone();
        p.contains("1 wait for an executor serving site dc9").then_some(())
    })
    .await;

    // An executor for dc9 appears: its consumer with a pull request waiting.
    let stream = env.js.get_stream(nio_shared::subjects::JOBS_STREAM).await.unwrap();
    let cfg: nio_shared::config::ExecutorConfig =
        serde_json::from_value(json!({"sites": [{"name": "dc9", "maxInFlight": 1}]})).unwrap();
    let site = cfg.sites[0].clone();
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.create_consumer(nio_shared::nats::site_consumer(&site, &cfg)).await.unwrap();
    let pulling = tokio::spawn(async move {
        let mut batch = consumer.batch().max_messages(1).expires(Duration::from_secs(30)).messages().await.unwrap();
        use futures::StreamExt;
        batch.next().await
    });
    env.eventually(T, "the machine queued again", || async {
        let s = env.machines().get("lonely").await.unwrap().status?;
        (s.phase != Some(nio_shared::crd::MachinePhase::Waiting)).then_some(())
    })
    .await;
    pulling.abort();
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Two machines, each at its configuration's commit, are found by a probe running another system. Under
/// `driftPolicy: Report` (the default) the machine says Drifted and nothing runs; under Enforce it also gets
/// the target again, and once that succeeds it is no longer Drifted.
async fn drift_is_reported_or_enforced_as_the_configuration_says(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    env.machine("d1").create().await;
    env.machine("d2").create().await;
    env.config("report", json!({"machineRef": "d1", "pollInterval": "1h"})).await;
    env.config("enforce", json!({"machineRef": "d2", "pollInterval": "1h", "driftPolicy": "Enforce"})).await;
    let first = jobs_for(&env, &["d1", "d2"]).await;
    for j in first.values() {
        env.report(j, Phase::Succeeded, |_| {}).await;
    }
    let drifted = |m: &'static str| {
        let env = &env;
        async move {
            let s = env.machines().get(m).await.unwrap().status?;
            s.conditions.iter().find(|c| c.type_ == "Drifted").map(|c| c.status == "True")
        }
    };
    for m in ["d1", "d2"] {
        env.eventually(T, &format!("{m} applied"), || async {
            let s = env.machines().get(m).await.unwrap().status?;
            (s.applied_system.is_some()).then_some(())
        })
        .await;
        // A probe reports another system than the one applied.
        let machine = env.machines().get(m).await.unwrap();
        let probe = nio_controller::publish::probe_job("prod", &machine, nio_shared::protocol::Action::Probe);
        env.report(&probe, Phase::Succeeded, |e| {
            e.system = Some("/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-changed-by-hand".into());
            e.at = chrono::Utc::now();
        })
        .await;
        env.eventually(T, &format!("{m} drifted"), || async { drifted(m).await.filter(|d| *d) }).await;
    }
    let again = jobs_for(&env, &["d2"]).await;
    assert_eq!(commit_of(&again["d2"]), commit_of(&first["d2"]), "the same target again");
    assert_ne!(again["d2"].id, first["d2"].id, "under an id of its own");
    env.never(Duration::from_secs(2), "a job for the machine under Report", || async {
        let jobs = take_apply_jobs(&env).await;
        (!jobs.is_empty()).then_some(jobs.into_keys().collect::<Vec<_>>())
    })
    .await;
    env.report(&again["d2"], Phase::Succeeded, |_| {}).await;
    env.eventually(T, "d2 no longer drifted", || async { drifted("d2").await.filter(|d| !d) }).await;
    assert_eq!(drifted("d1").await, Some(true), "Report leaves the drift as it is");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A real Prometheus on loopback (no scrape targets: the analyses' queries are constant expressions, evaluated
/// by the real query engine). Returns the process and its base URL.
async fn prometheus(dir: &std::path::Path) -> (tokio::process::Child, url::Url) {
    std::fs::write(dir.join("prometheus.yml"), "global:\n  scrape_interval: 1s\n").unwrap();
    let port = nio_loadtest::procs::free_port().unwrap();
    let child = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("prom-data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (make setup installs it)");
    let deadline = std::time::Instant::now() + T;
    while http_get(port, "/-/ready").await.is_none_or(|(code, _)| code != 200) {
        assert!(std::time::Instant::now() < deadline, "prometheus did not become ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (child, url::Url::parse(&format!("http://127.0.0.1:{port}/")).unwrap())
}

/// Two configurations whose canary waves soak under an analysis against a real Prometheus: the one whose query
/// meets its condition goes on to its next wave; the one whose query does not fails its canary wave (the
/// message names the query and what it returned) and nothing of its next wave runs.
async fn a_wave_whose_analysis_fails_halts_and_one_whose_analysis_holds_goes_on(backend: Backend) {
    let env = Env::start(backend).await;
    let (_prom, url) = prometheus(env.dir.path()).await;
    let mut settings = env.settings("prod", "c1");
    settings.prometheus_url = Some(url);
    let (stop, task) = env.spawn(settings);
    for (m, app) in [("g1", "good"), ("g2", "good"), ("b1", "bad"), ("b2", "bad")] {
        env.machine(m).label("app", app).create().await;
    }
    for (name, value) in [("good", "0.01"), ("bad", "0.2")] {
        env.config(
            name,
            json!({"machineSelector": {"matchLabels": {"app": name}}, "pollInterval": "1h", "rollout": {"waves": [
                {"name": "canary", "count": 1, "soak": "1s", "analysis": {
                    "query": format!("vector({value})"), "successCondition": "result < 0.05", "interval": "1s"}},
                {"name": "rest"},
            ]}}),
        )
        .await;
    }
    let first = jobs_for(&env, &["b1", "g1"]).await;
    for j in first.values() {
        env.report(j, Phase::Succeeded, |_| {}).await;
    }
    // The good canary soaked under its analysis and the rest of its machines get the commit.
    let rest = jobs_for(&env, &["g2"]).await;
    assert!(rest.contains_key("g2"));
    let good = config(&env, "good").await.status.unwrap();
    let analysis = good.waves[0].analysis.clone().expect("the canary's analysis is recorded");
    assert!(analysis.runs >= 1 && analysis.failures == 0, "{analysis:?}");
    assert!(analysis.last_result.as_deref().unwrap().contains("met"), "{analysis:?}");
    // The bad canary fails on its analysis; the rollout halts there.
    let failed = env
        .eventually(T, "the bad canary failing its analysis", || async {
            let c = config(&env, "bad").await;
            let w = c.status?.waves.into_iter().next()?;
            (w.state == WaveState::Failed).then_some(w)
        })
        .await;
    let msg = failed.message.unwrap_or_default();
    assert!(msg.contains("analysis failed") && msg.contains("vector(0.2)") && msg.contains("0.2"), "{msg}");
    env.never(Duration::from_secs(2), "a job after the failed wave", || async {
        take_apply_jobs(&env).await.remove("b2")
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A configuration's disruption budgets: its plan keeps to them (a machine waits while one of its budgets is
/// full), and its jobs carry them as claims the executors hold slots of: by selector, per label value,
/// percentages of the covered machines.
async fn jobs_carry_their_machines_disruption_budget_claims(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    for (m, rack, role) in [("d1", "r1", "db"), ("d2", "r1", "db"), ("d3", "r2", "db"), ("w1", "r2", "web")] {
        env.machine(m).label("fleet", "x").label("rack", rack).label("role", role).create().await;
    }
    env.config(
        "fleet",
        json!({"machineSelector": {"matchLabels": {"fleet": "x"}}, "pollInterval": "1h", "rollout": {
        "disruptionBudgets": [
            {"name": "per-rack", "perLabel": "rack", "maxUnavailable": 1},
            {"name": "db", "selector": {"matchLabels": {"role": "db"}}, "maxUnavailable": "50%"},
        ]}}),
    )
    .await;
    // In name order: d1 takes the db budget (half of 3 db machines: 1) and rack r1; d2 and d3 wait for the db
    // budget; w1 is no db machine and rack r2 is free.
    let first = jobs_for(&env, &["d1", "w1"]).await;
    let claims = |j: &Job| -> Vec<(String, u32)> { j.budgets.iter().map(|b| (b.key.clone(), b.max)).collect() };
    assert_eq!(claims(&first["d1"]), [("db".to_string(), 1), ("per-rack.r1".to_string(), 1)]);
    assert_eq!(claims(&first["w1"]), [("per-rack.r2".to_string(), 1)], "not a db machine");
    env.report(&first["d1"], Phase::Succeeded, |_| {}).await;
    let second = jobs_for(&env, &["d2"]).await;
    assert_eq!(claims(&second["d2"]), [("db".to_string(), 1), ("per-rack.r1".to_string(), 1)]);
    // d3 needs the db budget and rack r2: both held until d2 and w1 finish.
    env.never(Duration::from_millis(500), "d3 does not wait for its budgets", || async {
        let jobs = take_apply_jobs(&env).await;
        (!jobs.is_empty()).then_some(jobs.into_keys().collect::<Vec<_>>())
    })
    .await;
    env.report(&second["d2"], Phase::Succeeded, |_| {}).await;
    env.report(&first["w1"], Phase::Succeeded, |_| {}).await;
    let third = jobs_for(&env, &["d3"]).await;
    assert_eq!(claims(&third["d3"]), [("db".to_string(), 1), ("per-rack.r2".to_string(), 1)]);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// `nixos.infra/resume` forgives the failures so far, once: the halted rollout goes on, and a failure after it
/// halts it again (before: a resume switched the budgets off for the rest of the commit, and every later machine
/// got the failing commit). Pausing and unpausing is no resume (before: any spec change was a new target, which
/// started the waves over and sent the failing commit on). The rollout's budget of 0 also lets one job run at a
/// time.
async fn a_resume_forgives_the_failures_so_far_and_a_new_failure_halts_again(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    for m in ["w1", "w2", "w3", "w4"] {
        env.machine(m).label("role", "web").create().await;
    }
    let spec = json!({"machineSelector": {"matchLabels": {"role": "web"}}, "pollInterval": "1h",
        "rollout": {"maxFailures": 0, "waves": [{"name": "first", "count": 2}, {"name": "rest"}]}});
    env.config("web", spec).await;
    let commit = env.repo.head().unwrap();
    let fail = |j: Job| {
        let env = &env;
        async move { env.report(&j, Phase::Failed, |e| e.category = Some(FailureCategory::HealthCheckFailed)).await }
    };
    let w1 = jobs_for(&env, &["w1"]).await;
    env.report(&w1["w1"], Phase::Succeeded, |_| {}).await;
    let w2 = jobs_for(&env, &["w2"]).await;
    fail(w2["w2"].clone()).await;
    let halted = |wave: usize| {
        let env = &env;
        async move {
            env.eventually(T, "halted", || async {
                let c = config(env, "web").await;
                (wave_states(&c).get(wave).map(|w| w.1) == Some(WaveState::Failed)).then_some(c)
            })
            .await
        }
    };
    halted(0).await;
    // Pausing and unpausing (to look into it) is no resume: the same target, still halted, nothing sent.
    for on in [true, false] {
        let p = json!({"spec": {"rollout": {"pause": on}}});
        env.configs().patch("web", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    }
    env.never(Duration::from_secs(3), "a job after pausing and unpausing a halted rollout", || async {
        let jobs = take_apply_jobs(&env).await;
        (!jobs.is_empty()).then_some(jobs.into_keys().collect::<Vec<_>>())
    })
    .await;
    halted(0).await;

    annotate(&env, "web", "nixos.infra/resume", &short_commit(&commit)).await;
    let w3 = jobs_for(&env, &["w3"]).await;
    // (the status is written after the jobs are out)
    let status = env
        .eventually(T, "the resume recorded", || async {
            let s = config(&env, "web").await.status?;
            (s.last_handled_resume.as_deref() == Some(short_commit(&commit).as_str())).then_some(s)
        })
        .await;
    assert_eq!(status.waves[0].forgiven, 1, "{:?}", status.waves);
    fail(w3["w3"].clone()).await;
    let c = halted(1).await;
    let message = c.status.unwrap().waves[1].message.clone().unwrap_or_default();
    assert!(message.contains("1 more machines failed after the resume"), "{message}");
    env.never(Duration::from_secs(2), "a job for w4 after the second halt", || async {
        let jobs = take_apply_jobs(&env).await;
        (!jobs.is_empty()).then_some(jobs.into_keys().collect::<Vec<_>>())
    })
    .await;
    // a second resume of the same commit takes a new value
    annotate(&env, "web", "nixos.infra/resume", &format!("{}@2", short_commit(&commit))).await;
    jobs_for(&env, &["w4"]).await;
    stop.cancel();
    task.await.unwrap().unwrap();
}
