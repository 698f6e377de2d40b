#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! Quoting round-trips through a real POSIX shell.

use nio_shared::quote;
use proptest::prelude::*;

/// Runs the quoted command line through `sh -c` with `printf '%s\0'` and returns the arguments the shell saw.
fn through_shell(argv: &[String]) -> Vec<String> {
    let mut full = vec!["printf".to_string(), "%s\\0".to_string()];
    full.extend(argv.iter().cloned());
    let line = quote::command(&full).unwrap();
    let out = std::process::Command::new("sh").arg("-c").arg(&line).output().unwrap();
    assert!(out.status.success(), "sh failed on {line:?}: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut args: Vec<String> = stdout.split('\0').map(str::to_string).collect();
    args.pop();
    args
}

#[test]
fn nasty_arguments_survive_the_shell() {
    let argv: Vec<String> = [
        "plain",
        "",
        "two words",
        "it's",
        "\"double\"",
        "$(touch /tmp/nio-pwned)",
        "`id`",
        "$HOME",
        "a\nb",
        "*",
        "~",
        "!",
        "#comment",
        "back\\slash",
        "semi;colon && true || false",
        "unicode ✓ é",
        "'\"'\"'",
        "-rf",
        "%s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(through_shell(&argv), argv);
    assert!(!std::path::Path::new("/tmp/nio-pwned").exists());
}

#[test]
fn nul_and_empty_commands_are_refused() {
    assert_eq!(quote::command(&["a", "b\0c"]), Err(quote::QuoteError::Nul { index: 1 }));
    assert_eq!(quote::command::<&str>(&[]), Err(quote::QuoteError::Empty));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_argv_round_trips(argv in proptest::collection::vec("([^\\x00]|[$`'\"\\\\*?\\[\\] \n\t;&|<>(){}!#~])*", 1..6)) {
        prop_assert_eq!(through_shell(&argv), argv);
    }
}

/// The one-round-trip state script, run by a real `sh` exactly as a machine would (quoted argv): each part's
/// output and exit status come back separately, also when a command is missing or a file is absent.
#[test]
fn the_state_script_reports_each_command_with_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("bin")).unwrap();
    std::fs::create_dir_all(d.join("store/sys-1")).unwrap();
    std::os::unix::fs::symlink(d.join("store/sys-1"), d.join("current system")).unwrap();
    let paths = nio_shared::config::RemotePaths {
        state_dir: d.join("state").display().to_string(),
        current_system: d.join("current system").display().to_string(),
        booted_system: d.join("booted").display().to_string(),
        system_profile: d.join("profile").display().to_string(),
        ..Default::default()
    };
    let cmds = nio_shared::remote::Commands { paths };
    let src = d.join("state/src/abc").display().to_string();
    let run = |path: &str| {
        let line = nio_shared::quote::command(&cmds.state(&src, "nio-0123")).unwrap();
        let out = std::process::Command::new("sh").arg("-c").arg(&line).env("PATH", path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (nio_shared::remote::parse_state(&text), nio_shared::remote::MachineState::parse(&text).unwrap())
    };
    // Not NixOS (no nixos-version), nothing of NIO's yet.
    let bare = format!("{}:/usr/bin:/bin", d.join("bin").display());
    let (parts, st) = run(&bare);
    assert_eq!(parts.len(), 10, "{parts:?}");
    assert_eq!(st.profile_system, None, "no system profile");
    assert_eq!(parts[0].1, 127, "{parts:?}");
    assert_eq!(st.version, None);
    assert_eq!(st.current_system, Some(d.join("store/sys-1").display().to_string()));
    assert_eq!((st.booted_system.as_deref(), st.applied.as_deref(), st.upload.as_deref()), (None, None, None));
    assert_eq!(st.boot_id.as_ref().map(String::len), Some(36), "{st:?}");
    assert_eq!(st.privileged, Ok(()), "root");
    assert_eq!(st.attempt, None);
    // NixOS with a marker, an upload and a previous attempt of the job.
    let version = d.join("bin/nixos-version");
    std::fs::write(&version, "#!/bin/sh\necho '{\"nixosVersion\":\"25.05\"}'\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&version, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(d.join("state/src/abc")).unwrap();
    std::fs::create_dir_all(d.join("state/jobs/nio-0123")).unwrap();
    std::fs::write(d.join("state/applied"), "abc /nix/store/x\n").unwrap();
    std::fs::write(d.join("state/src/abc/.nio-complete"), "digest").unwrap();
    std::fs::write(d.join("state/jobs/nio-0123/activated"), "4\n").unwrap();
    std::fs::write(d.join("state/jobs/nio-0123/result"), "rolled-back switch-to-configuration exited 4\n").unwrap();
    std::os::unix::fs::symlink(d.join("store/sys-1"), d.join("profile")).unwrap();
    let (_, st) = run(&bare);
    assert_eq!(st.profile_system, Some(d.join("store/sys-1").display().to_string()), "the next boot");
    assert_eq!(st.version.as_deref(), Some("25.05"));
    assert_eq!((st.applied.as_deref(), st.upload.as_deref()), (Some("abc /nix/store/x"), Some("digest")));
    let a = st.attempt.unwrap();
    assert_eq!((a.activated, a.result.as_deref()), (Some(4), Some("rolled-back switch-to-configuration exited 4")));
}
