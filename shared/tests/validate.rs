#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! Validation rejects hostile input with a message naming the field and the rule, and accepts real specs.

use nio_shared::crd::{AdditionalFile, FileValueType, MachineSpec, NixosConfigurationSpec, SecretKeyRef};
use nio_shared::validate::{self, Invalid};
use proptest::prelude::*;
use serde_json::json;

fn config() -> NixosConfigurationSpec {
    serde_json::from_value(serde_json::json!({
        "gitRepo": "https://github.com/example/infra.git", "ref": "main", "flake": "#web", "machineRef": "web-01"
    }))
    .unwrap()
}

fn machine() -> MachineSpec {
    serde_json::from_value(serde_json::json!({"hostname": "web-01.dc1.example.org"})).unwrap()
}

fn selector(v: serde_json::Value) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
    serde_json::from_value(v).unwrap()
}

fn rejected(spec: &NixosConfigurationSpec) -> Invalid {
    validate::configuration_spec(spec).expect_err("hostile spec accepted")
}

#[test]
fn upstream_style_examples_are_accepted() {
    let ok = [
        ("https://github.com/example/infra.git", "main", ".#web", None),
        ("ssh://git@git.example.org:2222/infra/nixos.git", "v1.2.3", "#nixosConfigurations.web", Some("hosts/prod")),
        ("git@github.com:example/infra.git", "release/2026-11", "#db-primary", Some("nix")),
        ("git://git.example.org/infra", "0123456789abcdef0123456789abcdef01234567", "#host_1", None),
        ("file:///srv/git/infra.git", "main", "#web'", None),
        ("http://10.0.0.5:3000/infra.git", "feature/x.y", "#a.b-c", Some("a/b.c/d_e")),
    ];
    for (repo, r, flake, sub) in ok {
        let mut c = config();
        c.git_repo = repo.into();
        c.git_ref = r.into();
        c.flake = flake.into();
        c.configuration_subdir = sub.map(Into::into);
        assert_eq!(validate::configuration_spec(&c), Ok(()), "{repo} {r} {flake}");
    }
    let mut fleet = config();
    fleet.machine_ref = None;
    fleet.machine_selector = Some(selector(json!({
        "matchLabels": {"app.kubernetes.io/part-of": "web", "env": ""},
        "matchExpressions": [
            {"key": "rack", "operator": "DoesNotExist"},
            {"key": "example.org/tier", "operator": "NotIn", "values": ["db", "cache_1"]},
        ]
    })));
    assert_eq!(validate::configuration_spec(&fleet), Ok(()));
    for host in ["web-01", "web-01.dc1.example.org", "10.0.0.1", "fd00::1", "::1"] {
        let mut m = machine();
        m.hostname = host.into();
        assert_eq!(validate::machine_spec(&m), Ok(()), "{host}");
    }
    assert!(validate::is_full_sha("0123456789abcdef0123456789abcdef01234567"));
    assert!(!validate::is_full_sha("main"));
}

#[test]
fn hostile_configuration_fields_are_rejected_with_field_names() {
    type Mutate = fn(&mut NixosConfigurationSpec);
    let cases: Vec<(&str, Mutate)> = vec![
        ("spec.flake", |c| c.flake = "#web; rm -rf /".into()),
        ("spec.flake", |c| c.flake = "#$(reboot)".into()),
        ("spec.flake", |c| c.flake = "#`id`".into()),
        ("spec.flake", |c| c.flake = "web".into()),
        ("spec.flake", |c| c.flake = "github:evil/flake#web".into()),
        ("spec.flake", |c| c.flake = "#".into()),
        ("spec.flake", |c| c.flake = "#web\n--option".into()),
        ("spec.flake", |c| c.flake = "#wéb".into()),
        ("spec.flake", |c| c.flake = format!("#{}", "a".repeat(300))),
        ("spec.flake", |c| c.flake = "#a..b".into()),
        ("spec.configurationSubdir", |c| c.configuration_subdir = Some("../etc".into())),
        ("spec.configurationSubdir", |c| c.configuration_subdir = Some("/etc/nixos".into())),
        ("spec.configurationSubdir", |c| c.configuration_subdir = Some("a/../../b".into())),
        ("spec.configurationSubdir", |c| c.configuration_subdir = Some("a\0b".into())),
        ("spec.configurationSubdir", |c| c.configuration_subdir = Some("a//b".into())),
        ("spec.configurationSubdir", |c| c.configuration_subdir = Some("-rf".into())),
        ("spec.configurationSubdir", |c| c.configuration_subdir = Some("a\nb".into())),
        ("spec.configurationSubdir", |c| c.configuration_subdir = Some("x/".repeat(600))),
        ("spec.configurationSubdir", |c| c.configuration_subdir = Some("hosts#web".into())),
        ("spec.credentialsRef", |c| {
            c.git_repo = "http://git.internal/fleet.git".into();
            c.credentials_ref = Some("git".into());
        }),
        ("spec.configurationSubdir", |c| c.configuration_subdir = Some("hosts?dir=x".into())),
        ("spec.configurationSubdir", |c| c.configuration_subdir = Some("my%20hosts".into())),
        ("spec.configurationSubdir", |c| c.configuration_subdir = Some("my hosts".into())),
        ("spec.gitRepo", |c| c.git_repo = "https://user:hunter2@github.com/x.git".into()),
        ("spec.gitRepo", |c| c.git_repo = "https://ghp_token@github.com/x.git".into()),
        ("spec.gitRepo", |c| c.git_repo = "ext::sh -c touch% /tmp/pwned".into()),
        ("spec.gitRepo", |c| c.git_repo = "--upload-pack=touch /tmp/x".into()),
        ("spec.gitRepo", |c| c.git_repo = "ftp://example.org/x.git".into()),
        ("spec.gitRepo", |c| c.git_repo = "https://example.org/x.git\n".into()),
        ("spec.gitRepo", |c| c.git_repo = "".into()),
        ("spec.ref", |c| c.git_ref = "--upload-pack=evil".into()),
        ("spec.ref", |c| c.git_ref = "main..evil".into()),
        ("spec.ref", |c| c.git_ref = "main branch".into()),
        ("spec.ref", |c| c.git_ref = "HEAD@{1}".into()),
        ("spec.onRemoveFlake", |c| c.on_remove_flake = Some("#x && reboot".into())),
        ("spec.additionalFiles[0].path", |c| {
            c.additional_files = vec![AdditionalFile {
                path: "../../root/.ssh/authorized_keys".into(),
                value_type: FileValueType::Inline,
                inline: Some("ssh-ed25519 AAAA evil".into()),
                secret_ref: None,
                owner: None,
                group: None,
                mode: None,
            }]
        }),
        ("spec.additionalFiles[0].path", |c| {
            c.additional_files = vec![AdditionalFile {
                path: "/etc/shadow".into(),
                value_type: FileValueType::NixosFacter,
                inline: None,
                secret_ref: None,
                owner: None,
                group: None,
                mode: None,
            }]
        }),
        ("spec.additionalFiles[0].secretRef.key", |c| {
            c.additional_files = vec![AdditionalFile {
                path: "wg.key".into(),
                value_type: FileValueType::SecretRef,
                inline: None,
                secret_ref: Some(SecretKeyRef { name: "wg".into(), key: "../token".into() }),
                owner: None,
                group: None,
                mode: None,
            }]
        }),
        ("spec.additionalFiles[0].secretRef.name", |c| {
            c.additional_files = vec![AdditionalFile {
                path: "wg.key".into(),
                value_type: FileValueType::SecretRef,
                inline: None,
                secret_ref: Some(SecretKeyRef { name: "Other_NS/wg".into(), key: "k".into() }),
                owner: None,
                group: None,
                mode: None,
            }]
        }),
        ("spec.additionalFiles[0].inline", |c| {
            c.additional_files = vec![AdditionalFile {
                path: "a.nix".into(),
                value_type: FileValueType::Inline,
                inline: None,
                secret_ref: None,
                owner: None,
                group: None,
                mode: None,
            }]
        }),
        ("spec.additionalFiles[0].mode", |c| {
            c.additional_files = vec![AdditionalFile {
                path: "wg.key".into(),
                value_type: FileValueType::SecretRef,
                inline: None,
                secret_ref: Some(SecretKeyRef { name: "wg".into(), key: "k".into() }),
                owner: Some("systemd-network".into()),
                group: None,
                mode: Some("0999".into()),
            }]
        }),
        ("spec.additionalFiles[0].owner", |c| {
            c.additional_files = vec![AdditionalFile {
                path: "wg.key".into(),
                value_type: FileValueType::SecretRef,
                inline: None,
                secret_ref: Some(SecretKeyRef { name: "wg".into(), key: "k".into() }),
                owner: Some("root;reboot".into()),
                group: None,
                mode: None,
            }]
        }),
        ("spec.machineRef", |c| c.machine_ref = None),
        ("spec.machineRef", |c| c.machine_ref = Some("web 01".into())),
        ("spec.pollInterval", |c| c.poll_interval = Some("1s".into())),
        ("spec.pollInterval", |c| c.poll_interval = Some("five minutes".into())),
        ("spec.credentialsRef", |c| c.credentials_ref = Some("../other".into())),
        ("spec.gitRepo", |c| c.git_repo = "ext::/path/to/cmd".into()),
        ("spec.gitRepo", |c| c.git_repo = "fd::17".into()),
        ("spec.gitRepo", |c| c.git_repo = "ssh://-oProxyCommand=touch%20x/repo.git".into()),
        ("spec.gitRepo", |c| c.git_repo = "ssh://-oProxyCommand@example.org/repo.git".into()),
        ("spec.onRemoveFlake", |c| c.on_remove_flake = Some(format!("#{}", "a".repeat(300)))),
        ("spec.machineSelector.matchExpressions[0].operator", |c| {
            c.machine_ref = None;
            c.machine_selector =
                Some(selector(json!({"matchExpressions": [{"key": "role", "operator": "NotExists"}]})));
        }),
        ("spec.machineSelector.matchExpressions[0].key", |c| {
            c.machine_ref = None;
            c.machine_selector = Some(selector(json!({"matchExpressions": [{"key": "!role", "operator": "Exists"}]})));
        }),
        ("spec.machineSelector.matchExpressions[0].values", |c| {
            c.machine_ref = None;
            c.machine_selector = Some(selector(json!({"matchExpressions": [{"key": "role", "operator": "In"}]})));
        }),
        ("spec.machineSelector.matchExpressions[0].values", |c| {
            c.machine_ref = None;
            c.machine_selector =
                Some(selector(json!({"matchExpressions": [{"key": "role", "operator": "Exists", "values": ["x"]}]})));
        }),
        ("spec.machineSelector.matchExpressions[0].values[0]", |c| {
            c.machine_ref = None;
            c.machine_selector =
                Some(selector(json!({"matchExpressions": [{"key": "role", "operator": "In", "values": ["a b"]}]})));
        }),
        ("spec.machineSelector.matchLabels", |c| {
            c.machine_ref = None;
            c.machine_selector = Some(selector(json!({"matchLabels": {"bad key!": "x"}})));
        }),
        ("spec.machineSelector.matchLabels[role]", |c| {
            c.machine_ref = None;
            c.machine_selector = Some(selector(json!({"matchLabels": {"role": "-web"}})));
        }),
        ("spec.healthCheck.command[1]", |c| {
            c.health_check = Some(nio_shared::crd::HealthCheck {
                enabled: true,
                command: vec!["curl".into(), "-f\nhttp://x".into()],
                allowed_failed_units: vec![],
                timeout_seconds: 10,
            })
        }),
        ("spec.healthCheck.allowedFailedUnits[0]", |c| {
            c.health_check = Some(nio_shared::crd::HealthCheck {
                allowed_failed_units: vec!["fwupd.service; reboot".into()],
                ..Default::default()
            })
        }),
        ("spec.confirmTimeoutSeconds", |c| c.confirm_timeout_seconds = 1),
    ];
    assert!(cases.len() >= 25);
    for (field, mutate) in cases {
        let mut c = config();
        mutate(&mut c);
        let err = rejected(&c);
        assert!(err.0.iter().any(|e| e.field == field), "expected an error on {field}, got: {err}");
        assert!(err.to_string().contains(field), "message names the field: {err}");
    }
}

#[test]
fn hostile_machine_fields_are_rejected() {
    type Mutate = fn(&mut MachineSpec);
    let cases: Vec<(&str, Mutate)> = vec![
        ("spec.hostname", |m| m.hostname = "-oProxyCommand=sh".into()),
        ("spec.hostname", |m| m.hostname = "web 01".into()),
        ("spec.hostname", |m| m.hostname = "web;reboot".into()),
        ("spec.hostname", |m| m.hostname = "".into()),
        ("spec.hostname", |m| m.hostname = format!("{}.org", "a".repeat(64))),
        ("spec.ipAddress", |m| m.ip_address = Some("10.0.0.300".into())),
        ("spec.ipAddress", |m| m.ip_address = Some("localhost".into())),
        ("spec.sshUser", |m| m.ssh_user = "root; id".into()),
        ("spec.sshUser", |m| m.ssh_user = "-l".into()),
        ("spec.site", |m| m.site = "dc1.>".into()),
        ("spec.site", |m| m.site = "DC1".into()),
        ("spec.site", |m| m.site = "dc*".into()),
        ("spec.credentialRef", |m| m.credential_ref = Some("../../etc/shadow".into())),
        ("spec.credentialRef", |m| m.credential_ref = Some("/root/.ssh/id_ed25519".into())),
        ("spec.hostKey", |m| m.host_key = Some("ssh-ed25519".into())),
        ("spec.hostKey", |m| m.host_key = Some("ssh-dss AAAAB3NzaC1kc3M=".into())),
        ("spec.hostKey", |m| m.host_key = Some("ssh-ed25519 not*base64".into())),
        // a valid RSA blob presented as ed25519
        ("spec.hostKey", |m| m.host_key = Some("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ==".into())),
        // found by fuzzing: the algorithm name alone, no key (passed, then every job failed to parse it)
        ("spec.hostKey", |m| m.host_key = Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5".into())),
        // a key one byte short
        ("spec.hostKey", |m| {
            m.host_key = Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GK".into())
        }),
        // a signature algorithm is not a key type (OpenSSH writes RSA keys as ssh-rsa)
        ("spec.hostKey", |m| m.host_key = Some(format!("rsa-sha2-512 {}", RSA_KEY.split(' ').nth(1).unwrap()))),
        ("spec.port", |m| m.port = 0),
    ];
    for (field, mutate) in cases {
        let mut m = machine();
        mutate(&mut m);
        let err = validate::machine_spec(&m).expect_err("hostile machine accepted");
        assert!(err.0.iter().any(|e| e.field == field), "expected an error on {field}, got: {err}");
    }
}

#[test]
fn all_errors_are_reported_at_once() {
    let mut c = config();
    c.flake = "nope".into();
    c.git_ref = "a b".into();
    c.configuration_subdir = Some("/abs".into());
    let err = rejected(&c);
    let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["spec.ref", "spec.flake", "spec.configurationSubdir"]);
}

const RSA_KEY: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDcd8U8vwst6B57j7OnWIpXjkJVKIGQBgvyLr7ovzNIdCQruECiWn5nX250k4nBBOFE/LoSmmf/oCGVy1qQxKnOgo45nmWuzdnDqUYgZfZuRB2mTEfL0ZKHTg/cIYH3XibQIAyZj0ltHfgxBZ4UQnCqcVCEs2CHrRNEDRfu1/LOIw== k";

#[test]
fn real_host_keys_of_each_type_pass() {
    let ed25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl root@web-01";
    let ecdsa = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBERe7hFgPM8HIrwbL1GVU85GpqJLcpcYsggbd+S8Pw7nz5UGcAPZqwl1V9YH7WnUb5Ai95arwG8QTHPPCVMe85s= k";
    for key in [ed25519, ecdsa, RSA_KEY] {
        assert_eq!(validate::host_key("k", key), Ok(()), "{key}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// No string with a shell metacharacter, whitespace or control character passes as a flake attr.
    #[test]
    fn flake_attrs_never_carry_shell_syntax(s in "\\PC{0,40}[;&|$`<>(){}\\[\\]*?!~\"\\\\ \t\n]\\PC{0,40}") {
        let flake = format!("#{s}");
        prop_assert!(validate::flake_attr("spec.flake", &flake).is_err());
    }

    /// Any accepted relative path stays inside its root: no absolute path, no `..`, no NUL.
    #[test]
    fn accepted_paths_stay_inside_the_root(s in "(\\PC|/|\\.|\\x00){0,64}") {
        if validate::relative_path("p", &s).is_ok() {
            prop_assert!(!s.starts_with('/'));
            prop_assert!(!s.split('/').any(|c| c == ".." || c.is_empty()));
            prop_assert!(!s.contains('\0'));
            let joined = std::path::Path::new("/root-dir").join(&s);
            prop_assert!(joined.starts_with("/root-dir"));
            prop_assert!(joined.components().all(|c| !matches!(c, std::path::Component::ParentDir)));
        }
    }

    /// Oversized input is rejected, whatever it is made of.
    #[test]
    fn oversize_inputs_are_rejected(c in "[a-z]", n in 1100usize..3000) {
        let long = c.repeat(n);
        let deep_path = vec![c.repeat(100); n / 100 + 1].join("/");
        let flake = format!("#{long}");
        let url = format!("https://example.org/{}", long.repeat(2));
        prop_assert!(validate::relative_path("p", &deep_path).is_err());
        prop_assert!(validate::relative_path("p", &long).is_err());
        prop_assert!(validate::flake_attr("f", &flake).is_err());
        prop_assert!(validate::hostname("h", &long).is_err());
        prop_assert!(validate::git_ref("r", &long).is_err());
        prop_assert!(validate::git_repo("g", &url).is_err());
    }

    /// Names that become subject tokens never contain subject syntax.
    #[test]
    fn accepted_site_names_are_single_subject_tokens(s in "\\PC{0,70}") {
        if validate::site_name("s", &s).is_ok() {
            prop_assert!(!s.contains(['.', '*', '>', ' ', '_']));
            prop_assert!(!s.is_empty() && s.len() <= 63);
        }
    }

    /// Unicode host names are rejected (IDNs must be given in punycode).
    #[test]
    fn unicode_hostnames_are_rejected(s in "[a-z]{1,10}[é ü ß 中 ж][a-z]{0,10}") {
        prop_assert!(validate::hostname("h", &s).is_err());
    }
}

#[test]
fn rollout_waves_and_budgets_are_checked_field_by_field() {
    let with = |rollout: serde_json::Value| {
        let mut c = config();
        c.rollout = serde_json::from_value(rollout).unwrap();
        c
    };
    let good = with(serde_json::json!({
        "maxFailures": "2%", "onFailure": "RollbackAndHalt",
        "waves": [
            {"name": "canary", "selector": {"matchLabels": {"ring": "canary"}}, "soak": "10m", "pause": true},
            {"name": "ten", "count": "10%", "maxUnavailable": 5, "maxFailures": "2%"},
            {"name": "rest", "maxUnavailable": "25%"}
        ]
    }));
    assert_eq!(validate::configuration_spec(&good), Ok(()));
    for (rollout, field) in [
        (serde_json::json!({"maxFailures": "2 percent"}), "spec.rollout.maxFailures"),
        (serde_json::json!({"maxFailures": "101%"}), "spec.rollout.maxFailures"),
        (serde_json::json!({"maxFailures": -1}), "spec.rollout.maxFailures"),
        (serde_json::json!({"waves": [{"name": "Canary"}]}), "spec.rollout.waves[0].name"),
        (serde_json::json!({"waves": [{"name": "a"}, {"name": "a"}]}), "spec.rollout.waves[1].name"),
        (serde_json::json!({"waves": [{"name": "a", "count": 0}]}), "spec.rollout.waves[0].count"),
        (serde_json::json!({"waves": [{"name": "a", "maxUnavailable": "x%"}]}), "spec.rollout.waves[0].maxUnavailable"),
        (serde_json::json!({"waves": [{"name": "a", "soak": "ten minutes"}]}), "spec.rollout.waves[0].soak"),
        (
            serde_json::json!({"waves": [{"name": "a", "selector": {"matchLabels": {"bad key!": "x"}}}]}),
            "spec.rollout.waves[0].selector",
        ),
        (
            serde_json::json!({"waves": [{"name": "a", "analysis": {"query": "up", "successCondition": "up > 1"}}]}),
            "spec.rollout.waves[0].analysis.successCondition",
        ),
        (
            serde_json::json!({"waves": [{"name": "a", "analysis": {"query": "up", "successCondition": "result > 1", "interval": "10ms"}}]}),
            "spec.rollout.waves[0].analysis.interval",
        ),
        (
            serde_json::json!({"disruptionBudgets": [{"name": "db", "maxUnavailable": 0}]}),
            "spec.rollout.disruptionBudgets[0].maxUnavailable",
        ),
        (
            serde_json::json!({"disruptionBudgets": [{"name": "db", "maxUnavailable": 1}, {"name": "db", "maxUnavailable": 2}]}),
            "spec.rollout.disruptionBudgets[1].name",
        ),
        (
            serde_json::json!({"disruptionBudgets": [{"name": "rack", "perLabel": "rack id!", "maxUnavailable": 1}]}),
            "spec.rollout.disruptionBudgets[0].perLabel",
        ),
    ] {
        let err = rejected(&with(rollout.clone())).to_string();
        assert!(err.contains(field), "{rollout}: {err}");
    }
}
