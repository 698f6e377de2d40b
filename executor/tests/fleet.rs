#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! The fleet simulator: full installs and removals (kexec → disko → nix build → nixos-install → host key →
//! reboot), and the command contract it shares with real hosts.

mod common;

use std::time::Duration;

use common::*;
use nio_loadtest::fleet::{Fleet, FleetOptions};
use nio_shared::protocol::{Action, JobId, Phase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_install_boots_the_installed_system_with_a_new_pinned_key_and_remove_switches_away() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repo, commit) = git_repo(dir.path());
    let (key, mut settings) = sim_settings(dir.path(), 2, Some(kexec_tarball(dir.path())));
    settings.nats_url = nats.url();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let fleet = Fleet::start(FleetOptions {
        machines: 1,
        port,
        first_address: std::net::Ipv4Addr::new(127, 3, 0, 1),
        authorized: vec![key.public_key().clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let m = fleet.machines[0].clone();
    let original_key = m.host_key();
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings);

    let mut install = job("sim-0", &m.addr.ip().to_string(), m.addr.port(), "site-0", &repo, &commit);
    install.action = Action::Install;
    install.endpoint.host_key = Some(original_key.clone());
    install.id = JobId::new("test", "default", "sim-0", &format!("{commit}/1"), Action::Install);
    bus.publish(&install).await;
    let done = bus.final_of("sim-0", Duration::from_secs(60)).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    let new_key = done.host_key.clone().unwrap();
    assert_ne!(new_key, original_key.trim(), "a fresh host key was installed and reported");
    assert!(done.boot_id.is_some(), "the installed system's boot id is reported");
    assert_eq!(m.host_key().trim(), new_key, "the installed system presents the reported key");
    {
        let s = m.state.lock().unwrap();
        assert!(s.installed && !s.in_installer, "booted into the installed system");
        assert_eq!(Some(s.current_system.clone()), done.system, "the verified system is the one installed");
        assert!(s.boot_id >= 3, "kexec and reboot happened");
    }
    let steps: Vec<_> = bus.seen.iter().filter_map(|e| e.step).collect();
    for s in [
        nio_shared::protocol::Step::Kexec,
        nio_shared::protocol::Step::Disko,
        nio_shared::protocol::Step::Install,
        nio_shared::protocol::Step::Reboot,
    ] {
        assert!(steps.contains(&s), "no {s:?} step reported: {steps:?}");
    }

    // Removal applies onRemoveFlake (here `decommissioned`) with the now-pinned key.
    bus.seen.clear();
    let mut remove = job("sim-0", &m.addr.ip().to_string(), m.addr.port(), "site-0", &repo, &commit);
    remove.action = Action::Remove;
    remove.endpoint.host_key = Some(new_key);
    remove.source.as_mut().unwrap().flake_attr = "decommissioned".into();
    remove.id = JobId::new("test", "default", "sim-0", &format!("{commit}/1"), Action::Remove);
    bus.publish(&remove).await;
    let done = bus.final_of("sim-0", Duration::from_secs(60)).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    assert!(m.current_system().ends_with("nixos-system-decommissioned"), "{}", m.current_system());
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// The command contract between the fleet simulator and real hosts: the same jobs (switch, the same target
/// again, an unhealthy switch, boot) send the same sequence of commands to a namespaced real-Nix host and to a
/// simulated machine, and end the same way on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_and_a_real_host_get_the_same_commands_and_end_the_same_way() {
    use nio_loadtest::fleet::{Behaviour, op_name};
    let nats = NatsServer::start().await.unwrap();
    let h = Hosts::start(2);
    let key = std::fs::read_to_string(h.identities().join("default.pub")).unwrap();
    let key = russh::keys::PublicKey::from_openssh(key.trim()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let fleet = |first: [u8; 4], unhealthy_rate: f64| {
        Fleet::start(FleetOptions {
            machines: 1,
            port,
            first_address: std::net::Ipv4Addr::from(first),
            authorized: vec![key.clone()],
            behaviour: Behaviour { switch_latency: "50ms".parse().unwrap(), unhealthy_rate, ..Default::default() },
            ..Default::default()
        })
    };
    let (healthy, sick) = (fleet([127, 4, 0, 1], 0.0).await.unwrap(), fleet([127, 4, 1, 1], 1.0).await.unwrap());
    h.repo.configure("unhealthy", "unhealthy").unwrap();
    let commit = h.commit();
    let mut bus = Bus::connect(&nats).await;
    let mut s = settings(&h, &nats, config(&[("site-0", 4)]), "e1");
    s.kexec_tarball = Some(kexec_tarball(&h.path(".")));
    let (stop, task) = spawn_executor(s);

    let cases = [
        ("switch", "web", Action::Switch, 0, &healthy),
        ("again", "web", Action::Switch, 0, &healthy),
        ("unhealthy", "unhealthy", Action::Switch, 1, &sick),
        ("boot", "web", Action::Boot, 1, &sick),
        ("install", "web", Action::Install, 0, &healthy),
    ];
    for (n, (case, attr, action, host, sim)) in cases.into_iter().enumerate() {
        let real = &h.hosts[host];
        let m = &sim.machines[0];
        let mut outcomes = Vec::new();
        let mut sequences = Vec::new();
        for (machine, addr, port) in [
            (format!("real-{host}"), real.addr.clone(), 22),
            (format!("sim-{host}"), m.addr.ip().to_string(), m.addr.port()),
        ] {
            let before_real = real.commands().len();
            let before_sim = sim.recorder.ops.lock().unwrap().len();
            let mut j = job(&machine, &addr, port, "site-0", &h.repo.url(), &commit);
            j.source.as_mut().unwrap().flake_attr = attr.into();
            j.action = action;
            j.rollback = true;
            j.confirm_timeout_seconds = 10;
            j.id = JobId::new("test", "default", &machine, &format!("{commit}/{n}"), action);
            bus.seen.clear();
            bus.publish(&j).await;
            let done = bus.final_of(&machine, Duration::from_secs(60)).await;
            outcomes.push((done.phase, done.category));
            sequences.push(if machine.starts_with("real") {
                real.commands()[before_real..].iter().map(|c| op_name(c)).collect::<Vec<_>>()
            } else {
                sim.recorder.ops.lock().unwrap()[before_sim..].iter().map(|o| o.program.clone()).collect()
            });
        }
        // Waiting for a kexec or reboot polls the state until the boot id changes; how many polls that takes
        // depends on timing, not on the protocol.
        for seq in &mut sequences {
            seq.dedup_by(|a, b| a == "nio-state" && b == "nio-state");
        }
        assert_eq!(outcomes[0], outcomes[1], "{case}: real host vs simulator outcome");
        assert_eq!(sequences[0], sequences[1], "{case}: real host vs simulator commands");
        let expected: &[&str] = match case {
            "again" => &["nio-state"],
            "boot" => &["nio-state", "nio-activate"],
            // os-release; state; the kexec tarball, its entry point; a state poll until the installer answers;
            // os-release; the source; disko, the build, nixos-install, the host key (private and public
            // half); the boot id; reboot; a state poll until the installed system answers; the applied marker
            "install" => &[
                "cat",
                "nio-state",
                "mkdir",
                "tar",
                "/root/kexec/kexec/run",
                "nio-state",
                "cat",
                "mkdir",
                "tar",
                "disko",
                "nix",
                "nixos-install",
                "install",
                "install",
                "nio-state",
                "reboot",
                "nio-state",
                "mkdir",
                "tee",
            ],
            _ => &["nio-state", "nio-activate", "nio-confirm"],
        };
        assert_eq!(sequences[0], expected, "{case}");
        let phase = match case {
            "again" => Phase::Skipped,
            "unhealthy" => Phase::RolledBack,
            _ => Phase::Succeeded,
        };
        assert_eq!(outcomes[0].0, phase, "{case}: {outcomes:?}");
    }
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// An identity the simulated machines accept, and an executor for one site (`site-0`, `limit` jobs at once)
/// with it.
fn sim_settings(
    dir: &std::path::Path,
    limit: u32,
    kexec_tarball: Option<std::path::PathBuf>,
) -> (russh::keys::PrivateKey, nio_executor::Settings) {
    let key = russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap();
    std::fs::create_dir_all(dir.join("identities")).unwrap();
    std::fs::write(
        dir.join("identities/default"),
        key.to_openssh(russh::keys::ssh_key::LineEnding::LF).unwrap().as_bytes(),
    )
    .unwrap();
    let cfg = nio_shared::config::ExecutorConfig {
        sites: vec![nio_shared::config::SiteLimits {
            name: "site-0".into(),
            max_in_flight: limit,
            connect_rate: 100.0,
            burst: 10,
        }],
        ack_wait_seconds: 30,
        max_deliver: 3,
        backoff_seconds: vec![1],
        job_timeout_seconds: 120,
        lock_ttl_seconds: 6,
        stream_replicas: 1,
        remote: Default::default(),
    };
    let settings = nio_executor::Settings {
        nats_url: String::new(),
        nats_creds: None,
        config: cfg,
        identities_dir: dir.join("identities"),
        git_credentials_dir: None,
        cache_dir: dir.join("cache"),
        executor_id: "e1".into(),
        seal_key_file: None,
        metrics_addr: None,
        health_addr: None,
        host_key_policy: nio_executor::ssh::HostKeyPolicy::Pinned,
        kexec_tarball,
        connect_timeout: Duration::from_secs(3),
        ssh_keepalive: Duration::from_secs(1),
        ssh_persist: nio_executor::pool::PoolLimits { persist: Duration::from_secs(60), max_idle: 100 },
        shutdown_grace: Duration::from_secs(5),
    };
    (key, settings)
}

/// One site (`site-0`, one job at a time) of simulated machines, an executor's settings for it, and a NATS server.
struct SimSite {
    nats: NatsServer,
    dir: tempfile::TempDir,
    repo: String,
    commit: String,
    settings: nio_executor::Settings,
    fleet: Fleet,
}

impl SimSite {
    async fn start(
        machines: usize,
        first_address: std::net::Ipv4Addr,
        behaviour: nio_loadtest::fleet::Behaviour,
    ) -> Self {
        let nats = NatsServer::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (repo, commit) = git_repo(dir.path());
        let (key, mut settings) = sim_settings(dir.path(), 1, None);
        settings.nats_url = nats.url();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let authorized = vec![key.public_key().clone()];
        let options = FleetOptions { machines, port, first_address, authorized, behaviour, ..Default::default() };
        let fleet = Fleet::start(options).await.unwrap();
        SimSite { nats, dir, repo, commit, settings, fleet }
    }
}

/// A new job for a machine whose job is running (here the same commit under a new target, as a changed spec
/// would make it) must not let the site run more than its limit: a running job's message that the queue dropped
/// for the newer one was forgotten by the broker, which gave its slot to a third machine. And a queued job that
/// a newer one for its machine supersedes runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queued_behind_a_running_one_for_its_machine_keeps_the_site_limit() {
    let behaviour = nio_loadtest::fleet::Behaviour {
        switch_latency: nio_loadtest::fleet::Latency::Fixed(Duration::from_secs(3)),
        ..Default::default()
    };
    let SimSite { nats, dir, repo, commit, settings, fleet } =
        SimSite::start(3, std::net::Ipv4Addr::new(127, 3, 1, 1), behaviour).await;
    let mut bus = Bus::connect(&nats).await;
    // Two executors: each alone keeps to the limit; together only the broker's count of jobs in flight does.
    let mut second = settings.clone();
    (second.executor_id, second.cache_dir) = ("e2".into(), dir.path().join("cache-e2"));
    let (stop, task) = spawn_executor(settings);
    let (stop2, task2) = spawn_executor(second);
    let switch = |i: usize, target: &str| {
        let m = &fleet.machines[i];
        let mut j = job(&m.name, &m.addr.ip().to_string(), m.addr.port(), "site-0", &repo, &commit);
        j.endpoint.host_key = Some(m.host_key());
        j.id = JobId::new("test", "default", &m.name, target, Action::Switch);
        j
    };
    bus.publish(&switch(0, &format!("{commit}/1"))).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while *fleet.machines[0].running.lock().unwrap() == 0 {
        assert!(std::time::Instant::now() < deadline, "sim-0's job never ran a command");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Two more machines wait behind the limit; then sim-0 gets a newer job while its first one runs.
    bus.publish(&switch(1, &format!("{commit}/1"))).await;
    bus.publish(&switch(2, &format!("{commit}/1"))).await;
    bus.publish(&switch(0, &format!("{commit}/2"))).await;
    // sim-2's job, still queued, is superseded by a newer one: only the newer runs.
    bus.publish(&switch(2, &format!("{commit}/2"))).await;
    for name in ["sim-1", "sim-2"] {
        let done = bus.final_of(name, Duration::from_secs(90)).await;
        assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    }
    let last = bus.final_of("sim-2", Duration::from_secs(1)).await;
    assert_eq!(last.job_id.target(), Some(format!("{commit}/2").as_str()), "the newer job ran: {last:?}");
    let ops = fleet.recorder.ops.lock().unwrap().clone();
    let activations = ops.iter().filter(|o| o.machine == 2 && o.program == "nio-activate").count();
    assert_eq!(activations, 1, "the superseded job ran nothing");
    let peak = nio_loadtest::scenario::invariants::busy_at_peak(&ops, |_| true);
    let busy: Vec<(usize, &str)> = peak.iter().map(|o| (o.machine, o.program.as_str())).collect();
    assert_eq!(nio_loadtest::scenario::invariants::max_concurrent(&ops, 0), 1, "busy at once: {busy:?}");
    for (stop, task) in [(stop, task), (stop2, task2)] {
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}

/// A NATS cluster changing leaders can hand one job out twice. When the delivery waiting for the machine gets it
/// after the other delivery finished the job (the broker removed its message), it runs nothing and reports
/// nothing: running again, it would work on the machine outside the broker's count of the site's jobs (a
/// site over its limit), and its late reports would reopen a finished machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_delivery_of_a_job_finished_elsewhere_runs_nothing() {
    // The directory holds the executor's identity: kept until the end.
    let SimSite { nats, dir: _dir, repo, commit, settings, fleet } =
        SimSite::start(2, std::net::Ipv4Addr::new(127, 3, 2, 1), Default::default()).await;
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings);
    let switch = |i: usize| {
        let m = &fleet.machines[i];
        let mut j = job(&m.name, &m.addr.ip().to_string(), m.addr.port(), "site-0", &repo, &commit);
        j.endpoint.host_key = Some(m.host_key());
        j
    };
    // The other delivery holds sim-0 (a holder that is no executor's: never taken over).
    let locks = loop {
        if let Ok(kv) = bus.js.get_key_value(nio_shared::subjects::LOCKS_BUCKET).await {
            break kv;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let first = switch(0);
    let lock = nio_shared::subjects::lock_key(&first.endpoint.host, first.endpoint.port);
    locks.create(&lock, "the-other-delivery".into()).await.unwrap();
    bus.publish(&first).await;
    bus.until(Duration::from_secs(30), |evs| {
        evs.iter().any(|e| e.machine == "sim-0" && e.message.as_deref().is_some_and(|m| m.contains("machine busy")))
    })
    .await;
    // The other delivery finishes: the broker removes the job's message, and the machine is free.
    let stream = bus.js.get_stream(nio_shared::subjects::JOBS_STREAM).await.unwrap();
    let seq = stream.get_last_raw_message_by_subject(&first.subject()).await.unwrap().sequence;
    stream.delete_message(seq).await.unwrap();
    locks.delete(&lock).await.unwrap();
    // The executor goes on to the next job; sim-0 got no command and no outcome from the waiting delivery.
    bus.publish(&switch(1)).await;
    assert_eq!(bus.final_of("sim-1", Duration::from_secs(60)).await.phase, Phase::Succeeded);
    let ops = fleet.recorder.ops.lock().unwrap().clone();
    let on_sim0: Vec<&str> = ops.iter().filter(|o| o.machine == 0).map(|o| o.program.as_str()).collect();
    assert!(on_sim0.is_empty(), "the second delivery ran {on_sim0:?} on sim-0");
    let outcomes: Vec<_> = bus.seen.iter().filter(|e| e.machine == "sim-0" && e.phase.is_terminal()).collect();
    assert!(outcomes.is_empty(), "the second delivery reported {outcomes:?}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A job redelivered after an earlier delivery activated (here: that delivery's record left on the machine,
/// awaiting its confirmation) takes over its result; its confirmation proves that logins work after that
/// activation, so it runs over a new login even though the executor holds a connection kept from the machine's
/// previous job (logged in before that activation). The state read may use the kept connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_confirms_over_a_new_login_not_a_connection_kept_from_before_the_activation() {
    let SimSite { nats, dir: _dir, repo, commit, settings, fleet } =
        SimSite::start(1, std::net::Ipv4Addr::new(127, 3, 3, 1), Default::default()).await;
    let mut bus = Bus::connect(&nats).await;
    let (stop, task) = spawn_executor(settings);
    let m = &fleet.machines[0];
    let switch = |n: u32| {
        let mut j = job(&m.name, &m.addr.ip().to_string(), m.addr.port(), "site-0", &repo, &commit);
        j.id = JobId::new("test", "default", &m.name, &format!("{commit}/{n}"), Action::Switch);
        j.endpoint.host_key = Some(m.host_key());
        j.rollback = true;
        j
    };
    bus.publish(&switch(1)).await;
    assert_eq!(bus.final_of(&m.name, Duration::from_secs(60)).await.phase, Phase::Succeeded);
    // An earlier delivery of job 2 activated and awaits its confirmation (its executor died).
    let again = switch(2);
    {
        let mut st = m.state.lock().unwrap();
        let running = st.current_system.clone();
        let attempt = nio_loadtest::fleet::SimJob {
            toplevel: running.clone(),
            boot_id: st.boot_id,
            previous: (running.clone(), st.boot_system.clone(), st.generations.clone()),
            awaiting: true,
            result: None,
            unhealthy: false,
        };
        let cmds = nio_shared::remote::Commands { paths: Default::default() };
        st.jobs.insert(cmds.job_dir(&nio_shared::remote::Commands::unit(again.id.as_str())), attempt);
    }
    fleet.recorder.ops.lock().unwrap().clear();
    fleet.recorder.logins.lock().unwrap().clear();
    bus.seen.clear();
    bus.publish(&again).await;
    let done = bus.final_of(&m.name, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Phase::Succeeded, "{done:?}");
    let logins: Vec<_> = fleet.recorder.logins.lock().unwrap().iter().map(|(_, t)| *t).collect();
    let ops = fleet.recorder.ops.lock().unwrap().clone();
    let names: Vec<&str> = ops.iter().map(|o| o.program.as_str()).collect();
    assert_eq!(names, ["nio-state", "nio-confirm"], "read the state, took the activation over, confirmed it");
    assert!(logins.iter().all(|l| *l > ops[0].start), "the state read ran on the kept connection: {logins:?}");
    assert_eq!(logins.len(), 1, "one new login");
    assert!(logins[0] < ops[1].start, "the confirmation ran after the new login");
    assert_ne!(ops[0].connection, ops[1].connection, "the confirmation ran on a connection of its own");
    stop.cancel();
    task.await.unwrap().unwrap();
}
