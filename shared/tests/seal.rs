#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! Sealed secrets open only with the right key and context, and never show their plaintext.

use nio_shared::protocol::{Action, Endpoint, Job, SecretFile};
use nio_shared::seal::{SealError, SealKey};

fn key() -> SealKey {
    SealKey::from_key_material(SealKey::generate().as_bytes()).unwrap()
}

#[test]
fn round_trip_with_the_same_key_and_context() {
    let k = key();
    let sealed = k.seal(b"wireguard-private-key", "prod/fleet/web-01/wg.key").unwrap();
    assert_eq!(k.unseal(&sealed, "prod/fleet/web-01/wg.key").unwrap(), b"wireguard-private-key");
}

#[test]
fn tampering_is_detected() {
    let k = key();
    let mut sealed = k.seal(b"secret", "ctx").unwrap();
    let mut raw = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &sealed.ciphertext).unwrap();
    raw[0] ^= 1;
    sealed.ciphertext = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, raw);
    assert_eq!(k.unseal(&sealed, "ctx"), Err(SealError::Tampered));
}

#[test]
fn a_secret_sealed_for_one_machine_does_not_open_for_another() {
    let k = key();
    let sealed = k.seal(b"secret", "prod/fleet/web-01/k").unwrap();
    assert_eq!(k.unseal(&sealed, "prod/fleet/web-02/k"), Err(SealError::Tampered));
}

#[test]
fn wrong_key_is_reported_by_id() {
    let (a, b) = (key(), key());
    let sealed = a.seal(b"secret", "ctx").unwrap();
    let err = b.unseal(&sealed, "ctx").unwrap_err();
    assert!(matches!(err, SealError::WrongKey { .. }));
    assert!(err.to_string().contains(a.id()) && err.to_string().contains(b.id()), "{err}");
}

#[test]
fn key_files_load_base64_or_raw_and_reject_others() {
    let dir = tempfile::tempdir().unwrap();
    let b64 = dir.path().join("b64");
    std::fs::write(&b64, SealKey::generate() + "\n").unwrap();
    SealKey::from_file(&b64).unwrap();
    let raw = dir.path().join("raw");
    std::fs::write(&raw, [7u8; 32]).unwrap();
    SealKey::from_file(&raw).unwrap();
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "short").unwrap();
    let err = SealKey::from_file(&bad).unwrap_err();
    assert!(err.to_string().contains("32 bytes"), "{err}");
    assert!(SealKey::from_file(&dir.path().join("missing")).is_err());
}

#[test]
fn sealed_job_json_never_contains_the_plaintext() {
    let k = key();
    let plaintext = "correct-horse-battery-staple";
    let ctx = SecretFile::seal_context("prod", "fleet", "web-01", "db.pass");
    let job = Job {
        v: 1,
        id: "j".to_string().into(),
        cluster: "prod".into(),
        namespace: "fleet".into(),
        machine: "web-01".into(),
        configuration: None,
        generation: 1,
        site: "dc1".into(),
        endpoint: Endpoint { host: "h".into(), port: 22, user: "root".into(), identity: None, host_key: None },
        source: None,
        action: Action::Switch,
        files: vec![],
        secrets: vec![SecretFile {
            path: "db.pass".into(),
            sealed: k.seal(plaintext.as_bytes(), &ctx).unwrap(),
            owner: None,
            group: None,
            mode: None,
        }],
        secrets_hash: None,
        health_check: None,
        rollback: false,
        confirm_timeout_seconds: 30,
        budgets: vec![],
        timeout_seconds: 60,
        enqueued_at: chrono::Utc::now(),
    };
    let wire = String::from_utf8(job.encode()).unwrap();
    assert!(!wire.contains(plaintext));
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, plaintext);
    assert!(!wire.contains(&b64));
    assert!(!format!("{job:?}").contains(plaintext));
    let decoded = Job::decode(wire.as_bytes()).unwrap();
    assert_eq!(k.unseal(&decoded.secrets[0].sealed, &ctx).unwrap(), plaintext.as_bytes());
}
