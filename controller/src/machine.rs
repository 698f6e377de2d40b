//! Machine reconcile: validation, and probe/scan scheduling that keeps `discoverable`, `currentSystem`,
//! drift and hardware facts fresh.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::controller::Action;
use nio_shared::crd::{Machine, MachinePhase};
use nio_shared::protocol::Action as JobAction;
use rand::RngExt;
use tracing::Instrument;

use crate::conditions::{self, Type};
use crate::context::{Ctx, update_machine_status};
use crate::error::{Error, Result};
use crate::metrics::{ErrorLabels, KindLabel};

/// The probe interval with ±10 % jitter, so a fleet's probes spread out.
fn jittered(base: Duration) -> Duration {
    let f: f64 = rand::rng().random_range(0.9..1.1);
    base.mul_f64(f)
}

pub async fn reconcile(m: Arc<Machine>, ctx: Arc<Ctx>) -> Result<Action> {
    let start = Instant::now();
    let span = tracing::info_span!("reconcile", otel.kind = "internal", nio.kind = "Machine", k8s.resource.name = %m.name_any(), nio.cluster = %ctx.cluster);
    let r = run(&m, &ctx).instrument(span).await;
    ctx.metrics
        .reconcile_duration
        .get_or_create(&KindLabel { kind: "Machine".into() })
        .observe(start.elapsed().as_secs_f64());
    r
}

async fn run(m: &Machine, ctx: &Ctx) -> Result<Action> {
    let ns = m.namespace().unwrap_or_default();
    let name = m.name_any();
    let generation = m.metadata.generation;
    if let Err(invalid) = nio_shared::validate::machine_spec(&m.spec) {
        let msg = invalid.to_string();
        let known =
            m.status.as_ref().and_then(|s| conditions::message(&s.conditions, Type::Invalid).map(str::to_string));
        if known.as_deref() != Some(msg.as_str()) {
            ctx.event(m, true, "InvalidSpec", msg.clone(), "Validate").await;
            update_machine_status(ctx, &ns, &name, Some(m), |m| {
                let mut s = m.status.clone().unwrap_or_default();
                conditions::set(&mut s.conditions, Type::Invalid, true, "InvalidSpec", &msg, generation);
                s.observed_generation = generation;
                Some(s)
            })
            .await?;
        }
        return Ok(Action::await_change());
    }
    let status = m.status.clone().unwrap_or_default();
    let was_invalid = conditions::is_true(&status.conditions, Type::Invalid);
    let interval = jittered(ctx.probe_interval);
    let since = status
        .last_probe_time
        .as_ref()
        .map(|t| (chrono::Utc::now() - conditions::chrono_of(&t.0)).to_std().unwrap_or_default());
    let busy = matches!(status.phase, Some(MachinePhase::Queued | MachinePhase::Waiting | MachinePhase::Applying));
    let probe = since.is_none_or(|s| s >= interval) && !busy;
    if probe {
        let action = if status.hardware_facts.is_none() { JobAction::Scan } else { JobAction::Probe };
        let job = crate::publish::probe_job(&ctx.cluster, m, action);
        ctx.publisher.publish(&job).await?;
    }
    // One write records the probe, a spec that became valid, and the generation now observed (a new Machine's
    // first write is its first probe's).
    if probe || was_invalid || status.observed_generation != generation {
        update_machine_status(ctx, &ns, &name, Some(m), |m| {
            let mut s = m.status.clone().unwrap_or_default();
            if was_invalid {
                conditions::set(&mut s.conditions, Type::Invalid, false, "Valid", "", generation);
            }
            if probe {
                s.last_probe_time = Some(conditions::time(chrono::Utc::now()));
            }
            s.observed_generation = generation;
            Some(s)
        })
        .await?;
    }
    if probe {
        return Ok(Action::requeue(interval));
    }
    Ok(Action::requeue(since.map_or(interval, |s| interval.saturating_sub(s).max(Duration::from_secs(1)))))
}

pub fn error_policy(m: Arc<Machine>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels { kind: "Machine".into(), category: err.category().into() })
        .inc();
    tracing::warn!(machine = %m.name_any(), error = %err, "machine reconcile failed");
    Action::requeue(Duration::from_secs(10))
}
