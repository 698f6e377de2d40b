//! The remote command surface (docs/design.md §4): every command NIO runs on a machine, as an argument vector.
//!
//! Nothing here builds a shell string: executors quote each vector once with [`crate::quote::command`]. The
//! fleet simulator implements exactly these commands, so both sides share this module.

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

/// What a job reads first, in one round trip: `nixos-version --json`, the current system (`readlink -f "$1"`)
/// and the applied marker (`cat "$2"`), each followed by a line `@@nio-status N` with its exit status. Fixed
/// text; the paths travel as positional arguments.
pub const STATE_SCRIPT: &str = "nixos-version --json; s=$?; echo; echo \"@@nio-status $s\"; \
readlink -f \"$1\"; s=$?; echo; echo \"@@nio-status $s\"; \
cat \"$2\" 2>/dev/null; s=$?; echo; echo \"@@nio-status $s\"";

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

/// Argument vectors of every remote command.
#[derive(Debug, Clone)]
pub struct Commands {
    pub paths: RemotePaths,
}

impl Commands {
    /// Runs [`STATE_SCRIPT`] (version, current system, applied marker).
    pub fn state(&self) -> Vec<String> {
        v(&["sh", "-c", STATE_SCRIPT, "nio-state", &self.paths.current_system, &self.applied_marker()])
    }
    pub fn nixos_version(&self) -> Vec<String> {
        v(&["nixos-version", "--json"])
    }
    pub fn current_system(&self) -> Vec<String> {
        v(&["readlink", "-f", &self.paths.current_system])
    }
    pub fn boot_system(&self) -> Vec<String> {
        v(&["readlink", "-f", &self.paths.system_profile])
    }
    pub fn applied_marker(&self) -> String {
        format!("{}/applied", self.paths.state_dir)
    }
    pub fn read_applied(&self) -> Vec<String> {
        v(&["cat", &self.applied_marker()])
    }
    /// Written with `"{commit} {system}\n"` on stdin after a successful switch.
    pub fn write_applied(&self) -> Vec<String> {
        v(&["tee", &self.applied_marker()])
    }
    pub fn src_dir(&self, commit: &str) -> String {
        format!("{}/src/{commit}", self.paths.state_dir)
    }
    pub fn mkdir(&self, dir: &str) -> Vec<String> {
        v(&["mkdir", "-p", dir])
    }
    /// The upload's completion marker (the tar stream's last entry, holding its digest).
    pub fn read_src_marker(&self, commit: &str) -> Vec<String> {
        v(&["cat", &format!("{}/.nio-complete", self.src_dir(commit))])
    }
    /// Extracts a tar stream from stdin into `dir`.
    pub fn extract(&self, dir: &str) -> Vec<String> {
        v(&["tar", "-x", "--no-same-owner", "-f", "-", "-C", dir])
    }
    pub fn secrets_dir(&self) -> Vec<String> {
        v(&["install", "-d", "-m", "0700", &self.paths.secrets_dir])
    }
    /// Writes stdin to `{secretsDir}/{path}` with mode 0400.
    pub fn write_secret(&self, path: &str) -> Vec<String> {
        v(&["install", "-D", "-m", "0400", "/dev/stdin", &format!("{}/{path}", self.paths.secrets_dir)])
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
    pub fn rebuild(&self, action: &str, flake_ref: &str) -> Vec<String> {
        v(&["nixos-rebuild", action, "--flake", flake_ref])
    }
    pub fn rollback(&self) -> Vec<String> {
        v(&["nixos-rebuild", "switch", "--rollback"])
    }
    pub fn default_health(&self) -> Vec<String> {
        v(&["systemctl", "is-system-running", "--wait"])
    }
    pub fn os_release(&self) -> Vec<String> {
        v(&["cat", "/etc/os-release"])
    }
    pub fn kexec_dir(&self) -> &'static str {
        "/root/kexec"
    }
    pub fn kexec_run(&self) -> Vec<String> {
        v(&["/root/kexec/run"])
    }
    pub fn disko(&self, flake_ref: &str) -> Vec<String> {
        v(&["disko", "--mode", "disko", "--flake", flake_ref])
    }
    /// Builds the system closure into the target's store (build on target).
    pub fn build_system(&self, commit: &str, subdir: Option<&str>, attr: &str) -> Vec<String> {
        let installable =
            self.flake_ref(commit, subdir, &format!("nixosConfigurations.{attr}.config.system.build.toplevel"));
        v(&["nix", "build", "--no-link", "--print-out-paths", "--store", "/mnt", &installable])
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
        assert_eq!(c.rebuild("switch", "path:/x#web"), ["nixos-rebuild", "switch", "--flake", "path:/x#web"]);
        assert_eq!(
            c.write_secret("db/pass"),
            ["install", "-D", "-m", "0400", "/dev/stdin", "/run/nio/secrets/db/pass"]
        );
        assert_eq!(
            c.build_system(commit, None, "web").last().unwrap(),
            &format!("path:/var/lib/nio/src/{commit}#nixosConfigurations.web.config.system.build.toplevel")
        );
    }
}
