//! The SSH side of a simulated machine (russh server): public-key auth against the executors' keys, one
//! command per session channel, standard input buffered until EOF for commands that read it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nio_shared::config::RemotePaths;
use russh::keys::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Handle, Msg, Session};
use russh::{Channel, ChannelId};

use super::machine::{self, reads_stdin};
use super::model::chance;
use super::{Op, Recorder, SimMachine};

struct Pending {
    argv: Vec<String>,
    stdin: Vec<u8>,
}

struct Conn {
    /// This connection's number, unique in the process ([`Op::connection`]).
    id: u64,
    machine: Arc<SimMachine>,
    recorder: Arc<Recorder>,
    authorized: Arc<Vec<PublicKey>>,
    paths: Arc<RemotePaths>,
    pending: HashMap<ChannelId, Pending>,
}

/// Numbers the connections of every simulated machine.
static NEXT_CONNECTION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Accepts connections for one machine until the task is aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    m: Arc<SimMachine>,
    recorder: Arc<Recorder>,
    authorized: Arc<Vec<PublicKey>>,
    paths: Arc<RemotePaths>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let down = m.state.lock().ok().and_then(|s| s.down_until).is_some_and(|t| Instant::now() < t);
        if down || chance(m.behaviour.flaky_connect_rate) {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let key = match m.state.lock() {
            Ok(s) => s.host_key.clone(),
            Err(_) => continue,
        };
        let config = Arc::new(russh::server::Config {
            keys: vec![key],
            auth_rejection_time: Duration::from_millis(10),
            auth_rejection_time_initial: Some(Duration::ZERO),
            inactivity_timeout: Some(Duration::from_secs(600)),
            nodelay: true,
            ..Default::default()
        });
        let conn = Conn {
            id: NEXT_CONNECTION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            machine: m.clone(),
            recorder: recorder.clone(),
            authorized: authorized.clone(),
            paths: paths.clone(),
            pending: HashMap::new(),
        };
        tokio::spawn(async move {
            if let Ok(session) = russh::server::run_stream(config, stream, conn).await {
                let _ = session.await;
            }
        });
    }
}

fn split(command: &[u8]) -> Option<Vec<String>> {
    shlex::split(std::str::from_utf8(command).ok()?)
}

impl Conn {
    /// Runs a command in the background and answers on the channel.
    fn launch(&self, channel: ChannelId, argv: Vec<String>, stdin: Vec<u8>, handle: Handle) {
        let (m, recorder, paths, connection) =
            (self.machine.clone(), self.recorder.clone(), self.paths.clone(), self.id);
        tokio::spawn(async move {
            let start = Instant::now();
            {
                let mut running = m.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if *running > 0
                    && let Ok(mut o) = recorder.overlaps.lock()
                {
                    o.push(format!("{}: `{}` started while another command ran", m.name, argv.join(" ")));
                }
                *running += 1;
            }
            let (out, took) = {
                let mut state = m.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                machine::run(&mut state, &paths, &m.behaviour, &argv, &stdin)
            };
            if !took.is_zero() {
                tokio::time::sleep(took).await;
            }
            let end = Instant::now();
            if let Ok(mut r) = m.running.lock() {
                *r = r.saturating_sub(1);
            }
            if let Ok(mut ops) = recorder.ops.lock() {
                ops.push(Op {
                    machine: m.index,
                    connection,
                    site: m.site,
                    program: machine::op_name(&argv),
                    start,
                    end,
                    status: out.status,
                });
            }
            if !out.stdout.is_empty() {
                let _ = handle.data(channel, out.stdout.clone()).await;
            }
            if !out.stderr.is_empty() {
                let _ = handle.extended_data(channel, 1, out.stderr.clone()).await;
            }
            let _ = handle.exit_status_request(channel, out.status).await;
            let _ = handle.eof(channel).await;
            let _ = handle.close(channel).await;
            if out.reboot {
                let into_installer = argv.first().is_some_and(|p| p == "/root/kexec/kexec/run");
                if let Ok(mut s) = m.state.lock() {
                    s.reboot(into_installer);
                    s.down_until = Some(Instant::now() + m.behaviour.reboot);
                }
                // Rebooting drops every connection.
                let _ = handle.disconnect(russh::Disconnect::ByApplication, "rebooting".into(), "en".into()).await;
            }
        });
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let known = self.authorized.iter().any(|k| k.key_data() == key.public_key.key_data());
        if !(known && user == "root") {
            return Ok(Auth::reject());
        }
        if let Ok(mut l) = self.recorder.logins.lock() {
            l.push((self.machine.index, Instant::now()));
        }
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        let Some(argv) = split(data) else {
            let h = session.handle();
            tokio::spawn(async move {
                let _ = h.extended_data(channel, 1, b"sh: syntax error: unterminated quoted string\n".to_vec()).await;
                let _ = h.exit_status_request(channel, 2).await;
                let _ = h.eof(channel).await;
                let _ = h.close(channel).await;
            });
            return Ok(());
        };
        if reads_stdin(&argv) {
            self.pending.insert(channel, Pending { argv, stdin: Vec::new() });
        } else {
            self.launch(channel, argv, Vec::new(), session.handle());
        }
        Ok(())
    }

    /// OpenSSH clients driven by peers (ansible's `-tt`) ask for a terminal; the simulator accepts and ignores it.
    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col: u32,
        _row: u32,
        _pix_w: u32,
        _pix_h: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn data(&mut self, channel: ChannelId, data: &[u8], _session: &mut Session) -> Result<(), Self::Error> {
        if let Some(p) = self.pending.get_mut(&channel) {
            p.stdin.extend_from_slice(data);
        }
        Ok(())
    }

    async fn channel_eof(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        if let Some(p) = self.pending.remove(&channel) {
            self.launch(channel, p.argv, p.stdin, session.handle());
        }
        Ok(())
    }
}
