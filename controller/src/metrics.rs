//! Controller metrics (docs/design.md §7). Labels are bounded: kind, site, outcome, category, phase.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// A webhook delivery: who sent it and what became of it (refreshed, no_match, ignored, duplicate,
/// unauthorized, bad_request, too_large, rate_limited, error).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub provider: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
    pub category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishLabels {
    pub site: String,
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

/// Rollout state of one configuration (configurations are few; machines are never a label).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    pub namespace: String,
    pub configuration: String,
    /// total, updated, failed, in_progress
    pub state: String,
}

/// A wave of a configuration's rollout; `state` is a count (total, updated, failed, in_progress) for
/// `wave_machines`, a wave state (Pending, Progressing, Soaking, Paused, Succeeded, Failed) for `wave_state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WaveLabels {
    pub namespace: String,
    pub configuration: String,
    pub wave: String,
    pub state: String,
}

/// Why configurations are Degraded (the condition's reason: GitUnreachable, GitAuthFailed, GitServerUntrusted,
/// UnknownRef, SecretUnavailable, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub phase: String,
    pub action: String,
}

fn buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

pub struct Metrics {
    pub registry: Registry,
    pub reconcile_duration: Family<KindLabel, Histogram, fn() -> Histogram>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub jobs_published: Family<PublishLabels, Counter>,
    /// Jobs published again that the queue dropped: the same id as one it holds (within its duplicate window).
    pub jobs_duplicate: Family<PublishLabels, Counter>,
    pub status_events: Family<EventLabels, Counter>,
    pub machines: Family<PhaseLabel, Gauge>,
    pub machines_drifted: Gauge,
    pub configuration_machines: Family<ConfigLabels, Gauge>,
    pub wave_machines: Family<WaveLabels, Gauge>,
    pub wave_state: Family<WaveLabels, Gauge>,
    pub configurations_degraded: Family<ReasonLabel, Gauge>,
    pub leader: Gauge,
    pub watch_errors: Family<KindLabel, Counter>,
    pub undecodable: Family<KindLabel, Counter>,
    pub webhook_deliveries: Family<DeliveryLabels, Counter>,
    /// Machine status writes by result: `written`, or `conflict` (refused for a stale resourceVersion; read
    /// again and retried).
    pub machine_status_writes: Family<ResultLabel, Counter>,
    /// The controller's Kubernetes API requests (see [`crate::apirequests`]).
    pub api_requests: Family<crate::apirequests::RequestLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

impl Metrics {
    /// Metrics of the controller of `cluster` (a constant label on every series).
    pub fn new(cluster: &str) -> Self {
        let labels = [(std::borrow::Cow::Borrowed("cluster"), std::borrow::Cow::Owned(cluster.to_string()))];
        let mut registry = Registry::with_prefix_and_labels("nio_controller", labels.into_iter());
        let reconcile_duration = Family::<KindLabel, Histogram, fn() -> Histogram>::new_with_constructor(buckets);
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let jobs_published = Family::<PublishLabels, Counter>::default();
        let jobs_duplicate = Family::<PublishLabels, Counter>::default();
        let status_events = Family::<EventLabels, Counter>::default();
        let machines = Family::<PhaseLabel, Gauge>::default();
        let leader = Gauge::default();
        let watch_errors = Family::<KindLabel, Counter>::default();
        let undecodable = Family::<KindLabel, Counter>::default();
        let webhook_deliveries = Family::<DeliveryLabels, Counter>::default();
        let machine_status_writes = Family::<ResultLabel, Counter>::default();
        let api_requests = Family::<crate::apirequests::RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Kubernetes API requests the controller made, by verb, resource and response code",
            api_requests.clone(),
        );
        let machines_drifted = Gauge::default();
        let configuration_machines = Family::<ConfigLabels, Gauge>::default();
        let wave_machines = Family::<WaveLabels, Gauge>::default();
        let wave_state = Family::<WaveLabels, Gauge>::default();
        let configurations_degraded = Family::<ReasonLabel, Gauge>::default();
        registry.register_with_unit(
            "reconcile_duration",
            "Time to reconcile one object",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        registry.register("reconcile_errors", "Reconciles that failed, by kind and category", reconcile_errors.clone());
        registry.register(
            "jobs_published",
            "Jobs published and taken by the queue, by site and action",
            jobs_published.clone(),
        );
        registry.register(
            "jobs_duplicate",
            "Jobs published again and dropped by the queue as duplicates of one it holds, by site and action",
            jobs_duplicate.clone(),
        );
        registry.register(
            "status_events",
            "Executor status events applied, by phase and action",
            status_events.clone(),
        );
        registry.register("machines", "Machines by phase", machines.clone());
        registry.register(
            "machines_drifted",
            "Machines running a system other than the one NIO applied",
            machines_drifted.clone(),
        );
        registry.register(
            "configuration_machines",
            "Machines of each configuration by rollout state (total, updated, failed, in_progress)",
            configuration_machines.clone(),
        );
        registry.register(
            "wave_machines",
            "Machines of each wave of each configuration's rollout by count (total, updated, failed, in_progress)",
            wave_machines.clone(),
        );
        registry.register(
            "wave_state",
            "1 for the state each wave of each configuration's rollout is in (Pending, Progressing, Soaking, Paused, Succeeded, Failed)",
            wave_state.clone(),
        );
        registry.register(
            "configurations_degraded",
            "Configurations whose Degraded condition is true, by reason",
            configurations_degraded.clone(),
        );
        registry.register("leader", "1 while this replica is the leader", leader.clone());
        registry.register(
            "watch_errors",
            "Failed list/watch calls by kind (e.g. an object that does not decode); /readyz is 503 meanwhile",
            watch_errors.clone(),
        );
        registry.register(
            "undecodable_objects",
            "Watch events carrying an object that does not decode (skipped; the object has a Warning Event)",
            undecodable.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Git push webhook deliveries, by provider and outcome",
            webhook_deliveries.clone(),
        );
        registry.register(
            "machine_status_writes",
            "Machine status writes, by result: written, or conflict (refused as stale, read again and retried)",
            machine_status_writes.clone(),
        );
        for result in ["written", "conflict"] {
            let _ = machine_status_writes.get_or_create(&ResultLabel { result: result.into() }).get();
        }
        for kind in ["NixosConfiguration", "Machine"] {
            let _ = watch_errors.get_or_create(&KindLabel { kind: kind.into() }).get();
            let _ = undecodable.get_or_create(&KindLabel { kind: kind.into() }).get();
        }
        Metrics {
            registry,
            reconcile_duration,
            reconcile_errors,
            machine_status_writes,
            api_requests,
            jobs_published,
            jobs_duplicate,
            status_events,
            machines,
            machines_drifted,
            configuration_machines,
            wave_machines,
            wave_state,
            configurations_degraded,
            leader,
            watch_errors,
            undecodable,
            webhook_deliveries,
        }
    }

    /// Drops what only the leader knows (the fleet gauges), when this replica stops leading: a standby that kept
    /// its last values would be summed with the new leader's by every dashboard and alert (each machine twice).
    pub fn forget_fleet(&self) {
        self.machines.clear();
        self.machines_drifted.set(0);
        self.configuration_machines.clear();
        self.wave_machines.clear();
        self.wave_state.clear();
        self.configurations_degraded.clear();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
