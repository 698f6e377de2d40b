//! Applying executor status events to Machine status: a pure transition (ordered, idempotent, never moving
//! state backwards) and the consumer that feeds it from `NIO_STATUS`.

use chrono::{DateTime, SecondsFormat, Utc};
use nio_shared::crd::{MachinePhase, MachineSpec, MachineStatus, short_commit};
use nio_shared::protocol::{Action, FailureCategory, JobKind, Phase, StatusEvent};

use crate::conditions;

/// A Kubernetes Event to record about the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

fn note(warning: bool, reason: &str, message: String) -> Note {
    Note { warning, reason: reason.to_string(), message }
}

/// The target part of a job id: `{cluster}/{ns}/{machine}/{commit}/{generation}[.{hash}]/{action}` →
/// `{commit}/{generation}[.{hash}]`.
pub fn target_of(job_id: &str) -> Option<String> {
    let parts: Vec<&str> = job_id.split('/').collect();
    if parts.len() < 6 {
        return None;
    }
    Some(parts[3..parts.len() - 1].join("/"))
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// The new status after `ev`, and the Events to record; None when the event is older than what was applied.
pub fn transition(
    spec: &MachineSpec,
    status: &MachineStatus,
    ev: &StatusEvent,
    generation: Option<i64>,
) -> Option<(MachineStatus, Vec<Note>)> {
    if let Some(last) = status.last_event_time.as_deref().and_then(|l| DateTime::parse_from_rfc3339(l).ok())
        && ev.at <= last.with_timezone(&Utc)
    {
        return None;
    }
    let mut s = status.clone();
    let mut notes = Vec::new();
    s.last_event_time = Some(ts(ev.at));
    s.observed_generation = generation;
    let target = target_of(&ev.job_id);
    let commit = ev.commit.clone().unwrap_or_default();
    let short = short_commit(&commit);

    if let Some(k) = &ev.host_key {
        if ev.action == Action::Install && ev.phase == Phase::Succeeded {
            s.host_key = Some(k.clone());
            notes.push(note(false, "HostKeyInstalled", format!("pinned the host key installed with NixOS: {k}")));
        } else if spec.host_key.is_none() && s.host_key.is_none() {
            s.host_key = Some(k.clone());
            notes.push(note(false, "HostKeyRecorded", format!("first contact: recorded and pinned host key {k}")));
        }
    }
    if ev.category == Some(FailureCategory::HostKeyMismatch) {
        let msg = ev.message.clone().unwrap_or_default();
        if !conditions::is_true(&s.conditions, "HostKeyMismatch") {
            notes.push(note(true, "HostKeyMismatch", msg.clone()));
        }
        conditions::set(&mut s.conditions, "HostKeyMismatch", true, "HostKeyMismatch", &msg, generation);
    }

    match (ev.action.kind(), ev.phase) {
        (JobKind::Apply, Phase::Started) => {
            s.phase = Some(MachinePhase::Applying);
            notes.push(note(
                false,
                "Applying",
                format!("{} {short} started on executor {}", ev.action.as_str(), ev.executor),
            ));
        }
        (JobKind::Apply, Phase::Step) => s.phase = Some(MachinePhase::Applying),
        (JobKind::Apply, Phase::Succeeded | Phase::Skipped) => {
            s.phase = Some(MachinePhase::Applied);
            s.discoverable = Some(true);
            if s.queued_target == target {
                s.queued_target = None;
            }
            s.failed_target = None;
            conditions::set(&mut s.conditions, "Failed", false, "Applied", "", generation);
            conditions::set(&mut s.conditions, "HostKeyMismatch", false, "HostKeyMatches", "", generation);
            if ev.action == Action::Remove {
                s.applied_configuration = None;
                s.applied_target = None;
                s.has_configuration = Some(false);
                notes.push(note(false, "Removed", format!("applied onRemoveFlake at {short}")));
            } else {
                s.applied_commit = Some(commit.clone());
                s.applied_commit_short = Some(short.clone());
                s.applied_configuration = ev.configuration.clone();
                s.applied_generation = Some(ev.generation);
                s.applied_target = target.clone();
                s.last_applied_time = Some(conditions::time(ev.at));
                if ev.system.is_some() && matches!(ev.action, Action::Switch | Action::Test | Action::Install) {
                    s.applied_system = ev.system.clone();
                    s.current_system = ev.system.clone();
                    conditions::set(&mut s.conditions, "Drifted", false, "RunningAppliedSystem", "", generation);
                }
                if ev.action == Action::Install {
                    s.installed_at = Some(conditions::time(ev.at));
                    notes.push(note(false, "Installed", format!("NixOS installed at {short}")));
                } else if ev.phase == Phase::Skipped {
                    notes.push(note(false, "Applied", format!("already running {short}")));
                } else {
                    notes.push(note(false, "Applied", format!("{} {short} succeeded", ev.action.as_str())));
                }
            }
        }
        (JobKind::Apply, Phase::Failed | Phase::RolledBack) => {
            s.phase = Some(MachinePhase::Failed);
            if s.queued_target == target {
                s.queued_target = None;
            }
            s.failed_target = target.clone();
            if ev.system.is_some() {
                s.current_system = ev.system.clone();
            }
            let reason = if ev.phase == Phase::RolledBack {
                "RolledBack"
            } else {
                ev.category.map_or("Failed", FailureCategory::as_str)
            };
            let msg = ev.message.clone().unwrap_or_default();
            conditions::set(&mut s.conditions, "Failed", true, reason, &msg, generation);
            if matches!(ev.category, Some(FailureCategory::Unreachable)) {
                s.discoverable = Some(false);
            }
            notes.push(note(true, reason, format!("{} {short} failed: {msg}", ev.action.as_str())));
        }
        (JobKind::Probe, Phase::Succeeded) => {
            s.discoverable = Some(true);
            if ev.system.is_some() {
                s.current_system = ev.system.clone();
            }
            if let Some(f) = &ev.facts {
                s.hardware_facts = Some(f.clone());
            }
            if let (Some(cur), Some(applied)) = (&s.current_system, &s.applied_system) {
                let drifted = cur != applied;
                if drifted && !conditions::is_true(&s.conditions, "Drifted") {
                    notes.push(note(true, "Drifted", format!("running {cur}, but NIO applied {applied}")));
                }
                let msg = if drifted { format!("running {cur}, but NIO applied {applied}") } else { String::new() };
                conditions::set(
                    &mut s.conditions,
                    "Drifted",
                    drifted,
                    if drifted { "SystemChanged" } else { "RunningAppliedSystem" },
                    &msg,
                    generation,
                );
            }
        }
        (JobKind::Probe, Phase::Failed) => {
            if matches!(ev.category, Some(FailureCategory::Unreachable | FailureCategory::Timeout)) {
                if s.discoverable != Some(false) {
                    notes.push(note(true, "Unreachable", ev.message.clone().unwrap_or_default()));
                }
                s.discoverable = Some(false);
            }
        }
        _ => {}
    }
    Some((s, notes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn spec() -> MachineSpec {
        serde_json::from_value(serde_json::json!({"hostname": "m1"})).unwrap()
    }

    fn ev(phase: Phase, action: Action, secs: u32) -> StatusEvent {
        StatusEvent {
            v: 1,
            job_id: format!("c/ns/m1/{}/3/{}", "a".repeat(40), action.as_str()),
            cluster: "c".into(),
            namespace: "ns".into(),
            machine: "m1".into(),
            configuration: Some("web".into()),
            generation: 3,
            action,
            phase,
            step: None,
            category: None,
            commit: Some("a".repeat(40)),
            system: Some("/nix/store/abc-nixos-system".into()),
            host_key: None,
            nixos_version: None,
            facts: None,
            message: None,
            log_tail: vec![],
            executor: "e1".into(),
            started_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, secs).unwrap(),
        }
    }

    #[test]
    fn job_ids_carry_the_target() {
        assert_eq!(target_of("c/ns/m/abc/3/switch").as_deref(), Some("abc/3"));
        assert_eq!(target_of("c/ns/m/abc/3.deadbeef/switch").as_deref(), Some("abc/3.deadbeef"));
        assert_eq!(target_of("bogus"), None);
    }

    #[test]
    fn success_records_the_commit_and_late_events_do_not_regress() {
        let (s, notes) =
            transition(&spec(), &MachineStatus::default(), &ev(Phase::Started, Action::Switch, 1), Some(1)).unwrap();
        assert_eq!(s.phase, Some(MachinePhase::Applying));
        assert_eq!(notes[0].reason, "Applying");
        let (s, _) = transition(&spec(), &s, &ev(Phase::Succeeded, Action::Switch, 5), Some(1)).unwrap();
        assert_eq!(s.phase, Some(MachinePhase::Applied));
        assert_eq!(s.applied_commit_short.as_deref(), Some("aaaaaaaaaaaa"));
        assert_eq!(s.applied_target.as_deref(), Some(&*format!("{}/3", "a".repeat(40))));
        // a late Step (older) and a duplicate are ignored
        assert!(transition(&spec(), &s, &ev(Phase::Step, Action::Switch, 3), Some(1)).is_none());
        assert!(transition(&spec(), &s, &ev(Phase::Succeeded, Action::Switch, 5), Some(1)).is_none());
    }

    #[test]
    fn failures_never_clear_the_applied_commit() {
        let (s, _) =
            transition(&spec(), &MachineStatus::default(), &ev(Phase::Succeeded, Action::Switch, 1), None).unwrap();
        let mut fail = ev(Phase::Failed, Action::Switch, 2);
        fail.job_id = format!("c/ns/m1/{}/4/switch", "b".repeat(40));
        fail.commit = Some("b".repeat(40));
        fail.category = Some(FailureCategory::Unreachable);
        fail.message = Some("unreachable".into());
        let (s, notes) = transition(&spec(), &s, &fail, None).unwrap();
        assert_eq!(s.phase, Some(MachinePhase::Failed));
        assert_eq!(s.applied_commit.as_deref(), Some(&*"a".repeat(40)), "an outage never clears appliedCommit");
        assert_eq!(s.failed_target.as_deref(), Some(&*format!("{}/4", "b".repeat(40))));
        assert_eq!(s.discoverable, Some(false));
        assert!(notes[0].warning && notes[0].reason == "Unreachable");
        let mut probe_fail = ev(Phase::Failed, Action::Probe, 3);
        probe_fail.category = Some(FailureCategory::Unreachable);
        let (s, _) = transition(&spec(), &s, &probe_fail, None).unwrap();
        assert!(s.applied_commit.is_some());
    }

    #[test]
    fn tofu_records_the_first_key_and_installs_replace_it() {
        let mut first = ev(Phase::Succeeded, Action::Probe, 1);
        first.host_key = Some("ssh-ed25519 AAAA1".into());
        let (s, notes) = transition(&spec(), &MachineStatus::default(), &first, None).unwrap();
        assert_eq!(s.host_key.as_deref(), Some("ssh-ed25519 AAAA1"));
        assert_eq!(notes[0].reason, "HostKeyRecorded");
        let mut later = ev(Phase::Succeeded, Action::Probe, 2);
        later.host_key = Some("ssh-ed25519 OTHER".into());
        let (s, _) = transition(&spec(), &s, &later, None).unwrap();
        assert_eq!(s.host_key.as_deref(), Some("ssh-ed25519 AAAA1"), "a recorded key is never silently replaced");
        let mut install = ev(Phase::Succeeded, Action::Install, 3);
        install.host_key = Some("ssh-ed25519 NEW".into());
        let (s, _) = transition(&spec(), &s, &install, None).unwrap();
        assert_eq!(s.host_key.as_deref(), Some("ssh-ed25519 NEW"));
        assert!(s.installed_at.is_some());
    }

    #[test]
    fn probes_flag_drift_and_rollbacks_mark_failure() {
        let (s, _) =
            transition(&spec(), &MachineStatus::default(), &ev(Phase::Succeeded, Action::Switch, 1), None).unwrap();
        let mut probe = ev(Phase::Succeeded, Action::Probe, 2);
        probe.system = Some("/nix/store/zzz-hand-made".into());
        let (s, notes) = transition(&spec(), &s, &probe, None).unwrap();
        assert!(conditions::is_true(&s.conditions, "Drifted"));
        assert_eq!(notes[0].reason, "Drifted");
        let mut rb = ev(Phase::RolledBack, Action::Switch, 3);
        rb.category = Some(FailureCategory::HealthCheckFailed);
        let (s, notes) = transition(&spec(), &s, &rb, None).unwrap();
        assert_eq!(s.phase, Some(MachinePhase::Failed));
        assert_eq!(notes[0].reason, "RolledBack");
    }
}

/// Feeds `NIO_STATUS` events of this cluster into Machine status, in order per machine.
pub mod consumer {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
    use futures::StreamExt;
    use kube::ResourceExt;
    use nio_shared::crd::MachinePhase;
    use nio_shared::protocol::{Phase, StatusEvent};
    use tokio_util::sync::CancellationToken;
    use tracing::Instrument;

    use super::{Note, transition};
    use crate::error::Result;
    use crate::metrics::EventLabels;
    use crate::reconcile::{Ctx, update_machine_status};

    /// Creates (or finds) the cluster's durable status consumer.
    pub async fn open(js: &jetstream::Context, cluster: &str) -> anyhow::Result<PullConsumer> {
        let stream = js.get_stream(nio_shared::subjects::STATUS_STREAM).await?;
        Ok(stream
            .get_or_create_consumer(
                &nio_shared::subjects::status_consumer(cluster),
                nio_shared::nats::status_consumer(cluster),
            )
            .await?)
    }

    /// Runs until `stop`. `machines` are the controllers' caches: an event is written from the cached Machine
    /// (with its resourceVersion as precondition), so it costs one request unless the cache is behind.
    pub async fn run(
        ctx: Arc<Ctx>,
        consumer: PullConsumer,
        machines: Vec<kube::runtime::reflector::Store<nio_shared::crd::Machine>>,
        stop: CancellationToken,
    ) {
        loop {
            if stop.is_cancelled() {
                return;
            }
            let msgs = match next_events(&consumer).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "pulling status events failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if msgs.is_empty() {
                continue;
            }
            // In order per machine, machines in parallel.
            let mut groups: BTreeMap<(String, String), Vec<(jetstream::Message, StatusEvent)>> = BTreeMap::new();
            for m in msgs {
                match StatusEvent::decode(&m.payload) {
                    Ok(ev) => groups.entry((ev.namespace.clone(), ev.machine.clone())).or_default().push((m, ev)),
                    Err(e) => {
                        tracing::error!(subject = %m.subject, error = %e, "terminating an undecodable status event");
                        let _ = m.ack_with(AckKind::Term).await;
                    }
                }
            }
            let work = groups.into_iter().map(|((ns, name), group)| {
                let ctx = ctx.clone();
                let reference = kube::runtime::reflector::ObjectRef::new(&name).within(&ns);
                let mut known = machines.iter().find_map(|s| s.get(&reference)).map(|m| (*m).clone());
                async move {
                    for (msg, ev) in group {
                        let span = tracing::info_span!("status.apply", otel.kind = "consumer", nio.cluster = %ev.cluster, nio.phase = ?ev.phase, nio.action = ev.action.as_str());
                        nio_shared::telemetry::set_parent_from(&span, msg.headers.as_ref());
                        match apply(&ctx, &ev, known.as_ref()).instrument(span).await {
                            Ok(latest) => {
                                known = latest;
                                let _ = msg.ack().await;
                            }
                            Err(e) => {
                                known = None;
                                tracing::warn!(machine = %ev.machine, error = %e, "applying a status event failed; will retry");
                                let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(2)))).await;
                            }
                        }
                    }
                }
            });
            futures::future::join_all(work).await;
        }
    }

    /// Up to [`BATCH`] status events: whatever is waiting now, without waiting for a batch to fill; when none
    /// is, blocks up to a second for the first one (so a lone event is applied at once, and a burst in
    /// batches).
    async fn next_events(consumer: &PullConsumer) -> anyhow::Result<Vec<jetstream::Message>> {
        // A no-wait fetch has no expiry of its own: bound it, keeping whatever arrived (a request lost while
        // NATS restarts must not stall the consumer).
        let waiting = |n: usize| async move {
            let batch = consumer.fetch().max_messages(n).messages().await?;
            let within = tokio::time::sleep(Duration::from_secs(3));
            anyhow::Ok(batch.take_until(within).filter_map(|m| async { m.ok() }).collect::<Vec<_>>().await)
        };
        let mut msgs = waiting(BATCH).await?;
        if msgs.is_empty() {
            let first = consumer.batch().max_messages(1).expires(Duration::from_secs(1)).messages().await?;
            let within = tokio::time::sleep(Duration::from_secs(3));
            msgs = first.take_until(within).filter_map(|m| async { m.ok() }).collect().await;
            if !msgs.is_empty() {
                msgs.extend(waiting(BATCH - 1).await?);
            }
        }
        Ok(msgs)
    }

    /// Most status events applied in one round.
    const BATCH: usize = 256;

    /// Applies one event to its Machine (starting from `known`, a recent copy, when there is one) and records
    /// the Events it calls for; returns the Machine as written.
    pub async fn apply(
        ctx: &Ctx,
        ev: &StatusEvent,
        known: Option<&nio_shared::crd::Machine>,
    ) -> Result<Option<nio_shared::crd::Machine>> {
        if ev.cluster != ctx.cluster {
            return Ok(None);
        }
        ctx.metrics
            .status_events
            .get_or_create(&EventLabels { phase: format!("{:?}", ev.phase), action: ev.action.as_str().into() })
            .inc();
        let notes: Mutex<Vec<Note>> = Mutex::new(Vec::new());
        let updated = update_machine_status(ctx, &ev.namespace, &ev.machine, known, |m| {
            let status = m.status.clone().unwrap_or_default();
            // Progress steps of a machine already marked Applying change nothing worth a write.
            if ev.phase == Phase::Step && status.phase == Some(MachinePhase::Applying) {
                return None;
            }
            let (s, n) = transition(&m.spec, &status, ev, m.metadata.generation)?;
            if let Ok(mut all) = notes.lock() {
                *all = n;
            }
            Some(s)
        })
        .await?;
        let Some(machine) = updated else {
            tracing::info!(machine = %ev.machine, namespace = %ev.namespace, "status event for a Machine that no longer exists");
            return Ok(None);
        };
        let notes = notes.into_inner().unwrap_or_default();
        for n in notes {
            ctx.event(&machine, n.warning, &n.reason, n.message, "ApplyStatus").await;
        }
        tracing::debug!(machine = %machine.name_any(), phase = ?ev.phase, "status applied");
        Ok(Some(machine))
    }
}
