//! A real Git repository holding an example flake, made with the `git` command in a directory of the
//! caller's: tests, the load test and the demo bump its commits.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

/// A repository at `{dir}/repo`, on branch `main`.
pub struct GitRepo {
    /// The working tree.
    pub path: PathBuf,
}

impl GitRepo {
    /// Creates the repository with a flake and one commit.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("repo");
        std::fs::create_dir_all(path.join("hosts/web"))?;
        std::fs::write(path.join("flake.nix"), "{\n  outputs = { ... }: { nixosConfigurations = { }; };\n}\n")?;
        std::fs::write(path.join("hosts/web/configuration.nix"), "{ services.nginx.enable = true; }\n")?;
        std::fs::write(path.join("deploy.sh"), "#!/bin/sh\necho hi\n")?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path.join("deploy.sh"), std::fs::Permissions::from_mode(0o755))?;
        std::os::unix::fs::symlink("hosts/web/configuration.nix", path.join("default.nix"))?;
        let repo = GitRepo { path };
        repo.git(&["init", "-q", "-b", "main"])?;
        repo.git(&["add", "-A"])?;
        repo.git(&["commit", "-q", "-m", "initial"])?;
        Ok(repo)
    }

    fn git(&self, args: &[&str]) -> anyhow::Result<String> {
        git(&self.path, args)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `file://` URL of the repository.
    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    /// The commit `main` points at.
    pub fn head(&self) -> anyhow::Result<String> {
        self.git(&["rev-parse", "HEAD"])
    }

    /// Commits a change on `main`; returns the new commit.
    pub fn bump(&self, message: &str) -> anyhow::Result<String> {
        let n = std::fs::read_to_string(self.path.join("version.txt"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        std::fs::write(self.path.join("version.txt"), format!("{}\n", n + 1))?;
        self.git(&["add", "-A"])?;
        self.git(&["commit", "-q", "-m", message])?;
        self.head()
    }

    /// Creates a lightweight tag at HEAD.
    pub fn tag(&self, name: &str) -> anyhow::Result<()> {
        self.git(&["tag", name]).map(|_| ())
    }
}

/// Runs `git` in `dir` as the author `nio`; returns its trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "nio")
        .env("GIT_AUTHOR_EMAIL", "nio@example.org")
        .env("GIT_COMMITTER_NAME", "nio")
        .env("GIT_COMMITTER_EMAIL", "nio@example.org")
        .output()
        .context("running git")?;
    anyhow::ensure!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
