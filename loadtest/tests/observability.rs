#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! Alerts and dashboards are checked against the real tools: promtool for the rules, and a real Prometheus
//! scraping NIO's processes during a small scenario for every PromQL expression in `dashboards/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nio_loadtest::fleet::Latency;
use nio_loadtest::scenario::{Scenario, run};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool(args: &[&str]) -> String {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(repo().join("deploy/prometheus"))
        .output()
        .expect("promtool (make setup installs prometheus)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    assert!(promtool(&["check", "rules", "nio-alerts.yaml"]).contains("SUCCESS: 8 rules found"));
    assert!(promtool(&["test", "rules", "nio-alerts.test.yaml"]).contains("SUCCESS"));
    // every alert has a unit test and a runbook section
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/nio-alerts.yaml")).unwrap();
    let tests = std::fs::read_to_string(repo().join("deploy/prometheus/nio-alerts.test.yaml")).unwrap();
    let runbooks = std::fs::read_to_string(repo().join("docs/alerts.md")).unwrap();
    for line in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(tests.contains(&format!("alertname: {line}")), "{line} has no promtool test");
        assert!(runbooks.contains(&format!("## {line}")), "{line} has no runbook");
    }
}

#[test]
fn the_prometheus_rule_carries_the_same_rules() {
    let plain: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(repo().join("deploy/prometheus/nio-alerts.yaml")).unwrap())
            .unwrap();
    let crd: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join("deploy/overlays/prod/prometheusrule.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(plain["groups"], crd["spec"]["groups"], "deploy/overlays/prod/prometheusrule.yaml is out of date");
}

/// The down alerts select `up` by job name; in the prod overlay the job names come from the ServiceMonitor. Each
/// job an alert names is the job Prometheus gives the Service of that component, or the alert could never fire.
#[test]
fn the_prod_overlay_scrapes_each_component_under_the_job_name_its_down_alert_selects() {
    let docs = nio_loadtest::procs::kustomize(&repo().join("deploy/overlays/prod")).unwrap();
    let monitor = docs.iter().find(|d| d["kind"] == "ServiceMonitor").expect("the prod overlay has a ServiceMonitor");
    let ports: Vec<&serde_json::Value> =
        monitor["spec"]["endpoints"].as_array().unwrap().iter().map(|e| &e["port"]).collect();
    let selected = |labels: &serde_json::Value| {
        monitor["spec"]["selector"]["matchExpressions"].as_array().unwrap().iter().all(|e| {
            assert_eq!(e["operator"], "In", "the test reads In expressions only");
            e["values"].as_array().unwrap().contains(&labels[e["key"].as_str().unwrap()])
        })
    };
    // Prometheus Operator: job = the Service's label named by jobLabel, else the Service's name
    let mut jobs: Vec<(String, String)> = docs
        .iter()
        .filter(|d| d["kind"] == "Service" && selected(&d["metadata"]["labels"]))
        .filter(|d| d["spec"]["ports"].as_array().unwrap().iter().any(|p| ports.contains(&&p["name"])))
        .map(|d| {
            let job = match monitor["spec"]["jobLabel"].as_str() {
                Some(label) => d["metadata"]["labels"][label].as_str().unwrap_or_default(),
                None => d["metadata"]["name"].as_str().unwrap(),
            };
            (d["spec"]["selector"]["app.kubernetes.io/name"].as_str().unwrap().to_string(), job.to_string())
        })
        .collect();
    jobs.sort();
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/nio-alerts.yaml")).unwrap();
    let mut alerted: Vec<String> =
        rules.split("absent(up{job=\"").skip(1).map(|rest| rest.split('"').next().unwrap().to_string()).collect();
    alerted.sort();
    assert_eq!(alerted, ["nio-controller", "nio-executor"]);
    let want: Vec<(String, String)> = alerted.iter().map(|j| (j.clone(), j.clone())).collect();
    assert_eq!(jobs, want, "(component, job name Prometheus gives it) for every scraped Service");
}

/// Every Prometheus expression of the dashboards, with template variables widened.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = vec![];
    for f in ["fleet.json", "sites.json"] {
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(repo().join("dashboards").join(f)).unwrap()).unwrap();
        assert!(d["uid"].as_str().unwrap().starts_with("nio-"), "stable uid");
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap().replace("$cluster", ".*").replace("$site", ".*");
                out.push((format!("{f}: {}", p["title"].as_str().unwrap()), expr));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let s = Scenario {
        machines: 10,
        sites: 2,
        site_limit: 2,
        clusters: 1,
        executors: 2,
        failure_rate: 0.3,
        switch_latency: Latency::Fixed(Duration::from_millis(100)),
        deadline: Duration::from_secs(120),
        keep_running: true,
        // The push goes through the webhook, so its panel has data too.
        push_via: nio_loadtest::scenario::PushVia::Webhook,
        ..Default::default()
    };
    let (_report, running) = run(s, None).await.unwrap();
    let mut running = running.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut controllers, mut executors) = (vec![], vec![]);
    for (name, url) in running.metrics_endpoints() {
        let target = url.trim_start_matches("http://").trim_end_matches("/metrics").to_string();
        if name.starts_with("controller") { controllers.push(target) } else { executors.push(target) }
    }
    let config = serde_json::json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "nio-controller", "static_configs": [{"targets": controllers}]},
            {"job_name": "nio-executor", "static_configs": [{"targets": executors}]},
        ]
    });
    std::fs::write(dir.path().join("prometheus.yml"), config.to_string()).unwrap();
    let port = nio_loadtest::procs::free_port().unwrap();
    let mut prom = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (make setup installs it)");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let query = |q: String| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let url = url::Url::parse_with_params(&format!("{base}/api/v1/query"), &[("query", q.as_str())]).ok()?;
            let v: serde_json::Value = http.get(url).send().await.ok()?.json().await.ok()?;
            Some(v)
        }
    };
    // Let Prometheus take a few scrapes of every target, across a second (small) rollout's activity.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = query("count(up == 1)".into()).await
            && v["data"]["result"][0]["value"][1].as_str() == Some(&(controllers.len() + executors.len()).to_string())
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus never scraped every target: {}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut empty = vec![];
    for (panel, expr) in dashboard_queries() {
        let v = query(expr.clone()).await.unwrap_or_default();
        assert_eq!(v["status"], "success", "{panel}: `{expr}` did not evaluate: {v}");
        if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
            empty.push(format!("{panel}: {expr}"));
        }
    }
    let _ = prom.kill().await;
    running.stop().await;
    assert!(empty.is_empty(), "queries without data:\n{}", empty.join("\n"));
}
