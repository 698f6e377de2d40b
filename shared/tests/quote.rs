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
