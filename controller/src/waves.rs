//! Waves: which machines roll out when. Pure, like the planner: given the waves of the spec, the machines, the
//! wave states last recorded for this target and the time, it decides each wave's state, the machines that may
//! get a job now and how many, and when to look again (a soak ending). Every rule is unit-tested here.
//!
//! A wave starts once every wave before it Succeeded: applied (every machine at the target, or failed within
//! the wave's budget), soaked for `soak`, and approved if it pauses. A wave over its failure budget, or any
//! wave once the whole rollout is over `maxFailures`, Fails, and nothing after it starts (the rollout is halted)
//! until a new commit, or the resume annotation for this commit.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nio_shared::crd::{WaveSpec, WaveState, WaveStatus};

use crate::conditions::{chrono_of, time};
use crate::rollout::{MachineView, Standing};

/// A wave with its machines and its limits as numbers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Wave {
    pub name: String,
    pub machines: Vec<String>,
    pub max_unavailable: Option<u32>,
    pub max_failures: Option<u32>,
    pub soak: Duration,
    pub pause: bool,
    /// The health gate measured during the soak.
    pub analysis: Option<Analysis>,
}

/// A wave's analysis, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    pub query: String,
    pub condition: nio_shared::analysis::Condition,
    /// The condition as written, for messages.
    pub written: String,
    pub interval: Duration,
    pub failure_limit: u32,
}

impl Eq for Analysis {}

impl Analysis {
    fn of(a: &nio_shared::crd::WaveAnalysis) -> Option<Analysis> {
        Some(Analysis {
            query: a.query.clone(),
            condition: nio_shared::analysis::Condition::parse(&a.success_condition).ok()?,
            written: a.success_condition.trim().to_string(),
            interval: a
                .interval
                .as_deref()
                .and_then(|i| nio_shared::validate::duration("interval", i).ok())
                .unwrap_or(Duration::from_secs(30))
                .max(Duration::from_secs(1)),
            failure_limit: a.failure_limit,
        })
    }

    /// Whether a measurement is due: never measured, or the last one `interval` ago.
    pub fn due(&self, status: Option<&nio_shared::crd::AnalysisStatus>, now: DateTime<Utc>) -> bool {
        status
            .and_then(|a| a.last_time.as_ref())
            .is_none_or(|t| now.signed_duration_since(chrono_of(&t.0)).to_std().is_ok_and(|d| d >= self.interval))
    }
}

/// `v` of `of`: a number as is, a percentage rounded up (`up`) or down.
pub fn amount(v: &IntOrString, of: usize, up: bool) -> u32 {
    match v {
        IntOrString::Int(n) => u32::try_from(*n).unwrap_or(0),
        IntOrString::String(s) => {
            let pct: u64 = s.trim_end_matches('%').trim().parse().unwrap_or(0);
            let scaled = of as u64 * pct;
            let n = if up { scaled.div_ceil(100) } else { scaled / 100 };
            u32::try_from(n).unwrap_or(u32::MAX)
        }
    }
}

/// Whether `labels` match `sel` (matchLabels and matchExpressions).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    selector_matches_by(sel, |k| labels.get(k).map(String::as_str))
}

/// Whether the labels `label` looks up match `sel`.
pub fn selector_matches_by<'a>(sel: &LabelSelector, label: impl Fn(&str) -> Option<&'a str>) -> bool {
    let ok_labels = sel.match_labels.iter().flatten().all(|(k, v)| label(k) == Some(v.as_str()));
    let ok_exprs = sel.match_expressions.iter().flatten().all(|e| {
        let vals = e.values.as_deref().unwrap_or_default();
        let has = |v: &str| vals.iter().any(|x| x == v);
        match e.operator.as_str() {
            "In" => label(&e.key).is_some_and(has),
            "NotIn" => label(&e.key).is_none_or(|v| !has(v)),
            "Exists" => label(&e.key).is_some(),
            "DoesNotExist" => label(&e.key).is_none(),
            // Validation rejects other operators; should one get here, it selects nothing.
            _ => false,
        }
    });
    ok_labels && ok_exprs
}

/// Whether no labels can match both `a` and `b`, as far as their required values tell: a key both require
/// (`matchLabels`, or `In`) with no value in common, or one requires what the other forbids (`DoesNotExist`,
/// `NotIn`). False when it cannot tell.
pub fn selectors_disjoint(a: &LabelSelector, b: &LabelSelector) -> bool {
    // The common case first, without allocating (this runs for every neighbour at every fleet reconcile): both
    // require one key to take different values, as fleets selected by `fleet: <name>` do.
    if let (Some(la), Some(lb)) = (&a.match_labels, &b.match_labels)
        && la.iter().any(|(k, v)| lb.get(k).is_some_and(|w| w != v))
    {
        return true;
    }
    // Per selector: the values each key must take (None: must be absent), from matchLabels, In and DoesNotExist.
    fn required(s: &LabelSelector) -> Vec<(&str, Option<Vec<&str>>)> {
        let labels = s.match_labels.iter().flatten().map(|(k, v)| (k.as_str(), Some(vec![v.as_str()])));
        let exprs = s.match_expressions.iter().flatten().filter_map(|e| {
            let vals = || e.values.iter().flatten().map(String::as_str).collect();
            match e.operator.as_str() {
                "In" => Some((e.key.as_str(), Some(vals()))),
                "DoesNotExist" => Some((e.key.as_str(), None)),
                _ => None,
            }
        });
        labels.chain(exprs).collect()
    }
    let excluded = |s: &LabelSelector, key: &str, value: &str| {
        s.match_expressions
            .iter()
            .flatten()
            .any(|e| e.key == key && e.operator == "NotIn" && e.values.iter().flatten().any(|v| v == value))
    };
    let (ra, rb) = (required(a), required(b));
    let clash = |x: &[(&str, Option<Vec<&str>>)], y: &[(&str, Option<Vec<&str>>)]| {
        x.iter().any(|(k, vx)| {
            y.iter().any(|(l, vy)| {
                k == l
                    && match (vx, vy) {
                        (Some(vx), Some(vy)) => !vx.iter().any(|v| vy.contains(v)),
                        (None, None) => false,
                        _ => true,
                    }
            })
        })
    };
    let forbidden = |x: &[(&str, Option<Vec<&str>>)], other: &LabelSelector| {
        x.iter().any(|(k, v)| v.as_ref().is_some_and(|vs| !vs.is_empty() && vs.iter().all(|v| excluded(other, k, v))))
    };
    clash(&ra, &rb) || forbidden(&ra, b) || forbidden(&rb, a)
}

/// Puts each machine (name, labels) into a wave, in name order: the first wave whose selector matches it and
/// whose count has room, or, without a selector, whose count has room; the last wave takes the rest. Without
/// waves in the spec, one wave (`all`) has every machine. Percentages are of all machines.
pub fn layout(spec: &[WaveSpec], machines: &[(String, BTreeMap<String, String>)]) -> Vec<Wave> {
    let total = machines.len();
    let mut sorted: Vec<&(String, BTreeMap<String, String>)> = machines.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    if spec.is_empty() {
        return vec![Wave {
            name: "all".into(),
            machines: sorted.iter().map(|m| m.0.clone()).collect(),
            ..Default::default()
        }];
    }
    let mut waves: Vec<Wave> = spec
        .iter()
        .map(|w| Wave {
            name: w.name.clone(),
            pause: w.pause,
            soak: w.soak.as_deref().and_then(|s| nio_shared::validate::duration("soak", s).ok()).unwrap_or_default(),
            analysis: w.analysis.as_ref().and_then(Analysis::of),
            ..Default::default()
        })
        .collect();
    let caps: Vec<Option<u32>> = spec.iter().map(|w| w.count.as_ref().map(|c| amount(c, total, true).max(1))).collect();
    let last = spec.len() - 1;
    for m in sorted {
        let slot = spec.iter().enumerate().position(|(i, w)| {
            let room = caps[i].is_none_or(|c| (waves[i].machines.len() as u32) < c);
            let selected = w.selector.as_ref().is_none_or(|s| selector_matches(s, &m.1));
            // A wave with neither selector nor count is the catch-all; only the last one is.
            let bounded = w.selector.is_some() || w.count.is_some();
            i != last && bounded && room && selected
        });
        waves[slot.unwrap_or(last)].machines.push(m.0.clone());
    }
    for (w, s) in waves.iter_mut().zip(spec) {
        let n = w.machines.len();
        w.max_unavailable = s.max_unavailable.as_ref().map(|v| amount(v, n, false).max(1));
        w.max_failures = s.max_failures.as_ref().map(|v| amount(v, n, false));
    }
    waves
}

/// Why no (more) jobs start in the rollout's current wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The current wave is applied and soaking.
    Soaking,
    /// The current wave waits for approval.
    AwaitingApproval,
    /// A wave (or the whole rollout) is over its failure budget.
    Halted,
}

/// What the waves allow now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    pub statuses: Vec<WaveStatus>,
    /// The first wave not Succeeded.
    pub current: Option<String>,
    /// Machines of the current wave that may get a job, and how many jobs may start now.
    pub eligible: BTreeSet<String>,
    pub room: u32,
    pub gate: Option<Gate>,
    /// The wave that Failed (halting the rollout), if one did.
    pub failed_wave: Option<String>,
    /// When a soak ends: look again then.
    pub wake_in: Option<Duration>,
}

/// Everything [`decide`] reads besides the waves.
pub struct Facts<'a> {
    pub target: &'a str,
    pub machines: &'a [MachineView],
    /// The wave states recorded for `target` (empty for a new target).
    pub recorded: &'a [WaveStatus],
    pub now: DateTime<Utc>,
    /// The wave approved for this target (from the approve annotation), if any.
    pub approved: Option<&'a str>,
    /// A new resume of this target (the annotation names its commit, with a value not acted on yet): the
    /// failures so far are forgiven (each wave records them) and the halt, if any, is lifted.
    pub resume: bool,
    /// Failures tolerated over the whole rollout.
    pub max_failures: Option<u32>,
}

/// Why the wave has failed, if it has: over its own failure budget, the rollout over its budget, its analysis
/// (`measured`) past its limit, or failed already (unless resumed now). Failures a resume forgave do not count.
fn failure(
    w: &Wave,
    s: &WaveStatus,
    prev: Option<&WaveStatus>,
    measured: Option<&nio_shared::crd::AnalysisStatus>,
    f: &Facts,
    (total_failed, total_forgiven): (u32, u32),
    overall_over: bool,
) -> Option<String> {
    let was_failed = !f.resume && prev.is_some_and(|p| p.state == WaveState::Failed);
    let counted = s.failed.saturating_sub(s.forgiven);
    let over_wave = w.max_failures.is_some_and(|b| counted > b);
    // A failed analysis fails the wave like failed machines do.
    let analysis_failed = w.analysis.as_ref().zip(measured).filter(|(a, m)| m.failures > a.failure_limit);
    if !(was_failed || over_wave || overall_over || analysis_failed.is_some()) {
        return None;
    }
    let since = |n: u32, forgiven: u32| {
        if forgiven > 0 { format!("{n} more machines failed after the resume") } else { format!("{n} machines failed") }
    };
    Some(match (over_wave, w.max_failures, analysis_failed) {
        (true, Some(b), _) if s.forgiven == 0 => {
            format!("{} of {} machines failed (the wave tolerates {b})", s.failed, s.total)
        }
        (true, Some(b), _) => format!("{} in the wave (it tolerates {b})", since(counted, s.forgiven)),
        _ if overall_over => format!(
            "{} in the rollout (it tolerates {})",
            since(total_failed.saturating_sub(total_forgiven), total_forgiven),
            f.max_failures.unwrap_or_default()
        ),
        (_, _, Some((a, m))) if !was_failed => format!(
            "analysis failed {} of {} times (it tolerates {}): {} — {}",
            m.failures,
            m.runs,
            a.failure_limit,
            a.query,
            m.last_result.as_deref().unwrap_or("no result")
        ),
        // The failure as first recorded (what the reconcile appended after "; " is redone each time).
        _ => prev
            .and_then(|p| p.message.as_deref())
            .and_then(|m| m.split("; ").next())
            .map_or_else(|| "over its failure budget".into(), str::to_string),
    })
}

/// A wave's counts by machine standing, and its machines that may get the target.
fn tally(w: &Wave, by_name: &BTreeMap<&str, &MachineView>, target: &str) -> (WaveStatus, Vec<String>) {
    let mut s = WaveStatus { name: w.name.clone(), total: w.machines.len() as u32, ..Default::default() };
    let mut candidates = Vec::new();
    for name in &w.machines {
        let Some(m) = by_name.get(name.as_str()) else { continue };
        match m.standing(target) {
            Standing::Updated => s.updated += 1,
            Standing::Failed => s.failed += 1,
            Standing::InProgress => s.in_progress += 1,
            Standing::Candidate => candidates.push(name.clone()),
        }
    }
    (s, candidates)
}

/// What a paused wave waits for: the approve annotation naming it and the target's commit.
fn approval_message(w: &Wave, target: &str) -> String {
    let commit = target.split('/').next().unwrap_or_default();
    let short: String = commit.chars().take(12).collect();
    format!(
        "waiting for approval: annotate the configuration {}={}@{short}",
        nio_shared::crd::APPROVE_ANNOTATION,
        w.name
    )
}

/// What a soaking wave waits for.
fn soak_message(w: &Wave, soaked: DateTime<Utc>, measured: Option<&nio_shared::crd::AnalysisStatus>) -> String {
    let until = soaked.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    match &w.analysis {
        Some(a) => {
            let so_far = measured
                .map_or("not measured yet".into(), |m| format!("{} measurements, {} failed", m.runs, m.failures));
            format!("soaking until {until} while `{}` holds ({so_far})", a.written)
        }
        None => format!("soaking until {until}"),
    }
}

/// Each wave's state and what may run now.
pub fn decide(waves: &[Wave], f: &Facts) -> Decision {
    let by_name: BTreeMap<&str, &MachineView> = f.machines.iter().map(|m| (m.name.as_str(), m)).collect();
    let total_failed = f.machines.iter().filter(|m| m.standing(f.target) == Standing::Failed).count() as u32;
    // What resumes forgave: the failures of each wave when it was resumed (recorded), or all of them now.
    let forgiven_of = |w: &Wave, failed: u32| match f.resume {
        true => failed,
        false => f.recorded.iter().find(|r| r.name == w.name).map_or(0, |r| r.forgiven),
    };
    let total_forgiven = if f.resume { total_failed } else { f.recorded.iter().map(|r| r.forgiven).sum() };
    let overall_over = f.max_failures.is_some_and(|b| total_failed.saturating_sub(total_forgiven) > b);
    let mut d = Decision::default();
    let mut open = true;
    let mut stragglers = Vec::new();
    for w in waves {
        let prev = f.recorded.iter().find(|r| r.name == w.name);
        let (mut s, candidates) = tally(w, &by_name, f.target);
        s.forgiven = forgiven_of(w, s.failed);
        s.started_at = prev.and_then(|p| p.started_at.clone());
        s.applied_at = prev.and_then(|p| p.applied_at.clone());
        s.finished_at = prev.and_then(|p| p.finished_at.clone());
        if !open {
            s.state = WaveState::Pending;
            d.statuses.push(s);
            continue;
        }
        if s.started_at.is_none() && (s.in_progress > 0 || s.failed > 0 || !candidates.is_empty()) {
            s.started_at = Some(time(f.now));
        }
        // A resume forgives the analysis' failed measurements too.
        let measured = prev
            .and_then(|p| p.analysis.clone())
            .map(|a| if f.resume { nio_shared::crd::AnalysisStatus { failures: 0, ..a } } else { a });
        let done_before = prev.is_some_and(|p| p.state == WaveState::Succeeded);
        // The rollout over its own budget fails the wave it is in, not a wave that had already succeeded: with
        // RollbackAndHalt the failed wave is the one rolled back.
        let totals = (total_failed, total_forgiven);
        if let Some(why) = failure(w, &s, prev, measured.as_ref(), f, totals, overall_over && !done_before) {
            s.state = WaveState::Failed;
            s.finished_at = s.finished_at.or_else(|| Some(time(f.now)));
            s.message = Some(why);
            s.analysis = measured;
            d.failed_wave = Some(w.name.clone());
            d.current = Some(w.name.clone());
            d.gate = Some(Gate::Halted);
            open = false;
            d.statuses.push(s);
            continue;
        }
        s.analysis = measured.clone();
        if done_before && !candidates.is_empty() {
            // A wave stays Succeeded; a machine that joined it since (or moved off the target) still gets the
            // target, alongside the current wave.
            s.state = WaveState::Succeeded;
            stragglers.extend(candidates);
            d.statuses.push(s);
            continue;
        }
        if candidates.is_empty() && s.in_progress == 0 {
            let applied_at = s.applied_at.clone().map_or(f.now, |t| chrono_of(&t.0));
            s.applied_at = Some(time(applied_at));
            let soaked = applied_at + chrono::Duration::from_std(w.soak).unwrap_or_default();
            // With an analysis the soak also waits for a first measurement.
            let unmeasured = w.analysis.is_some() && measured.as_ref().is_none_or(|m| m.runs == 0);
            if !done_before && (f.now < soaked || unmeasured) {
                s.state = WaveState::Soaking;
                let left = (soaked - f.now).to_std().unwrap_or_default();
                s.message = Some(soak_message(w, soaked, measured.as_ref()));
                let next = w
                    .analysis
                    .as_ref()
                    .map_or(left, |a| if left.is_zero() { a.interval } else { left.min(a.interval) });
                d.wake_in = Some(next);
                d.gate = Some(Gate::Soaking);
            } else if !done_before && w.pause && f.approved != Some(w.name.as_str()) {
                s.state = WaveState::Paused;
                s.message = Some(approval_message(w, f.target));
                d.gate = Some(Gate::AwaitingApproval);
            } else {
                s.state = WaveState::Succeeded;
                s.finished_at = s.finished_at.or_else(|| Some(time(f.now)));
                s.message = None;
                d.statuses.push(s);
                continue;
            }
            d.current = Some(w.name.clone());
            open = false;
            d.statuses.push(s);
            continue;
        }
        s.state = WaveState::Progressing;
        d.current = Some(w.name.clone());
        // (its machines still busy with an older commit's job are unavailable too)
        let busy = w.machines.iter().filter(|n| by_name.get(n.as_str()).is_some_and(|m| m.busy_elsewhere(f.target)));
        d.room = w.max_unavailable.map_or(u32::MAX, |u| u.saturating_sub(s.in_progress + busy.count() as u32));
        d.eligible = candidates.into_iter().collect();
        open = false;
        d.statuses.push(s);
    }
    if d.gate != Some(Gate::Halted) {
        if d.eligible.is_empty() && !stragglers.is_empty() {
            d.room = u32::MAX;
        }
        d.eligible.extend(stragglers);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T: &str = "cccccccccccccccccccccccccccccccccccccccc/1";

    fn spec(v: serde_json::Value) -> Vec<WaveSpec> {
        serde_json::from_value(v).unwrap()
    }

    fn fleet(
        n: usize,
        label: impl Fn(usize) -> Option<(&'static str, &'static str)>,
    ) -> Vec<(String, BTreeMap<String, String>)> {
        (0..n)
            .map(|i| {
                let labels = label(i).map(|(k, v)| (k.to_string(), v.to_string())).into_iter().collect();
                (format!("m{i:03}"), labels)
            })
            .collect()
    }

    fn sizes(waves: &[Wave]) -> Vec<(String, usize)> {
        waves.iter().map(|w| (w.name.clone(), w.machines.len())).collect()
    }

    #[test]
    fn machines_fall_into_waves_by_selector_then_count_and_the_last_takes_the_rest() {
        let machines = fleet(1000, |i| (i % 100 == 7).then_some(("ring", "canary")));
        let waves = layout(
            &spec(json!([
                {"name": "canary", "selector": {"matchLabels": {"ring": "canary"}}},
                {"name": "one-percent", "count": "1%"},
                {"name": "ten-percent", "count": "10%", "maxUnavailable": "25%", "maxFailures": "2%"},
                {"name": "rest", "count": 1},
            ])),
            &machines,
        );
        assert_eq!(
            sizes(&waves),
            [("canary".into(), 10), ("one-percent".into(), 10), ("ten-percent".into(), 100), ("rest".into(), 880)]
        );
        assert!(waves[0].machines.iter().all(|m| m.ends_with('7')), "the selector took the labelled machines");
        assert_eq!(waves[1].machines[0], "m000", "counts take machines in name order");
        assert_eq!((waves[2].max_unavailable, waves[2].max_failures), (Some(25), Some(2)));
        let all = layout(&[], &machines);
        assert_eq!(sizes(&all), [("all".into(), 1000)]);
        // Percentages round up to at least one machine; unavailability rounds down to at least one.
        let small = layout(
            &spec(json!([{"name": "a", "count": "1%", "maxUnavailable": "10%"}, {"name": "b"}])),
            &fleet(5, |_| None),
        );
        assert_eq!(sizes(&small), [("a".into(), 1), ("b".into(), 4)]);
        assert_eq!(small[0].max_unavailable, Some(1));
    }

    fn view(name: &str, state: &str) -> MachineView {
        let mut v = MachineView { name: name.into(), ..Default::default() };
        match state {
            "updated" => v.applied_target = Some(T.into()),
            "failed" => v.failed_target = Some(T.into()),
            "running" => v.queued_target = Some(T.into()),
            _ => {}
        }
        v
    }

    fn two_waves(soak: &str, pause: bool) -> Vec<Wave> {
        vec![
            Wave {
                name: "canary".into(),
                machines: vec!["a".into(), "b".into()],
                max_unavailable: Some(1),
                max_failures: Some(0),
                soak: nio_shared::validate::duration("soak", soak).unwrap(),
                pause,
                analysis: None,
            },
            Wave { name: "rest".into(), machines: vec!["c".into(), "d".into(), "e".into()], ..Default::default() },
        ]
    }

    fn facts<'a>(machines: &'a [MachineView], recorded: &'a [WaveStatus], now: DateTime<Utc>) -> Facts<'a> {
        Facts { target: T, machines, recorded, now, approved: None, resume: false, max_failures: None }
    }

    fn states(d: &Decision) -> Vec<WaveState> {
        d.statuses.iter().map(|s| s.state).collect()
    }

    /// A soaking wave with an analysis: it waits for a first measurement even after its soak; measurements
    /// over the failure limit fail it (halting the rollout) unless the rollout was resumed; met ones let it
    /// succeed; the next look is due at the analysis interval.
    #[test]
    fn an_analysis_gates_the_soak_and_fails_the_wave_past_its_limit() {
        use WaveState::*;
        let t0 = Utc::now();
        let mut waves = two_waves("1m", false);
        let a = nio_shared::crd::WaveAnalysis {
            query: "vector(1)".into(),
            success_condition: "result < 0.5".into(),
            interval: Some("10s".into()),
            failure_limit: 1,
        };
        waves[0].analysis = Analysis::of(&a);
        let m: Vec<MachineView> =
            ["updated", "updated", "", "", ""].iter().zip(["a", "b", "c", "d", "e"]).map(|(s, n)| view(n, s)).collect();
        let measured = |runs, failures| {
            let d = decide(&waves, &facts(&m, &[], t0));
            let mut rec = d.statuses.clone();
            rec[0].analysis = (runs > 0).then(|| nio_shared::crd::AnalysisStatus {
                runs,
                failures,
                last_time: Some(time(t0)),
                last_result: Some("1 does not meet it".into()),
            });
            rec
        };
        // applied, not measured, within the soak: soaking, next look at the interval
        let d = decide(&waves, &facts(&m, &measured(0, 0), t0));
        assert_eq!((states(&d), d.wake_in), (vec![Soaking, Pending], Some(Duration::from_secs(10))));
        assert!(d.statuses[0].message.as_deref().unwrap().contains("not measured yet"));
        // the soak is over but nothing was measured: still soaking
        let late = t0 + chrono::Duration::minutes(2);
        assert_eq!(states(&decide(&waves, &facts(&m, &measured(0, 0), late))), vec![Soaking, Pending]);
        // measured and met (failures within the limit): the soak ends, the next wave starts
        let d = decide(&waves, &facts(&m, &measured(2, 1), late));
        assert_eq!((states(&d), d.gate), (vec![Succeeded, Progressing], None));
        // past the limit: the wave fails, the rollout halts, the message names the query and the result
        let d = decide(&waves, &facts(&m, &measured(2, 2), t0));
        assert_eq!(
            (states(&d), d.gate, d.failed_wave.as_deref()),
            (vec![Failed, Pending], Some(Gate::Halted), Some("canary"))
        );
        let msg = d.statuses[0].message.clone().unwrap();
        assert!(msg.contains("analysis failed 2 of 2 times") && msg.contains("vector(1)"), "{msg}");
        // the resume annotation lets it through
        let over = measured(2, 2);
        let mut resumed = facts(&m, &over, late);
        resumed.resume = true;
        assert_eq!(states(&decide(&waves, &resumed))[0], Succeeded);
        // due: never measured, or an interval ago
        let a = waves[0].analysis.as_ref().unwrap();
        assert!(a.due(None, t0));
        let st = measured(1, 0)[0].analysis.clone().unwrap();
        assert!(!a.due(Some(&st), t0 + chrono::Duration::seconds(5)));
        assert!(a.due(Some(&st), t0 + chrono::Duration::seconds(10)));
    }

    #[test]
    fn a_wave_runs_within_its_limit_then_soaks_then_the_next_starts() {
        use WaveState::*;
        let t0 = Utc::now();
        let waves = two_waves("10m", false);
        let ms = |s: [&str; 5]| ["a", "b", "c", "d", "e"].iter().zip(s).map(|(n, s)| view(n, s)).collect::<Vec<_>>();
        // nothing done: the canary wave, one at a time
        let m = ms(["", "", "", "", ""]);
        let d = decide(&waves, &facts(&m, &[], t0));
        assert_eq!((states(&d), d.room, d.eligible.len(), d.gate), (vec![Progressing, Pending], 1, 2, None));
        assert_eq!(d.current.as_deref(), Some("canary"));
        // one running: no room
        let m = ms(["running", "", "", "", ""]);
        assert_eq!(decide(&waves, &facts(&m, &d.statuses, t0)).room, 0);
        // both applied: soaking for 10 minutes, nothing of the next wave
        let m = ms(["updated", "updated", "", "", ""]);
        let d = decide(&waves, &facts(&m, &d.statuses, t0));
        assert_eq!((states(&d), d.gate, d.eligible.len()), (vec![Soaking, Pending], Some(Gate::Soaking), 0));
        assert_eq!(d.wake_in, Some(Duration::from_secs(600)));
        let later = t0 + chrono::Duration::minutes(4);
        let d = decide(&waves, &facts(&m, &d.statuses, later));
        assert_eq!(d.wake_in, Some(Duration::from_secs(360)), "the soak is measured from when the wave was applied");
        // soaked: the next wave, without limits
        let d = decide(&waves, &facts(&m, &d.statuses, t0 + chrono::Duration::minutes(10)));
        assert_eq!((states(&d), d.room, d.eligible.len()), (vec![Succeeded, Progressing], u32::MAX, 3));
        assert_eq!(d.current.as_deref(), Some("rest"));
        // once Succeeded, a wave stays so; a machine of it off the target gets a job with the current wave
        let m2 = ms(["updated", "", "updated", "", ""]);
        let d2 = decide(&waves, &facts(&m2, &d.statuses, t0 + chrono::Duration::minutes(11)));
        assert_eq!(states(&d2), [Succeeded, Progressing]);
        assert!(d2.eligible.contains("b") && d2.eligible.contains("d"), "{:?}", d2.eligible);
        // all done
        let m = ms(["updated"; 5]);
        let d = decide(&waves, &facts(&m, &d.statuses, t0 + chrono::Duration::minutes(12)));
        assert_eq!((states(&d), d.current, d.gate), (vec![Succeeded, Succeeded], None, None));
    }

    #[test]
    fn a_pausing_wave_waits_for_an_approval_naming_it() {
        use WaveState::*;
        let t0 = Utc::now();
        let waves = two_waves("0s", true);
        let m: Vec<MachineView> = [("a", "updated"), ("b", "updated"), ("c", ""), ("d", ""), ("e", "")]
            .iter()
            .map(|(n, s)| view(n, s))
            .collect();
        let d = decide(&waves, &facts(&m, &[], t0));
        assert_eq!((states(&d), d.gate), (vec![Paused, Pending], Some(Gate::AwaitingApproval)));
        let msg = d.statuses[0].message.clone().unwrap();
        assert!(msg.contains("nixos.infra/approve=canary@cccccccccccc"), "{msg}");
        let other = Facts { approved: Some("rest"), ..facts(&m, &d.statuses, t0) };
        assert_eq!(decide(&waves, &other).gate, Some(Gate::AwaitingApproval), "approving another wave does nothing");
        let ok = Facts { approved: Some("canary"), ..facts(&m, &d.statuses, t0) };
        let d = decide(&waves, &ok);
        assert_eq!((states(&d), d.eligible.len()), (vec![Succeeded, Progressing], 3));
    }

    #[test]
    fn selectors_that_cannot_share_a_machine_are_told_apart() {
        let sel = |v: serde_json::Value| -> LabelSelector { serde_json::from_value(v).unwrap() };
        let web = sel(json!({"matchLabels": {"fleet": "web"}}));
        let cases = [
            (json!({"matchLabels": {"fleet": "db"}}), true),
            (json!({"matchLabels": {"fleet": "web", "tier": "edge"}}), false),
            (json!({"matchLabels": {"tier": "edge"}}), false),
            (json!({"matchExpressions": [{"key": "fleet", "operator": "In", "values": ["db", "cache"]}]}), true),
            (json!({"matchExpressions": [{"key": "fleet", "operator": "In", "values": ["db", "web"]}]}), false),
            (json!({"matchExpressions": [{"key": "fleet", "operator": "DoesNotExist"}]}), true),
            (json!({"matchExpressions": [{"key": "fleet", "operator": "NotIn", "values": ["web"]}]}), true),
            (json!({"matchExpressions": [{"key": "fleet", "operator": "NotIn", "values": ["db"]}]}), false),
            (json!({"matchExpressions": [{"key": "fleet", "operator": "Exists"}]}), false),
            (json!({}), false),
        ];
        for (other, disjoint) in cases {
            let other_sel = sel(other.clone());
            assert_eq!(selectors_disjoint(&web, &other_sel), disjoint, "{other}");
            assert_eq!(selectors_disjoint(&other_sel, &web), disjoint, "{other} (the other way round)");
            // never disjoint when one machine matches both
            let both: BTreeMap<String, String> = [("fleet".to_string(), "web".to_string())].into();
            if selector_matches(&other_sel, &both) {
                assert!(!disjoint, "{other}");
            }
        }
    }

    #[test]
    fn failures_over_a_wave_or_rollout_budget_halt_until_a_resume() {
        use WaveState::*;
        let t0 = Utc::now();
        let waves = two_waves("0s", false);
        let m: Vec<MachineView> = [("a", "failed"), ("b", "updated"), ("c", ""), ("d", ""), ("e", "")]
            .iter()
            .map(|(n, s)| view(n, s))
            .collect();
        // the canary tolerates no failure
        let d = decide(&waves, &facts(&m, &[], t0));
        assert_eq!(
            (states(&d), d.gate, d.failed_wave.as_deref()),
            (vec![Failed, Pending], Some(Gate::Halted), Some("canary"))
        );
        assert_eq!(d.statuses[0].message.as_deref(), Some("1 of 2 machines failed (the wave tolerates 0)"));
        assert!(d.eligible.is_empty());
        // a recorded failure stays even if the machines later look fine (e.g. rolled back to another target)
        let fine: Vec<MachineView> =
            ["a", "b", "c", "d", "e"].iter().map(|n| view(n, if *n == "b" { "updated" } else { "" })).collect();
        assert_eq!(decide(&waves, &facts(&fine, &d.statuses, t0)).gate, Some(Gate::Halted));
        // the resume annotation for this commit lets it go on; the failed machine stays out
        let resumed = Facts { resume: true, ..facts(&m, &d.statuses, t0) };
        let d2 = decide(&waves, &resumed);
        assert_eq!((states(&d2), d2.eligible.len()), (vec![Succeeded, Progressing], 3));
        assert_eq!(d2.statuses[0].forgiven, 1, "the failure so far is forgiven, and recorded");
        // later reconciles keep the forgiveness (recorded), and the budgets count only what fails after it
        let d3 = decide(&waves, &facts(&m, &d2.statuses, t0));
        assert_eq!(states(&d3), [Succeeded, Progressing]);
        let mut later = m.clone();
        later[1] = view("b", "failed");
        let d4 = decide(&waves, &facts(&later, &d3.statuses, t0));
        assert_eq!((states(&d4), d4.gate), (vec![Failed, Pending], Some(Gate::Halted)), "a new failure halts again");
        let why = d4.statuses[0].message.clone().unwrap_or_default();
        assert_eq!(why, "1 more machines failed after the resume in the wave (it tolerates 0)");
        // the rollout's own budget counts failures across waves
        let mut relaxed = two_waves("0s", false);
        relaxed[0].max_failures = Some(5);
        let overall = Facts { max_failures: Some(0), ..facts(&m, &[], t0) };
        let d5 = decide(&relaxed, &overall);
        assert_eq!(states(&d5), [Failed, Pending]);
        assert_eq!(d5.statuses[0].message.as_deref(), Some("1 machines failed in the rollout (it tolerates 0)"));
    }

    /// The rollout's own budget, broken in a later wave, fails that wave: the canary that had succeeded stays
    /// Succeeded (before: the first wave was marked Failed, and RollbackAndHalt rolled back the healthy canaries
    /// while the failing machines stayed on the bad commit).
    #[test]
    fn a_rollout_budget_broken_in_a_later_wave_fails_that_wave() {
        use WaveState::*;
        let t0 = Utc::now();
        let mut waves = two_waves("0s", false);
        waves[0].max_failures = None;
        let m: Vec<MachineView> = [("a", "updated"), ("b", "updated"), ("c", "failed"), ("d", "failed"), ("e", "")]
            .iter()
            .map(|(n, s)| view(n, s))
            .collect();
        let canary_done = [WaveStatus { name: "canary".into(), state: Succeeded, ..Default::default() }];
        let d = decide(&waves, &Facts { max_failures: Some(1), ..facts(&m, &canary_done, t0) });
        assert_eq!((states(&d), d.failed_wave.as_deref()), (vec![Succeeded, Failed], Some("rest")));
        assert_eq!(d.statuses[1].message.as_deref(), Some("2 machines failed in the rollout (it tolerates 1)"));
        assert!(d.eligible.is_empty(), "halted: {:?}", d.eligible);
    }

    /// Any fleet, any waves, any order in which jobs finish (succeeding or failing): no wave ever has more
    /// machines in flight than its maxUnavailable, the rollout never more than maxParallel, no machine of a
    /// wave gets a job before every earlier wave Succeeded, and a halted rollout starts nothing new.
    mod interleavings {
        use super::*;
        use crate::rollout::{Policy, plan_within};
        use proptest::prelude::*;

        fn wave_specs() -> impl Strategy<Value = Vec<WaveSpec>> {
            prop::collection::vec((1u32..5, prop::option::of(1u32..4), prop::option::of(0u32..3)), 1..4).prop_map(
                |ws| {
                    ws.into_iter()
                        .enumerate()
                        .map(|(i, (count, unavailable, failures))| WaveSpec {
                            name: format!("w{i}"),
                            count: Some(IntOrString::Int(count as i32)),
                            max_unavailable: unavailable.map(|u| IntOrString::Int(u as i32)),
                            max_failures: failures.map(|f| IntOrString::Int(f as i32)),
                            ..Default::default()
                        })
                        .collect()
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
            #[test]
            fn limits_and_order_hold_for_any_interleaving(
                n in 1usize..14,
                spec in wave_specs(),
                max_parallel in prop::option::of(1u32..6),
                // each step: which running machine finishes (an index into them) and whether it fails
                steps in prop::collection::vec((any::<prop::sample::Index>(), prop::bool::weighted(0.2)), 0..60),
            ) {
                let machines = fleet(n, |_| None);
                let waves = layout(&spec, &machines);
                let wave_of: BTreeMap<String, usize> =
                    waves.iter().enumerate().flat_map(|(i, w)| w.machines.iter().map(move |m| (m.clone(), i))).collect();
                let mut views: Vec<MachineView> = machines.iter().map(|(n, _)| view(n, "")).collect();
                let policy = Policy { max_parallel, ..Default::default() };
                let mut recorded: Vec<WaveStatus> = vec![];
                let now = Utc::now();
                let mut halted = false;
                // the given steps, then successes until every machine is done
                for step in steps.iter().map(Some).chain(std::iter::repeat_n(None, 2 * n + 2)) {
                    let d = decide(&waves, &facts(&views, &recorded, now));
                    let p = plan_within(T, &policy, &views, Some(&d));
                    if halted {
                        prop_assert!(p.publish.is_empty(), "a halted rollout started {:?}", p.publish);
                    }
                    halted |= d.gate == Some(Gate::Halted);
                    for (name, _) in &p.publish {
                        let w = wave_of[name];
                        prop_assert!(
                            d.statuses[..w].iter().all(|s| s.state == WaveState::Succeeded),
                            "{name} of wave {w} started before the waves ahead of it succeeded: {:?}", d.statuses
                        );
                        if let Some(v) = views.iter_mut().find(|v| &v.name == name) {
                            v.queued_target = Some(T.into());
                        }
                    }
                    let running = |pred: &dyn Fn(&str) -> bool| {
                        views.iter().filter(|v| pred(&v.name) && v.queued_target.as_deref() == Some(T)
                            && v.applied_target.is_none() && v.failed_target.is_none()).count() as u32
                    };
                    for (i, w) in waves.iter().enumerate() {
                        let in_flight = running(&|m| wave_of.get(m) == Some(&i));
                        prop_assert!(w.max_unavailable.is_none_or(|u| in_flight <= u), "wave {i}: {in_flight} in flight");
                    }
                    let total = running(&|_| true);
                    prop_assert!(max_parallel.is_none_or(|m| total <= m), "{total} in flight over maxParallel");
                    recorded = d.statuses;
                    // one running machine finishes
                    let running_now: Vec<usize> = views.iter().enumerate()
                        .filter(|(_, v)| v.queued_target.is_some() && v.applied_target.is_none() && v.failed_target.is_none())
                        .map(|(i, _)| i).collect();
                    if !running_now.is_empty() {
                        let (i, fails) = match step {
                            Some((pick, fails)) => (running_now[pick.index(running_now.len())], *fails),
                            None => (running_now[0], false),
                        };
                        if fails { views[i].failed_target = Some(T.into()) } else { views[i].applied_target = Some(T.into()) }
                    }
                }
            }
        }
    }
}
