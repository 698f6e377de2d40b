//! The remote command builders and the quoting every command goes through: whatever strings a job carries
//! (user, job id, installable, paths, unit names, health command), the remote shell sees exactly the argument
//! vector NIO built — checked by running the quoted line through real shells (`sh`, and `bash` where present:
//! NixOS logs in with bash).
#![no_main]

use std::process::Command;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nio_shared::config::RemotePaths;
use nio_shared::remote::{Activation, Commands, Confirmation};

#[derive(Arbitrary, Debug)]
struct Input {
    user: String,
    job_id: String,
    commit: String,
    subdir: Option<String>,
    attr: String,
    action: String,
    secret: String,
    mode: u32,
    units: Vec<String>,
    health: Vec<String>,
    which: u8,
}

/// What the shell passes to a program when it runs `line`: each argument, NUL-terminated.
fn through(shell: &str, line: &str) -> Option<Vec<u8>> {
    let out = Command::new(shell).arg("-c").arg(format!("printf '%s\\0' {line}")).output().ok()?;
    assert!(out.status.success(), "{shell} refused {line:?}: {}", String::from_utf8_lossy(&out.stderr));
    Some(out.stdout)
}

fuzz_target!(|i: Input| {
    let c = Commands { paths: RemotePaths::default() };
    let unit = Commands::unit(&i.job_id);
    let src = c.src_dir(&i.commit);
    let installable = c.toplevel(&i.commit, i.subdir.as_deref(), &i.attr);
    let argv = match i.which % 6 {
        0 => c.state(&src, &unit),
        1 => c.activate(&Activation {
            unit: &unit,
            src_dir: &src,
            upload: i.mode & 1 == 1,
            installable: &installable,
            action: &i.action,
            rollback: i.mode & 2 == 2,
            confirm_seconds: i.mode,
            limit_seconds: u64::from(i.mode),
        }),
        2 => c.confirm(&Confirmation {
            unit: &unit,
            marker: Some(&i.attr),
            health: true,
            health_timeout: i.mode,
            allowed_units: &i.units,
            command: &i.health,
        }),
        3 => c.write_secret("/mnt", &i.secret, i.mode),
        4 => c.disko(&c.flake_ref(&i.commit, i.subdir.as_deref(), &i.attr)),
        _ => c.build_system(&i.commit, i.subdir.as_deref(), &i.attr),
    };
    let argv = Commands::privileged(&i.user, argv);
    match nio_shared::quote::command(&argv) {
        Err(_) => assert!(argv.iter().any(|a| a.contains('\0')), "refused an argument vector without NUL: {argv:?}"),
        Ok(line) => {
            let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
            for shell in ["sh", "bash"] {
                if let Some(seen) = through(shell, &line) {
                    assert_eq!(seen, want, "{shell} saw other arguments than NIO built for {line:?}");
                }
            }
        }
    }
});
