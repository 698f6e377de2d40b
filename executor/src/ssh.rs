//! SSH to machines with russh: pinned host keys (or trust on first use), public-key identities by name,
//! connect timeout and keepalive, per-command timeout with a remote kill.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Sig};

use crate::error::{Error, Result};
use crate::host::{Host, Output};

/// What to do when a job carries no pinned host key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HostKeyPolicy {
    /// Refuse: every machine needs a pinned key.
    Pinned,
    /// Accept the first key seen and report it, so the controller pins it.
    Tofu,
}

/// Most stdout kept per command (facter reports are the largest expected output).
const MAX_STDOUT: usize = 8 * 1024 * 1024;
/// Most stderr kept per command (its tail goes into status).
const MAX_STDERR: usize = 256 * 1024;

/// SSH identities by name, loaded from a directory (`{dir}/{name}`), cached.
pub struct Identities {
    dir: PathBuf,
    cache: Mutex<HashMap<String, Arc<PrivateKey>>>,
}

/// Identity used when a Machine names none.
pub const DEFAULT_IDENTITY: &str = "default";

impl Identities {
    pub fn new(dir: PathBuf) -> Self {
        Identities { dir, cache: Mutex::new(HashMap::new()) }
    }

    /// The private key called `name`.
    pub fn get(&self, name: &str) -> Result<Arc<PrivateKey>> {
        nio_shared::validate::identity_name("identity", name).map_err(|e| Error::InvalidJob(e.to_string()))?;
        if let Some(k) = self.cache.lock().map_err(|_| Error::internal("identity cache poisoned", None))?.get(name) {
            return Ok(k.clone());
        }
        let path = self.dir.join(name);
        let key = russh::keys::load_secret_key(&path, None)
            .map_err(|e| Error::Identity(format!("{name} could not be loaded from {}: {e}", path.display())))?;
        let key = Arc::new(key);
        if let Ok(mut c) = self.cache.lock() {
            c.insert(name.to_string(), key.clone());
        }
        Ok(key)
    }
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub connect_timeout: Duration,
    pub keepalive: Duration,
    pub policy: HostKeyPolicy,
}

struct Checker {
    expected: Option<PublicKey>,
    policy: HostKeyPolicy,
    seen: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else { return Ok(false) };
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(key.clone());
        }
        Ok(match &self.expected {
            Some(want) => want.key_data() == key.key_data(),
            None => self.policy == HostKeyPolicy::Tofu,
        })
    }
}

/// The OpenSSH one-line form of a public key, without comment.
pub fn openssh(key: &PublicKey) -> String {
    let mut k = key.clone();
    k.set_comment("");
    k.to_openssh().unwrap_or_default().trim().to_string()
}

/// Parses a pinned key line (`ssh-ed25519 AAAA… [comment]`).
pub fn parse_host_key(line: &str) -> Result<PublicKey> {
    PublicKey::from_openssh(line.trim())
        .map_err(|e| Error::InvalidJob(format!("pinned host key is not an OpenSSH public key: {e}")))
}

/// A pinned key line in the form connections record ([`SshHost::host_key`]); None when it is not a key.
pub fn normalise_host_key(line: &str) -> Option<String> {
    parse_host_key(line).ok().map(|k| openssh(&k))
}

/// An authenticated SSH connection to one machine.
pub struct SshHost {
    handle: client::Handle<Checker>,
    host_key: String,
    /// When it logged in.
    opened: std::time::Instant,
}

impl SshHost {
    /// Connects, verifies the host key before anything else, and authenticates.
    /// `identity` is the key and the name it is known by (for errors).
    pub async fn connect(
        endpoint: &nio_shared::protocol::Endpoint,
        pinned: Option<&str>,
        identity: (&str, Arc<PrivateKey>),
        opts: &ConnectOptions,
    ) -> Result<Self> {
        let (host, port, user) = (endpoint.host.as_str(), endpoint.port, endpoint.user.as_str());
        let (identity_name, identity) = identity;
        let expected = pinned.map(parse_host_key).transpose()?;
        if expected.is_none() && opts.policy == HostKeyPolicy::Pinned {
            return Err(Error::HostKeyNotPinned);
        }
        let seen = Arc::new(Mutex::new(None));
        let checker = Checker { expected: expected.clone(), policy: opts.policy, seen: seen.clone() };
        let config = Arc::new(client::Config {
            keepalive_interval: Some(opts.keepalive),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        });
        let connecting = client::connect(config, (host, port), checker);
        let result = match tokio::time::timeout(opts.connect_timeout, connecting).await {
            Err(_) => {
                return Err(Error::Unreachable(format!(
                    "{host}:{port}: connect timed out after {:?}",
                    opts.connect_timeout
                )));
            }
            Ok(r) => r,
        };
        let seen_key = seen.lock().ok().and_then(|s| s.clone());
        let mut handle = match result {
            Ok(h) => h,
            Err(russh::Error::UnknownKey) => {
                return Err(match (expected, seen_key) {
                    (Some(want), Some(got)) => Error::HostKeyMismatch { expected: openssh(&want), seen: openssh(&got) },
                    _ => Error::HostKeyNotPinned,
                });
            }
            Err(russh::Error::IO(e)) => return Err(Error::Unreachable(format!("{host}:{port}: {e}"))),
            Err(e) => return Err(Error::Unreachable(format!("{host}:{port}: SSH handshake failed: {e}"))),
        };
        let host_key = seen_key.as_ref().map(openssh).unwrap_or_default();
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(|e| Error::session("negotiating the RSA hash", e))?
            .flatten();
        let auth = tokio::time::timeout(
            opts.connect_timeout,
            handle.authenticate_publickey(user, PrivateKeyWithHashAlg::new(identity, hash)),
        )
        .await
        .map_err(|_| Error::Unreachable(format!("{host}:{port}: authentication timed out")))?
        .map_err(|e| Error::session("authenticating", e))?;
        if !auth.success() {
            return Err(Error::AuthFailed { user: user.to_string(), identity: identity_name.to_string() });
        }
        Ok(SshHost { handle, host_key, opened: std::time::Instant::now() })
    }

    /// The host key the machine presented (OpenSSH format).
    pub fn host_key(&self) -> &str {
        &self.host_key
    }

    /// When the connection logged in.
    pub fn opened_at(&self) -> std::time::Instant {
        self.opened
    }

    /// Whether the connection still carries a session: a channel opens within `within`. A kept connection is
    /// asked before a job uses it; a machine that rebooted since answers with a reset, one cut off not at all.
    pub async fn alive(&self, within: Duration) -> bool {
        if self.handle.is_closed() {
            return false;
        }
        match tokio::time::timeout(within, self.handle.channel_open_session()).await {
            Ok(Ok(channel)) => {
                let _ = channel.close().await;
                true
            }
            _ => false,
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.handle.disconnect(russh::Disconnect::ByApplication, "done", "en").await;
    }
}

fn push_bounded(buf: &mut Vec<u8>, data: &[u8], max: usize, keep_tail: bool) {
    buf.extend_from_slice(data);
    if buf.len() > max {
        if keep_tail {
            let cut = buf.len() - max;
            buf.drain(..cut);
        } else {
            buf.truncate(max);
        }
    }
}

impl Host for SshHost {
    async fn exec(&self, argv: &[String], stdin: Option<Bytes>, timeout: Duration) -> Result<Output> {
        let command = nio_shared::quote::command(argv).map_err(|e| Error::InvalidJob(e.to_string()))?;
        let program = argv.first().cloned().unwrap_or_default();
        let channel = self.handle.channel_open_session().await.map_err(|e| Error::session("opening a channel", e))?;
        channel.exec(true, command.as_bytes()).await.map_err(|e| Error::session(format!("exec {program}"), e))?;
        let (mut read, write) = channel.split();
        let send = async {
            if let Some(data) = stdin {
                write.data_bytes(data).await.map_err(|e| Error::session(format!("sending input to {program}"), e))?;
            }
            write.eof().await.map_err(|e| Error::session("closing the input", e))
        };
        let receive = async {
            let mut out = Output::default();
            while let Some(msg) = read.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        tracing::trace!(target: "nio::remote", %program, stream = "stdout", bytes = data.len());
                        push_bounded(&mut out.stdout, &data, MAX_STDOUT, false);
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        for line in String::from_utf8_lossy(&data).lines() {
                            tracing::debug!(target: "nio::remote", %program, "{line}");
                        }
                        push_bounded(&mut out.stderr, &data, MAX_STDERR, true);
                    }
                    ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
                    ChannelMsg::ExitSignal { signal_name, .. } => out.signal = Some(format!("{signal_name:?}")),
                    _ => {}
                }
            }
            out
        };
        let both = async {
            let (sent, out) = tokio::join!(send, receive);
            // The command may exit without reading its input; that is its answer, not a session error.
            if sent.is_err() && out.status.is_none() && out.signal.is_none() {
                sent?;
            }
            Ok(out)
        };
        match tokio::time::timeout(timeout, both).await {
            Ok(r) => r,
            Err(_) => {
                let _ = write.signal(Sig::KILL).await;
                let _ = write.close().await;
                Err(Error::Timeout { step: nio_shared::protocol::Step::Connect, after: timeout })
            }
        }
    }
}
