//! Executor metrics (docs/design.md §7). Labels are bounded: site, outcome, category — never machine names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabel {
    pub site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub site: String,
    pub action: String,
    /// succeeded, failed, skipped, rolled_back, retried, superseded (a newer job for the machine was queued)
    pub outcome: String,
    /// Failure category, or "none".
    pub category: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn job_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 16))
}
fn fast_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every executor metric, registered once.
pub struct Metrics {
    pub registry: Registry,
    pub jobs: Family<OutcomeLabels, Counter>,
    pub job_duration: HistFamily<SiteLabel>,
    pub queue_wait: HistFamily<SiteLabel>,
    pub in_flight: Family<SiteLabel, Gauge>,
    pub queue_pending: Family<SiteLabel, Gauge>,
    pub site_limit: Family<SiteLabel, Gauge>,
    pub ratelimit_waits: Family<SiteLabel, Counter>,
    pub ratelimit_wait: HistFamily<SiteLabel>,
    pub ssh_connect: HistFamily<SiteLabel>,
    pub ssh_reused: Family<SiteLabel, Counter>,
    pub ssh_idle: Gauge,
    pub lock_waits: Family<SiteLabel, Counter>,
    pub malformed: Counter,
    pub status_publish_errors: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nio_executor");
        let m = Metrics {
            jobs: Family::default(),
            job_duration: Family::new_with_constructor(job_buckets),
            queue_wait: Family::new_with_constructor(job_buckets),
            in_flight: Family::default(),
            queue_pending: Family::default(),
            site_limit: Family::default(),
            ratelimit_waits: Family::default(),
            ratelimit_wait: Family::new_with_constructor(fast_buckets),
            ssh_connect: Family::new_with_constructor(fast_buckets),
            ssh_reused: Family::default(),
            ssh_idle: Gauge::default(),
            lock_waits: Family::default(),
            malformed: Counter::default(),
            status_publish_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("jobs", "Jobs finished, by site, action, outcome and failure category", m.jobs.clone());
        registry.register_with_unit(
            "job_duration",
            "Time from pulling a job to its final status",
            Unit::Seconds,
            m.job_duration.clone(),
        );
        registry.register_with_unit(
            "queue_wait",
            "Time a job waited in the queue (enqueue to start)",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        registry.register("in_flight", "Jobs this executor is working on", m.in_flight.clone());
        registry.register("queue_pending", "Jobs waiting in NIO_JOBS for the site", m.queue_pending.clone());
        registry.register(
            "site_limit",
            "Configured maxInFlight per site (broker-enforced across executors)",
            m.site_limit.clone(),
        );
        registry.register(
            "ratelimit_waits",
            "New SSH sessions that had to wait for the site's connect rate",
            m.ratelimit_waits.clone(),
        );
        registry.register_with_unit(
            "ratelimit_wait",
            "Time spent waiting for the site's connect rate",
            Unit::Seconds,
            m.ratelimit_wait.clone(),
        );
        registry.register_with_unit(
            "ssh_connect",
            "SSH connect, host-key check and authentication time",
            Unit::Seconds,
            m.ssh_connect.clone(),
        );
        registry.register(
            "ssh_reused",
            "Jobs that started on a connection kept from the machine's previous job (no new login)",
            m.ssh_reused.clone(),
        );
        registry.register("ssh_idle", "SSH connections kept idle for the machines' next jobs", m.ssh_idle.clone());
        registry.register("lock_waits", "Jobs that found their machine locked by another job", m.lock_waits.clone());
        registry.register("malformed_jobs", "Job messages that could not be decoded (terminated)", m.malformed.clone());
        registry.register(
            "status_publish_errors",
            "Status events that could not be published",
            m.status_publish_errors.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Creates every per-site series at zero, so dashboards and alerts see them before the first event.
    pub fn init_site(&self, s: &str) {
        let l = site(s);
        let _ = self.in_flight.get_or_create(&l);
        let _ = self.queue_pending.get_or_create(&l);
        let _ = self.ratelimit_waits.get_or_create(&l);
        let _ = self.lock_waits.get_or_create(&l);
        let _ = self.job_duration.get_or_create(&l);
        let _ = self.queue_wait.get_or_create(&l);
        let _ = self.ratelimit_wait.get_or_create(&l);
        let _ = self.ssh_connect.get_or_create(&l);
        let _ = self.ssh_reused.get_or_create(&l);
    }

    /// Text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub fn site(s: &str) -> SiteLabel {
    SiteLabel { site: s.to_string() }
}
