//! Sites nobody serves. A job waits on its site's queue until an executor that serves the site pulls it; with
//! none, a machine would sit Queued forever and say nothing. Every few seconds the leader asks JetStream, for
//! each site with queued machines, whether the site's consumer has an executor (a pull request waiting, or jobs
//! being worked on); machines of a site without one are marked `Waiting` (phase and condition,
//! `NoExecutorForSite`), and marked Queued again once an executor appears.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use futures::StreamExt;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use nio_shared::crd::{Machine, MachinePhase, MachineStatus};
use tokio_util::sync::CancellationToken;

use crate::conditions::{self, Type};
use crate::context::{Ctx, update_machine_status};

/// How often sites are checked.
const EVERY: Duration = Duration::from_secs(5);

/// Machines marked at once (each write also takes one of the requests slots, `Ctx::requests`).
const MARKS_IN_FLIGHT: usize = 32;

/// Whether an executor serves `site`: its consumer exists and has a pull request waiting or jobs in hand.
pub async fn served(js: &jetstream::Context, site: &str) -> bool {
    let Ok(stream) = js.get_stream(nio_shared::subjects::JOBS_STREAM).await else { return true };
    let name = nio_shared::subjects::site_consumer(site);
    match stream.consumer_info(&name).await {
        Ok(info) => info.num_waiting > 0 || info.num_ack_pending > 0,
        // No consumer: no executor ever served the site. Other errors (NATS restarting) decide nothing.
        Err(e) => match e.kind() {
            ConsumerInfoErrorKind::NotFound => false,
            ConsumerInfoErrorKind::JetStream(j) => j.error_code() != jetstream::ErrorCode::CONSUMER_NOT_FOUND,
            _ => true,
        },
    }
}

/// The status `s` should have when its site is (not) `served`; None when it needs no change.
pub fn mark(s: &MachineStatus, site: &str, served: bool, generation: Option<i64>) -> Option<MachineStatus> {
    let mut s = s.clone();
    match (s.phase, served) {
        (Some(MachinePhase::Queued), false) => {
            s.phase = Some(MachinePhase::Waiting);
            let msg = format!(
                "no executor serves site {site}: the job waits on the queue until one does (an executor whose \
                 config lists site {site})"
            );
            conditions::set(&mut s.conditions, Type::Waiting, true, "NoExecutorForSite", &msg, generation);
        }
        (Some(MachinePhase::Waiting), true) => {
            s.phase = Some(MachinePhase::Queued);
            conditions::set(&mut s.conditions, Type::Waiting, false, "ExecutorAvailable", "", generation);
        }
        _ => return None,
    }
    Some(s)
}

/// Checks the sites of queued and waiting machines until `stop`.
pub async fn run(ctx: Arc<Ctx>, js: jetstream::Context, stores: Vec<Store<Machine>>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.cancelled() => return,
        }
        let machines: Vec<Arc<Machine>> = stores
            .iter()
            .flat_map(|s| s.state())
            .filter(|m| {
                matches!(m.status.as_ref().and_then(|s| s.phase), Some(MachinePhase::Queued | MachinePhase::Waiting))
            })
            .collect();
        let sites: BTreeSet<&str> = machines.iter().map(|m| m.spec.site.as_str()).collect();
        let mut verdict = BTreeMap::new();
        for site in sites {
            verdict.insert(site.to_string(), served(&js, site).await);
        }
        // Marked concurrently (a site gone quiet turns all its machines at once): one at a time, 10,000 machines
        // took a minute of writes, and their configurations rewrote their status all that time.
        let todo: Vec<(Arc<Machine>, bool)> = machines
            .iter()
            .filter_map(|m| {
                let served = verdict.get(m.spec.site.as_str()).copied().unwrap_or(true);
                mark(&m.status.clone().unwrap_or_default(), &m.spec.site, served, m.metadata.generation)?;
                Some((m.clone(), served))
            })
            .collect();
        let ctx = &ctx;
        let marks = todo.into_iter().map(|(m, served)| async move {
            let (ns, name, site) = (m.namespace().unwrap_or_default(), m.name_any(), m.spec.site.clone());
            let r = update_machine_status(ctx, &ns, &name, Some(&m), |m| {
                mark(&m.status.clone().unwrap_or_default(), &site, served, m.metadata.generation)
            })
            .await;
            if let Err(e) = r {
                tracing::warn!(machine = %name, error = %e, "marking a machine waiting for its site failed");
            }
        });
        futures::stream::iter(marks).buffer_unordered(MARKS_IN_FLIGHT).collect::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_machines_of_unserved_sites_wait_and_come_back_when_served() {
        let queued = MachineStatus { phase: Some(MachinePhase::Queued), ..Default::default() };
        let w = mark(&queued, "dc9", false, Some(1)).unwrap();
        assert_eq!(w.phase, Some(MachinePhase::Waiting));
        let c = w.conditions.iter().find(|c| c.type_ == "Waiting").unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "NoExecutorForSite"));
        assert!(c.message.contains("site dc9"), "{}", c.message);
        assert_eq!(mark(&w, "dc9", false, Some(1)), None, "already waiting: no write");
        let back = mark(&w, "dc9", true, Some(1)).unwrap();
        assert_eq!(back.phase, Some(MachinePhase::Queued));
        assert_eq!(mark(&queued, "dc9", true, Some(1)), None, "served and queued: nothing to say");
        for other in [MachinePhase::Applying, MachinePhase::Applied, MachinePhase::Failed, MachinePhase::Pending] {
            let s = MachineStatus { phase: Some(other), ..Default::default() };
            assert_eq!(mark(&s, "dc9", false, Some(1)), None, "{other:?} is not waiting on a queue");
        }
    }
}
