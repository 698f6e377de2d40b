//! Idle SSH connections kept for the next job to the same machine, as OpenSSH's `ControlPersist` keeps a master
//! connection (nixos-rebuild runs every `--target-host` command through one with `ControlPersist=60`).
//!
//! A job's first connection costs a key exchange and a login: about 3 ms of CPU on each side and several round
//! trips, and on a fleet-wide rollout those handshakes are most of what stands between the push and each machine's
//! first command. A connection that ended a successful job is kept here for `persist`, and the next job to the
//! machine starts on it at once when it would verify the same pinned host key, as the same user, with the same
//! identity. What still needs a new login gets one: the confirmation after an activation (the proof that logins
//! still work) and the take-over of an earlier delivery's activation.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nio_shared::protocol::Endpoint;

/// How many idle connections are kept, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// How long an idle connection is kept (zero: none is kept, every job logs in anew).
    pub persist: Duration,
    /// Most idle connections kept at once; beyond it the longest idle one is closed.
    pub max_idle: usize,
}

/// What a kept connection was opened with; a job may use it only when all of it is what the job would connect with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    host: String,
    port: u16,
    user: String,
    identity: String,
    /// The host key the connection verified (OpenSSH form, no comment).
    host_key: String,
}

impl Key {
    /// The key of a connection to `endpoint` with `identity` that verified `host_key`.
    pub fn new(endpoint: &Endpoint, identity: &str, host_key: &str) -> Self {
        Key {
            host: endpoint.host.clone(),
            port: endpoint.port,
            user: endpoint.user.clone(),
            identity: identity.to_string(),
            host_key: host_key.to_string(),
        }
    }

    /// What a job to `endpoint` may reuse: only with a pinned host key (a job trusting the first key it sees
    /// connects anew, so the key it reports is the one the machine presents now). `normalise` turns the pinned line
    /// into the form connections record.
    pub fn for_job(endpoint: &Endpoint, identity: &str, normalise: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let pinned = normalise(endpoint.host_key.as_deref()?)?;
        Some(Key::new(endpoint, identity, &pinned))
    }
}

struct Idle<C> {
    conn: C,
    /// When it was kept (idle since).
    since: Instant,
    /// When it logged in.
    born: Instant,
}

/// The longest a connection serves, however busy: a kept connection proves nothing about logins since it was made
/// (a key revoked, `AllowUsers` changed), so now and then a job logs in anew.
pub const MAX_AGE: Duration = Duration::from_secs(600);

/// The idle connections, one per key.
pub struct Pool<C> {
    limits: PoolLimits,
    idle: Mutex<HashMap<Key, Idle<C>>>,
}

impl<C> Pool<C> {
    pub fn new(limits: PoolLimits) -> Self {
        Pool { limits, idle: Mutex::new(HashMap::new()) }
    }

    /// Takes the idle connection for `key`, if one is kept, idle for less than `persist` and logged in less than
    /// [`MAX_AGE`] ago at `now`; an expired one is handed back to be closed.
    pub fn take(&self, key: &Key, now: Instant) -> Result<C, Option<C>> {
        let found = self.idle.lock().ok().and_then(|mut i| i.remove(key)).ok_or(None)?;
        if self.fresh(&found, now) { Ok(found.conn) } else { Err(Some(found.conn)) }
    }

    fn fresh(&self, i: &Idle<C>, now: Instant) -> bool {
        now.saturating_duration_since(i.since) < self.limits.persist && now.saturating_duration_since(i.born) < MAX_AGE
    }

    /// Keeps `conn`, logged in at `born`, under `key` from `now`. Returns what must be closed: `conn` itself when
    /// nothing is kept (or it is too old to serve again), the connection it replaces, or the longest idle one when
    /// the pool is full.
    pub fn put(&self, key: Key, conn: C, born: Instant, now: Instant) -> Vec<C> {
        if self.limits.persist.is_zero() || self.limits.max_idle == 0 || now.saturating_duration_since(born) >= MAX_AGE
        {
            return vec![conn];
        }
        let Ok(mut idle) = self.idle.lock() else { return vec![conn] };
        let mut out: Vec<C> = idle.remove(&key).map(|i| i.conn).into_iter().collect();
        if idle.len() >= self.limits.max_idle {
            let oldest = idle.iter().min_by_key(|(_, i)| i.since).map(|(k, _)| k.clone());
            out.extend(oldest.and_then(|k| idle.remove(&k)).map(|i| i.conn));
        }
        idle.insert(key, Idle { conn, since: now, born });
        out
    }

    /// Removes the connections idle for `persist` or longer, or older than [`MAX_AGE`], at `now`, to be closed.
    pub fn expire(&self, now: Instant) -> Vec<C> {
        let Ok(mut idle) = self.idle.lock() else { return vec![] };
        let old: Vec<Key> = idle.iter().filter(|(_, i)| !self.fresh(i, now)).map(|(k, _)| k.clone()).collect();
        old.iter().filter_map(|k| idle.remove(k)).map(|i| i.conn).collect()
    }

    /// Removes every connection (at shutdown), to be closed.
    pub fn drain(&self) -> Vec<C> {
        self.idle.lock().map(|mut i| i.drain().map(|(_, i)| i.conn).collect()).unwrap_or_default()
    }

    /// How many connections are idle.
    pub fn len(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How often [`Pool::expire`] should run: often enough that no connection stays much past `persist`; zero
    /// when nothing is ever kept.
    pub fn sweep_every(&self) -> Duration {
        if self.limits.persist.is_zero() || self.limits.max_idle == 0 {
            return Duration::ZERO;
        }
        (self.limits.persist / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(host: &str, user: &str, pinned: Option<&str>) -> Endpoint {
        Endpoint {
            host: host.into(),
            port: 22,
            user: user.into(),
            identity: None,
            host_key: pinned.map(str::to_string),
        }
    }

    fn same(line: &str) -> Option<String> {
        Some(line.trim().to_string())
    }

    fn pool(persist_s: u64, max_idle: usize) -> Pool<&'static str> {
        Pool::new(PoolLimits { persist: Duration::from_secs(persist_s), max_idle })
    }

    #[test]
    fn a_job_reuses_only_a_connection_that_verified_its_pinned_key_as_its_user_and_identity() {
        let p = pool(60, 10);
        let t = Instant::now();
        let e = endpoint("10.0.0.1", "root", Some("ssh-ed25519 AAAA"));
        assert!(p.put(Key::new(&e, "default", "ssh-ed25519 AAAA"), "c1", t, t).is_empty());
        // A job trusting the first key it sees never reuses: the key it reports must be the one presented now.
        assert_eq!(Key::for_job(&endpoint("10.0.0.1", "root", None), "default", same), None);
        for other in [
            endpoint("10.0.0.1", "root", Some("ssh-ed25519 BBBB")),
            endpoint("10.0.0.2", "root", Some("ssh-ed25519 AAAA")),
            endpoint("10.0.0.1", "deploy", Some("ssh-ed25519 AAAA")),
        ] {
            let k = Key::for_job(&other, "default", same).expect("pinned");
            assert_eq!(p.take(&k, t), Err(None), "{other:?} must connect anew");
        }
        let k = Key::for_job(&e, "fleet-key", same).expect("pinned");
        assert_eq!(p.take(&k, t), Err(None), "another identity must log in itself");
        let k = Key::for_job(&e, "default", same).expect("pinned");
        assert_eq!(p.take(&k, t + Duration::from_secs(1)), Ok("c1"));
        assert_eq!(p.take(&k, t + Duration::from_secs(1)), Err(None), "a connection serves one job at a time");
    }

    #[test]
    fn an_idle_connection_lasts_persist_and_the_pool_keeps_at_most_max_idle() {
        let p = pool(60, 2);
        let t = Instant::now();
        let k = |h: &str| Key::new(&endpoint(h, "root", None), "default", "k");
        let at = |s: u64| t + Duration::from_secs(s);
        assert!(p.put(k("a"), "a", t, t).is_empty());
        assert!(p.put(k("b"), "b", t, at(1)).is_empty());
        assert_eq!(p.put(k("c"), "c", t, at(2)), vec!["a"], "the longest idle goes first");
        assert_eq!(p.put(k("c"), "c2", t, at(3)), vec!["c"], "one connection per machine");
        assert_eq!(p.len(), 2);
        assert_eq!(p.expire(at(60)), Vec::<&str>::new());
        assert_eq!(p.expire(at(61)), vec!["b"]);
        assert_eq!(p.take(&k("c"), at(63)), Err(Some("c2")), "taken at its expiry: closed, connect anew");
        assert!(p.is_empty());
        assert!(p.put(k("d"), "d", t, t).is_empty());
        assert_eq!(p.drain(), vec!["d"]);
        // However busy, a connection serves for MAX_AGE from its login, then a job logs in anew.
        let old = t + MAX_AGE - Duration::from_secs(30);
        assert!(p.put(k("e"), "e", t, old).is_empty());
        assert_eq!(p.take(&k("e"), old + Duration::from_secs(29)), Ok("e"));
        assert!(p.put(k("e"), "e", t, old + Duration::from_secs(29)).is_empty());
        assert_eq!(p.take(&k("e"), t + MAX_AGE), Err(Some("e")), "too old, though idle for a second");
        assert_eq!(p.put(k("e"), "e", t, t + MAX_AGE), vec!["e"], "too old to keep");
    }

    #[test]
    fn persist_zero_keeps_nothing() {
        let p = pool(0, 10);
        let k = Key::new(&endpoint("a", "root", None), "default", "k");
        let t = Instant::now();
        assert_eq!(p.put(k.clone(), "a", t, t), vec!["a"]);
        assert_eq!(p.take(&k, t), Err(None));
    }
}
