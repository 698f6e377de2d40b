#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! The executor against a real nats-server and a real OpenSSH sshd with stub NixOS tools.

mod common;

use std::time::Duration;

use common::*;
use nio_shared::protocol::{FailureCategory, Phase, Step};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_uploads_the_source_and_runs_nixos_rebuild_with_the_exact_flake() {
    let (nats, sshd) = (NatsServer::start().await.unwrap(), Sshd::start().await);
    let (repo, commit) = git_repo(sshd.dir.path());
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&sshd, &nats, config(&sshd, &[("dc1", 4)]), "e1"));
    let mut j = job("web-01", &addr(0), sshd.port, "dc1", &repo, &commit);
    j.source.as_mut().unwrap().subdir = Some("hosts".into());
    std::fs::create_dir_all(sshd.dir.path().join("repo/hosts")).unwrap();
    // the flake lives at the repository root here; use no subdir so the stub finds flake.nix
    j.source.as_mut().unwrap().subdir = None;
    j.files = vec![nio_shared::protocol::FileEntry {
        path: "extra/motd.nix".into(),
        content: nio_shared::protocol::FileContent::Inline { content: "{ }\n".into() },
    }];
    bus.publish(&j).await;

    let done = bus.final_of("web-01", T).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    let system = done.system.clone().unwrap();
    assert!(system.ends_with("-nixos-system-web"), "{system}");
    assert_eq!(done.commit.as_deref(), Some(commit.as_str()));
    assert_eq!(done.host_key.as_deref(), Some(sshd.host_key.as_str()), "TOFU reports the key it saw");
    assert_eq!(done.nixos_version.as_deref(), Some("25.05.20261101.abcdef0"));

    let src = sshd.path(&format!("var-lib-nio/src/{commit}"));
    let flake = std::fs::read_to_string(sshd.dir.path().join("repo/flake.nix")).unwrap();
    assert_eq!(
        std::fs::read_to_string(src.join("flake.nix")).unwrap(),
        flake,
        "the tree at the commit is on the machine"
    );
    assert_eq!(std::fs::read_to_string(src.join("extra/motd.nix")).unwrap(), "{ }\n", "additional files are added");
    let marker = std::fs::read_to_string(src.join(".nio-complete")).unwrap();
    assert_eq!(marker.len(), 64, "the upload ends with its digest as the completion marker: {marker:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(src.join("deploy.sh")).unwrap().permissions().mode() & 0o777,
        0o755,
        "executable bit kept"
    );
    assert_eq!(
        std::fs::read_link(src.join("default.nix")).unwrap().to_str(),
        Some("hosts/web/configuration.nix"),
        "symlinks kept"
    );

    let rebuilds: Vec<_> = sshd.calls().into_iter().filter(|c| c.program == "nixos-rebuild").collect();
    assert_eq!(rebuilds.len(), 1);
    assert_eq!(rebuilds[0].args, format!("switch --flake path:{}#web", src.display()));
    let phases: Vec<_> = bus.seen.iter().filter(|e| e.machine == "web-01").map(|e| e.phase).collect();
    assert_eq!(phases.first(), Some(&Phase::Started));
    assert!(phases.contains(&Phase::Step));
    assert_eq!(std::fs::read_to_string(sshd.path("var-lib-nio/applied")).unwrap(), format!("{commit} {system}\n"));

    // The same commit again: already there, nothing rebuilt.
    let mut again = j.clone();
    again.generation = 2;
    again.id = again.id.retry(2);
    bus.seen.clear();
    bus.publish(&again).await;
    let done = bus.final_of("web-01", T).await;
    assert_eq!(done.phase, Phase::Skipped, "{done:?}");
    assert_eq!(sshd.calls().iter().filter(|c| c.program == "nixos-rebuild").count(), 1);
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
    let (nats, sshd) = (NatsServer::start().await.unwrap(), Sshd::start().await);
    let served = tempfile::tempdir().unwrap();
    let repo = nio_loadtest::gitrepo::GitRepo::create(served.path()).unwrap();
    let commit = repo.head().unwrap();
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
    let mut s = settings(&sshd, &nats, config(&sshd, &[("dc1", 4)]), "e1");
    s.git_credentials_dir = Some(creds.path().to_path_buf());
    let (stop, task) = spawn_executor(s);
    let ssh_url = git_ssh.url(repo.path());
    // A Git server that is down: nothing listens on this port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // Another repository for the failures: a commit already fetched is served from the mirror without asking
    // the server again (objects are content-addressed), so these must need a fetch.
    let other = tempfile::tempdir().unwrap();
    let other_repo = nio_loadtest::gitrepo::GitRepo::create(other.path()).unwrap();
    // (A fresh repository made the same second has the very same commit id: bump it to differ.)
    let (other_url, other_commit) = (git_ssh.url(other_repo.path()), other_repo.bump("other").unwrap());
    for (i, (machine, url, cred)) in [
        ("web-https", https.url("repo"), "https"),
        ("web-ssh", ssh_url.clone(), "ssh"),
        ("web-impostor", other_url.clone(), "ssh-bad"),
        ("web-nocreds", https.url("elsewhere"), "missing"),
        ("web-gitdown", format!("https://127.0.0.1:{dead}/git/repo"), "https"),
    ]
    .into_iter()
    .enumerate()
    {
        // The failures ask for a commit the machines are not at (else the job is skipped before any fetch).
        let commit = if machine.starts_with("web-") && !matches!(machine, "web-https" | "web-ssh") {
            &other_commit
        } else {
            &commit
        };
        let mut j = job(machine, &addr(i), sshd.port, "dc1", &url, commit);
        j.source.as_mut().unwrap().credentials = Some(cred.into());
        bus.publish(&j).await;
    }
    for ok in ["web-https", "web-ssh"] {
        let done = bus.final_of(ok, T).await;
        assert_eq!(done.phase, Phase::Succeeded, "{ok}: {done:?}");
    }
    let flake = std::fs::read_to_string(repo.path().join("flake.nix")).unwrap();
    let shipped = sshd.path(&format!("var-lib-nio/src/{commit}/flake.nix"));
    assert_eq!(std::fs::read_to_string(shipped).unwrap(), flake, "the fetched tree is on the machine");
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
    let rebuilds = sshd.calls().into_iter().filter(|c| c.program == "nixos-rebuild").count();
    assert_eq!(rebuilds, 2, "only the two trusted sources were built");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_host_key_runs_nothing_and_fails_permanently() {
    let (nats, sshd) = (NatsServer::start().await.unwrap(), Sshd::start().await);
    let (repo, commit) = git_repo(sshd.dir.path());
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&sshd, &nats, config(&sshd, &[("dc1", 2)]), "e1"));
    let mut j = job("web-01", &addr(0), sshd.port, "dc1", &repo, &commit);
    let other = std::fs::read_to_string(sshd.path("identities/stranger.pub")).unwrap();
    j.endpoint.host_key = Some(other.trim().to_string());
    bus.publish(&j).await;
    let done = bus.final_of("web-01", T).await;
    assert_eq!((done.phase, done.category), (Phase::Failed, Some(FailureCategory::HostKeyMismatch)), "{done:?}");
    assert!(done.message.unwrap().contains("refusing to connect"));
    assert!(sshd.calls().is_empty(), "no command ran: {:?}", sshd.calls());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bus.jobs_drained().await, 0, "termed, not redelivered");
    assert_eq!(bus.seen.iter().filter(|e| e.phase == Phase::Started).count(), 1, "delivered once");

    // the right pinned key works
    let mut ok = job("web-02", &addr(1), sshd.port, "dc1", &repo, &commit);
    ok.endpoint.host_key = Some(sshd.host_key.clone());
    bus.publish(&ok).await;
    assert_eq!(bus.final_of("web-02", T).await.phase, Phase::Succeeded);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_hosts_are_retried_then_fail_and_refused_identities_fail_at_once() {
    let (nats, sshd) = (NatsServer::start().await.unwrap(), Sshd::start().await);
    let (repo, commit) = git_repo(sshd.dir.path());
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&sshd, &nats, config(&sshd, &[("dc1", 2)]), "e1"));
    // Nothing listens on 127.0.0.250 (the fixtures use 127.0.0.1-13): connection refused.
    bus.publish(&job("gone", "127.0.0.250", 9, "dc1", &repo, &commit)).await;
    let mut stranger = job("locked-out", &addr(0), sshd.port, "dc1", &repo, &commit);
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
    assert!(sshd.calls().is_empty());
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_failures_report_the_log_and_failed_health_checks_roll_back() {
    let (nats, sshd) = (NatsServer::start().await.unwrap(), Sshd::start().await);
    let (repo, commit) = git_repo(sshd.dir.path());
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&sshd, &nats, config(&sshd, &[("dc1", 2)]), "e1"));

    sshd.set("rebuild_exit", "1");
    bus.publish(&job("broken", &addr(0), sshd.port, "dc1", &repo, &commit)).await;
    let done = bus.final_of("broken", T).await;
    assert_eq!(
        (done.phase, done.category, done.step),
        (Phase::Failed, Some(FailureCategory::BuildFailed), Some(Step::Build)),
        "{done:?}"
    );
    assert!(done.log_tail.iter().any(|l| l.contains("error: builder for")), "{:?}", done.log_tail);

    sshd.set("rebuild_exit", "0");
    sshd.set("health_exit", "1");
    let mut j = job("unhealthy", &addr(1), sshd.port, "dc1", &repo, &commit);
    j.rollback = true;
    bus.publish(&j).await;
    let done = bus.final_of("unhealthy", T).await;
    assert_eq!((done.phase, done.category), (Phase::RolledBack, Some(FailureCategory::HealthCheckFailed)), "{done:?}");
    assert!(done.system.unwrap().ends_with("prev-system"), "back on the previous generation");
    let calls = sshd.calls();
    assert!(calls.iter().any(|c| c.program == "nixos-rebuild" && c.args == "switch --rollback"), "{calls:?}");
    assert!(calls.iter().any(|c| c.program == "systemctl" && c.args == "is-system-running --wait"));

    // without autoRollback the failed health check is a failure
    let done_calls = calls.len();
    bus.publish(&job("unhealthy2", &addr(2), sshd.port, "dc1", &repo, &commit)).await;
    let done = bus.final_of("unhealthy2", T).await;
    assert_eq!((done.phase, done.category), (Phase::Failed, Some(FailureCategory::HealthCheckFailed)), "{done:?}");
    assert!(!sshd.calls()[done_calls..].iter().any(|c| c.args.contains("--rollback")));

    // a job that runs out of time says in which step
    sshd.set("health_exit", "0");
    sshd.set("health_sleep", "30");
    let mut slow = job("slow", &addr(3), sshd.port, "dc1", &repo, &commit);
    slow.timeout_seconds = 3;
    bus.publish(&slow).await;
    let done = bus.final_of("slow", T).await;
    assert_eq!(
        (done.phase, done.category, done.step),
        (Phase::Failed, Some(FailureCategory::Timeout), Some(Step::Health)),
        "{done:?}"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_terminated_and_the_worker_keeps_going() {
    let (nats, sshd) = (NatsServer::start().await.unwrap(), Sshd::start().await);
    let (repo, commit) = git_repo(sshd.dir.path());
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&sshd, &nats, config(&sshd, &[("dc1", 1)]), "e1"));
    bus.publish_raw("nio.jobs.dc1.apply.test.default.poison", b"{\"v\": 99, \"garbage\": true}").await;
    bus.publish_raw("nio.jobs.dc1.apply.test.default.junk", b"\xff not json").await;
    bus.publish(&job("web-01", &addr(0), sshd.port, "dc1", &repo, &commit)).await;
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

/// JetStream refuses status events for a while (as when the member leading NIO_STATUS is lost and a new leader
/// is being elected): the job's outcome is retried, not dropped, so the Machine does not stay Applying for good,
/// and the job is settled only once its outcome is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_refused_while_the_status_stream_is_unavailable_is_delivered_once_it_is_back() {
    let (nats, sshd) = (NatsServer::start().await.unwrap(), Sshd::start().await);
    let (repo, commit) = git_repo(sshd.dir.path());
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&sshd, &nats, config(&sshd, &[("dc1", 1)]), "e1"));
    sshd.set("rebuild_sleep", "1");
    bus.publish(&job("web-01", &addr(0), sshd.port, "dc1", &repo, &commit)).await;
    bus.until(T, |evs| evs.iter().any(|e| e.phase == Phase::Started)).await;
    bus.drop_status().await;
    // The rebuild finishes while there is no stream to take its outcome.
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
    let (nats, sshd) = (NatsServer::start().await.unwrap(), Sshd::start().await);
    let (repo, _) = git_repo(sshd.dir.path());
    // one commit per job, so no job finds its machine already at its commit
    let commits = more_commits(sshd.dir.path(), 20);
    let mut bus = Bus::connect(&nats).await;
    sshd.set("rebuild_sleep", "0.8");
    let mut stops = vec![];
    for id in ["e1", "e2", "e3"] {
        stops.push(spawn_executor(settings(&sshd, &nats, config(&sshd, &[("dc1", 2)]), id)));
    }
    // 20 jobs on 10 machines' addresses: machines m{i} and twin{i} share an address (one host, two names),
    // so their jobs contend for one lock.
    for i in 0..10 {
        bus.publish(&job(&format!("m{i}"), &addr(i), sshd.port, "dc1", &repo, &commits[2 * i])).await;
        bus.publish(&job(&format!("twin{i}"), &addr(i), sshd.port, "dc1", &repo, &commits[2 * i + 1])).await;
    }
    let evs =
        bus.until(Duration::from_secs(90), |evs| evs.iter().filter(|e| e.phase.is_terminal()).count() == 20).await;
    assert!(evs.iter().filter(|e| e.phase.is_terminal()).all(|e| e.phase == Phase::Succeeded), "all succeed");
    let executors: std::collections::BTreeSet<_> = evs.iter().map(|e| e.executor.clone()).collect();
    assert!(executors.len() >= 2, "work spread over executors: {executors:?}");
    let calls = sshd.calls();
    let rebuilds: Vec<_> = calls.iter().filter(|c| c.program == "nixos-rebuild").cloned().collect();
    assert_eq!(rebuilds.len(), 20);
    assert_eq!(max_concurrency(&calls, "nixos-rebuild"), 2, "the site limit holds across three executors, and is used");
    for i in 0..10 {
        let on_machine: Vec<_> = rebuilds.iter().filter(|c| c.host == addr(i)).cloned().collect();
        assert!(!on_machine.is_empty(), "machine {} was rebuilt", addr(i));
        assert_eq!(
            max_concurrency(&on_machine, "nixos-rebuild"),
            1,
            "two jobs on {} overlapped: {on_machine:?}",
            addr(i)
        );
    }
    for (s, _) in stops {
        s.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_land_0400_outside_the_store_and_never_in_logs_argv_or_the_stream() {
    let (nats, sshd) = (NatsServer::start().await.unwrap(), Sshd::start().await);
    let (repo, commit) = git_repo(sshd.dir.path());
    let mut bus = Bus::connect(&nats).await;
    let key_file = sshd.path("seal.key");
    std::fs::write(&key_file, nio_shared::seal::SealKey::generate()).unwrap();
    let key = nio_shared::seal::SealKey::from_file(&key_file).unwrap();
    let plaintext = "hunter2-correct-horse-battery";
    let mut j = job("db-01", &addr(0), sshd.port, "dc1", &repo, &commit);
    let ctx = nio_shared::protocol::SecretFile::seal_context("test", "default", "db-01", "postgres/password");
    j.secrets = vec![nio_shared::protocol::SecretFile {
        path: "postgres/password".into(),
        sealed: key.seal(plaintext.as_bytes(), &ctx).unwrap(),
    }];
    let wire = String::from_utf8(j.encode()).unwrap();
    assert!(!wire.contains(plaintext));

    let log = sshd.path("executor.log");
    let mut child = spawn_binary(
        &sshd,
        &nats,
        &config(&sshd, &[("dc1", 2)]),
        "e1",
        &["--seal-key-file", key_file.to_str().unwrap()],
        &log,
    );
    bus.publish(&j).await;
    let done = bus.final_of("db-01", T).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");

    use std::os::unix::fs::PermissionsExt;
    let secret = sshd.path("run-nio-secrets/postgres/password");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), plaintext);
    assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o400);
    assert_eq!(std::fs::metadata(sshd.path("run-nio-secrets")).unwrap().permissions().mode() & 0o777, 0o700);
    assert!(!sshd.path(&format!("var-lib-nio/src/{commit}/postgres")).exists(), "not in the source tree");

    sigterm(&child);
    child.wait().await.unwrap();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("job.execute") || logs.contains("executor ready"), "the log was captured");
    assert!(!logs.contains(plaintext), "secret in executor logs");
    let calls = std::fs::read_to_string(sshd.path("calls.log")).unwrap();
    assert!(!calls.contains(plaintext), "secret in a command line");
    assert!(!sshd.log().contains(plaintext));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_job_finishes_it_and_short_grace_returns_it_to_the_queue() {
    let (nats, sshd) = (NatsServer::start().await.unwrap(), Sshd::start().await);
    let (repo, _) = git_repo(sshd.dir.path());
    let commits = more_commits(sshd.dir.path(), 2);
    let mut bus = Bus::connect(&nats).await;
    sshd.set("rebuild_sleep", "2");
    let cfg = config(&sshd, &[("dc1", 2)]);

    // Generous grace: the running job completes before the process exits.
    let mut child = spawn_binary(&sshd, &nats, &cfg, "e1", &["--shutdown-grace", "30"], &sshd.path("e1.log"));
    bus.publish(&job("m1", &addr(0), sshd.port, "dc1", &repo, &commits[0])).await;
    bus.until(T, |evs| evs.iter().any(|e| e.machine == "m1" && e.step == Some(Step::Build))).await;
    sigterm(&child);
    let status = tokio::time::timeout(T, child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "clean exit after finishing: {status:?}");
    assert_eq!(bus.final_of("m1", T).await.phase, Phase::Succeeded);

    // Short grace: the job is handed back and another executor completes it.
    sshd.set("rebuild_sleep", "4");
    let mut child = spawn_binary(&sshd, &nats, &cfg, "e2", &["--shutdown-grace", "1"], &sshd.path("e2.log"));
    bus.publish(&job("m2", &addr(1), sshd.port, "dc1", &repo, &commits[1])).await;
    bus.until(T, |evs| evs.iter().any(|e| e.machine == "m2" && e.step == Some(Step::Build))).await;
    sigterm(&child);
    let status = tokio::time::timeout(T, child.wait()).await.unwrap().unwrap();
    assert!(status.success());
    assert!(
        !bus.seen.iter().any(|e| e.machine == "m2" && e.phase.is_terminal()),
        "not reported done by the stopped executor"
    );
    sshd.set("rebuild_sleep", "0");
    let (stop, task) = spawn_executor(settings(&sshd, &nats, cfg, "e3"));
    let done = bus.final_of("m2", Duration::from_secs(60)).await;
    assert_eq!((done.phase, done.executor.as_str()), (Phase::Succeeded, "e3"), "redelivered, not lost: {done:?}");
    let rebuilds: Vec<_> =
        sshd.calls().into_iter().filter(|c| c.program == "nixos-rebuild" && c.host == addr(1)).collect();
    assert_eq!(
        max_concurrency(&rebuilds, "nixos-rebuild"),
        1,
        "the abandoned rebuild and its retry never overlapped: {rebuilds:#?}\n{:#?}",
        bus.seen
            .iter()
            .filter(|e| e.machine == "m2")
            .map(|e| (e.at, &e.executor, e.phase, &e.message))
            .collect::<Vec<_>>()
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_report_the_system_scans_report_facts_and_busy_machines_skip_probes() {
    let (nats, sshd) = (NatsServer::start().await.unwrap(), Sshd::start().await);
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings(&sshd, &nats, config(&sshd, &[("dc1", 2)]), "e1"));
    let mut probe = job("p1", &addr(0), sshd.port, "dc1", "", "");
    probe.action = nio_shared::protocol::Action::Probe;
    probe.source = None;
    probe.id = nio_shared::protocol::JobId::probe("test", "default", "p1", 1, probe.action);
    bus.publish(&probe).await;
    let done = bus.final_of("p1", T).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    assert!(done.system.unwrap().ends_with("prev-system"));
    assert_eq!(done.nixos_version.as_deref(), Some("25.05.20261101.abcdef0"));

    let mut scan = probe.clone();
    scan.action = nio_shared::protocol::Action::Scan;
    scan.machine = "s1".into();
    scan.id = nio_shared::protocol::JobId::probe("test", "default", "s1", 1, scan.action);
    bus.publish(&scan).await;
    let facts = bus.final_of("s1", T).await.facts.unwrap();
    assert_eq!(
        (facts.system.as_deref(), facts.cpu_model.as_deref(), facts.cpu_count),
        (Some("x86_64-linux"), Some("AMD EPYC 7302"), Some(16))
    );
    assert_eq!(facts.memory_bytes, Some(8_589_934_592));

    // another job holds the machine: the probe does not wait
    let kv = bus.js.get_key_value(nio_shared::subjects::LOCKS_BUCKET).await.unwrap();
    kv.create(nio_shared::subjects::lock_key(&addr(1), sshd.port), "someone-else".into()).await.unwrap();
    let mut busy = probe.clone();
    busy.machine = "busy".into();
    busy.id = nio_shared::protocol::JobId::probe("test", "default", "busy", 1, busy.action);
    busy.endpoint.host = addr(1);
    bus.publish(&busy).await;
    let done = bus.final_of("busy", T).await;
    assert_eq!(done.phase, Phase::Skipped, "{done:?}");

    // A machine without nixos-facter (the shell answers 127): the built-in fact script reads this host.
    std::fs::remove_file(sshd.path("bin/nixos-facter")).unwrap();
    let mut bare = scan.clone();
    bare.machine = "s2".into();
    bare.id = nio_shared::protocol::JobId::probe("test", "default", "s2", 2, bare.action);
    bus.publish(&bare).await;
    let done = bus.final_of("s2", T).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    let facts = done.facts.unwrap();
    assert_eq!(facts.source.as_deref(), Some("nio-facts"));
    assert_eq!(facts.system, Some(format!("{}-linux", std::env::consts::ARCH)));
    let nproc = std::process::Command::new("nproc").output().unwrap().stdout;
    let cpus: u32 = String::from_utf8_lossy(&nproc).trim().parse().unwrap();
    assert_eq!(facts.cpu_count, Some(cpus));
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(facts.memory_bytes, Some(mem_kb * 1024));
    assert!(facts.network_interfaces.iter().any(|n| n.starts_with("lo ")), "{:?}", facts.network_interfaces);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executors_disagreeing_on_a_site_limit_are_refused_at_start() {
    let (nats, sshd) = (NatsServer::start().await.unwrap(), Sshd::start().await);
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let first = config(&sshd, &[("dc1", 2)]);
    nio_executor::worker::ensure_consumers(&js, &first).await.unwrap();
    nio_executor::worker::ensure_consumers(&js, &first).await.expect("the same limits again are fine");
    let other = config(&sshd, &[("dc1", 3)]);
    let Err(err) = nio_executor::worker::ensure_consumers(&js, &other).await else {
        panic!("a different maxInFlight is refused")
    };
    let msg = err.to_string();
    assert!(msg.contains("maxInFlight") && msg.contains("2") && msg.contains("3"), "{msg}");
    // and the binary reports it and exits non-zero
    let log = sshd.path("refused.log");
    let mut child = spawn_binary(&sshd, &nats, &other, "e9", &[], &log);
    let status = tokio::time::timeout(T, child.wait()).await.unwrap().unwrap();
    assert!(!status.success());
    assert!(std::fs::read_to_string(&log).unwrap().contains("maxInFlight"));
}
