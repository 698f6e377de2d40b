#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! The whole of NIO on one machine: kubesim, a real nats-server, the real controller and executor binaries
//! and a simulated fleet. Invariants must hold, with and without injected faults.

use std::time::Duration;

use nio_loadtest::fleet::Latency;
use nio_loadtest::scenario::{Fault, PushVia, Scenario, run};

fn small() -> Scenario {
    Scenario {
        machines: 12,
        sites: 2,
        site_limit: 2,
        clusters: 2,
        executors: 2,
        switch_latency: Latency::Fixed(Duration::from_millis(300)),
        deadline: Duration::from_secs(120),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_reaches_every_machine_within_the_site_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = run(small(), Some(&dir.path().join("report.json"))).await.unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap()).unwrap();
    for key in ["machines_per_s", "efficiency", "latency_ms", "lost", "violations"] {
        assert!(json.get(key).is_some(), "report has {key}");
    }
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!((report.updated, report.failed, report.lost), (12, 0, 0));
    for (site, n) in &report.max_in_flight_per_site {
        assert!(*n <= 2, "{site}: {n} in flight");
        assert_eq!(*n, 2, "{site}: the limit is used, not just respected");
    }
    assert!(report.machines_per_s > 0.0 && report.efficiency > 0.0 && report.efficiency <= 1.0, "{report:?}");
    assert!(report.latency_ms.p50 <= report.latency_ms.p99);
    // The push came seconds after the warm-up: machines whose job went to the executor that ran their warm-up job
    // start on the connection it kept, without a login (the others log in; a machine's connection is one
    // executor's).
    assert!(
        (1..=12).contains(&report.first_command_on_kept_connection),
        "{} machines started on a kept connection",
        report.first_command_on_kept_connection
    );
    assert!(report.nats_jobs_published >= 12 && report.nats_status_published >= 12 * 3);
    assert!(
        report.processes.iter().all(|p| p.usage.cpu_seconds > 0.0 && p.usage.peak_rss_mb > 1.0),
        "{:?}",
        report.processes
    );
    // the measured rollout's share of each process's CPU, apart from the warm-up's
    assert!(
        report.processes.iter().all(|p| p.rollout_cpu_seconds > 0.0 && p.rollout_cpu_seconds < p.usage.cpu_seconds),
        "{:?}",
        report.processes
    );
    // what else shared the box: the NATS server and the simulators (this process), each busy during the rollout
    let harness: Vec<&str> = report.harness.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(harness, ["nats-0", "simulators"], "{:?}", report.harness);
    assert!(
        report.harness.iter().all(|p| p.rollout_cpu_seconds > 0.0 && p.rollout_cpu_seconds < p.usage.cpu_seconds),
        "{:?}",
        report.harness
    );
    // the controller's API requests for the rollout, counted by the controller as the apiserver names them:
    // every machine's status is written (at least its outcome), each write attempt is one request (a refused
    // one too), and nothing else is listed
    let writes = report.api_requests.get("APPLY machines/status").copied().unwrap_or(0);
    assert!(writes >= 12, "{:?}", report.api_requests);
    assert_eq!(writes, report.machine_status_writes + report.machine_status_conflicts, "{:?}", report.api_requests);
    assert!(!report.api_requests.keys().any(|k| k.starts_with("LIST")), "{:?}", report.api_requests);
    assert!(report.api_requests_per_machine >= 1.0, "{}", report.api_requests_per_machine);
    let svg = std::fs::read_to_string(report.plot.as_ref().unwrap()).unwrap();
    assert!(svg.contains("<svg") && svg.contains("site-0") && svg.contains("site-1"));
}

/// The CI-sized load test: 200 machines, 4 sites, 2 executors, one executor killed mid-rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_machines_survive_an_executor_kill_with_every_invariant() {
    let s = Scenario {
        machines: 200,
        sites: 4,
        site_limit: 10,
        clusters: 1,
        executors: 2,
        switch_latency: Latency::Fixed(Duration::from_millis(100)),
        faults: vec![Fault::KillExecutor(0.5)],
        deadline: Duration::from_secs(300),
        ..Default::default()
    };
    let (report, _) = run(s, None).await.unwrap();
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!((report.updated, report.lost), (200, 0));
    assert!(report.max_in_flight_per_site.values().all(|n| *n <= 10));
    let resumed = &report.resumed_after_fault[0];
    assert!(resumed.machines > resumed.finished_without_more, "the kill interrupted jobs that went on: {resumed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_controller_and_nats_loses_nothing() {
    let s = Scenario { faults: vec![Fault::RestartNats(0.3), Fault::RestartController(0.5)], ..small() };
    let (report, _) = run(s, None).await.unwrap();
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!((report.updated, report.lost), (12, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_build_failures_are_reported_not_lost() {
    // The push reaches the controller as a signed webhook delivery (the other scenarios use the annotation).
    let s = Scenario { failure_rate: 0.3, machines: 10, clusters: 1, push_via: PushVia::Webhook, ..small() };
    let (report, _) = run(s, None).await.unwrap();
    assert_eq!(report.lost, 0, "{report:#?}");
    assert_eq!(report.updated + report.failed, 10);
    assert_eq!(report.push_via, PushVia::Webhook);
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
}

/// A 3-member JetStream cluster (streams and the lock bucket on 3 replicas; every NIO process is given all three
/// URLs) loses the member that leads NIO_JOBS mid-rollout, for good: nothing is lost, no machine runs two
/// operations at once, no site goes over its limit, and the rollout completes on the two members left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_cluster_losing_the_jobs_leader_loses_nothing() {
    let s = Scenario { machines: 24, nats_nodes: 3, faults: vec![Fault::KillNatsNode(0.4)], ..small() };
    let (report, _) = run(s, None).await.unwrap();
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!((report.updated, report.failed, report.lost), (24, 0, 0), "{report:#?}");
    assert_eq!(report.fault_stalls_ms.len(), 1, "the fault was injected and its stall measured");
    assert!(report.max_in_flight_per_site.values().all(|n| *n <= 2));
}

/// A 3-member NATS cluster whose NIO_JOBS leader is partitioned mid-rollout (its link down: packets dropped, no
/// connection refused or closed) and healed 15 s later: the other two elect leaders, the clients on the cut-off
/// member give it up after their pings and move on; nothing lost, no machine with two operations at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_cluster_member_partitioned_mid_rollout_loses_nothing() {
    let s = Scenario { machines: 24, nats_nodes: 3, faults: vec![Fault::PartitionNatsNode(0.4)], ..small() };
    let (report, _) = run(s, None).await.unwrap();
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!((report.updated, report.failed, report.lost), (24, 0, 0), "{report:#?}");
    assert_eq!(report.fault_stalls_ms.len(), 1, "the partition happened and its stall was measured");
}

/// Hostile input at rate: 3,000 malformed job messages (not JSON, an unknown version, 200 KB of junk) arrive on
/// the sites' subjects while a rollout runs. Every one is terminated and counted; the rollout is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_at_rate_are_terminated_and_counted_while_a_rollout_runs() {
    let s = Scenario { machines: 24, clusters: 1, poison: 3000, ..small() };
    let (report, _) = run(s, None).await.unwrap();
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!((report.updated, report.failed, report.lost), (24, 0, 0), "{report:#?}");
    assert_eq!(report.poison_published, 3000);
    assert_eq!(report.poison_terminated, 3000, "every malformed message terminated and counted");
}

/// Two controller replicas; the leader is killed mid-rollout (SIGKILL: no lease release). The standby takes
/// the 5 s Lease over and finishes the rollout: nothing lost, nothing published twice into a second operation on
/// a machine (the overlap invariant), and the stall is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_controller_finishes_the_rollout_when_the_leader_dies() {
    let s =
        Scenario { machines: 24, clusters: 1, controller_replicas: 2, faults: vec![Fault::KillLeader(0.4)], ..small() };
    let (report, _) = run(s, None).await.unwrap();
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!((report.updated, report.failed, report.lost), (24, 0, 0), "{report:#?}");
    assert_eq!(report.fault_stalls_ms.len(), 1);
    assert!(report.processes.iter().any(|p| p.name == "controller-0-standby"), "{:?}", report.processes);
}

/// Waves with a failure budget, the measured commit failing its health check on every 5th machine: the rollout halts in the
/// second wave (it tolerates one failure), and no machine of the last wave runs anything (by the machines'
/// own records). With RollbackAndHalt the second wave's machines end at the warm-up commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_over_budget_halts_the_rollout_and_leaves_later_waves_alone() {
    for on_failure in ["Halt", "RollbackAndHalt"] {
        let rollout = serde_json::json!({"onFailure": on_failure, "waves": [
            {"name": "first", "count": "10%"},
            {"name": "second", "count": "30%", "maxFailures": 1, "maxUnavailable": 4},
            {"name": "rest"},
        ]});
        let s = Scenario { machines: 60, clusters: 1, broken: 0.2, rollout: Some(rollout), ..small() };
        let (report, _) = run(s, None).await.unwrap();
        assert!(report.violations.is_empty(), "{on_failure}: {:#?}", report.violations);
        assert!(report.halted, "{on_failure}: {report:#?}");
        let states: Vec<(&str, &str)> = report.waves.iter().map(|w| (w.name.as_str(), w.state.as_str())).collect();
        assert_eq!(states, [("first", "Succeeded"), ("second", "Failed"), ("rest", "Pending")], "{on_failure}");
        assert_eq!(report.waves[2].total, 36);
        assert!(report.untouched >= 36, "{on_failure}: only {} machines untouched", report.untouched);
        let second = &report.waves[1];
        if on_failure == "RollbackAndHalt" {
            assert!(report.rolled_back > 0 && second.updated == 0, "the failed wave is back: {report:#?}");
        } else {
            assert!(report.rolled_back == 0 && second.updated > 0, "Halt rolls nothing back: {report:#?}");
        }
    }
}

/// Two clusters, each with its own configuration over its half of the fleet, in the same two sites, both
/// naming the disruption budget `fleet` of two machines: by the machines' own operation records, never more than
/// two machines of the whole fleet are under an update at once (the sites alone would allow eight), and the
/// budget is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disruption_budget_holds_across_two_clusters() {
    let rollout = serde_json::json!({"disruptionBudgets": [{"name": "fleet", "maxUnavailable": 2}]});
    let s = Scenario { machines: 16, clusters: 2, site_limit: 4, rollout: Some(rollout), ..small() };
    let (report, _) = run(s, None).await.unwrap();
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!((report.updated, report.failed, report.lost), (16, 0, 0), "{report:#?}");
    assert_eq!(report.max_in_flight_per_budget.get("fleet"), Some(&2), "{:?}", report.max_in_flight_per_budget);
}

/// The NATS server stalls for 6 s mid-rollout (SIGSTOP, then SIGCONT: a paused VM, a blocked disk), longer than
/// the executors' heartbeat TTL and JetStream's request timeout: requests time out, heartbeats expire, and
/// still no executor takes a live executor's machine, no site runs more than its limit, the disruption budget
/// (3 machines) holds, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_frozen_mid_rollout_breaks_no_limit() {
    let rollout = serde_json::json!({"disruptionBudgets": [{"name": "fleet", "maxUnavailable": 3}]});
    let s = Scenario {
        machines: 24,
        site_limit: 4,
        rollout: Some(rollout),
        switch_latency: Latency::Fixed(Duration::from_millis(1500)),
        faults: vec![Fault::FreezeNats(0.3)],
        ..small()
    };
    let (report, _) = run(s, None).await.unwrap();
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!((report.updated, report.failed, report.lost), (24, 0, 0), "{report:#?}");
    assert!(report.max_in_flight_per_budget.get("fleet").is_some_and(|n| *n <= 3), "{report:#?}");
}
