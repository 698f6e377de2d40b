//! Per-machine locks in the `NIO_LOCKS` KV bucket: created if absent, refreshed while held, released by
//! revision. An executor that dies leaves its entry to expire after `LOCK_TTL`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::kv;
use bytes::Bytes;

use crate::error::{Error, Result};

/// The lock bucket.
#[derive(Clone)]
pub struct Locks {
    kv: kv::Store,
    holder: String,
}

/// A held lock; refreshed in the background until released.
pub struct Held {
    kv: kv::Store,
    key: String,
    revision: Arc<AtomicU64>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Locks {
    /// Opens (or creates) the bucket.
    pub async fn open(js: &async_nats::jetstream::Context, holder: String) -> Result<Self> {
        let kv = match js.get_key_value(nio_shared::subjects::LOCKS_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(nio_shared::nats::locks_bucket(1))
                .await
                .map_err(|e| Error::Nats(format!("creating lock bucket: {e}")))?,
        };
        Ok(Locks { kv, holder })
    }

    /// Takes the lock on `key` if nobody holds it.
    pub async fn try_acquire(&self, key: &str) -> Result<Option<Held>> {
        match self.kv.create(key, Bytes::from(self.holder.clone())).await {
            Ok(rev) => {
                let revision = Arc::new(AtomicU64::new(rev));
                let refresher =
                    tokio::spawn(refresh(self.kv.clone(), key.to_string(), self.holder.clone(), revision.clone()));
                Ok(Some(Held { kv: self.kv.clone(), key: key.to_string(), revision, refresher }))
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(Error::Nats(format!("lock {key}: {e}"))),
        }
    }

    /// Who holds `key`, if anyone.
    pub async fn holder(&self, key: &str) -> Option<String> {
        self.kv.get(key).await.ok().flatten().map(|v| String::from_utf8_lossy(&v).into_owned())
    }
}

async fn refresh(kv: kv::Store, key: String, holder: String, revision: Arc<AtomicU64>) {
    let every = nio_shared::nats::LOCK_TTL / 3;
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
