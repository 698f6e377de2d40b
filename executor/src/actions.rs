//! What each job action does on a machine (docs/design.md §4): update (switch/boot/test/dry-activate), remove,
//! install (kexec → disko → nixos-install → host key → reboot → verify), probe and scan.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use nio_shared::crd::HardwareFacts;
use nio_shared::protocol::{Action, FailureCategory, Job, SecretFile, Source, Step};
use nio_shared::seal::SealKey;

use crate::error::{Error, Result};
use crate::host::{self, Commands, Host};
use crate::source::{self, SourceCache};
use tracing::Instrument;

/// Reports progress of a job (Step events).
pub trait Progress: Send + Sync {
    fn step(&self, step: Step, message: String) -> impl Future<Output = ()> + Send;
}

/// Opens (new) connections to the job's machine: after a kexec or a reboot the machine comes back with
/// another host key.
pub trait Connector: Send + Sync {
    type Host: Host;
    /// Connects, pinning `host_key` when given, else trusting the first key seen.
    fn connect(&self, host_key: Option<&str>) -> impl Future<Output = Result<Self::Host>> + Send;
    /// Hands back a connection this job opened after what it did (a confirmation's): the one to keep for the
    /// machine's next job rather than the job's first, if the job ends well (the caller decides).
    fn keep(&self, _host: Self::Host) {}
}

/// How a job ended well.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub skipped: bool,
    pub rolled_back: Option<FailureCategory>,
    pub commit: Option<String>,
    pub system: Option<String>,
    /// What the machine booted, and its boot id, when the job read them.
    pub booted_system: Option<String>,
    pub boot_id: Option<String>,
    pub nixos_version: Option<String>,
    /// Host key installed by a full install.
    pub installed_host_key: Option<String>,
    pub facts: Option<HardwareFacts>,
    pub message: String,
    pub log_tail: Vec<String>,
}

/// One run of a job: everything an action needs besides the machine.
pub struct JobRun<'a, P: Progress> {
    pub job: &'a Job,
    pub cmds: &'a Commands,
    pub sources: &'a SourceCache,
    pub seal: Option<&'a SealKey>,
    pub progress: &'a P,
    /// Timeout of quick commands (probes, markers, uploads).
    pub quick: Duration,
    /// Timeout of builds and installs.
    pub long: Duration,
    pub kexec_tarball: Option<&'a [u8]>,
    /// How long to wait for a machine to come back after kexec or reboot.
    pub reboot_timeout: Duration,
    /// The host key the job's first connection saw: later connections (the confirmation) must see it too.
    pub host_key: Option<&'a str>,
    /// The first connection was kept from an earlier job ([`crate::pool`]): it was logged in before anything
    /// this job finds on the machine, so it cannot stand for a new login after an earlier delivery's activation.
    pub reused: bool,
}

/// Checks the parts of a job that reach a remote command or path (defence in depth: the controller
/// validated them already).
pub fn check_job(job: &Job) -> Result<()> {
    use nio_shared::validate as v;
    let inv = |e: v::ValidationError| Error::InvalidJob(e.to_string());
    v::hostname("target.host", &job.endpoint.host).map_err(inv)?;
    v::ssh_user("target.user", &job.endpoint.user).map_err(inv)?;
    if let Some(id) = &job.endpoint.identity {
        v::identity_name("target.identity", id).map_err(inv)?;
    }
    if let Some(src) = &job.source {
        if !v::is_full_sha(&src.commit) {
            return Err(Error::InvalidJob(format!("source.commit {:?} is not a full commit SHA", src.commit)));
        }
        v::attr_path("source.flakeAttr", &src.flake_attr).map_err(inv)?;
        if let Some(s) = &src.subdir {
            v::flake_dir("source.subdir", s).map_err(inv)?;
        }
        v::git_repo("source.repo", &src.repo).map_err(inv)?;
        if src.credentials.is_some() {
            v::credentials_over("source.credentials", &src.repo).map_err(inv)?;
        }
    } else if !matches!(job.action, Action::Probe | Action::Scan) {
        return Err(Error::InvalidJob(format!("{} job without a source", job.action.as_str())));
    }
    for f in &job.files {
        v::relative_path("files[].path", &f.path).map_err(inv)?;
    }
    for b in &job.budgets {
        let ok_key = !b.key.is_empty()
            && b.key.len() <= 200
            && b.key
                .split('.')
                .all(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)));
        if !ok_key || b.max == 0 || b.max > 10_000 {
            return Err(Error::InvalidJob(format!("disruption budget {:?} with max {} is not usable", b.key, b.max)));
        }
    }
    for s in &job.secrets {
        v::relative_path("secrets[].path", &s.path).map_err(inv)?;
    }
    // The executor adds these up into the job's deadline: bounded, so no sum can overflow.
    let health = job.health_check.as_ref().map_or(0, |h| h.timeout_seconds);
    for (field, value, max) in [
        ("timeoutSeconds", job.timeout_seconds, MAX_JOB_SECONDS),
        ("confirmTimeoutSeconds", u64::from(job.confirm_timeout_seconds), MAX_STEP_SECONDS),
        ("healthCheck.timeoutSeconds", u64::from(health), MAX_STEP_SECONDS),
    ] {
        if value > max {
            return Err(Error::InvalidJob(format!("{field} {value} is above its maximum {max}")));
        }
    }
    Ok(())
}

/// The longest a job may ask to run (a week: a full install of a large machine takes hours, not days).
const MAX_JOB_SECONDS: u64 = 7 * 24 * 3600;
/// The longest a confirmation window or a health check may be (a day; the CRD allows an hour).
const MAX_STEP_SECONDS: u64 = 24 * 3600;

/// Runs the job's action.
pub async fn run<C: Connector, P: Progress>(conn: &C, first: &C::Host, ctx: &JobRun<'_, P>) -> Result<Outcome> {
    match ctx.job.action {
        Action::Probe => probe(first, ctx).await,
        Action::Scan => scan(first, ctx).await,
        Action::Install => install(conn, first, ctx).await,
        Action::Switch | Action::Boot | Action::Test | Action::DryActivate | Action::Remove => {
            crate::update::update(conn, first, ctx).await
        }
    }
}

/// What install reads after a reboot: version, current and booted system, boot id.
struct Current {
    version: Option<String>,
    system: Option<String>,
    booted: Option<String>,
    boot_id: Option<String>,
}

async fn current<H: Host, P: Progress>(host: &H, ctx: &JobRun<'_, P>) -> Result<Current> {
    let st = crate::update::read_state(host, ctx, "", "").await?;
    if st.current_system.is_none() {
        let how = "found no running system (/run/current-system)";
        return Err(Error::command(Step::Probe, "readlink", how, FailureCategory::CommandFailed));
    }
    Ok(Current { version: st.version, system: st.current_system, booted: st.booted_system, boot_id: st.boot_id })
}

async fn probe<H: Host, P: Progress>(host: &H, ctx: &JobRun<'_, P>) -> Result<Outcome> {
    let cur = current(host, ctx).await?;
    Ok(Outcome {
        system: cur.system,
        booted_system: cur.booted,
        boot_id: cur.boot_id,
        nixos_version: cur.version,
        message: "reachable".into(),
        ..Default::default()
    })
}

/// Parses nixos-facter's JSON report into the bounded summary kept in Machine status.
pub fn facts_from_facter(json: &serde_json::Value) -> HardwareFacts {
    let hw = &json["hardware"];
    let list = |k: &str| hw.get(k).and_then(|v| v.as_array()).cloned().unwrap_or_default();
    let cpus = list("cpu");
    let memory = list("memory")
        .iter()
        .flat_map(|m| m.get("resources").and_then(|r| r.as_array()).cloned().unwrap_or_default())
        .filter(|r| r.get("type").and_then(|t| t.as_str()) == Some("phys_mem"))
        .filter_map(|r| r.get("range").and_then(|x| x.as_u64()))
        .sum::<u64>();
    let name = |v: &serde_json::Value| {
        v.get("unix_device_name").or_else(|| v.get("name")).and_then(|s| s.as_str()).unwrap_or("?").to_string()
    };
    HardwareFacts {
        system: json.get("system").and_then(|s| s.as_str()).map(str::to_string),
        cpu_model: cpus
            .first()
            .and_then(|c| c.get("model_name").or_else(|| c.get("model")))
            .and_then(|s| s.as_str())
            .map(str::to_string),
        cpu_count: cpus
            .first()
            .and_then(|c| c.get("units").or_else(|| c.get("cores")))
            .and_then(|n| n.as_u64())
            .and_then(|n| u32::try_from(n).ok()),
        memory_bytes: (memory > 0).then_some(memory),
        disks: list("disk").iter().take(32).map(name).collect(),
        network_interfaces: list("network_interface").iter().take(32).map(name).collect(),
        virtualisation: json.get("virtualisation").and_then(|s| s.as_str()).map(str::to_string),
        source: Some("nixos-facter".into()),
    }
}

/// Parses the built-in fact script's `key=value` lines.
pub fn facts_from_script(out: &str) -> HardwareFacts {
    let mut f = HardwareFacts { source: Some("nio-facts".into()), ..Default::default() };
    for line in out.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = v.trim().to_string();
        match k {
            "system" => f.system = Some(v),
            "cpus" => f.cpu_count = v.parse().ok(),
            "cpu" => f.cpu_model = Some(v),
            "memory" => f.memory_bytes = v.parse().ok(),
            "disk" if f.disks.len() < 32 => f.disks.push(v),
            "nic" if f.network_interfaces.len() < 32 => f.network_interfaces.push(v),
            "virt" => f.virtualisation = Some(v),
            _ => {}
        }
    }
    f
}

async fn scan<H: Host, P: Progress>(host: &H, ctx: &JobRun<'_, P>) -> Result<Outcome> {
    let facter = host.exec(&ctx.cmds.facter(), None, ctx.quick).await?;
    let facts = if facter.success() {
        let json: serde_json::Value = serde_json::from_slice(&facter.stdout).map_err(|e| {
            let how = format!("printed something that is not JSON: {e}");
            Error::command(Step::Scan, "nixos-facter", how, FailureCategory::CommandFailed).with_tail(facter.tail())
        })?;
        facts_from_facter(&json)
    } else {
        let out = host::run(host, Step::Scan, ctx.cmds.fact_script(), None, ctx.quick).await?;
        facts_from_script(&String::from_utf8_lossy(&out.stdout))
    };
    Ok(Outcome { facts: Some(facts), message: "hardware scanned".into(), ..Default::default() })
}

/// Writes the job's secrets (0400, directory 0711) under `root` (`/mnt`: into the installed system).
async fn write_secrets<H: Host, P: Progress>(host: &H, ctx: &JobRun<'_, P>, root: &str) -> Result<()> {
    let job = ctx.job;
    if job.secrets.is_empty() {
        return Ok(());
    }
    let key = ctx
        .seal
        .ok_or_else(|| Error::InvalidJob("job carries secrets but this executor has no --seal-key-file".into()))?;
    host::run(host, Step::Upload, ctx.cmds.secrets_dir(root), None, ctx.quick).await?;
    for s in &job.secrets {
        let context = SecretFile::seal_context(&job.cluster, &job.namespace, &job.machine, &s.path);
        let plain =
            key.unseal(&s.sealed, &context).map_err(|e| Error::InvalidJob(format!("secret {}: {e}", s.path)))?;
        // The installer has none of the installed system's users yet: root owns them until the first update.
        let argv = ctx.cmds.write_secret(root, &s.path, s.file_mode());
        host::run(host, Step::Upload, argv, Some(Bytes::from(plain)), ctx.quick).await?;
    }
    ctx.progress.step(Step::Upload, format!("{} secret(s) written", job.secrets.len())).await;
    Ok(())
}

/// Polls until the machine answers SSH with a boot id other than `old_boot` (it went down and came back:
/// kexec and reboot return at once and act seconds later, so an answer from the old boot is not enough).
/// `host_key`: the key it must present; `tofu`: another key is accepted (an installer with fresh keys).
async fn wait_rebooted<C: Connector, P: Progress>(
    conn: &C,
    host_key: Option<&str>,
    tofu: bool,
    old_boot: Option<&str>,
    ctx: &JobRun<'_, P>,
    what: &str,
) -> Result<(C::Host, Current)> {
    let deadline = tokio::time::Instant::now() + ctx.reboot_timeout;
    let mut last: String;
    loop {
        let attempt = match conn.connect(host_key).await {
            Err(Error::HostKeyMismatch { .. }) if tofu => conn.connect(None).await,
            other => other,
        };
        match attempt {
            Ok(h) => match current(&h, ctx).await {
                Ok(cur) if cur.boot_id.is_some() && cur.boot_id.as_deref() != old_boot => return Ok((h, cur)),
                Ok(_) => last = "still the boot before".into(),
                Err(e) => last = e.to_string(),
            },
            Err(e @ Error::HostKeyMismatch { .. }) => last = e.to_string(),
            Err(e) if e.is_transient() => last = e.to_string(),
            Err(e) => return Err(e),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout { step: Step::Reboot, after: ctx.reboot_timeout })
                .inspect_err(|_| tracing::warn!(%what, %last, "machine did not come back"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn install<C: Connector, P: Progress>(conn: &C, first: &C::Host, ctx: &JobRun<'_, P>) -> Result<Outcome> {
    let src = ctx.job.source.as_ref().ok_or_else(|| Error::InvalidJob("no source".into()))?;
    let installer = boot_installer(conn, first, ctx).await?;
    let host = installer.as_ref().unwrap_or(first);
    upload_tree_only(host, ctx).instrument(tracing::info_span!("upload")).await?;
    let system = install_system(host, ctx, src).await?;
    let public = install_host_key(host, ctx).await?;
    // Secrets go into the installed system before its first boot (its services may need them at once).
    write_secrets(host, ctx, "/mnt").await?;
    let before = current_boot(host, ctx).await;
    ctx.progress.step(Step::Reboot, "rebooting into the installed system".into()).await;
    // The connection drops as the machine reboots; an error here is expected.
    let _ = host.exec(&ctx.cmds.reboot(), None, ctx.quick).await;
    let (booted, cur) = wait_rebooted(conn, Some(&public), false, before.as_deref(), ctx, "installed system").await?;
    if cur.system.as_deref() != Some(system.as_str()) {
        let how = format!("the machine booted {:?}, not the installed {system}", cur.system);
        return Err(Error::command(Step::Reboot, "readlink", how, FailureCategory::ActivationFailed));
    }
    let line = format!("{} {system}\n", src.commit);
    host::run(&booted, Step::Activate, ctx.cmds.mkdir(&ctx.cmds.paths.state_dir), None, ctx.quick).await?;
    host::run(&booted, Step::Activate, ctx.cmds.write_applied(), Some(Bytes::from(line)), ctx.quick).await?;
    Ok(Outcome {
        commit: Some(src.commit.clone()),
        system: Some(system),
        booted_system: cur.booted,
        boot_id: cur.boot_id,
        nixos_version: cur.version,
        installed_host_key: Some(public),
        message: "installed".into(),
        ..Default::default()
    })
}

/// The machine's boot id, when it can be read.
async fn current_boot<H: Host, P: Progress>(host: &H, ctx: &JobRun<'_, P>) -> Option<String> {
    crate::update::read_state(host, ctx, "", "").await.ok().and_then(|s| s.boot_id)
}

/// Whether `host` runs the NixOS installer: `VARIANT_ID=installer` in /etc/os-release, quoted or not.
async fn runs_installer<H: Host, P: Progress>(host: &H, ctx: &JobRun<'_, P>) -> Result<bool> {
    let release = host::run(host, Step::Kexec, ctx.cmds.os_release(), None, ctx.quick).await?;
    Ok(String::from_utf8_lossy(&release.stdout).lines().any(|l| {
        l.trim().strip_prefix("VARIANT_ID=").is_some_and(|v| v.trim_matches(|c| c == '"' || c == '\'') == "installer")
    }))
}

/// Boots the installer with kexec unless the machine already runs it; returns the installer's connection
/// (None: `first` is the installer). The nixos-images tarball is gzip with its entry point at `kexec/run`;
/// the script returns at once and kexecs seconds later; the installer keeps the machine's host keys (another
/// key is accepted for this phase only, as older images make new ones) and logs in root.
async fn boot_installer<C: Connector, P: Progress>(
    conn: &C,
    first: &C::Host,
    ctx: &JobRun<'_, P>,
) -> Result<Option<C::Host>> {
    if runs_installer(first, ctx).await? {
        ctx.progress.step(Step::Kexec, "already in the installer".into()).await;
        return Ok(None);
    }
    let tarball = ctx.kexec_tarball.ok_or_else(|| {
        let how = "cannot run: this executor has no --kexec-tarball";
        Error::command(Step::Kexec, "kexec", how, FailureCategory::CommandFailed)
    })?;
    let before = current_boot(first, ctx).await;
    host::run(first, Step::Kexec, ctx.cmds.mkdir(ctx.cmds.kexec_dir()), None, ctx.quick).await?;
    let tar = Some(Bytes::copy_from_slice(tarball));
    host::run(first, Step::Kexec, ctx.cmds.extract_kexec(), tar, ctx.long).await?;
    ctx.progress.step(Step::Kexec, "booting the installer with kexec".into()).await;
    // The script returns before the kexec; the connection may also drop under it.
    let _ = first.exec(&ctx.cmds.kexec_run(), None, ctx.quick).await;
    let (installer, _) = wait_rebooted(conn, ctx.host_key, true, before.as_deref(), ctx, "installer").await?;
    if !runs_installer(&installer, ctx).await? {
        let how = "the machine came back but is not running the installer";
        return Err(Error::command(Step::Kexec, "kexec", how, FailureCategory::CommandFailed));
    }
    Ok(Some(installer))
}

/// Partitions with disko, builds the system and runs nixos-install; returns the system's store path.
async fn install_system<H: Host, P: Progress>(host: &H, ctx: &JobRun<'_, P>, src: &Source) -> Result<String> {
    let flake = ctx.cmds.flake_ref(&src.commit, src.subdir.as_deref(), &src.flake_attr);
    ctx.progress.step(Step::Disko, "partitioning and formatting with disko".into()).await;
    host::run(host, Step::Disko, ctx.cmds.disko(&flake), None, ctx.long)
        .instrument(tracing::info_span!("disko"))
        .await?;
    ctx.progress.step(Step::Install, "building the system on the target".into()).await;
    let build = ctx.cmds.build_system(&src.commit, src.subdir.as_deref(), &src.flake_attr);
    let built = host::run(host, Step::Install, build, None, ctx.long).await?;
    // `[{"drvPath": ..., "outputs": {"out": "/nix/store/...-nixos-system-..."}}]`
    let result: serde_json::Value = serde_json::from_slice(&built.stdout).unwrap_or_default();
    let system = result.pointer("/0/outputs/out").and_then(|o| o.as_str()).unwrap_or_default().to_string();
    if !system.starts_with("/nix/store/") {
        let how = format!("printed no store path ({system:?})");
        return Err(Error::command(Step::Install, "nix", how, FailureCategory::BuildFailed).with_tail(built.tail()));
    }
    host::run(host, Step::Install, ctx.cmds.nixos_install(&system), None, ctx.long)
        .instrument(tracing::info_span!("nixos-install"))
        .await?;
    Ok(system)
}

/// Generates the installed system's SSH host key here and writes it into the new system, so the executor
/// knows (and pins) the key the machine will boot with. Returns the public key line.
async fn install_host_key<H: Host, P: Progress>(host: &H, ctx: &JobRun<'_, P>) -> Result<String> {
    let key = russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
        .map_err(|e| Error::internal("generating host key", Some(e.into())))?;
    let private = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| Error::internal("encoding host key", Some(e.into())))?;
    let public = crate::ssh::openssh(key.public_key());
    let private = Some(Bytes::from(private.as_bytes().to_vec()));
    host::run(host, Step::Install, ctx.cmds.install_host_key(true), private, ctx.quick).await?;
    let public_line = Some(Bytes::from(format!("{public}\n")));
    host::run(host, Step::Install, ctx.cmds.install_host_key(false), public_line, ctx.quick).await?;
    Ok(public)
}

/// Upload for installs: the tree and files (the secrets go into /mnt later, see [`write_secrets`]).
async fn upload_tree_only<H: Host, P: Progress>(host: &H, ctx: &JobRun<'_, P>) -> Result<()> {
    let src = ctx.job.source.as_ref().ok_or_else(|| Error::InvalidJob("no source".into()))?;
    let tree = ctx.sources.tree(&src.repo, &src.commit, src.credentials.as_deref()).await?;
    let extra = crate::update::extra_files(host, ctx).await?;
    let digest = source::digest(&src.commit, &extra);
    let tar = source::stream(Some(&tree), src.subdir.as_deref(), &extra, &digest, &[])?;
    let dir = ctx.cmds.src_dir(&src.commit);
    host::run(host, Step::Upload, ctx.cmds.mkdir(&dir), None, ctx.quick).await?;
    let size = tar.len();
    host::run(host, Step::Upload, ctx.cmds.extract_source(&dir), Some(Bytes::from(tar)), ctx.long).await?;
    ctx.progress.step(Step::Upload, format!("uploaded {size} bytes of source at {}", &src.commit)).await;
    Ok(())
}
