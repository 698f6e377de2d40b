//! NixosConfiguration reconcile: validate → resolve the ref → read secrets → plan → publish → status.
//! Deletion applies `onRemoveFlake` before the finalizer is released.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use nio_shared::crd::{
    APPROVE_ANNOTATION, DriftPolicy, FINALIZER, FileValueType, Machine, MachinePhase, MachineStatus,
    NixosConfiguration, NixosConfigurationStatus, OnFailure, RESUME_ANNOTATION, WaveState, WaveStatus, short_commit,
};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::conditions;
use crate::config_status;
use crate::context::{Ctx, latest_status, set_status, update_machine_status};
use crate::error::{Error, Result};
use crate::metrics::{ConfigLabels, ErrorLabels, KindLabel, WaveLabels};
use crate::publish::{self, Desired};
use crate::rollout::{self, MachineView, Policy};
use crate::waves;
use nio_shared::gitauth::GitAuth;

/// Jobs published at once by one reconcile (each waits for JetStream's ack; the client allows 5,000 in flight).
/// At 32 a rollout of 1,000 machines took 0.3–0.9 s to put its jobs on the queue on a loaded machine.
const PUBLISH_CONCURRENCY: usize = 256;

/// Machines marked Queued at once by one reconcile (API requests, which also share [`Ctx::requests`]).
const MARK_CONCURRENCY: usize = 32;

/// Whether `cfg` targets machine `m` (same namespace; by name or labels). `m` must carry its labels: a watch
/// event or a LIST item, not a cached Machine (the cache keeps labels in its index; see `targeted_machines`).
pub fn targets(cfg: &NixosConfiguration, m: &Machine) -> bool {
    if cfg.namespace() != m.namespace() {
        return false;
    }
    if let Some(name) = &cfg.spec.machine_ref {
        return m.metadata.name.as_ref() == Some(name);
    }
    let Some(sel) = &cfg.spec.machine_selector else { return false };
    let empty = std::collections::BTreeMap::new();
    crate::waves::selector_matches(sel, m.metadata.labels.as_ref().unwrap_or(&empty))
}

/// Whether `cfg` targets the machine `name` of its namespace that carries `labels`.
fn targets_labelled(cfg: &NixosConfiguration, name: &str, labels: &BTreeMap<String, String>) -> bool {
    match (&cfg.spec.machine_ref, &cfg.spec.machine_selector) {
        (Some(r), _) => r == name,
        (None, Some(sel)) => crate::waves::selector_matches(sel, labels),
        (None, None) => false,
    }
}

/// Which of `cfg`'s `machines` (with their `labels`) another configuration manages, with its name. A Machine
/// runs one configuration: the one it last ran or was queued for (`status.appliedConfiguration`) keeps it while
/// that configuration still targets it, or is being deleted (its `onRemoveFlake` and release come first);
/// otherwise the oldest configuration that targets it (creation time, then name) takes it. Every configuration
/// reaches the same answer from the same cache, so two whose selectors overlap never take turns on a machine.
pub fn managed_elsewhere(
    cfg: &NixosConfiguration,
    peers: &[Arc<NixosConfiguration>],
    machines: &[Arc<Machine>],
    labels: &[(String, BTreeMap<String, String>)],
) -> BTreeMap<String, String> {
    let name_of = |c: &NixosConfiguration| c.metadata.name.clone().unwrap_or_default();
    let me = cfg.metadata.name.as_deref().unwrap_or_default();
    let by_name: std::collections::HashMap<&str, &NixosConfiguration> = peers
        .iter()
        .filter(|p| p.metadata.namespace == cfg.metadata.namespace)
        .filter_map(|p| Some((p.metadata.name.as_deref()?, &**p)))
        .filter(|(n, _)| *n != me)
        .collect();
    fn age(c: &NixosConfiguration) -> (i128, &str) {
        let created = c.metadata.creation_timestamp.as_ref().map_or(i128::MAX, |t| t.0.as_nanosecond());
        (created, c.metadata.name.as_deref().unwrap_or_default())
    }
    // Those that would take a machine no configuration keeps before this one, oldest first.
    let mut older: Vec<&NixosConfiguration> =
        by_name.values().copied().filter(|p| p.metadata.deletion_timestamp.is_none() && age(p) < age(cfg)).collect();
    older.sort_by(|a, b| age(a).cmp(&age(b)));
    let mut elsewhere = BTreeMap::new();
    for (m, (name, labels)) in machines.iter().zip(labels) {
        let last = m.status.as_ref().and_then(|s| s.applied_configuration.as_deref());
        if last == Some(me) {
            continue;
        }
        let keeps = last
            .and_then(|l| by_name.get(l))
            .filter(|p| p.metadata.deletion_timestamp.is_some() || targets_labelled(p, name, labels));
        if let Some(p) = keeps.copied().or_else(|| older.iter().copied().find(|p| targets_labelled(p, name, labels))) {
            elsewhere.insert(name.clone(), name_of(p));
        }
    }
    elsewhere
}

/// Whether `peer` may manage a machine `cfg` targets: being deleted (it keeps its machines until released), or
/// selecting machines `cfg` may select too.
fn rival(cfg: &NixosConfiguration, peer: &NixosConfiguration) -> bool {
    if peer.metadata.deletion_timestamp.is_some() {
        return true;
    }
    match ((&cfg.spec.machine_ref, &cfg.spec.machine_selector), (&peer.spec.machine_ref, &peer.spec.machine_selector)) {
        ((Some(a), _), (Some(b), _)) => a == b,
        ((None, Some(a)), (None, Some(b))) => !crate::waves::selectors_disjoint(a, b),
        ((None, None), _) | (_, (None, None)) => false,
        _ => true,
    }
}

/// The machines `cfg` targets, from the Machine cache (its selector matched as `targets` matches it, on the
/// labels the cache's index holds). Waits for the
/// cache's first LIST at the start of a term, so a reconcile never sees a fleet of none.
async fn targeted_machines(ctx: &Ctx, cfg: &NixosConfiguration) -> Result<Vec<Arc<Machine>>> {
    let ns = cfg.namespace().unwrap_or_default();
    let cache = ctx.machine_cache(&ns).ok_or(Error::CacheNotReady("no Machine watch covers this namespace"))?;
    if tokio::time::timeout(CACHE_WAIT, cache.ready()).await.is_err() {
        return Err(Error::CacheNotReady("the Machine cache has not finished its first list"));
    }
    if let Some(name) = &cfg.spec.machine_ref {
        let mut machines: Vec<Arc<Machine>> = cache.get(&ns, name).into_iter().collect();
        ctx.machine_writes.overlay(&ns, &mut machines);
        return Ok(machines);
    }
    let Some(sel) = &cfg.spec.machine_selector else { return Ok(vec![]) };
    let mut machines = cache.select(&ns, sel);
    ctx.machine_writes.overlay(&ns, &mut machines);
    Ok(machines)
}

/// Each of `cfg`'s `machines` (from the cache, whose Machines carry no labels) with its labels.
fn labelled(ctx: &Ctx, cfg: &NixosConfiguration, machines: &[Arc<Machine>]) -> Vec<(String, BTreeMap<String, String>)> {
    let ns = cfg.namespace().unwrap_or_default();
    match ctx.machine_cache(&ns) {
        Some(cache) => cache.labelled(&ns, machines),
        None => machines.iter().map(|m| (m.name_any(), BTreeMap::new())).collect(),
    }
}

/// How long a reconcile waits for the Machine cache at the start of a term before it retries.
const CACHE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A Secret of the configuration's namespace that opted in to being read by NIO: from the watch of opted-in
/// Secrets (no request); otherwise its metadata is read first, and the whole Secret only once that shows the
/// label. A Secret that did not opt in is never read.
async fn secret(ctx: &Ctx, ns: &str, name: &str) -> Result<Arc<Secret>> {
    if let Some(Some(s)) = ctx.secret_cache(ns).and_then(|c| c.get(ns, name)) {
        return Ok(s);
    }
    // Not opted in, not there, just labelled (the watch is a moment behind), or the watch cannot list.
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let not_found = || Error::Secret { namespace: ns.into(), name: name.into(), problem: "not found".into() };
    let refused = || Error::SecretNotPermitted { namespace: ns.into(), name: name.into() };
    let meta = {
        let _slot = ctx.request_slot().await;
        api.get_metadata_opt(name).await?
    };
    if !opted_in(&meta.ok_or_else(not_found)?.metadata) {
        return Err(refused());
    }
    let s = {
        let _slot = ctx.request_slot().await;
        api.get_opt(name).await?
    };
    let s = s.ok_or_else(not_found)?;
    if !opted_in(&s.metadata) {
        return Err(refused());
    }
    Ok(Arc::new(s))
}

fn opted_in(meta: &kube::api::ObjectMeta) -> bool {
    meta.labels.as_ref().and_then(|l| l.get(nio_shared::crd::SECRET_OPT_IN_LABEL)).map(String::as_str)
        == Some(nio_shared::crd::SECRET_OPT_IN_VALUE)
}

fn secret_value(s: &Secret, key: &str) -> Option<Vec<u8>> {
    s.data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone())
}

async fn git_creds(ctx: &Ctx, cfg: &NixosConfiguration) -> Result<GitAuth> {
    let Some(name) = &cfg.spec.credentials_ref else { return Ok(GitAuth::default()) };
    let s = secret(ctx, &cfg.namespace().unwrap_or_default(), name).await?;
    Ok(GitAuth::from_entries(|k| secret_value(&s, k)))
}

/// The Secrets a configuration reads (credentialsRef and SecretRef files).
pub fn secrets_read(cfg: &NixosConfiguration) -> impl Iterator<Item = &str> {
    cfg.spec.credentials_ref.as_deref().into_iter().chain(
        cfg.spec
            .additional_files
            .iter()
            .filter(|f| f.value_type == FileValueType::SecretRef)
            .filter_map(|f| f.secret_ref.as_ref().map(|r| r.name.as_str())),
    )
}

/// Reads every SecretRef file and hashes the contents (the hash, never the content, tracks changes).
async fn desired(ctx: &Ctx, cfg: &NixosConfiguration, commit: String) -> Result<Desired> {
    let ns = cfg.namespace().unwrap_or_default();
    // Secret files travel sealed: without a key there is nothing to deliver them with, so nothing is read.
    if ctx.seal.is_none() && cfg.spec.additional_files.iter().any(|f| f.value_type == FileValueType::SecretRef) {
        return Err(Error::NoSealKey { namespace: ns, configuration: cfg.name_any() });
    }
    let mut secrets = Vec::new();
    let mut h = Sha256::new();
    for f in cfg.spec.additional_files.iter().filter(|f| f.value_type == FileValueType::SecretRef) {
        let Some(r) = &f.secret_ref else { continue };
        let s = secret(ctx, &ns, &r.name).await?;
        let value = secret_value(&s, &r.key).ok_or_else(|| Error::Secret {
            namespace: ns.clone(),
            name: r.name.clone(),
            problem: format!("has no key {:?}", r.key),
        })?;
        h.update(f.path.as_bytes());
        h.update([0]);
        h.update(&value);
        h.update([0]);
        // Who may read it is part of what is delivered: a change applies again.
        for part in [&f.owner, &f.group, &f.mode] {
            h.update(part.as_deref().unwrap_or("").as_bytes());
            h.update([0]);
        }
        secrets.push((f.path.clone(), value));
    }
    let secrets_hash =
        (!secrets.is_empty()).then(|| h.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>());
    let spec = crate::publish::deployed_spec(&cfg.spec);
    Ok(Desired { commit, generation: cfg.metadata.generation.unwrap_or(0), spec, secrets, secrets_hash })
}

/// Marks a machine Queued for `job` (of rollout target `target`), unless an executor already reported this
/// target's outcome: a fast executor can finish before the controller's write lands, and marking the machine
/// Queued then would hide its result for good.
pub fn mark_queued(
    s: &mut MachineStatus,
    target: &str,
    job_id: &nio_shared::protocol::JobId,
    action: nio_shared::protocol::Action,
) {
    // The executor's first event can land before this mark: a machine already applying this job stays so.
    let started =
        s.last_job_id.as_deref() == Some(job_id.to_string().as_str()) && s.phase == Some(MachinePhase::Applying);
    s.last_job_id = Some(job_id.to_string());
    let reported = s.applied_target.as_deref() == Some(target)
        || s.failed_target.as_deref() == Some(target)
        || (action == nio_shared::protocol::Action::Remove && s.has_configuration == Some(false));
    if !reported {
        if !started {
            s.phase = Some(MachinePhase::Queued);
        }
        s.queued_target = Some(target.to_string());
    }
}

/// The refresh annotation's value ("" when absent).
fn refresh_token(cfg: &NixosConfiguration) -> &str {
    cfg.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(nio_shared::crd::REFRESH_ANNOTATION))
        .map_or("", String::as_str)
}

/// Links the current reconcile span to the trace of the webhook delivery that asked for this refresh.
fn link_to_refresh_request(cfg: &NixosConfiguration) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let Some(tp) = cfg.metadata.annotations.as_ref().and_then(|a| a.get(nio_shared::crd::REFRESH_TRACE_ANNOTATION))
    else {
        return;
    };
    let mut carrier = async_nats::HeaderMap::new();
    carrier.insert("traceparent", tp.as_str());
    let remote = nio_shared::telemetry::extract(&carrier);
    let sc = remote.span().span_context().clone();
    if sc.is_valid() {
        tracing::Span::current().add_link(sc);
    }
}

fn poll_interval(cfg: &NixosConfiguration, default: Duration) -> Duration {
    cfg.spec
        .poll_interval
        .as_deref()
        .and_then(|p| nio_shared::validate::duration("spec.pollInterval", p).ok())
        .unwrap_or(default)
}

/// Entry point from the kube-runtime Controller.
pub async fn reconcile(cfg: Arc<NixosConfiguration>, ctx: Arc<Ctx>) -> Result<Action> {
    let start = Instant::now();
    let span = tracing::info_span!(
        "reconcile",
        otel.kind = "internal",
        k8s.resource.name = %cfg.name_any(),
        k8s.namespace.name = %cfg.namespace().unwrap_or_default(),
        nio.cluster = %ctx.cluster,
        nio.kind = "NixosConfiguration",
    );
    let ns = cfg.namespace().unwrap_or_default();
    let ns_name = format!("{ns}/{}", cfg.name_any());
    let api: Api<NixosConfiguration> = Api::namespaced(ctx.client.clone(), &ns);
    let c2 = ctx.clone();
    let result = finalizer(&api, FINALIZER, cfg, |event| async move {
        match event {
            Finalizer::Apply(c) => apply(&c, &c2).await,
            Finalizer::Cleanup(c) => cleanup(&c, &c2).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        // The JSON patch's `test` of the finalizer list failed (422): a reconcile ran from a copy the watch had
        // not yet brought up to date (typically the one right after the finalizer was added).
        kube::runtime::finalizer::Error::AddFinalizer(kube::Error::Api(s))
        | kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s))
            if s.code == 422 =>
        {
            Error::StaleCache
        }
        other => Error::Finalizer(Box::new(other)),
    });
    let took = start.elapsed();
    ctx.metrics
        .reconcile_duration
        .get_or_create(&KindLabel { kind: "NixosConfiguration".into() })
        .observe(took.as_secs_f64());
    // A reconcile holds its configuration's turn: one this slow delays the next push to it.
    if took > SLOW_RECONCILE {
        tracing::warn!(configuration = %ns_name, took_ms = took.as_millis() as u64, ok = result.is_ok(), "slow reconcile");
    } else {
        tracing::debug!(configuration = %ns_name, took_ms = took.as_millis() as u64, ok = result.is_ok(), "reconciled");
    }
    result
}

/// A configuration reconcile slower than this is logged at warn.
const SLOW_RECONCILE: Duration = Duration::from_secs(10);

/// Requeue policy for failed reconciles.
pub fn error_policy(cfg: Arc<NixosConfiguration>, err: &Error, ctx: Arc<Ctx>) -> Action {
    // Not a failure: the watch's newer copy triggers the next reconcile (the requeue only bounds the wait).
    if matches!(err, Error::StaleCache) {
        tracing::debug!(configuration = %cfg.name_any(), "{err}");
        return Action::requeue(Duration::from_secs(1));
    }
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels { kind: "NixosConfiguration".into(), category: err.category().into() })
        .inc();
    if matches!(err, Error::RemovalPending(_)) {
        tracing::info!(configuration = %cfg.name_any(), "{err}");
    } else {
        tracing::warn!(configuration = %cfg.name_any(), error = %err, "reconcile failed");
    }
    Action::requeue(Duration::from_secs(5))
}

/// The machines' waves and what they allow now, after measuring the analyses that are due.
async fn wave_decision(
    ctx: &Ctx,
    cfg: &NixosConfiguration,
    previous: &NixosConfigurationStatus,
    target: &str,
    machines: &[Arc<Machine>],
    views: &[rollout::MachineView],
    policy: &rollout::Policy,
) -> (Vec<waves::Wave>, waves::Decision) {
    let recorded: &[WaveStatus] = if previous.waves_target.as_deref() == Some(target) { &previous.waves } else { &[] };
    // Without waves the layout is one wave of every machine: labels are not needed.
    let layout = if cfg.spec.rollout.waves.is_empty() {
        waves::layout(&[], &machines.iter().map(|m| (m.name_any(), BTreeMap::new())).collect::<Vec<_>>())
    } else {
        waves::layout(&cfg.spec.rollout.waves, &labelled(ctx, cfg, machines))
    };
    let now = chrono::Utc::now();
    let recorded = crate::analysis::measure_due(&ctx.prometheus, &layout, recorded, now).await;
    let short = short_commit(target.split('/').next().unwrap_or_default());
    let facts = waves::Facts {
        target,
        machines: views,
        recorded: &recorded,
        now,
        approved: annotation(cfg, APPROVE_ANNOTATION).and_then(|a| a.strip_suffix(&format!("@{short}"))),
        resume: resume_request(cfg, previous, &short).is_some(),
        max_failures: policy.failure_budget,
    };
    let decision = waves::decide(&layout, &facts);
    (layout, decision)
}

async fn apply(cfg: &NixosConfiguration, ctx: &Ctx) -> Result<Action> {
    let generation = cfg.metadata.generation;
    let previous = latest_status(ctx, cfg);

    // 1. Invalid specs publish nothing.
    if let Err(invalid) = nio_shared::validate::configuration_spec(&cfg.spec) {
        let (status, notes) = config_status::invalid(&previous, &invalid.to_string(), generation);
        write_status(ctx, cfg, &status, notes, "Validate").await?;
        return Ok(Action::await_change());
    }
    let poll = poll_interval(cfg, ctx.default_poll);

    // 2. Resolve the ref.
    let commit = match resolve(ctx, cfg).await {
        Ok(c) => c,
        Err(e) => {
            let (status, notes) = config_status::degraded(&previous, e.category(), &e.to_string(), generation);
            write_status(ctx, cfg, &status, notes, "ResolveRef").await?;
            return Ok(Action::requeue(poll.min(Duration::from_secs(60))));
        }
    };
    // Its Event (NewCommit) is recorded with the status that records the commit: a reconcile that fails
    // before writing would otherwise announce the same commit again at every retry.
    let (mut resolved, resolve_notes) = config_status::resolved(&previous, &cfg.spec.git_ref, &commit, generation);
    let refresh = refresh_token(cfg);
    if !refresh.is_empty() && previous.last_handled_refresh.as_deref() != Some(refresh) {
        link_to_refresh_request(cfg);
        resolved.last_handled_refresh = Some(refresh.to_string());
    }

    // 3. Secrets and the target.
    let want = match desired(ctx, cfg, commit.clone()).await {
        Ok(d) => d,
        Err(e) => {
            let (status, notes) = config_status::degraded(&resolved, e.category(), &e.to_string(), generation);
            write_status(ctx, cfg, &status, [resolve_notes, notes].concat(), "ReadSecrets").await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    };
    let target = want.target();

    // 4. Machines and the plan. Machines with an invalid spec get nothing (their own Invalid condition says
    // why) and are not counted; the configuration names them.
    let (machines, invalid): (Vec<Arc<Machine>>, Vec<Arc<Machine>>) = targeted_machines(ctx, cfg)
        .await?
        .into_iter()
        .partition(|m| nio_shared::validate::machine_spec(&m.spec).is_ok());
    // Machines another configuration manages get nothing from this one; the status names them.
    // (only machines that do not already name this configuration need a look, and their labels)
    let me = cfg.metadata.name.as_deref();
    let unsure: Vec<Arc<Machine>> = machines
        .iter()
        .filter(|m| m.status.as_ref().and_then(|s| s.applied_configuration.as_deref()) != me)
        .cloned()
        .collect();
    // and only configurations that can select one of them: a fleet's neighbours with selectors that cannot
    // overlap (another value of the same label, typically) are left out, so a large rollout pays nothing for it
    let peers: Vec<Arc<NixosConfiguration>> = if unsure.is_empty() {
        Vec::new()
    } else {
        let ns = cfg.namespace().unwrap_or_default();
        ctx.configurations(&ns).into_iter().filter(|p| p.metadata.name.as_deref() != me && rival(cfg, p)).collect()
    };
    let elsewhere = if !peers.is_empty() {
        managed_elsewhere(cfg, &peers, &unsure, &labelled(ctx, cfg, &unsure))
    } else {
        BTreeMap::new()
    };
    let machines: Vec<Arc<Machine>> = machines.into_iter().filter(|m| !elsewhere.contains_key(&m.name_any())).collect();
    let contested_machines: Vec<(String, String)> = elsewhere.into_iter().collect();
    // Paused or suspended: jobs no executor has taken yet do not start either.
    let machines = if cfg.spec.suspend || cfg.spec.rollout.pause {
        let (machines, n) = withdraw_queued(ctx, machines).await?;
        if n > 0 {
            let why = if cfg.spec.suspend { "suspended" } else { "rollout paused" };
            let note = format!("withdrew {n} queued job(s) that no executor had started ({why})");
            ctx.event(cfg, false, "JobsWithdrawn", note, "Withdraw").await;
        }
        machines
    } else {
        machines
    };
    let views = views(cfg, &machines);
    let mut policy = policy(cfg, machines.len());
    policy.claims = budget_claims(ctx, cfg, &machines);
    let (layout, mut decision) = wave_decision(ctx, cfg, &previous, &target, &machines, &views, &policy).await;
    if let Some(v) = resume_request(cfg, &previous, &short_commit(&commit)) {
        resolved.last_handled_resume = Some(v.to_string());
    }
    // Failures a resume forgave do not count against the rollout's budget, nor against the jobs it lets run at
    // once (failures still tolerated, plus one).
    let forgiven: u32 = decision.statuses.iter().map(|w| w.forgiven).sum();
    policy.failure_budget = policy.failure_budget.map(|b| b.saturating_add(forgiven));
    let plan = rollout::plan_within(&target, &policy, &views, Some(&decision));
    let mut rolling_back = false;
    // (paused or suspended: no new job starts, a rollback's neither; its queued ones were withdrawn above)
    if cfg.spec.rollout.on_failure == OnFailure::RollbackAndHalt
        && !(cfg.spec.suspend || cfg.spec.rollout.pause)
        && let Some(i) = decision.statuses.iter().position(|w| w.state == WaveState::Failed)
        && let Some(wave) = layout.get(i)
    {
        let (note, busy) = roll_back(ctx, cfg, &resolved, &target, wave, &machines, &views).await?;
        rolling_back = busy;
        if let Some(w) = decision.statuses.get_mut(i) {
            w.message = Some(format!("{}; {note}", w.message.clone().unwrap_or_default()));
        }
    }

    // 5. Publish, then mark the machines Queued.
    let queued = publish_plan(ctx, cfg, &want, &machines, &plan.publish, &policy.claims).await?;
    mark_has_configuration(ctx, &machines, &queued).await?;

    // 6. Status and rollout metrics.
    let invalid_machines: Vec<String> = invalid.iter().map(|m| m.name_any()).collect();
    let waiting_sites: Vec<String> = machines
        .iter()
        .filter(|m| m.status.as_ref().and_then(|s| s.phase) == Some(MachinePhase::Waiting))
        .map(|m| m.spec.site.clone())
        .collect();
    let step = config_status::Rollout {
        commit: &commit,
        target: &target,
        waves: Some(&decision),
        wave_events: !cfg.spec.rollout.waves.is_empty(),
        rolling_back,
        waiting_sites: &waiting_sites,
        counts: plan.counts,
        published: queued.len() as u32,
        hold: plan.hold,
        invalid_machines: &invalid_machines,
        contested_machines: &contested_machines,
        last_applied: machines
            .iter()
            .filter_map(|m| m.status.as_ref().and_then(|s| s.last_applied_time.clone()))
            .max_by_key(|t| t.0.as_nanosecond()),
    };
    let (status, notes) = config_status::configuration_status(&resolved, &step, generation);
    set_rollout_metrics(ctx, cfg, &previous, &status);
    write_status(ctx, cfg, &status, [resolve_notes, notes].concat(), "Rollout").await?;
    // A soak ends on its own: look again then.
    Ok(Action::requeue(decision.wake_in.map_or(poll, |w| poll.min(w + Duration::from_millis(500)))))
}

/// RollbackAndHalt: returns the failed wave's machines that ran (or tried) `target` to the commit the fleet ran
/// before (what most of its machines off the target run), at most the wave's maxUnavailable at once, waiting for jobs of
/// `target` still running. Says how far it got, and whether machines are still to return.
async fn roll_back(
    ctx: &Ctx,
    cfg: &NixosConfiguration,
    status: &NixosConfigurationStatus,
    target: &str,
    wave: &waves::Wave,
    machines: &[Arc<Machine>],
    views: &[MachineView],
) -> Result<(String, bool)> {
    // The commit the fleet ran before: what most of this configuration's machines not at the target still run
    // (status.appliedCommit may not have caught up with the last rollout yet).
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in machines.iter().filter_map(|m| m.status.as_ref()) {
        let mine = s.applied_configuration.as_ref() == cfg.metadata.name.as_ref();
        if let (true, Some(c)) = (mine, s.applied_commit.as_deref()) {
            *counts.entry(c).or_default() += 1;
        }
    }
    let not_target = |c: &&str| !target.starts_with(&format!("{c}/"));
    let most = counts.iter().filter(|(c, _)| not_target(c)).max_by_key(|(_, n)| **n).map(|(c, _)| c.to_string());
    let Some(previous) = most.or_else(|| status.applied_commit.clone().filter(|c| not_target(&c.as_str()))) else {
        return Ok(("no earlier commit ran on every machine: nothing to roll back to".into(), false));
    };
    let want = desired(ctx, cfg, previous.clone()).await?;
    let back = want.target();
    let is = |t: &Option<String>, v: &str| t.as_deref() == Some(v);
    let mine: Vec<&MachineView> = views.iter().filter(|v| wave.machines.contains(&v.name)).collect();
    let touched: Vec<&&MachineView> = mine
        .iter()
        .filter(|v| is(&v.applied_target, target) || is(&v.failed_target, target) || is(&v.queued_target, target))
        .collect();
    let returned = mine.iter().filter(|v| is(&v.applied_target, &back)).count();
    let running = mine.iter().filter(|v| is(&v.queued_target, &back) && !is(&v.applied_target, &back)).count();
    let room = wave.max_unavailable.map_or(usize::MAX, |u| (u as usize).saturating_sub(running));
    let todo: Vec<(String, rollout::Work)> = touched
        .iter()
        .filter(|v| !is(&v.queued_target, target) && !is(&v.queued_target, &back))
        .take(room)
        .map(|v| (v.name.clone(), rollout::Work::Update))
        .collect();
    // Rollbacks count against the disruption budgets too (the executors hold the slots).
    let queued = publish_plan(ctx, cfg, &want, machines, &todo, &budget_claims(ctx, cfg, machines)).await?;
    let short = short_commit(&previous);
    let busy = !touched.is_empty() || running > 0;
    Ok((format!("rolling back to {short}: {returned} returned, {} on their way", running + queued.len()), busy))
}

/// The resume annotation's value when it asks for a resume not acted on yet: it names the target's commit
/// (`<12 characters>`, or `<12 characters>@<anything>` for another resume of the same commit) and differs from
/// the value last acted on.
fn resume_request<'a>(
    cfg: &'a NixosConfiguration,
    previous: &NixosConfigurationStatus,
    short: &str,
) -> Option<&'a str> {
    annotation(cfg, RESUME_ANNOTATION)
        .filter(|v| v.split('@').next() == Some(short))
        .filter(|v| previous.last_handled_resume.as_deref() != Some(*v))
}

/// The value of annotation `key` on `cfg`.
fn annotation<'a>(cfg: &'a NixosConfiguration, key: &str) -> Option<&'a str> {
    cfg.metadata.annotations.as_ref().and_then(|a| a.get(key)).map(String::as_str)
}

/// Resolves the configuration's ref with its credentials.
async fn resolve(ctx: &Ctx, cfg: &NixosConfiguration) -> Result<String> {
    let creds = git_creds(ctx, cfg).await?;
    Ok(ctx.resolver.resolve(&cfg.spec.git_repo, &cfg.spec.git_ref, refresh_token(cfg), creds).await?)
}

/// Records `notes` about `cfg`.
async fn record(ctx: &Ctx, cfg: &NixosConfiguration, notes: Vec<conditions::Note>, action: &str) {
    for n in notes {
        ctx.event(cfg, n.warning, &n.reason, n.message, action).await;
    }
}

/// Records `notes`, then writes `status` (unless it changes nothing).
async fn write_status(
    ctx: &Ctx,
    cfg: &NixosConfiguration,
    status: &NixosConfigurationStatus,
    notes: Vec<conditions::Note>,
    action: &str,
) -> Result<()> {
    record(ctx, cfg, notes, action).await;
    set_status(ctx, cfg, status).await
}

/// The planner's view of the configuration, which targets `total` machines. The failure budget is
/// `maxFailures` (a number or a percentage of the machines, rounded down), else `failureBudget`.
/// Each machine's disruption-budget claims under the configuration's budgets.
fn budget_claims(
    ctx: &Ctx,
    cfg: &NixosConfiguration,
    machines: &[Arc<Machine>],
) -> BTreeMap<String, Vec<nio_shared::protocol::BudgetClaim>> {
    let budgets = &cfg.spec.rollout.disruption_budgets;
    if budgets.is_empty() {
        return BTreeMap::new();
    }
    let fleet = labelled(ctx, cfg, machines);
    fleet.iter().map(|(name, labels)| (name.clone(), crate::budgets::claims(budgets, labels, &fleet))).collect()
}

fn policy(cfg: &NixosConfiguration, total: usize) -> Policy {
    let r = &cfg.spec.rollout;
    let max_failures = r.max_failures.as_ref().map(|v| waves::amount(v, total, false));
    Policy {
        full_install: cfg.spec.full_install,
        suspend: cfg.spec.suspend,
        pause: r.pause,
        max_parallel: r.max_parallel,
        canary: r.canary,
        failure_budget: max_failures.or(r.failure_budget),
        claims: Default::default(),
    }
}

/// The planner's view of the machines: a target counts as applied only if this configuration applied it, and,
/// under `driftPolicy: Enforce`, only while the machine runs what was applied.
fn views(cfg: &NixosConfiguration, machines: &[Arc<Machine>]) -> Vec<MachineView> {
    machines
        .iter()
        .map(|m| {
            let s = m.status.clone().unwrap_or_default();
            let enforce = cfg.spec.drift_policy == DriftPolicy::Enforce && drifted_since(m).is_some();
            // A machine passing to this configuration from another (which let it go): that one's targets, queued,
            // applied or failed, are none of this one's (a job of it still queued is replaced by this one's).
            let mine =
                s.applied_configuration.is_none() || s.applied_configuration.as_ref() == cfg.metadata.name.as_ref();
            MachineView {
                name: m.name_any(),
                installed: s.installed_at.is_some(),
                applied_target: s
                    .applied_target
                    .filter(|_| s.applied_configuration.as_ref() == cfg.metadata.name.as_ref() && !enforce),
                queued_target: s.queued_target.filter(|_| mine),
                failed_target: s.failed_target.filter(|_| mine),
            }
        })
        .collect()
}

/// When a machine was found running another system than NIO applied (its Drifted condition's transition, in
/// Unix seconds), if it is now.
fn drifted_since(m: &Machine) -> Option<i64> {
    let c = m.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Drifted" && c.status == "True")?;
    Some(c.last_transition_time.0.as_second())
}

/// Publishes the plan's jobs and marks each machine Queued, machines in parallel (the broker and the API server
/// absorb it). Returns the machines queued.
async fn publish_plan(
    ctx: &Ctx,
    cfg: &NixosConfiguration,
    want: &Desired,
    machines: &[Arc<Machine>],
    publish: &[(String, rollout::Work)],
    claims: &BTreeMap<String, Vec<nio_shared::protocol::BudgetClaim>>,
) -> Result<std::collections::BTreeSet<String>> {
    // By name: a scan per published machine made a large rollout quadratic.
    let by_name: std::collections::HashMap<&str, &Arc<Machine>> =
        machines.iter().filter_map(|m| Some((m.metadata.name.as_deref()?, m))).collect();
    let by_name = &by_name;
    type Published = Option<(Arc<Machine>, nio_shared::protocol::Job)>;
    let outcomes: Vec<Result<Published>> = futures::stream::iter(publish.to_vec())
        .map(|(name, work)| async move {
            let Some(&m) = by_name.get(name.as_str()) else { return Ok(None) };
            let m = m.clone();
            let mut job = publish::apply_job(&ctx.cluster, cfg, &m, want, work, ctx.seal.as_ref())?;
            job.budgets = claims.get(&name).cloned().unwrap_or_default();
            // Re-applying a target to a drifted machine: an id of its own per drift (the broker drops the
            // same drift's job published again by later reconciles).
            if cfg.spec.drift_policy == DriftPolicy::Enforce
                && let Some(since) = drifted_since(&m)
                && m.status.as_ref().and_then(|s| s.applied_target.as_deref()) == job.id.target()
            {
                job.id = job.id.retry(since);
            }
            ctx.publisher.publish(&job).await?;
            Ok(Some((m, job)))
        })
        .buffer_unordered(PUBLISH_CONCURRENCY)
        .collect()
        .await;
    // Every job is on the queue before the first Queued mark is written: executors start on the whole rollout
    // at once instead of at the pace of the API server's writes (the marks and the executors' first events for
    // a machine take turns, see `MachineWrites`).
    let mut published = Vec::with_capacity(outcomes.len());
    let mut failed = None;
    for o in outcomes {
        match o {
            Ok(Some(p)) => published.push(p),
            Ok(None) => {}
            Err(e) => failed = Some(e),
        }
    }
    let name = cfg.name_any();
    let name = name.as_str();
    let marked: Vec<Result<String>> = futures::stream::iter(published)
        .map(|(m, job)| async move {
            mark(ctx, &m, &job, Some(name)).await?;
            Ok(m.name_any())
        })
        .buffer_unordered(MARK_CONCURRENCY)
        .collect()
        .await;
    let mut queued = std::collections::BTreeSet::new();
    for o in marked {
        queued.insert(o?);
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(queued),
    }
}

/// Sets hasConfiguration on the machines that lack it. Machines just queued had it set with their job, so only
/// the others cost a write.
async fn mark_has_configuration(
    ctx: &Ctx,
    machines: &[Arc<Machine>],
    queued: &std::collections::BTreeSet<String>,
) -> Result<()> {
    for m in machines
        .iter()
        .filter(|m| m.status.as_ref().and_then(|s| s.has_configuration) != Some(true))
        .filter(|m| !queued.contains(&m.name_any()))
    {
        update_machine_status(ctx, &m.namespace().unwrap_or_default(), &m.name_any(), Some(m), |m| {
            let mut s = m.status.clone().unwrap_or_default();
            (s.has_configuration != Some(true)).then(|| {
                s.has_configuration = Some(true);
                s
            })
        })
        .await?;
    }
    Ok(())
}

/// `nio_controller_configuration_machines{state}` and the wave gauges from the status just computed.
fn set_rollout_metrics(
    ctx: &Ctx,
    cfg: &NixosConfiguration,
    previous: &NixosConfigurationStatus,
    s: &NixosConfigurationStatus,
) {
    let (namespace, configuration) = (cfg.namespace().unwrap_or_default(), cfg.name_any());
    for (state, n) in [("total", s.total), ("updated", s.updated), ("failed", s.failed), ("in_progress", s.in_progress)]
    {
        let labels =
            ConfigLabels { namespace: namespace.clone(), configuration: configuration.clone(), state: state.into() };
        ctx.metrics.configuration_machines.get_or_create(&labels).set(i64::from(n));
    }
    // Waves gone from the spec leave no series behind.
    for w in previous.waves.iter().filter(|w| !s.waves.iter().any(|n| n.name == w.name)) {
        remove_wave_metrics(ctx, &namespace, &configuration, &w.name);
    }
    for w in &s.waves {
        let labels = |state: &str| WaveLabels {
            namespace: namespace.clone(),
            configuration: configuration.clone(),
            wave: w.name.clone(),
            state: state.into(),
        };
        for (state, n) in
            [("total", w.total), ("updated", w.updated), ("failed", w.failed), ("in_progress", w.in_progress)]
        {
            ctx.metrics.wave_machines.get_or_create(&labels(state)).set(i64::from(n));
        }
        for state in WaveState::ALL {
            let on = i64::from(state == w.state);
            ctx.metrics.wave_state.get_or_create(&labels(state.as_str())).set(on);
        }
    }
}

fn remove_wave_metrics(ctx: &Ctx, namespace: &str, configuration: &str, wave: &str) {
    let labels = |state: &str| WaveLabels {
        namespace: namespace.to_string(),
        configuration: configuration.to_string(),
        wave: wave.to_string(),
        state: state.into(),
    };
    for state in ["total", "updated", "failed", "in_progress"] {
        ctx.metrics.wave_machines.remove(&labels(state));
    }
    for state in WaveState::ALL {
        ctx.metrics.wave_state.remove(&labels(state.as_str()));
    }
}

async fn cleanup(cfg: &NixosConfiguration, ctx: &Ctx) -> Result<Action> {
    let ns = cfg.namespace().unwrap_or_default();
    let name = cfg.name_any();
    for state in ["total", "updated", "failed", "in_progress"] {
        let labels = ConfigLabels { namespace: ns.clone(), configuration: name.clone(), state: state.into() };
        ctx.metrics.configuration_machines.remove(&labels);
    }
    for w in &latest_status(ctx, cfg).waves {
        remove_wave_metrics(ctx, &ns, &name, &w.name);
    }
    let api: Api<Machine> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(mref) = &cfg.spec.machine_ref
        && api.get_opt(mref).await?.is_none()
    {
        let note = format!("Machine {mref} no longer exists; releasing the finalizer");
        ctx.event(cfg, false, "MachineGone", note, "Remove").await;
    }
    // A fresh LIST, not the cache: a machine that just applied this configuration must not be missed.
    let runs_it =
        |m: &Machine| m.status.as_ref().and_then(|s| s.applied_configuration.as_deref()) == Some(name.as_str());
    let attached: Vec<Arc<Machine>> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        // (a machine another configuration runs is that one's, though this one selects it too)
        .filter(|m| {
            runs_it(m) || targets(cfg, m) && m.status.as_ref().is_none_or(|s| s.applied_configuration.is_none())
        })
        .map(Arc::new)
        .collect();
    if cfg.spec.on_remove_flake.is_none() {
        // Its jobs still queued would run it after it is gone.
        let mine: Vec<Arc<Machine>> = attached.iter().filter(|m| runs_it(m)).cloned().collect();
        let (_, n) = withdraw_queued(ctx, mine).await?;
        if n > 0 {
            let note = format!("withdrew {n} queued job(s) that no executor had started");
            ctx.event(cfg, false, "JobsWithdrawn", note, "Remove").await;
        }
        release(ctx, &ns, &attached, true).await?;
        return Ok(Action::await_change());
    }
    let pending: Vec<&Machine> = attached.iter().map(|m| &**m).filter(|m| runs_it(m)).collect();
    if pending.is_empty() {
        release(ctx, &ns, &attached, false).await?;
        let note = "onRemoveFlake applied on every machine; releasing the finalizer".to_string();
        ctx.event(cfg, false, "Removed", note, "Remove").await;
        return Ok(Action::await_change());
    }
    if let Err(invalid) = nio_shared::validate::configuration_spec(&cfg.spec) {
        // Machines still run it, and nothing can be applied from an invalid spec: say so instead of retrying
        // quietly forever. An error keeps the finalizer (Ok would release it with nothing applied).
        let msg = format!(
            "onRemoveFlake cannot be applied: {invalid}; fix the spec, or remove onRemoveFlake to release the \
             machines as they are"
        );
        removal_blocked(ctx, cfg, &msg).await?;
        return Err(Error::RemovalPending(msg));
    }
    let commit = match latest_status(ctx, cfg).target_commit {
        Some(c) => c,
        None => resolve(ctx, cfg).await?,
    };
    let blocked = publish_removals(ctx, cfg, &pending, &commit).await?;
    if !blocked.is_empty() {
        let msg =
            format!("onRemoveFlake could not be applied on {}; the finalizer stays until it is", blocked.join(", "));
        removal_blocked(ctx, cfg, &msg).await?;
    }
    Err(Error::RemovalPending(format!("{} machine(s) still run configuration {name}", pending.len())))
}

/// Withdraws the jobs queued for `machines` that no executor has taken yet (from the queue, and the machine's
/// Queued mark); returns the machines as they are then and how many jobs were withdrawn. An executor that took
/// a job a moment before is not stopped: its start then shows the machine Applying.
async fn withdraw_queued(ctx: &Ctx, machines: Vec<Arc<Machine>>) -> Result<(Vec<Arc<Machine>>, usize)> {
    let one = |m: Arc<Machine>| async move {
        let Some(status) = withdrawn(m.status.as_ref()) else { return Ok((m, false)) };
        let (ns, name) = (m.namespace().unwrap_or_default(), m.name_any());
        ctx.publisher.withdraw(&ctx.cluster, &ns, &name).await?;
        update_machine_status(ctx, &ns, &name, Some(&m), |m| withdrawn(m.status.as_ref())).await?;
        let mut now = (*m).clone();
        now.status = Some(status);
        Ok::<_, Error>((Arc::new(now), true))
    };
    let done: Vec<(Arc<Machine>, bool)> =
        futures::stream::iter(machines.into_iter().map(one)).buffered(MARK_CONCURRENCY).try_collect().await?;
    let n = done.iter().filter(|(_, w)| *w).count();
    Ok((done.into_iter().map(|(m, _)| m).collect(), n))
}

/// `status` with its queued job withdrawn: back to the phase the machine had before (Failed if its last job
/// failed, Applied if it applied one, else Pending), nothing queued, and the job's id kept so that the same move
/// published again gets an id of its own. None when nothing waits in the queue for it (an executor started the
/// job, or it ended).
pub fn withdrawn(status: Option<&MachineStatus>) -> Option<MachineStatus> {
    let before = status?;
    if !matches!(before.phase, Some(MachinePhase::Queued | MachinePhase::Waiting)) {
        return None;
    }
    let mut s = before.clone();
    s.phase = Some(if s.failed_target.is_some() {
        MachinePhase::Failed
    } else if s.applied_target.is_some() {
        MachinePhase::Applied
    } else {
        MachinePhase::Pending
    });
    s.queued_target = None;
    s.superseded_job_id = s.last_job_id.clone();
    if conditions::is_true(&s.conditions, conditions::Type::Waiting) {
        conditions::set(&mut s.conditions, conditions::Type::Waiting, false, "Withdrawn", "", s.observed_generation);
    }
    Some(s)
}

/// Marks `machines` as no longer having this configuration; `detach` also forgets that they ran it (no
/// onRemoveFlake: they keep what they run, unmanaged).
async fn release(ctx: &Ctx, ns: &str, machines: &[Arc<Machine>], detach: bool) -> Result<()> {
    for m in machines {
        update_machine_status(ctx, ns, &m.name_any(), Some(m), |m| {
            let mut s = m.status.clone().unwrap_or_default();
            if detach {
                s.applied_configuration = None;
                s.queued_target = None;
            } else if s.has_configuration == Some(false) {
                return None;
            }
            s.has_configuration = Some(false);
            Some(s)
        })
        .await?;
    }
    Ok(())
}

/// Publishes the onRemoveFlake job of each machine that still runs the configuration and marks it Queued.
/// Machines whose removal failed are retried after a pause and returned, named with the failure.
async fn publish_removals(
    ctx: &Ctx,
    cfg: &NixosConfiguration,
    pending: &[&Machine],
    commit: &str,
) -> Result<Vec<String>> {
    let mut blocked = Vec::new();
    for m in pending {
        let s = m.status.clone().unwrap_or_default();
        let job = publish::remove_job(&ctx.cluster, cfg, m, commit)?;
        let t = job.id.target().unwrap_or_default().to_string();
        if s.failed_target.as_deref() == Some(t.as_str()) {
            let failed = s.conditions.iter().find(|c| c.type_ == conditions::Type::Failed.as_str());
            let why = failed.map(|c| format!("{}: {}", c.reason, c.message)).unwrap_or_default();
            blocked.push(format!("{} ({why})", m.name_any()));
            // Retry after a pause: a fresh job id gets past the queue's duplicate window.
            let retry = nio_shared::protocol::Job { id: job.id.retry(chrono::Utc::now().timestamp() / 60), ..job };
            ctx.publisher.publish(&retry).await?;
            continue;
        }
        if s.queued_target.as_deref() == Some(t.as_str()) {
            continue;
        }
        publish_and_queue(ctx, m, &job, None).await?;
    }
    Ok(blocked)
}

/// Publishes `job` for `m` and marks the machine Queued for it; `claim` also records that the configuration
/// of that name manages the machine (when no other one did).
async fn publish_and_queue(ctx: &Ctx, m: &Machine, job: &nio_shared::protocol::Job, claim: Option<&str>) -> Result<()> {
    ctx.publisher.publish(job).await?;
    mark(ctx, m, job, claim).await
}

/// Marks `m` Queued for `job`, published already; `claim` as for [`publish_and_queue`].
async fn mark(ctx: &Ctx, m: &Machine, job: &nio_shared::protocol::Job, claim: Option<&str>) -> Result<()> {
    update_machine_status(ctx, &m.namespace().unwrap_or_default(), &m.name_any(), Some(m), |m| {
        marked(m.status.as_ref(), job.id.target().unwrap_or_default(), &job.id, job.action, claim)
    })
    .await?;
    Ok(())
}

/// The status that marks a machine Queued for `job`, or None when it already says all of it: the executor's
/// events for the job (its start records the job and its target) can land first, and a mark then costs nothing.
fn marked(
    status: Option<&MachineStatus>,
    target: &str,
    job_id: &nio_shared::protocol::JobId,
    action: nio_shared::protocol::Action,
    claim: Option<&str>,
) -> Option<MachineStatus> {
    let mut s = status.cloned().unwrap_or_default();
    if let Some(name) = claim {
        s.has_configuration = Some(true);
        // The machine passes to this configuration (see `managed_elsewhere`): what the last one applied is no
        // target of this one's, even where the two strings agree (same commit and generation).
        if s.applied_configuration.as_deref() != Some(name) {
            s.applied_configuration = Some(name.to_string());
            s.applied_target = None;
        }
    }
    mark_queued(&mut s, target, job_id, action);
    (status != Some(&s)).then_some(s)
}

/// Degraded/RemovalBlocked with `msg` (and an Event when the message is new).
async fn removal_blocked(ctx: &Ctx, cfg: &NixosConfiguration, msg: &str) -> Result<()> {
    let (status, notes) =
        config_status::degraded(&latest_status(ctx, cfg), "RemovalBlocked", msg, cfg.metadata.generation);
    write_status(ctx, cfg, &status, notes, "Remove").await
}

#[cfg(test)]
mod tests {
    use super::*;
    use nio_shared::protocol::Action;

    fn fleet(name: &str, created: &str, selector: serde_json::Value, deleting: bool) -> Arc<NixosConfiguration> {
        let mut meta = serde_json::json!({"name": name, "namespace": "fleet", "creationTimestamp": created});
        if deleting {
            meta["deletionTimestamp"] = "2026-12-04T12:00:00Z".into();
        }
        let c: NixosConfiguration = serde_json::from_value(serde_json::json!({
            "apiVersion": "nixos.infra/v1alpha1", "kind": "NixosConfiguration", "metadata": meta,
            "spec": {"gitRepo": "https://example.org/fleet.git", "ref": "main", "flake": "#web",
                     "machineSelector": {"matchLabels": selector}},
        }))
        .expect("a configuration");
        Arc::new(c)
    }

    /// One rule, the same answer from every configuration's side: the configuration a machine runs keeps it
    /// while it targets it (or is being deleted); otherwise the oldest that targets it takes it.
    #[test]
    fn each_machine_has_one_manager_whichever_configuration_asks() {
        let web = fleet("web", "2026-12-01T00:00:00Z", serde_json::json!({"role": "web"}), false);
        let edge = fleet("edge", "2026-12-02T00:00:00Z", serde_json::json!({"tier": "edge"}), false);
        let core = fleet("core", "2026-12-02T00:00:00Z", serde_json::json!({"tier": "edge"}), false);
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let both = labels(&[("role", "web"), ("tier", "edge")]);
        let machine = |name: &str, runs: Option<&str>| {
            let mut m =
                Machine::new(name, serde_json::from_value(serde_json::json!({"hostname": name})).expect("spec"));
            m.status = Some(MachineStatus { applied_configuration: runs.map(str::to_string), ..Default::default() });
            Arc::new(m)
        };
        let manager = |cfg: &Arc<NixosConfiguration>,
                       peers: &[Arc<NixosConfiguration>],
                       m: &Arc<Machine>,
                       l: &BTreeMap<String, String>| {
            let elsewhere = managed_elsewhere(cfg, peers, std::slice::from_ref(m), &[(m.name_any(), l.clone())]);
            elsewhere.get(&m.name_any()).cloned().unwrap_or_else(|| cfg.name_any())
        };
        let all = [web.clone(), edge.clone(), core.clone()];
        // a machine that ran none: the oldest (web); of two as old, the first by name (core before edge)
        let fresh = machine("m1", None);
        for c in &all {
            assert_eq!(manager(c, &all, &fresh, &both), "web", "asked by {}", c.name_any());
        }
        let young = [edge.clone(), core.clone()];
        for c in &young {
            assert_eq!(manager(c, &young, &fresh, &both), "core", "asked by {}", c.name_any());
        }
        // the machine runs edge: edge keeps it, though web is older
        let runs_edge = machine("m1", Some("edge"));
        for c in &all {
            assert_eq!(manager(c, &all, &runs_edge, &both), "edge", "asked by {}", c.name_any());
        }
        // edge no longer targets it (its labels moved): the oldest of the others
        let web_only = labels(&[("role", "web")]);
        assert_eq!(manager(&web, &all, &runs_edge, &web_only), "web");
        // edge is being deleted: it keeps the machine until its removal released it, and claims no new one
        let leaving = fleet("edge", "2026-12-02T00:00:00Z", serde_json::json!({"tier": "edge"}), true);
        let with_leaving = [web.clone(), leaving, core.clone()];
        assert_eq!(manager(&web, &with_leaving, &runs_edge, &web_only), "edge");
        let young_leaving = [with_leaving[1].clone(), core.clone()];
        assert_eq!(manager(&core, &young_leaving, &fresh, &both), "core");
        // a configuration the machine names that is gone: as if it ran none
        assert_eq!(manager(&core, &young, &machine("m1", Some("gone")), &both), "core");
    }

    /// A mark after the executor's start or outcome for the job (which record the job and its target) writes
    /// nothing; a machine the job has not reached is marked Queued.
    #[test]
    fn a_mark_the_executor_already_said_costs_no_write() {
        let job = "job-1".into();
        let base = MachineStatus {
            has_configuration: Some(true),
            applied_configuration: Some("web".into()),
            last_job_id: Some("job-1".into()),
            ..Default::default()
        };
        let started =
            MachineStatus { phase: Some(MachinePhase::Applying), queued_target: Some("c1/1".into()), ..base.clone() };
        assert_eq!(marked(Some(&started), "c1/1", &job, Action::Switch, Some("web")), None);
        let done = MachineStatus { phase: Some(MachinePhase::Applied), applied_target: Some("c1/1".into()), ..base };
        assert_eq!(marked(Some(&done), "c1/1", &job, Action::Switch, Some("web")), None);
        let fresh = marked(None, "c1/1", &job, Action::Switch, Some("web")).expect("a write");
        assert_eq!((fresh.phase, fresh.queued_target.as_deref()), (Some(MachinePhase::Queued), Some("c1/1")));
    }

    #[test]
    fn a_result_that_landed_before_the_queued_mark_is_kept() {
        // fresh machine: Queued
        let mut s = MachineStatus::default();
        mark_queued(&mut s, "c1/1", &"job-1".into(), Action::Switch);
        assert_eq!((s.phase, s.queued_target.as_deref()), (Some(MachinePhase::Queued), Some("c1/1")));
        // the executor's Succeeded for this target was applied first: the machine stays Applied
        let mut s = MachineStatus {
            phase: Some(MachinePhase::Applied),
            applied_target: Some("c1/1".into()),
            ..Default::default()
        };
        mark_queued(&mut s, "c1/1", &"job-1".into(), Action::Switch);
        assert_eq!(
            (s.phase, s.queued_target, s.last_job_id.as_deref()),
            (Some(MachinePhase::Applied), None, Some("job-1"))
        );
        // ... or Failed
        let mut s = MachineStatus {
            phase: Some(MachinePhase::Failed),
            failed_target: Some("c1/1".into()),
            ..Default::default()
        };
        mark_queued(&mut s, "c1/1", &"job-1".into(), Action::Switch);
        assert_eq!(s.phase, Some(MachinePhase::Failed));
        // an older applied target does not count
        let mut s = MachineStatus {
            phase: Some(MachinePhase::Applied),
            applied_target: Some("c0/1".into()),
            ..Default::default()
        };
        mark_queued(&mut s, "c1/1", &"job-1".into(), Action::Switch);
        assert_eq!(s.phase, Some(MachinePhase::Queued));
        // the executor's Started for this job was applied first: Applying stays, the target is in progress
        let mut s = MachineStatus {
            phase: Some(MachinePhase::Applying),
            last_job_id: Some("job-1".into()),
            ..Default::default()
        };
        mark_queued(&mut s, "c1/1", &"job-1".into(), Action::Switch);
        assert_eq!((s.phase, s.queued_target.as_deref()), (Some(MachinePhase::Applying), Some("c1/1")));
        // ... but a machine applying another job is Queued for this one
        let mut s = MachineStatus {
            phase: Some(MachinePhase::Applying),
            last_job_id: Some("job-0".into()),
            ..Default::default()
        };
        mark_queued(&mut s, "c1/1", &"job-1".into(), Action::Switch);
        assert_eq!(s.phase, Some(MachinePhase::Queued));
        // a removal already reported
        let mut s =
            MachineStatus { phase: Some(MachinePhase::Applied), has_configuration: Some(false), ..Default::default() };
        mark_queued(&mut s, "c1/1", &"rm-1".into(), Action::Remove);
        assert_eq!(s.phase, Some(MachinePhase::Applied));
    }
}
