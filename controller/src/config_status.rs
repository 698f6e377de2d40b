//! A NixosConfiguration's status and Events, decided without I/O: each function takes the previous status
//! (what this replica last wrote) and what the reconcile found, and returns the new status and the Events to
//! record. An Event is returned only when the situation it reports is new, so a reconcile that repeats
//! itself records nothing twice. The reconcile does the reads, the writes and the recording.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nio_shared::crd::{NixosConfigurationStatus, WaveState, WaveStatus, short_commit};

use crate::conditions::{self, Note, Type, note};
use crate::rollout::{Counts, Hold};

/// The spec is invalid: nothing is applied until it changes.
pub fn invalid(
    previous: &NixosConfigurationStatus,
    message: &str,
    generation: Option<i64>,
) -> (NixosConfigurationStatus, Vec<Note>) {
    let mut s = observed(previous, generation);
    let mut notes = Vec::new();
    if conditions::message(&s.conditions, Type::Invalid) != Some(message) {
        notes.push(note(true, "InvalidSpec", message.to_string()));
    }
    let c = &mut s.conditions;
    conditions::set(c, Type::Invalid, true, "InvalidSpec", message, generation);
    conditions::set(c, Type::Ready, false, "InvalidSpec", "the spec is invalid; nothing is applied", generation);
    conditions::set(c, Type::Progressing, false, "InvalidSpec", "", generation);
    (s, notes)
}

/// Something the rollout needs is unavailable (the Git ref, a Secret): Degraded with `reason`, Ready false.
/// Counts and the target stay as they were.
pub fn degraded(
    previous: &NixosConfigurationStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> (NixosConfigurationStatus, Vec<Note>) {
    let mut s = observed(previous, generation);
    let mut notes = Vec::new();
    if conditions::message(&s.conditions, Type::Degraded) != Some(message) {
        notes.push(note(true, reason, message.to_string()));
    }
    conditions::set(&mut s.conditions, Type::Degraded, true, reason, message, generation);
    conditions::set(&mut s.conditions, Type::Ready, false, reason, message, generation);
    (s, notes)
}

/// The spec is valid and `git_ref` resolved to `commit`.
pub fn resolved(
    previous: &NixosConfigurationStatus,
    git_ref: &str,
    commit: &str,
    generation: Option<i64>,
) -> (NixosConfigurationStatus, Vec<Note>) {
    let mut s = observed(previous, generation);
    conditions::set(&mut s.conditions, Type::Invalid, false, "Valid", "", generation);
    let mut notes = Vec::new();
    if s.target_commit.as_deref() != Some(commit) {
        notes.push(note(false, "NewCommit", format!("{git_ref} resolved to {}", short_commit(commit))));
    }
    s.target_commit = Some(commit.to_string());
    s.target_commit_short = Some(short_commit(commit));
    (s, notes)
}

/// What a rollout step found and did.
#[derive(Debug, Clone, Default)]
pub struct Rollout<'a> {
    pub commit: &'a str,
    /// The target the waves roll out (`{commit}/{generation}...`).
    pub target: &'a str,
    /// What the waves decided (each wave's state, the current wave).
    pub waves: Option<&'a crate::waves::Decision>,
    /// Record an Event per wave transition (the spec has waves, not just the implicit one).
    pub wave_events: bool,
    /// A failed wave's machines are being returned to the previous commit (RollbackAndHalt).
    pub rolling_back: bool,
    /// Sites of the machines whose job waits for an executor that serves their site (one entry per machine).
    pub waiting_sites: &'a [String],
    /// The planner's counts before this step published.
    pub counts: Counts,
    /// Jobs this step published.
    pub published: u32,
    /// Why the planner holds back, if it does.
    pub hold: Option<Hold>,
    /// Selected Machines whose spec is invalid (they get nothing and are not counted).
    pub invalid_machines: &'a [String],
    /// Selected Machines that another configuration manages, each with its name (they get nothing from this one
    /// and are not counted).
    pub contested_machines: &'a [(String, String)],
    /// The latest lastAppliedTime of the machines.
    pub last_applied: Option<Time>,
}

/// How many invalid Machines a message names before it says "and N more".
const NAMED: usize = 10;

/// The status after a rollout step: counts, Ready (RolloutComplete once every machine runs the commit),
/// Progressing (jobs in flight, or why the rollout holds) and Degraded (failed or invalid machines).
pub fn configuration_status(
    previous: &NixosConfigurationStatus,
    r: &Rollout,
    generation: Option<i64>,
) -> (NixosConfigurationStatus, Vec<Note>) {
    let mut s = observed(previous, generation);
    let mut notes = Vec::new();
    let c = r.counts;
    let short = short_commit(r.commit);
    let before = (s.total, s.updated);
    s.total = c.total;
    s.updated = c.updated;
    s.failed = c.failed;
    s.in_progress = c.in_progress + r.published;
    s.progress = Some(format!("{}/{}", c.updated, c.total));

    if let Some(d) = r.waves {
        if r.wave_events {
            notes.extend(wave_notes(&s, r.target, &d.statuses));
        }
        s.waves = d.statuses.clone();
        s.current_wave = d.current.clone();
        s.waves_target = Some(r.target.to_string());
    }
    // Done once every machine runs the commit and no wave still soaks or waits for approval.
    let wave_open = r.waves.and_then(|d| d.current.as_deref());
    let ready = c.total > 0 && c.updated == c.total && wave_open.is_none();
    // Announced already: this commit was recorded applied on these very counts (Ready went false since only
    // because something else was briefly unavailable, say the Git remote for one poll).
    let announced = s.applied_commit.as_deref() == Some(r.commit) && before == (c.total, c.updated)
        || conditions::is_true(&s.conditions, Type::Ready);
    if ready && !announced {
        notes.push(note(false, "RolloutComplete", format!("all {} machines run {short}", c.total)));
    }
    if ready {
        s.applied_commit = Some(r.commit.to_string());
        s.last_applied_time = r.last_applied.clone();
    }
    let (reason, message) = match (ready, c.total) {
        (true, _) => ("RolloutComplete", format!("{}/{} machines at {short}", c.updated, c.total)),
        (false, 0) => ("NoMachines", "no machine matches".to_string()),
        (false, _) => {
            let wave = wave_open.map(|w| format!(" (wave {w})")).unwrap_or_default();
            ("RollingOut", format!("{}/{} machines at {short}{wave}", c.updated, c.total))
        }
    };
    conditions::set(&mut s.conditions, Type::Ready, ready, reason, &message, generation);

    let progressing = s.in_progress > 0 || r.rolling_back;
    let hold = r.hold.map(|h| format!("{h:?}"));
    let reason = match (&hold, progressing) {
        (_, true) if r.rolling_back => "RollingBack",
        (_, true) => "JobsInFlight",
        (Some(h), false) => h.as_str(),
        (None, false) => "Idle",
    };
    let mut message = format!("{} in flight", s.in_progress);
    if !r.waiting_sites.is_empty() {
        let sites: std::collections::BTreeSet<&str> = r.waiting_sites.iter().map(String::as_str).collect();
        let sites = sites.into_iter().collect::<Vec<_>>().join(", ");
        message.push_str(&format!("; {} wait for an executor serving site {sites}", r.waiting_sites.len()));
    }
    conditions::set(&mut s.conditions, Type::Progressing, progressing, reason, &message, generation);

    // Failed, invalid and contested machines are all named: none hides another.
    let named = |names: Vec<String>| {
        let n = names.len();
        let more = if n > NAMED { format!(" and {} more", n - NAMED) } else { String::new() };
        format!("{}{more}", names.into_iter().take(NAMED).collect::<Vec<_>>().join(", "))
    };
    let invalid = (!r.invalid_machines.is_empty()).then(|| {
        let (n, names) = (r.invalid_machines.len(), named(r.invalid_machines.to_vec()));
        format!("{n} selected Machine(s) have an invalid spec and get nothing: {names} (see their Invalid condition)")
    });
    let contested = (!r.contested_machines.is_empty()).then(|| {
        let n = r.contested_machines.len();
        let names = named(r.contested_machines.iter().map(|(m, by)| format!("{m} (by {by})")).collect());
        format!("{n} selected Machine(s) are managed by another configuration and get nothing from this one: {names}")
    });
    for (reason, msg) in [("InvalidMachines", &invalid), ("MachineConflict", &contested)] {
        if let Some(msg) = msg
            && !conditions::message(&s.conditions, Type::Degraded).is_some_and(|m| m.contains(msg.as_str()))
        {
            notes.push(note(true, reason, msg.clone()));
        }
    }
    let failed = (c.failed > 0).then(|| format!("{} machine(s) failed at this target", c.failed));
    let problems: Vec<(&str, String)> =
        [("MachinesFailed", failed), ("InvalidMachines", invalid), ("MachineConflict", contested)]
            .into_iter()
            .filter_map(|(reason, m)| m.map(|m| (reason, m)))
            .collect();
    let reason = problems.first().map_or("AsExpected", |p| p.0);
    let message = problems.iter().map(|p| p.1.as_str()).collect::<Vec<_>>().join("; ");
    conditions::set(&mut s.conditions, Type::Degraded, reason != "AsExpected", reason, &message, generation);
    (s, notes)
}

/// An Event for each wave whose state changed (against the states recorded for the same target).
fn wave_notes(previous: &NixosConfigurationStatus, target: &str, waves: &[WaveStatus]) -> Vec<Note> {
    let same = previous.waves_target.as_deref() == Some(target);
    let mut notes = Vec::new();
    for w in waves {
        let before = previous.waves.iter().find(|p| same && p.name == w.name).map(|p| p.state);
        if before == Some(w.state) || (before.is_none() && w.state == WaveState::Pending) {
            continue;
        }
        let counts = format!("{}/{} updated, {} failed", w.updated, w.total, w.failed);
        let detail = w.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
        let message = format!("wave {} {:?} ({counts}){detail}", w.name, w.state);
        notes.push(note(w.state == WaveState::Failed, &format!("Wave{:?}", w.state), message));
    }
    notes
}

fn observed(previous: &NixosConfigurationStatus, generation: Option<i64>) -> NixosConfigurationStatus {
    NixosConfigurationStatus { observed_generation: generation, ..previous.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C1: &str = "1111111111111111111111111111111111111111";
    const C2: &str = "2222222222222222222222222222222222222222";

    fn cond(s: &NixosConfigurationStatus, t: &str) -> (String, String, String) {
        let c = s.conditions.iter().find(|c| c.type_ == t).unwrap_or_else(|| panic!("no {t} condition"));
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    fn reasons(notes: &[Note]) -> Vec<&str> {
        notes.iter().map(|n| n.reason.as_str()).collect()
    }

    fn counts(total: u32, updated: u32, failed: u32, in_progress: u32) -> Counts {
        Counts { total, updated, failed, in_progress }
    }

    #[test]
    fn rollout_steps_set_counts_conditions_and_events() {
        struct Case {
            name: &'static str,
            counts: Counts,
            published: u32,
            hold: Option<Hold>,
            invalid: Vec<String>,
            ready: &'static str,
            progressing: (&'static str, &'static str),
            degraded: (&'static str, &'static str),
            events: Vec<&'static str>,
        }
        let cases = [
            Case {
                name: "first step publishes",
                counts: counts(3, 0, 0, 0),
                published: 3,
                hold: None,
                invalid: vec![],
                ready: "RollingOut",
                progressing: ("True", "JobsInFlight"),
                degraded: ("False", "AsExpected"),
                events: vec![],
            },
            Case {
                name: "all updated",
                counts: counts(3, 3, 0, 0),
                published: 0,
                hold: None,
                invalid: vec![],
                ready: "RolloutComplete",
                progressing: ("False", "Idle"),
                degraded: ("False", "AsExpected"),
                events: vec!["RolloutComplete"],
            },
            Case {
                name: "nothing selected",
                counts: counts(0, 0, 0, 0),
                published: 0,
                hold: None,
                invalid: vec![],
                ready: "NoMachines",
                progressing: ("False", "Idle"),
                degraded: ("False", "AsExpected"),
                events: vec![],
            },
            Case {
                name: "paused",
                counts: counts(3, 1, 0, 0),
                published: 0,
                hold: Some(Hold::Paused),
                invalid: vec![],
                ready: "RollingOut",
                progressing: ("False", "Paused"),
                degraded: ("False", "AsExpected"),
                events: vec![],
            },
            Case {
                name: "over the failure budget",
                counts: counts(3, 1, 2, 0),
                published: 0,
                hold: Some(Hold::FailureBudgetExceeded),
                invalid: vec![],
                ready: "RollingOut",
                progressing: ("False", "FailureBudgetExceeded"),
                degraded: ("True", "MachinesFailed"),
                events: vec![],
            },
            Case {
                name: "invalid machines are named",
                counts: counts(1, 1, 0, 0),
                published: 0,
                hold: None,
                invalid: vec!["m2".into()],
                ready: "RolloutComplete",
                progressing: ("False", "Idle"),
                degraded: ("True", "InvalidMachines"),
                events: vec!["RolloutComplete", "InvalidMachines"],
            },
        ];
        for case in cases {
            let (before, _) = resolved(&NixosConfigurationStatus::default(), "main", C1, Some(1));
            let step = Rollout {
                commit: C1,
                counts: case.counts,
                published: case.published,
                hold: case.hold,
                invalid_machines: &case.invalid,
                ..Default::default()
            };
            let (s, notes) = configuration_status(&before, &step, Some(1));
            let n = case.name;
            assert_eq!(cond(&s, "Ready").1, case.ready, "{n}");
            let p = cond(&s, "Progressing");
            assert_eq!((p.0.as_str(), p.1.as_str()), case.progressing, "{n}");
            let d = cond(&s, "Degraded");
            assert_eq!((d.0.as_str(), d.1.as_str()), case.degraded, "{n}");
            assert_eq!(reasons(&notes), case.events, "{n}");
            assert_eq!(s.in_progress, case.counts.in_progress + case.published, "{n}");
            assert_eq!(s.progress, Some(format!("{}/{}", case.counts.updated, case.counts.total)), "{n}");
            assert_eq!(s.observed_generation, Some(1), "{n}");
            // the same step again records nothing new and changes nothing
            let (again, notes) = configuration_status(&s, &step, Some(1));
            assert!(notes.is_empty(), "{n}: {:?}", reasons(&notes));
            assert_eq!(again, s, "{n}");
        }
    }

    #[test]
    fn the_applied_commit_moves_only_when_every_machine_runs_the_new_one() {
        let (s, _) = resolved(&NixosConfigurationStatus::default(), "main", C1, Some(1));
        let done = Rollout { commit: C1, counts: counts(2, 2, 0, 0), ..Default::default() };
        let (s, _) = configuration_status(&s, &done, Some(1));
        assert_eq!(s.applied_commit.as_deref(), Some(C1));
        let (s, notes) = resolved(&s, "main", C2, Some(1));
        assert_eq!(reasons(&notes), ["NewCommit"]);
        assert_eq!(notes[0].message, "main resolved to 222222222222");
        let half = Rollout { commit: C2, counts: counts(2, 1, 0, 1), ..Default::default() };
        let (s, notes) = configuration_status(&s, &half, Some(1));
        assert!(notes.is_empty());
        assert_eq!(s.applied_commit.as_deref(), Some(C1), "not every machine runs C2 yet");
        assert_eq!(cond(&s, "Ready").0, "False");
        let done = Rollout { commit: C2, counts: counts(2, 2, 0, 0), ..Default::default() };
        let (s, notes) = configuration_status(&s, &done, Some(1));
        assert_eq!(reasons(&notes), ["RolloutComplete"]);
        assert_eq!(s.applied_commit.as_deref(), Some(C2));
        // the same commit resolved again is not news
        assert!(resolved(&s, "main", C2, Some(1)).1.is_empty());
    }

    #[test]
    fn invalid_and_degraded_report_once_per_message_and_keep_the_counts() {
        let (s, _) = resolved(&NixosConfigurationStatus::default(), "main", C1, Some(1));
        let (s, _) = configuration_status(
            &s,
            &Rollout { commit: C1, counts: counts(2, 2, 0, 0), ..Default::default() },
            Some(1),
        );
        let (d, notes) = degraded(&s, "GitUnreachable", "cannot reach the repo", Some(2));
        assert_eq!(reasons(&notes), ["GitUnreachable"]);
        assert_eq!(cond(&d, "Degraded"), ("True".into(), "GitUnreachable".into(), "cannot reach the repo".into()));
        assert_eq!(cond(&d, "Ready").0, "False");
        assert_eq!((d.total, d.updated, d.target_commit.as_deref()), (2, 2, Some(C1)), "what was known stays");
        assert_eq!(d.observed_generation, Some(2));
        assert!(degraded(&d, "GitUnreachable", "cannot reach the repo", Some(2)).1.is_empty());
        assert_eq!(reasons(&degraded(&d, "GitUnreachable", "still down: timeout", Some(2)).1), ["GitUnreachable"]);

        let (i, notes) = invalid(&s, "spec.flake: bad", Some(3));
        assert_eq!(reasons(&notes), ["InvalidSpec"]);
        assert_eq!(cond(&i, "Invalid").0, "True");
        assert_eq!(cond(&i, "Ready").1, "InvalidSpec");
        assert_eq!(cond(&i, "Progressing").0, "False");
        assert!(invalid(&i, "spec.flake: bad", Some(3)).1.is_empty());
        // fixed: Valid again
        let (v, _) = resolved(&i, "main", C1, Some(4));
        assert_eq!(cond(&v, "Invalid"), ("False".into(), "Valid".into(), String::new()));
    }

    #[test]
    fn a_rollout_complete_is_announced_once_even_when_the_git_remote_was_briefly_down() {
        let (s, _) = resolved(&NixosConfigurationStatus::default(), "main", C1, Some(1));
        let done = Rollout { commit: C1, counts: counts(2, 2, 0, 0), ..Default::default() };
        let (s, notes) = configuration_status(&s, &done, Some(1));
        assert_eq!(reasons(&notes), ["RolloutComplete"]);
        // one poll could not reach the remote, the next resolves the same commit
        let (d, _) = degraded(&s, "GitUnreachable", "cannot reach the repo", Some(1));
        let (r, notes) = resolved(&d, "main", C1, Some(1));
        assert!(notes.is_empty());
        let (again, notes) = configuration_status(&r, &done, Some(1));
        assert!(notes.is_empty(), "announced twice: {:?}", reasons(&notes));
        assert_eq!(cond(&again, "Ready").0, "True");
        // a machine joins and gets the commit: that completion is news
        let grew = Rollout { commit: C1, counts: counts(3, 2, 0, 1), ..Default::default() };
        let (g, _) = configuration_status(&again, &grew, Some(1));
        let (_, notes) = configuration_status(&g, &Rollout { counts: counts(3, 3, 0, 0), ..done }, Some(1));
        assert_eq!(reasons(&notes), ["RolloutComplete"]);
    }

    #[test]
    fn failed_machines_do_not_hide_the_invalid_ones() {
        let invalid = vec!["m2".to_string()];
        let step = Rollout { commit: C1, counts: counts(2, 1, 1, 0), invalid_machines: &invalid, ..Default::default() };
        let (s, notes) = configuration_status(&NixosConfigurationStatus::default(), &step, None);
        let (status, reason, msg) = cond(&s, "Degraded");
        assert_eq!((status.as_str(), reason.as_str()), ("True", "MachinesFailed"));
        assert!(
            msg.starts_with("1 machine(s) failed at this target; 1 selected Machine(s)") && msg.contains("m2"),
            "{msg}"
        );
        assert_eq!(reasons(&notes), ["InvalidMachines"]);
        // the failure fixed: the invalid machine stays named, with no second Event for it
        let fixed = Rollout { counts: counts(2, 2, 0, 0), ..step };
        let (s, notes) = configuration_status(&s, &fixed, None);
        assert_eq!(cond(&s, "Degraded").1, "InvalidMachines");
        assert_eq!(reasons(&notes), ["RolloutComplete"]);
    }

    #[test]
    fn many_invalid_machines_are_named_up_to_ten() {
        let names: Vec<String> = (0..13).map(|i| format!("m{i:02}")).collect();
        let step = Rollout { commit: C1, counts: counts(1, 0, 0, 0), invalid_machines: &names, ..Default::default() };
        let (s, _) = configuration_status(&NixosConfigurationStatus::default(), &step, None);
        let msg = cond(&s, "Degraded").2;
        assert!(msg.starts_with("13 selected Machine(s)") && msg.contains("m09 and 3 more"), "{msg}");
        assert!(!msg.contains("m10"), "{msg}");
    }

    /// Machines another configuration manages are named with it, beside failed ones, with one Event until the
    /// set changes.
    #[test]
    fn machines_managed_elsewhere_are_named_with_their_manager() {
        let contested = vec![("m1".to_string(), "web".to_string())];
        let step =
            Rollout { commit: C1, counts: counts(2, 1, 1, 0), contested_machines: &contested, ..Default::default() };
        let (s, notes) = configuration_status(&NixosConfigurationStatus::default(), &step, None);
        let (status, reason, msg) = cond(&s, "Degraded");
        assert_eq!((status.as_str(), reason.as_str()), ("True", "MachinesFailed"));
        assert!(msg.contains("1 machine(s) failed") && msg.contains("m1 (by web)"), "{msg}");
        assert_eq!(reasons(&notes), ["MachineConflict"]);
        let (again, notes) = configuration_status(&s, &step, None);
        assert!(notes.is_empty(), "no second Event: {notes:?}");
        let alone =
            Rollout { commit: C1, counts: counts(1, 1, 0, 0), contested_machines: &contested, ..Default::default() };
        let (s, _) = configuration_status(&again, &alone, None);
        assert_eq!(cond(&s, "Degraded").1, "MachineConflict");
    }
}
