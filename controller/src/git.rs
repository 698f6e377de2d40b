//! Resolving a configuration's `ref` to a commit without cloning: `ls-remote` with git2 over file, HTTPS or SSH,
//! credentials and server identity from the configuration's Secret ([`nio_shared::gitauth`]; never put in a URL,
//! never logged). A full SHA is accepted after checking it exists.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nio_shared::gitauth::{self, GitAuth, GitFailure, Refusal};
use sha2::{Digest, Sha256};

/// Why a ref could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitError {
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("{url} refused the credentials from credentialsRef")]
    AuthFailed { url: String },
    #[error("{url} is not the trusted server: {message}")]
    Untrusted { url: String, message: String },
    #[error("ref {reference:?} does not exist in {url}")]
    UnknownRef { url: String, reference: String },
}

impl GitError {
    /// Condition / Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            GitError::Unreachable { .. } => "GitUnreachable",
            GitError::AuthFailed { .. } => "GitAuthFailed",
            GitError::Untrusted { .. } => "GitServerUntrusted",
            GitError::UnknownRef { .. } => "UnknownRef",
        }
    }
}

fn classify(url: &str, e: &git2::Error) -> GitError {
    explain(url, e, &Refusal::default())
}

fn explain(url: &str, e: &git2::Error, refusal: &Refusal) -> GitError {
    let url = url.to_string();
    match gitauth::explain(e, refusal) {
        (GitFailure::AuthFailed, _) => GitError::AuthFailed { url },
        (GitFailure::UntrustedServer, message) => GitError::Untrusted { url, message },
        (GitFailure::Unreachable, message) => GitError::Unreachable { url, message },
    }
}

/// `ls-remote`: every advertised ref and its commit (annotated tags peeled).
fn ls_remote(url: &str, creds: &GitAuth) -> Result<Vec<(String, String)>, GitError> {
    let mut remote = git2::Remote::create_detached(url).map_err(|e| classify(url, &e))?;
    let refusal = Refusal::default();
    let conn = remote
        .connect_auth(git2::Direction::Fetch, Some(creds.callbacks(url, &refusal)), None)
        .map_err(|e| explain(url, &e, &refusal))?;
    let heads = conn.list().map_err(|e| classify(url, &e))?;
    Ok(heads.iter().map(|h| (h.name().to_string(), h.oid().to_string())).collect())
}

/// Whether `sha` exists in the repository: advertised, or fetchable into a small cache repository.
fn sha_exists(
    url: &str,
    sha: &str,
    creds: &GitAuth,
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
    let refusal = Refusal::default();
    let mut fo = git2::FetchOptions::new();
    fo.remote_callbacks(creds.callbacks(url, &refusal));
    if remote.fetch(&[sha], Some(&mut fo), None).is_err() {
        let mut fo = git2::FetchOptions::new();
        fo.remote_callbacks(creds.callbacks(url, &refusal));
        remote
            .fetch(&["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"], Some(&mut fo), None)
            .map_err(|e| explain(url, &e, &refusal))?;
    }
    Ok(repo.find_commit(oid).is_ok())
}

/// Resolves `reference` (branch, tag, full ref name or full SHA) in `url` to a commit SHA.
pub fn resolve_blocking(url: &str, reference: &str, creds: &GitAuth, cache: &Path) -> Result<String, GitError> {
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
    pub async fn resolve(&self, url: &str, reference: &str, refresh: &str, creds: GitAuth) -> Result<String, GitError> {
        let key = (url.to_string(), format!("{reference}\n{refresh}\n{}", creds.fingerprint()));
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
