//! The fleet simulator: hundreds to thousands of simulated NixOS machines, each an SSH server (russh) on its
//! own loopback address with its own host key, implementing exactly NIO's remote command surface, and
//! recording every operation so the load test can check invariants.

mod machine;
pub mod model;
mod server;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use nio_shared::config::RemotePaths;
use russh::keys::{PrivateKey, PublicKey};

pub use machine::{File, SimJob, State, op_name};
pub use model::{Behaviour, Latency};
pub use nio_shared::remote::FACT_SCRIPT;

/// One recorded remote command.
#[derive(Debug, Clone)]
pub struct Op {
    pub machine: usize,
    /// The SSH connection it ran on (numbered as they were accepted).
    pub connection: u64,
    pub site: usize,
    pub program: String,
    pub start: Instant,
    pub end: Instant,
    pub status: u32,
}

/// A simulated machine.
pub struct SimMachine {
    pub index: usize,
    pub name: String,
    pub site: usize,
    pub addr: SocketAddr,
    pub state: Mutex<State>,
    pub behaviour: Behaviour,
    /// Commands currently running (an invariant: never more than one).
    pub running: Mutex<u32>,
}

impl SimMachine {
    /// The host key clients see now, in OpenSSH form.
    pub fn host_key(&self) -> String {
        let k = self.state.lock().map(|s| s.host_key.public_key().clone());
        k.map(|k| openssh(&k)).unwrap_or_default()
    }

    pub fn current_system(&self) -> String {
        self.state.lock().map(|s| s.current_system.clone()).unwrap_or_default()
    }
}

fn openssh(k: &PublicKey) -> String {
    let mut k = k.clone();
    k.set_comment("");
    k.to_openssh().unwrap_or_default()
}

/// Options of a fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub machines: usize,
    pub sites: usize,
    pub port: u16,
    /// First address; machines take consecutive addresses from it.
    pub first_address: Ipv4Addr,
    pub behaviour: Behaviour,
    pub paths: RemotePaths,
    /// Public keys allowed to log in.
    pub authorized: Vec<PublicKey>,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            machines: 10,
            sites: 1,
            port: 2222,
            first_address: Ipv4Addr::new(127, 1, 0, 1),
            behaviour: Behaviour::default(),
            paths: RemotePaths::default(),
            authorized: vec![],
        }
    }
}

/// Everything that happened, for invariant checks.
#[derive(Default)]
pub struct Recorder {
    pub ops: Mutex<Vec<Op>>,
    /// Commands that started while another ran on the same machine.
    pub overlaps: Mutex<Vec<String>>,
    /// Accepted logins: the machine and when.
    pub logins: Mutex<Vec<(usize, Instant)>>,
}

/// A running fleet. Servers stop when it is dropped.
pub struct Fleet {
    pub machines: Vec<Arc<SimMachine>>,
    pub recorder: Arc<Recorder>,
    pub options: FleetOptions,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn address(first: Ipv4Addr, i: usize) -> Ipv4Addr {
    let base = u32::from(first);
    Ipv4Addr::from(base + i as u32)
}

impl Fleet {
    /// Makes `commit` fail its health check on the machines `which` picks (it builds and activates).
    pub fn break_commit(&self, commit: &str, which: impl Fn(&SimMachine) -> bool) -> usize {
        let mut n = 0;
        for m in self.machines.iter().filter(|m| which(m)) {
            if let Ok(mut s) = m.state.lock() {
                s.broken_commits.insert(commit.to_string());
                n += 1;
            }
        }
        n
    }

    /// Starts `opts.machines` SSH servers; machine `i` is `sim-{i}` in site `i % sites`.
    pub async fn start(opts: FleetOptions) -> anyhow::Result<Self> {
        let recorder = Arc::new(Recorder::default());
        let mut machines = Vec::with_capacity(opts.machines);
        let mut tasks = Vec::with_capacity(opts.machines);
        let authorized = Arc::new(opts.authorized.clone());
        let paths = Arc::new(opts.paths.clone());
        for i in 0..opts.machines {
            let ip = address(opts.first_address, i);
            let addr = SocketAddr::new(IpAddr::V4(ip), opts.port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding simulated machine {i} on {addr}"))?;
            let key = PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)?;
            let name = format!("sim-{i}");
            let m = Arc::new(SimMachine {
                index: i,
                site: i % opts.sites.max(1),
                state: Mutex::new(State::new(&name, key)),
                name,
                addr,
                behaviour: opts.behaviour.clone(),
                running: Mutex::new(0),
            });
            machines.push(m.clone());
            tasks.push(tokio::spawn(server::serve(listener, m, recorder.clone(), authorized.clone(), paths.clone())));
        }
        Ok(Fleet { machines, recorder, options: opts, tasks })
    }

    /// Site name of site index `s`.
    pub fn site_name(s: usize) -> String {
        format!("site-{s}")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
