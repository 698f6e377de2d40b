//! The namespaced test hosts themselves: what the executor tests rely on holds (real sshd per host, real sudo
//! for `deploy` only where granted, real Nix generations, reboot = new boot_id and the boot default running).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use nio_loadtest::testhost::{HostOptions, TestHost};

fn ssh(host: &TestHost, user: &str, cmd: &str) -> (bool, String) {
    let known = host.dir.path().join("known_hosts");
    std::fs::write(&known, format!("{} {}\n", host.addr, host.host_key)).unwrap();
    let out = Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o"])
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .arg("-i")
        .arg(host.identities().join("default"))
        .arg(format!("{user}@{}", host.addr))
        .arg(cmd)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn a_test_host_has_its_own_nix_sshd_sudo_and_boot() {
    let host = TestHost::start(&HostOptions::default()).expect("test host (needs root)");
    let plain = TestHost::start(&HostOptions { sudo: false, ..Default::default() }).unwrap();
    assert_ne!(host.addr, plain.addr);

    // Generation 1 of the profile runs, and is what the boot loader boots.
    let current = host.current_system().unwrap();
    assert!(current.starts_with("/nix/store/") && current.ends_with("nixos-system-initial-1"), "{current}");
    assert_eq!(host.boot_default().as_deref(), Some(current.as_str()));
    assert_eq!(host.generations(), vec![1]);
    let (ok, out) = ssh(&host, "root", "nixos-version --json; readlink -e /run/booted-system; ls /nix/store | wc -l");
    assert!(ok, "{out}\n{}", host.sshd_log());
    assert!(out.contains("\"nixosVersion\":\"25.05.1\"") && out.contains(&current), "{out}");

    // sudo: granted on one host, not on the other; the store is the host's own.
    let (ok, out) = ssh(&host, "deploy", "id -un; sudo -n id -un");
    assert!(ok && out.contains("deploy\nroot"), "{out}");
    let (ok, out) = ssh(&plain, "deploy", "sudo -n id -un");
    assert!(!ok && out.contains("password is required"), "{out}");
    host.exec("mkdir /nix/store/nio-only-on-this-host").unwrap();
    assert!(host.exec("test -d /nix/store/nio-only-on-this-host").is_ok());
    assert!(plain.exec("test -d /nix/store/nio-only-on-this-host").is_err(), "each host has its own store");

    // A reboot: new boot_id, /run emptied, the boot default running again, sshd back.
    let before = host.boot_id();
    host.exec("touch /run/ephemeral; ln -sfn /nix/store/elsewhere /run/current-system").unwrap();
    host.reboot().unwrap();
    assert_ne!(host.boot_id(), before);
    assert!(!host.path("/run/ephemeral").exists());
    assert_eq!(host.current_system().as_deref(), Some(current.as_str()));
    let (ok, out) = ssh(&host, "root", "cat /proc/sys/kernel/random/boot_id");
    assert!(ok && out.trim() == host.boot_id(), "{out}");
}
