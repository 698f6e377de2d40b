//! JetStream stream, consumer and bucket settings (docs/design.md §3), as data. Controllers and executors both
//! create-or-verify these; the settings are defined once, here.

use std::time::Duration;

use async_nats::jetstream::{consumer, kv, stream};

use crate::config::{ExecutorConfig, SiteLimits};
use crate::subjects;

/// How long a duplicate job id is remembered.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(300);

/// Jobs kept per machine and kind. The newest one runs and older ones still queued are skipped (the executor
/// checks before it runs a job); more than one, because a message the stream drops while its job runs is
/// forgotten by the broker, which then hands that job's site slot to another machine. Only when this many newer
/// jobs for one machine arrive during one of its jobs does that happen; the bound keeps the stream small when
/// no executor is around to take probes.
pub const JOBS_PER_SUBJECT: i64 = 8;

/// `NIO_JOBS`: work queue, up to [`JOBS_PER_SUBJECT`] messages per machine and kind, the newest of which runs.
pub fn jobs_stream(replicas: usize) -> stream::Config {
    stream::Config {
        name: subjects::JOBS_STREAM.into(),
        description: Some("NIO rebuild jobs: one per machine and kind".into()),
        subjects: vec![format!("{}.>", subjects::JOBS_PREFIX)],
        retention: stream::RetentionPolicy::WorkQueue,
        max_messages_per_subject: JOBS_PER_SUBJECT,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// `NIO_STATUS`: work queue of executor reports, one durable consumer per cluster.
pub fn status_stream(replicas: usize) -> stream::Config {
    stream::Config {
        name: subjects::STATUS_STREAM.into(),
        description: Some("NIO job status events, consumed by each cluster's controller".into()),
        subjects: vec![format!("{}.>", subjects::STATUS_PREFIX)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        max_age: Duration::from_secs(7 * 24 * 3600),
        ..Default::default()
    }
}

/// `NIO_BUDGETS`: disruption-budget slots, held and expiring like the machine locks.
pub fn budgets_bucket(replicas: usize, ttl: Duration) -> kv::Config {
    kv::Config {
        bucket: subjects::BUDGETS_BUCKET.into(),
        description: "NIO disruption-budget slots".into(),
        ..locks_bucket(replicas, ttl)
    }
}

/// `NIO_LOCKS`: one holder per machine; an entry expires `ttl` after its last refresh.
pub fn locks_bucket(replicas: usize, ttl: Duration) -> kv::Config {
    kv::Config {
        bucket: subjects::LOCKS_BUCKET.into(),
        description: "NIO per-machine locks".into(),
        history: 1,
        max_age: ttl,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// `NIO_EXECUTORS`: a heartbeat per executor process; an entry expires `ttl` after its last beat, so a lock
/// whose holder has no entry belongs to a dead executor.
pub fn executors_bucket(replicas: usize, ttl: Duration) -> kv::Config {
    kv::Config {
        bucket: subjects::EXECUTORS_BUCKET.into(),
        description: "NIO executor heartbeats".into(),
        history: 1,
        max_age: ttl,
        storage: stream::StorageType::Memory,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// The durable consumer every executor shares for one site: `max_ack_pending` is the site's limit, so the
/// broker enforces it across all executors.
pub fn site_consumer(site: &SiteLimits, cfg: &ExecutorConfig) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::site_consumer(&site.name)),
        description: Some(format!("NIO executors for site {}", site.name)),
        filter_subject: subjects::site_jobs_filter(&site.name),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(cfg.ack_wait_seconds),
        max_deliver: cfg.max_deliver,
        max_ack_pending: i64::from(site.max_in_flight),
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

/// The durable consumer of one cluster's status events.
pub fn status_consumer(cluster: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::status_consumer(cluster)),
        description: Some(format!("NIO controller of cluster {cluster}")),
        filter_subject: subjects::cluster_status_filter(cluster),
        ack_policy: consumer::AckPolicy::Explicit,
        // Events handed to a controller that dies come back after this: short, because a standby taking over
        // must not wait for them (a batch is applied in well under it; applying one twice is harmless).
        ack_wait: Duration::from_secs(10),
        // Never given up: an event that cannot be applied yet (the apiserver down for an upgrade, throttling,
        // RBAC being fixed) is retried with a growing delay (status_consumer), not dropped after a few tries,
        // which left its machine Applying for good. Undecodable events are terminated, not retried.
        max_deliver: -1,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

/// How often NIO's processes ping their NATS server. A member cut off by a partition does not close the
/// connection, it just goes quiet: async-nats gives a connection up after two unanswered pings and moves to
/// another member, so this interval sets how long a partition can hold a client (about three intervals; at
/// async-nats' default of one minute it would be three minutes).
pub const PING_INTERVAL: Duration = Duration::from_secs(2);

/// Connection options shared by the controller and the executor: named, the first connection retried like any
/// later one (a member still starting must not make the process exit), and [`PING_INTERVAL`].
pub fn connect_options(name: String) -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new().name(name).retry_on_initial_connect().ping_interval(PING_INTERVAL)
}

/// The servers of a `--nats-url`: one URL, or several separated by commas (the members of a cluster; the
/// client connects to any that answers and learns the others from it).
pub fn servers(urls: &str) -> Vec<String> {
    urls.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_string).collect()
}

/// Acknowledges `msg` with `kind`, logging an error rather than failing: the broker redelivers a message whose
/// ack was lost after its ack wait, so a lost ack costs a duplicate delivery, never a job.
pub async fn ack(msg: &async_nats::jetstream::Message, kind: async_nats::jetstream::AckKind) {
    if let Err(e) = msg.ack_with(kind).await {
        tracing::warn!(subject = %msg.subject, ?kind, error = %e, "acknowledging a message failed; it will be redelivered");
    }
}

/// Creates `NIO_JOBS` and `NIO_STATUS` when missing; an existing stream whose critical settings differ is an
/// error saying what differs (both binaries refuse to start against it).
pub async fn ensure_streams(js: &async_nats::jetstream::Context, replicas: usize) -> crate::Result<()> {
    use crate::Error;
    for want in [jobs_stream(replicas), status_stream(replicas)] {
        let info = retrying(&format!("stream {}", want.name), || async {
            match js.get_stream(&want.name).await {
                Ok(mut s) => Ok(s.info().await?.clone()),
                Err(_) => Ok(js.get_or_create_stream(want.clone()).await?.info().await?.clone()),
            }
        })
        .await
        .map_err(|e| Error::nats(format!("creating stream {}", want.name), e))?;
        // Streams made before the queue kept more than one job per machine and kind take the new bound.
        let info = if info.config.max_messages_per_subject != want.max_messages_per_subject
            && stream_mismatches(&info.config, &want).len() == 1
        {
            let config = stream::Config { max_messages_per_subject: want.max_messages_per_subject, ..info.config };
            retrying(&format!("updating stream {}", want.name), || async {
                Ok(js.update_stream(config.clone()).await?)
            })
            .await
            .map_err(|e| Error::nats(format!("updating stream {}", want.name), e))?
        } else {
            info
        };
        let diff = stream_mismatches(&info.config, &want);
        if !diff.is_empty() {
            let what = format!("stream {} exists with incompatible settings: {}", want.name, diff.join("; "));
            return Err(Error::Nats { what, source: None });
        }
    }
    Ok(())
}

/// Runs `f` until it succeeds, for up to five minutes. JetStream requests time out or are refused while a cluster
/// forms, elects a leader or sees several clients create the same stream at once, and on a loaded machine all
/// of that takes long; a process starting then must wait (its /readyz not ready meanwhile), not exit. (A CI run
/// saw an executor give up after one minute while a 3-member cluster created its streams.)
pub async fn retrying<T, F, Fut>(what: &str, f: F) -> Result<T, crate::error::BoxError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::error::BoxError>>,
{
    retry_within(what, Duration::from_secs(300), f).await
}

/// Runs `f` until it succeeds or `patience` is spent, backing off from 250 ms to 5 s between attempts (never
/// sleeping past the patience); returns the last error.
pub async fn retry_within<T, F, Fut>(what: &str, patience: Duration, f: F) -> Result<T, crate::error::BoxError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::error::BoxError>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut delay = Duration::from_millis(250);
    let mut attempt = 1;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Err(e);
                }
                let pause = delay.min(left);
                tracing::warn!(what, attempt, error = %e, ?pause, "JetStream request failed; retrying");
                tokio::time::sleep(pause).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
        }
    }
}

/// Differences in the settings NIO relies on between an existing stream and the wanted one.
pub fn stream_mismatches(have: &stream::Config, want: &stream::Config) -> Vec<String> {
    let mut out = Vec::new();
    if have.retention != want.retention {
        out.push(format!("retention is {:?}, NIO needs {:?}", have.retention, want.retention));
    }
    if have.subjects != want.subjects {
        out.push(format!("subjects are {:?}, NIO needs {:?}", have.subjects, want.subjects));
    }
    let per_subject = |n: i64| if n <= 0 { -1 } else { n };
    if per_subject(have.max_messages_per_subject) != per_subject(want.max_messages_per_subject) {
        out.push(format!(
            "max_msgs_per_subject is {}, NIO needs {}",
            have.max_messages_per_subject, want.max_messages_per_subject
        ));
    }
    if have.duplicate_window < want.duplicate_window {
        out.push(format!(
            "duplicate window is {:?}, NIO needs at least {:?}",
            have.duplicate_window, want.duplicate_window
        ));
    }
    if have.storage != want.storage {
        out.push(format!("storage is {:?}, NIO needs {:?}", have.storage, want.storage));
    }
    out
}

/// Differences between an existing site consumer and the limits this executor was started with.
pub fn consumer_mismatches(have: &consumer::pull::Config, want: &consumer::pull::Config) -> Vec<String> {
    let mut out = Vec::new();
    if have.max_ack_pending != want.max_ack_pending {
        out.push(format!(
            "maxInFlight: the site consumer allows {} jobs in flight, this executor is configured for {}; give every executor of the site the same maxInFlight (or delete consumer {} to change it)",
            have.max_ack_pending,
            want.max_ack_pending,
            want.durable_name.as_deref().unwrap_or("?")
        ));
    }
    if have.filter_subject != want.filter_subject {
        out.push(format!("filter subject is {}, expected {}", have.filter_subject, want.filter_subject));
    }
    if have.ack_policy != want.ack_policy {
        out.push("ack policy must be explicit".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_request_refused_during_an_election_is_retried_until_it_succeeds() {
        let calls = AtomicU32::new(0);
        let got = retry_within("test", Duration::from_secs(10), || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0..=2 => Err("no stream found for given subject".into()),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(got.ok(), Some(3), "the fourth attempt's result, after three refusals");
    }

    #[tokio::test(start_paused = true)]
    async fn retrying_gives_up_with_the_last_error_once_the_patience_is_spent() {
        let start = tokio::time::Instant::now();
        let calls = AtomicU32::new(0);
        let got: Result<(), _> = retry_within("test", Duration::from_secs(12), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err("503".into())
        })
        .await;
        assert_eq!(got.map_err(|e| e.to_string()), Err("503".to_string()));
        assert_eq!(start.elapsed(), Duration::from_secs(12), "never sleeps past the patience");
        // 0.25 + 0.5 + 1 + 2 + 4 = 7.75 s, then 4.25 s of the last 5 s pause: 7 attempts.
        assert_eq!(calls.load(Ordering::SeqCst), 7);
    }
}
