#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! The controller against a real nats-server and real Git repositories, each test on both kubesim and a real
//! kube-apiserver (where the controller runs with the ServiceAccount and RBAC of `deploy/base`).

mod common;

nio_loadtest::on_both!(
    a_machine_corrected_while_its_job_waits_or_after_it_failed_gets_a_job_with_the_new_spec,
    a_retry_annotation_tries_a_failed_machine_again_once_per_value,
    pausing_suspending_or_deleting_withdraws_the_jobs_no_executor_took,
    two_configurations_selecting_one_machine_never_take_turns_on_it,
    machines_with_an_invalid_spec_are_named_by_the_fleet_and_not_counted,
    a_deleted_configuration_whose_on_remove_flake_became_invalid_says_so,
    an_idle_controller_writes_nothing_and_stops_reconciling,
    one_object_that_does_not_decode_is_skipped_and_named_and_the_rest_reconcile,
    rollout_events_are_recorded_once_and_conditions_keep_their_transition_time,
    secrets_that_did_not_opt_in_are_never_read_and_secret_changes_apply_at_once,
    a_secret_watch_that_cannot_list_holds_back_no_configuration,
    status_events_wait_out_an_apiserver_that_refuses_their_writes,
    a_machine_relabelled_out_of_a_fleet_leaves_its_count_at_once,
    a_machine_created_again_gets_its_job_again,
    secret_files_without_a_seal_key_degrade_the_configuration_and_publish_nothing,
    a_failure_with_a_long_utf8_log_still_gets_its_event,
    a_leader_cut_off_from_the_apiserver_steps_down_before_a_standby_takes_over,
    a_machine_and_configuration_publish_exactly_one_sealed_job,
    machines_are_probed_again_each_interval_but_not_while_a_job_runs,
    new_commits_are_picked_up_sha_refs_work_and_unknown_refs_degrade,
    authenticated_https_and_ssh_remotes_use_the_credentials_secret,
    status_events_drive_machine_and_configuration_status_without_regressing,
    progress_steps_of_an_applying_machine_are_counted_and_cost_no_write,
    max_parallel_releases_the_next_machine_when_one_finishes,
    two_clusters_share_nats_but_each_sees_only_its_own_status,
    deletion_applies_on_remove_flake_and_handles_gone_and_unreachable_machines,
    invalid_specs_publish_nothing_and_say_why,
    one_of_two_replicas_leads_and_a_standby_takes_over,
    a_replica_started_while_nats_is_down_stays_alive_and_works_once_nats_is_back,
);

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use nio_shared::crd::{Machine, MachinePhase};
use nio_shared::protocol::{Action, FailureCategory, Phase, Step};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn cond(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> Option<(String, String, String)> {
    conds.iter().find(|c| c.type_ == t).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn a_machine_and_configuration_publish_exactly_one_sealed_job(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "db", "labels": {"nixos.infra/usable-by": "nio"}}, "stringData": {"password": "s3cret-value-xyz"}}))
            .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), &env.ns).create(&PostParams::default(), &secret).await.unwrap();
    env.machine("m1").create().await;
    env.config(
        "web",
        json!({
            "machineRef": "m1",
            "additionalFiles": [
                {"path": "extra.nix", "valueType": "Inline", "inline": "{ }"},
                {"path": "db/password", "valueType": "SecretRef", "secretRef": {"name": "db", "key": "password"}}
            ]
        }),
    )
    .await;
    let subject = env.subject("dc1", "apply", "prod", "m1");
    let (job, headers) = env.eventually(T, "the apply job", || env.job_on(&subject)).await;
    let head = env.repo.head().unwrap();
    assert_eq!(job.source.as_ref().unwrap().commit, head);
    assert_eq!(job.action, Action::Switch);
    assert_eq!(job.endpoint.host, "127.0.0.9");
    assert_eq!(headers.get("Nats-Msg-Id").map(|v| v.as_str().to_string()), Some(job.id.to_string()));
    // {cluster}/{namespace}/{machine}/{commit}/{what the spec deploys}.{secrets}/{action}-{move}
    let deployed = nio_controller::publish::deployed_spec(&env.configs().get("web").await.unwrap().spec);
    assert!(job.id.as_str().starts_with(&format!("prod/{}/m1/{head}/{deployed}.", env.ns)), "{}", job.id);
    let tp = headers.get("traceparent").map(|v| v.as_str().to_string()).unwrap();
    assert!(tp.starts_with("00-") && tp.len() == 55, "{tp}");
    // the secret travels sealed
    let raw = String::from_utf8(job.encode()).unwrap();
    assert!(!raw.contains("s3cret-value-xyz"));
    let key = nio_shared::seal::SealKey::from_file(&env.key_file).unwrap();
    let ctx = nio_shared::protocol::SecretFile::seal_context("prod", &env.ns, "m1", "db/password");
    assert_eq!(key.unseal(&job.secrets[0].sealed, &ctx).unwrap(), b"s3cret-value-xyz");
    assert!(job.secrets_hash.is_some());

    let m = env
        .eventually(T, "phase Queued", || async {
            let m = env.machines().get("m1").await.ok()?;
            (m.status.as_ref()?.phase == Some(MachinePhase::Queued)).then_some(m)
        })
        .await;
    assert_eq!(m.status.unwrap().last_job_id.as_deref(), Some(job.id.as_str()));
    // the first-contact scan went to the probe slot and did not displace the apply job
    env.eventually(T, "a scan", || env.job_on(env.subject("dc1", "probe", "prod", "m1"))).await;
    // longer than the 5 s poll interval: the configuration reconciles again in between
    env.never(Duration::from_secs(6), "the queued apply job was replaced", || async {
        let (still, _) = env.job_on(&subject).await?;
        (still.id != job.id).then_some(still.id)
    })
    .await;
    assert_eq!(env.stored_jobs().await, 2, "exactly one apply and one probe-slot job");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Probes recur every `--probe-interval` (±10 %) with nothing requeued per machine in between, and a machine
/// busy with a job is not probed until the job ends.
async fn machines_are_probed_again_each_interval_but_not_while_a_job_runs(backend: Backend) {
    let env = Env::start(backend).await;
    let mut settings = env.settings("prod", "c1");
    // 3 s (2.7–3.3 with the jitter): long enough for the test's status write below to land before the next
    // probe falls due, even on a busy machine.
    settings.probe_interval = Duration::from_secs(3);
    let (stop, task) = env.spawn(settings);
    env.machine("m1").create().await;
    let subject = env.subject("dc1", "probe", "prod", "m1");
    let (first, _) = env.eventually(T, "the first-contact scan", || env.job_on(&subject)).await;
    let (second, _) = env
        .eventually(T, "a probe one interval later", || async {
            env.job_on(&subject).await.filter(|(j, _)| j.id != first.id)
        })
        .await;
    let gap = second.enqueued_at - first.enqueued_at;
    // One interval, plus at most one tick of the sweep (1 s) and the reconcile's own time.
    assert!((2_500..=6_000).contains(&gap.num_milliseconds()), "probes {} ms apart", gap.num_milliseconds());
    // A job starts: no probe while it runs.
    let busy = |phase: &str| json!({"status": {"phase": phase}});
    let patch = kube::api::Patch::Merge(busy("Applying"));
    env.machines().patch_status("m1", &kube::api::PatchParams::default(), &patch).await.unwrap();
    let (before, _) = env.job_on(&subject).await.unwrap();
    env.never(Duration::from_secs(5), "a probe while the machine applies", || async {
        env.job_on(&subject).await.filter(|(j, _)| j.id != before.id).map(|(j, _)| j.id)
    })
    .await;
    // It ends: the overdue probe runs.
    let patch = kube::api::Patch::Merge(busy("Applied"));
    env.machines().patch_status("m1", &kube::api::PatchParams::default(), &patch).await.unwrap();
    env.eventually(T, "the probe after the job", || async {
        env.job_on(&subject).await.filter(|(j, _)| j.id != before.id)
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

async fn new_commits_are_picked_up_sha_refs_work_and_unknown_refs_degrade(backend: Backend) {
    let env = Env::start(backend).await;
    let mut settings = env.settings("prod", "c1");
    settings.default_poll_interval = Duration::from_secs(5);
    let (stop, task) = env.spawn(settings);
    let first = env.repo.head().unwrap();
    for n in ["a", "b", "c"] {
        env.machine(n).create().await;
    }
    // no pollInterval: the controller's --default-poll-interval (5s here) applies
    env.config("follows-main", json!({"machineRef": "a", "pollInterval": null})).await;
    env.config("pinned", json!({"machineRef": "b", "ref": first})).await;
    env.config("broken", json!({"machineRef": "c", "ref": "no-such-branch"})).await;
    let (j, _) = env.eventually(T, "job for a", || env.job_on(env.subject("dc1", "apply", "prod", "a"))).await;
    assert_eq!(j.source.unwrap().commit, first);
    let (j, _) = env.eventually(T, "job for b", || env.job_on(env.subject("dc1", "apply", "prod", "b"))).await;
    assert_eq!(j.source.unwrap().commit, first, "a SHA ref is used as is");
    let broken = env
        .eventually(T, "Degraded on the unknown ref", || async {
            let c = env.configs().get("broken").await.ok()?;
            let d = cond(&c.status?.conditions, "Degraded")?;
            (d.0 == "True").then_some(d)
        })
        .await;
    assert_eq!(broken.1, "UnknownRef");
    assert!(broken.2.contains("no-such-branch"), "{}", broken.2);
    assert!(env.job_on(env.subject("dc1", "apply", "prod", "c")).await.is_none());

    // a new commit on main reaches `a` within the poll interval (5s); `b` stays pinned
    let second = env.repo.bump("second").unwrap();
    let (j, _) = env
        .eventually(Duration::from_secs(15), "job with the new commit", || async {
            let (j, h) = env.job_on(env.subject("dc1", "apply", "prod", "a")).await?;
            (j.source.as_ref()?.commit == second).then_some((j, h))
        })
        .await;
    assert_eq!(j.source.unwrap().commit, second);
    let (b, _) = env.job_on(env.subject("dc1", "apply", "prod", "b")).await.unwrap();
    assert_eq!(b.source.unwrap().commit, first);

    // A configuration polling hourly picks a new commit up at once when its refresh annotation changes (what a
    // Git webhook does).
    env.machine("d").create().await;
    env.config("hourly", json!({"machineRef": "d", "pollInterval": "1h"})).await;
    env.eventually(T, "job for d", || env.job_on(env.subject("dc1", "apply", "prod", "d"))).await;
    let third = env.repo.bump("third").unwrap();
    let patch = json!({"metadata": {"annotations": {"nixos.infra/refresh": third}}});
    env.configs().patch("hourly", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    env.eventually(Duration::from_secs(5), "the refreshed commit", || async {
        let (j, _) = env.job_on(env.subject("dc1", "apply", "prod", "d")).await?;
        (j.source.as_ref()?.commit == third).then_some(())
    })
    .await;
    let c = env.configs().get("follows-main").await.unwrap();
    assert_eq!(c.status.unwrap().target_commit.as_deref(), Some(second.as_str()));
    stop.cancel();
    task.await.unwrap().unwrap();
}

async fn create_secret(env: &Env, name: &str, data: serde_json::Value) {
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"nixos.infra/usable-by": "nio"}}, "stringData": data}),
    )
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), &env.ns).create(&PostParams::default(), &secret).await.unwrap();
}

/// HTTPS (Apache + git http-backend, private CA, basic auth) and SSH (sshd + git-upload-pack, pinned host key)
/// remotes resolve with the credentials Secret; wrong passwords, untrusted certificates and unknown host keys
/// each degrade the configuration with their own reason and publish nothing.
/// (Also: configurations created together count no failed reconcile for their finalizers.)
async fn authenticated_https_and_ssh_remotes_use_the_credentials_secret(backend: Backend) {
    use nio_loadtest::gitserve::{HttpsGitServer, SshGitServer, TestCa};
    let env = Env::start(backend).await;
    let served = tempfile::tempdir().unwrap();
    let repo = nio_loadtest::gitrepo::GitRepo::create(served.path()).unwrap();
    let head = repo.head().unwrap();
    let https = HttpsGitServer::start(served.path(), &[("x-access-token", "tok-123"), ("alice", "pw-alice")]).unwrap();
    let ssh = SshGitServer::start().unwrap();
    let other_ca = TestCa::create(served.path(), "other").unwrap();
    let ca = String::from_utf8(https.ca.ca_pem.clone()).unwrap();
    let wrong_host = nio_loadtest::gitserve::SshGitServer::start().unwrap();
    let cases = [
        ("https-token", json!({"token": "tok-123", "ca.crt": ca}), https.url("repo")),
        ("https-user", json!({"username": "alice", "password": "pw-alice", "ca.crt": ca}), https.url("repo")),
        ("https-wrong-pw", json!({"username": "alice", "password": "nope", "ca.crt": ca}), https.url("repo")),
        (
            "https-other-ca",
            json!({"token": "tok-123", "ca.crt": String::from_utf8(other_ca.ca_pem).unwrap()}),
            https.url("repo"),
        ),
        ("https-system-ca", json!({"token": "tok-123"}), https.url("repo")),
        ("ssh-key", json!({"ssh-privatekey": ssh.client_key, "known_hosts": ssh.known_hosts}), ssh.url(repo.path())),
        (
            "ssh-changed-host-key",
            json!({"ssh-privatekey": ssh.client_key, "known_hosts": wrong_host.known_hosts.replace(
                &format!(":{}", wrong_host.port), &format!(":{}", ssh.port))}),
            ssh.url(repo.path()),
        ),
        ("ssh-no-known-hosts", json!({"ssh-privatekey": ssh.client_key}), ssh.url(repo.path())),
        (
            "ssh-user-from-secret",
            json!({"ssh-privatekey": ssh.client_key, "known_hosts": ssh.known_hosts, "username": ssh.user}),
            format!("ssh://127.0.0.1:{}{}", ssh.port, repo.path().display()),
        ),
        (
            "ssh-wrong-key",
            json!({"ssh-privatekey": wrong_host.client_key, "known_hosts": ssh.known_hosts}),
            ssh.url(repo.path()),
        ),
    ];
    for (name, data, _) in &cases {
        create_secret(&env, name, data.clone()).await;
    }
    let mut settings = env.settings("prod", "c1");
    let metrics_port = nio_loadtest::procs::free_port().unwrap();
    settings.metrics_addr = Some(([127, 0, 0, 1], metrics_port).into());
    let (stop, task) = env.spawn(settings);
    for (name, _, url) in &cases {
        env.machine(name).create().await;
        env.config(name, json!({"machineRef": name, "gitRepo": url, "credentialsRef": name})).await;
    }
    for ok in ["https-token", "https-user", "ssh-key", "ssh-user-from-secret"] {
        let subject = env.subject("dc1", "apply", "prod", ok);
        let (job, _) = env.eventually(T, ok, || env.job_on(&subject)).await;
        let source = job.source.unwrap();
        assert_eq!(source.commit, head, "{ok}");
        assert_eq!(source.credentials.as_deref(), Some(ok), "the executor is told which credentials to use");
        assert!(!source.repo.contains("tok-123") && !source.repo.contains("pw-alice"), "no secret in the URL");
    }
    for (bad, reason, says) in [
        ("https-wrong-pw", "GitAuthFailed", "refused the credentials"),
        ("https-other-ca", "GitServerUntrusted", "not trusted by ca.crt"),
        ("https-system-ca", "GitServerUntrusted", "certificate"),
        ("ssh-changed-host-key", "GitServerUntrusted", "does not match known_hosts"),
        ("ssh-no-known-hosts", "GitServerUntrusted", "no known_hosts"),
        ("ssh-wrong-key", "GitAuthFailed", "refused the credentials"),
    ] {
        let d = env
            .eventually(T, bad, || async {
                let c = env.configs().get(bad).await.ok()?;
                let d = cond(&c.status?.conditions, "Degraded")?;
                (d.0 == "True").then_some(d)
            })
            .await;
        assert_eq!(d.1, reason, "{bad}: {d:?}");
        assert!(d.2.contains(says), "{bad}: {}", d.2);
        assert!(!d.2.contains("tok-123") && !d.2.contains("pw-alice"), "{bad} leaks a secret: {}", d.2);
        assert!(env.job_on(env.subject("dc1", "apply", "prod", bad)).await.is_none(), "{bad} published");
    }
    // What an alert sees: degraded configurations by reason (refreshed every 10 s).
    let want = [("GitAuthFailed", 2), ("GitServerUntrusted", 4)];
    env.eventually(Duration::from_secs(30), "degraded configurations in /metrics", || async {
        let (_, body) = http_get(metrics_port, "/metrics").await?;
        want.iter()
            .all(|(reason, n)| {
                body.lines().any(|l| {
                    l.starts_with("nio_controller_configurations_degraded{")
                        && l.contains(&format!("reason=\"{reason}\""))
                        && l.ends_with(&format!(" {n}"))
                })
            })
            .then_some(())
    })
    .await;
    // Ten configurations created at once: the reconcile that runs from a copy older than the finalizer just
    // added is retried quietly, not counted (and logged) as a failed reconcile of category Finalizer.
    let (_, body) = http_get(metrics_port, "/metrics").await.unwrap();
    let finalizer_errors: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("nio_controller_reconcile_errors_total{") && l.contains("category=\"Finalizer\""))
        .collect();
    assert!(finalizer_errors.is_empty(), "{finalizer_errors:?}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

async fn status_events_drive_machine_and_configuration_status_without_regressing(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    let jobs = env.web_fleet_of_two(json!({})).await;
    let t0 = chrono::Utc::now();
    env.report(&jobs[0], Phase::Started, |e| e.at = t0).await;
    env.report(&jobs[0], Phase::Succeeded, |e| {
        e.at = t0 + chrono::Duration::seconds(2);
        e.host_key = Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl".into());
    })
    .await;
    // a late step and a duplicate success must not move m1 backwards
    env.report(&jobs[0], Phase::Step, |e| e.at = t0 + chrono::Duration::seconds(1)).await;
    env.report(&jobs[0], Phase::Started, |e| e.at = t0 + chrono::Duration::seconds(1)).await;
    env.report(&jobs[1], Phase::Failed, |e| {
        e.category = Some(FailureCategory::BuildFailed);
        e.message = Some("nixos-rebuild exited with status 1".into());
        e.system = None;
    })
    .await;
    let m1 = env
        .eventually(T, "m1 applied", || async {
            let m = env.machines().get("m1").await.ok()?;
            (m.status.as_ref()?.phase == Some(MachinePhase::Applied)).then_some(m)
        })
        .await;
    env.never(Duration::from_secs(1), "a late event regressed the phase", || async {
        let phase = env.machines().get("m1").await.ok()?.status?.phase;
        (phase != Some(MachinePhase::Applied)).then_some(phase)
    })
    .await;
    let s = env.machines().get("m1").await.unwrap_or(m1).status.unwrap();
    assert_eq!(s.applied_commit.as_deref(), Some(jobs[0].source.as_ref().unwrap().commit.as_str()));
    assert_eq!(s.applied_commit_short.as_deref().map(str::len), Some(12));
    assert!(s.host_key.is_some(), "trust on first use recorded the key");
    let m2 = env
        .eventually(T, "m2 failed", || async {
            let m = env.machines().get("m2").await.ok()?;
            (m.status.as_ref()?.phase == Some(MachinePhase::Failed)).then_some(m)
        })
        .await;
    assert_eq!(cond(&m2.status.unwrap().conditions, "Failed").unwrap().1, "BuildFailed");
    let c = env
        .eventually(T, "counts", || async {
            let c = env.configs().get("fleet").await.ok()?;
            let s = c.status.clone()?;
            (s.updated == 1 && s.failed == 1).then_some(c)
        })
        .await;
    let s = c.status.unwrap();
    assert_eq!((s.total, s.progress.as_deref()), (2, Some("1/2")));
    assert_eq!(cond(&s.conditions, "Degraded").unwrap().0, "True");
    assert_eq!(cond(&s.conditions, "Ready").unwrap().0, "False");
    // Events for the transitions
    let reasons = env.event_reasons().await;
    for r in ["HostKeyRecorded", "BuildFailed", "NewCommit"] {
        assert!(reasons.iter().any(|x| x == r), "no {r} Event in {reasons:?}");
    }
    // A start is the Applying phase, and a routine success is in the status only (without
    // --machine-success-events): what needs attention is an Event.
    for r in ["Applying", "Applied"] {
        assert!(!reasons.iter().any(|x| x == r), "{r} is an Event: {reasons:?}");
    }
    // the failed machine is not retried at the same target
    env.drain_jobs().await;
    // longer than the 5 s poll interval: the configuration reconciles again in between
    env.never(Duration::from_secs(6), "a failed target was republished", || {
        env.job_on(env.subject("dc1", "apply", "prod", "m2"))
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Half of a rollout's status events are progress steps of a machine already Applying: each is counted, and
/// none costs a Machine write (or moves the machine); the outcome after them does.
async fn progress_steps_of_an_applying_machine_are_counted_and_cost_no_write(backend: Backend) {
    use nio_loadtest::procs::{metric_label, metric_value};
    let env = Env::start(backend).await;
    let mut settings = env.settings("prod", "c1");
    let metrics_port = nio_loadtest::procs::free_port().unwrap();
    settings.metrics_addr = Some(([127, 0, 0, 1], metrics_port).into());
    let (stop, task) = env.spawn(settings);
    let jobs = env.web_fleet_of_two(json!({})).await;
    // (status writes, steps counted)
    let counts = || async {
        let (_, body) = http_get(metrics_port, "/metrics").await?;
        let sum = |metric: &str, label: &str, value: &str| -> u64 {
            body.lines()
                .filter(|l| l.starts_with(metric) && metric_label(l, label) == Some(value))
                .map(|l| metric_value(l) as u64)
                .sum()
        };
        Some((
            sum("nio_controller_machine_status_writes_total{", "result", "written"),
            sum("nio_controller_status_events_total{", "phase", "Step"),
        ))
    };
    let t0 = chrono::Utc::now();
    env.report(&jobs[0], Phase::Started, |e| e.at = t0).await;
    env.eventually(T, "m1 applying in the controller's cache", || async {
        let m = env.machines().get("m1").await.ok()?;
        (m.status?.phase == Some(MachinePhase::Applying)).then_some(())
    })
    .await;
    // The count once the controller's writes so far (m2's, m1's start) have settled: unchanged for a second.
    let deadline = std::time::Instant::now() + T;
    let mut settled = env.eventually(T, "metrics", counts).await;
    let (writes, steps) = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = env.eventually(T, "metrics", counts).await;
        if now == settled {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "status writes never settled: {settled:?} → {now:?}");
        settled = now;
    };
    for (i, step) in [Step::Upload, Step::Build, Step::Health].into_iter().enumerate() {
        env.report(&jobs[0], Phase::Step, |e| {
            e.step = Some(step);
            e.at = t0 + chrono::Duration::seconds(i as i64 + 1);
        })
        .await;
    }
    env.eventually(T, "three steps counted", || async {
        let (w, s) = counts().await?;
        (s == steps + 3).then_some(w)
    })
    .await;
    env.never(Duration::from_secs(1), "a progress step was written", || async {
        let (w, _) = counts().await?;
        (w != writes).then_some(w)
    })
    .await;
    let m = env.machines().get("m1").await.unwrap();
    assert_eq!(m.status.unwrap().phase, Some(MachinePhase::Applying));
    env.report(&jobs[0], Phase::Succeeded, |e| e.at = t0 + chrono::Duration::seconds(5)).await;
    env.eventually(T, "m1 applied, one write more", || async {
        let m = env.machines().get("m1").await.ok()?;
        let (w, _) = counts().await?;
        (m.status?.phase == Some(MachinePhase::Applied) && w == writes + 1).then_some(())
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// `rollout.maxParallel: 1` over three machines: one job at a time, and each machine's success (reported as
/// an executor would) releases the next at once, not at the next poll.
async fn max_parallel_releases_the_next_machine_when_one_finishes(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    for m in ["r1", "r2", "r3"] {
        env.machine(m).label("tier", "batch").create().await;
    }
    env.config(
        "batched",
        json!({"machineSelector": {"matchLabels": {"tier": "batch"}}, "rollout": {"maxParallel": 1}, "pollInterval": "1h"}),
    )
    .await;
    let mut done = Vec::new();
    for round in 0..3 {
        let jobs = env
            .eventually(T, "the next job", || async {
                let applies: Vec<_> =
                    env.drain_jobs().await.into_iter().filter(|j| j.action == Action::Switch).collect();
                (!applies.is_empty()).then_some(applies)
            })
            .await;
        assert_eq!(jobs.len(), 1, "round {round}: one machine at a time: {jobs:?}");
        let job = &jobs[0];
        assert!(!done.contains(&job.machine), "round {round}: {} again", job.machine);
        env.report(job, Phase::Started, |_| {}).await;
        env.never(Duration::from_millis(500), &format!("round {round}: a second job while one runs"), || async {
            let second: Vec<_> = env.drain_jobs().await.into_iter().filter(|j| j.action == Action::Switch).collect();
            (!second.is_empty()).then_some(second)
        })
        .await;
        env.report(job, Phase::Succeeded, |_| {}).await;
        done.push(job.machine.clone());
    }
    done.sort();
    assert_eq!(done, ["r1", "r2", "r3"]);
    stop.cancel();
    task.await.unwrap().unwrap();
}

async fn two_clusters_share_nats_but_each_sees_only_its_own_status(backend: Backend) {
    let a = Env::start(backend).await;
    let b = Env::with_nats(backend, nio_loadtest::nats::NatsServer::start().await.unwrap()).await;
    // b talks to a's NATS: one NATS, two clusters
    let mut sb = b.settings("east", "cb");
    sb.nats_url = a.nats.url();
    let (stop_a, ta) = a.spawn(a.settings("west", "ca"));
    let (stop_b, tb) = b.spawn(sb);
    a.machine("m1").create().await;
    b.machine("m1").create().await;
    a.config("web", json!({"machineRef": "m1"})).await;
    b.config("web", json!({"machineRef": "m1"})).await;
    let (west, _) = a.eventually(T, "west job", || a.job_on(a.subject("dc1", "apply", "west", "m1"))).await;
    let (east, _) = a.eventually(T, "east job", || a.job_on(b.subject("dc1", "apply", "east", "m1"))).await;
    assert_ne!(west.id, east.id);
    a.report(&east, Phase::Succeeded, |_| {}).await;
    b.eventually(T, "east applied", || async {
        let m = b.machines().get("m1").await.ok()?;
        (m.status?.phase == Some(MachinePhase::Applied)).then_some(())
    })
    .await;
    a.never(Duration::from_secs(1), "west applied east's status event", || async {
        let phase = a.machines().get("m1").await.ok()?.status?.phase;
        (phase != Some(MachinePhase::Queued)).then_some(phase)
    })
    .await;
    stop_a.cancel();
    stop_b.cancel();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
}

async fn deletion_applies_on_remove_flake_and_handles_gone_and_unreachable_machines(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    for n in ["m1", "m2"] {
        env.machine(n).create().await;
    }
    env.config("web", json!({"machineRef": "m1", "onRemoveFlake": "#decommissioned"})).await;
    env.config("web2", json!({"machineRef": "m2", "onRemoveFlake": "#decommissioned"})).await;
    env.config("ghost", json!({"machineRef": "does-not-exist", "onRemoveFlake": "#decommissioned"})).await;
    for (m, cfg) in [("m1", "web"), ("m2", "web2")] {
        let subject = env.subject("dc1", "apply", "prod", m);
        let (job, _) = env.eventually(T, "apply job", || env.job_on(&subject)).await;
        assert_eq!(job.configuration.as_deref(), Some(cfg));
        env.report(&job, Phase::Succeeded, |_| {}).await;
        env.eventually(T, "applied", || async {
            (env.machines().get(m).await.ok()?.status?.phase == Some(MachinePhase::Applied)).then_some(())
        })
        .await;
    }
    env.eventually(T, "finalizers", || async {
        let c = env.configs().get("ghost").await.ok()?;
        c.finalizers().contains(&"nixos.infra/finalizer".to_string()).then_some(())
    })
    .await;
    env.drain_jobs().await;

    // Machine already gone: released at once, with an Event.
    env.configs().delete("ghost", &DeleteParams::default()).await.unwrap();
    env.eventually(T, "ghost gone", || async { env.configs().get_opt("ghost").await.ok()?.is_none().then_some(()) })
        .await;

    // Reachable: a remove job with the onRemoveFlake attr; the finalizer stays until it succeeds.
    env.configs().delete("web", &DeleteParams::default()).await.unwrap();
    let (rm, _) = env
        .eventually(T, "remove job", || async {
            let (j, h) = env.job_on(env.subject("dc1", "apply", "prod", "m1")).await?;
            (j.action == Action::Remove).then_some((j, h))
        })
        .await;
    assert_eq!(rm.source.as_ref().unwrap().flake_attr, "decommissioned");
    env.never(Duration::from_secs(1), "the finalizer was released before the removal succeeded", || async {
        env.configs().get_opt("web").await.unwrap().is_none().then_some("web is gone")
    })
    .await;
    env.report(&rm, Phase::Succeeded, |_| {}).await;
    env.eventually(T, "web gone", || async { env.configs().get_opt("web").await.ok()?.is_none().then_some(()) }).await;
    let m1 = env.machines().get("m1").await.unwrap().status.unwrap();
    assert_eq!((m1.applied_configuration, m1.has_configuration), (None, Some(false)));

    // Unreachable: the finalizer stays and the condition says why.
    env.configs().delete("web2", &DeleteParams::default()).await.unwrap();
    let (rm2, _) = env
        .eventually(T, "remove job m2", || async {
            let (j, h) = env.job_on(env.subject("dc1", "apply", "prod", "m2")).await?;
            (j.action == Action::Remove).then_some((j, h))
        })
        .await;
    env.report(&rm2, Phase::Failed, |e| {
        e.category = Some(FailureCategory::Unreachable);
        e.message = Some("unreachable: 127.0.0.9:22: Connection refused".into());
    })
    .await;
    let c = env
        .eventually(T, "RemovalBlocked", || async {
            let c = env.configs().get("web2").await.ok()?;
            let d = cond(&c.status.clone()?.conditions, "Degraded")?;
            (d.1 == "RemovalBlocked").then_some(d)
        })
        .await;
    assert!(c.2.contains("m2") && c.2.contains("Unreachable"), "{}", c.2);
    assert!(env.configs().get_opt("web2").await.unwrap().is_some());
    stop.cancel();
    task.await.unwrap().unwrap();
}

async fn invalid_specs_publish_nothing_and_say_why(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    env.machine("m1").create().await;
    env.config("evil", json!({"machineRef": "m1", "flake": "#web; reboot", "configurationSubdir": "../../etc"})).await;
    let c = env
        .eventually(T, "Invalid condition", || async {
            let c = env.configs().get("evil").await.ok()?;
            let d = cond(&c.status?.conditions, "Invalid")?;
            (d.0 == "True").then_some(d)
        })
        .await;
    assert!(c.2.contains("spec.flake") && c.2.contains("spec.configurationSubdir"), "{}", c.2);
    env.never(Duration::from_secs(2), "a job was published for an invalid spec", || {
        env.job_on(env.subject("dc1", "apply", "prod", "m1"))
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &env.ns);
    assert!(
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("InvalidSpec"))
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

async fn one_of_two_replicas_leads_and_a_standby_takes_over(backend: Backend) {
    let env = Env::start(backend).await;
    // Health endpoints only (no metrics address): /readyz tells the leader from the standby.
    let (h1, h2) = (nio_loadtest::procs::free_port().unwrap(), nio_loadtest::procs::free_port().unwrap());
    let mut s1 = env.settings("prod", "replica-1");
    s1.leader_election = true;
    s1.health_addr = Some(([127, 0, 0, 1], h1).into());
    let mut s2 = env.settings("prod", "replica-2");
    s2.leader_election = true;
    s2.health_addr = Some(([127, 0, 0, 1], h2).into());
    let (stop1, t1) = env.spawn(s1);
    let (leases, lease) = (env.leases(), env.lease_name());
    let holder = || async { leases.get_opt(&lease).await.ok()??.spec?.holder_identity };
    assert_eq!(env.eventually(T, "a leader", holder).await, "replica-1");
    let (stop2, t2) = env.spawn(s2);
    env.machine("m1").create().await;
    env.config("web", json!({"machineRef": "m1"})).await;
    env.eventually(T, "job from the leader", || env.job_on(env.subject("dc1", "apply", "prod", "m1"))).await;
    assert_eq!(holder().await.as_deref(), Some("replica-1"), "the standby did not take over while the leader lives");
    assert_eq!(http_get(h1, "/readyz").await, Some((200, "leading".into())));
    // A standby is ready (it could take over): readiness never waits for leadership, or a rolling update
    // would never see its new replica Ready while the old one leads. (Replica 2 says "starting" until it has
    // connected to NATS and checked the streams, which may come after the leader's job.)
    let ready = env
        .eventually(T, "replica-2 started", || async {
            http_get(h2, "/readyz").await.filter(|r| !r.1.starts_with("starting"))
        })
        .await;
    assert_eq!(ready, (200, "standby".into()));
    assert_eq!(http_get(h2, "/healthz").await, Some((200, "ok".into())));
    // stop the leader: it releases the lease, and the standby leads and acts at once (not a lease later)
    stop1.cancel();
    t1.await.unwrap().unwrap();
    let released = std::time::Instant::now();
    env.eventually(Duration::from_secs(15), "replica-2 leads", || async {
        (holder().await? == "replica-2").then_some(())
    })
    .await;
    assert!(released.elapsed() < Duration::from_secs(2), "took over {:?} after the release", released.elapsed());
    env.eventually(T, "replica-2 ready", || async {
        (http_get(h2, "/readyz").await? == (200, "leading".into())).then_some(())
    })
    .await;
    env.machine("m2").create().await;
    env.config("web2", json!({"machineRef": "m2"})).await;
    env.eventually(T, "job from the new leader", || env.job_on(env.subject("dc1", "apply", "prod", "m2"))).await;
    stop2.cancel();
    t2.await.unwrap().unwrap();
}

/// A replica that starts while NATS is down (a NATS upgrade, a node lost at the same time) answers its liveness
/// probe at once, so the kubelet does not restart it in a loop, and its /readyz says what it waits for; once NATS
/// is back it becomes ready and works without a restart.
async fn a_replica_started_while_nats_is_down_stays_alive_and_works_once_nats_is_back(backend: Backend) {
    let mut env = Env::start(backend).await;
    env.nats.kill().await;
    let h = nio_loadtest::procs::free_port().unwrap();
    let mut s = env.settings("prod", "c1");
    s.health_addr = Some(([127, 0, 0, 1], h).into());
    let (stop, task) = env.spawn(s);
    env.eventually(T, "the probes served", || http_get(h, "/healthz")).await;
    // Longer than a NATS connect attempt and a JetStream request's timeout: it still waits, alive, and says why.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!task.is_finished(), "the controller stopped while NATS was down");
    assert_eq!(http_get(h, "/healthz").await, Some((200, "ok".into())));
    assert_eq!(http_get(h, "/readyz").await, Some((503, "starting: connecting to NATS".into())));
    env.nats.restart().await.unwrap();
    env.eventually(Duration::from_secs(40), "ready once NATS is back", || async {
        (http_get(h, "/readyz").await? == (200, "leading".into())).then_some(())
    })
    .await;
    env.machine("m1").create().await;
    env.config("web", json!({"machineRef": "m1"})).await;
    env.eventually(T, "a job", || env.job_on(env.subject("dc1", "apply", "prod", "m1"))).await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// The leader's connection to the apiserver hangs (a proxy stops forwarding): it must stop acting before the
/// standby can consider the lease expired (never two leaders), the standby takes over within the lease
/// duration plus a retry, and the old leader stays up as a standby instead of crashing.
async fn a_leader_cut_off_from_the_apiserver_steps_down_before_a_standby_takes_over(backend: Backend) {
    let env = Env::start(backend).await;
    let upstream: std::net::SocketAddr = {
        let url = env.controller_config.cluster_url.clone();
        format!("{}:{}", url.host().unwrap(), url.port_u16().unwrap()).parse().unwrap()
    };
    let proxy = nio_loadtest::netfault::StallProxy::start(upstream).await.unwrap();
    let (m1, m2) = (nio_loadtest::procs::free_port().unwrap(), nio_loadtest::procs::free_port().unwrap());
    let mut s1 = env.settings("prod", "replica-1");
    s1.leader_election = true;
    s1.metrics_addr = Some(([127, 0, 0, 1], m1).into());
    let mut via_proxy = env.controller_config.clone();
    let scheme = via_proxy.cluster_url.scheme_str().unwrap_or("http").to_string();
    via_proxy.cluster_url = format!("{scheme}://{}", proxy.addr).parse().unwrap();
    s1.kube_config = Some(via_proxy);
    let mut s2 = env.settings("prod", "replica-2");
    s2.leader_election = true;
    s2.metrics_addr = Some(([127, 0, 0, 1], m2).into());
    let (leases, lease) = (env.leases(), env.lease_name());
    let holder = || async { leases.get_opt(&lease).await.ok()??.spec?.holder_identity };
    let leads = |port: u16| async move {
        let (_, body) = http_get(port, "/metrics").await?;
        body.lines().find(|l| l.starts_with("nio_controller_leader{")).map(|l| l.ends_with(" 1"))
    };
    // The fleet gauges a dashboard sums over replicas: the machines each replica counts.
    let counted = |port: u16| async move {
        let (_, body) = http_get(port, "/metrics").await?;
        let values = body.lines().filter(|l| l.starts_with("nio_controller_machines{"));
        Some(values.filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok()).sum::<i64>())
    };
    env.machine("m1").create().await;
    env.config("web", json!({"machineRef": "m1"})).await;
    let (stop1, t1) = env.spawn(s1);
    env.eventually(T, "replica-1 leads", || async { (holder().await? == "replica-1").then_some(()) }).await;
    env.eventually(T, "replica-1 counts the machine", || async { (counted(m1).await? == 1).then_some(()) }).await;
    let (stop2, t2) = env.spawn(s2);
    env.eventually(T, "replica-2 stands by", || async { (!leads(m2).await?).then_some(()) }).await;
    assert_eq!(counted(m2).await, Some(0), "a standby counts no machines");

    proxy.stall(true);
    let cut = std::time::Instant::now();
    let (mut stepped_down, mut took_over) = (None, None);
    while cut.elapsed() < Duration::from_secs(20) && (stepped_down.is_none() || took_over.is_none()) {
        if stepped_down.is_none() && leads(m1).await == Some(false) {
            stepped_down = Some(cut.elapsed());
        }
        if took_over.is_none() && leads(m2).await == Some(true) {
            took_over = Some(cut.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (down, up) = (stepped_down.expect("replica-1 never stepped down"), took_over.expect("replica-2 never led"));
    assert!(down < up, "two leaders: replica-2 led at {up:?}, replica-1 stepped down only at {down:?}");
    // lease 3 s (renew deadline 2 s): the leader stops within the lease; the standby waits a full lease after
    // it last saw the record change
    assert!(down < Duration::from_secs(3), "stepped down after {down:?}");
    assert!(up <= Duration::from_secs(3) + Duration::from_secs(2), "took over after {up:?}");
    assert_eq!(holder().await.as_deref(), Some("replica-2"));
    // the fleet is counted once, by the leader: the replica that stepped down dropped its counts
    env.eventually(T, "replica-2 counts the machine", || async { (counted(m2).await? == 1).then_some(()) }).await;
    assert_eq!(counted(m1).await, Some(0), "the replica that stepped down still counts the fleet");

    // the connection heals: replica-1 is still running, as a ready standby
    proxy.stall(false);
    assert!(!t1.is_finished(), "losing the lease must not end the process");
    env.eventually(T, "replica-1 ready as a standby", || async {
        (http_get(m1, "/readyz").await? == (200, "standby".into())).then_some(())
    })
    .await;
    assert_eq!(holder().await.as_deref(), Some("replica-2"), "no flapping back");
    stop1.cancel();
    stop2.cancel();
    t1.await.unwrap().unwrap();
    t2.await.unwrap().unwrap();
}

/// Build output is often UTF-8 and long: the Warning Event still lands (the apiserver caps notes at 1024 bytes).
async fn a_failure_with_a_long_utf8_log_still_gets_its_event(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    env.machine("m1").create().await;
    env.config("web", json!({"machineRef": "m1"})).await;
    let (job, _) = env.eventually(T, "the job", || env.job_on(env.subject("dc1", "apply", "prod", "m1"))).await;
    let message = format!("error: builder for '/nix/store/…-étoile.drv' failed: {}", "ünïcödé ".repeat(150));
    env.report(&job, Phase::Failed, |e| {
        e.category = Some(FailureCategory::BuildFailed);
        e.message = Some(message.clone());
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &env.ns);
    let note = env
        .eventually(T, "the BuildFailed Event", || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find(|e| e.reason.as_deref() == Some("BuildFailed"))?.note
        })
        .await;
    assert!(note.len() <= 1024 && note.contains("étoile") && note.ends_with('…'), "{} bytes: {note}", note.len());
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Only Secrets labelled nixos.infra/usable-by=nio are read (else anyone who may create a configuration could
/// ship any Secret of the namespace anywhere); labelling one, or changing its content, is acted on at once,
/// not at the next poll; once labelled, it is read from the controller's watch, with no request of its own.
async fn secrets_that_did_not_opt_in_are_never_read_and_secret_changes_apply_at_once(backend: Backend) {
    let env = Env::start(backend).await;
    let mut settings = env.settings("prod", "c1");
    let metrics_port = nio_loadtest::procs::free_port().unwrap();
    settings.metrics_addr = Some(([127, 0, 0, 1], metrics_port).into());
    let (stop, task) = env.spawn(settings);
    // The controller's GETs of Secrets (a metadata-only read of one that did not opt in counts too).
    let secret_gets = || async {
        let (_, body) = http_get(metrics_port, "/metrics").await.unwrap();
        body.lines()
            .filter(|l| l.starts_with("nio_controller_api_requests_total{") && l.contains("resource=\"secrets\""))
            .filter(|l| l.contains("verb=\"GET\""))
            .map(nio_loadtest::procs::metric_value)
            .sum::<f64>()
    };
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let unlabelled = |name: &str, key: &str, value: &str| -> Secret {
        serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {key: value}})).unwrap()
    };
    secrets.create(&PostParams::default(), &unlabelled("db", "password", "hunter2")).await.unwrap();
    secrets.create(&PostParams::default(), &unlabelled("git", "token", "tok")).await.unwrap();
    env.machine("m1").create().await;
    env.machine("m2").create().await;
    let file =
        json!([{"path": "db/password", "valueType": "SecretRef", "secretRef": {"name": "db", "key": "password"}}]);
    env.config("web", json!({"machineRef": "m1", "additionalFiles": file, "pollInterval": "1h"})).await;
    env.config("creds", json!({"machineRef": "m2", "credentialsRef": "git", "pollInterval": "1h"})).await;
    for (cfg, secret) in [("web", "db"), ("creds", "git")] {
        let (reason, message) = env.degraded(cfg).await;
        assert_eq!(reason, "SecretNotPermitted", "{cfg}: {message}");
        assert!(message.contains(secret) && message.contains("nixos.infra/usable-by=nio"), "{cfg}: {message}");
    }
    let reasons = env.event_reasons().await;
    assert!(reasons.iter().any(|r| r == "SecretNotPermitted"), "{reasons:?}");
    assert!(env.job_on(env.subject("dc1", "apply", "prod", "m1")).await.is_none(), "nothing was shipped");

    // (a configuration refused its Secret retries, reading that Secret's metadata each time: not this one)
    env.configs().delete("creds", &DeleteParams::default()).await.unwrap();
    env.eventually(T, "creds gone", || async { env.configs().get_opt("creds").await.unwrap().is_none().then_some(()) })
        .await;
    // opting in: the job follows at once (pollInterval is an hour)
    let label = json!({"metadata": {"labels": {"nixos.infra/usable-by": "nio"}}});
    secrets.patch("db", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&label)).await.unwrap();
    let (job, _) = env
        .eventually(Duration::from_secs(5), "the job", || env.job_on(env.subject("dc1", "apply", "prod", "m1")))
        .await;
    let first_hash = job.secrets_hash.clone().unwrap();
    let gets_before = secret_gets().await;
    // a new password: a new job (new secrets hash) at once
    let change = json!({"stringData": {"password": "correct horse battery staple"}});
    secrets.patch("db", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&change)).await.unwrap();
    env.eventually(Duration::from_secs(5), "a job for the new secret", || async {
        let (j, _) = env.job_on(env.subject("dc1", "apply", "prod", "m1")).await?;
        (j.secrets_hash.as_deref()? != first_hash).then_some(())
    })
    .await;
    // An opted-in Secret is read from the controller's watch: no request for it (before: a GET per reconcile).
    assert_eq!(secret_gets().await, gets_before, "Secrets read with GET after opting in");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// deploy/base's rules for the controller, as a namespaced Role, with `secrets` and `machine_status` verbs.
fn controller_rules(secrets: &[&str], machine_status: &[&str]) -> serde_json::Value {
    json!([
        {"apiGroups": ["nixos.infra"], "resources": ["machines", "nixosconfigurations"],
         "verbs": ["get", "list", "watch", "patch", "update"]},
        {"apiGroups": ["nixos.infra"], "resources": ["nixosconfigurations/status"], "verbs": ["get", "patch", "update"]},
        {"apiGroups": ["nixos.infra"], "resources": ["machines/status"], "verbs": machine_status},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": secrets},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]}
    ])
}

/// Status events that cannot be written for a while (the apiserver refusing Machine status writes: an upgrade,
/// throttling, RBAC being mended) are retried until they can, however long that takes: the outcome lands once
/// writes work again. Before, an event was given up after 10 deliveries (~20 s) and its machine stayed
/// Applying for good.
async fn status_events_wait_out_an_apiserver_that_refuses_their_writes(backend: Backend) {
    let env = Env::start(backend).await;
    let all = ["get", "list", "watch"];
    env.grant_tester(controller_rules(&all, &["get", "patch", "update"])).await;
    let mut s = env.settings("prod", "c1");
    s.kube_config = Some(env.kube.tester_config());
    let (stop, task) = env.spawn(s);
    env.machine("m1").create().await;
    env.config("web", json!({"machineRef": "m1", "pollInterval": "1h"})).await;
    let (job, _) = env.eventually(T, "the job", || env.job_on(env.subject("dc1", "apply", "prod", "m1"))).await;
    let queued = || async {
        let st = env.machines().get("m1").await.ok()?.status?;
        (st.queued_target.as_deref() == job.id.target()).then_some(())
    };
    env.eventually(T, "m1 queued", queued).await;
    // Machine status writes refused for 25 s, while the executor's outcome comes in
    env.grant_tester(controller_rules(&all, &["get"])).await;
    let refused = std::time::Instant::now();
    env.report(&job, Phase::Succeeded, |_| {}).await;
    tokio::time::sleep(Duration::from_secs(25).saturating_sub(refused.elapsed())).await;
    let st = env.machines().get("m1").await.unwrap().status.unwrap();
    assert_ne!(st.applied_target.as_deref(), job.id.target(), "written while refused?");
    env.grant_tester(controller_rules(&all, &["get", "patch", "update"])).await;
    env.eventually(Duration::from_secs(40), "the outcome written once writes work again", || async {
        let st = env.machines().get("m1").await.ok()?.status?;
        (st.applied_target.as_deref() == job.id.target()).then_some(())
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A controller whose RBAC grants only `get` on Secrets (an operator's tightening of deploy/base): its Secret watch
/// cannot list, /readyz names that watch, and still every configuration change reaches the fleet at once. Before,
/// each failed Secret watch backed the controller's whole trigger stream off (kube-runtime: 0.8 s, doubling, up
/// to 30 s), so after half a minute a push waited ~25 s.
async fn a_secret_watch_that_cannot_list_holds_back_no_configuration(backend: Backend) {
    use nio_loadtest::procs;
    let env = Env::start(backend).await;
    // deploy/base's rules for the controller, in the test's namespace, with Secrets cut down to `get`
    env.grant_tester(controller_rules(&["get"], &["get", "patch", "update"])).await;

    let port = nio_loadtest::procs::free_port().unwrap();
    let h = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = env.settings("prod", "c1");
    s.kube_config = Some(env.kube.tester_config());
    s.health_addr = Some(h);
    let metrics_port = nio_loadtest::procs::free_port().unwrap();
    s.metrics_addr = Some(([127, 0, 0, 1], metrics_port).into());
    let (stop, task) = env.spawn(s);
    env.machine("d").create().await;
    env.config("hourly", json!({"machineRef": "d", "pollInterval": "1h"})).await;
    env.eventually(T, "the first job", || env.job_on(env.subject("dc1", "apply", "prod", "d"))).await;
    let ready = env
        .eventually(T, "/readyz naming the Secret watch", || async {
            http_get(port, "/readyz").await.filter(|(_, body)| body.contains("Secret"))
        })
        .await;
    assert_eq!(ready, (503, "leading; cannot watch Secret".into()));
    // Long enough for the old shared backoff to have grown to ~25 s; then three pushes, each picked up at once.
    tokio::time::sleep(Duration::from_secs(25)).await;
    // The failing list is retried with a growing backoff (0.8 s doubling: ~6 tries in 25 s), not every 0.8 s for
    // good (kube-runtime's default backoff started over at each relist's first event: ~25 tries).
    let (_, body) = http_get(metrics_port, "/metrics").await.unwrap();
    let tries: f64 = body
        .lines()
        .filter(|l| {
            l.starts_with("nio_controller_watch_errors_total") && procs::metric_label(l, "kind") == Some("Secret")
        })
        .map(procs::metric_value)
        .sum();
    assert!((2.0..=10.0).contains(&tries), "{tries} failed lists of Secrets in ~30 s");
    for i in 0..3 {
        let next = env.repo.bump(&format!("push {i}")).unwrap();
        let patch = json!({"metadata": {"annotations": {"nixos.infra/refresh": next}}});
        env.configs()
            .patch("hourly", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
            .await
            .unwrap();
        env.eventually(Duration::from_secs(5), "the pushed commit", || async {
            let (j, _) = env.job_on(env.subject("dc1", "apply", "prod", "d")).await?;
            (j.source.as_ref()?.commit == next).then_some(())
        })
        .await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// The same target as a new move is a new job, not a duplicate of one the queue handed out within its 5-minute
/// duplicate window: a Machine deleted and created again gets its job (before: the broker dropped it, and the
/// machine waited Queued for good). A rollback to the commit of a few minutes ago is the same case.
async fn a_machine_created_again_gets_its_job_again(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    env.machine("m1").create().await;
    env.config("web", json!({"machineRef": "m1", "pollInterval": "1h"})).await;
    let subject = env.subject("dc1", "apply", "prod", "m1");
    let (first, _) = env.eventually(T, "the job", || env.job_on(&subject)).await;
    // an executor takes it
    assert!(env.drain_jobs().await.iter().any(|j| j.id == first.id));
    env.machines().delete("m1", &DeleteParams::default()).await.unwrap();
    env.eventually(T, "m1 gone", || async { env.machines().get_opt("m1").await.unwrap().is_none().then_some(()) })
        .await;
    env.machine("m1").create().await;
    let (again, _) = env.eventually(T, "a job for the new m1", || env.job_on(&subject)).await;
    assert_eq!(again.id.target(), first.id.target(), "the same target");
    assert_ne!(again.id, first.id, "under an id of its own");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Relabelling a machine out of a fleet's selector updates that fleet at once (not at its next poll).
async fn a_machine_relabelled_out_of_a_fleet_leaves_its_count_at_once(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    let jobs = env.web_fleet_of_two(json!({"pollInterval": "1h"})).await;
    for j in &jobs {
        env.report(j, Phase::Succeeded, |_| {}).await;
    }
    let progress = |name: &'static str, want: &'static str, within: Duration| {
        let env = &env;
        async move {
            env.eventually(within, want, || async {
                (env.configs().get(name).await.ok()?.status?.progress.as_deref()? == want).then_some(())
            })
            .await
        }
    };
    let relabel = |machine: &'static str, key: &str, value: &str| {
        let patch = json!({"metadata": {"labels": {key: value}}});
        let machines = env.machines();
        async move {
            machines.patch(machine, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap()
        }
    };
    progress("fleet", "2/2", T).await;
    relabel("m2", "role", "db").await;
    progress("fleet", "1/1", Duration::from_secs(5)).await;

    // A fleet that never sent its machine a job (paused): the machine records nothing of it, and still the
    // fleet notices at once that the machine left.
    env.machine("m3").label("tier", "cache").create().await;
    let held = json!({"machineSelector": {"matchLabels": {"tier": "cache"}}, "rollout": {"pause": true}, "pollInterval": "1h"});
    env.config("held", held).await;
    progress("held", "0/1", T).await;
    relabel("m3", "tier", "none").await;
    progress("held", "0/0", Duration::from_secs(5)).await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Secret files travel sealed: a controller without a seal key says so on the configuration (condition and
/// Event) and publishes nothing, instead of failing every reconcile in its log alone.
async fn secret_files_without_a_seal_key_degrade_the_configuration_and_publish_nothing(backend: Backend) {
    let env = Env::start(backend).await;
    let mut settings = env.settings("prod", "c1");
    settings.seal_key_file = None;
    let (stop, task) = env.spawn(settings);
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let db: Secret = serde_json::from_value(json!({
        "metadata": {"name": "db", "labels": {"nixos.infra/usable-by": "nio"}},
        "stringData": {"password": "hunter2"}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &db).await.unwrap();
    env.machine("m1").create().await;
    let file =
        json!([{"path": "db/password", "valueType": "SecretRef", "secretRef": {"name": "db", "key": "password"}}]);
    env.config("web", json!({"machineRef": "m1", "additionalFiles": file, "pollInterval": "1h"})).await;
    let (reason, message) = env.degraded("web").await;
    assert_eq!(reason, "SealKeyMissing", "{message}");
    assert!(message.contains("--seal-key-file"), "{message}");
    let reasons = env.event_reasons().await;
    assert!(reasons.iter().any(|r| r == "SealKeyMissing"), "{reasons:?}");
    assert_eq!(reasons.iter().filter(|r| *r == "NewCommit").count(), 1, "{reasons:?}");
    assert!(env.job_on(env.subject("dc1", "apply", "prod", "m1")).await.is_none(), "nothing was published");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Reconciles keep coming after a rollout (machine updates, polls); each must start from the status the
/// controller last wrote, not a cache that may lag it: no second NewCommit or RolloutComplete Event, and Ready
/// keeps the time it turned true.
async fn rollout_events_are_recorded_once_and_conditions_keep_their_transition_time(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    let jobs = env.web_fleet_of_two(json!({})).await;
    for j in &jobs {
        env.report(j, Phase::Succeeded, |_| {}).await;
    }
    let ready_since = || async {
        let c = env.configs().get("fleet").await.ok()?;
        let ready = c.status?.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "True")?;
        Some(ready.last_transition_time)
    };
    let since = env.eventually(T, "Ready", ready_since).await;
    // churn: every machine update reconciles the fleet again, and so does the 5 s poll
    for i in 0..10 {
        let p = json!({"metadata": {"labels": {"churn": i.to_string()}}});
        env.machines()
            .patch(["m1", "m2"][i % 2], &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&p))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // and past one more poll
    env.never(Duration::from_secs(6), "Ready changed its transition time", || async {
        let now = ready_since().await;
        (now.as_ref() != Some(&since)).then_some(now)
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &env.ns);
    let list = events.list(&ListParams::default()).await.unwrap().items;
    let count = |reason: &str| -> i32 {
        list.iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum()
    };
    assert_eq!((count("NewCommit"), count("RolloutComplete")), (1, 1), "each recorded once");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A configuration stored before the CRD bounded `maxParallel` holds a value the controller cannot decode. It
/// must cost only itself: the other configurations reconcile, the bad one gets a Warning Event naming the
/// problem, and the controller stays ready.
async fn one_object_that_does_not_decode_is_skipped_and_named_and_the_rest_reconcile(backend: Backend) {
    init_logs();
    let old_crds = tempfile::tempdir().unwrap();
    for f in ["machine.yaml", "nixosconfiguration.yaml"] {
        let text = std::fs::read_to_string(nio_loadtest::testkube::repo_root().join("crds").join(f)).unwrap();
        let unbounded: String =
            text.lines().filter(|l| !l.trim_start().starts_with("maximum:")).map(|l| format!("{l}\n")).collect();
        std::fs::write(old_crds.path().join(f), unbounded).unwrap();
    }
    let kube = TestCluster::start_with_crds(backend, old_crds.path()).await.unwrap();
    let env = Env::with_cluster(kube, nio_loadtest::nats::NatsServer::start().await.unwrap()).await;
    env.machine("m1").create().await;
    env.machine("m2").create().await;
    let untyped: Api<kube::api::DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.ns,
        &kube::api::ApiResource::erase::<nio_shared::crd::NixosConfiguration>(&()),
    );
    let bad: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration", "metadata": {"name": "bad"},
        "spec": {"gitRepo": env.repo.url(), "ref": "main", "flake": "#web", "machineRef": "m1",
                 "rollout": {"maxParallel": 99_999_999_999u64}}
    }))
    .unwrap();
    untyped.create(&PostParams::default(), &bad).await.unwrap();
    env.config("good", json!({"machineRef": "m2"})).await;
    let h = nio_loadtest::procs::free_port().unwrap();
    let mut settings = env.settings("prod", "c1");
    settings.health_addr = Some(([127, 0, 0, 1], h).into());
    let (stop, task) = env.spawn(settings);
    env.eventually(T, "the good configuration's job", || env.job_on(env.subject("dc1", "apply", "prod", "m2"))).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &env.ns);
    let note = env
        .eventually(T, "the Undecodable Event", || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            let e = list.items.into_iter().find(|e| e.reason.as_deref() == Some("Undecodable"))?;
            (e.regarding.as_ref()?.name.as_deref() == Some("bad")).then_some(e.note?)
        })
        .await;
    assert!(note.contains("99999999999") || note.contains("u32"), "{note}");
    assert!(env.job_on(env.subject("dc1", "apply", "prod", "m1")).await.is_none());
    assert_eq!(http_get(h, "/readyz").await, Some((200, "leading".into())));
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Once a rollout is done, an idle controller neither writes (no new resourceVersion on any object) nor keeps
/// reconciling its own writes (seen under kubesim: 7-9 reconciles a second per configuration, forever).
async fn an_idle_controller_writes_nothing_and_stops_reconciling(backend: Backend) {
    let env = Env::start(backend).await;
    let port = nio_loadtest::procs::free_port().unwrap();
    let mut settings = env.settings("prod", "c1");
    settings.metrics_addr = Some(([127, 0, 0, 1], port).into());
    let (stop, task) = env.spawn(settings);
    let jobs = env.web_fleet_of_two(json!({"pollInterval": "1h"})).await;
    for j in &jobs {
        env.report(j, Phase::Succeeded, |_| {}).await;
    }
    env.eventually(T, "Ready", || async {
        let c = env.configs().get("fleet").await.ok()?;
        cond(&c.status?.conditions, "Ready").filter(|r| r.0 == "True")
    })
    .await;
    let versions = || async {
        let mut v = vec![env.configs().get("fleet").await.unwrap().metadata.resource_version.unwrap()];
        for m in ["m1", "m2"] {
            v.push(env.machines().get(m).await.unwrap().metadata.resource_version.unwrap());
        }
        v
    };
    let reconciles = || async {
        let (_, body) = http_get(port, "/metrics").await.unwrap();
        body.lines()
            .find(|l| {
                l.starts_with("nio_controller_reconcile_duration_seconds_count{") && l.contains("NixosConfiguration")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // settled: nothing written for a whole second (the last status write's own watch event came back)
    let before = env
        .eventually(T, "the controller settling", || async {
            let v = versions().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            (versions().await == v).then_some(v)
        })
        .await;
    let count = reconciles().await;
    env.never(Duration::from_secs(3), "an idle controller wrote something", || async {
        let now = versions().await;
        (now != before).then_some(now)
    })
    .await;
    let more = reconciles().await - count;
    assert!(more <= 1, "{more} reconciles in 3 s of idling");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// onRemoveFlake edited into something invalid after the configuration was applied, then the configuration
/// deleted: it cannot be applied, and the configuration says so (condition and Event) instead of sitting in
/// Terminating in silence; removing onRemoveFlake releases it.
async fn a_deleted_configuration_whose_on_remove_flake_became_invalid_says_so(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    env.machine("m1").create().await;
    env.config("web", json!({"machineRef": "m1", "onRemoveFlake": "#decommissioned"})).await;
    let (job, _) = env.eventually(T, "the job", || env.job_on(env.subject("dc1", "apply", "prod", "m1"))).await;
    env.report(&job, Phase::Succeeded, |_| {}).await;
    env.eventually(T, "applied", || async {
        (env.machines().get("m1").await.ok()?.status?.phase == Some(MachinePhase::Applied)).then_some(())
    })
    .await;
    let broken = json!({"spec": {"onRemoveFlake": "#decommissioned now"}});
    env.configs().patch("web", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&broken)).await.unwrap();
    env.configs().delete("web", &DeleteParams::default()).await.unwrap();
    let d = env
        .eventually(T, "RemovalBlocked", || async {
            let d = cond(&env.configs().get("web").await.ok()?.status?.conditions, "Degraded")?;
            (d.1 == "RemovalBlocked").then_some(d)
        })
        .await;
    assert!(d.2.contains("spec.onRemoveFlake"), "{}", d.2);
    let reasons = env.event_reasons().await;
    assert!(reasons.iter().any(|r| r == "RemovalBlocked"), "{reasons:?}");
    let fixed = json!({"spec": {"onRemoveFlake": null}});
    env.configs().patch("web", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&fixed)).await.unwrap();
    env.eventually(T, "web gone", || async { env.configs().get_opt("web").await.ok()?.is_none().then_some(()) }).await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A fleet that selects a Machine whose spec is invalid neither applies to it nor counts it, and names it.
async fn machines_with_an_invalid_spec_are_named_by_the_fleet_and_not_counted(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    env.machine("m1").label("role", "web").create().await;
    let bad: Machine = serde_json::from_value(json!({
        "apiVersion": "nixos.infra/v1alpha1", "kind": "Machine",
        "metadata": {"name": "m2", "labels": {"role": "web"}},
        "spec": {"hostname": "-oProxyCommand=sh", "site": "dc1"}
    }))
    .unwrap();
    env.machines().create(&PostParams::default(), &bad).await.unwrap();
    env.config("fleet", json!({"machineSelector": {"matchLabels": {"role": "web"}}})).await;
    let (job, _) = env.eventually(T, "m1's job", || env.job_on(env.subject("dc1", "apply", "prod", "m1"))).await;
    env.report(&job, Phase::Succeeded, |_| {}).await;
    let c = env
        .eventually(T, "1/1 and Degraded", || async {
            let s = env.configs().get("fleet").await.ok()?.status?;
            let d = cond(&s.conditions, "Degraded")?;
            (s.progress.as_deref() == Some("1/1") && d.1 == "InvalidMachines").then_some(d)
        })
        .await;
    assert!(c.2.contains("m2") && c.0 == "True", "{c:?}");
    assert!(env.job_on(env.subject("dc1", "apply", "prod", "m2")).await.is_none());
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Two configurations whose selectors overlap: a machine keeps the one it runs (the older one, for a machine that
/// ran neither), the other names it (Degraded/MachineConflict and an Event) and sends it nothing, so the machine is
/// never flipped between the two; once the first lets it go (a narrower selector) the other takes it at once.
async fn two_configurations_selecting_one_machine_never_take_turns_on_it(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    let on = |m: &str| env.subject("dc1", "apply", "prod", m);
    let job_of = |m: &'static str, configuration: &'static str| {
        let env = &env;
        async move {
            let (job, _) = env.job_on(env.subject("dc1", "apply", "prod", m)).await?;
            (job.configuration.as_deref() == Some(configuration)).then_some(job)
        }
    };
    env.machine("m1").label("role", "web").label("tier", "edge").create().await;
    env.config("web", json!({"machineSelector": {"matchLabels": {"role": "web"}}, "pollInterval": "1h"})).await;
    let job = env.eventually(T, "web's job for m1", || job_of("m1", "web")).await;
    env.report(&job, Phase::Succeeded, |_| {}).await;
    // creation times count in seconds: `edge` is the younger one
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let edge = json!({"machineSelector": {"matchLabels": {"tier": "edge"}}, "flake": "#edge", "pollInterval": "1h"});
    env.config("edge", edge).await;
    let (reason, message) = env.degraded("edge").await;
    assert_eq!(reason, "MachineConflict", "{message}");
    assert!(message.contains("m1 (by web)"), "{message}");
    env.eventually(T, "the MachineConflict Event", || async {
        env.events_for("edge").await.iter().any(|r| r == "MachineConflict").then_some(())
    })
    .await;
    // A machine neither ran: the older configuration takes it, and only it.
    env.machine("m2").label("role", "web").label("tier", "edge").create().await;
    env.eventually(T, "web's job for m2", || job_of("m2", "web")).await;
    env.never(Duration::from_secs(3), "a job from edge", || async {
        for m in ["m1", "m2"] {
            if let Some((j, _)) = env.job_on(on(m)).await.filter(|(j, _)| j.configuration.as_deref() == Some("edge")) {
                return Some(j.id);
            }
        }
        None
    })
    .await;
    let status = env.configs().get("edge").await.unwrap().status.unwrap();
    assert_eq!(status.total, 0, "machines managed elsewhere are not counted");
    let message = cond(&status.conditions, "Degraded").unwrap().2;
    assert!(message.contains("2 selected Machine(s)") && message.contains("m2 (by web)"), "{message}");

    // `web` lets both go: `edge` takes them at once, not at its next poll (an hour away); web's job still queued
    // for m2 is replaced by edge's.
    let narrower = json!({"spec": {"machineSelector": {"matchLabels": {"role": "web", "tier": "core"}}}});
    env.configs().patch("web", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&narrower)).await.unwrap();
    for m in ["m1", "m2"] {
        env.eventually(Duration::from_secs(5), "edge's job", || job_of(m, "edge")).await;
    }
    env.eventually(T, "edge no longer Degraded", || async {
        let s = env.configs().get("edge").await.ok()?.status?;
        (s.total == 2 && cond(&s.conditions, "Degraded")?.0 == "False").then_some(())
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// `rollout.pause` and `suspend` hold a rollout: jobs still waiting in the queue are withdrawn (they would
/// otherwise start whenever an executor slot frees), a job an executor took goes on, and lifting the hold queues
/// the machines again. Deleting the
/// configuration withdraws its queued jobs too: none runs a configuration that is gone.
async fn pausing_suspending_or_deleting_withdraws_the_jobs_no_executor_took(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    let [j1, j2] = env.web_fleet_of_two(json!({"pollInterval": "1h"})).await;
    let patch = |spec: serde_json::Value| {
        let configs = env.configs();
        async move {
            let p = json!({"spec": spec});
            configs.patch("fleet", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&p)).await.unwrap();
        }
    };
    let phase = |m: &'static str| {
        let machines = env.machines();
        async move { machines.get(m).await.unwrap().status.and_then(|s| s.phase) }
    };
    let queued = |m: &'static str| env.job_on(env.subject("dc1", "apply", "prod", m));

    patch(json!({"rollout": {"pause": true}})).await;
    for m in ["m1", "m2"] {
        env.eventually(Duration::from_secs(5), "the job withdrawn", || async {
            queued(m).await.is_none().then_some(())
        })
        .await;
        env.eventually(T, "m Pending", || async { (phase(m).await == Some(MachinePhase::Pending)).then_some(()) })
            .await;
    }
    assert!(env.events_for("fleet").await.iter().any(|r| r == "JobsWithdrawn"));
    env.never(Duration::from_secs(2), "a job while paused", || async { queued("m1").await.map(|j| j.0.id) }).await;

    patch(json!({"rollout": {"pause": false}})).await;
    let again = env
        .eventually(Duration::from_secs(5), "both queued again", || async {
            Some([queued("m1").await?.0, queued("m2").await?.0])
        })
        .await;
    assert_ne!((&again[0].id, &again[1].id), (&j1.id, &j2.id), "new jobs");

    // An executor took m1's job (it started; a job taken stays in the stream until it ends): suspending
    // withdraws only m2's.
    env.report(&again[0], Phase::Started, |_| {}).await;
    env.eventually(T, "m1 Applying", || async { (phase("m1").await == Some(MachinePhase::Applying)).then_some(()) })
        .await;
    let third = again[1].clone();
    patch(json!({"suspend": true})).await;
    env.eventually(Duration::from_secs(5), "m2's job withdrawn", || async {
        queued("m2").await.is_none().then_some(())
    })
    .await;
    env.eventually(T, "m2 back to Pending", || async {
        (phase("m2").await == Some(MachinePhase::Pending)).then_some(())
    })
    .await;
    assert_eq!(phase("m1").await, Some(MachinePhase::Applying), "a job an executor runs goes on");
    assert_eq!(queued("m1").await.map(|j| j.0.id), Some(again[0].id.clone()), "and stays with its executor");

    patch(json!({"suspend": false})).await;
    env.eventually(Duration::from_secs(5), "m2 queued again", || async {
        queued("m2").await.filter(|(j, _)| j.id != third.id).map(|_| ())
    })
    .await;
    env.configs().delete("fleet", &DeleteParams::default()).await.unwrap();
    env.eventually(T, "m2's job withdrawn on deletion", || async { queued("m2").await.is_none().then_some(()) }).await;
    env.eventually(T, "fleet gone", || async { env.configs().get_opt("fleet").await.unwrap().is_none().then_some(()) })
        .await;
    env.never(Duration::from_secs(1), "a job for m2 after the deletion", || async {
        queued("m2").await.map(|j| j.0.id)
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A Machine's spec corrected while its job waits in the queue (moved to the site that can reach it) gets its job
/// withdrawn from the old site and queued on the new one; corrected after its job failed (a wrong address), it is
/// tried again at once with the new address, not only at the next commit.
async fn a_machine_corrected_while_its_job_waits_or_after_it_failed_gets_a_job_with_the_new_spec(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    env.machine("m1").create().await;
    env.config("web", json!({"machineRef": "m1", "pollInterval": "1h"})).await;
    let on = |site: &str| env.subject(site, "apply", "prod", "m1");
    let (first, _) = env.eventually(T, "the job on dc1", || env.job_on(on("dc1"))).await;
    let spec = |patch: serde_json::Value| {
        let machines = env.machines();
        async move {
            let p = json!({"spec": patch});
            machines.patch("m1", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&p)).await.unwrap();
        }
    };
    spec(json!({"site": "dc2"})).await;
    let (moved, _) = env.eventually(Duration::from_secs(5), "the job on dc2", || env.job_on(on("dc2"))).await;
    assert_eq!((moved.site.as_str(), moved.id.target()), ("dc2", first.id.target()));
    assert!(env.job_on(on("dc1")).await.is_none(), "withdrawn from dc1");
    assert!(env.events_for("m1").await.iter().any(|r| r == "JobWithdrawn"));

    env.drain_jobs().await;
    env.report(&moved, Phase::Failed, |e| e.category = Some(FailureCategory::Unreachable)).await;
    env.eventually(T, "m1 Failed", || async {
        let s = env.machines().get("m1").await.ok()?.status?;
        (s.phase == Some(MachinePhase::Failed) && s.queued_target.is_none()).then_some(())
    })
    .await;
    spec(json!({"ipAddress": "10.0.0.9"})).await;
    let (retry, _) = env.eventually(Duration::from_secs(5), "a retry", || env.job_on(on("dc2"))).await;
    assert_eq!((retry.endpoint.host.as_str(), retry.id.target()), ("10.0.0.9", first.id.target()));
    assert_ne!(retry.id, moved.id, "an id of its own, past the duplicate window");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A machine that failed its target (down during the rollout) and has recovered since is tried again on the same
/// target when a person asks (`kubectl annotate machine m1 nixos.infra/retry=<new value>`), without a new commit
/// or a spec change: once per value, with an Event either way (`RetryRequested`, `NothingToRetry`), and a machine
/// that has not failed gets no job.
async fn a_retry_annotation_tries_a_failed_machine_again_once_per_value(backend: Backend) {
    let env = Env::start(backend).await;
    let (stop, task) = env.spawn(env.settings("prod", "c1"));
    env.machine("m1").create().await;
    env.config("web", json!({"machineRef": "m1", "pollInterval": "1h"})).await;
    let on = env.subject("dc1", "apply", "prod", "m1");
    let (first, _) = env.eventually(T, "the job", || env.job_on(on.clone())).await;
    env.drain_jobs().await;
    env.report(&first, Phase::Failed, |e| e.category = Some(FailureCategory::Unreachable)).await;
    let status = || async { env.machines().get("m1").await.ok().and_then(|m| m.status) };
    env.eventually(T, "m1 Failed", || async {
        let s = status().await?;
        (s.phase == Some(MachinePhase::Failed) && s.failed_target.is_some()).then_some(())
    })
    .await;
    let retry = |value: &'static str| {
        let machines = env.machines();
        async move {
            let p = json!({"metadata": {"annotations": {"nixos.infra/retry": value}}});
            machines.patch("m1", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&p)).await.unwrap();
        }
    };
    retry("1").await;
    let (again, _) = env.eventually(Duration::from_secs(5), "the retry's job", || env.job_on(on.clone())).await;
    assert_eq!(again.id.target(), first.id.target(), "the same target");
    assert_ne!(again.id, first.id, "an id of its own, past the duplicate window");
    let s = status().await.unwrap();
    assert_eq!(s.last_handled_retry.as_deref(), Some("1"));
    assert!(env.events_for("m1").await.iter().any(|r| r == "RetryRequested"));

    // It succeeds; a new value on a machine that has not failed queues nothing.
    env.drain_jobs().await;
    env.report(&again, Phase::Succeeded, |_| {}).await;
    env.eventually(T, "m1 Applied", || async { (status().await?.phase == Some(MachinePhase::Applied)).then_some(()) })
        .await;
    retry("2").await;
    env.eventually(Duration::from_secs(5), "the retry handled", || async {
        (status().await?.last_handled_retry.as_deref() == Some("2")).then_some(())
    })
    .await;
    env.eventually(Duration::from_secs(5), "an Event for the second retry", || async {
        env.events_for("m1").await.iter().any(|r| r == "NothingToRetry").then_some(())
    })
    .await;
    // (the configuration would have queued a job within this second: its reconcile follows the status write)
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(env.job_on(on.clone()).await.is_none(), "nothing to retry on an applied machine");
    assert_eq!(status().await.unwrap().phase, Some(MachinePhase::Applied));
    stop.cancel();
    task.await.unwrap().unwrap();
}
