//! The kstatus conventions, which GitOps tools read (Flux's health checks and kpt through the kstatus library,
//! `kubectl wait --for=condition=Ready`, Argo CD through NIO's Lua health checks in `deploy/argocd/`): besides
//! `Ready` and `status.observedGeneration`, the abnormal-true conditions `Reconciling` (work is underway, or
//! will be by itself) and `Stalled` (nothing moves until the spec, the commit or a human does), present only
//! while true. They are derived from the status NIO decided, at every status write, so the two views cannot
//! disagree.
//!
//! | NIO's view (configuration)                  | Ready | Reconciling | Stalled | kstatus    | Argo CD     |
//! |---------------------------------------------|-------|-------------|---------|------------|-------------|
//! | not yet observed (status defaulted by CRD)  |       |             |         | InProgress | Progressing |
//! | rolling out, canaries, a wave soaking       | False | True        |         | InProgress | Progressing |
//! | a wave waiting for approval                 | False | True        |         | InProgress | Suspended   |
//! | paused; suspended                           | False | True; -     |         | InProgress | Suspended   |
//! | Git or a Secret unavailable (retried)       | False | True        |         | InProgress | Degraded    |
//! | failure budget exceeded, machines failed    | False |             | True    | Failed     | Degraded    |
//! | invalid spec                                | False |             | True    | Failed     | Degraded    |
//! | every machine runs the commit, waves done   | True  |             |         | Current    | Healthy     |
//!
//! kstatus (cli-utils v0.37) reads Ready=False without either condition as InProgress. A Machine is Ready when
//! it runs what was applied, or when no configuration targets it; failed, rolled back, drifted, a wrong host key
//! or an invalid spec make it Stalled.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use nio_shared::crd::{MachinePhase, MachineStatus, NixosConfigurationStatus};

use crate::conditions::{self, Type};

/// What a status amounts to for a GitOps tool.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Nothing to do, nothing wrong that NIO will fix by itself.
    Settled,
    /// Work underway, or retried by itself: `(reason, message)`.
    Reconciling(String, String),
    /// No progress until something changes: `(reason, message)`.
    Stalled(String, String),
}

fn condition(conds: &[Condition], t: Type) -> Option<&Condition> {
    conds.iter().find(|c| c.type_ == t.as_str())
}

fn reason_and_message(conds: &[Condition], t: Type) -> (String, String) {
    condition(conds, t).map(|c| (c.reason.clone(), c.message.clone())).unwrap_or_default()
}

/// Reasons of `Degraded` that report machines, not something the configuration itself waits for.
const MACHINE_REASONS: [&str; 3] = ["MachinesFailed", "InvalidMachines", "MachineConflict"];

fn configuration_state(s: &NixosConfigurationStatus) -> State {
    let c = &s.conditions;
    let progressing = reason_and_message(c, Type::Progressing).0;
    let degraded = condition(c, Type::Degraded).filter(|d| d.status == "True");
    if conditions::is_true(c, Type::Invalid) {
        let (_, message) = reason_and_message(c, Type::Invalid);
        return State::Stalled("InvalidSpec".into(), message);
    }
    // Over a failure budget, whether or not machines are being rolled back meanwhile.
    if progressing == "FailureBudgetExceeded" || progressing == "RollingBack" {
        let failed = degraded.map(|d| d.message.clone()).unwrap_or_default();
        return State::Stalled("FailureBudgetExceeded".into(), failed);
    }
    if conditions::is_true(c, Type::Ready) {
        return State::Settled;
    }
    if let Some(d) = degraded.filter(|d| !MACHINE_REASONS.contains(&d.reason.as_str())) {
        return State::Reconciling(d.reason.clone(), format!("retrying: {}", d.message));
    }
    if progressing == "Suspended" {
        return State::Settled;
    }
    let waiting = s.total.saturating_sub(s.updated + s.failed + s.in_progress);
    if s.failed > 0 && s.in_progress == 0 && waiting == 0 {
        let message =
            format!("{} machine(s) failed at this target; a new commit or spec change retries them", s.failed);
        return State::Stalled("MachinesFailed".into(), message);
    }
    let (reason, mut message) = reason_and_message(c, Type::Ready);
    // What the current wave waits for (a soak's end, the approval to give) says more than the counts.
    let wave = s.waves.iter().find(|w| Some(&w.name) == s.current_wave.as_ref());
    if let Some(m) =
        wave.and_then(|w| w.message.clone()).filter(|_| progressing == "Soaking" || progressing == "AwaitingApproval")
    {
        message = format!("wave {}: {m}", s.current_wave.as_deref().unwrap_or_default());
    }
    match progressing.as_str() {
        "" | "Idle" | "JobsInFlight" => {
            State::Reconciling(if reason.is_empty() { "Pending".into() } else { reason }, message)
        }
        hold => State::Reconciling(hold.to_string(), message),
    }
}

fn machine_state(s: &MachineStatus) -> (State, bool, (String, String)) {
    let c = &s.conditions;
    if conditions::is_true(c, Type::Invalid) {
        let (_, m) = reason_and_message(c, Type::Invalid);
        return (State::Stalled("InvalidSpec".into(), m.clone()), false, ("InvalidSpec".into(), m));
    }
    if conditions::is_true(c, Type::HostKeyMismatch) {
        let (_, m) = reason_and_message(c, Type::HostKeyMismatch);
        return (State::Stalled("HostKeyMismatch".into(), m.clone()), false, ("HostKeyMismatch".into(), m));
    }
    match s.phase {
        Some(MachinePhase::Failed) => {
            let (reason, m) = reason_and_message(c, Type::Failed);
            let reason = if reason.is_empty() { "Failed".to_string() } else { reason };
            (State::Stalled(reason.clone(), m.clone()), false, (reason, m))
        }
        Some(p @ (MachinePhase::Queued | MachinePhase::Waiting | MachinePhase::Applying)) => {
            let m = format!("{} {}", p.as_str().to_lowercase(), s.queued_target.as_deref().unwrap_or(""));
            let m = m.trim_end().to_string();
            (State::Reconciling(p.as_str().into(), m.clone()), false, (p.as_str().into(), m))
        }
        Some(MachinePhase::Applied) if conditions::is_true(c, Type::Drifted) => {
            let (_, m) = reason_and_message(c, Type::Drifted);
            (State::Stalled("Drifted".into(), m.clone()), false, ("Drifted".into(), m))
        }
        Some(MachinePhase::Applied) => {
            let m = format!("running {}", s.applied_commit_short.as_deref().unwrap_or("the applied configuration"));
            (State::Settled, true, ("Applied".into(), m))
        }
        _ if s.has_configuration == Some(false) => {
            let m = "no NixosConfiguration targets this machine".to_string();
            (State::Settled, true, ("NoConfiguration".into(), m))
        }
        _ => {
            let m = "waiting for its configuration's rollout".to_string();
            (State::Reconciling("Pending".into(), m.clone()), false, ("Pending".into(), m))
        }
    }
}

/// Sets `Reconciling` and `Stalled` from `state`, removing whichever is not true. Their messages start with the
/// reason, since kstatus shows only the message.
fn apply(conds: &mut Vec<Condition>, state: &State, generation: Option<i64>) {
    let (reconciling, stalled) = match state {
        State::Settled => (None, None),
        State::Reconciling(r, m) => (Some((r, m)), None),
        State::Stalled(r, m) => (None, Some((r, m))),
    };
    for (t, v) in [(Type::Reconciling, reconciling), (Type::Stalled, stalled)] {
        match v {
            Some((reason, message)) => {
                let message = if message.is_empty() { reason.clone() } else { format!("{reason}: {message}") };
                conditions::set(conds, t, true, reason, &message, generation)
            }
            None => conds.retain(|c| c.type_ != t.as_str()),
        }
    }
}

/// Adds a NixosConfiguration's `Reconciling` and `Stalled` conditions to the status NIO decided.
pub fn configuration(s: &mut NixosConfigurationStatus) {
    let state = configuration_state(s);
    apply(&mut s.conditions, &state, s.observed_generation);
}

/// Adds a Machine's `Ready`, `Reconciling` and `Stalled` conditions to the status NIO decided.
pub fn machine(s: &mut MachineStatus) {
    let (state, ready, (reason, message)) = machine_state(s);
    let g = s.observed_generation;
    conditions::set(&mut s.conditions, Type::Ready, ready, &reason, &message, g);
    apply(&mut s.conditions, &state, g);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_status::{self, Rollout};
    use crate::rollout::{Counts, Hold};

    const C1: &str = "1111111111111111111111111111111111111111";

    /// What a case expects: (Ready, Reconciling reason, Stalled reason).
    type Want = (&'static str, Option<String>, Option<String>);

    /// (Ready, Reconciling reason, Stalled reason) as a GitOps tool reads them.
    fn read(conds: &[Condition]) -> (String, Option<String>, Option<String>) {
        let reason = |t: Type| condition(conds, t).filter(|c| c.status == "True").map(|c| c.reason.clone());
        let ready = condition(conds, Type::Ready).map_or("absent".to_string(), |c| c.status.clone());
        (ready, reason(Type::Reconciling), reason(Type::Stalled))
    }

    fn step(counts: Counts, published: u32, hold: Option<Hold>) -> NixosConfigurationStatus {
        let (s, _) = config_status::resolved(&NixosConfigurationStatus::default(), "main", C1, Some(1));
        let r = Rollout { commit: C1, counts, published, hold, ..Default::default() };
        config_status::configuration_status(&s, &r, Some(1)).0
    }

    fn counts(total: u32, updated: u32, failed: u32, in_progress: u32) -> Counts {
        Counts { total, updated, failed, in_progress }
    }

    #[test]
    fn configurations_read_as_in_progress_failed_or_current() {
        let s = |v: &str| Some(v.to_string());
        let base = NixosConfigurationStatus::default();
        let cases: Vec<(&str, NixosConfigurationStatus, Want)> = vec![
            ("first jobs published", step(counts(3, 0, 0, 0), 3, None), ("False", s("RollingOut"), None)),
            (
                "waiting for canaries",
                step(counts(3, 1, 0, 0), 0, Some(Hold::WaitingForCanaries)),
                ("False", s("WaitingForCanaries"), None),
            ),
            ("paused", step(counts(3, 1, 0, 0), 0, Some(Hold::Paused)), ("False", s("Paused"), None)),
            ("suspended", step(counts(3, 1, 0, 0), 0, Some(Hold::Suspended)), ("False", None, None)),
            (
                "budget exceeded",
                step(counts(3, 1, 2, 0), 0, Some(Hold::FailureBudgetExceeded)),
                ("False", None, s("FailureBudgetExceeded")),
            ),
            ("one failed, nothing left", step(counts(3, 2, 1, 0), 0, None), ("False", None, s("MachinesFailed"))),
            ("one failed, one still running", step(counts(3, 1, 1, 1), 0, None), ("False", s("RollingOut"), None)),
            ("no machine selected", step(counts(0, 0, 0, 0), 0, None), ("False", s("NoMachines"), None)),
            ("done", step(counts(3, 3, 0, 0), 0, None), ("True", None, None)),
            (
                "git unreachable",
                config_status::degraded(&step(counts(3, 1, 0, 1), 0, None), "GitUnreachable", "timeout", Some(1)).0,
                ("False", s("GitUnreachable"), None),
            ),
            ("invalid", config_status::invalid(&base, "spec.flake: bad", Some(1)).0, ("False", None, s("InvalidSpec"))),
        ];
        for (name, mut st, want) in cases {
            configuration(&mut st);
            let got = read(&st.conditions);
            assert_eq!((got.0.as_str(), got.1, got.2), want, "{name}");
            // derived again: nothing changes (a status write that repeats itself stays a no-op)
            let again = {
                let mut a = st.clone();
                configuration(&mut a);
                a
            };
            assert_eq!(again, st, "{name}");
        }
    }

    #[test]
    fn a_stalled_configuration_that_rolls_out_again_is_no_longer_stalled() {
        let mut st = step(counts(3, 1, 2, 0), 0, Some(Hold::FailureBudgetExceeded));
        configuration(&mut st);
        assert!(conditions::is_true(&st.conditions, Type::Stalled));
        let r = Rollout { commit: C1, counts: counts(3, 1, 0, 0), published: 2, ..Default::default() };
        let (mut next, _) = config_status::configuration_status(&st, &r, Some(2));
        configuration(&mut next);
        assert_eq!(read(&next.conditions), ("False".into(), Some("RollingOut".into()), None));
        assert!(next.conditions.iter().all(|c| c.type_ != "Stalled"), "abnormal-true conditions are removed");
        assert_eq!(condition(&next.conditions, Type::Reconciling).and_then(|c| c.observed_generation), Some(2));
    }

    #[test]
    fn machines_read_as_in_progress_failed_or_current() {
        let with = |phase: Option<MachinePhase>, cond: Option<(Type, &str)>| {
            let mut s = MachineStatus { phase, observed_generation: Some(1), ..Default::default() };
            if let Some((t, reason)) = cond {
                conditions::set(&mut s.conditions, t, true, reason, "why", Some(1));
            }
            s.applied_commit_short = Some("111111111111".into());
            s
        };
        let s = |v: &str| Some(v.to_string());
        let cases = vec![
            ("new", with(None, None), ("False", s("Pending"), None)),
            ("queued", with(Some(MachinePhase::Queued), None), ("False", s("Queued"), None)),
            ("applying", with(Some(MachinePhase::Applying), None), ("False", s("Applying"), None)),
            ("applied", with(Some(MachinePhase::Applied), None), ("True", None, None)),
            (
                "drifted",
                with(Some(MachinePhase::Applied), Some((Type::Drifted, "SystemChanged"))),
                ("False", None, s("Drifted")),
            ),
            (
                "build failed",
                with(Some(MachinePhase::Failed), Some((Type::Failed, "BuildFailed"))),
                ("False", None, s("BuildFailed")),
            ),
            (
                "rolled back",
                with(Some(MachinePhase::Failed), Some((Type::Failed, "RolledBack"))),
                ("False", None, s("RolledBack")),
            ),
            (
                "wrong host key",
                with(Some(MachinePhase::Applying), Some((Type::HostKeyMismatch, "HostKeyMismatch"))),
                ("False", None, s("HostKeyMismatch")),
            ),
            ("invalid", with(None, Some((Type::Invalid, "InvalidSpec"))), ("False", None, s("InvalidSpec"))),
            (
                "not targeted",
                MachineStatus { has_configuration: Some(false), ..Default::default() },
                ("True", None, None),
            ),
        ];
        for (name, mut st, want) in cases {
            machine(&mut st);
            let got = read(&st.conditions);
            assert_eq!((got.0.as_str(), got.1, got.2), want, "{name}");
        }
    }
}
