//! Updates (switch, boot, test, dry-activate, remove) the way deploy-rs and colmena do them, without
//! nixos-rebuild on the machine (docs/remote-protocol.md). Three exec channels for a switch:
//!
//! 1. state: version, current/booted system, boot id, applied marker, upload marker, uid and sudo, and a
//!    previous attempt of this job ([`nio_shared::remote::STATE_SCRIPT`]);
//! 2. on the same connection, upload + build + profile + the activation unit, detached under `systemd-run`
//!    with the on-host dead-man's switch ([`nio_shared::remote::ACTIVATE_SCRIPT`]);
//! 3. over a **new** connection (the proof that SSH still works), the health check and the confirmation
//!    ([`nio_shared::remote::CONFIRM_SCRIPT`]). Without it the machine rolls itself back. With autoRollback off
//!    there is nothing to confirm and the health check runs on the first connection.
//!
//! A job redelivered while its activation runs (or after it finished) finds the previous attempt by its unit
//! name and reports its result instead of running it twice.

use std::time::Duration;

use bytes::Bytes;
use nio_shared::protocol::{Action, FailureCategory, FileContent, SecretFile, Step};
use nio_shared::remote::{Activation, ActivationResult, Attempt, Commands, Confirmation, MachineState, Records};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::actions::{Connector, JobRun, Outcome, Progress};
use crate::error::{Error, Result};
use crate::host::{self, Host};
use crate::source;

/// Extra time past the machine's confirmation window before the executor stops trying to reach it.
const CONFIRM_GRACE: Duration = Duration::from_secs(30);

/// Reads the machine's state ([`Commands::state`]) for the job's unit and source directory.
pub async fn read_state<H: Host, P: Progress>(
    host: &H,
    ctx: &JobRun<'_, P>,
    src_dir: &str,
    unit: &str,
) -> Result<MachineState> {
    let out = host::run(host, Step::Probe, ctx.cmds.state(src_dir, unit), None, ctx.quick).await?;
    MachineState::parse(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| {
        Error::command(Step::Probe, "sh", "printed an incomplete state report", FailureCategory::CommandFailed)
            .with_tail(out.tail())
    })
}

/// The full identity of what a job applies: the applied marker holds it, so a change of any part applies
/// again (commit and files via the upload digest, flake attribute, subdirectory, action, secrets).
pub fn identity(job: &nio_shared::protocol::Job, upload_digest: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        "nio-target-v2",
        upload_digest,
        job.source.as_ref().map_or("", |s| s.flake_attr.as_str()),
        job.source.as_ref().and_then(|s| s.subdir.as_deref()).unwrap_or(""),
        job.action.as_str(),
        job.secrets_hash.as_deref().unwrap_or(""),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

fn failed(step: Step, program: &str, how: impl Into<String>, category: FailureCategory, log: &[String]) -> Error {
    Error::command(step, program, how, category).with_tail(nio_shared::protocol::log_tail(&log.join("\n")))
}

/// Runs an update job.
pub async fn update<C: Connector, P: Progress>(conn: &C, host: &C::Host, ctx: &JobRun<'_, P>) -> Result<Outcome> {
    let job = ctx.job;
    let src = job.source.as_ref().ok_or_else(|| Error::InvalidJob("no source".into()))?;
    let unit = Commands::unit(job.id.as_str());
    let src_dir = ctx.cmds.src_dir(&src.commit);
    let st = read_state(host, ctx, &src_dir, &unit).await?;
    if let Err(why) = &st.privileged {
        let how = format!(
            "`sudo -n` refused ({}); grant {} passwordless sudo (docs/remote-protocol.md)",
            why.trim(),
            job.endpoint.user
        );
        return Err(Error::command(Step::Connect, "sudo", how, FailureCategory::PermissionDenied));
    }
    // An earlier delivery of this job activated, or is still uploading or building: take over its result.
    if let Some(a) = st.attempt.as_ref().filter(|a| a.boot_id.is_some() || a.running) {
        if !ctx.reused {
            return resume(host, ctx, &st, a, &unit).await;
        }
        // A kept connection predates that activation: confirm over one opened now, as a confirmation must.
        let fresh = conn.connect(ctx.host_key).await?;
        let out = resume(&fresh, ctx, &st, a, &unit).await;
        conn.keep(fresh);
        return out;
    }
    // A removal switches to the onRemoveFlake system.
    let action = if job.action == Action::Remove { Action::Switch } else { job.action };
    let extra = extra_files(host, ctx).await?;
    let digest = source::digest(&src.commit, &extra);
    let id = identity(job, &digest);
    if let Some(skipped) = already_applied(ctx, &st, &id) {
        return Ok(skipped);
    }
    let stream = upload_stream(ctx, &st, &extra, &digest).await?;
    let installable = ctx.cmds.toplevel(&src.commit, src.subdir.as_deref(), &src.flake_attr);
    let what =
        if st.upload.as_deref() != Some(digest.as_str()) { "uploading the source, building" } else { "building" };
    ctx.progress.step(Step::Build, format!("{what} {installable} and activating ({})", action.as_str())).await;
    let activation = Activation {
        unit: &unit,
        src_dir: &src_dir,
        upload: stream.is_some(),
        installable: &installable,
        action: action.as_str(),
        rollback: job.rollback,
        confirm_seconds: job.confirm_timeout_seconds,
        // A hung activation is stopped on the machine too (the executor reports the timeout first).
        limit_seconds: ctx.long.as_secs().max(1),
    };
    let argv = Commands::privileged(&job.endpoint.user, ctx.cmds.activate(&activation));
    let ran = host
        .exec(&argv, stream.map(Bytes::from), ctx.long)
        .instrument(tracing::info_span!("activate", nio.action = action.as_str()))
        .await;
    let out = match ran {
        // No exit status: the session ended under the command (keepalives unanswered).
        Ok(out) if out.status.is_none() && out.signal.is_none() => {
            ctx.progress.step(Step::Activate, "lost the machine during activation; reconnecting".into()).await;
            return confirm(conn, ctx, &st, &unit, Some(id.as_str()), None, Started::Maybe).await;
        }
        Ok(out) => out,
        Err(Error::Timeout { after, .. }) => {
            return Err(Error::Timeout { step: hung_step(conn, ctx, &src_dir, &unit).await, after });
        }
        // The connection dropped: the activation may be running on the machine (a network-cutting
        // configuration does exactly this). Find out over a new connection.
        Err(e) if e.is_transient() => {
            ctx.progress.step(Step::Activate, format!("lost the machine during activation ({e}); reconnecting")).await;
            return confirm(conn, ctx, &st, &unit, Some(id.as_str()), None, Started::Maybe).await;
        }
        Err(e) => return Err(e),
    };
    let rec = Records::parse(&String::from_utf8_lossy(&out.stdout));
    let mut log = rec.log.clone();
    log.extend(String::from_utf8_lossy(&out.stderr).lines().map(str::to_string));
    if let Some(what) = rec.get("failed") {
        return Err(activation_failure(what, &log, &installable));
    }
    if !out.success() {
        let how = format!("exited with status {:?}", out.status);
        return Err(failed(Step::Activate, "sh", how, FailureCategory::CommandFailed, &log));
    }
    let toplevel = rec.get("toplevel").map(str::to_string);
    match rec.get("result").and_then(ActivationResult::parse) {
        // Rollback off: nothing to confirm, so the health check runs on this connection (a second handshake
        // per job proves nothing the machine would act on).
        Some(ActivationResult::Done) if matches!(action, Action::Switch | Action::Test) => {
            let marker = Some(id.as_str()).filter(|_| job.action == Action::Switch);
            run_confirm(host, ctx, &st, &unit, marker, toplevel, Started::Yes).await
        }
        // Settled: boot, dry-activate, or failed and rolled back already.
        Some(result) => finish(ctx, &st, result, toplevel, None, &log),
        // Waiting for the confirmation.
        None => confirm(conn, ctx, &st, &unit, Some(id.as_str()), toplevel, Started::Yes).await,
    }
}

/// The Skipped outcome when a switch finds its target (identity and system) already applied.
fn already_applied<P: Progress>(ctx: &JobRun<'_, P>, st: &MachineState, id: &str) -> Option<Outcome> {
    let job = ctx.job;
    let applied = st.applied.as_deref()?;
    let current = st.current_system.as_deref()?;
    // ... and still the boot default: a boot job since then made the next boot another system, so switching to
    // this target again must set the profile back (before: skipped, and the next reboot ran the other system)
    let boots_it = st.profile_system.as_deref().is_none_or(|p| p == current);
    if job.action != Action::Switch || applied != format!("{id} {current}") || !boots_it {
        return None;
    }
    Some(Outcome {
        skipped: true,
        commit: job.source.as_ref().map(|s| s.commit.clone()),
        system: st.current_system.clone(),
        booted_system: st.booted_system.clone(),
        boot_id: st.boot_id.clone(),
        nixos_version: st.version.clone(),
        message: "already running this target".into(),
        ..Default::default()
    })
}

/// What the activation command reads on stdin: the tree when the machine lacks this upload, and the secrets;
/// None when there is neither.
async fn upload_stream<P: Progress>(
    ctx: &JobRun<'_, P>,
    st: &MachineState,
    extra: &[(String, Vec<u8>)],
    digest: &str,
) -> Result<Option<Vec<u8>>> {
    let src = ctx.job.source.as_ref().ok_or_else(|| Error::InvalidJob("no source".into()))?;
    let send_source = st.upload.as_deref() != Some(digest);
    let secrets = unseal(ctx)?;
    if !send_source && secrets.is_empty() {
        return Ok(None);
    }
    let tree = if send_source {
        Some(ctx.sources.tree(&src.repo, &src.commit, src.credentials.as_deref()).await?)
    } else {
        None
    };
    source::stream(tree.as_deref().map(Vec::as_slice), src.subdir.as_deref(), extra, digest, &secrets).map(Some)
}

/// After the build-and-activate command ran out of time: whether the activation had begun (its unit exists)
/// or the build hung, asked over a new connection.
async fn hung_step<C: Connector, P: Progress>(conn: &C, ctx: &JobRun<'_, P>, src_dir: &str, unit: &str) -> Step {
    match conn.connect(ctx.host_key).await {
        Ok(h) => match read_state(&h, ctx, src_dir, unit).await {
            Ok(now) if now.attempt.as_ref().is_some_and(|a| a.boot_id.is_some()) => Step::Activate,
            _ => Step::Build,
        },
        Err(_) => Step::Build,
    }
}

/// A previous attempt of this job is on the machine: report its result (waiting for it when it still runs),
/// never run it twice. This connection was opened after that activation, so it confirms like a new one.
async fn resume<H: Host, P: Progress>(
    host: &H,
    ctx: &JobRun<'_, P>,
    st: &MachineState,
    a: &Attempt,
    unit: &str,
) -> Result<Outcome> {
    if a.boot_id.is_some() && a.boot_id != st.boot_id && a.result.is_none() {
        let how = format!(
            "the machine rebooted while this job's activation ran (boot id changed); it now runs {}",
            st.current_system.as_deref().unwrap_or("an unknown system")
        );
        return Err(Error::command(Step::Activate, "switch-to-configuration", how, FailureCategory::ActivationFailed));
    }
    let (started, what) = match a.boot_id {
        Some(_) => (Started::Yes, "this job's activation already ran on the machine: taking over its result"),
        None => (Started::Maybe, "an earlier delivery of this job is still building on the machine: waiting for it"),
    };
    ctx.progress.step(Step::Activate, what.into()).await;
    let id = match &ctx.job.source {
        Some(src) if ctx.job.action == Action::Switch => {
            Some(identity(ctx.job, &source::digest(&src.commit, &extra_files(host, ctx).await?)))
        }
        _ => None,
    };
    run_confirm(host, ctx, st, unit, id.as_deref(), a.toplevel.clone(), started).await
}

/// Whether a job's confirmation runs the health check: only where the new system now runs (switch, test). A
/// boot job changed only the boot default and dry-activate nothing, so their check would judge the old system
/// (a redelivered one took over its result through the confirmation, and failed on an unrelated failed unit);
/// a removal switches to the onRemoveFlake system, whose health is not the configuration's concern.
fn checks_health(action: Action, enabled: bool) -> bool {
    enabled && matches!(action, Action::Switch | Action::Test)
}

/// Whether the activation had started when the confirmation begins: if it may not have (the first connection
/// was lost, or an earlier delivery is still running), the confirmation also waits out the build.
#[derive(Clone, Copy, PartialEq)]
enum Started {
    Yes,
    Maybe,
}

/// Confirms over a new connection, retrying while the machine cannot be reached (a configuration that cuts
/// the network or breaks logins): the machine rolls itself back meanwhile, and the result says so.
async fn confirm<C: Connector, P: Progress>(
    conn: &C,
    ctx: &JobRun<'_, P>,
    st: &MachineState,
    unit: &str,
    identity: Option<&str>,
    toplevel: Option<String>,
    started: Started,
) -> Result<Outcome> {
    let job = ctx.job;
    let window = Duration::from_secs(u64::from(job.confirm_timeout_seconds));
    let deadline = tokio::time::Instant::now() + window + CONFIRM_GRACE;
    let marker = identity.filter(|_| job.action == Action::Switch);
    let mut last: String;
    loop {
        match conn.connect(ctx.host_key).await {
            Ok(h) => {
                let out = run_confirm(&h, ctx, st, unit, marker, toplevel, started).await;
                conn.keep(h);
                return out;
            }
            Err(e @ (Error::HostKeyMismatch { .. } | Error::HostKeyNotPinned | Error::Identity(_))) => return Err(e),
            Err(e) => last = e.to_string(),
        }
        if tokio::time::Instant::now() >= deadline {
            let how = format!(
                "no new SSH connection after the activation within {:?} ({last}); the machine was to roll itself back after {}s",
                window + CONFIRM_GRACE,
                job.confirm_timeout_seconds
            );
            return Err(Error::command(Step::Health, "ssh", how, FailureCategory::Unreachable));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn run_confirm<H: Host, P: Progress>(
    host: &H,
    ctx: &JobRun<'_, P>,
    st: &MachineState,
    unit: &str,
    identity: Option<&str>,
    toplevel: Option<String>,
    started: Started,
) -> Result<Outcome> {
    let job = ctx.job;
    let hc = job.health_check.clone().unwrap_or_default();
    let c = Confirmation {
        unit,
        marker: identity,
        health: checks_health(job.action, hc.enabled),
        health_timeout: hc.timeout_seconds,
        allowed_units: &hc.allowed_failed_units,
        command: &hc.command,
    };
    ctx.progress.step(Step::Health, "health check and confirmation over a new SSH connection".into()).await;
    let mut window = Duration::from_secs(u64::from(job.confirm_timeout_seconds) + u64::from(hc.timeout_seconds));
    if started == Started::Maybe {
        window += ctx.long;
    }
    let argv = Commands::privileged(&job.endpoint.user, ctx.cmds.confirm(&c));
    // Its failures are records on stdout (with exit status 3): read before the status, which says less.
    let out = host::output(host, Step::Health, &argv, None, window + CONFIRM_GRACE)
        .instrument(tracing::info_span!("health"))
        .await?;
    let rec = Records::parse(&String::from_utf8_lossy(&out.stdout));
    if let Some(what) = rec.get("failed") {
        let how = match what {
            "rebooted" => "the machine rebooted before the activation settled",
            "died" => "the activation unit died before it settled",
            // activate.sh ended before the activation without saying why (killed): nothing was activated
            "interrupted" => {
                return Err(Error::Unreachable(
                    "the connection was lost before the activation started, and the job's run on the machine ended \
                     without a result; nothing was activated"
                        .into(),
                ));
            }
            // activate.sh failed (build, upload, ...) while nobody read its output: as if it had been read
            other => {
                let installable = job
                    .source
                    .as_ref()
                    .map(|s| ctx.cmds.toplevel(&s.commit, s.subdir.as_deref(), &s.flake_attr))
                    .unwrap_or_default();
                return Err(activation_failure(other, &rec.log, &installable));
            }
        };
        return Err(failed(
            Step::Activate,
            "switch-to-configuration",
            how,
            FailureCategory::ActivationFailed,
            &rec.log,
        ));
    }
    if !out.success() && rec.get("result").is_none() {
        return Err(host::exit_error(Step::Health, &argv, &out));
    }
    let result = rec
        .get("result")
        .and_then(ActivationResult::parse)
        .ok_or_else(|| failed(Step::Health, "sh", "reported no result", FailureCategory::CommandFailed, &rec.log))?;
    let system = rec.get("system").map(str::to_string).filter(|s| !s.is_empty()).or(toplevel);
    let health = rec.get("health").unwrap_or("skipped").to_string();
    finish(ctx, st, result, system, Some(health), &rec.log)
}

/// Turns the machine's result into the job's outcome.
fn finish<P: Progress>(
    ctx: &JobRun<'_, P>,
    st: &MachineState,
    result: ActivationResult,
    system: Option<String>,
    health: Option<String>,
    log: &[String],
) -> Result<Outcome> {
    let job = ctx.job;
    let src = job.source.as_ref();
    let action = if job.action == Action::Remove { Action::Switch } else { job.action };
    let tail = nio_shared::protocol::log_tail(&log.join("\n"));
    match result {
        ActivationResult::Confirmed | ActivationResult::Done => {
            if let Some(h) = health.as_deref().filter(|h| h.starts_with("failed")) {
                let how = format!("found the machine unhealthy ({h}); autoRollback is off, the new system stays");
                return Err(failed(Step::Health, "health check", how, FailureCategory::HealthCheckFailed, log));
            }
            let (system, message) = match action {
                Action::Switch | Action::Test => {
                    (system, format!("{} confirmed over a new SSH connection", action.as_str()))
                }
                Action::Boot => (
                    st.current_system.clone(),
                    "the new system is the boot default; it runs after the next reboot".to_string(),
                ),
                _ => (st.current_system.clone(), "dry-activate: nothing changed".to_string()),
            };
            Ok(Outcome {
                // Only what runs now counts as applied: boot and dry-activate leave the running system as it was.
                commit: matches!(action, Action::Switch | Action::Test)
                    .then(|| src.map(|s| s.commit.clone()))
                    .flatten(),
                system,
                booted_system: st.booted_system.clone(),
                boot_id: st.boot_id.clone(),
                nixos_version: st.version.clone(),
                message,
                log_tail: tail,
                ..Default::default()
            })
        }
        ActivationResult::RolledBack(why) => {
            let category = if why.starts_with("health check") {
                FailureCategory::HealthCheckFailed
            } else {
                FailureCategory::ActivationFailed
            };
            Ok(Outcome {
                rolled_back: Some(category),
                system: st.current_system.clone(),
                booted_system: st.booted_system.clone(),
                boot_id: st.boot_id.clone(),
                nixos_version: st.version.clone(),
                message: format!("{why}; the machine rolled itself back to what ran before"),
                log_tail: tail,
                ..Default::default()
            })
        }
        ActivationResult::RollbackFailed(why) => Err(failed(
            Step::Rollback,
            "switch-to-configuration",
            format!("{why}, and the rollback failed: the machine needs attention"),
            FailureCategory::ActivationFailed,
            log,
        )),
        ActivationResult::Failed(why) => {
            Err(failed(Step::Activate, "switch-to-configuration", why, FailureCategory::ActivationFailed, log))
        }
    }
}

fn activation_failure(what: &str, log: &[String], installable: &str) -> Error {
    match what {
        "build" => failed(
            Step::Build,
            "nix build",
            format!("could not build {installable}"),
            FailureCategory::BuildFailed,
            log,
        ),
        "lockfile" => failed(
            Step::Build,
            "nix build",
            "the flake's lock file is missing or out of date (NIO builds with --no-update-lock-file: commit flake.lock)",
            FailureCategory::SourceInvalid,
            log,
        ),
        "upload" => failed(Step::Upload, "tar", "could not unpack the upload", FailureCategory::CommandFailed, log),
        "unit" => failed(
            Step::Activate,
            "systemd-run",
            "refused to start the activation unit",
            FailureCategory::CommandFailed,
            log,
        ),
        "busy" => failed(
            Step::Upload,
            "sh",
            "an earlier run of this job is still going on the machine",
            FailureCategory::CommandFailed,
            log,
        ),
        "died" => failed(
            Step::Activate,
            "switch-to-configuration",
            "the activation unit died",
            FailureCategory::ActivationFailed,
            log,
        ),
        other => failed(Step::Activate, "sh", format!("failed ({other})"), FailureCategory::CommandFailed, log),
    }
}

/// The job's additional files: inline content, or nixos-facter's report (the built-in fact script where
/// nixos-facter is missing).
pub(crate) async fn extra_files<H: Host, P: Progress>(host: &H, ctx: &JobRun<'_, P>) -> Result<Vec<(String, Vec<u8>)>> {
    let mut extra = Vec::new();
    for f in &ctx.job.files {
        match &f.content {
            FileContent::Inline { content } => extra.push((f.path.clone(), content.as_bytes().to_vec())),
            FileContent::NixosFacter => {
                let out = host.exec(&ctx.cmds.facter(), None, ctx.long).await?;
                let report = if out.success() {
                    out.stdout
                } else {
                    host::run(host, Step::Scan, ctx.cmds.fact_script(), None, ctx.quick).await?.stdout
                };
                extra.push((f.path.clone(), report));
            }
        }
    }
    Ok(extra)
}

/// The job's secrets, unsealed.
fn unseal<P: Progress>(ctx: &JobRun<'_, P>) -> Result<Vec<source::Secret>> {
    let job = ctx.job;
    if job.secrets.is_empty() {
        return Ok(Vec::new());
    }
    let key = ctx
        .seal
        .ok_or_else(|| Error::InvalidJob("job carries secrets but this executor has no --seal-key-file".into()))?;
    job.secrets
        .iter()
        .map(|s| {
            let context = SecretFile::seal_context(&job.cluster, &job.namespace, &job.machine, &s.path);
            let content =
                key.unseal(&s.sealed, &context).map_err(|e| Error::InvalidJob(format!("secret {}: {e}", s.path)))?;
            Ok(source::Secret {
                path: s.path.clone(),
                content,
                mode: s.file_mode(),
                owner: s.owner.clone(),
                group: s.group.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The health check judges the system a job made run: never the old one a boot, dry-activate or removal
    /// leaves running, also when a redelivered job takes their result over through the confirmation.
    #[test]
    fn only_switch_and_test_run_the_health_check() {
        let checked: Vec<Action> = [Action::Switch, Action::Boot, Action::Test, Action::DryActivate, Action::Remove]
            .into_iter()
            .filter(|a| checks_health(*a, true))
            .collect();
        assert_eq!(checked, [Action::Switch, Action::Test]);
        assert!(!checks_health(Action::Switch, false), "a configuration that turned it off");
    }
}
