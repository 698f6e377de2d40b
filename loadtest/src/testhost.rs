//! Test hosts with real Nix: each one a network namespace (a veth pair, its own address) and a mount namespace
//! (its own `/nix`, `/run`, `/var/lib`, `/etc/ssh`, `/etc/nix`, `/boot`, `/root`, `/etc/passwd`, sudoers and
//! `boot_id`), running the machine's real OpenSSH `sshd`, real `sudo` and Debian's real Nix, with a root login
//! and a non-root user `deploy`.
//!
//! What stands in for what (docs/remote-protocol.md, "How this is tested"): the hosts have no systemd, so `/usr/local/bin` holds small
//! stand-ins from `fixtures/testhost/` — `systemd-run` (same argv; detaches the unit into its own session so an
//! SSH disconnect does not stop it; refuses a second unit of the same name), `systemctl` (failed units,
//! `is-active`) and `nixos-version`. The systems are the fixture flake in `fixtures/nixos-system/`: plain
//! derivations that real Nix builds offline, shaped like a NixOS toplevel (`bin/switch-to-configuration`,
//! `activate`, `nixos-version`). sshd's `ForceCommand` is `nio-record`, which logs each command before running
//! it with `sh -c` as the login shell would ([`TestHost::commands`]). "Boot" is what NixOS stage 2 does for NIO's purposes: the boot loader's
//! default (`/boot/default`, written by `switch-to-configuration boot|switch`) becomes `/run/booted-system` and
//! `/run/current-system` through its `activate` script, then sshd starts. [`TestHost::reboot`] kills every
//! process of the host, empties `/run`, gives it a new `boot_id` and boots again. For installs, `reboot` and the
//! kexec tarball's entry point ask for a power cycle through `/run/nio-power`, carried out by a watcher thread:
//! kexec boots an installer (`VARIANT_ID=installer`, Nix with its sandbox), `disko` and `nixos-install` stand-ins
//! write the host's "disk" (a directory bound at `/mnt`), and the reboot from the installer boots that disk.
//!
//! Needs root (namespaces, mounts). Addresses are `10.213.N.2`, N allocated across processes by creating the
//! network namespace `nio-th{N}` (the kernel refuses a second one); namespaces left by a killed test process
//! are reclaimed when their owner is gone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::procs::{keygen, sshd_binary};

/// The non-root user every test host has (with or without sudo, see [`HostOptions::sudo`]).
pub const DEPLOY_USER: &str = "deploy";
/// The sudoers line test hosts grant [`DEPLOY_USER`]: the one docs/remote-protocol.md asks operators for.
pub const SUDOERS_LINE: &str = "deploy ALL=(root) NOPASSWD: ALL";

const OWNERS: &str = "/run/nio-testhosts";

/// The fixture flake of NixOS-shaped systems.
pub fn fixture_flake() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/nixos-system")
}

fn stand_ins() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/testhost")
}

/// How a test host is set up.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// Whether `deploy` may run anything as root without a password (the sudoers line above).
    pub sudo: bool,
    /// The fixture configuration the host runs at first.
    pub initial: String,
    /// An identities directory whose `default.pub` the host authorizes (several hosts, one executor); None:
    /// the host makes its own (see [`TestHost::identities`]).
    pub identities: Option<PathBuf>,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions { sudo: true, initial: "initial".into(), identities: None }
    }
}

/// One namespaced host. Dropping it kills everything in it and removes its namespaces and files.
pub struct TestHost {
    pub index: u32,
    pub netns: String,
    /// The address its sshd listens on (port 22).
    pub addr: String,
    /// The host's ed25519 public host key (`ssh-ed25519 AAAA…`).
    pub host_key: String,
    /// The host's own files (its mounts' sources).
    pub dir: tempfile::TempDir,
    holder: u32,
    identities: PathBuf,
    power: Arc<Power>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    sh(Command::new("ip").args(args))
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills every process in network namespace `netns`.
fn kill_all(netns: &str, except: Option<u32>) {
    for _ in 0..50 {
        let pids: Vec<u32> = ip(&["netns", "pids", netns])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|p| Some(*p) != except)
            .collect();
        if pids.is_empty() {
            return;
        }
        for p in pids {
            let _ = Command::new("kill").args(["-KILL", &p.to_string()]).stderr(Stdio::null()).status();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Claims a free index: creates `nio-th{N}`, reclaiming namespaces whose owning process is gone.
fn claim() -> anyhow::Result<u32> {
    std::fs::create_dir_all(OWNERS)?;
    // One claimer at a time, across processes: the owner file is written before anyone else looks.
    let guard = std::fs::File::create(Path::new(OWNERS).join(".lock"))?;
    guard.lock()?;
    for n in 1..=250u32 {
        let ns = format!("nio-th{n}");
        let owner = Path::new(OWNERS).join(n.to_string());
        if ip(&["netns", "add", &ns]).is_ok() {
            std::fs::write(&owner, std::process::id().to_string())?;
            return Ok(n);
        }
        let holder: Option<u32> = std::fs::read_to_string(&owner).ok().and_then(|s| s.trim().parse().ok());
        if holder.is_none_or(|p| p != std::process::id() && !alive(p)) {
            kill_all(&ns, None);
            let _ = ip(&["netns", "del", &ns]);
            if ip(&["netns", "add", &ns]).is_ok() {
                std::fs::write(&owner, std::process::id().to_string())?;
                return Ok(n);
            }
        }
    }
    bail!("no free test host index (250 namespaces nio-th* in use)")
}

/// Mounts the host's own directories over the system ones, then holds the namespaces open.
const HOLD: &str = r#"set -e
D=$1
for m in nix:/nix run:/run var-lib:/var/lib etc-ssh:/etc/ssh etc-nix:/etc/nix boot:/boot bin:/usr/local/bin root:/root sudoers.d:/etc/sudoers.d; do
  # a fresh machine may have no /nix yet (Debian's nix-bin creates it on first use)
  mkdir -p "${m#*:}"
  mount --bind "$D/${m%%:*}" "${m#*:}"
done
for f in passwd group shadow sudoers os-release; do mount --bind "$D/$f" "/etc/$f"; done
mount --bind "$D/boot_id" /proc/sys/kernel/random/boot_id
touch "$D/ready"
exec sleep infinity
"#;

/// What NixOS stage 2 does for NIO's purposes: boot the boot loader's default, start sshd.
const BOOT: &str = r#"set -e
def=$(cat /boot/default)
mkdir -p /run/sshd
chmod 0755 /run /run/sshd
ln -sfn "$def" /run/booted-system
"$def/activate"
/usr/sbin/sshd -f /etc/ssh/sshd_config -E /var/lib/sshd.log
"#;

/// What the kexec installer (nixos-images) boots into, for NIO's purposes: a NixOS system of its own running from
/// memory (here a directory under `/run`, gone at the next boot), the old host keys, root login, sshd.
const BOOT_INSTALLER: &str = r#"set -e
mkdir -p /run/sshd /run/installer-system
chmod 0755 /run /run/sshd
echo 25.05.installer > /run/installer-system/nixos-version
ln -sfn /run/installer-system /run/current-system
ln -sfn /run/installer-system /run/booted-system
/usr/sbin/sshd -f /etc/ssh/sshd_config -E /var/lib/sshd.log
"#;

/// The firmware's part after an install: the disk nixos-install wrote becomes the root (its `/nix` and `/boot`),
/// the installed system's host key is the one sshd presents, and what the installer put under `/var/lib` is there.
const MOUNT_INSTALLED: &str = r#"set -e
D=$1
if mountpoint -q /mnt; then umount -R /mnt; fi
for m in nix:/nix boot:/boot; do umount "${m#*:}"; mount --bind "$D/disk/${m%%:*}" "${m#*:}"; done
"#;

const OS_RELEASE_NIXOS: &str = "NAME=NixOS\nID=nixos\nVERSION_ID=\"25.05\"\nPRETTY_NAME=\"NixOS 25.05\"\n";
const OS_RELEASE_INSTALLER: &str =
    "NAME=NixOS\nID=nixos\nVERSION_ID=\"25.05\"\nVARIANT_ID=installer\nPRETTY_NAME=\"NixOS 25.05 (kexec installer)\"\n";
const NIX_CONF: &str =
    "experimental-features = nix-command flakes\nsandbox = false\nsubstituters =\nbuild-users-group =\n";
/// The installer builds into the store on the disk (`nix build --store /mnt`), which Nix does only in its
/// sandbox (as on the real installer); the fixture's builder needs the host's /bin/sh and coreutils in it.
const NIX_CONF_INSTALLER: &str = "experimental-features = nix-command flakes\nsandbox = true\n\
    extra-sandbox-paths = /bin /usr /lib /lib64\nsubstituters =\nbuild-users-group =\n";

/// `nix` in the installer: Debian's Nix run where the test host's `boot_id` is not bind-mounted over `/proc`.
/// Nix's sandbox mounts a fresh `/proc` inside a user namespace, which the kernel refuses while a file of the
/// current `/proc` is covered by another mount; nothing reads the boot id while the installer builds.
const INSTALLER_NIX: &str = r#"#!/bin/sh
exec unshare --mount --propagation private sh -c 'umount /proc/sys/kernel/random/boot_id && exec /usr/bin/nix "$@"' nix "$@"
"#;

/// A host's power: `reboot` and the kexec stand-in ask for a power cycle by writing `/run/nio-power`; a watcher
/// thread carries it out a moment later, as firmware and kexec do (both return before the machine goes down).
struct Power {
    holder: u32,
    netns: String,
    dir: PathBuf,
    in_installer: AtomicBool,
    installed: AtomicBool,
    stop: AtomicBool,
}

impl Power {
    /// Kills every process of the host, empties `/run`, gives it a new boot id, runs `prepare` and boots `script`.
    fn cycle(&self, prepare: impl FnOnce() -> anyhow::Result<()>, script: &str) -> anyhow::Result<()> {
        kill_all(&self.netns, Some(self.holder));
        let run = self.dir.join("run");
        for e in std::fs::read_dir(&run)? {
            let p = e?.path();
            if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
        // In place: the bind mounts follow the inodes.
        std::fs::write(self.dir.join("boot_id"), format!("{}\n", uuid::Uuid::new_v4()))?;
        prepare()?;
        boot(self.holder, &self.dir, script)
    }

    /// A reboot from the installer boots whatever the disk holds: the installed system if nixos-install ran,
    /// else the system that was there before (the installer is gone either way).
    fn reboot(&self) -> anyhow::Result<()> {
        if self.in_installer.load(Ordering::SeqCst) && self.dir.join("disk/boot/default").exists() {
            return self.boot_installed();
        }
        self.cycle(|| self.leave_installer(), BOOT)
    }

    /// Undoes what booting the installer set up (its os-release, Nix settings and `nix`); nothing when the host
    /// does not run it.
    fn leave_installer(&self) -> anyhow::Result<()> {
        if !self.in_installer.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        std::fs::write(self.dir.join("os-release"), OS_RELEASE_NIXOS)?;
        std::fs::write(self.dir.join("etc-nix/nix.conf"), NIX_CONF)?;
        std::fs::remove_file(self.dir.join("bin/nix"))?;
        Ok(())
    }

    /// kexec into the installer: the running system is gone (nothing in `/run`), the host keys stay.
    fn kexec(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        self.cycle(
            || {
                std::fs::write(self.dir.join("os-release"), OS_RELEASE_INSTALLER)?;
                std::fs::write(self.dir.join("etc-nix/nix.conf"), NIX_CONF_INSTALLER)?;
                let nix = self.dir.join("bin/nix");
                std::fs::write(&nix, INSTALLER_NIX)?;
                std::fs::set_permissions(&nix, std::fs::Permissions::from_mode(0o755))?;
                self.in_installer.store(true, Ordering::SeqCst);
                Ok(())
            },
            BOOT_INSTALLER,
        )
    }

    /// Boots what nixos-install left on the disk.
    fn boot_installed(&self) -> anyhow::Result<()> {
        self.cycle(
            || {
                let holder = self.holder.to_string();
                sh(Command::new("nsenter")
                    .args(["-t", &holder, "-m", "-n", "--", "sh", "-c", MOUNT_INSTALLED, "mount-installed"])
                    .arg(&self.dir))?;
                let disk = self.dir.join("disk");
                for f in ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"] {
                    std::fs::copy(disk.join("etc/ssh").join(f), self.dir.join("etc-ssh").join(f))?;
                }
                if disk.join("var/lib").exists() {
                    sh(Command::new("cp").arg("-a").arg(disk.join("var/lib/.")).arg(self.dir.join("var-lib")))?;
                }
                self.leave_installer()?;
                self.installed.store(true, Ordering::SeqCst);
                Ok(())
            },
            BOOT,
        )
    }

    /// Carries out the power requests of the host until stopped.
    fn watch(&self) {
        let request = self.dir.join("run/nio-power");
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            let Ok(what) = std::fs::read_to_string(&request) else { continue };
            let _ = std::fs::remove_file(&request);
            // Both return at once on a real machine and act a moment later.
            std::thread::sleep(Duration::from_millis(800));
            let done = match what.trim() {
                "kexec" => self.kexec(),
                _ => self.reboot(),
            };
            if let Err(e) = done {
                let log = self.dir.join("power.log");
                let _ = std::fs::write(log, format!("{what}: {e:#}\n"));
            }
        }
    }
}

impl TestHost {
    /// Creates, provisions (the fixture's `initial` system as generation 1) and boots a host.
    pub fn start(opts: &HostOptions) -> anyhow::Result<TestHost> {
        let index = claim()?;
        let netns = format!("nio-th{index}");
        let dir = tempfile::Builder::new().prefix(&format!("nio-th{index}-")).tempdir()?;
        let d = dir.path();
        let result = Self::build(index, &netns, d, opts);
        match result {
            Ok((holder, host_key)) => {
                let power = Arc::new(Power {
                    holder,
                    netns: netns.clone(),
                    dir: dir.path().to_path_buf(),
                    in_installer: AtomicBool::new(false),
                    installed: AtomicBool::new(false),
                    stop: AtomicBool::new(false),
                });
                let watching = power.clone();
                let watcher = std::thread::spawn(move || watching.watch());
                Ok(TestHost {
                    index,
                    addr: format!("10.213.{index}.2"),
                    netns,
                    host_key,
                    identities: opts.identities.clone().unwrap_or_else(|| dir.path().join("identities")),
                    dir,
                    holder,
                    power,
                    watcher: Some(watcher),
                })
            }
            Err(e) => {
                kill_all(&netns, None);
                let _ = ip(&["netns", "del", &netns]);
                Err(e)
            }
        }
    }

    fn build(index: u32, netns: &str, d: &Path, opts: &HostOptions) -> anyhow::Result<(u32, String)> {
        use std::os::unix::fs::PermissionsExt;
        for sub in [
            "nix",
            "run",
            "var-lib",
            "etc-ssh/authorized_keys.d",
            "etc-nix",
            "boot",
            "bin",
            "root",
            "sudoers.d",
            "disk",
        ] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        std::fs::create_dir_all(d.join("identities"))?;
        std::fs::set_permissions(d.join("run"), std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        // Users: the machine's own plus deploy.
        let add = |file: &str, line: &str| -> anyhow::Result<()> {
            let mut text = std::fs::read_to_string(format!("/etc/{file}")).unwrap_or_default();
            text.push_str(line);
            std::fs::write(d.join(file), text)?;
            Ok(())
        };
        add("passwd", &format!("{DEPLOY_USER}:x:1500:1500:NIO deploy user:/var/lib/{DEPLOY_USER}:/bin/sh\n"))?;
        add("group", &format!("{DEPLOY_USER}:x:1500:\n"))?;
        add("shadow", &format!("{DEPLOY_USER}:*:19000:0:99999:7:::\n"))?;
        std::fs::set_permissions(d.join("shadow"), std::fs::Permissions::from_mode(0o640))?;
        std::fs::create_dir_all(d.join("var-lib").join(DEPLOY_USER))?;
        std::os::unix::fs::chown(d.join("var-lib").join(DEPLOY_USER), Some(1500), Some(1500))?;
        std::fs::write(
            d.join("sudoers"),
            "Defaults env_reset\nDefaults secure_path=\"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\"\n\
             root ALL=(ALL:ALL) ALL\n@includedir /etc/sudoers.d\n",
        )?;
        std::fs::set_permissions(d.join("sudoers"), std::fs::Permissions::from_mode(0o440))?;
        if opts.sudo {
            std::fs::write(d.join("sudoers.d/nio"), format!("{SUDOERS_LINE}\n"))?;
            std::fs::set_permissions(d.join("sudoers.d/nio"), std::fs::Permissions::from_mode(0o440))?;
        }
        // Nix: single-user, offline, no sandbox (the fixture's builder is /bin/sh).
        std::fs::write(d.join("etc-nix/nix.conf"), NIX_CONF)?;
        std::fs::write(d.join("os-release"), OS_RELEASE_NIXOS)?;
        // What the disk held before an install (an install formats it).
        std::fs::write(d.join("disk/old-data"), "the previous system's files\n")?;
        // SSH: host key, authorized identities.
        let host_key = keygen(&d.join("etc-ssh/ssh_host_ed25519_key"))?;
        let client = match &opts.identities {
            Some(dir) => std::fs::read_to_string(dir.join("default.pub"))?.trim().to_string(),
            None => {
                keygen(&d.join("identities/stranger"))?;
                keygen(&d.join("identities/default"))?
            }
        };
        for user in ["root", DEPLOY_USER] {
            std::fs::write(d.join("etc-ssh/authorized_keys.d").join(user), format!("{client}\n"))?;
        }
        std::fs::write(
            d.join("etc-ssh/sshd_config"),
            "ListenAddress 0.0.0.0:22\nHostKey /etc/ssh/ssh_host_ed25519_key\n\
             AuthorizedKeysFile /etc/ssh/authorized_keys.d/%u\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PidFile /run/sshd.pid\nMaxStartups 200:30:400\nMaxSessions 200\nLogLevel VERBOSE\n\
             ForceCommand /usr/local/bin/nio-record\n",
        )?;
        for entry in std::fs::read_dir(stand_ins())? {
            let entry = entry?;
            let to = d.join("bin").join(entry.file_name());
            let text = std::fs::read_to_string(entry.path())?;
            std::fs::write(&to, text.replace("@DISK@", &d.join("disk").display().to_string()))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::write(d.join("boot_id"), format!("{}\n", uuid::Uuid::new_v4()))?;
        std::fs::write(d.join("var-lib/commands.log"), "")?;
        std::fs::set_permissions(d.join("var-lib/commands.log"), std::fs::Permissions::from_mode(0o666))?;
        // Network: veth pair, 10.213.N.1 here, 10.213.N.2 (eth0) there.
        let outside = format!("nth{index}");
        // A previous holder's veth may outlive its namespace for a moment.
        let _ = ip(&["link", "del", &outside]);
        ip(&["link", "add", &outside, "type", "veth", "peer", "name", "eth0", "netns", netns])?;
        ip(&["addr", "add", &format!("10.213.{index}.1/24"), "dev", &outside])?;
        ip(&["link", "set", &outside, "up"])?;
        ip(&["-n", netns, "addr", "add", &format!("10.213.{index}.2/24"), "dev", "eth0"])?;
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        // The namespaces' holder.
        let holder = Command::new("ip")
            .args(["netns", "exec", netns, "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", HOLD])
            .arg("nio-testhost")
            .arg(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("holder.log"))?)
            .spawn()
            .context("starting the host's namespaces (needs root, iproute2, util-linux)")?;
        let pid = holder.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.join("ready").exists() {
            if Instant::now() > deadline || !alive(pid) {
                bail!("test host did not start: {}", std::fs::read_to_string(d.join("holder.log")).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Reaped by the kernel's init once killed: nobody waits for it here.
        std::mem::forget(holder);
        // Generation 1 of the system profile: the initial configuration, as an installer would leave it.
        let installable = format!(
            "path:{}#nixosConfigurations.{}.config.system.build.toplevel",
            fixture_flake().display(),
            opts.initial
        );
        let provision = format!(
            "set -e; nix build --no-update-lock-file --out-link /root/initial-system '{installable}'; \
             top=$(readlink -e /root/initial-system); nix-env -p /nix/var/nix/profiles/system --set \"$top\"; \
             echo \"$top\" > /boot/default"
        );
        sh(Command::new("nsenter").args(["-t", &pid.to_string(), "-m", "-n", "--", "sh", "-c", &provision]))
            .context("provisioning the initial system with nix")?;
        let host = (pid, host_key);
        boot(pid, d, BOOT)?;
        Ok(host)
    }

    /// Runs `script` with `sh -c` as root inside the host (not over SSH).
    pub fn exec(&self, script: &str) -> anyhow::Result<String> {
        sh(Command::new("nsenter").args(["-t", &self.holder.to_string(), "-m", "-n", "--", "sh", "-c", script]))
    }

    /// The host-side path of `inside` (an absolute path under one of the host's own directories).
    pub fn path(&self, inside: &str) -> PathBuf {
        let d = self.dir.path();
        let (nix, boot) = if self.installed() { ("disk/nix", "disk/boot") } else { ("nix", "boot") };
        for (prefix, sub) in [
            ("/nix", nix),
            ("/run", "run"),
            ("/var/lib", "var-lib"),
            ("/etc/ssh", "etc-ssh"),
            ("/boot", boot),
            ("/root", "root"),
        ] {
            if let Some(rest) = inside.strip_prefix(prefix) {
                return d.join(sub).join(rest.trim_start_matches('/'));
            }
        }
        d.join("outside").join(inside.trim_start_matches('/'))
    }

    /// The executor-style identities directory (`default` is authorized for root and deploy).
    pub fn identities(&self) -> PathBuf {
        self.identities.clone()
    }

    /// `readlink -e` of a symlink inside the host (`/run/current-system`, the system profile, …).
    pub fn resolve(&self, inside: &str) -> Option<String> {
        self.exec(&format!("readlink -e '{inside}'")).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    }

    pub fn current_system(&self) -> Option<String> {
        self.resolve("/run/current-system")
    }

    /// What the boot loader boots next.
    pub fn boot_default(&self) -> Option<String> {
        std::fs::read_to_string(self.path("/boot/default")).ok().map(|s| s.trim().to_string())
    }

    /// Generation numbers of the system profile.
    pub fn generations(&self) -> Vec<u32> {
        let mut gens: Vec<u32> = std::fs::read_dir(self.path("/nix/var/nix/profiles"))
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.strip_prefix("system-")?.strip_suffix("-link")?.parse().ok()
                    })
                    .collect()
            })
            .unwrap_or_default();
        gens.sort_unstable();
        gens
    }

    pub fn boot_id(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("boot_id")).unwrap_or_default().trim().to_string()
    }

    /// Activations the fixture recorded: (action or "end", system or exit status), in order.
    pub fn activations(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(self.path("/var/lib/fixture/activations.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut p = l.split_whitespace().skip(2);
                match (p.next(), p.next(), p.next()) {
                    (Some("start"), Some(action), Some(sys)) => Some((action.to_string(), sys.to_string())),
                    (Some("end"), Some(code), _) => Some(("end".to_string(), code.to_string())),
                    _ => None,
                }
            })
            .collect()
    }

    /// When each activation ran (switch-to-configuration's start and end, seconds since the epoch).
    pub fn activation_spans(&self) -> Vec<(f64, f64)> {
        let text = std::fs::read_to_string(self.path("/var/lib/fixture/activations.log")).unwrap_or_default();
        let mut open: Vec<(String, f64)> = Vec::new();
        let mut spans = Vec::new();
        for l in text.lines() {
            let p: Vec<&str> = l.split_whitespace().collect();
            let (Some(t), Some(pid), Some(kind)) = (p.first().and_then(|t| t.parse::<f64>().ok()), p.get(1), p.get(2))
            else {
                continue;
            };
            if *kind == "start" {
                open.push((pid.to_string(), t));
            } else if let Some(i) = open.iter().position(|(q, _)| q == pid) {
                spans.push((open.remove(i).1, t));
            }
        }
        spans.extend(open.into_iter().map(|(_, t)| (t, f64::MAX)));
        spans
    }

    /// Whether eth0 inside the host is up.
    pub fn link_up(&self) -> bool {
        ip(&["-n", &self.netns, "-br", "link", "show", "eth0"]).is_ok_and(|s| !s.contains("DOWN"))
    }

    /// Power-cycles the host: kills everything in it, empties `/run`, new `boot_id`, boots the boot default
    /// (what the installer wrote to the disk, after an install).
    pub fn reboot(&self) -> anyhow::Result<()> {
        self.power.reboot()
    }

    /// Whether the host booted a system nixos-install put on its disk.
    pub fn installed(&self) -> bool {
        self.power.installed.load(Ordering::SeqCst)
    }

    /// Whether the host runs the kexec installer.
    pub fn in_installer(&self) -> bool {
        self.power.in_installer.load(Ordering::SeqCst)
    }

    /// The public host key sshd presents now (an install gives the machine a new one).
    pub fn current_host_key(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etc-ssh/ssh_host_ed25519_key.pub"))
            .unwrap_or_default()
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// What the host's disk holds (the host-side directory; the installer mounts it at `/mnt`).
    pub fn disk(&self) -> PathBuf {
        self.dir.path().join("disk")
    }

    /// What went wrong carrying out a power request, if anything did.
    pub fn power_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("power.log")).unwrap_or_default()
    }

    /// sshd's log (level VERBOSE: one line per session and per command).
    pub fn sshd_log(&self) -> String {
        std::fs::read_to_string(self.path("/var/lib/sshd.log")).unwrap_or_default()
    }

    /// Every command the host received over SSH, as argument vectors (recorded by `nio-record`).
    pub fn commands(&self) -> Vec<Vec<String>> {
        std::fs::read(self.path("/var/lib/commands.log"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .filter(|c| !c.is_empty())
            .map(|c| shlex::split(&String::from_utf8_lossy(c)).unwrap_or_default())
            .collect()
    }

    /// (SSH connections authenticated, exec channels run) so far, by sshd's own log.
    pub fn ssh_counts(&self) -> (usize, usize) {
        let log = self.sshd_log();
        let logins = log.lines().filter(|l| l.contains("Accepted publickey")).count();
        let commands = log.lines().filter(|l| l.contains("Starting session: ")).count();
        (logins, commands)
    }
}

fn boot(holder: u32, d: &Path, script: &str) -> anyhow::Result<()> {
    let _ = sshd_binary();
    sh(Command::new("nsenter").args(["-t", &holder.to_string(), "-m", "-n", "--", "sh", "-c", script]))
        .context("booting the test host")?;
    // sshd forks into the background; wait until it listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.join("run/sshd.pid").exists() {
        if Instant::now() > deadline {
            bail!("sshd did not start: {}", std::fs::read_to_string(d.join("var-lib/sshd.log")).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.power.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        kill_all(&self.netns, None);
        let _ = ip(&["link", "del", &format!("nth{}", self.index)]);
        let _ = ip(&["netns", "del", &self.netns]);
        let _ = std::fs::remove_file(Path::new(OWNERS).join(self.index.to_string()));
    }
}

/// A Git repository holding the fixture flake (`{dir}/systems`), on branch `main`.
pub struct SystemRepo {
    pub path: PathBuf,
}

impl SystemRepo {
    /// Copies the fixture flake into a new repository and commits it.
    pub fn create(dir: &Path) -> anyhow::Result<SystemRepo> {
        let path = dir.join("systems");
        std::fs::create_dir_all(path.join("hosts"))?;
        for f in ["flake.nix", "build.sh", "version", "hosts/initial", "hosts/web"] {
            std::fs::copy(fixture_flake().join(f), path.join(f))?;
        }
        let repo = SystemRepo { path };
        repo.git(&["init", "-q", "-b", "main"])?;
        repo.commit("fixture systems")?;
        Ok(repo)
    }

    fn git(&self, args: &[&str]) -> anyhow::Result<String> {
        crate::gitrepo::git(&self.path, args)
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    /// Writes `file` (relative to the flake) and commits; returns the commit.
    pub fn write(&self, file: &str, content: &str) -> anyhow::Result<String> {
        let p = self.path.join(file);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(p, content)?;
        self.commit(&format!("{file}: {}", content.trim()))
    }

    /// Configuration `name` behaving as `behaviour` (see the fixture's build.sh), committed.
    pub fn configure(&self, name: &str, behaviour: &str) -> anyhow::Result<String> {
        self.write(&format!("hosts/{name}"), &format!("{behaviour}\n"))
    }

    /// A new version of every system (new store paths), committed.
    pub fn bump(&self) -> anyhow::Result<String> {
        let n: u64 = std::fs::read_to_string(self.path.join("version"))?.trim().parse().unwrap_or(1);
        self.write("version", &format!("{}\n", n + 1))
    }

    fn commit(&self, message: &str) -> anyhow::Result<String> {
        self.git(&["add", "-A"])?;
        self.git(&["commit", "-q", "--allow-empty", "-m", message])?;
        self.git(&["rev-parse", "HEAD"])
    }
}
