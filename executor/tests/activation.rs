#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! Updates against real Nix on namespaced test hosts (real sshd, real sudo, Debian's Nix; see
//! `nio_loadtest::testhost` for what stands in for systemd): build, profile, switch-to-configuration under the
//! activation unit, confirmation over a new connection, and the host's own rollback.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use nio_loadtest::testhost::{HostOptions, SystemRepo, TestHost};
use nio_shared::protocol::{Action, FailureCategory, Job, Phase, StatusEvent, Step};

const T: Duration = Duration::from_secs(90);

/// One executor, a NATS server, a repository of fixture systems and the identities the hosts authorize.
struct Rig {
    _nats: NatsServer,
    bus: Bus,
    repo: SystemRepo,
    dir: tempfile::TempDir,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn identities(dir: &Path) -> PathBuf {
    let ids = dir.join("identities");
    if !ids.join("default").exists() {
        std::fs::create_dir_all(&ids).unwrap();
        nio_loadtest::procs::keygen(&ids.join("default")).unwrap();
    }
    ids
}

impl Rig {
    async fn start() -> Rig {
        Self::start_with(|_, _| {}).await
    }

    /// With the executor's settings changed by `tune` (given the rig's directory) first.
    async fn start_with(tune: impl FnOnce(&Path, &mut nio_executor::Settings)) -> Rig {
        let nats = NatsServer::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let repo = SystemRepo::create(dir.path()).unwrap();
        let bus = Bus::connect(&nats).await;
        let cfg = config(&[("dc1", 8)]);
        let mut settings = settings_with(identities(dir.path()), dir.path().join("cache"), &nats, cfg, "e1");
        tune(dir.path(), &mut settings);
        let (stop, task) = spawn_executor(settings);
        Rig { _nats: nats, bus, repo, dir, stop, task }
    }

    /// With a seal key (and `tune` as for `start_with`): the rig, and the key to seal jobs' secrets with.
    async fn sealing(tune: impl FnOnce(&Path, &mut nio_executor::Settings)) -> (Rig, nio_shared::seal::SealKey) {
        let key_file = std::sync::OnceLock::new();
        let rig = Self::start_with(|dir, s| {
            tune(dir, s);
            let k = dir.join("seal.key");
            std::fs::write(&k, nio_shared::seal::SealKey::generate()).unwrap();
            s.seal_key_file = Some(k.clone());
            let _ = key_file.set(k);
        })
        .await;
        let seal = nio_shared::seal::SealKey::from_file(key_file.get().unwrap()).unwrap();
        (rig, seal)
    }

    fn host(&self, sudo: bool) -> TestHost {
        let opts = HostOptions { sudo, identities: Some(identities(self.dir.path())), ..Default::default() };
        TestHost::start(&opts).expect("test host (needs root, iproute2, nix-bin: make setup)")
    }

    /// A job applying configuration `attr` at `commit` to `host` (as root, action switch).
    fn job(&self, machine: &str, host: &TestHost, attr: &str, commit: &str, n: u32) -> Job {
        let mut j = job(machine, &host.addr, 22, "dc1", &self.repo.url(), commit);
        j.id = nio_shared::protocol::JobId::new("test", "default", machine, &format!("{commit}/{n}"), Action::Switch);
        j.source.as_mut().unwrap().flake_attr = attr.into();
        j.confirm_timeout_seconds = 5;
        j.timeout_seconds = 60;
        j
    }

    async fn run(&mut self, j: &Job) -> StatusEvent {
        self.bus.seen.retain(|e| e.machine != j.machine);
        self.bus.publish(j).await;
        self.bus.final_of(&j.machine, T).await
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_builds_with_real_nix_sets_the_profile_and_is_confirmed_over_a_new_connection() {
    let mut rig = Rig::start().await;
    let host = rig.host(true);
    let initial = host.current_system().unwrap();
    let commit = rig.repo.bump().unwrap();
    let mut j = rig.job("web-01", &host, "web", &commit, 1);
    j.rollback = true;
    let done = rig.run(&j).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    // By sshd's own log: two connections (the job's and the confirmation's), three commands (state read;
    // upload + build + activation; health + confirmation).
    assert_eq!(host.ssh_counts(), (2, 3), "{}", host.sshd_log());
    let system = host.current_system().unwrap();
    assert!(system.ends_with("-nixos-system-web-2"), "{system}");
    assert_eq!(done.system.as_deref(), Some(system.as_str()), "status reports what runs");
    assert_eq!(done.commit.as_deref(), Some(commit.as_str()));
    assert_eq!(done.nixos_version.as_deref(), Some("25.05.1"), "the version read before the switch");
    assert_eq!(host.generations(), vec![1, 2], "a new generation of the system profile");
    assert_eq!(host.resolve("/nix/var/nix/profiles/system").as_deref(), Some(system.as_str()));
    assert_eq!(host.boot_default().as_deref(), Some(system.as_str()), "the boot loader boots it next");
    assert_ne!(system, initial);
    let acts = host.activations();
    assert_eq!(acts, vec![("switch".to_string(), system.clone()), ("end".to_string(), "0".to_string())], "{acts:?}");
    let marker = std::fs::read_to_string(host.path("/var/lib/nio/applied")).unwrap();
    assert!(marker.trim().ends_with(&format!(" {system}")), "{marker}");

    // The same target again (a new job): nothing built or activated.
    let again = rig.job("web-01", &host, "web", &commit, 2);
    let done = rig.run(&again).await;
    assert_eq!(done.phase, Phase::Skipped, "{done:?}");
    assert_eq!(host.activations().len(), 2);
    assert_eq!(host.generations(), vec![1, 2]);

    // Three more commits: the machine keeps the two most recently used source trees.
    for n in 3..6 {
        let commit = rig.repo.bump().unwrap();
        let done = rig.run(&rig.job("web-01", &host, "web", &commit, n)).await;
        assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    }
    let trees = std::fs::read_dir(host.path("/var/lib/nio/src")).unwrap().count();
    assert_eq!(trees, 2, "source trees pruned");
    assert_eq!(host.generations(), vec![1, 2, 3, 4, 5]);
    rig.stop().await;
}

/// The job's SSH connection is lost while the machine builds (its sshd session killed): the run on the machine
/// goes on with nobody reading it, the activation starts with its dead-man's switch, and the confirmation over
/// a new connection waits for the build: the job succeeds. (Before, the run died at its next line of output,
/// after the build had set the boot default and before any activation, and the job was reported as a reboot.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_during_the_build_does_not_stop_the_run_halfway() {
    let mut rig = Rig::start().await;
    let host = rig.host(true);
    let initial = host.current_system().unwrap();
    let commit = rig.repo.configure("slowb", "slow-build:6.5").unwrap();
    let mut j = rig.job("slowb", &host, "slowb", &commit, 1);
    j.rollback = true;
    rig.bus.publish(&j).await;
    cut_the_connection_once_building(&host, "sleep 6.5").await;
    let done = rig.bus.final_of("slowb", T).await;
    assert_eq!((done.phase, done.category), (Phase::Succeeded, None), "{done:?}");
    let system = host.current_system().unwrap();
    assert_ne!(system, initial);
    assert_eq!(done.system.as_deref(), Some(system.as_str()));
    assert_eq!(host.boot_default().as_deref(), Some(system.as_str()));
    assert_eq!(host.generations(), vec![1, 2]);
    let acts = host.activations();
    assert_eq!(acts, vec![("switch".to_string(), system.clone()), ("end".to_string(), "0".to_string())], "{acts:?}");
    rig.stop().await;
}

/// Waits until the machine runs `building` (the fixture's build), then kills the job's SSH connection: its sshd
/// processes (below the listener, titled `sshd: ...`), not the command they run.
async fn cut_the_connection_once_building(host: &TestHost, building: &str) {
    let since = std::time::Instant::now();
    while host.exec(&format!("pgrep -fx '{building}'")).is_err() {
        assert!(since.elapsed() < Duration::from_secs(30), "the build never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kill_ssh_sessions(host);
}

/// Kills every SSH session of `host`: its sshd processes below the listener (titled `sshd: ...`), not the
/// commands they run.
fn kill_ssh_sessions(host: &TestHost) {
    let cut = r#"kids() { for c in $(pgrep -P "$1"); do echo "$c"; kids "$c"; done; }
        for p in $(kids "$(cat /run/sshd.pid)"); do
          case "$(tr '\0' ' ' < "/proc/$p/cmdline")" in "sshd: "*) echo "$p" ;; esac
        done"#;
    let sessions = host.exec(cut).unwrap();
    assert!(!sessions.trim().is_empty(), "no SSH session to cut");
    host.exec(&format!("kill -KILL {}", sessions.split_whitespace().collect::<Vec<_>>().join(" "))).unwrap();
}

/// A build that fails after the job's connection was lost is reported as what it is, with the build's log: the
/// confirmation over a new connection reads the run's failure (before: HealthCheckFailed, "`sudo` exited with
/// status 3", the confirmation's own exit status). Nothing was activated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_fails_after_the_connection_was_lost_is_a_build_failure() {
    let mut rig = Rig::start().await;
    let host = rig.host(true);
    let initial = host.current_system().unwrap();
    let commit = rig.repo.configure("failb", "slow-build-fail:5.5").unwrap();
    let j = rig.job("failb", &host, "failb", &commit, 1);
    rig.bus.publish(&j).await;
    cut_the_connection_once_building(&host, "sleep 5.5").await;
    let done = rig.bus.final_of("failb", T).await;
    assert_eq!((done.phase, done.category), (Phase::Failed, Some(FailureCategory::BuildFailed)), "{done:?}");
    let log = done.log_tail.join("\n");
    assert!(log.contains("fails after 5.5s, as asked"), "the build's log: {log}");
    assert_eq!(host.current_system().unwrap(), initial);
    assert!(host.activations().is_empty(), "{:?}", host.activations());
    rig.stop().await;
}

/// A health check slower than the confirmation window is waited for: the confirmation reached the machine, so
/// it is not lost, and a healthy machine is not rolled back (before: RolledBack, "no confirmation within 5s").
/// A check that fails is still a rollback, with the check's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_slower_than_the_window_is_waited_for() {
    let mut rig = Rig::start().await;
    let host = rig.host(true);
    let initial = host.current_system().unwrap();
    for (n, command, ok) in [(1, "sleep 8", true), (2, "sleep 7; false", false)] {
        let commit = rig.repo.bump().unwrap();
        let mut j = rig.job("slowcheck", &host, "web", &commit, n);
        j.rollback = true;
        let command = ["sh", "-c", command].map(String::from).to_vec();
        j.health_check = Some(nio_shared::crd::HealthCheck { command, timeout_seconds: 60, ..Default::default() });
        let done = rig.run(&j).await;
        let system = host.current_system().unwrap();
        if ok {
            assert_eq!((done.phase, done.category), (Phase::Succeeded, None), "{done:?}");
            assert_ne!(system, initial);
        } else {
            assert_eq!(
                (done.phase, done.category),
                (Phase::RolledBack, Some(FailureCategory::HealthCheckFailed)),
                "{done:?}"
            );
            assert!(done.message.as_deref().unwrap().contains("health check failed"), "{done:?}");
        }
        assert_eq!(host.boot_default().as_deref(), Some(system.as_str()));
    }
    rig.stop().await;
}

/// Exit 1 (25.05's activation failure) and exit 4 (failed units) are activation failures, not build
/// failures: with autoRollback the host goes back to what ran before, the boot default included, and the
/// failed generation is gone; without it the job fails and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_failures_roll_back_on_the_host_and_build_failures_do_not_activate() {
    let mut rig = Rig::start().await;
    let (a, b, c) = (rig.host(true), rig.host(true), rig.host(true));
    let initial = a.current_system().unwrap();
    rig.repo.configure("exit1", "exit1").unwrap();
    let commit = rig.repo.configure("exit4", "exit4").unwrap();
    for (host, attr) in [(&a, "exit1"), (&b, "exit4")] {
        let mut j = rig.job(attr, host, attr, &commit, 1);
        j.rollback = true;
        let done = rig.run(&j).await;
        assert_eq!(
            (done.phase, done.category),
            (Phase::RolledBack, Some(FailureCategory::ActivationFailed)),
            "{attr}: {done:?}"
        );
        let code = if attr == "exit1" { "1" } else { "4" };
        assert!(done.message.as_deref().unwrap().contains(&format!("exited with status {code}")), "{done:?}");
        assert_eq!(host.current_system().as_deref(), Some(initial.as_str()), "{attr}: what ran before runs");
        assert_eq!(host.boot_default().as_deref(), Some(initial.as_str()), "{attr}: and boots next");
        assert_eq!(host.generations(), vec![1], "{attr}: the failed generation is deleted");
        assert!(!host.path("/var/lib/nio/applied").exists(), "{attr}: nothing recorded as applied");
    }
    // Without autoRollback: a failure, the system left as the activation left it.
    let j = rig.job("exit4-keep", &c, "exit4", &commit, 1);
    let done = rig.run(&j).await;
    assert_eq!((done.phase, done.category), (Phase::Failed, Some(FailureCategory::ActivationFailed)), "{done:?}");
    assert!(c.current_system().unwrap().contains("nixos-system-exit4"));

    // A build failure: nothing activated, the log says why.
    let broken = rig.repo.write("build.sh", "echo 'error: attribute missing' >&2; exit 1\n").unwrap();
    let before = a.activations().len();
    let done = rig.run(&rig.job("broken", &a, "web", &broken, 1)).await;
    assert_eq!((done.phase, done.category), (Phase::Failed, Some(FailureCategory::BuildFailed)), "{done:?}");
    assert!(done.log_tail.iter().any(|l| l.contains("error: attribute missing")), "{:?}", done.log_tail);
    assert_eq!(a.activations().len(), before);

    // A result that is not a NixOS system: nothing activated, and the next boot is what it was (the build sets the
    // profile in the same process, so the script has to put it back).
    let odd = rig
        .repo
        .write("build.sh", "PATH=/usr/bin:/bin\nmkdir -p \"$out\"\necho 25.05 > \"$out/nixos-version\"\n")
        .unwrap();
    let done = rig.run(&rig.job("not-nixos", &a, "web", &odd, 1)).await;
    assert_eq!((done.phase, done.category), (Phase::Failed, Some(FailureCategory::BuildFailed)), "{done:?}");
    assert!(done.log_tail.iter().any(|l| l.contains("not a NixOS system")), "{:?}", done.log_tail);
    assert_eq!(a.activations().len(), before);
    assert_eq!(a.generations(), vec![1], "the profile is back at the generation it had");
    assert_eq!(a.boot_default().as_deref(), Some(initial.as_str()));
    rig.stop().await;
}

/// The dead-man's switch: an activation that takes the network down (or breaks new logins) cannot be
/// confirmed over a new connection, so the host rolls itself back and is reachable again; the status says
/// why, and it is a rollback, never a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activations_that_cut_the_network_or_break_logins_are_rolled_back_by_the_host_itself() {
    let mut rig = Rig::start().await;
    let (a, b) = (rig.host(true), rig.host(true));
    let initial = a.current_system().unwrap();
    rig.repo.configure("cut", "cut-network").unwrap();
    let commit = rig.repo.configure("nologin", "break-login").unwrap();
    for (host, attr) in [(&a, "cut"), (&b, "nologin")] {
        let mut j = rig.job(attr, host, attr, &commit, 1);
        j.rollback = true;
        let started = std::time::Instant::now();
        let done = rig.run(&j).await;
        assert_eq!(
            (done.phase, done.category),
            (Phase::RolledBack, Some(FailureCategory::ActivationFailed)),
            "{attr}: {done:?}"
        );
        assert!(done.message.as_deref().unwrap().contains("no confirmation"), "{attr}: {done:?}");
        assert!(host.link_up(), "{attr}: the network is back");
        assert_eq!(host.current_system().as_deref(), Some(initial.as_str()), "{attr}");
        assert_eq!(host.boot_default().as_deref(), Some(initial.as_str()), "{attr}");
        assert_eq!(host.generations(), vec![1], "{attr}");
        assert!(started.elapsed() < Duration::from_secs(60), "{attr}: {:?}", started.elapsed());
    }
    rig.stop().await;
}

/// A non-root SSH user deploys through `sudo -n`; without passwordless sudo the job fails with
/// PermissionDenied before anything changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_root_user_deploys_with_sudo_and_without_sudo_nothing_changes() {
    let mut rig = Rig::start().await;
    let (with, without) = (rig.host(true), rig.host(false));
    let commit = rig.repo.bump().unwrap();
    let mut j = rig.job("sudoer", &with, "web", &commit, 1);
    j.endpoint.user = "deploy".into();
    j.rollback = true;
    let done = rig.run(&j).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    assert_eq!(with.generations(), vec![1, 2]);
    assert!(with.current_system().unwrap().ends_with("nixos-system-web-2"));

    let mut j = rig.job("no-sudo", &without, "web", &commit, 1);
    j.endpoint.user = "deploy".into();
    let done = rig.run(&j).await;
    assert_eq!((done.phase, done.category), (Phase::Failed, Some(FailureCategory::PermissionDenied)), "{done:?}");
    assert!(done.message.as_deref().unwrap().contains("sudo"), "{done:?}");
    assert_eq!(without.generations(), vec![1]);
    assert!(!without.path("/var/lib/nio").exists(), "nothing written");
    rig.stop().await;
}

/// A switch back to a target the machine runs, after a boot job made another system the boot default, is applied
/// (the boot default set back), not skipped as "already running this target": before, the next reboot ran the
/// boot job's system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_after_a_boot_job_sets_the_boot_default_back() {
    let mut rig = Rig::start().await;
    let host = rig.host(true);
    let a = rig.repo.bump().unwrap();
    let done = rig.run(&rig.job("flip", &host, "web", &a, 1)).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    let system_a = host.current_system().unwrap();
    let b = rig.repo.bump().unwrap();
    let mut boot = rig.job("flip", &host, "web", &b, 2);
    boot.action = Action::Boot;
    assert_eq!(rig.run(&boot).await.phase, Phase::Succeeded);
    assert_ne!(host.boot_default().as_deref(), Some(system_a.as_str()), "the boot job changed the boot default");
    let done = rig.run(&rig.job("flip", &host, "web", &a, 3)).await;
    assert_eq!(done.phase, Phase::Succeeded, "applied, not skipped: {done:?}");
    assert_eq!(host.current_system().as_deref(), Some(system_a.as_str()));
    assert_eq!(host.boot_default().as_deref(), Some(system_a.as_str()), "the next boot runs it too");
    rig.stop().await;
}

/// boot changes only the boot default; test activates without touching it and rolls back to the boot
/// default on failure; dry-activate changes nothing. None of them reports the commit as running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_test_and_dry_activate_do_what_they_say() {
    let mut rig = Rig::start().await;
    let (a, b, c) = (rig.host(true), rig.host(true), rig.host(true));
    let initial = a.current_system().unwrap();
    rig.repo.configure("bad", "unhealthy").unwrap();
    let commit = rig.repo.bump().unwrap();

    let mut boot = rig.job("boot", &a, "web", &commit, 1);
    boot.action = Action::Boot;
    let done = rig.run(&boot).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    assert_eq!(done.system.as_deref(), Some(initial.as_str()), "what runs is still the initial system");
    assert!(done.message.as_deref().unwrap().contains("after the next reboot"), "{done:?}");
    assert_eq!(a.current_system().as_deref(), Some(initial.as_str()));
    let next = a.boot_default().unwrap();
    assert!(next.ends_with("nixos-system-web-2"), "{next}");
    a.reboot().unwrap();
    assert_eq!(a.current_system().as_deref(), Some(next.as_str()), "runs after a reboot");
    // A fleet that only ever boots keeps its disk tidy too: the two most recently used source trees (before:
    // every tree and every job's system, as only a confirmation pruned).
    for n in 2..5 {
        let mut boot = rig.job("boot", &a, "web", &rig.repo.bump().unwrap(), n);
        boot.action = Action::Boot;
        assert_eq!(rig.run(&boot).await.phase, Phase::Succeeded);
    }
    let trees = std::fs::read_dir(a.path("/var/lib/nio/src")).unwrap().count();
    assert_eq!(trees, 2, "source trees pruned");

    let mut test = rig.job("test", &b, "bad", &commit, 1);
    test.action = Action::Test;
    test.rollback = true;
    let done = rig.run(&test).await;
    assert_eq!((done.phase, done.category), (Phase::RolledBack, Some(FailureCategory::HealthCheckFailed)), "{done:?}");
    assert!(done.message.as_deref().unwrap().contains("nginx.service"), "{done:?}");
    assert_eq!(b.current_system().as_deref(), Some(initial.as_str()), "the boot default re-activated");
    assert_eq!(b.generations(), vec![1], "test never adds a generation");
    let acts = b.activations();
    assert_eq!(acts.iter().filter(|(a, _)| a == "test").count(), 2, "{acts:?}");
    assert_eq!(acts.last().map(|(_, s)| s.as_str()), Some("0"));

    let mut dry = rig.job("dry", &c, "web", &commit, 1);
    dry.action = Action::DryActivate;
    let done = rig.run(&dry).await;
    assert_eq!((done.phase, done.system.as_deref()), (Phase::Succeeded, Some(initial.as_str())), "{done:?}");
    assert_eq!(c.current_system().as_deref(), Some(initial.as_str()));
    assert_eq!(c.generations(), vec![1]);
    rig.stop().await;
}

/// The applied marker holds the target's full identity: the same commit with other files, secrets, flake
/// attribute or subdirectory applies again, and after a removal the same target applies again too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_part_of_the_target_identity_applies_again_and_a_removal_writes_no_marker() {
    let mut rig = Rig::start().await;
    let host = rig.host(true);
    // A second copy of the flake in a subdirectory, and a second configuration.
    let root = rig.repo.path.clone();
    for f in ["flake.nix", "build.sh", "version", "hosts/web", "hosts/initial"] {
        let to = root.join("alt").join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(root.join(f), to).unwrap();
    }
    let commit = rig.repo.configure("web2", "ok").unwrap();
    let base = rig.job("m", &host, "web", &commit, 1);
    let file = |content: &str| nio_shared::protocol::FileEntry {
        path: "motd.nix".into(),
        content: nio_shared::protocol::FileContent::Inline { content: content.into() },
    };
    let mut variants: Vec<(&str, Job)> = Vec::new();
    variants.push(("first", base.clone()));
    let mut j = base.clone();
    j.files = vec![file("{ a = 1; }")];
    variants.push(("a file", j.clone()));
    j.files = vec![file("{ a = 2; }")];
    variants.push(("its content", j.clone()));
    j.secrets_hash = Some("sha256:other".into());
    variants.push(("the secrets", j.clone()));
    j.source.as_mut().unwrap().flake_attr = "web2".into();
    variants.push(("the flake attribute", j.clone()));
    j.source.as_mut().unwrap().subdir = Some("alt".into());
    j.source.as_mut().unwrap().flake_attr = "web".into();
    variants.push(("the subdirectory", j.clone()));
    for (n, (what, j)) in variants.into_iter().enumerate() {
        let mut j = j;
        j.id = nio_shared::protocol::JobId::new("test", "default", "m", &format!("{commit}/{n}"), Action::Switch);
        let done = rig.run(&j).await;
        assert_eq!(done.phase, Phase::Succeeded, "changing {what} applies again: {done:?}");
        j.id = j.id.retry(1);
        let done = rig.run(&j).await;
        assert_eq!(done.phase, Phase::Skipped, "the same target ({what}) again is skipped: {done:?}");
    }
    // A removal (onRemoveFlake: initial) writes no marker; applying the last target again is not skipped.
    let marker = std::fs::read_to_string(host.path("/var/lib/nio/applied")).unwrap();
    let mut remove = rig.job("m", &host, "initial", &commit, 90);
    remove.action = Action::Remove;
    remove.id = nio_shared::protocol::JobId::new("test", "default", "m", &format!("{commit}/90"), Action::Remove);
    assert_eq!(rig.run(&remove).await.phase, Phase::Succeeded);
    assert!(host.current_system().unwrap().ends_with("nixos-system-initial-1"));
    assert_eq!(std::fs::read_to_string(host.path("/var/lib/nio/applied")).unwrap(), marker, "untouched");
    let readd = rig.job("m", &host, "web", &commit, 91);
    assert_eq!(rig.run(&readd).await.phase, Phase::Succeeded, "re-added after removal: applied again");
    rig.stop().await;
}

/// The full install on a real-Nix host: kexec into the installer (same host keys), disko formats and mounts the
/// disk, real Nix builds the system into the disk's store (in its sandbox, as on the installer), nixos-install
/// sets the installed profile and boot loader, a new host key and the secrets go onto the disk before the first
/// boot, and the machine boots the installed system from its disk, presenting the new key; an update then works
/// against that system with the key NIO pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_install_kexecs_formats_installs_and_boots_the_new_system_from_disk() {
    let (mut rig, seal) = Rig::sealing(|dir, s| s.kexec_tarball = Some(kexec_tarball(dir))).await;
    let host = rig.host(true);
    let first_boot = host.boot_id();
    let old_key = host.host_key.clone();
    let commit = rig.repo.bump().unwrap();
    let mut j = rig.job("web-01", &host, "web", &commit, 1);
    j.action = Action::Install;
    j.id = nio_shared::protocol::JobId::new("test", "default", "web-01", &format!("{commit}/1"), Action::Install);
    j.endpoint.host_key = Some(old_key.clone());
    j.timeout_seconds = 120;
    let context = nio_shared::protocol::SecretFile::seal_context("test", "default", "web-01", "db/password");
    j.secrets = vec![nio_shared::protocol::SecretFile {
        path: "db/password".into(),
        sealed: seal.seal(b"hunter2", &context).unwrap(),
        owner: None,
        group: None,
        mode: Some("0440".into()),
    }];
    let done = rig.run(&j).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}\npower: {}\n{}", host.power_log(), host.sshd_log());

    // Booted from its disk: the installed system runs, and it is what the job reports.
    assert!(host.installed() && !host.in_installer(), "booted the installed system");
    let system = host.current_system().unwrap();
    assert!(system.ends_with("-nixos-system-web-2"), "{system}");
    assert_eq!(done.system.as_deref(), Some(system.as_str()));
    assert_eq!(host.resolve("/nix/var/nix/profiles/system").as_deref(), Some(system.as_str()), "installed profile");
    assert_eq!(host.generations(), vec![1], "the disk's store starts with this one generation");
    assert_eq!(host.boot_default().as_deref(), Some(system.as_str()), "the boot loader boots it");
    assert!(host.disk().join(system.trim_start_matches('/')).join("bin/switch-to-configuration").exists());
    assert!(!host.disk().join("old-data").exists(), "disko formatted the disk");
    assert_ne!(host.boot_id(), first_boot);
    let os = host.exec("cat /etc/os-release").unwrap();
    assert!(!os.contains("installer"), "{os}");
    // A new host key, generated by the executor, written to the disk, presented now and reported to pin.
    let new_key = done.host_key.clone().expect("the installed key is reported");
    assert_ne!(new_key, old_key);
    assert_eq!(host.current_host_key(), new_key);
    // The secret went onto the disk before the first boot, with its mode, outside the store.
    let secret = host.path("/var/lib/nio/secrets/db/password");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "hunter2");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o440);

    // In order, by the commands the host received.
    let argv0: Vec<String> = host.commands().iter().filter_map(|c| c.first().cloned()).collect();
    let order = ["tar", "/root/kexec/kexec/run", "disko", "nix", "nixos-install", "reboot"];
    let mut at = 0;
    for want in order {
        at += argv0[at..].iter().position(|a| a == want).unwrap_or_else(|| panic!("no {want} after {at}: {argv0:?}"));
    }
    let steps: Vec<_> = rig.bus.seen.iter().filter_map(|e| e.step).collect();
    for s in [Step::Kexec, Step::Disko, Step::Install, Step::Reboot] {
        assert!(steps.contains(&s), "no {s:?} step reported: {steps:?}");
    }

    // The installed machine takes updates with the key NIO now pins.
    let next = rig.repo.bump().unwrap();
    let mut update = rig.job("web-01", &host, "web", &next, 2);
    update.endpoint.host_key = Some(new_key);
    let done = rig.run(&update).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    assert!(host.current_system().unwrap().ends_with("-nixos-system-web-3"));
    assert_eq!(host.generations(), vec![1, 2]);
    rig.stop().await;
}

/// Secret files belong to the activation that delivers them: they go live with it (a job whose build fails
/// changes none), the set is the configuration's whole set (a file dropped from it goes, as a revoked key must),
/// a rollback puts the set that was live back, and a directory left by an older NIO is replaced the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_go_live_with_their_activation_dropped_files_go_and_a_rollback_restores_the_set() {
    let (mut rig, seal) = Rig::sealing(|_, _| {}).await;
    let secret = |path: &str, content: &str| {
        let context = nio_shared::protocol::SecretFile::seal_context("test", "default", "m", path);
        nio_shared::protocol::SecretFile {
            path: path.into(),
            sealed: seal.seal(content.as_bytes(), &context).unwrap(),
            owner: None,
            group: None,
            mode: None,
        }
    };
    let host = rig.host(true);
    let live = |path: &str| std::fs::read_to_string(host.path(&format!("/var/lib/nio/secrets/{path}"))).ok();
    // what an older NIO left: a plain directory
    std::fs::create_dir_all(host.path("/var/lib/nio/secrets")).unwrap();
    std::fs::write(host.path("/var/lib/nio/secrets/old.key"), "old").unwrap();

    let commit = rig.repo.bump().unwrap();
    let mut j = rig.job("m", &host, "web", &commit, 1);
    j.secrets = vec![secret("db/password", "one"), secret("api.key", "k1")];
    j.secrets_hash = Some("sha256:1".into());
    assert_eq!(rig.run(&j).await.phase, Phase::Succeeded);
    assert_eq!((live("db/password"), live("api.key"), live("old.key")), (Some("one".into()), Some("k1".into()), None));

    // api.key dropped from the configuration, the password changed
    let mut j = rig.job("m", &host, "web", &commit, 2);
    j.secrets = vec![secret("db/password", "two")];
    j.secrets_hash = Some("sha256:2".into());
    assert_eq!(rig.run(&j).await.phase, Phase::Succeeded);
    assert_eq!((live("db/password"), live("api.key")), (Some("two".into()), None), "the dropped file is gone");

    // A build that fails changes nothing live.
    let good = std::fs::read_to_string(rig.repo.path.join("build.sh")).unwrap();
    let broken = rig.repo.write("build.sh", "echo 'error: attribute missing' >&2; exit 1\n").unwrap();
    let mut j = rig.job("m", &host, "web", &broken, 3);
    j.secrets = vec![secret("db/password", "three")];
    j.secrets_hash = Some("sha256:3".into());
    assert_eq!(rig.run(&j).await.category, Some(FailureCategory::BuildFailed));
    assert_eq!(live("db/password").as_deref(), Some("two"), "not live before its activation");

    // An activation that fails and rolls back takes its secrets back with it.
    rig.repo.write("build.sh", &good).unwrap();
    let commit = rig.repo.configure("exit4", "exit4").unwrap();
    let mut j = rig.job("m", &host, "exit4", &commit, 4);
    j.rollback = true;
    j.secrets = vec![secret("db/password", "four"), secret("new.key", "n")];
    j.secrets_hash = Some("sha256:4".into());
    assert_eq!(rig.run(&j).await.phase, Phase::RolledBack);
    assert_eq!((live("db/password"), live("new.key")), (Some("two".into()), None), "the set that was live is back");
    // Nothing of the jobs' sets lingers beyond what the kept jobs need.
    let sets = std::fs::read_dir(host.path("/var/lib/nio/secrets.d")).unwrap().count();
    assert!(sets <= 3, "{sets} sets kept");
    rig.stop().await;
}

/// A job its executor gave up on (its build outlived the job's timeout) must not change the machine after a later
/// job did: the later job's system is what runs and boots in the end (before: the abandoned build went on, set the
/// boot default after the later job had, and activated last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_its_executor_gave_up_on_never_overrides_a_later_job() {
    let mut rig = Rig::start().await;
    let host = rig.host(true);
    let slow = rig.repo.configure("slowb", "slow-build:7").unwrap();
    let mut a = rig.job("m", &host, "slowb", &slow, 1);
    a.timeout_seconds = 3;
    let done = rig.run(&a).await;
    assert_eq!((done.phase, done.category), (Phase::Failed, Some(FailureCategory::Timeout)), "{done:?}");
    let commit = rig.repo.configure("later", "ok").unwrap();
    let done = rig.run(&rig.job("m", &host, "later", &commit, 2)).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    let later = done.system.clone().unwrap();
    // past the moment the abandoned build would have ended (7 s after it began), and its activation after it
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while host.exec("pgrep -fx 'sleep 7'").is_ok() {
        assert!(std::time::Instant::now() < deadline, "the abandoned build never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(host.current_system().as_deref(), Some(later.as_str()), "the later job's system runs");
    assert_eq!(host.boot_default().as_deref(), Some(later.as_str()), "and boots next");
    assert!(host.activations().iter().all(|(_, s)| !s.contains("slowb")), "{:?}", host.activations());
    rig.stop().await;
}

/// A machine's next job starts on the connection its last job ended with (the confirmation's, proven after the
/// activation), with no new login, as long as the job pins the key that connection verified; the confirmation of
/// a new activation still logs in anew. A kept connection that died is noticed and replaced, and a changed pinned
/// key is checked by a new handshake, never waved through on the kept connection. By sshd's own log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machines_next_job_starts_on_the_kept_connection_and_only_when_it_verified_the_pinned_key() {
    let mut rig = Rig::start().await;
    let host = rig.host(true);
    let commit = rig.repo.bump().unwrap();
    let pinned = |mut j: Job| {
        j.endpoint.host_key = Some(host.current_host_key());
        j.rollback = true;
        j
    };
    let done = rig.run(&pinned(rig.job("web-01", &host, "web", &commit, 1))).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    assert_eq!(host.ssh_counts(), (2, 3), "the job's login and the confirmation's: {}", host.sshd_log());

    // The same target again: read on the kept connection, no login.
    let done = rig.run(&pinned(rig.job("web-01", &host, "web", &commit, 2))).await;
    assert_eq!(done.phase, Phase::Skipped, "{done:?}");
    assert_eq!(host.ssh_counts(), (2, 4), "no new login for the next job: {}", host.sshd_log());

    // A new commit: starts on the kept connection; its confirmation is a new login.
    let next = rig.repo.bump().unwrap();
    let done = rig.run(&pinned(rig.job("web-01", &host, "web", &next, 3))).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    assert_eq!(host.ssh_counts(), (3, 7), "one login, for the confirmation: {}", host.sshd_log());

    // The kept connection dies (its sshd session killed, as a reboot or a restarted network would): the next job
    // notices before using it and logs in anew.
    kill_ssh_sessions(&host);
    let done = rig.run(&pinned(rig.job("web-01", &host, "web", &next, 4))).await;
    assert_eq!(done.phase, Phase::Skipped, "{done:?}");
    assert_eq!(host.ssh_counts(), (4, 8), "a new login replaced the dead connection: {}", host.sshd_log());

    // Another pinned key (spec.hostKey changed): a new handshake checks it, and nothing runs.
    let mut other = pinned(rig.job("web-01", &host, "web", &next, 5));
    other.endpoint.host_key = Some(nio_loadtest::procs::keygen(&rig.dir.path().join("another-host-key")).unwrap());
    let done = rig.run(&other).await;
    assert_eq!((done.phase, done.category), (Phase::Failed, Some(FailureCategory::HostKeyMismatch)), "{done:?}");
    assert_eq!(host.ssh_counts().1, 8, "no command ran on the kept connection: {}", host.sshd_log());
    rig.stop().await;
}
