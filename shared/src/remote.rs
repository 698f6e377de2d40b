//! The remote command surface (docs/remote-protocol.md): every command NIO runs on a machine, as an argument
//! vector.
//!
//! Nothing here builds a shell string: executors quote each vector once with [`crate::quote::command`]. The
//! scripts below are fixed text (files beside this one); everything variable reaches them as positional
//! arguments. The fleet simulator implements exactly these commands, so both sides share this module.

use sha2::{Digest, Sha256};

use crate::config::RemotePaths;

fn v(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}
/// Constant fact-gathering script used by `scan` when nixos-facter is absent. It takes no input.
pub const FACT_SCRIPT: &str = "echo system=$(uname -m)-linux; echo cpus=$(nproc); \
sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1 | sed 's/^/cpu=/'; \
awk '/MemTotal/ {printf \"memory=%.0f\\n\", $2*1024}' /proc/meminfo; \
lsblk -bdno NAME,SIZE 2>/dev/null | sed 's/^/disk=/'; \
for n in /sys/class/net/*; do echo \"nic=${n##*/} $(cat $n/address)\"; done; \
echo virt=$(systemd-detect-virt 2>/dev/null || echo none)";

/// What a job reads first, in one round trip: version, current and booted system, boot id, applied marker,
/// upload marker, uid, whether sudo works, and a previous attempt's activation state.
pub const STATE_SCRIPT: &str = concat!(include_str!("remote/prelude.sh"), include_str!("remote/state.sh"));
/// Upload, build, set the profile and start the activation unit; waits until it settled. Like
/// [`CONFIRM_SCRIPT`] it starts with `remote/prelude.sh`, the helpers the scripts share (`say`, `get`, `died`, `running`, `tidy`).
pub const ACTIVATE_SCRIPT: &str = concat!(include_str!("remote/prelude.sh"), include_str!("remote/activate.sh"));
/// The activation unit: switch-to-configuration, then the dead-man's switch.
pub const UNIT_SCRIPT: &str = include_str!("remote/activate-unit.sh");
/// Health check and confirmation over a new connection; reports a job's result.
pub const CONFIRM_SCRIPT: &str = concat!(include_str!("remote/prelude.sh"), include_str!("remote/confirm.sh"));

/// Splits [`STATE_SCRIPT`]'s output into each command's (trimmed output, exit status).
pub fn parse_state(stdout: &str) -> Vec<(String, i32)> {
    let mut parts = Vec::new();
    let mut text = String::new();
    for line in stdout.lines() {
        if let Some(status) = line.strip_prefix("@@nio-status ") {
            parts.push((std::mem::take(&mut text).trim().to_string(), status.trim().parse().unwrap_or(-1)));
        } else {
            text.push_str(line);
            text.push('\n');
        }
    }
    parts
}

/// What [`STATE_SCRIPT`] found, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineState {
    /// `nixosVersion` of `nixos-version --json`; None when not NixOS.
    pub version: Option<String>,
    pub current_system: Option<String>,
    pub booted_system: Option<String>,
    pub boot_id: Option<String>,
    /// The applied marker's content.
    pub applied: Option<String>,
    /// The digest of the source upload already on the machine.
    pub upload: Option<String>,
    pub uid: Option<u32>,
    /// Root, or passwordless sudo works; else what sudo said.
    pub privileged: Result<(), String>,
    /// A previous attempt of this job (same unit): its files' first lines.
    pub attempt: Option<Attempt>,
    /// What the system profile resolves to: the system the boot loader boots next.
    pub profile_system: Option<String>,
}

/// The activation state of a job seen on the machine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attempt {
    pub toplevel: Option<String>,
    pub boot_id: Option<String>,
    pub activated: Option<i32>,
    pub awaiting: bool,
    pub result: Option<String>,
    /// Its activate.sh failed before the activation (build, upload, ...): what it wrote down.
    pub failed: Option<String>,
    /// Its activate.sh still runs (uploading or building; this boot): an earlier delivery's.
    pub running: bool,
}

impl MachineState {
    /// Decodes [`STATE_SCRIPT`]'s output; None when it printed too few parts (not a POSIX shell?).
    pub fn parse(stdout: &str) -> Option<MachineState> {
        let parts = parse_state(stdout);
        if parts.len() < 9 {
            return None;
        }
        let ok = |i: usize| Some(parts[i].0.clone()).filter(|s| parts[i].1 == 0 && !s.is_empty());
        let version = ok(0).map(|v| {
            serde_json::from_str::<serde_json::Value>(&v)
                .ok()
                .and_then(|j| j.get("nixosVersion").and_then(|s| s.as_str()).map(str::to_string))
                .unwrap_or(v)
        });
        let privileged = if parts[7].1 == 0 { Ok(()) } else { Err(parts[7].0.clone()) };
        let attempt = (parts[8].1 == 0).then(|| {
            let mut a = Attempt::default();
            for line in parts[8].0.lines() {
                let Some((k, v)) = line.split_once('=') else { continue };
                let v = v.trim().to_string();
                match k {
                    "toplevel" => a.toplevel = Some(v),
                    "boot_id" => a.boot_id = Some(v),
                    "activated" => a.activated = v.parse().ok(),
                    "awaiting" => a.awaiting = true,
                    "result" => a.result = Some(v),
                    "failed" => a.failed = Some(v),
                    "running" => a.running = true,
                    _ => {}
                }
            }
            a
        });
        Some(MachineState {
            version,
            current_system: ok(1),
            booted_system: ok(2),
            boot_id: ok(3),
            applied: ok(4),
            upload: ok(5),
            uid: ok(6).and_then(|u| u.parse().ok()),
            privileged,
            attempt,
            profile_system: parts.get(9).filter(|p| p.1 == 0 && !p.0.is_empty()).map(|p| p.0.clone()),
        })
    }
}

/// The `@@nio <key> <value>` records of [`ACTIVATE_SCRIPT`] and [`CONFIRM_SCRIPT`], and the other lines (log).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Records {
    pub records: Vec<(String, String)>,
    pub log: Vec<String>,
}

impl Records {
    pub fn parse(stdout: &str) -> Records {
        let mut r = Records::default();
        for line in stdout.lines() {
            match line.strip_prefix("@@nio ") {
                Some(rec) => {
                    let (k, v) = rec.split_once(' ').unwrap_or((rec, ""));
                    r.records.push((k.to_string(), v.trim().to_string()));
                }
                None => r.log.push(line.to_string()),
            }
        }
        r
    }

    /// The last value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.records.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// How a job's activation ended, from the `result` record or file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActivationResult {
    /// Confirmed over a new connection within the window.
    Confirmed,
    /// Finished without a confirmation window (boot, dry-activate, or rollback off).
    Done,
    /// Rolled back by the host itself, with the reason.
    RolledBack(String),
    /// The rollback itself failed: the machine needs a human.
    RollbackFailed(String),
    /// Failed without a rollback (rollback off).
    Failed(String),
}

impl ActivationResult {
    pub fn parse(s: &str) -> Option<ActivationResult> {
        let (k, why) = s.trim().split_once(' ').unwrap_or((s.trim(), ""));
        let why = why.to_string();
        Some(match k {
            "confirmed" => ActivationResult::Confirmed,
            "done" => ActivationResult::Done,
            "rolled-back" => ActivationResult::RolledBack(why),
            "rollback-failed" => ActivationResult::RollbackFailed(why),
            "failed" => ActivationResult::Failed(why),
            _ => return None,
        })
    }
}

/// Inputs of [`Commands::activate`].
#[derive(Debug, Clone)]
pub struct Activation<'a> {
    pub unit: &'a str,
    pub src_dir: &'a str,
    /// Whether a tar stream follows on stdin.
    pub upload: bool,
    pub installable: &'a str,
    pub action: &'a str,
    pub rollback: bool,
    pub confirm_seconds: u32,
    /// The most each `switch-to-configuration` (the activation, a rollback's) may take on the machine before it
    /// is stopped.
    pub limit_seconds: u64,
}

/// Inputs of [`Commands::confirm`].
#[derive(Debug, Clone)]
pub struct Confirmation<'a> {
    pub unit: &'a str,
    /// The target identity the applied marker gets, with the built system, after a confirmed switch.
    pub marker: Option<&'a str>,
    pub health: bool,
    pub health_timeout: u32,
    /// Failed units that do not fail the health check.
    pub allowed_units: &'a [String],
    /// The health command; empty: no failed units.
    pub command: &'a [String],
}

/// Argument vectors of every remote command.
#[derive(Debug, Clone)]
pub struct Commands {
    pub paths: RemotePaths,
}

impl Commands {
    /// Runs `argv` as root: directly for root, else through `sudo -n` (never prompts).
    pub fn privileged(user: &str, argv: Vec<String>) -> Vec<String> {
        if user == "root" {
            argv
        } else {
            let mut a = v(&["sudo", "-n", "--"]);
            a.extend(argv);
            a
        }
    }

    /// The systemd unit (and job directory name) of a job: stable per job id, so a redelivered job finds
    /// its previous attempt.
    pub fn unit(job_id: &str) -> String {
        let h = Sha256::digest(job_id.as_bytes());
        format!("nio-{}", h.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>())
    }

    pub fn job_dir(&self, unit: &str) -> String {
        format!("{}/jobs/{unit}", self.paths.state_dir)
    }

    /// Runs [`STATE_SCRIPT`] for the job whose unit is `unit`, uploading into `src_dir`.
    pub fn state(&self, src_dir: &str, unit: &str) -> Vec<String> {
        v(&[
            "sh",
            "-c",
            STATE_SCRIPT,
            "nio-state",
            &self.paths.current_system,
            &self.paths.booted_system,
            &self.applied_marker(),
            &format!("{src_dir}/.nio-complete"),
            &self.job_dir(unit),
            &self.paths.system_profile,
        ])
    }

    /// Runs [`ACTIVATE_SCRIPT`] (as root: wrap with [`Commands::privileged`]).
    pub fn activate(&self, a: &Activation<'_>) -> Vec<String> {
        v(&[
            "sh",
            "-c",
            ACTIVATE_SCRIPT,
            "nio-activate",
            &self.job_dir(a.unit),
            a.src_dir,
            if a.upload { "tar" } else { "none" },
            a.installable,
            a.action,
            &self.paths.system_profile,
            &self.paths.current_system,
            if a.rollback { "1" } else { "0" },
            &a.confirm_seconds.to_string(),
            a.unit,
            &self.paths.secrets_dir,
            UNIT_SCRIPT,
            &a.limit_seconds.to_string(),
        ])
    }

    /// Runs [`CONFIRM_SCRIPT`] (as root: wrap with [`Commands::privileged`]).
    pub fn confirm(&self, c: &Confirmation<'_>) -> Vec<String> {
        let marker = if c.marker.is_some() { self.applied_marker() } else { String::new() };
        let mut argv = v(&[
            "sh",
            "-c",
            CONFIRM_SCRIPT,
            "nio-confirm",
            &self.job_dir(c.unit),
            &marker,
            c.marker.unwrap_or(""),
            &self.paths.current_system,
            if c.health { "1" } else { "0" },
            &c.health_timeout.to_string(),
            &c.allowed_units.join(" "),
        ]);
        argv.extend(c.command.iter().cloned());
        argv
    }

    pub fn applied_marker(&self) -> String {
        format!("{}/applied", self.paths.state_dir)
    }
    /// Written with `"{commit} {system}\n"` on stdin after a full install.
    pub fn write_applied(&self) -> Vec<String> {
        v(&["tee", &self.applied_marker()])
    }
    pub fn src_dir(&self, commit: &str) -> String {
        format!("{}/src/{commit}", self.paths.state_dir)
    }
    pub fn mkdir(&self, dir: &str) -> Vec<String> {
        v(&["mkdir", "-p", dir])
    }
    /// Extracts an upload stream's `src/` entries from stdin into `dir` (install: no activation script).
    pub fn extract_source(&self, dir: &str) -> Vec<String> {
        v(&["tar", "-x", "--no-same-owner", "--strip-components=1", "-f", "-", "-C", dir, "src"])
    }
    /// Creates the secrets directory (0711: reachable, not listable) under `root` ("" or "/mnt" for the system
    /// being installed).
    pub fn secrets_dir(&self, root: &str) -> Vec<String> {
        v(&["install", "-d", "-m", "0711", &format!("{root}{}", self.paths.secrets_dir)])
    }
    /// Writes stdin to `{root}{secretsDir}/{path}` with `mode`.
    pub fn write_secret(&self, root: &str, path: &str, mode: u32) -> Vec<String> {
        let mode = format!("{mode:04o}");
        v(&["install", "-D", "-m", &mode, "/dev/stdin", &format!("{root}{}/{path}", self.paths.secrets_dir)])
    }
    pub fn facter(&self) -> Vec<String> {
        v(&["nixos-facter"])
    }
    pub fn fact_script(&self) -> Vec<String> {
        v(&["sh", "-c", FACT_SCRIPT])
    }
    /// `path:{stateDir}/src/{commit}[/{subdir}]#{attr}`.
    pub fn flake_ref(&self, commit: &str, subdir: Option<&str>, attr: &str) -> String {
        match subdir {
            Some(s) if !s.is_empty() => format!("path:{}/{s}#{attr}", self.src_dir(commit)),
            _ => format!("path:{}#{attr}", self.src_dir(commit)),
        }
    }
    /// The installable of a configuration's system: `…#nixosConfigurations.{attr}.config.system.build.toplevel`.
    pub fn toplevel(&self, commit: &str, subdir: Option<&str>, attr: &str) -> String {
        self.flake_ref(commit, subdir, &format!("nixosConfigurations.{attr}.config.system.build.toplevel"))
    }
    pub fn os_release(&self) -> Vec<String> {
        v(&["cat", "/etc/os-release"])
    }
    pub fn kexec_dir(&self) -> &'static str {
        "/root/kexec"
    }
    /// Unpacks nixos-images' kexec tarball (gzip) from stdin into the kexec directory.
    pub fn extract_kexec(&self) -> Vec<String> {
        v(&["tar", "-x", "-z", "--no-same-owner", "-f", "-", "-C", self.kexec_dir()])
    }
    /// The tarball's entry point: returns at once, kexecs into the installer seconds later.
    pub fn kexec_run(&self) -> Vec<String> {
        v(&["/root/kexec/kexec/run"])
    }
    pub fn disko(&self, flake_ref: &str) -> Vec<String> {
        v(&["disko", "--mode", "destroy,format,mount", "--flake", flake_ref])
    }
    /// Builds the system closure into the store on the disk mounted at /mnt (build on target, as nixos-install
    /// does), printing the result as JSON: `--print-out-paths` is newer than Nix 2.8, and a stale or missing
    /// lock file is an error, never a fresh lock of nixpkgs on the machine.
    pub fn build_system(&self, commit: &str, subdir: Option<&str>, attr: &str) -> Vec<String> {
        let installable = self.toplevel(commit, subdir, attr);
        v(&[
            "nix",
            "--extra-experimental-features",
            "nix-command flakes",
            "build",
            "--no-update-lock-file",
            "--no-link",
        ])
        .into_iter()
        .chain(v(&["--json", "--store", "/mnt", &installable]))
        .collect()
    }
    pub fn nixos_install(&self, system: &str) -> Vec<String> {
        v(&["nixos-install", "--no-root-passwd", "--no-channel-copy", "--system", system])
    }
    /// Writes stdin to the installed system's host key path.
    pub fn install_host_key(&self, private: bool) -> Vec<String> {
        if private {
            v(&["install", "-D", "-m", "0600", "/dev/stdin", "/mnt/etc/ssh/ssh_host_ed25519_key"])
        } else {
            v(&["install", "-D", "-m", "0644", "/dev/stdin", "/mnt/etc/ssh/ssh_host_ed25519_key.pub"])
        }
    }
    pub fn reboot(&self) -> Vec<String> {
        v(&["reboot"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RemotePaths;

    #[test]
    fn flake_refs_and_commands_are_argument_vectors() {
        let c = Commands { paths: RemotePaths::default() };
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(c.flake_ref(commit, Some("hosts"), "web"), format!("path:/var/lib/nio/src/{commit}/hosts#web"));
        assert_eq!(c.flake_ref(commit, None, "web"), format!("path:/var/lib/nio/src/{commit}#web"));
        assert_eq!(
            c.write_secret("", "db/pass", 0o400),
            ["install", "-D", "-m", "0400", "/dev/stdin", "/var/lib/nio/secrets/db/pass"]
        );
        let unit = Commands::unit("c/ns/web-01/abc/1/switch");
        assert_eq!((unit.len(), unit == Commands::unit("c/ns/web-01/abc/1/switch")), (20, true), "{unit}");
        assert_ne!(unit, Commands::unit("c/ns/web-01/abc/1-2/switch"), "a retry is another attempt");
        let argv = c.state("/var/lib/nio/src/abc", &unit);
        let job_dir = format!("/var/lib/nio/jobs/{unit}");
        assert_eq!(argv[argv.len() - 2..], [job_dir.as_str(), "/nix/var/nix/profiles/system"]);
        assert_eq!(Commands::privileged("root", vec!["id".into()]), ["id"]);
        assert_eq!(Commands::privileged("deploy", vec!["id".into()]), ["sudo", "-n", "--", "id"]);
        assert_eq!(
            c.toplevel(commit, None, "web"),
            format!("path:/var/lib/nio/src/{commit}#nixosConfigurations.web.config.system.build.toplevel")
        );
    }

    /// A state directory with the job directory of `unit` as the activation leaves it before its unit starts.
    fn scratch_job(unit: &str) -> (tempfile::TempDir, Commands, String) {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().to_string_lossy().to_string();
        let c = Commands { paths: RemotePaths { state_dir: state, ..RemotePaths::default() } };
        let job = c.job_dir(unit);
        std::fs::create_dir_all(&job).expect("job dir");
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot_id");
        std::fs::write(format!("{job}/boot_id"), boot).expect("boot_id copy");
        (dir, c, job)
    }

    /// Only Nix's own refusal to change the flake's lock file is a lock-file problem (SourceInvalid, "commit
    /// flake.lock"); a package whose build fails over its own lock file (cargo's `--locked`) is a build failure.
    #[test]
    fn only_nixs_refusal_to_change_the_flake_lock_is_a_lock_file_failure() {
        use std::os::unix::fs::PermissionsExt;
        for (log, want) in [
            ("error: the lock file /build/source/Cargo.lock needs to be updated but --locked was passed", "build"),
            (
                "error: flake 'path:/x' requires lock file changes but they're not allowed due to '--no-update-lock-file'",
                "lockfile",
            ),
        ] {
            let (dir, c, _job) = scratch_job("lk");
            let bin = dir.path().join("bin");
            std::fs::create_dir_all(&bin).expect("bin");
            let nix = bin.join("nix");
            std::fs::write(&nix, "#!/bin/sh\necho \"$NIX_FAKE_LOG\" >&2\nexit 1\n").expect("fake nix");
            std::fs::set_permissions(&nix, std::fs::Permissions::from_mode(0o755)).expect("mode");
            let argv = c.activate(&Activation {
                unit: "lk",
                src_dir: "/nonexistent",
                upload: false,
                installable: "path:/x#web",
                action: "dry-activate",
                rollback: false,
                confirm_seconds: 1,
                limit_seconds: 1,
            });
            let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
            let out = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .env("PATH", path)
                .env("NIX_FAKE_LOG", log)
                .output()
                .expect("activate.sh");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(stdout.contains(&format!("@@nio failed {want}\n")), "{log}: {stdout}");
        }
    }

    /// The activation unit writes its pid when it starts: a confirmation that reads the file before it holds a
    /// pid waits for the unit instead of reporting it dead (seen as "failed died" on a loaded machine).
    #[test]
    fn a_confirmation_waits_for_a_unit_whose_pid_is_not_written_yet() {
        let (_dir, c, job) = scratch_job("u1");
        std::fs::write(format!("{job}/pid"), "").expect("empty pid");
        let settle = {
            let job = job.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(700));
                std::fs::write(format!("{job}/result"), "done\n").expect("result");
            })
        };
        let argv = c.confirm(&Confirmation {
            unit: "u1",
            marker: None,
            health: false,
            health_timeout: 5,
            allowed_units: &[],
            command: &[],
        });
        let out = std::process::Command::new(&argv[0]).args(&argv[1..]).output().expect("sh");
        settle.join().expect("writer");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("@@nio result done"), "{stdout}");
        assert!(!stdout.contains("died"), "{stdout}");
    }

    /// The confirmation wakes the unit's dead-man's switch at once (it does not sit out the window), and a process
    /// the activation leaves running (a daemon it started) holds none of the locks the confirmation waits on. The
    /// window (600 s) and the daemon (900 s) outlast the bound on the confirmation (120 s) by far, so either fault
    /// leaves it without a result however busy the machine is, and a working one needs no timing assumption.
    #[test]
    fn a_confirmation_ends_the_window_at_once_and_a_leftover_process_holds_no_lock() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, c, job) = scratch_job("u2");
        let state = dir.path().to_string_lossy().to_string();
        // A system whose activation starts a daemon that outlives it, with whatever descriptors it inherited.
        let top = format!("{state}/system");
        std::fs::create_dir_all(format!("{top}/bin")).expect("system");
        let stc = format!("{top}/bin/switch-to-configuration");
        std::fs::write(&stc, format!("#!/bin/sh\nsleep 900 > /dev/null 2>&1 &\necho $! > {state}/daemon\nexit 0\n"))
            .expect("switch-to-configuration");
        std::fs::set_permissions(&stc, std::fs::Permissions::from_mode(0o755)).expect("mode");
        let current = format!("{state}/current");
        std::os::unix::fs::symlink(&top, &current).expect("current");
        let profile = format!("{state}/profile");
        let secrets = format!("{state}/secrets");
        let mut unit = std::process::Command::new("sh")
            .args(["-c", UNIT_SCRIPT, "nio-unit", &job, &top, "test", &profile, &current, "1", "600", "600", &secrets])
            .spawn()
            .expect("unit");
        let argv = c.confirm(&Confirmation {
            unit: "u2",
            marker: None,
            health: false,
            health_timeout: 5,
            allowed_units: &[],
            command: &[],
        });
        let out = std::process::Command::new("timeout").arg("120").args(&argv).output().expect("confirm");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let confirmed = stdout.contains("@@nio result confirmed");
        // A confirmed unit has exited (the confirmation waited for it); one still waiting out its window is stopped.
        if !confirmed {
            let _ = unit.kill();
        }
        let finished = unit.wait().expect("unit exit");
        if let Ok(pid) = std::fs::read_to_string(format!("{state}/daemon")) {
            let _ = std::process::Command::new("kill").arg(pid.trim()).status();
        }
        assert!(confirmed, "{stdout} (exit {:?})", out.status.code());
        assert!(finished.success(), "the unit finished: {finished:?}");
    }
}
