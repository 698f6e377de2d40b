//! Git transport authentication, shared by the controller (`ls-remote`) and the executor (fetch).
//!
//! Credentials come from a configuration's `credentialsRef` Secret (controller) or the same keys as files in
//! `--git-credentials-dir/{name}/` (executor, e.g. the Secret mounted as a volume):
//!
//! | key              | used for                                                                      |
//! |------------------|-------------------------------------------------------------------------------|
//! | `token`          | HTTPS: HTTP basic with user `username` (default `x-access-token`)             |
//! | `username`, `password` | HTTPS: HTTP basic                                                       |
//! | `ssh-privatekey` | `ssh://` and `user@host:path` remotes (OpenSSH PEM, unencrypted); the SSH user is the URL's, else `username`, else `git` |
//! | `known_hosts`    | SSH: the server's host keys (OpenSSH format, plain or hashed names); required   |
//! | `ca.crt`         | HTTPS: PEM CA certificates that issue the server's certificate (private CAs)   |
//!
//! Without `ca.crt` the system trust store decides. SSH remotes are refused unless `known_hosts` has a
//! matching key: an unknown or changed host key fails before any credential is offered. Nothing here is ever
//! put into a URL or logged.

use std::net::IpAddr;

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

/// The Secret / file keys read for Git credentials.
pub const KEYS: [&str; 6] = ["token", "username", "password", "ssh-privatekey", "known_hosts", "ca.crt"];

/// Credentials and server identity for one remote.
#[derive(Clone, Default)]
pub struct GitAuth {
    pub token: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ssh_key: Option<String>,
    pub known_hosts: Option<String>,
    pub ca_cert: Option<Vec<u8>>,
}

impl std::fmt::Debug for GitAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GitAuth(<redacted>)")
    }
}

/// Why a Git operation failed, in the categories a status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GitFailure {
    /// Network, server or repository trouble: worth retrying.
    Unreachable,
    /// The server refused the credentials (or asked for some and none were configured).
    AuthFailed,
    /// The server's TLS certificate or SSH host key is not the trusted one.
    UntrustedServer,
}

impl GitAuth {
    /// Reads the keys in [`KEYS`] through `get` (Secret data or files); values are trimmed, except `ca.crt`.
    pub fn from_entries(mut get: impl FnMut(&str) -> Option<Vec<u8>>) -> Self {
        let mut text = |k: &str| {
            get(k).and_then(|v| String::from_utf8(v).ok()).map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
        };
        let (token, username, password) = (text("token"), text("username"), text("password"));
        let (ssh_key, known_hosts) = (text("ssh-privatekey"), text("known_hosts"));
        let ca_cert = text("ca.crt").map(String::into_bytes);
        GitAuth { token, username, password, ssh_key, known_hosts, ca_cert }
    }

    /// Whether no key at all was found.
    pub fn is_empty(&self) -> bool {
        self.token.is_none()
            && self.username.is_none()
            && self.ssh_key.is_none()
            && self.known_hosts.is_none()
            && self.ca_cert.is_none()
    }

    /// A digest of the contents (for cache keys; reveals nothing).
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for v in [&self.token, &self.username, &self.password, &self.ssh_key, &self.known_hosts] {
            h.update(v.as_deref().unwrap_or("\u{0}").as_bytes());
            h.update([0xff]);
        }
        h.update(self.ca_cert.as_deref().unwrap_or(b"\0"));
        h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect()
    }

    /// git2 callbacks for `url`: credentials on request (two attempts at most) and the server identity check.
    /// Why a callback refused is kept in `refusal` (libgit2 may replace the message; see [`explain`]).
    pub fn callbacks<'a>(&'a self, url: &str, refusal: &'a Refusal) -> git2::RemoteCallbacks<'a> {
        let port = ssh_port(url);
        let mut cb = git2::RemoteCallbacks::new();
        let mut tries = 0;
        cb.credentials(move |_url, username, allowed| {
            tries += 1;
            if tries > 2 {
                return Err(refusal.set(auth_error("the remote rejected the credentials from credentialsRef")));
            }
            // SSH user: the URL's, else `username` from the credentials, else `git`.
            let ssh_user = username.or(self.username.as_deref()).unwrap_or("git");
            if allowed.contains(git2::CredentialType::USERNAME) {
                return git2::Cred::username(ssh_user);
            }
            if allowed.contains(git2::CredentialType::SSH_KEY)
                && let Some(k) = &self.ssh_key
            {
                return git2::Cred::ssh_key_from_memory(ssh_user, None, k, None);
            }
            if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) {
                if let Some(t) = &self.token {
                    return git2::Cred::userpass_plaintext(self.username.as_deref().unwrap_or("x-access-token"), t);
                }
                if let (Some(u), Some(p)) = (&self.username, &self.password) {
                    return git2::Cred::userpass_plaintext(u, p);
                }
            }
            Err(refusal.set(auth_error("the remote asks for credentials that credentialsRef does not have")))
        });
        cb.certificate_check(move |cert, host| self.check_server(cert, host, port).map_err(|e| refusal.set(e)));
        cb
    }

    fn check_server(
        &self,
        cert: &git2::cert::Cert<'_>,
        host: &str,
        port: u16,
    ) -> Result<git2::CertificateCheckStatus, git2::Error> {
        if let Some(key) = cert.as_hostkey() {
            let Some(known) = &self.known_hosts else {
                return Err(untrusted(format!(
                    "no known_hosts in the Git credentials to verify the SSH host key of {host}"
                )));
            };
            let raw = key.hostkey().ok_or_else(|| untrusted(format!("{host} sent no SSH host key")))?;
            host_key_known(known, host, port, raw).map_err(untrusted)?;
            return Ok(git2::CertificateCheckStatus::CertificateOk);
        }
        match (cert.as_x509(), &self.ca_cert) {
            (Some(x509), Some(ca)) => {
                verify_x509(x509.data(), ca, host).map_err(untrusted)?;
                Ok(git2::CertificateCheckStatus::CertificateOk)
            }
            // The system trust store (libgit2's own verification) decides.
            _ => Ok(git2::CertificateCheckStatus::CertificatePassthrough),
        }
    }
}

fn auth_error(msg: &str) -> git2::Error {
    git2::Error::new(git2::ErrorCode::Auth, git2::ErrorClass::Callback, msg)
}

fn untrusted(msg: String) -> git2::Error {
    git2::Error::new(git2::ErrorCode::Certificate, git2::ErrorClass::Callback, msg)
}

/// The reason a callback refused to go on (a credential or server-identity problem), kept because libgit2 may
/// report its own, vaguer message instead.
#[derive(Debug, Default)]
pub struct Refusal(std::sync::Mutex<Option<(git2::ErrorCode, String)>>);

impl Refusal {
    fn set(&self, e: git2::Error) -> git2::Error {
        if let Ok(mut r) = self.0.lock() {
            *r = Some((e.code(), e.message().to_string()));
        }
        e
    }
}

/// Classifies a failed Git operation and says why, preferring the reason a callback gave.
pub fn explain(e: &git2::Error, refusal: &Refusal) -> (GitFailure, String) {
    if let Some((code, msg)) = refusal.0.lock().ok().and_then(|r| r.clone()) {
        let failure =
            if code == git2::ErrorCode::Certificate { GitFailure::UntrustedServer } else { GitFailure::AuthFailed };
        return (failure, msg);
    }
    (classify(e), e.message().to_string())
}

/// Classifies a git2 error.
pub fn classify(e: &git2::Error) -> GitFailure {
    let m = e.message().to_ascii_lowercase();
    if e.code() == git2::ErrorCode::Certificate
        || m.contains("certificate")
        || m.contains("host key")
        || m.contains("hostkey")
    {
        GitFailure::UntrustedServer
    } else if e.code() == git2::ErrorCode::Auth
        || e.class() == git2::ErrorClass::Http && m.contains("401")
        || m.contains("authentication")
        || m.contains("credentials")
    {
        GitFailure::AuthFailed
    } else {
        GitFailure::Unreachable
    }
}

/// The SSH port of `url` (22 unless an `ssh://` URL names one).
fn ssh_port(url: &str) -> u16 {
    url::Url::parse(url).ok().filter(|u| u.scheme() == "ssh").and_then(|u| u.port()).unwrap_or(22)
}

/// Checks `raw` (the SSH wire encoding of the server's host key) against the `known_hosts` entries for
/// `host`/`port` (`[host]:port` when not 22; hashed names supported; `@revoked` honoured).
pub fn host_key_known(known_hosts: &str, host: &str, port: u16, raw: &[u8]) -> Result<(), String> {
    use ssh_key::known_hosts::{HostPatterns, KnownHosts, Marker};
    let name = if port == 22 { host.to_string() } else { format!("[{host}]:{port}") };
    let mut listed = false;
    for entry in KnownHosts::new(known_hosts) {
        let entry = entry.map_err(|e| format!("known_hosts in the Git credentials does not parse: {e}"))?;
        let matches = match entry.host_patterns() {
            HostPatterns::Patterns(p) => p.contains(&name),
            HostPatterns::HashedName { salt, hash } => hmac::Hmac::<sha1::Sha1>::new_from_slice(salt)
                .map(|m| m.chain_update(name.as_bytes()).verify_slice(hash).is_ok())
                .unwrap_or(false),
        };
        if !matches {
            continue;
        }
        let same = entry.public_key().to_bytes().is_ok_and(|b| b == raw);
        match entry.marker() {
            Some(Marker::Revoked) if same => {
                return Err(format!("the SSH host key of {name} is revoked in known_hosts"));
            }
            Some(_) => continue,
            None if same => return Ok(()),
            None => listed = true,
        }
    }
    Err(if listed {
        format!("the SSH host key of {name} does not match known_hosts in the Git credentials")
    } else {
        format!("known_hosts in the Git credentials has no entry for {name}")
    })
}

/// Verifies a server certificate (DER) against the PEM CA certificates in `ca` and the host name or address.
pub fn verify_x509(der: &[u8], ca: &[u8], host: &str) -> Result<(), String> {
    use openssl::stack::Stack;
    use openssl::x509::store::X509StoreBuilder;
    use openssl::x509::verify::X509VerifyParam;
    use openssl::x509::{X509, X509StoreContext};
    let fail = |what: &str, e: openssl::error::ErrorStack| format!("{what}: {e}");
    let leaf = X509::from_der(der).map_err(|e| fail("server certificate", e))?;
    let cas = X509::stack_from_pem(ca).map_err(|e| fail("ca.crt in the Git credentials", e))?;
    if cas.is_empty() {
        return Err("ca.crt in the Git credentials holds no certificate".into());
    }
    let mut store = X509StoreBuilder::new().map_err(|e| fail("trust store", e))?;
    for c in cas {
        store.add_cert(c).map_err(|e| fail("ca.crt", e))?;
    }
    let mut param = X509VerifyParam::new().map_err(|e| fail("verify parameters", e))?;
    match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip) => param.set_ip(ip),
        Err(_) => param.set_host(host),
    }
    .map_err(|e| fail("verify parameters", e))?;
    store.set_param(&param).map_err(|e| fail("verify parameters", e))?;
    let store = store.build();
    let chain = Stack::new().map_err(|e| fail("chain", e))?;
    let mut ctx = X509StoreContext::new().map_err(|e| fail("verify context", e))?;
    let verdict = ctx
        .init(&store, &leaf, &chain, |c| Ok(c.verify_cert()?.then_some(()).ok_or_else(|| c.error())))
        .map_err(|e| fail("verifying", e))?;
    verdict.map_err(|e| format!("the TLS certificate of {host} is not trusted by ca.crt in the Git credentials: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIN/bISIkeC3s80Jb5jD5NOyXw96nTYEUG7psnuarQJbf";
    const OTHER: &str = "AAAAC3NzaC1lZDI1NTE5AAAAICSdF7aRN3mHrpqysRC81VcmKz+YRZVJFKbhOVb7Dwyy";

    fn raw(b64: &str) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(b64).unwrap_or_default()
    }

    #[test]
    fn known_hosts_matches_host_and_port_and_rejects_others() {
        let kh = format!("git.example.org ssh-ed25519 {KEY}\n[127.0.0.1]:2222 ssh-ed25519 {OTHER}\n");
        assert_eq!(host_key_known(&kh, "git.example.org", 22, &raw(KEY)), Ok(()));
        assert_eq!(host_key_known(&kh, "127.0.0.1", 2222, &raw(OTHER)), Ok(()));
        let changed = host_key_known(&kh, "git.example.org", 22, &raw(OTHER)).unwrap_err();
        assert!(changed.contains("does not match"), "{changed}");
        let unknown = host_key_known(&kh, "127.0.0.1", 22, &raw(OTHER)).unwrap_err();
        assert!(unknown.contains("no entry for 127.0.0.1"), "{unknown}");
    }

    #[test]
    fn hashed_and_revoked_entries() {
        // `|1|salt|hmac-sha1(salt, "git.example.org")`, as `ssh-keygen -H` writes it.
        let salt = [7u8; 20];
        let mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(&salt).map(|m| m.chain_update(b"git.example.org")).unwrap();
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let hashed = format!("|1|{}|{}", b64.encode(salt), b64.encode(mac.finalize().into_bytes()));
        let kh = format!("{hashed} ssh-ed25519 {KEY}\n");
        assert_eq!(host_key_known(&kh, "git.example.org", 22, &raw(KEY)), Ok(()));
        assert!(host_key_known(&kh, "evil.example.org", 22, &raw(KEY)).is_err());
        let revoked = format!("@revoked git.example.org ssh-ed25519 {KEY}\ngit.example.org ssh-ed25519 {KEY}\n");
        assert!(host_key_known(&revoked, "git.example.org", 22, &raw(KEY)).unwrap_err().contains("revoked"));
    }

    #[test]
    fn entries_are_read_trimmed_and_never_printed() {
        let a = GitAuth::from_entries(|k| match k {
            "token" => Some(b"  sekrit-token\n".to_vec()),
            "username" => Some(Vec::new()),
            _ => None,
        });
        assert_eq!(a.token.as_deref(), Some("sekrit-token"));
        assert_eq!(a.username, None);
        assert!(!format!("{a:?}").contains("sekrit"));
        assert!(!a.fingerprint().contains("sekrit"));
        assert_ne!(a.fingerprint(), GitAuth::default().fingerprint());
        assert_eq!(ssh_port("ssh://git@127.0.0.1:2222/fleet.git"), 2222);
        assert_eq!(ssh_port("git@github.com:org/fleet.git"), 22);
    }
}
