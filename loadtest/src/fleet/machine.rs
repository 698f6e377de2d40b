//! One simulated NixOS machine: its state and the remote command surface of docs/design.md §4, parsed the way the
//! real tools parse their arguments. Unknown commands exit 127, bad flags exit 2.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nio_shared::config::RemotePaths;
use russh::keys::PrivateKey;

use super::model::{Behaviour, chance};

/// A file in the simulated filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub data: Vec<u8>,
    pub mode: u32,
}

/// Mutable state of a machine.
#[derive(Debug)]
pub struct State {
    pub current_system: String,
    pub boot_system: String,
    pub generations: Vec<String>,
    /// Booted into the kexec installer.
    pub in_installer: bool,
    /// Installed by a full install.
    pub installed: bool,
    /// System written by nixos-install, booted at the next reboot.
    pub pending_install: Option<String>,
    /// Host key written for the installed system, used after the next reboot.
    pub pending_host_key: Option<PrivateKey>,
    pub host_key: PrivateKey,
    pub boot_id: u64,
    pub files: BTreeMap<String, File>,
    pub dirs: BTreeSet<String>,
    /// Until when the machine is rebooting (connections refused).
    pub down_until: Option<std::time::Instant>,
    pub rebuilds: u64,
    /// Commits whose build fails on this machine (a change that breaks some hardware).
    pub broken_commits: BTreeSet<String>,
}

/// What a command returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The machine reboots after answering (kexec, reboot).
    pub reboot: bool,
}

fn ok(stdout: impl Into<Vec<u8>>) -> Output {
    Output { status: 0, stdout: stdout.into(), ..Default::default() }
}

fn fail(status: u32, stderr: impl Into<String>) -> Output {
    Output { status, stderr: stderr.into().into_bytes(), ..Default::default() }
}

/// Commands that read their standard input (the server waits for EOF before running them).
pub fn reads_stdin(argv: &[String]) -> bool {
    match argv.first().map(String::as_str) {
        Some("tee") => true,
        Some("tar") => true,
        Some("install") => argv.iter().any(|a| a == "/dev/stdin"),
        _ => false,
    }
}

fn store_path(seed: &str, name: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(seed.as_bytes());
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    let hash: String = h.iter().take(32).map(|b| alphabet[(*b as usize) % 32] as char).collect();
    format!("/nix/store/{hash}-{name}")
}

impl State {
    pub fn new(name: &str, host_key: PrivateKey) -> Self {
        let sys = store_path(name, "nixos-system-initial");
        State {
            current_system: sys.clone(),
            boot_system: sys.clone(),
            generations: vec![sys],
            in_installer: false,
            installed: false,
            pending_install: None,
            pending_host_key: None,
            host_key,
            boot_id: 1,
            files: BTreeMap::new(),
            dirs: BTreeSet::new(),
            down_until: None,
            rebuilds: 0,
            broken_commits: BTreeSet::new(),
        }
    }

    fn exists(&self, path: &str) -> bool {
        self.files.contains_key(path) || self.dirs.contains(path)
    }

    /// Applies a reboot: installer → installed system, or a plain reboot into the boot default.
    pub fn reboot(&mut self, into_installer: bool) {
        self.boot_id += 1;
        if into_installer {
            self.in_installer = true;
            self.host_key = PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
                .unwrap_or_else(|_| self.host_key.clone());
            self.files.retain(|p, _| !p.starts_with("/root/kexec"));
            return;
        }
        if self.in_installer {
            if let Some(sys) = self.pending_install.take() {
                self.in_installer = false;
                self.installed = true;
                self.current_system = sys.clone();
                self.boot_system = sys.clone();
                self.generations = vec![sys];
                self.files.clear();
                self.dirs.clear();
                if let Some(k) = self.pending_host_key.take() {
                    self.host_key = k;
                }
            }
            return;
        }
        self.current_system = self.boot_system.clone();
    }
}

/// Runs one command against the machine. Returns the output and how long the command takes.
pub fn run(
    state: &mut State,
    paths: &RemotePaths,
    behaviour: &Behaviour,
    argv: &[String],
    stdin: &[u8],
) -> (Output, Duration) {
    let quick = behaviour.command_latency.sample();
    let Some(program) = argv.first() else { return (fail(127, "sh: empty command\n"), quick) };
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let out = match (program.as_str(), args.as_slice()) {
        ("nixos-version", ["--json"]) => ok(format!(
            "{{\"nixosVersion\":\"25.05.20261101.abcdef0\",\"nixpkgsRevision\":\"abcdef0\",\"configurationRevision\":null,\"installer\":{}}}\n",
            state.in_installer
        )),
        ("nixos-version", []) => ok("25.05.20261101.abcdef0 (Warbler)\n"),
        ("nixos-version", _) => fail(2, "nixos-version: unknown option\n"),
        ("readlink", ["-f", p]) if *p == paths.current_system => ok(format!("{}\n", state.current_system)),
        ("readlink", ["-f", p]) if *p == paths.system_profile => ok(format!("{}\n", state.boot_system)),
        ("readlink", ["-f", p]) => {
            if state.exists(p) {
                ok(format!("{p}\n"))
            } else {
                fail(1, "")
            }
        }
        ("readlink", _) => fail(1, "readlink: missing operand\n"),
        ("cat", ["/etc/os-release"]) => ok(format!(
            "NAME=NixOS\nID=nixos\nVERSION_ID=\"25.05\"\n{}",
            if state.in_installer { "VARIANT_ID=installer\n" } else { "" }
        )),
        ("cat", [p]) => match state.files.get(*p) {
            Some(f) => ok(f.data.clone()),
            None => fail(1, format!("cat: {p}: No such file or directory\n")),
        },
        ("tee", [p]) => {
            let parent = p.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            if !parent.is_empty()
                && !state.dirs.contains(parent)
                && !state.files.keys().any(|f| f.starts_with(&format!("{parent}/")))
            {
                fail(1, format!("tee: {p}: No such file or directory\n"))
            } else {
                state.files.insert(p.to_string(), File { data: stdin.to_vec(), mode: 0o644 });
                ok(stdin.to_vec())
            }
        }
        ("mkdir", ["-p", d]) => {
            let mut acc = String::new();
            for part in d.split('/').filter(|s| !s.is_empty()) {
                acc.push('/');
                acc.push_str(part);
                state.dirs.insert(acc.clone());
            }
            ok("")
        }
        ("mkdir", _) => fail(2, "mkdir: usage\n"),
        ("tar", ["-x", "--no-same-owner", "-f", "-", "-C", dir]) => {
            if !state.dirs.contains(*dir) {
                fail(2, format!("tar: {dir}: Cannot open: No such file or directory\n"))
            } else {
                let mut archive = tar::Archive::new(stdin);
                let mut added = Vec::new();
                let result = archive.entries().and_then(|entries| {
                    for e in entries {
                        let mut e = e?;
                        let path = e.path()?.to_string_lossy().into_owned();
                        let mode = e.header().mode().unwrap_or(0o644);
                        let mut data = Vec::new();
                        if e.header().entry_type().is_file() && e.size() <= 64 * 1024 {
                            std::io::Read::read_to_end(&mut e, &mut data)?;
                        }
                        added.push((format!("{dir}/{path}"), File { data, mode }));
                    }
                    Ok(())
                });
                match result {
                    Ok(()) if !added.is_empty() => {
                        for (p, f) in added {
                            if let Some((parent, _)) = p.rsplit_once('/') {
                                state.dirs.insert(parent.to_string());
                            }
                            state.files.insert(p, f);
                        }
                        ok("")
                    }
                    Ok(()) => fail(2, "tar: This does not look like a tar archive\n"),
                    Err(e) => fail(2, format!("tar: {e}\n")),
                }
            }
        }
        ("tar", _) => fail(2, "tar: unsupported options\n"),
        ("install", ["-d", "-m", mode, d]) => {
            let Ok(m) = u32::from_str_radix(mode, 8) else { return (fail(2, "install: invalid mode\n"), quick) };
            state.dirs.insert(d.to_string());
            state.files.insert(format!("{d}/"), File { data: vec![], mode: m });
            ok("")
        }
        ("install", ["-D", "-m", mode, "/dev/stdin", p]) => {
            let Ok(m) = u32::from_str_radix(mode, 8) else { return (fail(2, "install: invalid mode\n"), quick) };
            if *p == "/mnt/etc/ssh/ssh_host_ed25519_key" {
                match PrivateKey::from_openssh(stdin) {
                    Ok(k) => state.pending_host_key = Some(k),
                    Err(e) => return (fail(1, format!("install: not a host key: {e}\n")), quick),
                }
            }
            state.files.insert(p.to_string(), File { data: stdin.to_vec(), mode: m });
            ok("")
        }
        ("install", _) => fail(2, "install: unsupported options\n"),
        ("nixos-facter", []) => ok(
            "{\"version\":1,\"system\":\"x86_64-linux\",\"virtualisation\":\"kvm\",\"hardware\":{\"cpu\":[{\"model_name\":\"Simulated CPU\",\"units\":8}],\"memory\":[{\"resources\":[{\"type\":\"phys_mem\",\"range\":17179869184}]}],\"disk\":[{\"unix_device_name\":\"/dev/vda\"}],\"network_interface\":[{\"unix_device_name\":\"eth0\"}]}}\n",
        ),
        ("sh", ["-c", script, "nio-state", current, marker]) if *script == nio_shared::remote::STATE_SCRIPT => {
            // What `sh` does with the script: each command, then its exit status on a line of its own.
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            for cmd in [vec!["nixos-version", "--json"], vec!["readlink", "-f", current], vec!["cat", marker]] {
                let argv: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
                let (o, _) = run(state, paths, behaviour, &argv, b"");
                stdout.extend_from_slice(&o.stdout);
                stdout.extend_from_slice(format!("\n@@nio-status {}\n", o.status).as_bytes());
                if cmd[0] != "cat" {
                    stderr.extend_from_slice(&o.stderr);
                }
            }
            Output { status: 0, stdout, stderr, reboot: false }
        }
        ("sh", ["-c", script]) if *script == crate::fleet::FACT_SCRIPT => ok(
            "system=x86_64-linux\ncpus=8\ncpu=Simulated CPU\nmemory=17179869184\ndisk=vda 53687091200\nnic=eth0 52:54:00:00:00:01\nvirt=kvm\n",
        ),
        ("nixos-rebuild", ["switch", "--rollback"]) => {
            if state.generations.len() < 2 {
                fail(1, "error: no previous generation to roll back to\n")
            } else {
                state.generations.pop();
                let prev = state.generations.last().cloned().unwrap_or_default();
                state.current_system = prev.clone();
                state.boot_system = prev;
                ok("switching to the previous generation...\n")
            }
        }
        ("nixos-rebuild", [action @ ("switch" | "boot" | "test" | "dry-activate"), "--flake", flake]) => {
            let took = behaviour.switch_latency.sample();
            let Some((dir, attr)) = flake.strip_prefix("path:").and_then(|f| f.split_once('#')) else {
                return (fail(1, format!("error: invalid flake reference '{flake}'\n")), took);
            };
            if !state.files.contains_key(&format!("{dir}/flake.nix")) {
                return (fail(1, format!("error: path '{dir}' does not contain a 'flake.nix'\n")), took);
            }
            state.rebuilds += 1;
            let broken = state.broken_commits.iter().any(|c| dir.contains(c.as_str()));
            if broken || chance(behaviour.failure_rate) {
                return (
                    Output {
                        status: 1,
                        stdout: b"building the system configuration...\n".to_vec(),
                        stderr: format!(
                            "error: builder for '/nix/store/x-nixos-system-{attr}.drv' failed with exit code 1\n"
                        )
                        .into_bytes(),
                        reboot: false,
                    },
                    took,
                );
            }
            let sys = store_path(flake, &format!("nixos-system-{attr}"));
            match *action {
                "switch" => {
                    state.current_system = sys.clone();
                    state.boot_system = sys.clone();
                    state.generations.push(sys);
                }
                "boot" => {
                    state.boot_system = sys.clone();
                    state.generations.push(sys);
                }
                "test" => state.current_system = sys,
                _ => {}
            }
            return (ok("building the system configuration...\nactivating the configuration...\n"), took);
        }
        ("nixos-rebuild", _) => fail(2, "nixos-rebuild: unknown action or flags\n"),
        ("systemctl", ["is-system-running", "--wait"]) => {
            if chance(behaviour.unhealthy_rate) {
                Output { status: 1, stdout: b"degraded\n".to_vec(), ..Default::default() }
            } else {
                ok("running\n")
            }
        }
        ("systemctl", _) => fail(1, "systemctl: unsupported in the simulator\n"),
        ("/root/kexec/run", []) => {
            if !state.files.keys().any(|f| f.starts_with("/root/kexec/")) {
                fail(127, "sh: /root/kexec/run: not found\n")
            } else {
                Output { status: 0, stdout: b"kexec into the installer\n".to_vec(), reboot: true, ..Default::default() }
            }
        }
        ("disko", ["--mode", "disko", "--flake", _]) => {
            if state.in_installer {
                ok("disko: partitioned /dev/vda\n")
            } else {
                fail(1, "disko: refusing to format a running system\n")
            }
        }
        ("nix", ["build", "--no-link", "--print-out-paths", "--store", "/mnt", installable]) => {
            if !state.in_installer {
                fail(1, "error: /mnt is not mounted\n")
            } else {
                let attr =
                    installable.rsplit("nixosConfigurations.").next().unwrap_or("x").split('.').next().unwrap_or("x");
                let took = behaviour.switch_latency.sample();
                return (ok(format!("{}\n", store_path(installable, &format!("nixos-system-{attr}")))), took);
            }
        }
        ("nixos-install", ["--no-root-passwd", "--no-channel-copy", "--system", sys]) => {
            if !state.in_installer {
                fail(1, "nixos-install: not running in the installer\n")
            } else {
                state.pending_install = Some(sys.to_string());
                ok("installation finished!\n")
            }
        }
        ("reboot", []) => Output { status: 0, reboot: true, ..Default::default() },
        (p, _) if p.starts_with('-') => fail(2, format!("sh: {p}: invalid option\n")),
        (p, _) => fail(127, format!("sh: 1: {p}: not found\n")),
    };
    (out, quick)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::new("t", PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap())
    }

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn unknown_commands_and_flags_are_rejected_like_the_real_tools() {
        let (p, b) = (RemotePaths::default(), Behaviour::default());
        let mut s = state();
        let (out, _) = run(&mut s, &p, &b, &argv(&["rm", "-rf", "/"]), b"");
        assert_eq!(out.status, 127);
        assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
        let (out, _) =
            run(&mut s, &p, &b, &argv(&["nixos-rebuild", "switch", "--fast", "--flake", "path:/x#web"]), b"");
        assert_eq!(out.status, 2, "unknown nixos-rebuild flag");
        let (out, _) = run(&mut s, &p, &b, &argv(&["nixos-rebuild", "switch", "--flake", "path:/nowhere#web"]), b"");
        assert_eq!(out.status, 1, "no flake.nix at the path");
        let (out, _) =
            run(&mut s, &p, &b, &argv(&["tar", "-x", "--no-same-owner", "-f", "-", "-C", "/nowhere"]), b"junk");
        assert_eq!(out.status, 2);
    }

    #[test]
    fn an_uploaded_tree_can_be_switched_to_and_rolled_back() {
        let (p, b) =
            (RemotePaths::default(), Behaviour { switch_latency: "0ms".parse().unwrap(), ..Default::default() });
        let mut s = state();
        let before = s.current_system.clone();
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        tar.append_data(&mut h, "flake.nix", &b"{ }"[..]).unwrap();
        let tar = tar.into_inner().unwrap();
        run(&mut s, &p, &b, &argv(&["mkdir", "-p", "/var/lib/nio/src/abc"]), b"");
        let (out, _) = run(
            &mut s,
            &p,
            &b,
            &argv(&["tar", "-x", "--no-same-owner", "-f", "-", "-C", "/var/lib/nio/src/abc"]),
            &tar,
        );
        assert_eq!(out.status, 0, "{}", String::from_utf8_lossy(&out.stderr));
        let (out, _) =
            run(&mut s, &p, &b, &argv(&["nixos-rebuild", "switch", "--flake", "path:/var/lib/nio/src/abc#web"]), b"");
        assert_eq!(out.status, 0);
        assert!(s.current_system.ends_with("nixos-system-web") && s.current_system != before);
        let (out, _) = run(&mut s, &p, &b, &argv(&["readlink", "-f", "/run/current-system"]), b"");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), s.current_system);
        run(&mut s, &p, &b, &argv(&["nixos-rebuild", "switch", "--rollback"]), b"");
        assert_eq!(s.current_system, before);
        let (out, _) =
            run(&mut s, &p, &b, &argv(&["install", "-D", "-m", "0400", "/dev/stdin", "/run/nio/secrets/k"]), b"secret");
        assert_eq!((out.status, s.files["/run/nio/secrets/k"].mode), (0, 0o400));
    }
}
