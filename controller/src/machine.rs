//! Machine reconcile: validation, and probe/scan scheduling that keeps `discoverable`, `currentSystem`,
//! drift and hardware facts fresh.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::controller::Action;
use nio_shared::crd::{Machine, MachinePhase, MachineStatus};
use nio_shared::protocol::Action as JobAction;
use tracing::Instrument;

use crate::conditions::{self, Type};
use crate::context::{Ctx, update_machine_status};
use crate::error::{Error, Result};
use crate::metrics::{ErrorLabels, KindLabel};

/// This machine's probe interval: `base` with a ±10 % jitter of its own (from its uid), so a fleet's probes
/// spread out and every decision about the machine sees the same interval.
fn interval_of(m: &Machine, base: Duration) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    m.metadata.uid.hash(&mut h);
    let f = 0.9 + 0.2 * (h.finish() % 10_000) as f64 / 10_000.0;
    base.mul_f64(f)
}

/// Whether this machine is due for a probe at `now`: never probed, or probed an interval ago, and not busy
/// with a job (a job reports what a probe would).
fn probe_due(m: &Machine, base: Duration, now: chrono::DateTime<chrono::Utc>) -> bool {
    let status = m.status.as_ref();
    let busy = matches!(
        status.and_then(|s| s.phase),
        Some(MachinePhase::Queued | MachinePhase::Waiting | MachinePhase::Applying)
    );
    // `lastProbeTime` is stored to the second (metav1.Time): the probe went out up to a second after it.
    let since = status
        .and_then(|s| s.last_probe_time.as_ref())
        .map(|t| (now - conditions::chrono_of(&t.0) - chrono::TimeDelta::seconds(1)).to_std().unwrap_or_default());
    !busy && since.is_none_or(|s| s >= interval_of(m, base))
}

/// Whether a reconcile of `m` would do anything now, decided from the object alone: its spec became invalid
/// (or the message changed) or valid again, a generation not yet observed, or a probe due. Every other change
/// (the status writes of a rollout, three or more per machine) is not worth a reconcile, and nothing is
/// requeued: [`probe_sweep`] brings machines back when their probe falls due.
pub fn wants_reconcile(m: &Machine, base: Duration) -> bool {
    let status = m.status.as_ref();
    let invalid = status.and_then(|s| conditions::message(&s.conditions, Type::Invalid));
    match nio_shared::validate::machine_spec(&m.spec) {
        Err(e) => invalid != Some(e.to_string().as_str()),
        Ok(()) => {
            status.is_some_and(|s| conditions::is_true(&s.conditions, Type::Invalid))
                || status.and_then(|s| s.observed_generation) != m.metadata.generation
                || retry_requested(m).is_some()
                || probe_due(m, base, chrono::Utc::now())
        }
    }
}

/// The `nixos.infra/retry` annotation's value when it asks for a retry not yet handled.
fn retry_requested(m: &Machine) -> Option<&str> {
    let asked = m.annotations().get(nio_shared::crd::RETRY_ANNOTATION).map(String::as_str).filter(|v| !v.is_empty())?;
    let handled = m.status.as_ref().and_then(|s| s.last_handled_retry.as_deref());
    (handled != Some(asked)).then_some(asked)
}

/// How long (at most; never longer than the probe interval) the sweep leaves a machine it sent alone: while its
/// probe fails (NATS or the API server away), the
/// reconcile's own retry paces it, not every tick of the sweep.
const SWEEP_RETRY: Duration = Duration::from_secs(30);

/// Sends every valid machine of `store` whose probe is due into `due` (the Machine controller's trigger), every
/// `tick`, until `stop`. A scan of the cache, no API request; what the controller keeps between probes is only
/// the machines sent in the last `SWEEP_RETRY` (a requeue per machine held a timer entry for every one).
pub async fn probe_sweep(
    store: kube::runtime::reflector::Store<Machine>,
    due: tokio::sync::mpsc::Sender<Machine>,
    base: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let tick = (base / 20).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut timer = tokio::time::interval(tick);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (by the uid's hash: a copy of each uid cost more than the rest of the entry)
    let mut sent: std::collections::HashMap<u64, Instant> = std::collections::HashMap::new();
    let retry = base.min(SWEEP_RETRY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = timer.tick() => {}
        }
        let now = chrono::Utc::now();
        sent.retain(|_, at| at.elapsed() < retry);
        for m in store.state() {
            let uid = crate::hash_of(m.metadata.uid.as_deref().unwrap_or_default());
            if sent.contains_key(&uid)
                || nio_shared::validate::machine_spec(&m.spec).is_err()
                || !probe_due(&m, base, now)
            {
                continue;
            }
            if due.send((*m).clone()).await.is_err() {
                return;
            }
            sent.insert(uid, Instant::now());
        }
    }
}

pub async fn reconcile(m: Arc<Machine>, ctx: Arc<Ctx>) -> Result<Action> {
    let start = Instant::now();
    let span = tracing::info_span!("reconcile", otel.kind = "internal", nio.kind = "Machine", k8s.resource.name = %m.name_any(), nio.cluster = %ctx.cluster);
    let r = run(&m, &ctx).instrument(span).await;
    ctx.metrics
        .reconcile_duration
        .get_or_create(&KindLabel { kind: "Machine".into() })
        .observe(start.elapsed().as_secs_f64());
    r
}

async fn run(m: &Machine, ctx: &Ctx) -> Result<Action> {
    let ns = m.namespace().unwrap_or_default();
    let name = m.name_any();
    let generation = m.metadata.generation;
    if let Err(invalid) = nio_shared::validate::machine_spec(&m.spec) {
        let msg = invalid.to_string();
        let known =
            m.status.as_ref().and_then(|s| conditions::message(&s.conditions, Type::Invalid).map(str::to_string));
        if known.as_deref() != Some(msg.as_str()) {
            ctx.event(m, true, "InvalidSpec", msg.clone(), "Validate").await;
            update_machine_status(ctx, &ns, &name, Some(m), |m| {
                let mut s = m.status.clone().unwrap_or_default();
                conditions::set(&mut s.conditions, Type::Invalid, true, "InvalidSpec", &msg, generation);
                s.observed_generation = generation;
                Some(s)
            })
            .await?;
        }
        return Ok(Action::await_change());
    }
    let status = m.status.as_ref();
    let was_invalid = status.is_some_and(|s| conditions::is_true(&s.conditions, Type::Invalid));
    let probe = probe_due(m, ctx.probe_interval, chrono::Utc::now());
    if probe {
        let action =
            if status.and_then(|s| s.hardware_facts.as_ref()).is_none() { JobAction::Scan } else { JobAction::Probe };
        let job = crate::publish::probe_job(&ctx.cluster, m, action);
        ctx.publisher.publish(&job).await?;
    }
    // A spec changed since it was last observed (an address, port, site or host key corrected): a job still
    // queued carries the old one, so it is withdrawn, and a job that failed is tried again; the configuration
    // queues the machine again from the new spec.
    let changed = spec_changed(status, generation);
    // Withdrawn unless a run is known to have started: this copy can be behind this process's own Queued mark
    // (a configuration's write waiting its turn), which the write below then withdraws (deciding on this copy
    // left such a job on the old site's queue, marked withdrawn).
    let withdrawn = match changed && status.and_then(|s| s.phase) != Some(MachinePhase::Applying) {
        true => ctx.publisher.withdraw(&ctx.cluster, &ns, &name).await?,
        false => 0,
    };
    let retry = retry_requested(m).map(str::to_string);
    // What the retry found, as written: the failed target forgotten, else the phase it found.
    let retry_found: std::sync::Mutex<Option<Result<String, String>>> = std::sync::Mutex::new(None);
    // One write records the probe, a spec that became valid, the generation now observed (a new Machine's
    // first write is its first probe's) and a retry.
    if probe || was_invalid || retry.is_some() || status.and_then(|s| s.observed_generation) != generation {
        update_machine_status(ctx, &ns, &name, Some(m), |m| {
            let mut s = m.status.clone().unwrap_or_default();
            // Decided on the copy written to (this closure runs again on a newer one after a conflict): a retry
            // that copy already handled is not handled twice.
            let found = retry.as_deref().filter(|asked| s.last_handled_retry.as_deref() != Some(*asked)).map(|asked| {
                s.last_handled_retry = Some(asked.into());
                forget_failure(&mut s).ok_or_else(|| s.phase.map_or("new", MachinePhase::as_str).to_string())
            });
            if let Ok(mut f) = retry_found.lock() {
                *f = found;
            }
            if changed {
                s = retried(s);
            }
            if was_invalid {
                conditions::set(&mut s.conditions, Type::Invalid, false, "Valid", "", generation);
            }
            if probe {
                s.last_probe_time = Some(conditions::time(chrono::Utc::now()));
            }
            s.observed_generation = generation;
            Some(s)
        })
        .await?;
    }
    if withdrawn > 0 {
        let note = "the spec changed while a job waited: it was withdrawn and is queued again with the new spec";
        ctx.event(m, false, "JobWithdrawn", note.to_string(), "Validate").await;
    }
    let found = retry_found.lock().ok().and_then(|mut f| f.take());
    if let (Some(asked), Some(found)) = (retry, found) {
        let annotation = nio_shared::crd::RETRY_ANNOTATION;
        let (reason, note) = match found {
            Ok(target) => (
                "RetryRequested",
                format!("{annotation}={asked}: the failed target {target} is tried again, within its rollout's limits"),
            ),
            Err(phase) => ("NothingToRetry", format!("{annotation}={asked}: the machine is {phase}, not Failed")),
        };
        ctx.event(m, false, reason, note, "Retry").await;
    }
    Ok(Action::await_change())
}

/// Whether the spec changed since this controller last looked at the Machine. A new Machine's status starts as
/// `{observedGeneration: 0}` (the CRD's default): not looked at yet, so nothing it was queued for is stale (read
/// as a change, it withdrew the first job of every machine a configuration queued before this controller's first
/// look, and queued it again).
fn spec_changed(status: Option<&MachineStatus>, generation: Option<i64>) -> bool {
    status.and_then(|s| s.observed_generation).is_some_and(|g| g > 0 && Some(g) != generation)
}

/// `s` after the Machine's spec changed: a job still queued is withdrawn, and a target that failed is tried
/// again (the failure may have been the old spec's: an unreachable address, a wrong port).
fn retried(s: MachineStatus) -> MachineStatus {
    if let Some(w) = crate::reconcile::withdrawn(Some(&s)) {
        return w;
    }
    let mut s = s;
    forget_failure(&mut s);
    s
}

/// Makes a failed machine's target one to apply again (its failed job's id set aside, so the new job gets an id
/// of its own past the queue's duplicate window); the target forgotten, or None when the machine had not failed.
fn forget_failure(s: &mut MachineStatus) -> Option<String> {
    if s.phase != Some(MachinePhase::Failed) {
        return None;
    }
    let target = s.failed_target.take()?;
    s.superseded_job_id = s.last_job_id.clone();
    Some(target)
}

pub fn error_policy(m: Arc<Machine>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels { kind: "Machine".into(), category: err.category().into() })
        .inc();
    tracing::warn!(machine = %m.name_any(), error = %err, "machine reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine queued before the controller's first look (status still the CRD's default) keeps its job; one
    /// whose spec changed after a look is withdrawn.
    #[test]
    fn a_new_machine_queued_before_its_first_look_keeps_its_job() {
        let queued = |observed| MachineStatus {
            phase: Some(MachinePhase::Queued),
            queued_target: Some("c1/abc".into()),
            last_job_id: Some("job-1".into()),
            observed_generation: observed,
            ..Default::default()
        };
        assert!(!spec_changed(Some(&queued(Some(0))), Some(1)));
        assert!(!spec_changed(Some(&queued(None)), Some(1)));
        assert!(!spec_changed(None, Some(1)));
        assert!(!spec_changed(Some(&queued(Some(2))), Some(2)));
        assert!(spec_changed(Some(&queued(Some(1))), Some(2)));
    }

    /// A retry is asked for by a new, non-empty annotation value, and wakes the Machine controller (whose
    /// filter passes only changes it has work for); it forgets a failed target only.
    #[test]
    fn a_retry_is_a_new_annotation_value_and_forgets_only_a_failure() {
        let spec: nio_shared::crd::MachineSpec =
            serde_json::from_value(serde_json::json!({"hostname": "m1"})).expect("spec");
        let failed = MachineStatus {
            phase: Some(MachinePhase::Failed),
            failed_target: Some("c1/abc".into()),
            last_job_id: Some("job-1".into()),
            observed_generation: Some(1),
            last_probe_time: Some(conditions::time(chrono::Utc::now())),
            ..Default::default()
        };
        let machine = |value: Option<&str>, handled: Option<&str>| {
            let mut m = Machine::new("m1", spec.clone());
            m.metadata.generation = Some(1);
            if let Some(v) = value {
                m.metadata.annotations = Some([(nio_shared::crd::RETRY_ANNOTATION.to_string(), v.to_string())].into());
            }
            m.status = Some(MachineStatus { last_handled_retry: handled.map(Into::into), ..failed.clone() });
            m
        };
        let base = Duration::from_secs(600);
        for (value, handled, asked) in
            [(None, None, None), (Some(""), None, None), (Some("1"), None, Some("1")), (Some("1"), Some("1"), None)]
        {
            let m = machine(value, handled);
            assert_eq!(retry_requested(&m), asked, "{value:?} after {handled:?}");
            assert_eq!(wants_reconcile(&m, base), asked.is_some(), "{value:?} after {handled:?}");
        }
        let mut s = failed.clone();
        assert_eq!(forget_failure(&mut s).as_deref(), Some("c1/abc"));
        assert_eq!((s.failed_target, s.superseded_job_id.as_deref()), (None, Some("job-1")));
        let mut applied = MachineStatus { phase: Some(MachinePhase::Applied), ..failed };
        assert_eq!(forget_failure(&mut applied), None);
        assert_eq!(applied.failed_target.as_deref(), Some("c1/abc"), "left alone");
    }

    /// The controller caches every Machine behind an `Arc` (two counters, 16 bytes, ahead of it). jemalloc's size
    /// classes go 1024, 1280: a Machine over 1008 bytes costs 1280 per cached copy, 2.5 MB more at 10,000 Machines,
    /// where the controller's memory goal (≤ 64 MiB) is measured; a new status field of 24 bytes did exactly that
    /// (controller-bench on the real apiserver, 65.4–66.1 → 70.0 / 71.5 MB). Box a rarely set field, or make room.
    #[test]
    fn a_cached_machine_fits_a_kibibyte() {
        let arc_inner = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<Machine>();
        assert!(arc_inner <= 1024, "a cached Machine takes {arc_inner} bytes");
    }

    /// A probe at 10.9 s is stored as 10 s: the next is not due before a whole interval after 10.9 s.
    #[test]
    fn a_probe_time_cut_to_the_second_never_makes_the_next_probe_early() {
        let base = Duration::from_secs(3);
        let spec = serde_json::from_value(serde_json::json!({"hostname": "m1"})).expect("spec");
        let mut m = Machine::new("m1", spec);
        m.metadata.uid = Some("uid-1".into());
        let sent = chrono::DateTime::from_timestamp_millis(10_900).expect("time");
        let stored = chrono::DateTime::from_timestamp(10, 0).expect("time");
        m.status = Some(nio_shared::crd::MachineStatus {
            last_probe_time: Some(conditions::time(stored)),
            ..Default::default()
        });
        let interval = chrono::TimeDelta::from_std(interval_of(&m, base)).expect("interval");
        assert!(!probe_due(&m, base, sent + interval - chrono::TimeDelta::milliseconds(50)));
        assert!(probe_due(&m, base, sent + interval + chrono::TimeDelta::milliseconds(150)));
    }
}
