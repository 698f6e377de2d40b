//! Disruption budgets (`spec.rollout.disruptionBudgets`): which budget slots a machine's job must hold. The
//! slots themselves live in NATS KV (`NIO_BUDGETS`), taken by the executor that runs the job, so a budget
//! holds across every configuration and cluster that names it. Pure.

use std::collections::BTreeMap;

use nio_shared::crd::DisruptionBudget;
use nio_shared::protocol::BudgetClaim;

use crate::waves::{amount, selector_matches};

/// The claims of the machine with `labels` under `budgets`, `fleet` being every machine of the configuration
/// (name, labels): percentages are of the covered machines there (per label value with `perLabel`).
pub fn claims(
    budgets: &[DisruptionBudget],
    labels: &BTreeMap<String, String>,
    fleet: &[(String, BTreeMap<String, String>)],
) -> Vec<BudgetClaim> {
    let covers =
        |b: &DisruptionBudget, l: &BTreeMap<String, String>| b.selector.as_ref().is_none_or(|s| selector_matches(s, l));
    let mut out = Vec::new();
    for b in budgets.iter().filter(|b| covers(b, labels)) {
        let (key, covered) = match &b.per_label {
            Some(label) => {
                // A machine without the label is in no group of this budget.
                let Some(value) = labels.get(label).filter(|v| !v.is_empty()) else { continue };
                let same = fleet.iter().filter(|(_, l)| covers(b, l) && l.get(label) == Some(value)).count();
                (format!("{}.{value}", b.name), same)
            }
            None => (b.name.clone(), fleet.iter().filter(|(_, l)| covers(b, l)).count()),
        };
        out.push(BudgetClaim { key, max: amount(&b.max_unavailable, covered, false).max(1) });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn budgets_cover_by_selector_and_split_by_label_with_percentages_of_what_they_cover() {
        let db: serde_json::Value = serde_json::json!([
            {"name": "db", "selector": {"matchLabels": {"role": "db"}}, "maxUnavailable": "10%"},
            {"name": "rack", "perLabel": "rack", "maxUnavailable": 1},
            {"name": "all", "maxUnavailable": "50%"},
        ]);
        let budgets: Vec<DisruptionBudget> = serde_json::from_value(db).unwrap();
        let mut fleet = Vec::new();
        for i in 0..30 {
            let role = if i < 20 { "db" } else { "web" };
            let rack = format!("r{}", i % 3);
            fleet.push((format!("m{i}"), labels(&[("role", role), ("rack", &rack)])));
        }
        let c = claims(&budgets, &fleet[0].1, &fleet);
        let got: Vec<(&str, u32)> = c.iter().map(|c| (c.key.as_str(), c.max)).collect();
        // 10 % of 20 db machines; one per rack; half of all 30.
        assert_eq!(got, [("all", 15), ("db", 2), ("rack.r0", 1)]);
        let web = claims(&budgets, &fleet[25].1, &fleet);
        assert_eq!(web.iter().map(|c| c.key.as_str()).collect::<Vec<_>>(), ["all", "rack.r1"], "not a db machine");
        // A small fleet still lets one machine through; a machine without the label is in no rack group.
        let tiny = vec![("x".to_string(), labels(&[("role", "db")]))];
        let c = claims(&budgets, &tiny[0].1, &tiny);
        assert_eq!(c.iter().map(|c| (c.key.as_str(), c.max)).collect::<Vec<_>>(), [("all", 1), ("db", 1)]);
        assert_eq!(amount(&IntOrString::String("10%".into()), 20, false), 2);
    }
}
