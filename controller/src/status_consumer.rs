//! Feeds `NIO_STATUS` events of this cluster into Machine status, in order per machine.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use nio_shared::crd::MachinePhase;
use nio_shared::protocol::{Action, Phase, StatusEvent};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::conditions::Note;
use crate::context::{Ctx, update_machine_status};
use crate::error::Result;
use crate::metrics::EventLabels;
use crate::status::{routine, transition};

/// Creates (or finds) the cluster's durable status consumer.
pub async fn open(js: &jetstream::Context, cluster: &str) -> anyhow::Result<PullConsumer> {
    let name = nio_shared::subjects::status_consumer(cluster);
    let consumer = nio_shared::nats::retrying(&format!("consumer {name}"), || async {
        let stream = js.get_stream(nio_shared::subjects::STATUS_STREAM).await?;
        // created, or brought up to this configuration (an older one gave events up after 10 deliveries)
        Ok(stream.create_consumer(nio_shared::nats::status_consumer(cluster)).await?)
    })
    .await
    .map_err(|e| anyhow::anyhow!("opening the status consumer {name}: {e}"))?;
    Ok(consumer)
}

/// Runs until `stop`. `machines` are the controllers' caches: an event is written from the cached Machine
/// (with its resourceVersion as precondition), so it costs one request unless the cache is behind.
pub async fn run(
    ctx: Arc<Ctx>,
    consumer: PullConsumer,
    machines: Vec<kube::runtime::reflector::Store<nio_shared::crd::Machine>>,
    stop: CancellationToken,
) {
    loop {
        if stop.is_cancelled() {
            return;
        }
        let msgs = match next_events(&consumer).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "pulling status events failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if msgs.is_empty() {
            continue;
        }
        // In order per machine, machines in parallel.
        let mut groups: BTreeMap<(String, String), Vec<(jetstream::Message, StatusEvent)>> = BTreeMap::new();
        for m in msgs {
            if let Some(action) = needless_step(&m, &machines) {
                count(&ctx, Phase::Step, action);
                nio_shared::nats::ack(&m, AckKind::Ack).await;
                continue;
            }
            match StatusEvent::decode(&m.payload) {
                Ok(ev) => groups.entry((ev.namespace.clone(), ev.machine.clone())).or_default().push((m, ev)),
                Err(e) => {
                    tracing::error!(subject = %m.subject, error = %e, "terminating an undecodable status event");
                    nio_shared::nats::ack(&m, AckKind::Term).await;
                }
            }
        }
        let work = groups.into_iter().map(|((ns, name), group)| {
            let ctx = ctx.clone();
            let reference = kube::runtime::reflector::ObjectRef::new(&name).within(&ns);
            let known = machines.iter().find_map(|s| s.get(&reference));
            async move {
                let (msgs, events): (Vec<_>, Vec<_>) = group.into_iter().unzip();
                let last = events.last().map(|ev| (ev.cluster.clone(), ev.phase, ev.action));
                let Some((cluster, phase, action)) = last else { return };
                let span = tracing::info_span!("status.apply", otel.kind = "consumer", nio.cluster = %cluster, nio.phase = ?phase, nio.action = action.as_str(), nio.events = events.len());
                // The latest event's trace is the parent; the earlier ones folded into this write are linked.
                if let Some((last, earlier)) = msgs.split_last() {
                    nio_shared::telemetry::set_parent_from(&span, last.headers.as_ref());
                    for m in earlier {
                        nio_shared::telemetry::link_from(&span, m.headers.as_ref());
                    }
                }
                let ack = match apply(&ctx, &events, known.as_deref()).instrument(span).await {
                    Ok(_) => AckKind::Ack,
                    // The apiserver refused the write as such (400, 422: a status the schema does not take): no
                    // retry can land it, and retrying would hold the machine's later events back for good.
                    Err(e) if refused_for_good(&e) => {
                        tracing::error!(machine = %name, namespace = %ns, error = %e, "the apiserver refuses this status; terminating its events");
                        AckKind::Term
                    }
                    Err(e) => {
                        let delivered = msgs.iter().filter_map(|m| m.info().ok()).map(|i| i.delivered).max();
                        let delay = retry_delay(delivered.unwrap_or(1));
                        tracing::warn!(machine = %name, namespace = %ns, error = %e, retry_in_s = delay.as_secs(), "applying status events failed; will retry");
                        AckKind::Nak(Some(delay))
                    }
                };
                for m in &msgs {
                    nio_shared::nats::ack(m, ack).await;
                }
            }
        });
        futures::future::join_all(work).await;
    }
}

/// A write the apiserver refuses for what it is (bad request, invalid), not for now (down, throttled, forbidden
/// until RBAC is mended, a conflict).
fn refused_for_good(e: &crate::error::Error) -> bool {
    matches!(e, crate::error::Error::Kube(kube::Error::Api(s)) if s.code == 400 || s.code == 422)
}

/// How long an event whose write failed waits before its `delivered`+1st try: 2 s, doubling to 30 s.
fn retry_delay(delivered: i64) -> Duration {
    let doublings = u32::try_from(delivered.saturating_sub(1).clamp(0, 4)).unwrap_or(4);
    Duration::from_secs(2u64 << doublings).min(Duration::from_secs(30))
}

/// Up to [`BATCH`] status events: whatever is waiting now, without waiting for a batch to fill; when none
/// is, blocks up to a second for the first one (so a lone event is applied at once, and a burst in
/// batches).
async fn next_events(consumer: &PullConsumer) -> anyhow::Result<Vec<jetstream::Message>> {
    // A no-wait fetch has no expiry of its own: bound it, keeping whatever arrived (a request lost while
    // NATS restarts must not stall the consumer).
    let waiting = |n: usize| async move {
        let batch = consumer.fetch().max_messages(n).messages().await?;
        let within = tokio::time::sleep(Duration::from_secs(3));
        anyhow::Ok(batch.take_until(within).filter_map(|m| async { m.ok() }).collect::<Vec<_>>().await)
    };
    let mut msgs = waiting(BATCH).await?;
    if msgs.is_empty() {
        let first = consumer.batch().max_messages(1).expires(Duration::from_secs(1)).messages().await?;
        let within = tokio::time::sleep(Duration::from_secs(3));
        msgs = first.take_until(within).filter_map(|m| async { m.ok() }).collect().await;
        if !msgs.is_empty() {
            msgs.extend(waiting(BATCH - 1).await?);
        }
    }
    Ok(msgs)
}

/// A progress step (so its headers say) of a machine the cache shows Applying: it changes nothing (the rule in
/// [`apply`]), so it is acked without decoding its body, taking the Machine's write turn or a span. Returns its
/// action. Half of a rollout's status events are such steps. An event without the headers (an older executor)
/// is decoded and goes the usual way.
fn needless_step(
    m: &jetstream::Message,
    machines: &[kube::runtime::reflector::Store<nio_shared::crd::Machine>],
) -> Option<Action> {
    let action = nio_shared::protocol::progress_step(m.headers.as_ref())?;
    let (_, ns, name) = nio_shared::subjects::parse_status_subject(&m.subject)?;
    let reference = kube::runtime::reflector::ObjectRef::new(&name).within(&ns);
    let cached = machines.iter().find_map(|s| s.get(&reference))?;
    (cached.status.as_ref()?.phase == Some(MachinePhase::Applying)).then_some(action)
}

/// Counts a status event received (`nio_controller_status_events_total`).
fn count(ctx: &Ctx, phase: Phase, action: Action) {
    ctx.metrics
        .status_events
        .get_or_create(&EventLabels { phase: phase.as_str().into(), action: action.as_str().into() })
        .inc();
}

/// Most status events applied in one round.
const BATCH: usize = 256;

/// Applies a machine's events, oldest first, to its Machine (starting from `known`, a recent copy, when there
/// is one) in one write, and records the Events they call for. Events that arrived together cost one request:
/// under load, bursts coalesce instead of queueing one write each.
pub async fn apply(ctx: &Ctx, events: &[StatusEvent], known: Option<&nio_shared::crd::Machine>) -> Result<()> {
    let events: Vec<&StatusEvent> = events.iter().filter(|ev| ev.cluster == ctx.cluster).collect();
    let Some(first) = events.first() else { return Ok(()) };
    for ev in &events {
        count(ctx, ev.phase, ev.action);
    }
    let (ns, name) = (first.namespace.clone(), first.machine.clone());
    let notes: Mutex<Vec<Note>> = Mutex::new(Vec::new());
    let updated = update_machine_status(ctx, &ns, &name, known, |m| {
        let mut status = m.status.clone().unwrap_or_default();
        let mut all = Vec::new();
        let mut changed = false;
        for ev in &events {
            // Progress steps of a machine already marked Applying change nothing worth a write (those whose
            // headers say so were acked before decoding: `needless_step`).
            if ev.phase == Phase::Step && status.phase == Some(MachinePhase::Applying) {
                continue;
            }
            if let Some((s, n)) = transition(&m.spec, &status, ev, m.metadata.generation) {
                status = s;
                all.extend(n);
                changed = true;
            }
        }
        if let Ok(mut kept) = notes.lock() {
            *kept = all;
        }
        changed.then_some(status)
    })
    .await?;
    let Some(machine) = updated else {
        tracing::info!(machine = %name, namespace = %ns, "status event for a Machine that no longer exists");
        return Ok(());
    };
    let notes = notes.into_inner().unwrap_or_default();
    for n in notes.into_iter().filter(|n| ctx.success_events || !routine(n)) {
        ctx.event_on(&machine, n.warning, &n.reason, n.message, "ApplyStatus").await;
    }
    tracing::debug!(machine = %name, events = events.len(), "status applied");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> crate::error::Error {
        let s: kube::core::Status =
            serde_json::from_value(serde_json::json!({"code": code, "status": "Failure"})).expect("a Status");
        crate::error::Error::Kube(kube::Error::Api(Box::new(s)))
    }

    /// An event the apiserver refuses as invalid is terminated (retrying it for good would hold the machine's
    /// later events back); one refused for now (down, throttled, forbidden, a conflict) is retried, with a delay
    /// that grows to 30 s.
    #[test]
    fn invalid_writes_end_and_the_rest_are_retried_with_a_growing_delay() {
        assert!(refused_for_good(&api(422)) && refused_for_good(&api(400)));
        assert!([403, 404, 409, 429, 500, 503].iter().all(|c| !refused_for_good(&api(*c))));
        let delays: Vec<u64> = (1..=7).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 30, 30, 30]);
    }
}
