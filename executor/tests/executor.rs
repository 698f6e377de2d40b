#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! The executor against a real nats-server and namespaced test hosts with real Nix and real OpenSSH sshd.

mod common;

use std::time::Duration;

use common::*;
use nio_shared::protocol::{Action, FailureCategory, JobId, Phase, Step};

const T: Duration = Duration::from_secs(60);

/// A switch ships the tree at the commit exactly (modes, symlinks) plus the additional files, ending with its
/// digest, under the configuration's subdirectory; the same target again is skipped without a build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_ships_the_exact_tree_and_files_and_skips_a_target_already_applied() {
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(1));
    // The flake in a subdirectory, an executable and a symlink beside it.
    let root = h.repo.path.clone();
    std::fs::create_dir_all(root.join("hosts-flake")).unwrap();
    for f in ["flake.nix", "build.sh", "version"] {
        std::fs::rename(root.join(f), root.join("hosts-flake").join(f)).unwrap();
    }
    std::fs::rename(root.join("hosts"), root.join("hosts-flake/hosts")).unwrap();
    std::fs::write(root.join("deploy.sh"), "#!/bin/sh\necho hi\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("deploy.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("hosts-flake/flake.nix", root.join("flake-link.nix")).unwrap();
    let commit = h.repo.write("hosts-flake/extra.nix", "{ motd = \"from the repo\"; }\n").unwrap();
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&h, &nats, config(&[("dc1", 4)]), "e1"));
    // The example configuration's inline file (examples/30-configurations.yaml, db-01), as the controller sends it.
    let examples = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/30-configurations.yaml"));
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&examples.unwrap()).unwrap();
    let db = docs.iter().find(|d| d["metadata"]["name"] == "db-01").expect("the example db-01");
    let example = db["spec"]["additionalFiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["valueType"] == "Inline")
        .expect("an inline file in the example");
    let (example_path, example_text) = (example["path"].as_str().unwrap(), example["inline"].as_str().unwrap());
    let mut j = job("web-01", &h.addr(0), 22, "dc1", &h.repo.url(), &commit);
    j.source.as_mut().unwrap().subdir = Some("hosts-flake".into());
    j.files = vec![
        nio_shared::protocol::FileEntry {
            path: "extra/motd.nix".into(),
            content: nio_shared::protocol::FileContent::Inline { content: "{ }\n".into() },
        },
        nio_shared::protocol::FileEntry {
            path: example_path.into(),
            content: nio_shared::protocol::FileContent::Inline { content: example_text.into() },
        },
    ];
    bus.publish(&j).await;

    let done = bus.final_of("web-01", T).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    let host = &h.hosts[0];
    let system = host.current_system().unwrap();
    assert_eq!(done.system.as_deref(), Some(system.as_str()));
    assert!(system.ends_with("-nixos-system-web-1"), "{system}");
    assert_eq!(done.host_key.as_deref(), Some(host.host_key.as_str()), "TOFU reports the key it saw");
    // The system was built from the shipped subdirectory: it carries the repository's extra.nix.
    assert_eq!(
        std::fs::read_to_string(host.path(&format!("{system}/extra.nix"))).unwrap(),
        "{ motd = \"from the repo\"; }"
    );

    let src = host.path(&format!("/var/lib/nio/src/{commit}"));
    let flake = std::fs::read_to_string(root.join("hosts-flake/flake.nix")).unwrap();
    assert_eq!(std::fs::read_to_string(src.join("hosts-flake/flake.nix")).unwrap(), flake, "the tree is there");
    assert_eq!(
        std::fs::read_to_string(src.join("hosts-flake/extra/motd.nix")).unwrap(),
        "{ }\n",
        "files land relative to the subdirectory"
    );
    let shipped = std::fs::read_to_string(src.join("hosts-flake").join(example_path)).unwrap();
    assert_eq!(shipped, example_text, "the example's {example_path} is where its flake sees it");
    assert!(shipped.contains("max_connections"), "{shipped}");
    let marker = std::fs::read_to_string(src.join(".nio-complete")).unwrap();
    assert_eq!(marker.len(), 64, "the upload ends with its digest as the completion marker: {marker:?}");
    assert_eq!(std::fs::metadata(src.join("deploy.sh")).unwrap().permissions().mode() & 0o777, 0o755, "exec bit");
    assert_eq!(
        std::fs::read_link(src.join("flake-link.nix")).unwrap().to_str(),
        Some("hosts-flake/flake.nix"),
        "symlinks kept"
    );
    let phases: Vec<_> = bus.seen.iter().filter(|e| e.machine == "web-01").map(|e| e.phase).collect();
    assert_eq!(phases.first(), Some(&Phase::Started));
    assert!(phases.contains(&Phase::Step));

    // The same target again: already there, nothing built or activated.
    let mut again = j.clone();
    again.generation = 2;
    again.id = again.id.retry(2);
    bus.seen.clear();
    bus.publish(&again).await;
    let done = bus.final_of("web-01", T).await;
    assert_eq!(done.phase, Phase::Skipped, "{done:?}");
    assert_eq!(host.activations().len(), 2, "one activation (start and end)");
    assert_eq!(bus.jobs_drained().await, 0);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Sources fetched over HTTPS (Apache + git http-backend, private CA, token) and SSH (sshd, key + known_hosts)
/// with the credentials named in the job; an unknown Git host key or missing credentials fail the job before any
/// command runs on the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_come_over_https_and_ssh_with_named_credentials_and_untrusted_servers_are_refused() {
    use nio_loadtest::gitserve::{HttpsGitServer, SshGitServer};
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(5));
    let served = tempfile::tempdir().unwrap();
    let repo = SystemRepo::create(served.path()).unwrap();
    let commit = repo.bump().unwrap();
    let https = HttpsGitServer::start(served.path(), &[("x-access-token", "tok-123")]).unwrap();
    let (git_ssh, stranger) = (SshGitServer::start().unwrap(), SshGitServer::start().unwrap());
    let creds = tempfile::tempdir().unwrap();
    let write = |name: &str, key: &str, value: &[u8]| {
        std::fs::create_dir_all(creds.path().join(name)).unwrap();
        std::fs::write(creds.path().join(name).join(key), value).unwrap();
    };
    write("https", "token", b"tok-123\n");
    write("https", "ca.crt", &https.ca.ca_pem);
    write("ssh", "ssh-privatekey", git_ssh.client_key.as_bytes());
    write("ssh", "known_hosts", git_ssh.known_hosts.as_bytes());
    write("ssh-bad", "ssh-privatekey", git_ssh.client_key.as_bytes());
    let impostor = stranger.known_hosts.replace(&format!(":{}", stranger.port), &format!(":{}", git_ssh.port));
    write("ssh-bad", "known_hosts", impostor.as_bytes());
    let mut bus = Bus::connect(&nats).await;
    let mut s = settings(&h, &nats, config(&[("dc1", 4)]), "e1");
    s.git_credentials_dir = Some(creds.path().to_path_buf());
    let (stop, task) = spawn_executor(s);
    let ssh_url = git_ssh.url(&repo.path);
    // A Git server that is down: nothing listens on this port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // Another repository for the failures: a commit already fetched is served from the mirror without asking
    // the server again (objects are content-addressed), so these must need a fetch.
    let other = tempfile::tempdir().unwrap();
    let other_repo = SystemRepo::create(other.path()).unwrap();
    other_repo.write("other", "other\n").unwrap();
    let other_commit = other_repo.bump().unwrap();
    let other_url = git_ssh.url(&other_repo.path);
    for (i, (machine, url, cred)) in [
        ("web-https", https.url("systems"), "https"),
        ("web-ssh", ssh_url.clone(), "ssh"),
        ("web-impostor", other_url.clone(), "ssh-bad"),
        ("web-nocreds", https.url("elsewhere"), "missing"),
        ("web-gitdown", format!("https://127.0.0.1:{dead}/git/systems"), "https"),
    ]
    .into_iter()
    .enumerate()
    {
        let commit = if matches!(machine, "web-https" | "web-ssh") { &commit } else { &other_commit };
        let mut j = job(machine, &h.addr(i), 22, "dc1", &url, commit);
        j.source.as_mut().unwrap().credentials = Some(cred.into());
        bus.publish(&j).await;
    }
    for (i, ok) in ["web-https", "web-ssh"].into_iter().enumerate() {
        let done = bus.final_of(ok, T).await;
        assert_eq!(done.phase, Phase::Succeeded, "{ok}: {done:?}");
        let shipped = h.hosts[i].path(&format!("/var/lib/nio/src/{commit}/flake.nix"));
        let flake = std::fs::read_to_string(repo.path.join("flake.nix")).unwrap();
        assert_eq!(std::fs::read_to_string(shipped).unwrap(), flake, "the fetched tree is on the machine");
    }
    for (bad, says) in
        [("web-impostor", "does not match known_hosts"), ("web-nocreds", "no Git credentials \"missing\"")]
    {
        let done = bus.final_of(bad, T).await;
        assert_eq!((done.phase, done.category), (Phase::Failed, Some(FailureCategory::SourceUnavailable)), "{bad}");
        let msg = done.message.unwrap_or_default();
        assert!(msg.contains(says), "{bad}: {msg}");
        assert!(!msg.contains("tok-123") && !msg.contains("PRIVATE KEY"), "{bad} leaks a credential: {msg}");
    }
    // A Git server that is down is worth retrying: redelivered with backoff, then failed after maxDeliver.
    let down = bus.final_of("web-gitdown", T).await;
    assert_eq!((down.phase, down.category), (Phase::Failed, Some(FailureCategory::SourceUnavailable)));
    let starts = bus.seen.iter().filter(|e| e.machine == "web-gitdown" && e.phase == Phase::Started).count();
    assert_eq!(starts, 3, "delivered maxDeliver (3) times");
    let activated: Vec<usize> = (0..5).filter(|i| !h.hosts[*i].activations().is_empty()).collect();
    assert_eq!(activated, [0, 1], "only the two trusted sources were built and activated");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_host_key_runs_nothing_and_fails_permanently() {
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(2));
    let commit = h.commit();
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&h, &nats, config(&[("dc1", 2)]), "e1"));
    let mut j = job("web-01", &h.addr(0), 22, "dc1", &h.repo.url(), &commit);
    j.endpoint.host_key = Some(h.hosts[1].host_key.clone());
    bus.publish(&j).await;
    let done = bus.final_of("web-01", T).await;
    assert_eq!((done.phase, done.category), (Phase::Failed, Some(FailureCategory::HostKeyMismatch)), "{done:?}");
    assert!(done.message.unwrap().contains("refusing to connect"));
    assert!(!h.hosts[0].path("/var/lib/nio").exists(), "no command ran");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bus.jobs_drained().await, 0, "termed, not redelivered");
    assert_eq!(bus.seen.iter().filter(|e| e.phase == Phase::Started).count(), 1, "delivered once");

    // the right pinned key works
    let mut ok = job("web-02", &h.addr(1), 22, "dc1", &h.repo.url(), &commit);
    ok.endpoint.host_key = Some(h.hosts[1].host_key.clone());
    bus.publish(&ok).await;
    assert_eq!(bus.final_of("web-02", T).await.phase, Phase::Succeeded);
    stop.cancel();
    task.await.unwrap().unwrap();

    // An executor that trusts no first key, and a machine with none pinned: not a mismatch (nothing to re-pin),
    // its own category and what to do.
    let mut pinned_only = settings(&h, &nats, config(&[("dc1", 2)]), "e2");
    pinned_only.host_key_policy = nio_executor::ssh::HostKeyPolicy::Pinned;
    let (stop, task) = spawn_executor(pinned_only);
    let fresh = job("web-03", &h.addr(1), 22, "dc1", &h.repo.url(), &commit);
    bus.publish(&fresh).await;
    let done = bus.final_of("web-03", T).await;
    assert_eq!((done.phase, done.category), (Phase::Failed, Some(FailureCategory::HostKeyNotPinned)), "{done:?}");
    assert!(done.message.unwrap().contains("set spec.hostKey"));
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_hosts_are_retried_then_fail_and_refused_identities_fail_at_once() {
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(1));
    let commit = h.commit();
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&h, &nats, config(&[("dc1", 2)]), "e1"));
    // Nothing listens on 127.0.0.250:9: connection refused.
    bus.publish(&job("gone", "127.0.0.250", 9, "dc1", &h.repo.url(), &commit)).await;
    let mut stranger = job("locked-out", &h.addr(0), 22, "dc1", &h.repo.url(), &commit);
    stranger.endpoint.identity = Some("stranger".into());
    bus.publish(&stranger).await;

    let auth = bus.final_of("locked-out", T).await;
    assert_eq!((auth.phase, auth.category), (Phase::Failed, Some(FailureCategory::AuthFailed)), "{auth:?}");
    let gone = bus.final_of("gone", T).await;
    assert_eq!((gone.phase, gone.category), (Phase::Failed, Some(FailureCategory::Unreachable)), "{gone:?}");
    let retries = bus
        .seen
        .iter()
        .filter(|e| {
            e.machine == "gone"
                && e.phase == Phase::Step
                && e.message.as_deref().is_some_and(|m| m.contains("retrying"))
        })
        .count();
    assert_eq!(retries, 2, "max_deliver 3: two retries, then the final failure");
    assert_eq!(
        bus.seen.iter().filter(|e| e.machine == "locked-out" && e.phase == Phase::Started).count(),
        1,
        "auth failure is not retried"
    );
    assert!(!h.hosts[0].path("/var/lib/nio").exists(), "no command ran");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// An activation that never finishes fails the job at the activation step when its time is up, and is not
/// reported as anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_activation_times_out_in_its_step() {
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(1));
    let commit = h.repo.configure("stuck", "hang").unwrap();
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&h, &nats, config(&[("dc1", 2)]), "e1"));
    let mut slow = job("slow", &h.addr(0), 22, "dc1", &h.repo.url(), &commit);
    slow.source.as_mut().unwrap().flake_attr = "stuck".into();
    slow.timeout_seconds = 4;
    bus.publish(&slow).await;
    let done = bus.final_of("slow", T).await;
    assert_eq!(
        (done.phase, done.category, done.step),
        (Phase::Failed, Some(FailureCategory::Timeout), Some(Step::Activate)),
        "{done:?}"
    );
    // The machine stops the hung switch-to-configuration too (after the job's time): it does not keep the
    // machine's activation lock, so the next job activates (before: it hung behind it and timed out as well).
    let fixed = h.repo.configure("stuck", "ok").unwrap();
    let mut next = job("slow", &h.addr(0), 22, "dc1", &h.repo.url(), &fixed);
    next.source.as_mut().unwrap().flake_attr = "stuck".into();
    next.timeout_seconds = 30;
    bus.seen.clear();
    bus.publish(&next).await;
    let done = bus.final_of("slow", T).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    let results = h.hosts[0].exec("cat /var/lib/nio/jobs/*/result").unwrap();
    assert!(
        results.contains("failed switch-to-configuration switch did not finish within 4s and was stopped"),
        "{results}"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_terminated_and_the_worker_keeps_going() {
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(1));
    let commit = h.commit();
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&h, &nats, config(&[("dc1", 1)]), "e1"));
    bus.publish_raw("nio.jobs.dc1.apply.test.default.poison", b"{\"v\": 99, \"garbage\": true}").await;
    bus.publish_raw("nio.jobs.dc1.apply.test.default.junk", b"\xff not json").await;
    // well-formed, but with a time no deadline can hold
    let mut endless = job("endless", &h.addr(0), 22, "dc1", &h.repo.url(), &commit);
    endless.timeout_seconds = u64::MAX;
    bus.publish(&endless).await;
    bus.publish(&job("web-01", &h.addr(0), 22, "dc1", &h.repo.url(), &commit)).await;
    let endless = bus.final_of("endless", T).await;
    assert_eq!((endless.phase, endless.category), (Phase::Failed, Some(FailureCategory::InvalidJob)));
    assert!(endless.message.unwrap().contains("timeoutSeconds 18446744073709551615 is above its maximum"));
    let poison = bus.final_of("poison", T).await;
    assert_eq!((poison.phase, poison.category), (Phase::Failed, Some(FailureCategory::InvalidJob)));
    assert!(poison.message.unwrap().contains("v=99"));
    assert_eq!(bus.final_of("junk", T).await.category, Some(FailureCategory::InvalidJob));
    assert_eq!(bus.final_of("web-01", T).await.phase, Phase::Succeeded);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bus.jobs_drained().await, 0);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// An executor that starts while NATS is down answers its liveness probe at once (the kubelet must not restart
/// it in a loop), says on /readyz what it waits for, and takes jobs once NATS is back, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_started_while_nats_is_down_stays_alive_and_runs_jobs_once_nats_is_back() {
    let (mut nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(1));
    let commit = h.commit();
    nats.kill().await;
    let port = nio_loadtest::procs::free_port().unwrap();
    let mut s = settings(&h, &nats, config(&[("dc1", 1)]), "e1");
    s.health_addr = Some(([127, 0, 0, 1], port).into());
    let (stop, task) = spawn_executor(s);
    let get = |path| nio_loadtest::procs::http_get(port, path);
    let deadline = std::time::Instant::now() + T;
    while get("/healthz").await.is_none() {
        assert!(std::time::Instant::now() < deadline, "no probes served while NATS is down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Longer than a NATS connect attempt and a JetStream request's timeout: it still waits, alive, and says why.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!task.is_finished(), "the executor stopped while NATS was down");
    assert_eq!(get("/healthz").await, Some((200, "ok".into())));
    assert_eq!(get("/readyz").await, Some((503, "starting: connecting to NATS".into())));
    nats.restart().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while get("/readyz").await != Some((200, "ready".into())) {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready 40 s after NATS came back: {:?}",
            get("/readyz").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut bus = Bus::connect(&nats).await;
    bus.publish(&job("web-01", &h.addr(0), 22, "dc1", &h.repo.url(), &commit)).await;
    assert_eq!(bus.final_of("web-01", T).await.phase, Phase::Succeeded);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// JetStream refuses status events for a while (as when the member leading NIO_STATUS is lost and a new leader
/// is being elected): the job's outcome is retried, not dropped, so the Machine does not stay Applying for good,
/// and the job is settled only once its outcome is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_refused_while_the_status_stream_is_unavailable_is_delivered_once_it_is_back() {
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(1));
    let commit = h.repo.configure("web", "slow:1").unwrap();
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&h, &nats, config(&[("dc1", 1)]), "e1"));
    bus.publish(&job("web-01", &h.addr(0), 22, "dc1", &h.repo.url(), &commit)).await;
    bus.until(T, |evs| evs.iter().any(|e| e.phase == Phase::Started)).await;
    bus.drop_status().await;
    // The activation finishes while there is no stream to take its outcome.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(bus.jobs_pending().await, 1, "the job is not settled while its outcome is undelivered");
    bus.restore_status().await;
    let done = bus.final_of("web-01", T).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    assert_eq!(bus.jobs_drained().await, 0);
    let finals = bus.seen.iter().filter(|e| e.phase.is_terminal()).count();
    assert_eq!(finals, 1, "the outcome arrives once");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_executors_never_exceed_the_site_limit_and_never_overlap_on_a_machine() {
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(5));
    h.repo.configure("web", "slow:0.6").unwrap();
    // one commit per job, so no job finds its machine already at its target
    let commits: Vec<String> = (0..10).map(|_| h.commit()).collect();
    let mut bus = Bus::connect(&nats).await;
    let mut stops = vec![];
    for id in ["e1", "e2", "e3"] {
        stops.push(spawn_executor(settings(&h, &nats, config(&[("dc1", 2)]), id)));
    }
    // 10 jobs on 5 machines' addresses: machines m{i} and twin{i} share an address (one host, two names),
    // so their jobs contend for one lock.
    for i in 0..5 {
        bus.publish(&job(&format!("m{i}"), &h.addr(i), 22, "dc1", &h.repo.url(), &commits[2 * i])).await;
        bus.publish(&job(&format!("twin{i}"), &h.addr(i), 22, "dc1", &h.repo.url(), &commits[2 * i + 1])).await;
    }
    let evs =
        bus.until(Duration::from_secs(90), |evs| evs.iter().filter(|e| e.phase.is_terminal()).count() == 10).await;
    assert!(evs.iter().filter(|e| e.phase.is_terminal()).all(|e| e.phase == Phase::Succeeded), "all succeed");
    let executors: std::collections::BTreeSet<_> = evs.iter().map(|e| e.executor.clone()).collect();
    assert!(executors.len() >= 2, "work spread over executors: {executors:?}");
    let spans: Vec<Vec<(f64, f64)>> = h.hosts.iter().map(|x| x.activation_spans()).collect();
    let all: Vec<(f64, f64)> = spans.iter().flatten().copied().collect();
    assert_eq!(all.len(), 10);
    assert_eq!(max_concurrency(&all), 2, "the site limit holds across three executors, and is used");
    for (i, on_machine) in spans.iter().enumerate() {
        assert_eq!(on_machine.len(), 2, "machine {i} was activated twice");
        assert_eq!(max_concurrency(on_machine), 1, "two jobs on machine {i} overlapped: {on_machine:?}");
    }
    for (s, _) in stops {
        s.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_land_0400_outside_the_store_and_never_in_logs_argv_or_the_stream() {
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(1));
    let commit = h.commit();
    let mut bus = Bus::connect(&nats).await;
    let key_file = h.path("seal.key");
    std::fs::write(&key_file, nio_shared::seal::SealKey::generate()).unwrap();
    let key = nio_shared::seal::SealKey::from_file(&key_file).unwrap();
    let plaintext = "hunter2-correct-horse-battery";
    let mut j = job("db-01", &h.addr(0), 22, "dc1", &h.repo.url(), &commit);
    let ctx = nio_shared::protocol::SecretFile::seal_context("test", "default", "db-01", "postgres/password");
    let other = nio_shared::protocol::SecretFile::seal_context("test", "default", "db-01", "shared.key");
    j.secrets = vec![
        nio_shared::protocol::SecretFile {
            path: "postgres/password".into(),
            sealed: key.seal(plaintext.as_bytes(), &ctx).unwrap(),
            owner: None,
            group: None,
            mode: None,
        },
        nio_shared::protocol::SecretFile {
            path: "shared.key".into(),
            sealed: key.seal(b"for deploy", &other).unwrap(),
            owner: Some("deploy".into()),
            group: Some("deploy".into()),
            mode: Some("0440".into()),
        },
    ];
    let wire = String::from_utf8(j.encode()).unwrap();
    assert!(!wire.contains(plaintext));

    let log = h.path("executor.log");
    let mut child =
        spawn_binary(&h, &nats, &config(&[("dc1", 2)]), "e1", &["--seal-key-file", key_file.to_str().unwrap()], &log);
    bus.publish(&j).await;
    let done = bus.final_of("db-01", T).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");

    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let host = &h.hosts[0];
    let secret = host.path("/var/lib/nio/secrets/postgres/password");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), plaintext);
    let meta = std::fs::metadata(&secret).unwrap();
    assert_eq!((meta.permissions().mode() & 0o777, meta.uid()), (0o400, 0));
    let shared = std::fs::metadata(host.path("/var/lib/nio/secrets/shared.key")).unwrap();
    assert_eq!(
        (shared.permissions().mode() & 0o777, shared.uid(), shared.gid()),
        (0o440, 1500, 1500),
        "owner, group and mode as the configuration says"
    );
    assert_eq!(std::fs::metadata(host.path("/var/lib/nio/secrets")).unwrap().permissions().mode() & 0o777, 0o711);
    // The owner the configuration names reads its file (the directories let it through); nobody but root lists
    // them or reads another's.
    let as_deploy = |cmd: &str| host.exec(&format!("setpriv --reuid=1500 --regid=1500 --clear-groups {cmd}"));
    assert_eq!(as_deploy("cat /var/lib/nio/secrets/shared.key").unwrap().trim(), "for deploy");
    assert!(as_deploy("cat /var/lib/nio/secrets/postgres/password").is_err(), "another's secret");
    assert!(as_deploy("ls /var/lib/nio/secrets/").is_err(), "listed by a user");
    assert!(!host.path(&format!("/var/lib/nio/src/{commit}/postgres")).exists(), "not in the source tree");
    // Persisted: a reboot keeps it.
    host.reboot().unwrap();
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), plaintext);

    sigterm(&child);
    child.wait().await.unwrap();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("job.execute") || logs.contains("executor ready"), "the log was captured");
    assert!(!logs.contains(plaintext), "secret in executor logs");
    // Nowhere on the machine but in its file: not in the store, the job's files or the unit's log.
    let found = host
        .exec(&format!("grep -rl '{plaintext}' /nix/store /var/lib/nio/jobs /run /var/lib/sshd.log || true"))
        .unwrap();
    assert_eq!(found.trim(), "", "secret left on the machine");
    let events = serde_json::to_string(&bus.seen).unwrap();
    assert!(!events.contains(plaintext), "secret in a status event");
    // every message still stored on the server (status stream included) is free of it
    let mut status = bus.js.get_stream(nio_shared::subjects::STATUS_STREAM).await.unwrap();
    let n = status.info().await.unwrap().state.last_sequence;
    for seq in 1..=n {
        if let Ok(m) = status.get_raw_message(seq).await {
            assert!(!String::from_utf8_lossy(&m.payload).contains(plaintext));
        }
    }
}

/// SIGTERM with grace finishes the running job; with a short grace the job goes back to the queue while its
/// activation goes on on the machine, and the executor that gets it next takes over that activation's result
/// instead of running it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_job_finishes_it_and_short_grace_hands_the_running_activation_over() {
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(2));
    let first = h.repo.configure("web", "slow:2").unwrap();
    let mut bus = Bus::connect(&nats).await;
    let cfg = config(&[("dc1", 2)]);

    // Generous grace: the running job completes before the process exits.
    let mut child = spawn_binary(&h, &nats, &cfg, "e1", &["--shutdown-grace", "30"], &h.path("e1.log"));
    bus.publish(&job("m1", &h.addr(0), 22, "dc1", &h.repo.url(), &first)).await;
    bus.until(T, |evs| evs.iter().any(|e| e.machine == "m1" && e.step == Some(Step::Build))).await;
    sigterm(&child);
    let status = tokio::time::timeout(T, child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "clean exit after finishing: {status:?}");
    let f = bus.final_of("m1", T).await;
    assert_eq!(f.phase, Phase::Succeeded, "{f:?}");

    // Short grace: the job is handed back and another executor completes it.
    let second = h.repo.configure("web", "slow:4").unwrap();
    let mut child = spawn_binary(&h, &nats, &cfg, "e2", &["--shutdown-grace", "1"], &h.path("e2.log"));
    let mut j = job("m2", &h.addr(1), 22, "dc1", &h.repo.url(), &second);
    j.rollback = true;
    j.confirm_timeout_seconds = 30;
    bus.publish(&j).await;
    // Wait until the activation runs on the machine.
    let deadline = std::time::Instant::now() + T;
    while h.hosts[1].activations().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no activation started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sigterm(&child);
    let status = tokio::time::timeout(T, child.wait()).await.unwrap().unwrap();
    assert!(status.success());
    assert!(
        !bus.seen.iter().any(|e| e.machine == "m2" && e.phase.is_terminal()),
        "not reported done by the stopped executor"
    );
    let (stop, task) = spawn_executor(settings(&h, &nats, cfg, "e3"));
    let done = bus.final_of("m2", Duration::from_secs(60)).await;
    assert_eq!((done.phase, done.executor.as_str()), (Phase::Succeeded, "e3"), "redelivered, not lost: {done:?}");
    assert!(
        bus.seen.iter().any(|e| e.machine == "m2" && e.message.as_deref().is_some_and(|m| m.contains("taking over"))),
        "the redelivered job took over the running activation"
    );
    let acts = h.hosts[1].activations();
    assert_eq!(acts.iter().filter(|(a, _)| a == "switch").count(), 1, "activated once, not twice: {acts:?}");
    assert_eq!(h.hosts[1].current_system().as_deref(), done.system.as_deref());
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_report_the_system_scans_report_facts_and_busy_machines_skip_probes() {
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(2));
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&h, &nats, config(&[("dc1", 2)]), "e1"));
    let mut probe = job("p1", &h.addr(0), 22, "dc1", "", "");
    probe.action = Action::Probe;
    probe.source = None;
    probe.id = JobId::probe("test", "default", "p1", 1, probe.action);
    bus.publish(&probe).await;
    let done = bus.final_of("p1", T).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    assert_eq!(done.system, h.hosts[0].current_system());
    assert_eq!(done.booted_system, h.hosts[0].resolve("/run/booted-system"));
    assert_eq!(done.nixos_version.as_deref(), Some("25.05.1"));
    assert_eq!(done.boot_id.as_deref(), Some(h.hosts[0].boot_id().as_str()));

    // A reboot is seen by its new boot id (the host key stays the same).
    let before = done.boot_id.clone();
    h.hosts[0].reboot().unwrap();
    bus.machine_released(&h.addr(0)).await;
    let mut again = probe.clone();
    again.id = JobId::probe("test", "default", "p1", 2, again.action);
    bus.publish(&again).await;
    bus.seen.clear();
    let done = bus.final_of("p1", T).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    assert_ne!(done.boot_id, before, "a new boot id");
    assert_eq!(done.boot_id.as_deref(), Some(h.hosts[0].boot_id().as_str()));

    // nixos-facter present: its report.
    let facter = h.hosts[0].dir.path().join("bin/nixos-facter");
    std::fs::write(
        &facter,
        "#!/bin/sh\necho '{\"version\":1,\"system\":\"x86_64-linux\",\"virtualisation\":\"kvm\",\"hardware\":{\"cpu\":[{\"model_name\":\"AMD EPYC 7302\",\"units\":16}],\"memory\":[{\"resources\":[{\"type\":\"phys_mem\",\"range\":8589934592}]}]}}'\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&facter, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut scan = probe.clone();
    scan.action = Action::Scan;
    scan.machine = "s1".into();
    scan.id = JobId::probe("test", "default", "s1", 1, scan.action);
    bus.machine_released(&h.addr(0)).await;
    bus.publish(&scan).await;
    let facts = bus.final_of("s1", T).await.facts.unwrap();
    assert_eq!(
        (facts.system.as_deref(), facts.cpu_model.as_deref(), facts.cpu_count),
        (Some("x86_64-linux"), Some("AMD EPYC 7302"), Some(16))
    );
    assert_eq!(facts.memory_bytes, Some(8_589_934_592));

    // another job holds the machine: the probe does not wait
    let kv = bus.js.get_key_value(nio_shared::subjects::LOCKS_BUCKET).await.unwrap();
    kv.create(nio_shared::subjects::lock_key(&h.addr(1), 22), "someone-else".into()).await.unwrap();
    let mut busy = probe.clone();
    busy.machine = "busy".into();
    busy.id = JobId::probe("test", "default", "busy", 1, busy.action);
    busy.endpoint.host = h.addr(1);
    bus.publish(&busy).await;
    let done = bus.final_of("busy", T).await;
    assert_eq!(done.phase, Phase::Skipped, "{done:?}");

    // A machine without nixos-facter (the shell answers 127): the built-in fact script reads the host.
    std::fs::remove_file(&facter).unwrap();
    let mut bare = scan.clone();
    bare.machine = "s2".into();
    bare.id = JobId::probe("test", "default", "s2", 2, bare.action);
    bus.machine_released(&h.addr(0)).await;
    bus.publish(&bare).await;
    let done = bus.final_of("s2", T).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    let facts = done.facts.unwrap();
    assert_eq!(facts.source.as_deref(), Some("nio-facts"));
    assert_eq!(facts.system, Some(format!("{}-linux", std::env::consts::ARCH)));
    let nproc = std::process::Command::new("nproc").output().unwrap().stdout;
    let cpus: u32 = String::from_utf8_lossy(&nproc).trim().parse().unwrap();
    assert_eq!(facts.cpu_count, Some(cpus));
    assert!(facts.network_interfaces.iter().any(|n| n.starts_with("eth0 ")), "{:?}", facts.network_interfaces);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executors_disagreeing_on_a_site_limit_are_refused_at_start() {
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(0));
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let first = config(&[("dc1", 2)]);
    nio_executor::worker::ensure_consumers(&js, &first).await.unwrap();
    nio_executor::worker::ensure_consumers(&js, &first).await.expect("the same limits again are fine");
    let other = config(&[("dc1", 3)]);
    let Err(err) = nio_executor::worker::ensure_consumers(&js, &other).await else {
        panic!("a different maxInFlight is refused")
    };
    let msg = err.to_string();
    assert!(msg.contains("maxInFlight") && msg.contains("2") && msg.contains("3"), "{msg}");
    // and the binary reports it and exits non-zero
    let log = h.path("refused.log");
    let mut child = spawn_binary(&h, &nats, &other, "e9", &[], &log);
    let status = tokio::time::timeout(T, child.wait()).await.unwrap().unwrap();
    assert!(!status.success());
    assert!(std::fs::read_to_string(&log).unwrap().contains("maxInFlight"));
}

/// An executor SIGKILLed during an activation: its job comes back after ackWait (progress acks kept it alive
/// until then), the next executor takes the machine's lock over at once because the dead one's heartbeat is
/// gone (the lock's own TTL is two minutes here), and it finds out the running activation's result on the
/// machine instead of activating again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_executors_job_is_taken_over_in_seconds_and_not_activated_twice() {
    // killed while the machine activates, and while it still builds (the new executor waits for that run)
    for (behaviour, building) in [("slow:3", false), ("slow-build:4.5", true)] {
        let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(1));
        let commit = h.repo.configure("web", behaviour).unwrap();
        let mut bus = Bus::connect(&nats).await;
        let mut cfg = config(&[("dc1", 2)]);
        cfg.ack_wait_seconds = 3;
        cfg.lock_ttl_seconds = 120;
        let mut first = spawn_binary(&h, &nats, &cfg, "e1", &[], &h.path("e1.log"));
        let mut j = job("m1", &h.addr(0), 22, "dc1", &h.repo.url(), &commit);
        j.rollback = true;
        j.confirm_timeout_seconds = 30;
        bus.publish(&j).await;
        let deadline = std::time::Instant::now() + T;
        let started = || match building {
            true => h.hosts[0].exec("pgrep -fx 'sleep 4.5'").is_ok(),
            false => !h.hosts[0].activations().is_empty(),
        };
        while !started() {
            assert!(std::time::Instant::now() < deadline, "{behaviour}: never started");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pid = first.id().unwrap().to_string();
        assert!(std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
        first.wait().await.unwrap();
        let killed = std::time::Instant::now();
        let (stop, task) = spawn_executor(settings(&h, &nats, cfg, "e2"));
        let done = bus.final_of("m1", T).await;
        assert_eq!((done.phase, done.executor.as_str()), (Phase::Succeeded, "e2"), "{behaviour}: {done:?}");
        let said = |what: &str| {
            bus.seen.iter().any(|e| e.executor == "e2" && e.message.as_deref().is_some_and(|m| m.contains(what)))
        };
        assert!(said("took the machine over"), "{behaviour}: the lock was taken over, not waited out");
        if building {
            assert!(said("still building on the machine: waiting for it"), "{behaviour}: {:?}", bus.seen);
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "{behaviour}: recovered in {:?}", killed.elapsed());
        let acts = h.hosts[0].activations();
        assert_eq!(acts.iter().filter(|(a, _)| a == "switch").count(), 1, "{behaviour}: activated once: {acts:?}");
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}

/// A job's time runs from when it holds its machine and budget slot, not while it waits for them: two jobs of
/// 9 s timeouts sharing a budget of one, each taking ~6 s (a 5 s build), both succeed (before: the second spent
/// its time waiting and failed as a timeout). Each job has ~3 s to spare; both together overrun by ~3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_disruption_budget_does_not_spend_the_jobs_time() {
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(2));
    let commit = h.repo.configure("web", "slow-build:5").unwrap();
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&h, &nats, config(&[("dc1", 2)]), "e1"));
    for i in 0..2 {
        let mut j = job(&format!("m{i}"), &h.addr(i), 22, "dc1", &h.repo.url(), &commit);
        j.action = Action::Boot;
        j.timeout_seconds = 9;
        j.budgets = vec![nio_shared::protocol::BudgetClaim { key: "db".into(), max: 1 }];
        bus.publish(&j).await;
    }
    for m in ["m0", "m1"] {
        let done = bus.final_of(m, T).await;
        assert_eq!((done.phase, done.category), (Phase::Succeeded, None), "{m}: {done:?}");
    }
    let waited =
        bus.seen.iter().any(|e| e.message.as_deref().is_some_and(|m| m.contains("waiting for disruption budget db")));
    assert!(waited, "one job waited for the other");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Jobs of two configurations on two machines, both counting against the disruption budget `db` of one machine
/// at a time: never both under an operation (by the machines' own activation records), though the site would
/// allow both; the one that waits says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disruption_budget_holds_across_configurations() {
    let (nats, h) = (NatsServer::start().await.unwrap(), Hosts::start(3));
    let commit = h.repo.configure("web", "slow:1").unwrap();
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&h, &nats, config(&[("dc1", 4)]), "e1"));
    let budget = |max| vec![nio_shared::protocol::BudgetClaim { key: "db".into(), max }];
    for (i, configuration) in ["db-east", "db-west"].into_iter().enumerate() {
        let mut j = job(&format!("m{i}"), &h.addr(i), 22, "dc1", &h.repo.url(), &commit);
        j.configuration = Some(configuration.into());
        j.budgets = budget(1);
        bus.publish(&j).await;
    }
    for m in ["m0", "m1"] {
        assert_eq!(bus.final_of(m, T).await.phase, Phase::Succeeded);
    }
    let spans: Vec<(f64, f64)> = h.hosts[..2].iter().flat_map(|x| x.activation_spans()).collect();
    assert_eq!(spans.len(), 2);
    assert_eq!(max_concurrency(&spans), 1, "the budget held: {spans:?}");
    assert!(
        bus.seen.iter().any(|e| e.message.as_deref().is_some_and(|m| m.contains("waiting for disruption budget db"))),
        "the second job said what it waited for"
    );
    // The budget's slots were released: a job counting against a budget of two runs at once with another.
    let next = h.commit();
    bus.seen.clear();
    for (i, m) in [(1, "m1"), (2, "m2")] {
        let mut j = job(m, &h.addr(i), 22, "dc1", &h.repo.url(), &next);
        j.budgets = budget(2);
        bus.publish(&j).await;
    }
    for m in ["m1", "m2"] {
        assert_eq!(bus.final_of(m, T).await.phase, Phase::Succeeded);
    }
    let later: Vec<(f64, f64)> =
        h.hosts[1..].iter().flat_map(|x| x.activation_spans()).filter(|s| s.0 > spans[1].1.max(spans[0].1)).collect();
    assert_eq!(max_concurrency(&later), 2, "two slots: both at once ({later:?})");
    stop.cancel();
    task.await.unwrap().unwrap();
}
