//! Source shipping: a git2 mirror per repository, the tree at a commit exported as a tar stream (cached per
//! commit, so a fleet rollout walks the tree once), plus each job's additional files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nio_shared::gitauth::{self, GitAuth, GitFailure, Refusal};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Size of the tar end-of-archive marker (two zero blocks).
const TAR_FOOTER: usize = 1024;
/// Commits whose exported tree is kept in memory.
const TAR_CACHE: usize = 16;

/// Git read credentials by name: the [`nio_shared::gitauth`] keys as files in `{dir}/{name}/` (a Kubernetes
/// Secret mounted as a volume has exactly this shape).
#[derive(Debug, Clone, Default)]
pub struct GitCredentials {
    dir: Option<PathBuf>,
}

impl GitCredentials {
    pub fn new(dir: Option<PathBuf>) -> Self {
        GitCredentials { dir }
    }

    /// The credentials named `name` (none when the job names none).
    fn auth(&self, name: Option<&str>) -> Result<GitAuth> {
        let Some(name) = name else { return Ok(GitAuth::default()) };
        let Some(dir) = &self.dir else {
            return Err(Error::Source(format!(
                "the job uses Git credentials {name:?} but the executor has no --git-credentials-dir"
            )));
        };
        let auth = GitAuth::from_entries(|k| std::fs::read(dir.join(name).join(k)).ok());
        if auth.is_empty() {
            return Err(Error::Source(format!(
                "no Git credentials {name:?} in {} (expected files named {})",
                dir.display(),
                gitauth::KEYS.join(", ")
            )));
        }
        Ok(auth)
    }
}

/// Mirrors of the repositories jobs refer to, and exported trees.
pub struct SourceCache {
    dir: PathBuf,
    creds: GitCredentials,
    repo_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    tars: Mutex<Vec<(String, Arc<Vec<u8>>)>>,
}

fn repo_dir(base: &Path, url: &str) -> PathBuf {
    let h = Sha256::digest(url.as_bytes());
    base.join("git").join(h.iter().take(12).map(|b| format!("{b:02x}")).collect::<String>())
}

fn git_err(what: &str, e: git2::Error) -> Error {
    Error::Source(format!("{what}: {}", e.message()))
}

impl SourceCache {
    pub fn new(dir: PathBuf, creds: GitCredentials) -> Self {
        SourceCache { dir, creds, repo_locks: Mutex::new(HashMap::new()), tars: Mutex::new(Vec::new()) }
    }

    /// The tree at `commit` as tar entries (no end-of-archive marker). Concurrent jobs on one repository
    /// share one fetch.
    pub async fn tree(&self, repo: &str, commit: &str, credentials: Option<&str>) -> Result<Arc<Vec<u8>>> {
        let key = format!("{repo}\n{commit}");
        if let Some(t) = self.cached(&key) {
            return Ok(t);
        }
        let lock = {
            let mut locks = self.repo_locks.lock().map_err(|_| Error::internal("source lock poisoned", None))?;
            locks.entry(repo.to_string()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if let Some(t) = self.cached(&key) {
            return Ok(t);
        }
        let dir = repo_dir(&self.dir, repo);
        let (repo_url, commit_s) = (repo.to_string(), commit.to_string());
        let creds = self.creds.clone();
        let cred_name = credentials.map(str::to_string);
        let tar = tokio::task::spawn_blocking(move || export(&dir, &repo_url, &commit_s, &creds, cred_name.as_deref()))
            .await
            .map_err(|e| Error::internal("source export task", Some(e.into())))??;
        let tar = Arc::new(tar);
        if let Ok(mut tars) = self.tars.lock() {
            tars.push((key, tar.clone()));
            if tars.len() > TAR_CACHE {
                tars.remove(0);
            }
        }
        Ok(tar)
    }

    fn cached(&self, key: &str) -> Option<Arc<Vec<u8>>> {
        self.tars.lock().ok()?.iter().find(|(k, _)| k == key).map(|(_, t)| t.clone())
    }
}

/// Name of the completion marker, the upload's last tar entry: holding the digest, it exists only once every
/// entry before it was extracted (so no separate command writes it).
pub const MARKER: &str = ".nio-complete";

/// The digest identifying an upload: the commit and the additional files (path, content).
pub fn digest(commit: &str, extra: &[(String, Vec<u8>)]) -> String {
    let mut digest = Sha256::new();
    digest.update(commit.as_bytes());
    for (path, content) in extra {
        digest.update(path.as_bytes());
        digest.update([0]);
        digest.update(content);
    }
    digest.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// An unsealed secret as it is to land on the machine.
pub struct Secret {
    pub path: String,
    pub content: Vec<u8>,
    pub mode: u32,
    /// User and group names; tar running as root gives the file to them, or to root when the machine has no
    /// such name.
    pub owner: Option<String>,
    pub group: Option<String>,
}

/// A job's stream for the activation script: the tree (when the machine does not have this upload yet) under
/// `src/` with the `extra` files (relative to `subdir`, where the flake sees them) and, last, [`MARKER`]
/// holding `digest`; then the secrets under `secrets/` with their mode, owner and group.
pub fn stream(
    tree: Option<&[u8]>,
    subdir: Option<&str>,
    extra: &[(String, Vec<u8>)],
    digest: &str,
    secrets: &[Secret],
) -> Result<Vec<u8>> {
    let base = match subdir.map(|s| s.trim_matches('/')) {
        Some(s) if !s.is_empty() => format!("src/{s}/"),
        _ => "src/".to_string(),
    };
    let mut tar = Vec::with_capacity(tree.map_or(0, <[u8]>::len) + 4096);
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, content: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, content).map_err(|e| Error::Source(format!("adding {path}: {e}")))
    };
    if tree.is_some() {
        for (path, content) in extra {
            add(&format!("{base}{path}"), content, 0o644)?;
        }
        add(&format!("src/{MARKER}"), digest.as_bytes(), 0o644)?;
    }
    for s in secrets {
        let mut h = tar::Header::new_gnu();
        h.set_size(s.content.len() as u64);
        h.set_mode(s.mode);
        h.set_uid(0);
        h.set_gid(0);
        let set = |r: std::io::Result<()>| r.map_err(|e| Error::Source(format!("secret {}: {e}", s.path)));
        set(h.set_username(s.owner.as_deref().unwrap_or("root")))?;
        set(h.set_groupname(s.group.as_deref().unwrap_or("root")))?;
        h.set_entry_type(tar::EntryType::Regular);
        let path = format!("secrets/{}", s.path);
        b.append_data(&mut h, &path, s.content.as_slice()).map_err(|e| Error::Source(format!("adding {path}: {e}")))?;
    }
    let rest = b.into_inner().map_err(|e| Error::Source(e.to_string()))?;
    if let Some(tree) = tree {
        tar.extend_from_slice(tree);
    }
    tar.extend_from_slice(&rest);
    Ok(tar)
}

fn fetch_err(url: &str, e: &git2::Error, refusal: &Refusal) -> Error {
    let (failure, why) = gitauth::explain(e, refusal);
    let msg = format!("fetching {url}: {why}");
    match failure {
        GitFailure::Unreachable => Error::SourceUnreachable(msg),
        GitFailure::AuthFailed | GitFailure::UntrustedServer => Error::Source(msg),
    }
}

fn export(dir: &Path, url: &str, commit: &str, creds: &GitCredentials, cred_name: Option<&str>) -> Result<Vec<u8>> {
    let oid =
        git2::Oid::from_str(commit).map_err(|e| Error::InvalidJob(format!("commit {commit}: {}", e.message())))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::Source(format!("cache dir {}: {e}", dir.display())))?;
    let repo = git2::Repository::open_bare(dir)
        .or_else(|_| git2::Repository::init_bare(dir))
        .map_err(|e| git_err("opening mirror", e))?;
    if repo.find_commit(oid).is_err() {
        let auth = creds.auth(cred_name)?;
        let mut remote = repo.remote_anonymous(url).map_err(|e| git_err("remote", e))?;
        let refusal = Refusal::default();
        let mut fo = git2::FetchOptions::new();
        fo.remote_callbacks(auth.callbacks(url, &refusal));
        remote
            .fetch(&["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"], Some(&mut fo), None)
            .map_err(|e| fetch_err(url, &e, &refusal))?;
        if repo.find_commit(oid).is_err() {
            let mut fo = git2::FetchOptions::new();
            fo.remote_callbacks(auth.callbacks(url, &refusal));
            let _ = remote.fetch(&[commit], Some(&mut fo), None);
        }
    }
    let c = repo.find_commit(oid).map_err(|_| Error::Source(format!("commit {commit} is not in {url}")))?;
    let tree = c.tree().map_err(|e| git_err("tree", e))?;
    let mtime = u64::try_from(c.time().seconds()).unwrap_or(0);
    let mut b = tar::Builder::new(Vec::new());
    let mut failure: Option<Error> = None;
    tree.walk(git2::TreeWalkMode::PreOrder, |root, entry| {
        let Ok(name) = entry.name() else { return git2::TreeWalkResult::Skip };
        let path = format!("src/{root}{name}");
        if entry.kind() != Some(git2::ObjectType::Blob) {
            return git2::TreeWalkResult::Ok;
        }
        let blob = match repo.find_blob(entry.id()) {
            Ok(b) => b,
            Err(e) => {
                failure = Some(git_err(&path, e));
                return git2::TreeWalkResult::Abort;
            }
        };
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        let r = if entry.filemode() == 0o120000 {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            let target = String::from_utf8_lossy(blob.content()).into_owned();
            b.append_link(&mut h, &path, target)
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(blob.size() as u64);
            h.set_mode(if entry.filemode() == 0o100755 { 0o755 } else { 0o644 });
            b.append_data(&mut h, &path, blob.content())
        };
        if let Err(e) = r {
            failure = Some(Error::Source(format!("{path}: {e}")));
            return git2::TreeWalkResult::Abort;
        }
        git2::TreeWalkResult::Ok
    })
    .map_err(|e| failure.take().unwrap_or_else(|| git_err("walking tree", e)))?;
    if let Some(f) = failure {
        return Err(f);
    }
    let mut tar = b.into_inner().map_err(|e| Error::Source(e.to_string()))?;
    tar.truncate(tar.len().saturating_sub(TAR_FOOTER));
    Ok(tar)
}
