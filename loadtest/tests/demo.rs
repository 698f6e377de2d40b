#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! `make demo`'s non-interactive variant: the real binaries, two clusters, three sites, examples applied with
//! kubectl; it must exit cleanly and print the final table with every machine Applied.

use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_to_completion_and_prints_its_table() {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_nio-loadtest"))
            .args(["demo", "--machines", "12"])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .env("NIO_BIN_DIR", Path::new(env!("CARGO_BIN_EXE_nio-loadtest")).parent().unwrap())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the demo hung")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["MACHINE", "CLUSTER", "SITE", "COMMIT", "DURATION", "OUTCOME"]);
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 12, "{stdout}");
    assert!(rows.iter().all(|r| r.ends_with("Applied")), "{stdout}");
    for site in ["site-0", "site-1", "site-2"] {
        assert!(rows.iter().any(|r| r.contains(site)), "machines in {site}");
    }
    assert!(rows.iter().any(|r| r.contains("cluster-0")) && rows.iter().any(|r| r.contains("cluster-1")));
    assert!(stderr.contains("kubectl apply -f examples/") && stderr.contains("objects applied"), "{stderr}");
    assert!(stderr.contains("/metrics") && stderr.contains("invariants: all held"), "{stderr}");
}
