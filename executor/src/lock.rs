//! Per-machine locks in the `NIO_LOCKS` KV bucket: created if absent, refreshed while held, released by
//! revision. An executor that dies leaves its entry to expire after the bucket TTL (`lockTtlSeconds`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
}

/// A held lock; refreshed in the background until released. Dropping it without [`Held::release`] stops the
/// refreshes but keeps the entry, so the machine stays locked until the TTL runs out: used when a job is
/// abandoned while a remote command may still be running.
pub struct Held {
    kv: kv::Store,
    key: String,
    revision: Arc<AtomicU64>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.refresher.abort();
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
        let kv = nio_shared::nats::retrying("lock bucket", || async {
            match js.get_key_value(nio_shared::subjects::LOCKS_BUCKET).await {
                Ok(kv) => Ok(kv),
                Err(_) => Ok(js.create_key_value(nio_shared::nats::locks_bucket(replicas, ttl)).await?),
            }
        })
        .await
        .map_err(|e| Error::nats("creating lock bucket", e))?;
        let mut stream = js
            .get_stream(format!("KV_{}", nio_shared::subjects::LOCKS_BUCKET))
            .await
            .map_err(|e| Error::nats("lock bucket stream", e))?;
        let actual = stream.info().await.map_err(|e| Error::nats("lock bucket info", e))?.config.max_age;
        if actual != ttl {
            tracing::warn!(?actual, configured = ?ttl, "the lock bucket exists with another TTL; using the bucket's");
        }
        let ttl = if actual.is_zero() { ttl } else { actual };
        Ok(Locks { kv, holder, refresh_every: ttl / 3 })
    }

    /// Takes the lock on `key` if nobody holds it.
    pub async fn try_acquire(&self, key: &str) -> Result<Option<Held>> {
        match self.kv.create(key, Bytes::from(self.holder.clone())).await {
            Ok(rev) => {
                let revision = Arc::new(AtomicU64::new(rev));
                let refresher = tokio::spawn(refresh(
                    self.kv.clone(),
                    key.to_string(),
                    self.holder.clone(),
                    revision.clone(),
                    self.refresh_every,
                ));
                Ok(Some(Held { kv: self.kv.clone(), key: key.to_string(), revision, refresher }))
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(Error::nats(format!("lock {key}"), e)),
        }
    }

    /// Returns when `key` is released (or expires), or after `max`, whichever is first: a waiting job takes
    /// the machine as soon as the running one lets go instead of polling.
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

    /// Who holds `key`, if anyone.
    pub async fn holder(&self, key: &str) -> Option<String> {
        self.kv.get(key).await.ok().flatten().map(|v| String::from_utf8_lossy(&v).into_owned())
    }
}

async fn refresh(kv: kv::Store, key: String, holder: String, revision: Arc<AtomicU64>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match kv.update(&key, Bytes::from(holder.clone()), revision.load(Ordering::SeqCst)).await {
            Ok(rev) => revision.store(rev, Ordering::SeqCst),
            Err(e) => {
                tracing::warn!(lock = %key, error = %e, "lost a machine lock while holding it");
                return;
            }
        }
    }
}

impl Held {
    /// Releases the lock (only if it is still ours).
    pub async fn release(self) {
        self.refresher.abort();
        let rev = self.revision.load(Ordering::SeqCst);
        if let Err(e) = self.kv.delete_expect_revision(&self.key, Some(rev)).await {
            tracing::warn!(lock = %self.key, error = %e, "releasing a machine lock failed; it expires on its own");
        }
    }
}
