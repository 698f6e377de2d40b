//! Applying executor status events to Machine status: a pure transition (ordered, idempotent, never moving
//! state backwards) and the consumer that feeds it from `NIO_STATUS`.

use chrono::{DateTime, SecondsFormat, Utc};
use nio_shared::crd::{MachinePhase, MachineSpec, MachineStatus, short_commit};
use nio_shared::protocol::{Action, FailureCategory, JobKind, Phase, StatusEvent};

use crate::conditions::{self, Note, Type, note};

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
    let target = ev.job_id.target().map(str::to_string);
    // A job whose target already settled (applied or failed, nothing queued for it) does not reopen it: a
    // second delivery of a finished job (a NATS cluster changing leaders can hand a message out twice) reports
    // its start, or a wait for the machine, after the first delivery's outcome.
    let settled = target.is_some()
        && status.queued_target != target
        && (status.applied_target == target || status.failed_target == target)
        && matches!(status.phase, Some(MachinePhase::Applied | MachinePhase::Failed));
    if settled && ev.action.kind() == JobKind::Apply && matches!(ev.phase, Phase::Started | Phase::Step) {
        return None;
    }
    let mut s = status.clone();
    let mut notes = Vec::new();
    s.last_event_time = Some(ts(ev.at));
    // (`observedGeneration` is the Machine controller's to set: it is how that controller tells a spec changed
    // since its last look, which withdraws a job queued with the old spec. An executor's event for that old job,
    // landing first, marked the new generation observed and the stale job ran.)
    let commit = ev.commit.clone().unwrap_or_default();
    let short = short_commit(&commit);

    if let Some(booted) = &ev.booted_system {
        s.booted_system = Some(booted.clone());
    }
    if let Some(id) = &ev.boot_id {
        if let Some(previous) = s.boot_id.as_deref().filter(|p| *p != id.as_str()) {
            let what = ev.booted_system.as_deref().map_or(String::new(), |b| format!("; it booted {b}"));
            notes.push(note(false, "Rebooted", format!("the machine rebooted (boot id {previous} became {id}){what}")));
        }
        s.boot_id = Some(id.clone());
    }
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
        if !conditions::is_true(&s.conditions, Type::HostKeyMismatch) {
            notes.push(note(true, "HostKeyMismatch", msg.clone()));
        }
        conditions::set(&mut s.conditions, Type::HostKeyMismatch, true, "HostKeyMismatch", &msg, generation);
    }

    if ev.action.kind() == JobKind::Apply {
        s.last_job_id = Some(ev.job_id.to_string());
    }
    match (ev.action.kind(), ev.phase) {
        // A job's start is the Applying phase, not an Event: one Event per job, at its outcome (an Event per
        // start doubled a rollout's Events and cost a request per machine).
        (JobKind::Apply, Phase::Started | Phase::Step) => {
            s.phase = Some(MachinePhase::Applying);
            // The job runs: its target is in progress (the controller's Queued mark may land after this).
            if s.queued_target.is_none() {
                s.queued_target = target.clone();
            }
        }
        (JobKind::Apply, Phase::Succeeded | Phase::Skipped) => {
            s.phase = Some(MachinePhase::Applied);
            s.discoverable = Some(true);
            if s.queued_target == target {
                s.queued_target = None;
            }
            s.failed_target = None;
            conditions::set(&mut s.conditions, Type::Failed, false, "Applied", "", generation);
            conditions::set(&mut s.conditions, Type::HostKeyMismatch, false, "HostKeyMatches", "", generation);
            if ev.action == Action::Remove {
                s.applied_configuration = None;
                s.applied_target = None;
                s.has_configuration = Some(false);
                notes.push(note(false, "Removed", format!("applied onRemoveFlake at {short}")));
            } else if matches!(ev.action, Action::Boot | Action::DryActivate) {
                // Handled for the rollout, but not running: appliedCommit stays what runs.
                s.applied_configuration = ev.configuration.clone();
                s.applied_generation = Some(ev.generation);
                s.applied_target = target.clone();
                let what = if ev.action == Action::Boot {
                    format!("boot {short}: the boot default now, running after the next reboot")
                } else {
                    format!("dry-activate {short}: checked, nothing changed")
                };
                notes.push(note(false, "Applied", what));
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
                    conditions::set(&mut s.conditions, Type::Drifted, false, "RunningAppliedSystem", "", generation);
                }
                if ev.action == Action::Install {
                    s.installed_at = Some(conditions::time(ev.at));
                    notes.push(note(false, "Installed", format!("NixOS installed at {short}")));
                } else if ev.phase == Phase::Skipped {
                    notes.push(note(false, "Applied", format!("already running {short}")));
                } else {
                    let what = format!("{} {short} succeeded on executor {}", ev.action.as_str(), ev.executor);
                    notes.push(note(false, "Applied", what));
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
            conditions::set(&mut s.conditions, Type::Failed, true, reason, &msg, generation);
            if matches!(ev.category, Some(FailureCategory::Unreachable)) {
                s.discoverable = Some(false);
            }
            let what = format!("{} {short} failed on executor {}: {msg}", ev.action.as_str(), ev.executor);
            notes.push(note(true, reason, what));
        }
        (JobKind::Probe, Phase::Succeeded) => {
            s.discoverable = Some(true);
            if ev.system.is_some() {
                s.current_system = ev.system.clone();
            }
            if let Some(f) = &ev.facts {
                s.hardware_facts = Some(Box::new(f.clone()));
            }
            if let (Some(cur), Some(applied)) = (&s.current_system, &s.applied_system) {
                let drifted = cur != applied;
                if drifted && !conditions::is_true(&s.conditions, Type::Drifted) {
                    notes.push(note(true, "Drifted", format!("running {cur}, but NIO applied {applied}")));
                }
                let msg = if drifted { format!("running {cur}, but NIO applied {applied}") } else { String::new() };
                conditions::set(
                    &mut s.conditions,
                    Type::Drifted,
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

/// A routine success: an apply that succeeded or found its target running. Recorded as an Event only when
/// the controller is asked to (`--machine-success-events`); the Machine's status says it either way.
pub fn routine(n: &Note) -> bool {
    !n.warning && n.reason == "Applied"
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use nio_shared::protocol::JobId;

    fn spec() -> MachineSpec {
        serde_json::from_value(serde_json::json!({"hostname": "m1"})).unwrap()
    }

    fn ev(phase: Phase, action: Action, secs: u32) -> StatusEvent {
        StatusEvent {
            v: 1,
            job_id: JobId::new("c", "ns", "m1", &format!("{}/3", "a".repeat(40)), action),
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
            booted_system: None,
            boot_id: None,
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
    fn success_records_the_commit_and_late_events_do_not_regress() {
        let (s, notes) =
            transition(&spec(), &MachineStatus::default(), &ev(Phase::Started, Action::Switch, 1), Some(1)).unwrap();
        assert_eq!(s.phase, Some(MachinePhase::Applying));
        assert!(notes.is_empty(), "a start is a phase, not an Event: {notes:?}");
        assert_eq!(s.queued_target.as_deref(), Some(&*format!("{}/3", "a".repeat(40))), "its target is in progress");
        let (s, notes) = transition(&spec(), &s, &ev(Phase::Succeeded, Action::Switch, 5), Some(1)).unwrap();
        assert_eq!(s.phase, Some(MachinePhase::Applied));
        assert_eq!(
            (notes[0].reason.as_str(), notes[0].message.as_str()),
            ("Applied", "switch aaaaaaaaaaaa succeeded on executor e1")
        );
        assert_eq!(s.applied_commit_short.as_deref(), Some("aaaaaaaaaaaa"));
        assert_eq!(s.applied_target.as_deref(), Some(&*format!("{}/3", "a".repeat(40))));
        // a late Step (older) and a duplicate are ignored
        assert!(transition(&spec(), &s, &ev(Phase::Step, Action::Switch, 3), Some(1)).is_none());
        assert!(transition(&spec(), &s, &ev(Phase::Succeeded, Action::Switch, 5), Some(1)).is_none());
    }

    /// An executor's event does not mark a new Machine spec observed: the Machine controller must still see the
    /// change (and withdraw a job queued with the old spec).
    #[test]
    fn an_executor_event_leaves_the_spec_change_to_the_machine_controller() {
        let before = MachineStatus { observed_generation: Some(1), ..Default::default() };
        let (s, _) = transition(&spec(), &before, &ev(Phase::Started, Action::Switch, 1), Some(2)).unwrap();
        assert_eq!(s.observed_generation, Some(1));
    }

    /// Only a routine success is left out of Events by default; what needs attention or changes the
    /// machine's record is always one.
    #[test]
    fn routine_successes_are_told_apart_from_what_needs_attention() {
        let mut first = ev(Phase::Succeeded, Action::Switch, 1);
        first.host_key = Some("ssh-ed25519 AAAA".into());
        let (s, notes) = transition(&spec(), &MachineStatus::default(), &first, None).unwrap();
        let reasons: Vec<(&str, bool)> = notes.iter().map(|n| (n.reason.as_str(), routine(n))).collect();
        assert_eq!(reasons, [("HostKeyRecorded", false), ("Applied", true)]);
        let mut skipped = ev(Phase::Skipped, Action::Switch, 2);
        skipped.job_id = JobId::new("c", "ns", "m1", &format!("{}/4", "a".repeat(40)), Action::Switch);
        let (s, notes) = transition(&spec(), &s, &skipped, None).unwrap();
        assert!(notes.iter().all(routine) && notes.len() == 1, "{notes:?}");
        let mut rolled_back = ev(Phase::RolledBack, Action::Switch, 3);
        rolled_back.message = Some("health check failed".into());
        let (s, notes) = transition(&spec(), &s, &rolled_back, None).unwrap();
        assert!(!notes.iter().any(routine), "{notes:?}");
        for (phase, action) in [(Phase::Failed, Action::Switch), (Phase::Succeeded, Action::Install)] {
            let (_, notes) = transition(&spec(), &s, &ev(phase, action, 4), None).unwrap();
            assert!(!notes.is_empty() && !notes.iter().any(routine), "{phase:?} {action:?}: {notes:?}");
        }
    }

    /// A second delivery of a finished job (a NATS cluster changing leaders hands one out twice) starts, or
    /// waits for the machine, after the first delivery's outcome: the machine stays Applied (or Failed). A job
    /// queued again for the same target is not held back.
    #[test]
    fn a_late_start_of_a_settled_target_does_not_reopen_it() {
        let (s, _) =
            transition(&spec(), &MachineStatus::default(), &ev(Phase::Started, Action::Switch, 1), Some(1)).unwrap();
        let (s, _) = transition(&spec(), &s, &ev(Phase::Succeeded, Action::Switch, 5), Some(1)).unwrap();
        assert!(transition(&spec(), &s, &ev(Phase::Started, Action::Switch, 6), Some(1)).is_none());
        assert!(transition(&spec(), &s, &ev(Phase::Step, Action::Switch, 7), Some(1)).is_none());
        let mut failed = s.clone();
        (failed.phase, failed.applied_target, failed.failed_target) =
            (Some(MachinePhase::Failed), None, s.applied_target.clone());
        assert!(transition(&spec(), &failed, &ev(Phase::Started, Action::Switch, 6), Some(1)).is_none());
        let queued = MachineStatus { queued_target: s.applied_target.clone(), ..s };
        let (again, _) = transition(&spec(), &queued, &ev(Phase::Started, Action::Switch, 6), Some(1)).unwrap();
        assert_eq!(again.phase, Some(MachinePhase::Applying));
    }

    #[test]
    fn a_new_boot_id_is_a_reboot_and_the_booted_system_is_kept() {
        let spec = spec();
        let mut probe = ev(Phase::Succeeded, Action::Probe, 1);
        probe.boot_id = Some("b1".into());
        probe.booted_system = Some("/nix/store/a-sys".into());
        let (s, notes) = transition(&spec, &MachineStatus::default(), &probe, None).unwrap();
        assert_eq!((s.boot_id.as_deref(), s.booted_system.as_deref()), (Some("b1"), Some("/nix/store/a-sys")));
        assert!(!notes.iter().any(|n| n.reason == "Rebooted"), "first sight is not a reboot");
        let mut again = ev(Phase::Succeeded, Action::Probe, 2);
        again.boot_id = Some("b1".into());
        let (s, notes) = transition(&spec, &s, &again, None).unwrap();
        assert!(!notes.iter().any(|n| n.reason == "Rebooted"));
        let mut rebooted = ev(Phase::Succeeded, Action::Probe, 3);
        rebooted.boot_id = Some("b2".into());
        rebooted.booted_system = Some("/nix/store/b-sys".into());
        let (s, notes) = transition(&spec, &s, &rebooted, None).unwrap();
        let n = notes.iter().find(|n| n.reason == "Rebooted").expect("a reboot Event");
        assert!(n.message.contains("b1") && n.message.contains("b2") && n.message.contains("b-sys"), "{}", n.message);
        assert_eq!(s.booted_system.as_deref(), Some("/nix/store/b-sys"));
    }

    #[test]
    fn failures_never_clear_the_applied_commit() {
        let (s, _) =
            transition(&spec(), &MachineStatus::default(), &ev(Phase::Succeeded, Action::Switch, 1), None).unwrap();
        let mut fail = ev(Phase::Failed, Action::Switch, 2);
        fail.job_id = JobId::new("c", "ns", "m1", &format!("{}/4", "b".repeat(40)), Action::Switch);
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
        assert!(conditions::is_true(&s.conditions, Type::Drifted));
        assert_eq!(notes[0].reason, "Drifted");
        let mut rb = ev(Phase::RolledBack, Action::Switch, 3);
        rb.category = Some(FailureCategory::HealthCheckFailed);
        let (s, notes) = transition(&spec(), &s, &rb, None).unwrap();
        assert_eq!(s.phase, Some(MachinePhase::Failed));
        assert_eq!(notes[0].reason, "RolledBack");
    }
}
