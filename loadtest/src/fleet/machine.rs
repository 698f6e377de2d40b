//! One simulated NixOS machine: its state and the remote command surface of docs/remote-protocol.md (NIO's state,
//! activation and confirmation scripts, installs, probes), parsed the way the real tools parse their arguments,
//! plus `nixos-rebuild` for the peers `compare` measures. Unknown commands exit 127, bad flags exit 2.

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
    /// What the machine booted (`/run/booted-system`).
    pub booted_system: String,
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
    /// Commits that activate but leave this machine unhealthy (a change that breaks some hardware): the health
    /// check fails.
    pub broken_commits: BTreeSet<String>,
    /// Activation state per job directory (what the activation unit leaves in `{stateDir}/jobs/{unit}`).
    pub jobs: BTreeMap<String, SimJob>,
}

/// One job's activation on a simulated machine.
#[derive(Debug, Clone)]
pub struct SimJob {
    pub toplevel: String,
    pub boot_id: u64,
    /// Before the activation: running, boot default, generations.
    pub previous: (String, String, Vec<String>),
    /// Waiting for the confirmation.
    pub awaiting: bool,
    pub result: Option<String>,
    /// The system is one of the machine's broken commits: it activates, then fails its health check.
    pub unhealthy: bool,
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
    let argv = unprivileged(argv);
    match argv.first().map(String::as_str) {
        Some("tee") => true,
        Some("tar") => true,
        Some("install") => argv.iter().any(|a| a == "/dev/stdin"),
        Some("sh") => {
            argv.get(3).map(String::as_str) == Some("nio-activate") && argv.get(6).map(String::as_str) == Some("tar")
        }
        _ => false,
    }
}

/// What a recorded operation is called: the script's name for NIO's scripts (`nio-activate`, `nio-confirm`,
/// `nio-state`), else the program.
pub fn op_name(argv: &[String]) -> String {
    let argv = unprivileged(argv);
    match argv {
        [sh, c, _, name, ..] if sh == "sh" && c == "-c" && name.starts_with("nio-") => name.clone(),
        _ => argv.first().cloned().unwrap_or_default(),
    }
}

/// The command under `sudo -n --` (simulated machines grant the SSH user sudo).
fn unprivileged(argv: &[String]) -> &[String] {
    match argv {
        [sudo, n, dashes, rest @ ..] if sudo == "sudo" && n == "-n" && dashes == "--" => rest,
        _ => argv,
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
            booted_system: sys.clone(),
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
            jobs: BTreeMap::new(),
        }
    }

    fn exists(&self, path: &str) -> bool {
        self.files.contains_key(path) || self.dirs.contains(path)
    }

    /// Adds unpacked files (and their parent directories).
    fn add(&mut self, added: Vec<(String, File)>) {
        for (p, f) in added {
            if let Some((parent, _)) = p.rsplit_once('/') {
                self.dirs.insert(parent.to_string());
            }
            self.files.insert(p, f);
        }
    }

    /// Applies a reboot: installer → installed system, or a plain reboot into the boot default.
    pub fn reboot(&mut self, into_installer: bool) {
        self.boot_id += 1;
        if into_installer {
            // nixos-images' installer keeps the machine's host keys; everything else is gone.
            self.in_installer = true;
            self.files.clear();
            self.dirs.clear();
            self.jobs.clear();
            return;
        }
        if self.in_installer {
            if let Some(sys) = self.pending_install.take() {
                self.in_installer = false;
                self.installed = true;
                self.current_system = sys.clone();
                self.boot_system = sys.clone();
                self.booted_system = sys.clone();
                self.generations = vec![sys];
                // What was written under /mnt is the new root.
                let files = std::mem::take(&mut self.files);
                self.files =
                    files.into_iter().filter_map(|(p, f)| p.strip_prefix("/mnt").map(|r| (r.to_string(), f))).collect();
                let dirs = std::mem::take(&mut self.dirs);
                self.dirs = dirs.into_iter().filter_map(|d| d.strip_prefix("/mnt").map(str::to_string)).collect();
                self.jobs.clear();
                if let Some(k) = self.pending_host_key.take() {
                    self.host_key = k;
                }
            }
            return;
        }
        self.current_system = self.boot_system.clone();
        self.booted_system = self.boot_system.clone();
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
            if state.in_installer { "VARIANT_ID=\"installer\"\n" } else { "" }
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
        ("tar", ["-x", "--no-same-owner", "--strip-components=1", "-f", "-", "-C", dir, "src"]) => {
            if !state.dirs.contains(*dir) {
                fail(2, format!("tar: {dir}: Cannot open: No such file or directory\n"))
            } else {
                match untar(stdin, |p| p.strip_prefix("src/").map(|rest| format!("{dir}/{rest}"))) {
                    Ok(added) => {
                        state.add(added);
                        ok("")
                    }
                    Err(e) => fail(2, format!("tar: {e}\n")),
                }
            }
        }
        ("tar", ["-x", "-z", "--no-same-owner", "-f", "-", "-C", dir]) => {
            let mut plain = Vec::new();
            if let Err(e) = std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(stdin), &mut plain) {
                return (
                    fail(2, format!("gzip: stdin: not in gzip format ({e})\ntar: Child returned status 1\n")),
                    quick,
                );
            }
            let argv: Vec<String> =
                ["tar", "-x", "--no-same-owner", "-f", "-", "-C", dir].iter().map(|s| s.to_string()).collect();
            return run(state, paths, behaviour, &argv, &plain);
        }
        ("tar", ["-x", "--no-same-owner", "-f", "-", "-C", dir]) => {
            if !state.dirs.contains(*dir) {
                fail(2, format!("tar: {dir}: Cannot open: No such file or directory\n"))
            } else {
                match untar(stdin, |p| Some(format!("{dir}/{p}"))) {
                    Ok(added) if !added.is_empty() => {
                        state.add(added);
                        ok("")
                    }
                    Ok(_) => fail(2, "tar: This does not look like a tar archive\n"),
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
        ("sudo", ["-n", "--", ..]) => return run(state, paths, behaviour, unprivileged(argv), stdin),
        ("sh", ["-c", script, "nio-state", current, booted, marker, upload, job, profile])
            if *script == nio_shared::remote::STATE_SCRIPT =>
        {
            let read = |p: &str| state.files.get(p).map(|f| String::from_utf8_lossy(&f.data).into_owned());
            let mut parts: Vec<(String, i32)> = vec![
                (version_json(state), 0),
                (state.current_system.clone(), if *current == paths.current_system { 0 } else { 1 }),
                (state.booted_system.clone(), if *booted == paths.booted_system { 0 } else { 1 }),
                (boot_id(state), 0),
                read(marker).map_or((String::new(), 1), |m| (m, 0)),
                read(upload).map_or((String::new(), 1), |m| (m, 0)),
                ("0".into(), 0),
                ("root".into(), 0),
            ];
            parts.push(match state.jobs.get(*job) {
                Some(j) => {
                    let mut t = format!("toplevel={}\nboot_id={}\nactivated=0\n", j.toplevel, boot_id_of(j.boot_id));
                    if j.awaiting {
                        t.push_str("awaiting=\n");
                    }
                    if let Some(r) = &j.result {
                        t.push_str(&format!("result={r}\n"));
                    }
                    (t, 0)
                }
                None => (String::new(), 1),
            });
            parts.push((state.boot_system.clone(), if *profile == paths.system_profile { 0 } else { 1 }));
            let mut stdout = String::new();
            for (text, status) in parts {
                stdout.push_str(&format!("{text}\n\n@@nio-status {status}\n"));
            }
            ok(stdout)
        }
        (
            "sh",
            [
                "-c",
                script,
                "nio-activate",
                job,
                src,
                input,
                installable,
                action,
                _profile,
                _current,
                rollback,
                _confirm,
                _unit,
                secrets,
                _wrapper,
                _limit,
            ],
        ) if *script == nio_shared::remote::ACTIVATE_SCRIPT => {
            let took = behaviour.switch_latency.sample();
            return (
                activate(
                    state,
                    behaviour,
                    job,
                    src,
                    *input == "tar",
                    installable,
                    action,
                    *rollback == "1",
                    secrets,
                    stdin,
                ),
                took,
            );
        }
        (
            "sh",
            ["-c", script, "nio-confirm", job, marker, identity, _current, check, _timeout, allow, _command @ ..],
        ) if *script == nio_shared::remote::CONFIRM_SCRIPT => {
            confirm(state, behaviour, job, marker, identity, *check == "1", allow)
        }
        ("sh", ["-c", script]) if *script == crate::fleet::FACT_SCRIPT => ok(
            "system=x86_64-linux\ncpus=8\ncpu=Simulated CPU\nmemory=17179869184\ndisk=vda 53687091200\nnic=eth0 52:54:00:00:00:01\nvirt=kvm\n",
        ),
        // What peers (parallel-ssh, ansible in `compare`) push; NIO itself never runs nixos-rebuild.
        ("nixos-rebuild", [action @ ("switch" | "boot" | "test" | "dry-activate"), "--flake", flake]) => {
            let took = behaviour.switch_latency.sample();
            let Some((dir, attr)) = flake.strip_prefix("path:").and_then(|f| f.split_once('#')) else {
                return (fail(1, format!("error: invalid flake reference '{flake}'\n")), took);
            };
            if !state.files.contains_key(&format!("{dir}/flake.nix")) {
                return (fail(1, format!("error: path '{dir}' does not contain a 'flake.nix'\n")), took);
            }
            state.rebuilds += 1;
            if chance(behaviour.failure_rate) {
                return (fail(1, format!("error: builder for '/nix/store/x-nixos-system-{attr}.drv' failed\n")), took);
            }
            let sys = store_path(flake, &format!("nixos-system-{attr}"));
            if matches!(*action, "switch" | "boot") {
                state.generations.push(sys.clone());
                state.boot_system = sys.clone();
            }
            if matches!(*action, "switch" | "test") {
                state.current_system = sys;
            }
            return (ok("building the system configuration...\nactivating the configuration...\n"), took);
        }
        ("nixos-rebuild", _) => fail(2, "nixos-rebuild: unknown action or flags\n"),
        ("/root/kexec/kexec/run", []) => {
            if !state.files.contains_key("/root/kexec/kexec/run") {
                fail(127, "sh: /root/kexec/kexec/run: not found\n")
            } else {
                Output { status: 0, stdout: b"kexec into the installer\n".to_vec(), reboot: true, ..Default::default() }
            }
        }
        ("disko", ["--mode", "destroy,format,mount", "--flake", _]) => {
            if state.in_installer {
                ok("disko: partitioned /dev/vda\n")
            } else {
                fail(1, "disko: refusing to format a running system\n")
            }
        }
        (
            "nix",
            [
                "--extra-experimental-features",
                "nix-command flakes",
                "build",
                "--no-update-lock-file",
                "--no-link",
                "--json",
                "--store",
                "/mnt",
                installable,
            ],
        ) => {
            if !state.in_installer {
                fail(1, "error: /mnt is not mounted\n")
            } else {
                let attr =
                    installable.rsplit("nixosConfigurations.").next().unwrap_or("x").split('.').next().unwrap_or("x");
                let took = behaviour.switch_latency.sample();
                let out = store_path(installable, &format!("nixos-system-{attr}"));
                let drv = format!("{}.drv", store_path(installable, &format!("nixos-system-{attr}-drv")));
                let json = serde_json::json!([{"drvPath": drv, "outputs": {"out": out}}]);
                return (ok(format!("{json}\n")), took);
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

/// The entries of a tar stream (file contents up to 64 KiB), each placed where `place` says (None: skipped).
fn untar(stdin: &[u8], place: impl Fn(&str) -> Option<String>) -> std::io::Result<Vec<(String, File)>> {
    let mut archive = tar::Archive::new(stdin);
    let mut added = Vec::new();
    for e in archive.entries()? {
        let mut e = e?;
        let path = e.path()?.to_string_lossy().into_owned();
        let Some(to) = place(&path) else { continue };
        let mode = e.header().mode().unwrap_or(0o644);
        let mut data = Vec::new();
        if e.header().entry_type().is_file() && e.size() <= 64 * 1024 {
            std::io::Read::read_to_end(&mut e, &mut data)?;
        }
        added.push((to, File { data, mode }));
    }
    Ok(added)
}

fn version_json(state: &State) -> String {
    format!(
        "{{\"nixosVersion\":\"25.05.20261101.abcdef0\",\"nixpkgsRevision\":\"abcdef0\",\"configurationRevision\":null,\"installer\":{}}}",
        state.in_installer
    )
}

fn boot_id_of(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

fn boot_id(state: &State) -> String {
    boot_id_of(state.boot_id)
}

/// What [`nio_shared::remote::ACTIVATE_SCRIPT`] does: unpack, build, profile, activate; settles at once
/// except for the confirmation.
#[allow(clippy::too_many_arguments)]
fn activate(
    state: &mut State,
    behaviour: &Behaviour,
    job: &str,
    src: &str,
    upload: bool,
    installable: &str,
    action: &str,
    rollback: bool,
    secrets: &str,
    stdin: &[u8],
) -> Output {
    let mut out = String::new();
    if upload {
        let place = |p: &str| {
            p.strip_prefix("src/")
                .map(|rest| format!("{src}/{rest}"))
                .or_else(|| p.strip_prefix("secrets/").map(|rest| format!("{secrets}/{rest}")))
        };
        match untar(stdin, place) {
            Ok(added) => state.add(added),
            Err(e) => {
                let stdout = format!("tar: {e}\n@@nio failed upload\n").into_bytes();
                return Output { status: 3, stdout, ..Default::default() };
            }
        }
    }
    let Some((dir, attr)) = installable.strip_prefix("path:").and_then(|f| f.split_once('#')) else {
        return Output {
            status: 3,
            stdout: format!("error: invalid flake reference '{installable}'\n@@nio failed build\n").into_bytes(),
            ..Default::default()
        };
    };
    let attr = attr.trim_start_matches("nixosConfigurations.").split('.').next().unwrap_or("x");
    if !state.files.contains_key(&format!("{dir}/flake.nix")) {
        out.push_str(&format!("error: path '{dir}' does not contain a 'flake.nix'\n@@nio failed build\n"));
        return Output { status: 3, stdout: out.into_bytes(), ..Default::default() };
    }
    state.rebuilds += 1;
    let broken = state.broken_commits.iter().any(|c| dir.contains(c.as_str()));
    if chance(behaviour.failure_rate) {
        out.push_str(&format!(
            "error: builder for '/nix/store/x-nixos-system-{attr}.drv' failed with exit code 1\n@@nio failed build\n"
        ));
        return Output { status: 3, stdout: out.into_bytes(), ..Default::default() };
    }
    let top = store_path(installable, &format!("nixos-system-{attr}"));
    let previous = (state.current_system.clone(), state.boot_system.clone(), state.generations.clone());
    if matches!(action, "switch" | "boot") {
        state.generations.push(top.clone());
        state.boot_system = top.clone();
    }
    if matches!(action, "switch" | "test") {
        state.current_system = top.clone();
    }
    let awaiting = rollback && matches!(action, "switch" | "test");
    let result = (!awaiting).then(|| "done".to_string());
    out.push_str(&format!("@@nio toplevel {top}\n@@nio activated 0\n"));
    if let Some(r) = &result {
        out.push_str(&format!("@@nio result {r}\n"));
    }
    let sim = SimJob { toplevel: top, boot_id: state.boot_id, previous, awaiting, result, unhealthy: broken };
    state.jobs.insert(job.to_string(), sim);
    ok(out)
}

/// What [`nio_shared::remote::CONFIRM_SCRIPT`] does: health (failed units by `unhealthyRate`), then confirm or
/// roll back.
fn confirm(
    state: &mut State,
    behaviour: &Behaviour,
    job: &str,
    marker: &str,
    identity: &str,
    check: bool,
    allow: &str,
) -> Output {
    let Some(mut j) = state.jobs.get(job).cloned() else {
        return Output { status: 3, stdout: b"@@nio failed nojob\n".to_vec(), ..Default::default() };
    };
    let mut health = "skipped".to_string();
    if j.result.is_none() || j.result.as_deref() == Some("done") {
        let unit = "sim-flaky.service";
        let failed = check && (j.unhealthy || chance(behaviour.unhealthy_rate)) && !allow.split(' ').any(|u| u == unit);
        health = if failed { "failed 1".into() } else { "ok".into() };
        if j.result.is_none() {
            if failed {
                let (cur, boot, gens) = j.previous.clone();
                state.current_system = cur;
                state.boot_system = boot;
                state.generations = gens;
                j.result = Some(format!("rolled-back health check failed: failed units: {unit}"));
            } else {
                j.result = Some("confirmed".into());
            }
            j.awaiting = false;
        }
    }
    let result = j.result.clone().unwrap_or_default();
    if matches!(result.as_str(), "confirmed" | "done") && !health.starts_with("failed") && !marker.is_empty() {
        let line = format!("{identity} {}\n", j.toplevel);
        state.files.insert(marker.to_string(), File { data: line.into_bytes(), mode: 0o644 });
    }
    state.jobs.insert(job.to_string(), j);
    ok(format!("@@nio health {health}\n@@nio result {result}\n@@nio system {}\n", state.current_system))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nio_shared::remote::{Activation, Commands, Confirmation, MachineState, Records};

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

    fn activation(c: &Commands, unit: &str, src: &str, installable: &str, action: &str, rollback: bool) -> Vec<String> {
        c.activate(&Activation {
            unit,
            src_dir: src,
            upload: true,
            installable,
            action,
            rollback,
            confirm_seconds: 30,
            limit_seconds: 3600,
        })
    }

    #[test]
    fn an_uploaded_tree_is_built_activated_and_confirmed_or_rolled_back() {
        let p = RemotePaths::default();
        let c = Commands { paths: p.clone() };
        let b = Behaviour { switch_latency: "0ms".parse().unwrap(), ..Default::default() };
        let mut s = state();
        let before = s.current_system.clone();
        let mut tar = tar::Builder::new(Vec::new());
        for (path, data, mode) in [("src/flake.nix", &b"{ }"[..], 0o644), ("secrets/k", &b"secret"[..], 0o400)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            tar.append_data(&mut h, path, data).unwrap();
        }
        let tar = tar.into_inner().unwrap();
        let src = "/var/lib/nio/src/abc";
        let installable = c.toplevel("abc", None, "web");
        // Without a flake at the path the build fails and nothing changes.
        let (out, _) = run(
            &mut s,
            &p,
            &b,
            &activation(&c, "nio-1", src, &installable.replace("abc", "xyz"), "switch", true),
            &tar,
        );
        assert_eq!(out.status, 3);
        assert!(String::from_utf8_lossy(&out.stdout).contains("@@nio failed build"));
        assert_eq!(s.current_system, before);
        // Through sudo, as a non-root SSH user would.
        let argv = Commands::privileged("deploy", activation(&c, "nio-2", src, &installable, "switch", true));
        assert!(reads_stdin(&argv));
        let (out, _) = run(&mut s, &p, &b, &argv, &tar);
        let rec = Records::parse(&String::from_utf8_lossy(&out.stdout));
        assert_eq!((out.status, rec.get("result")), (0, None), "waiting for the confirmation: {rec:?}");
        assert!(s.current_system.ends_with("nixos-system-web") && s.current_system != before);
        assert_eq!(s.files["/var/lib/nio/secrets/k"].mode, 0o400);
        let st =
            MachineState::parse(&String::from_utf8_lossy(&run(&mut s, &p, &b, &c.state(src, "nio-2"), b"").0.stdout))
                .unwrap();
        assert!(st.attempt.as_ref().is_some_and(|a| a.awaiting), "{st:?}");
        let confirm = |unit, marker| Confirmation {
            unit,
            marker,
            health: true,
            health_timeout: 10,
            allowed_units: &[],
            command: &[],
        };
        let (out, _) = run(&mut s, &p, &b, &c.confirm(&confirm("nio-2", Some("id"))), b"");
        let rec = Records::parse(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(rec.get("result"), Some("confirmed"));
        let marker = String::from_utf8(s.files["/var/lib/nio/applied"].data.clone()).unwrap();
        assert_eq!(marker, format!("id {}\n", s.current_system), "the identity and the built system");
        // An unhealthy machine rolls back to what ran before.
        let sick = Behaviour { unhealthy_rate: 1.0, ..b.clone() };
        let running = s.current_system.clone();
        let (out, _) =
            run(&mut s, &p, &sick, &activation(&c, "nio-3", src, &c.toplevel("abc", None, "db"), "switch", true), &tar);
        assert_eq!(out.status, 0);
        let (out, _) = run(&mut s, &p, &sick, &c.confirm(&confirm("nio-3", None)), b"");
        let rec = Records::parse(&String::from_utf8_lossy(&out.stdout));
        assert!(rec.get("result").unwrap().starts_with("rolled-back health check failed"), "{rec:?}");
        assert_eq!(s.current_system, running);
    }
}
