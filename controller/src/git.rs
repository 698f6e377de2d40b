//! Resolving a configuration's `ref` to a commit without cloning: `ls-remote` with git2, credentials from the
//! configuration's Secret (never put in a URL, never logged). A full SHA is accepted after checking it exists.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Why a ref could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitError {
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("{url} refused the credentials from credentialsRef")]
    AuthFailed { url: String },
    #[error("ref {reference:?} does not exist in {url}")]
    UnknownRef { url: String, reference: String },
}

impl GitError {
    /// Condition / Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            GitError::Unreachable { .. } => "GitUnreachable",
            GitError::AuthFailed { .. } => "GitAuthFailed",
            GitError::UnknownRef { .. } => "UnknownRef",
        }
    }
}

/// Git credentials read from a Secret (keys `token`, `username`/`password`, `ssh-privatekey`).
#[derive(Clone, Default)]
pub struct GitCreds {
    pub token: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ssh_key: Option<String>,
}

impl std::fmt::Debug for GitCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GitCreds(<redacted>)")
    }
}

impl GitCreds {
    fn is_empty(&self) -> bool {
        self.token.is_none() && self.username.is_none() && self.ssh_key.is_none()
    }
}

fn callbacks(creds: &GitCreds) -> git2::RemoteCallbacks<'_> {
    let mut cb = git2::RemoteCallbacks::new();
    let mut tries = 0;
    cb.credentials(move |_url, username, allowed| {
        tries += 1;
        if tries > 2 || creds.is_empty() {
            return Err(git2::Error::from_str("authentication required"));
        }
        if allowed.contains(git2::CredentialType::SSH_KEY)
            && let Some(k) = &creds.ssh_key
        {
            return git2::Cred::ssh_key_from_memory(username.unwrap_or("git"), None, k, None);
        }
        if let Some(t) = &creds.token {
            return git2::Cred::userpass_plaintext(creds.username.as_deref().unwrap_or("x-access-token"), t);
        }
        match (&creds.username, &creds.password) {
            (Some(u), Some(p)) => git2::Cred::userpass_plaintext(u, p),
            _ => Err(git2::Error::from_str("no usable credentials")),
        }
    });
    cb
}

fn classify(url: &str, e: &git2::Error) -> GitError {
    if e.class() == git2::ErrorClass::Http && e.message().contains("401")
        || e.code() == git2::ErrorCode::Auth
        || e.message().contains("authentication")
    {
        GitError::AuthFailed { url: url.to_string() }
    } else {
        GitError::Unreachable { url: url.to_string(), message: e.message().to_string() }
    }
}

/// `ls-remote`: every advertised ref and its commit (annotated tags peeled).
fn ls_remote(url: &str, creds: &GitCreds) -> Result<Vec<(String, String)>, GitError> {
    let mut remote = git2::Remote::create_detached(url).map_err(|e| classify(url, &e))?;
    let conn =
        remote.connect_auth(git2::Direction::Fetch, Some(callbacks(creds)), None).map_err(|e| classify(url, &e))?;
    let heads = conn.list().map_err(|e| classify(url, &e))?;
    Ok(heads.iter().map(|h| (h.name().to_string(), h.oid().to_string())).collect())
}

/// Whether `sha` exists in the repository: advertised, or fetchable into a small cache repository.
fn sha_exists(
    url: &str,
    sha: &str,
    creds: &GitCreds,
    heads: &[(String, String)],
    cache: &Path,
) -> Result<bool, GitError> {
    if heads.iter().any(|(_, oid)| oid == sha) {
        return Ok(true);
    }
    let dir =
        cache.join(Sha256::digest(url.as_bytes()).iter().take(12).map(|b| format!("{b:02x}")).collect::<String>());
    let repo = git2::Repository::open_bare(&dir)
        .or_else(|_| git2::Repository::init_bare(&dir))
        .map_err(|e| classify(url, &e))?;
    let oid = git2::Oid::from_str(sha).map_err(|e| classify(url, &e))?;
    if repo.find_commit(oid).is_ok() {
        return Ok(true);
    }
    let mut remote = repo.remote_anonymous(url).map_err(|e| classify(url, &e))?;
    let mut fo = git2::FetchOptions::new();
    fo.remote_callbacks(callbacks(creds));
    if remote.fetch(&[sha], Some(&mut fo), None).is_err() {
        let mut fo = git2::FetchOptions::new();
        fo.remote_callbacks(callbacks(creds));
        remote
            .fetch(&["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"], Some(&mut fo), None)
            .map_err(|e| classify(url, &e))?;
    }
    Ok(repo.find_commit(oid).is_ok())
}

/// Resolves `reference` (branch, tag, full ref name or full SHA) in `url` to a commit SHA.
pub fn resolve_blocking(url: &str, reference: &str, creds: &GitCreds, cache: &Path) -> Result<String, GitError> {
    let heads = ls_remote(url, creds)?;
    let unknown = || GitError::UnknownRef { url: url.to_string(), reference: reference.to_string() };
    if nio_shared::validate::is_full_sha(reference) {
        return if sha_exists(url, reference, creds, &heads, cache)? {
            Ok(reference.to_string())
        } else {
            Err(unknown())
        };
    }
    let find = |name: &str| heads.iter().find(|(n, _)| n == name).map(|(_, o)| o.clone());
    find(&format!("refs/tags/{reference}^{{}}"))
        .or_else(|| find(reference))
        .or_else(|| find(&format!("refs/heads/{reference}")))
        .or_else(|| find(&format!("refs/tags/{reference}")))
        .ok_or_else(unknown)
}

/// A resolution and when it was made.
type Answer = (Instant, Result<String, GitError>);

/// Resolves refs on a blocking thread, sharing answers for a short while across configurations that follow
/// the same branch.
pub struct Resolver {
    cache_dir: PathBuf,
    ttl: Duration,
    answers: Mutex<HashMap<(String, String), Answer>>,
}

impl Resolver {
    pub fn new(cache_dir: PathBuf, ttl: Duration) -> Self {
        Resolver { cache_dir, ttl, answers: Mutex::new(HashMap::new()) }
    }

    /// Resolves `reference`; answers are shared for a short while, except across different `refresh`
    /// tokens (the configuration's refresh annotation), so a refresh request always asks the remote.
    pub async fn resolve(
        &self,
        url: &str,
        reference: &str,
        refresh: &str,
        creds: GitCreds,
    ) -> Result<String, GitError> {
        let key = (url.to_string(), format!("{reference}\n{refresh}"));
        if let Ok(a) = self.answers.lock()
            && let Some((at, r)) = a.get(&key)
            && at.elapsed() < self.ttl
        {
            return r.clone();
        }
        let (u, r, cache) = (url.to_string(), reference.to_string(), self.cache_dir.clone());
        let result =
            tokio::task::spawn_blocking(move || resolve_blocking(&u, &r, &creds, &cache)).await.unwrap_or_else(|e| {
                Err(GitError::Unreachable { url: url.to_string(), message: format!("resolver task: {e}") })
            });
        if let Ok(mut a) = self.answers.lock() {
            let ttl = self.ttl;
            a.retain(|_, (at, _)| at.elapsed() < ttl);
            a.insert(key, (Instant::now(), result.clone()));
        }
        result
    }
}
