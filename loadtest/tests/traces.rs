#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! One trace per job across processes: the real controller and executor export OTLP/HTTP to a receiver in
//! this test; a trace must hold reconcile → job.publish → job.execute (and its steps) → status.publish →
//! status.apply with correct parent links over the NATS hop.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use nio_loadtest::fleet::Latency;
use nio_loadtest::scenario::{PushVia, Scenario, run};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

#[derive(Debug, Clone)]
struct Span {
    service: String,
    resource: BTreeMap<String, String>,
    name: String,
    trace: String,
    id: String,
    parent: String,
    attrs: BTreeMap<String, String>,
    /// Trace ids of the span's links.
    links: Vec<String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

async fn receiver(spans: Arc<Mutex<Vec<Span>>>) -> u16 {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let spans = spans.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).unwrap();
                let mut all = spans.lock().unwrap();
                for rs in req.resource_spans {
                    let resource: BTreeMap<String, String> = rs
                        .resource
                        .map(|r| r.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect())
                        .unwrap_or_default();
                    let service = resource.get("service.name").cloned().unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            all.push(Span {
                                service: service.clone(),
                                resource: resource.clone(),
                                name: s.name.clone(),
                                trace: hex(&s.trace_id),
                                id: hex(&s.span_id),
                                parent: hex(&s.parent_span_id),
                                attrs: s.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect(),
                                links: s.links.iter().map(|l| hex(&l.trace_id)).collect(),
                            });
                        }
                    }
                }
                ExportTraceServiceResponse::default().encode_to_vec()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_job_from_reconcile_to_status() {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let port = receiver(spans.clone()).await;
    let s = Scenario {
        // Half the builds fail, the warm-up's too: one warm-up job must succeed for a kept connection (all twelve
        // failing: 1 in 4,096).
        machines: 12,
        sites: 1,
        site_limit: 6,
        clusters: 1,
        executors: 1,
        failure_rate: 0.5,
        switch_latency: Latency::Fixed(Duration::from_millis(50)),
        deadline: Duration::from_secs(120),
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), format!("http://127.0.0.1:{port}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
        push_via: PushVia::Webhook,
        ..Default::default()
    };
    run(s, None).await.unwrap(); // stops the processes, which flush their spans
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spans = spans.lock().unwrap().clone();
    assert!(!spans.is_empty(), "no spans were exported");
    let mut census: BTreeMap<(String, String), usize> = BTreeMap::new();
    for s in &spans {
        *census.entry((s.service.clone(), s.name.clone())).or_default() += 1;
    }
    eprintln!("spans received: {census:?}");

    // The measured push came as a webhook delivery: its span, and the reconcile it caused linked to it.
    let delivery = spans
        .iter()
        .find(|s| s.name == "webhook.delivery" && s.attrs.get("nio.outcome").map(String::as_str) == Some("refreshed"))
        .expect("a webhook.delivery span that refreshed a configuration");
    assert_eq!(
        (delivery.service.as_str(), delivery.attrs.get("nio.refreshed").map(String::as_str)),
        ("nio-controller", Some("1"))
    );
    assert!(
        spans.iter().any(|s| s.name == "reconcile" && s.links.contains(&delivery.trace)),
        "no reconcile links to the delivery's trace"
    );

    let by_id: BTreeMap<&str, &Span> = spans.iter().map(|s| (s.id.as_str(), s)).collect();
    // a successful switch: its trace must hold every step
    let exec = spans
        .iter()
        .find(|s| {
            s.name == "job.execute"
                && s.attrs.get("nio.action").map(String::as_str) == Some("switch")
                && s.attrs.get("nio.outcome").map(String::as_str) == Some("succeeded")
                && spans.iter().any(|h| h.name == "health" && h.parent == s.id)
        })
        .expect("a traced, successful switch");
    let trace: Vec<&Span> = spans.iter().filter(|s| s.trace == exec.trace).collect();
    let names: BTreeSet<&str> = trace.iter().map(|s| s.name.as_str()).collect();
    for n in ["reconcile", "job.publish", "job.execute", "lock", "activate", "health", "status.publish", "status.apply"]
    {
        assert!(names.contains(n), "trace lacks {n}: {names:?}");
    }
    // How the job got its connection: a login (paced by the site's connect rate) or the connection kept from
    // the machine's warm-up job, checked alive.
    let login = names.contains("ratelimit.wait") && names.contains("ssh.connect");
    let reuse =
        trace.iter().any(|s| s.name == "ssh.reuse" && s.attrs.get("nio.outcome").map(String::as_str) == Some("reused"));
    assert!(login != reuse, "a login or a kept connection, one of them: {names:?}");
    for (name, what) in [("ssh.connect", "logins"), ("ssh.reuse", "jobs on kept connections")] {
        let s = spans.iter().find(|s| s.name == name && s.service == "nio-executor");
        assert!(s.is_some_and(|s| s.attrs.contains_key("server.address")), "{what} are traced: {census:?}");
    }
    let publish = by_id.get(exec.parent.as_str()).expect("job.execute has its parent in the trace");
    assert_eq!(
        (publish.name.as_str(), publish.service.as_str()),
        ("job.publish", "nio-controller"),
        "parent over the NATS hop"
    );
    assert_eq!(exec.service, "nio-executor");
    let reconcile = by_id.get(publish.parent.as_str()).unwrap();
    assert_eq!(reconcile.name, "reconcile");
    let connection: &[&str] = if login { &["ratelimit.wait", "ssh.connect"] } else { &["ssh.reuse"] };
    for step in ["lock", "activate", "health"].iter().chain(connection) {
        let s = trace.iter().find(|s| s.name == *step && s.parent == exec.id);
        assert!(s.is_some(), "{step} is not a child of job.execute");
    }
    let publishes: Vec<&&Span> = trace.iter().filter(|s| s.name == "status.publish" && s.parent == exec.id).collect();
    assert!(publishes.len() >= 2, "Started, steps and the final event are published under the job");
    let applied =
        trace.iter().filter(|s| s.name == "status.apply" && publishes.iter().any(|p| p.id == s.parent)).count();
    assert!(applied >= 1, "status.apply continues the trace in the controller");
    assert!(trace.iter().filter(|s| s.name == "status.apply").all(|s| s.service == "nio-controller"));
    // bounded NIO attributes and semantic conventions
    assert!(
        exec.attrs.contains_key("nio.site")
            && exec.attrs.contains_key("nio.commit")
            && exec.attrs.contains_key("nio.queue_wait_ms")
    );
    assert_eq!(reconcile.resource.get("nio.cluster").map(String::as_str), Some("cluster-0"));
    assert!(exec.resource.contains_key("nio.executor"));
    let failed = spans
        .iter()
        .find(|s| s.name == "job.execute" && s.attrs.get("nio.outcome").map(String::as_str) == Some("failed"));
    assert_eq!(
        failed.and_then(|f| f.attrs.get("error.type")).map(String::as_str),
        Some("BuildFailed"),
        "failures carry error.type"
    );

    // The Traces dashboard only asks for span names and attributes that exist.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/traces.json")).unwrap(),
    )
    .unwrap();
    let all_names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let name_re = regex::Regex::new(r#"(?:\{|&&|\|\|)\s*name = "([^"]+)""#).unwrap();
    let attr_re = regex::Regex::new(r"\b(span|resource)\.([a-z_.]+)").unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let q = t["query"].as_str().unwrap();
            for c in name_re.captures_iter(q) {
                assert!(all_names.contains(&c[1]), "{q}: no span named {}", &c[1]);
            }
            for c in attr_re.captures_iter(q) {
                let (scope, key) = (&c[1], &c[2]);
                let seen = spans
                    .iter()
                    .any(|s| if scope == "span" { s.attrs.contains_key(key) } else { s.resource.contains_key(key) });
                assert!(seen, "{q}: no span has {scope}.{key}");
            }
        }
    }
}
