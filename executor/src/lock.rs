//! Per-machine locks in the `NIO_LOCKS` KV bucket: created if absent, refreshed while held, released by
//! revision. Every executor process beats in `NIO_EXECUTORS` (an entry that expires [`HEARTBEAT_TTL`] after the
//! last beat); a lock whose holder has no heartbeat belongs to a dead executor and is taken over at once,
//! instead of after the lock's own TTL (`lockTtlSeconds`). The machine itself serializes activations too
//! (the activation unit holds a file lock), so even a holder that was only stalled cannot overlap.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;

use crate::error::{Error, Result};

/// The lock bucket.
#[derive(Clone)]
pub struct Locks {
    kv: kv::Store,
    holder: String,
    refresh_every: Duration,
    /// The keys this process holds: an entry naming this process is one of these, never a sibling job's
    /// (a job never takes a key another job of this process holds, even if its entry expired meanwhile).
    mine: Arc<Mutex<HashSet<String>>>,
}

/// How soon a refresh or release that failed without an answer (a timeout, NATS unreachable) is tried again.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// How long a heartbeat lasts without renewal: four missed beats. With the second look a takeover waits for
/// ([`Locks::take_over`]), a holder is declared dead only after 3.5 s without a single beat getting through.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(2);
/// How often an executor beats.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

/// This process's heartbeat, and the others'.
#[derive(Clone)]
pub struct Heartbeats {
    kv: kv::Store,
}

impl Heartbeats {
    /// Opens (or creates) the bucket and beats as `me` until `stop`.
    pub async fn start(
        js: &async_nats::jetstream::Context,
        me: String,
        replicas: usize,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<Self> {
        // A bucket just created on a cluster may refuse writes until its replicas are placed: the first beat
        // is retried like the creation.
        let kv = nio_shared::nats::retrying("heartbeat bucket", || async {
            let kv = match js.get_key_value(nio_shared::subjects::EXECUTORS_BUCKET).await {
                Ok(kv) => kv,
                Err(_) => js.create_key_value(nio_shared::nats::executors_bucket(replicas, HEARTBEAT_TTL)).await?,
            };
            kv.put(&me, Bytes::from_static(b"alive")).await?;
            Ok(kv)
        })
        .await
        .map_err(|e| Error::nats("creating heartbeat bucket", e))?;
        let beat = kv.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        let _ = beat.delete(&me).await;
                        return;
                    }
                    _ = tokio::time::sleep(HEARTBEAT_EVERY) => {
                        // A beat that gets no answer is given up after a second, not JetStream's five: the next
                        // one must go out while this process's entry still stands.
                        match tokio::time::timeout(HEARTBEAT_EVERY * 2, beat.put(&me, Bytes::from_static(b"alive"))).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat failed"),
                            Err(_) => tracing::warn!("heartbeat unanswered for a second"),
                        }
                    }
                }
            }
        });
        Ok(Heartbeats { kv })
    }

    /// Whether `holder` beat within [`HEARTBEAT_TTL`]. Unknown (NATS trouble) counts as alive.
    pub async fn alive(&self, holder: &str) -> bool {
        match self.kv.get(holder).await {
            Ok(v) => v.is_some(),
            Err(_) => true,
        }
    }
}

/// A held lock; refreshed in the background until released. Dropping it without [`Held::release`] stops the
/// refreshes but keeps the entry, so the machine stays locked until the TTL runs out: used when a job is
/// abandoned while a remote command may still be running.
pub struct Held {
    kv: kv::Store,
    key: String,
    holder: String,
    revision: Arc<AtomicU64>,
    refresher: tokio::task::JoinHandle<()>,
    mine: Arc<Mutex<HashSet<String>>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.refresher.abort();
        self.mine.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.key);
    }
}

impl Locks {
    /// Opens (or creates) the bucket.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        holder: String,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Self> {
        Self::open_bucket(js, nio_shared::nats::locks_bucket(replicas, ttl), holder).await
    }

    /// The disruption-budget slots (`NIO_BUDGETS`): the same create-if-absent, refresh and takeover rules.
    pub async fn open_budgets(
        js: &async_nats::jetstream::Context,
        holder: String,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Self> {
        Self::open_bucket(js, nio_shared::nats::budgets_bucket(replicas, ttl), holder).await
    }

    async fn open_bucket(js: &async_nats::jetstream::Context, config: kv::Config, holder: String) -> Result<Self> {
        let (bucket, ttl) = (config.bucket.clone(), config.max_age);
        let kv = nio_shared::nats::retrying("lock bucket", || async {
            match js.get_key_value(&bucket).await {
                Ok(kv) => Ok(kv),
                Err(_) => Ok(js.create_key_value(config.clone()).await?),
            }
        })
        .await
        .map_err(|e| Error::nats(format!("creating bucket {bucket}"), e))?;
        // A bucket just created on a cluster can answer "stream not found" until its replicas are placed.
        let actual = nio_shared::nats::retrying(&format!("bucket {bucket} info"), || async {
            let mut stream = js.get_stream(format!("KV_{bucket}")).await?;
            Ok(stream.info().await?.config.max_age)
        })
        .await
        .map_err(|e| Error::nats(format!("bucket {bucket}"), e))?;
        if actual != ttl {
            tracing::warn!(%bucket, ?actual, configured = ?ttl, "the bucket exists with another TTL; using the bucket's");
        }
        let ttl = if actual.is_zero() { ttl } else { actual };
        Ok(Locks { kv, holder, refresh_every: ttl / 3, mine: Arc::default() })
    }

    /// Takes the lock on `key` if nobody holds it.
    pub async fn try_acquire(&self, key: &str) -> Result<Option<Held>> {
        {
            let mut mine = self.mine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !mine.insert(key.to_string()) {
                return Ok(None);
            }
        }
        let created = self.kv.create(key, Bytes::from(self.holder.clone())).await;
        let rev = match created {
            Ok(rev) => rev,
            Err(e) => {
                self.mine.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(key);
                return match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => Ok(None),
                    _ => Err(Error::nats(format!("lock {key}"), e)),
                };
            }
        };
        let revision = Arc::new(AtomicU64::new(rev));
        let refresher = tokio::spawn(refresh(
            self.kv.clone(),
            key.to_string(),
            self.holder.clone(),
            revision.clone(),
            self.refresh_every,
        ));
        Ok(Some(Held {
            kv: self.kv.clone(),
            key: key.to_string(),
            holder: self.holder.clone(),
            revision,
            refresher,
            mine: self.mine.clone(),
        }))
    }

    /// Returns when `key` is released (or expires), or after `max`, whichever is first: a waiting job takes
    /// the machine as soon as the running one lets go instead of polling (`max` bounds how late it notices a
    /// holder that died instead).
    pub async fn wait_released(&self, key: &str, max: Duration) {
        use futures::StreamExt as _;
        let released = async {
            // The watch starts with the key's latest entry, so a release just before it is seen too.
            let Ok(mut w) = self.kv.watch(key).await else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                return;
            };
            while let Some(Ok(e)) = w.next().await {
                if matches!(e.operation, kv::Operation::Delete | kv::Operation::Purge) {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(max, released).await;
    }

    /// Takes the lock on `key` from a holder whose executor is gone (no heartbeat): deletes its entry by
    /// revision (so a concurrent taker or a live holder's refresh wins instead) and creates ours. Returns the
    /// lock and the dead holder.
    pub async fn take_over(&self, key: &str, heartbeats: &Heartbeats) -> Result<Option<(Held, String)>> {
        let entry = match self.kv.entry(key).await {
            Ok(Some(e)) if matches!(e.operation, kv::Operation::Put) => e,
            Ok(_) => return Ok(self.try_acquire(key).await?.map(|h| (h, String::new()))),
            Err(e) => return Err(Error::nats(format!("lock {key}"), e)),
        };
        let holder = String::from_utf8_lossy(&entry.value).into_owned();
        // Holders from before heartbeats (no process suffix) never beat: their locks only expire.
        if holder == self.holder || !beats(&holder) || heartbeats.alive(&holder).await {
            return Ok(None);
        }
        // Gone twice, three beats apart: a live executor whose beats were refused for a while (a NATS election)
        // beats again within half a second of the bucket taking writes, so it is not mistaken for dead.
        tokio::time::sleep(HEARTBEAT_EVERY * 3).await;
        if heartbeats.alive(&holder).await {
            return Ok(None);
        }
        if self.kv.delete_expect_revision(key, Some(entry.revision)).await.is_err() {
            return Ok(None);
        }
        Ok(self.try_acquire(key).await?.map(|h| (h, holder)))
    }

    /// Who holds `key`, if anyone.
    pub async fn holder(&self, key: &str) -> Option<String> {
        self.kv.get(key).await.ok().flatten().map(|v| String::from_utf8_lossy(&v).into_owned())
    }
}

/// Whether `holder` is a heartbeating process's name: `{executor id}-{8 hex digits}`.
fn beats(holder: &str) -> bool {
    holder.rsplit_once('-').is_some_and(|(_, n)| n.len() == 8 && n.chars().all(|c| c.is_ascii_hexdigit()))
}

/// What the entry of `key` says when a write by revision was refused: still this process's (a write that
/// timed out reached the bucket after all, moving the revision on), or someone else's (or gone).
enum Found {
    Ours(u64),
    Lost(Option<String>),
}

async fn look(kv: &kv::Store, key: &str, holder: &str) -> std::result::Result<Found, kv::EntryError> {
    Ok(match kv.entry(key).await? {
        Some(e) if matches!(e.operation, kv::Operation::Put) && e.value.as_ref() == holder.as_bytes() => {
            Found::Ours(e.revision)
        }
        Some(e) if matches!(e.operation, kv::Operation::Put) => {
            Found::Lost(Some(String::from_utf8_lossy(&e.value).into_owned()))
        }
        _ => Found::Lost(None),
    })
}

/// Renews the entry every `every` while the lock is held. A renewal that gets no answer is tried again at once
/// (the entry lasts three periods); one refused because the revision moved looks at the entry: a renewal that
/// timed out but landed leaves it ours at a newer revision, which is adopted; one that expired meanwhile and
/// that nobody took is taken again. Only an entry that names another holder ends the renewals.
async fn refresh(kv: kv::Store, key: String, holder: String, revision: Arc<AtomicU64>, every: Duration) {
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        wait = every;
        let Err(e) = kv.update(&key, Bytes::from(holder.clone()), revision.load(Ordering::SeqCst)).await.map(|rev| {
            revision.store(rev, Ordering::SeqCst);
        }) else {
            continue;
        };
        if e.kind() != kv::UpdateErrorKind::WrongLastRevision {
            tracing::warn!(lock = %key, error = %e, "renewing a held lock failed; trying again");
            wait = RETRY_EVERY.min(every);
            continue;
        }
        match look(&kv, &key, &holder).await {
            Ok(Found::Ours(rev)) => revision.store(rev, Ordering::SeqCst),
            // Expired (the bucket was out of reach for longer than the TTL): nobody took it, so it is taken again.
            Ok(Found::Lost(None)) => match kv.create(&key, Bytes::from(holder.clone())).await {
                Ok(rev) => {
                    tracing::warn!(lock = %key, "a held lock expired while the bucket was out of reach; took it again");
                    revision.store(rev, Ordering::SeqCst);
                }
                Err(e) => {
                    tracing::error!(lock = %key, error = %e, "lost a held lock: it expired and could not be taken again");
                    return;
                }
            },
            Ok(Found::Lost(Some(by))) => {
                tracing::error!(lock = %key, now_held_by = %by, "lost a held lock: it expired and was taken");
                return;
            }
            Err(e) => {
                tracing::warn!(lock = %key, error = %e, "reading a held lock failed; trying again");
                wait = RETRY_EVERY.min(every);
            }
        }
    }
}

impl Held {
    /// Releases the lock (only if it is still ours): a delete by revision, tried again when it gets no answer
    /// or when a renewal that timed out moved the revision on.
    pub async fn release(self) {
        self.refresher.abort();
        for attempt in 1..=3 {
            let rev = self.revision.load(Ordering::SeqCst);
            let e = match self.kv.delete_expect_revision(&self.key, Some(rev)).await {
                Ok(()) => return,
                Err(e) => e,
            };
            if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                match look(&self.kv, &self.key, &self.holder).await {
                    Ok(Found::Ours(rev)) => {
                        self.revision.store(rev, Ordering::SeqCst);
                        continue;
                    }
                    // Gone (a delete that timed out landed) or someone else's: nothing of ours to release.
                    Ok(Found::Lost(_)) => return,
                    Err(_) => {}
                }
            }
            if attempt == 3 {
                tracing::warn!(lock = %self.key, error = %e, "releasing a lock failed; it expires on its own");
            } else {
                tokio::time::sleep(RETRY_EVERY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_heartbeating_holders_can_be_declared_dead() {
        assert!(super::beats("e1-0a1b2c3d"));
        assert!(super::beats("nio-executor-7f9c-00ff00ff"));
        assert!(!super::beats("e1"), "an executor from before heartbeats");
        assert!(!super::beats("nio-executor-7f9c8d6b5-abcde"), "a pod name");
    }
}
