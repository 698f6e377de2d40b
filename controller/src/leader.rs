//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's semantics
//! (`k8s.io/client-go/tools/leaderelection`):
//!
//! - A candidate never compares the holder's `renewTime` with its own clock (clocks skew). It remembers when it
//!   last *observed the record change*, on its own monotonic clock, and takes the lease only when the record
//!   has not changed for `leaseDurationSeconds` since then.
//! - The leader renews every `retry_period`; each request has a timeout. When no renewal has succeeded for
//!   `renew_deadline` (shorter than the lease duration) it steps down: it stops reconciling and publishing
//!   before any standby can consider the lease expired. The deadline counts from when the last successful
//!   renewal was *sent*, so a slow response can only make the leader step down earlier.
//! - On shutdown the leader releases the lease (empty holder, 1 s duration) so a standby takes over at once.
//! - Losing the lease is not fatal: the replica goes back to being a candidate.

use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Timing of the election (client-go's LeaseDuration, RenewDeadline, RetryPeriod).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Timing {
    /// client-go's proportions (15 s / 10 s / 2 s) scaled to `lease_duration`.
    pub fn for_lease(lease_duration: Duration) -> Self {
        Timing { lease_duration, renew_deadline: lease_duration * 2 / 3, retry_period: lease_duration * 2 / 15 }
    }
}

/// What a candidate last saw of the lease, and when (on this replica's monotonic clock).
#[derive(Debug, Clone)]
struct Observed {
    record: LeaseSpec,
    at: Instant,
}

/// The pure decision: may `identity` take or renew the lease described by `observed` at `now`?
fn may_take(identity: &str, observed: &LeaseSpec, observed_at: Instant, now: Instant) -> bool {
    let holder = observed.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == identity {
        return true;
    }
    let duration = Duration::from_secs(u64::try_from(observed.lease_duration_seconds.unwrap_or(15)).unwrap_or(15));
    now >= observed_at + duration
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    observed: tokio::sync::Mutex<Option<Observed>>,
}

/// How a term as leader ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermEnd {
    /// Another replica holds the lease, or renewal failed for the renew deadline.
    Lost,
    /// Asked to stop.
    Stopped,
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str, timing: Timing) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            timing,
            observed: tokio::sync::Mutex::new(None),
        }
    }

    fn now_micro() -> MicroTime {
        MicroTime(crate::conditions::time(Utc::now()).0)
    }

    fn my_record(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = Self::now_micro();
        let mine = previous.is_some_and(|p| p.holder_identity.as_deref() == Some(self.identity.as_str()));
        let transitions =
            previous.and_then(|p| p.lease_transitions).unwrap_or(0) + i32::from(previous.is_some() && !mine);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.timing.lease_duration.as_secs().max(1)).unwrap_or(15)),
            acquire_time: if mine { previous.and_then(|p| p.acquire_time.clone()) } else { Some(now.clone()) },
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One attempt to take or renew the lease (client-go's tryAcquireOrRenew); false when another replica
    /// holds it (or won a race). Each request is bounded by `timeout`.
    pub async fn try_acquire_or_renew(&self, timeout: Duration) -> Result<bool, kube::Error> {
        let bounded =
            |what: &'static str| kube::Error::Service(format!("lease {what} timed out after {timeout:?}").into());
        let current =
            tokio::time::timeout(timeout, self.api.get_opt(&self.name)).await.map_err(|_| bounded("get"))??;
        let now = Instant::now();
        let Some(mut lease) = current else {
            let record = self.my_record(None);
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(record.clone()),
            };
            return match tokio::time::timeout(timeout, self.api.create(&PostParams::default(), &lease))
                .await
                .map_err(|_| bounded("create"))?
            {
                Ok(_) => {
                    self.observe(record, now).await;
                    Ok(true)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let record = lease.spec.clone().unwrap_or_default();
        let observed_at = {
            let mut obs = self.observed.lock().await;
            match obs.as_ref() {
                // client-go compares the whole record: any change by the holder restarts the wait.
                Some(o) if o.record == record => o.at,
                _ => {
                    *obs = Some(Observed { record: record.clone(), at: now });
                    now
                }
            }
        };
        if !may_take(&self.identity, &record, observed_at, now) {
            return Ok(false);
        }
        let mine = self.my_record(Some(&record));
        lease.spec = Some(mine.clone());
        match tokio::time::timeout(timeout, self.api.replace(&self.name, &PostParams::default(), &lease))
            .await
            .map_err(|_| bounded("update"))?
        {
            Ok(_) => {
                self.observe(mine, now).await;
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn observe(&self, record: LeaseSpec, at: Instant) {
        *self.observed.lock().await = Some(Observed { record, at });
    }

    /// Waits until this replica leads (true) or `stop` is cancelled (false).
    pub async fn acquire(&self, stop: &CancellationToken) -> bool {
        loop {
            match self.try_acquire_or_renew(self.timing.retry_period.max(Duration::from_secs(1))).await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election: lease unavailable"),
            }
            // client-go waits RetryPeriod with a jitter factor of 1.2.
            let jitter = self.timing.retry_period.mul_f64(rand::random::<f64>() * 0.2);
            tokio::select! {
                _ = tokio::time::sleep(self.timing.retry_period + jitter) => {}
                _ = stop.cancelled() => return false,
            }
        }
    }

    /// Renews while leading. Returns [`TermEnd::Lost`] as soon as the lease cannot be renewed within the renew
    /// deadline or another replica holds it, [`TermEnd::Stopped`] when `stop` is cancelled.
    pub async fn hold(&self, stop: &CancellationToken) -> TermEnd {
        // The acquisition just succeeded; count from (slightly before) now.
        let mut last_sent_ok = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.timing.retry_period) => {}
                _ = stop.cancelled() => return TermEnd::Stopped,
            }
            let deadline = last_sent_ok + self.timing.renew_deadline;
            let sent = Instant::now();
            if sent >= deadline {
                tracing::error!("leader election: no renewal within the renew deadline; stepping down");
                return TermEnd::Lost;
            }
            let attempt = tokio::select! {
                r = self.try_acquire_or_renew(deadline - sent) => r,
                _ = stop.cancelled() => return TermEnd::Stopped,
            };
            match attempt {
                Ok(true) => last_sent_ok = sent,
                Ok(false) => {
                    tracing::error!("leader election: another replica holds the lease; stepping down");
                    return TermEnd::Lost;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: renew failed");
                    if Instant::now() >= deadline {
                        tracing::error!("leader election: no renewal within the renew deadline; stepping down");
                        return TermEnd::Lost;
                    }
                }
            }
        }
    }

    /// Gives the lease up (empty holder, 1 s duration) so a standby takes over at once; best effort.
    pub async fn release(&self) {
        let timeout = self.timing.retry_period.max(Duration::from_secs(1));
        let Ok(Ok(Some(mut lease))) = tokio::time::timeout(timeout, self.api.get_opt(&self.name)).await else {
            return;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        let now = Self::now_micro();
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: spec.lease_transitions,
            ..Default::default()
        });
        match tokio::time::timeout(timeout, self.api.replace(&self.name, &PostParams::default(), &lease)).await {
            Ok(Ok(_)) => tracing::info!("leader election: released the lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election: releasing the lease failed"),
            Err(_) => tracing::warn!("leader election: releasing the lease timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, secs: i32) -> LeaseSpec {
        LeaseSpec { holder_identity: Some(holder.into()), lease_duration_seconds: Some(secs), ..Default::default() }
    }

    #[test]
    fn a_lease_is_taken_only_after_its_record_stood_still_for_its_duration_on_our_clock() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        // another holder, observed changing at t0: valid for 15 s of *our* time, whatever its renewTime says
        assert!(!may_take("b", &held_by("a", 15), t0, t0));
        assert!(!may_take("b", &held_by("a", 15), t0, t0 + 14 * s));
        assert!(may_take("b", &held_by("a", 15), t0, t0 + 15 * s));
        // our own lease, a released lease (empty holder), or no holder at all: take it now
        assert!(may_take("a", &held_by("a", 15), t0, t0));
        assert!(may_take("b", &held_by("", 1), t0, t0));
        assert!(may_take("b", &LeaseSpec::default(), t0, t0));
    }

    #[test]
    fn the_leader_steps_down_before_a_standby_may_take_over() {
        let t = Timing::for_lease(Duration::from_secs(15));
        assert_eq!((t.renew_deadline, t.retry_period), (Duration::from_secs(10), Duration::from_secs(2)));
        assert!(t.renew_deadline + t.retry_period < t.lease_duration);
        let short = Timing::for_lease(Duration::from_secs(3));
        assert!(short.renew_deadline < short.lease_duration && short.retry_period < short.renew_deadline);
    }
}
