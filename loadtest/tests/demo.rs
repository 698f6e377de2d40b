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

/// `demo --hold` stopped by SIGTERM (a supervisor, `kill`) stops everything it started; killed with SIGKILL,
/// its children still go (nothing can be left running after a demo or a test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_demo_leaves_no_process_behind_on_sigterm_or_sigkill() {
    use tokio::io::AsyncBufReadExt;
    for signal in ["-TERM", "-KILL"] {
        let work = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_nio-loadtest"))
            .args(["demo", "--machines", "6", "--hold"])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .env("NIO_BIN_DIR", Path::new(env!("CARGO_BIN_EXE_nio-loadtest")).parent().unwrap())
            .env("TMPDIR", work.path())
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::time::timeout(std::time::Duration::from_secs(240), async {
            while let Some(l) = lines.next_line().await.unwrap() {
                if l.contains("Press Ctrl-C to stop") {
                    return;
                }
            }
            panic!("the demo ended before holding");
        })
        .await
        .expect("the demo never held");
        let children = || {
            let out = std::process::Command::new("pgrep")
                .args(["-f", &format!("(nio-controller|nio-executor|nats-server).*{}", work.path().display())])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).lines().count()
        };
        let ours = |pattern: &str| {
            let out = std::process::Command::new("pgrep")
                .args(["-P", &child.id().unwrap().to_string(), "-f", pattern])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).lines().count()
        };
        assert!(ours("nio-controller") >= 1 && ours("nats-server") >= 1, "the demo runs its processes");
        let before = children();
        assert!(before >= 3, "{before}");
        std::process::Command::new("kill").args([signal, &child.id().unwrap().to_string()]).status().unwrap();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait()).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while children() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert_eq!(children(), 0, "processes left after {signal}");
    }
}
