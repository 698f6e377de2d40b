//! The rollout planner: a pure function from a configuration's target and its machines' state to the jobs
//! to publish now. No client, no clock: every rule is unit-tested here.

/// What a machine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Full install (kexec, disko, nixos-install): the machine was never installed by NIO.
    Install,
    /// nixos-rebuild with the configuration's action.
    Update,
}

/// A targeted machine as the planner sees it (from Machine status).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MachineView {
    pub name: String,
    /// A full install completed at some point (status.installedAt).
    pub installed: bool,
    pub applied_target: Option<String>,
    pub queued_target: Option<String>,
    pub failed_target: Option<String>,
}

/// Where a machine stands with a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Updated,
    Failed,
    InProgress,
    /// Needs a job.
    Candidate,
}

impl MachineView {
    /// Queued for another target (an older commit's job, waiting or running) and not finished with it: a
    /// machine under an operation all the same, which maxParallel and maxUnavailable count.
    pub fn busy_elsewhere(&self, target: &str) -> bool {
        let q = self.queued_target.as_deref();
        q.is_some_and(|q| {
            q != target && self.applied_target.as_deref() != Some(q) && self.failed_target.as_deref() != Some(q)
        })
    }

    /// Where the machine stands with `target` (its outcome first: a finished job may still be marked queued).
    pub fn standing(&self, target: &str) -> Standing {
        let is = |t: &Option<String>| t.as_deref() == Some(target);
        if is(&self.applied_target) {
            Standing::Updated
        } else if is(&self.failed_target) {
            Standing::Failed
        } else if is(&self.queued_target) {
            Standing::InProgress
        } else {
            Standing::Candidate
        }
    }
}

/// The configuration side of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    pub full_install: bool,
    pub suspend: bool,
    pub pause: bool,
    pub max_parallel: Option<u32>,
    /// Machines updated first; the rest wait until this many are updated.
    pub canary: Option<u32>,
    /// Failures tolerated; beyond it no new jobs start.
    pub failure_budget: Option<u32>,
    /// Each machine's disruption-budget claims (by name): within this configuration the plan keeps to them
    /// (executors enforce them across configurations and clusters).
    pub claims: std::collections::BTreeMap<String, Vec<nio_shared::protocol::BudgetClaim>>,
}

/// Counts of the configuration's machines for the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub total: u32,
    pub updated: u32,
    pub failed: u32,
    pub in_progress: u32,
}

/// Why nothing (more) is published, when that is the case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    Suspended,
    Paused,
    FailureBudgetExceeded,
    WaitingForCanaries,
    MaxParallel,
    /// The current wave is applied and soaking.
    Soaking,
    /// The current wave waits for a person's approval.
    AwaitingApproval,
    /// Every machine that could start counts against a disruption budget that is full.
    DisruptionBudget,
    /// As many jobs in flight as the failure budget still tolerates failures, plus one.
    FailureBudgetInFlight,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub publish: Vec<(String, Work)>,
    pub counts: Counts,
    pub hold: Option<Hold>,
}

/// Decides which machines get a job for `target` now. Machines are taken in name order so plans are stable.
pub fn plan(target: &str, policy: &Policy, machines: &[MachineView]) -> Plan {
    plan_within(target, policy, machines, None)
}

/// [`plan`] within what the waves allow: only the current wave's eligible machines, at most its room, and
/// nothing while a wave soaks, waits for approval or has halted the rollout (the waves judge failure budgets).
pub fn plan_within(
    target: &str,
    policy: &Policy,
    machines: &[MachineView],
    waves: Option<&crate::waves::Decision>,
) -> Plan {
    let mut counts = Counts { total: machines.len() as u32, ..Default::default() };
    let mut candidates: Vec<&MachineView> = Vec::new();
    for m in machines {
        match m.standing(target) {
            Standing::Updated => counts.updated += 1,
            Standing::Failed => counts.failed += 1,
            Standing::InProgress => counts.in_progress += 1,
            Standing::Candidate if waves.is_none_or(|d| d.eligible.contains(&m.name)) => candidates.push(m),
            Standing::Candidate => {}
        }
    }
    candidates.sort_by(|a, b| a.name.cmp(&b.name));
    let mut plan = Plan { counts, ..Default::default() };
    let hold = if policy.suspend {
        Some(Hold::Suspended)
    } else if policy.pause {
        Some(Hold::Paused)
    } else if let Some(g) = waves.and_then(|d| d.gate) {
        Some(match g {
            crate::waves::Gate::Soaking => Hold::Soaking,
            crate::waves::Gate::AwaitingApproval => Hold::AwaitingApproval,
            crate::waves::Gate::Halted => Hold::FailureBudgetExceeded,
        })
    } else if waves.is_none() && policy.failure_budget.is_some_and(|b| counts.failed > b) {
        Some(Hold::FailureBudgetExceeded)
    } else {
        None
    };
    if hold.is_some() || candidates.is_empty() {
        plan.hold = hold;
        return plan;
    }
    let mut capacity = waves.map_or(u32::MAX, |d| d.room);
    if let Some(m) = policy.max_parallel {
        // Machines still running (or queued for) an older commit's job count too: a push in the middle of a
        // rollout must not put maxParallel new jobs on top of the old ones.
        let busy = machines.iter().filter(|m| m.busy_elsewhere(target)).count() as u32;
        capacity = capacity.min(m.saturating_sub(counts.in_progress + busy));
    }
    if let Some(c) = policy.canary
        && counts.updated < c
    {
        // Only the canaries run until they have all succeeded.
        let canary_room = c.saturating_sub(counts.updated + counts.in_progress);
        if canary_room < capacity {
            capacity = canary_room;
            if capacity == 0 {
                plan.hold = Some(Hold::WaitingForCanaries);
                return plan;
            }
        }
    }
    let mut budget_bound = false;
    if let Some(budget) = policy.failure_budget {
        // Never more jobs in flight than the failures still tolerated, plus one.
        let in_flight_allowed = budget.saturating_sub(counts.failed) + 1;
        let room = in_flight_allowed.saturating_sub(counts.in_progress);
        budget_bound = room < capacity;
        capacity = capacity.min(room);
    }
    if capacity == 0 {
        plan.hold = Some(if budget_bound { Hold::FailureBudgetInFlight } else { Hold::MaxParallel });
        return plan;
    }
    // Disruption budgets: the machines in flight hold their slots; a candidate goes only while each of its
    // budgets has room.
    let mut used: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
    for m in machines.iter().filter(|m| m.standing(target) == Standing::InProgress) {
        for c in policy.claims.get(&m.name).into_iter().flatten() {
            *used.entry(c.key.as_str()).or_default() += 1;
        }
    }
    let mut blocked = false;
    for m in candidates {
        if plan.publish.len() >= capacity as usize {
            break;
        }
        let claims = policy.claims.get(&m.name).map(Vec::as_slice).unwrap_or_default();
        if claims.iter().any(|c| used.get(c.key.as_str()).copied().unwrap_or(0) >= c.max) {
            blocked = true;
            continue;
        }
        for c in claims {
            *used.entry(c.key.as_str()).or_default() += 1;
        }
        let work = if policy.full_install && !m.installed { Work::Install } else { Work::Update };
        plan.publish.push((m.name.clone(), work));
    }
    if plan.publish.is_empty() && blocked {
        plan.hold = Some(Hold::DisruptionBudget);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "c2/3";

    fn m(name: &str) -> MachineView {
        MachineView { name: name.into(), ..Default::default() }
    }
    fn at(name: &str, t: &str) -> MachineView {
        MachineView { applied_target: Some(t.into()), installed: true, ..m(name) }
    }
    fn queued(name: &str, t: &str) -> MachineView {
        MachineView { queued_target: Some(t.into()), ..m(name) }
    }
    fn failed(name: &str, t: &str) -> MachineView {
        MachineView { failed_target: Some(t.into()), ..m(name) }
    }
    fn names(p: &Plan) -> Vec<&str> {
        p.publish.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn machines_not_at_the_target_get_a_job() {
        let p =
            plan(T, &Policy::default(), &[at("a", T), at("b", "c1/3"), m("c"), queued("d", T), queued("e", "c1/3")]);
        assert_eq!(names(&p), ["b", "c", "e"]);
        assert_eq!(p.counts, Counts { total: 5, updated: 1, failed: 0, in_progress: 1 });
        assert_eq!(p.hold, None);
    }

    /// A push while the previous commit's jobs still run: maxParallel counts those machines (before: two new jobs
    /// on top of two old ones, four machines under an operation with maxParallel 2).
    #[test]
    fn max_parallel_counts_machines_still_busy_with_an_older_commit() {
        let policy = Policy { max_parallel: Some(2), ..Default::default() };
        let old = "c1/3";
        let machines = [m("a"), m("b"), at("c", old), queued("x", old), queued("y", old)];
        let p = plan(T, &policy, &machines);
        assert_eq!((names(&p), p.hold), (vec![], Some(Hold::MaxParallel)));
        // one old job finished (its outcome recorded): one slot
        let done = MachineView { applied_target: Some(old.into()), ..queued("x", old) };
        assert_eq!(names(&plan(T, &policy, &[m("a"), m("b"), done, queued("y", old)])), ["a"]);
    }

    #[test]
    fn a_new_generation_or_secret_hash_is_a_new_target() {
        let p = plan("c2/4", &Policy::default(), &[at("a", "c2/3")]);
        assert_eq!(names(&p), ["a"]);
        let p = plan("c2/3.abcd1234", &Policy::default(), &[at("a", "c2/3")]);
        assert_eq!(names(&p), ["a"]);
    }

    #[test]
    fn failed_targets_are_not_retried_until_the_target_changes() {
        let p = plan(T, &Policy::default(), &[failed("a", T), failed("b", "c1/3")]);
        assert_eq!(names(&p), ["b"]);
        assert_eq!(p.counts.failed, 1);
    }

    #[test]
    fn full_install_runs_once_per_machine() {
        let policy = Policy { full_install: true, ..Default::default() };
        let installed = MachineView { installed: true, applied_target: Some("c1/3".into()), ..m("old") };
        let p = plan(T, &policy, &[m("new"), installed]);
        assert_eq!(p.publish, vec![("new".to_string(), Work::Install), ("old".to_string(), Work::Update)]);
        let p = plan(T, &Policy::default(), &[m("new")]);
        assert_eq!(p.publish, vec![("new".to_string(), Work::Update)], "no install without fullInstall");
    }

    #[test]
    fn max_parallel_counts_jobs_in_flight() {
        let policy = Policy { max_parallel: Some(3), ..Default::default() };
        let p = plan(T, &policy, &[queued("a", T), m("b"), m("c"), m("d"), m("e")]);
        assert_eq!(names(&p), ["b", "c"]);
        let full = plan(T, &policy, &[queued("a", T), queued("b", T), queued("c", T), m("d")]);
        assert!(full.publish.is_empty());
        assert_eq!(full.hold, Some(Hold::MaxParallel));
    }

    #[test]
    fn suspend_and_pause_publish_nothing_but_still_count() {
        for (policy, hold) in [
            (Policy { suspend: true, ..Default::default() }, Hold::Suspended),
            (Policy { pause: true, ..Default::default() }, Hold::Paused),
        ] {
            let p = plan(T, &policy, &[m("a"), at("b", T)]);
            assert!(p.publish.is_empty());
            assert_eq!(p.hold, Some(hold));
            assert_eq!((p.counts.total, p.counts.updated), (2, 1));
        }
    }

    #[test]
    fn canaries_go_first_and_alone() {
        let policy = Policy { canary: Some(2), ..Default::default() };
        let fleet: Vec<_> = ["a", "b", "c", "d"].iter().map(|n| m(n)).collect();
        assert_eq!(names(&plan(T, &policy, &fleet)), ["a", "b"]);
        let waiting = plan(T, &policy, &[queued("a", T), queued("b", T), m("c"), m("d")]);
        assert!(waiting.publish.is_empty());
        assert_eq!(waiting.hold, Some(Hold::WaitingForCanaries));
        let one_done = plan(T, &policy, &[at("a", T), queued("b", T), m("c"), m("d")]);
        assert!(one_done.publish.is_empty(), "still waiting for b");
        let done = plan(T, &policy, &[at("a", T), at("b", T), m("c"), m("d")]);
        assert_eq!(names(&done), ["c", "d"]);
    }

    #[test]
    fn a_spent_failure_budget_stops_the_rollout() {
        let policy = Policy { failure_budget: Some(1), ..Default::default() };
        let p = plan(T, &policy, &[failed("a", T), failed("b", T), m("c")]);
        assert!(p.publish.is_empty());
        assert_eq!(p.hold, Some(Hold::FailureBudgetExceeded));
        let p = plan(T, &policy, &[failed("a", T), m("b"), m("c")]);
        assert_eq!(names(&p), ["b"], "with one failure left to tolerate, one machine at a time");
        // what holds it back then is named: the budget, not maxParallel
        let p = plan(T, &policy, &[failed("a", T), queued("b", T), m("c")]);
        assert_eq!((p.publish.len(), p.hold), (0, Some(Hold::FailureBudgetInFlight)));
        let both = Policy { max_parallel: Some(1), ..policy };
        assert_eq!(plan(T, &both, &[queued("b", T), m("c")]).hold, Some(Hold::MaxParallel));
    }

    #[test]
    fn empty_fleets_and_finished_rollouts_publish_nothing() {
        assert_eq!(plan(T, &Policy::default(), &[]), Plan::default());
        let p = plan(T, &Policy::default(), &[at("a", T), at("b", T)]);
        assert!(p.publish.is_empty());
        assert_eq!(p.counts.updated, 2);
    }

    #[test]
    fn plans_are_stable_in_name_order() {
        let policy = Policy { max_parallel: Some(2), ..Default::default() };
        let p = plan(T, &policy, &[m("z"), m("b"), m("a")]);
        assert_eq!(names(&p), ["a", "b"]);
    }

    /// For any fleet, budgets and sequence of status events, the machines in flight never exceed a budget's
    /// room: the plan adds only within it, whatever finished or failed in between.
    #[test]
    fn no_plan_exceeds_a_disruption_budget_for_any_interleaving_of_events() {
        use nio_shared::protocol::BudgetClaim;
        use proptest::prelude::*;
        proptest!(ProptestConfig { cases: 200, ..ProptestConfig::default() }, |(
            racks in proptest::collection::vec(0u8..3, 1..24),
            rack_max in 1u32..3,
            fleet_max in 1u32..6,
            events in proptest::collection::vec((0usize..24, 0u8..3), 0..60),
        )| {
            let target = "c/1";
            let mut machines: Vec<MachineView> =
                (0..racks.len()).map(|i| MachineView { name: format!("m{i:02}"), ..Default::default() }).collect();
            let claims: std::collections::BTreeMap<String, Vec<BudgetClaim>> = racks
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let mut c = vec![
                        BudgetClaim { key: "fleet".into(), max: fleet_max },
                        BudgetClaim { key: format!("rack.{r}"), max: rack_max },
                    ];
                    c.sort_by(|a, b| a.key.cmp(&b.key));
                    (format!("m{i:02}"), c)
                })
                .collect();
            let policy = Policy { claims: claims.clone(), ..Default::default() };
            let check = |machines: &[MachineView]| {
                let mut used: std::collections::BTreeMap<String, u32> = Default::default();
                for m in machines.iter().filter(|m| m.standing(target) == Standing::InProgress) {
                    for c in &claims[&m.name] {
                        *used.entry(c.key.clone()).or_default() += 1;
                    }
                }
                used.iter().all(|(k, n)| *n <= if k == "fleet" { fleet_max } else { rack_max })
            };
            for (pick, what) in events {
                let plan = plan_within(target, &policy, &machines, None);
                for (name, _) in &plan.publish {
                    if let Some(m) = machines.iter_mut().find(|m| &m.name == name) {
                        m.queued_target = Some(target.into());
                    }
                }
                prop_assert!(check(&machines), "over a budget after planning");
                // A status event: a machine in flight finishes or fails, or nothing happens.
                let n = machines.len();
                let m = &mut machines[pick % n];
                if m.standing(target) == Standing::InProgress {
                    m.queued_target = None;
                    match what {
                        0 => m.applied_target = Some(target.into()),
                        1 => m.failed_target = Some(target.into()),
                        _ => m.queued_target = Some(target.into()),
                    }
                }
            }
        });
    }
}
