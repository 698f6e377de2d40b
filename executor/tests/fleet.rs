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
    let key = russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap();
    std::fs::create_dir_all(dir.path().join("identities")).unwrap();
    std::fs::write(
        dir.path().join("identities/default"),
        key.to_openssh(russh::keys::ssh_key::LineEnding::LF).unwrap().as_bytes(),
    )
    .unwrap();
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
    let tarball = kexec_tarball(dir.path());

    let mut bus = Bus::connect(&nats).await;
    let cfg = nio_shared::config::ExecutorConfig {
        sites: vec![nio_shared::config::SiteLimits {
            name: "site-0".into(),
            max_in_flight: 2,
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
        nats_url: nats.url(),
        nats_creds: None,
        config: cfg,
        identities_dir: dir.path().join("identities"),
        git_credentials_dir: None,
        cache_dir: dir.path().join("cache"),
        executor_id: "e1".into(),
        seal_key_file: None,
        metrics_addr: None,
        health_addr: None,
        host_key_policy: nio_executor::ssh::HostKeyPolicy::Pinned,
        kexec_tarball: Some(tarball),
        connect_timeout: Duration::from_secs(3),
        ssh_keepalive: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(5),
    };
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
