#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic
//! Machine locks and budget slots (`executor/src/lock.rs`) against a real nats-server that stalls.

use std::time::Duration;

use nio_executor::lock::Locks;
use nio_loadtest::nats::NatsServer;

/// The server stalls (SIGSTOP) just as the holder renews its lock, for longer than JetStream's request timeout:
/// the renewal times out on the holder's side but lands when the server continues. The holder keeps the lock
/// past the TTL counted from its last confirmed write (another process cannot take it), and releasing it frees
/// it at once instead of leaving it to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_through_a_stalled_server_stays_held_and_is_released_at_once() {
    let nats = NatsServer::start().await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let ttl = Duration::from_secs(9); // renewed every 3 s
    let ours = Locks::open(&js, "e1-0000000a".into(), ttl, 1).await.unwrap();
    let theirs = Locks::open(&js, "e2-0000000b".into(), ttl, 1).await.unwrap();
    let held = ours.try_acquire("m1_22").await.unwrap().expect("a free lock is taken");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    nats.freeze(true).unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    nats.freeze(false).unwrap();
    // Past the TTL from the renewal that timed out (the last write the holder saw confirmed was at 0 s).
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    assert!(theirs.try_acquire("m1_22").await.unwrap().is_none(), "the lock is still held");
    assert_eq!(ours.holder("m1_22").await.as_deref(), Some("e1-0000000a"));
    held.release().await;
    assert!(theirs.try_acquire("m1_22").await.unwrap().is_some(), "released at once, not left to expire");
}

/// The server stalls for longer than the lock's TTL: the entry expires while its job still runs. Nobody took it
/// meanwhile, so the holder takes it again at once, and it stays the holder's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_that_expired_during_a_stall_is_taken_again_by_its_holder() {
    let nats = NatsServer::start().await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let ttl = Duration::from_secs(3);
    let ours = Locks::open(&js, "e1-0000000a".into(), ttl, 1).await.unwrap();
    let theirs = Locks::open(&js, "e2-0000000b".into(), ttl, 1).await.unwrap();
    let _held = ours.try_acquire("m1_22").await.unwrap().expect("a free lock is taken");
    nats.freeze(true).unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    nats.freeze(false).unwrap();
    tokio::time::sleep(ttl * 2).await;
    assert!(theirs.try_acquire("m1_22").await.unwrap().is_none(), "the holder took its lock again");
    assert_eq!(ours.holder("m1_22").await.as_deref(), Some("e1-0000000a"));
}

/// A jobs stream made before the queue kept several jobs per machine (one per subject) is brought to the new
/// bound when an executor starts, instead of refused; its queued jobs stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_jobs_stream_is_updated_in_place() {
    let nats = NatsServer::start().await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let old = async_nats::jetstream::stream::Config { max_messages_per_subject: 1, ..nio_shared::nats::jobs_stream(1) };
    js.create_stream(old).await.unwrap();
    js.publish("nio.jobs.dc1.apply.c.ns.m1", "queued".into()).await.unwrap().await.unwrap();
    nio_shared::nats::ensure_streams(&js, 1).await.unwrap();
    let mut stream = js.get_stream(nio_shared::subjects::JOBS_STREAM).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.max_messages_per_subject, nio_shared::nats::JOBS_PER_SUBJECT);
    assert_eq!(info.state.messages, 1, "the queued job is still there");
}
