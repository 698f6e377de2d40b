#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! A rollout on a machine whose CPUs are saturated by something else (two busy threads per core, as
//! `stress-ng --cpu` would): slower, but nothing is lost, nothing stalls for good, and every invariant holds —
//! also with a short ackWait, where a starved executor's progress acks and heartbeats arrive late.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nio_loadtest::fleet::Latency;
use nio_loadtest::scenario::{Scenario, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_under_cpu_pressure_loses_nothing() {
    let stop = Arc::new(AtomicBool::new(false));
    let spins = Arc::new(AtomicU64::new(0));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hogs: Vec<_> = (0..cores * 2)
        .map(|_| {
            let (stop, spins) = (stop.clone(), spins.clone());
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..100_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                    spins.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let s = Scenario {
        machines: 16,
        sites: 2,
        site_limit: 2,
        clusters: 1,
        executors: 2,
        failure_rate: 0.2,
        switch_latency: Latency::Fixed(Duration::from_millis(200)),
        ack_wait_seconds: 3,
        deadline: Duration::from_secs(240),
        ..Default::default()
    };
    let result = run(s, None).await;
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    let (report, _) = result.unwrap();
    assert!(spins.load(Ordering::Relaxed) > 100, "the CPU hogs ran");
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!(report.lost, 0, "{report:#?}");
    assert_eq!(report.updated + report.failed, 16, "{report:#?}");
}
