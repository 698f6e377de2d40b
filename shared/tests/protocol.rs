#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! The wire format is pinned by golden files; unknown versions and values are rejected.

use chrono::{TimeZone, Utc};
use nio_shared::crd::HealthCheck;
use nio_shared::protocol::*;
use nio_shared::seal::Sealed;
use nio_shared::subjects::*;

fn golden(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

fn job() -> Job {
    Job {
        v: JOB_VERSION,
        id: JobId::new("prod", "fleet", "web-01", "0123456789abcdef0123456789abcdef01234567/3", Action::Switch),
        cluster: "prod".into(),
        namespace: "fleet".into(),
        machine: "web-01".into(),
        configuration: Some("web".into()),
        generation: 3,
        site: "dc1".into(),
        endpoint: Endpoint {
            host: "10.0.0.11".into(),
            port: 22,
            user: "root".into(),
            identity: Some("fleet-key".into()),
            host_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl".into()),
        },
        source: Some(Source {
            repo: "https://git.example.org/infra/nixos.git".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            subdir: Some("hosts".into()),
            flake_attr: "web".into(),
            credentials: Some("git-token".into()),
        }),
        action: Action::Switch,
        files: vec![
            FileEntry { path: "extra/motd.nix".into(), content: FileContent::Inline { content: "{ }\n".into() } },
            FileEntry { path: "facter.json".into(), content: FileContent::NixosFacter },
        ],
        secrets: vec![SecretFile {
            path: "wireguard.key".into(),
            sealed: Sealed { key_id: "00112233aabbccdd".into(), nonce: "AAAA".into(), ciphertext: "BBBB".into() },
            owner: Some("systemd-network".into()),
            group: Some("systemd-network".into()),
            mode: Some("0440".into()),
        }],
        secrets_hash: Some("sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into()),
        health_check: Some(HealthCheck::default()),
        rollback: true,
        confirm_timeout_seconds: 30,
        budgets: vec![BudgetClaim { key: "db.rack-7".into(), max: 2 }],
        timeout_seconds: 1800,
        enqueued_at: Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap(),
    }
}

fn event() -> StatusEvent {
    StatusEvent {
        v: STATUS_VERSION,
        job_id: job().id,
        cluster: "prod".into(),
        namespace: "fleet".into(),
        machine: "web-01".into(),
        configuration: Some("web".into()),
        generation: 3,
        action: Action::Switch,
        phase: Phase::Failed,
        step: Some(Step::Build),
        category: Some(FailureCategory::BuildFailed),
        commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
        system: None,
        booted_system: None,
        boot_id: None,
        host_key: None,
        nixos_version: None,
        facts: None,
        message: Some("nixos-rebuild exited with status 1".into()),
        log_tail: vec!["error: builder for '/nix/store/x-foo.drv' failed".into()],
        executor: "executor-0".into(),
        started_at: Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 1).unwrap(),
        at: Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 9).unwrap(),
    }
}

fn check_golden<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
    file: &str,
    value: &T,
) {
    let path = golden(file);
    let encoded = serde_json::to_string_pretty(value).unwrap() + "\n";
    if std::env::var_os("NIO_BLESS").is_some() {
        std::fs::write(&path, &encoded).unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let on_disk: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(value).unwrap(), on_disk, "{file}: wire format changed (bump `v` if intended)");
    let decoded: T = serde_json::from_str(&text).unwrap();
    assert_eq!(&decoded, value);
}

#[test]
fn job_wire_format_is_pinned() {
    check_golden("job_v1.json", &job());
    let bytes = std::fs::read(golden("job_v1.json")).unwrap();
    assert_eq!(Job::decode(&bytes).unwrap(), job());
    assert_eq!(Job::decode(&job().encode()).unwrap(), job());
}

#[test]
fn status_wire_format_is_pinned() {
    check_golden("status_v1.json", &event());
    assert_eq!(StatusEvent::decode(&event().encode()).unwrap(), event());
}

#[test]
fn unknown_versions_are_rejected_not_guessed() {
    let mut v = serde_json::to_value(job()).unwrap();
    v["v"] = 2.into();
    let err = Job::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(matches!(err, ProtocolError::UnsupportedVersion { got: 2, supported: 1, .. }), "{err}");
    assert!(err.to_string().contains("v=2"), "{err}");

    let mut v = serde_json::to_value(event()).unwrap();
    v.as_object_mut().unwrap().remove("v");
    assert!(matches!(StatusEvent::decode(&serde_json::to_vec(&v).unwrap()), Err(ProtocolError::NotAMessage { .. })));
}

#[test]
fn unknown_actions_phases_and_garbage_are_rejected() {
    let mut v = serde_json::to_value(job()).unwrap();
    v["action"] = "format-disks".into();
    let err = Job::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(matches!(err, ProtocolError::Malformed { .. }) && err.to_string().contains("format-disks"), "{err}");

    let mut v = serde_json::to_value(event()).unwrap();
    v["phase"] = "Exploded".into();
    assert!(StatusEvent::decode(&serde_json::to_vec(&v).unwrap()).is_err());

    for garbage in [&b""[..], b"null", b"[]", b"{\"v\":\"1\"}", b"\xff\xfe", b"{\"v\":1}"] {
        assert!(Job::decode(garbage).is_err(), "{garbage:?} decoded");
    }
}

#[test]
fn subjects_follow_the_design() {
    let j = job();
    assert_eq!(j.subject(), "nio.jobs.dc1.apply.prod.fleet.web-01");
    assert_eq!(
        job_subject("dc1", JobKind::Probe, "prod.eu", "fleet", "web.01"),
        "nio.jobs.dc1.probe.prod_eu.fleet.web_01"
    );
    assert_eq!(site_jobs_filter("dc1"), "nio.jobs.dc1.>");
    assert_eq!(status_subject("prod", "fleet", "web.01"), "nio.status.prod.fleet.web_01");
    assert_eq!(event().subject(), "nio.status.prod.fleet.web-01");
    assert_eq!(cluster_status_filter("prod"), "nio.status.prod.>");
    assert_eq!(status_consumer("prod"), "controller-prod");
    assert_eq!(lock_key("10.0.0.11", 22), "10.0.0.11_22");
    assert_eq!(lock_key("fd00::1", 2222), "fd00--1_2222");
    assert_eq!(Action::Scan.kind(), JobKind::Probe);
    assert_eq!(Action::Install.kind(), JobKind::Apply);
}

/// One id format for every kind of job, and the target (what the job brings the machine to) read back from it,
/// also from a retry's id.
#[test]
fn job_ids_name_their_target_for_every_kind_of_job() {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let apply = JobId::new("prod", "fleet", "web-01", &format!("{commit}/3.deadbeef"), Action::Switch);
    assert_eq!(apply.as_str(), format!("prod/fleet/web-01/{commit}/3.deadbeef/switch"));
    assert_eq!(apply.target(), Some(&*format!("{commit}/3.deadbeef")));
    let remove = JobId::new("prod", "fleet", "web-01", &format!("{commit}/4"), Action::Remove);
    assert_eq!(remove.target(), Some(&*format!("{commit}/4")));
    assert_eq!(remove.retry(29_000_000).target(), Some(&*format!("{commit}/4")));
    assert_ne!(remove.retry(1), remove, "a retry gets past the duplicate window");
    let probe = JobId::probe("prod", "fleet", "web-01", 1_790_000_000, Action::Scan);
    assert_eq!(probe.as_str(), "prod/fleet/web-01/probe/1790000000/scan");
    assert_eq!(probe.target(), Some("probe/1790000000"));
    assert_eq!(JobId::from("bogus".to_string()).target(), None);
    assert_eq!(JobId::from("c/ns/m/switch".to_string()).target(), None);
    // on the wire it is the plain string
    assert_eq!(serde_json::to_value(&apply).unwrap(), serde_json::json!(apply.as_str()));
}

#[test]
fn job_subjects_parse_back() {
    let s = job_subject("dc-2", JobKind::Apply, "prod.eu", "team.a", "web.01");
    let parsed = parse_job_subject(&s).unwrap();
    assert_eq!(
        parsed,
        JobSubject {
            site: "dc-2".into(),
            kind: JobKind::Apply,
            cluster: "prod.eu".into(),
            namespace: "team.a".into(),
            machine: "web.01".into()
        }
    );
    assert_eq!(untoken(&token("a.b.c")), "a.b.c");
    assert!(parse_job_subject("nio.jobs.dc1.format.c.n.m").is_none());
    assert!(parse_job_subject("nio.jobs.dc1.apply.c.n").is_none());
    assert!(parse_job_subject("nio.status.c.n.m").is_none());
}

#[test]
fn status_subjects_parse_back() {
    let s = status_subject("prod.eu", "team.a", "web.01");
    assert_eq!(parse_status_subject(&s), Some(("prod.eu".into(), "team.a".into(), "web.01".into())));
    assert!(parse_status_subject("nio.status.c.n").is_none());
    assert!(parse_status_subject("nio.jobs.dc1.apply.c.n.m").is_none());
}

/// The headers say what the body is, in the body's own words, and only a step with known names is a step.
#[test]
fn status_headers_name_phase_and_action_as_the_body_does() {
    for phase in Phase::ALL {
        for action in Action::ALL {
            let ev = StatusEvent { phase, action, ..event() };
            let mut h = async_nats::HeaderMap::new();
            ev.describe(&mut h);
            let body = serde_json::to_value(&ev).unwrap();
            assert_eq!(body["phase"], h.get(PHASE_HEADER).unwrap().as_str());
            assert_eq!(body["action"], h.get(ACTION_HEADER).unwrap().as_str());
            let step = progress_step(Some(&h));
            assert_eq!(step, (phase == Phase::Step).then_some(action), "{phase:?} {action:?}");
        }
    }
    let headers = |pairs: &[(&str, &str)]| {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, *v);
        }
        h
    };
    assert_eq!(progress_step(None), None);
    assert_eq!(progress_step(Some(&headers(&[(PHASE_HEADER, "Step")]))), None, "no action");
    assert_eq!(progress_step(Some(&headers(&[(PHASE_HEADER, "step"), (ACTION_HEADER, "switch")]))), None);
    assert_eq!(progress_step(Some(&headers(&[(PHASE_HEADER, "Step"), (ACTION_HEADER, "reboot")]))), None);
}

#[test]
fn log_tail_is_bounded_and_keeps_the_end() {
    let out: String = (0..500).map(|i| format!("line {i}\n")).collect();
    let tail = log_tail(&out);
    assert_eq!(tail.len(), LOG_TAIL_LINES);
    assert_eq!(tail.last().unwrap(), "line 499");
    let huge = format!("{}\nlast", "é".repeat(50_000));
    let tail = log_tail(&huge);
    assert!(tail.iter().map(String::len).sum::<usize>() <= LOG_TAIL_BYTES);
    assert_eq!(tail.last().unwrap(), "last");
}

/// A failure category this build does not know (a newer executor's) is kept as a failure, not a lost event: the
/// controller still records the outcome. (Actions and phases stay strict: guessing those would be unsafe.)
#[test]
fn an_unknown_failure_category_is_still_a_failure() {
    let mut v = serde_json::to_value(event()).unwrap();
    v["category"] = "DiskOnFire".into();
    let ev = StatusEvent::decode(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!((ev.phase, ev.category), (Phase::Failed, Some(FailureCategory::Unknown)));
    v["category"] = "HostKeyNotPinned".into();
    let ev = StatusEvent::decode(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(ev.category.map(FailureCategory::as_str), Some("HostKeyNotPinned"));
}
