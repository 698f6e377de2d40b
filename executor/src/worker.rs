//! JetStream workers: one durable pull consumer per site (its `max_ack_pending` is the site's limit), and
//! the life of one job: decode → lock → rate limit → connect → action → status → ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use nio_shared::config::{ExecutorConfig, SiteLimits};
use nio_shared::protocol::{Action, FailureCategory, Job, JobKind, Phase, STATUS_VERSION, StatusEvent, Step};
use nio_shared::seal::SealKey;
use nio_shared::subjects;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::actions::{self, Connector, JobRun, Outcome, Progress};
use crate::error::{Error, Result};
use crate::host::Commands;
use crate::limits::ConnectLimits;
use crate::lock::{Heartbeats, Held, Locks};
use crate::metrics::{self, Metrics, OutcomeLabels};
use crate::pool::{self, Pool};
use crate::source::SourceCache;
use crate::ssh::{ConnectOptions, HostKeyPolicy, Identities, SshHost};

/// How long a pull request waits at the broker for jobs. Freed slots open new requests at once, so this only
/// sets how often an idle executor asks again.
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// A deadline that will not come in practice.
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// Everything the workers share.
pub struct Executor {
    pub js: jetstream::Context,
    pub cfg: ExecutorConfig,
    pub id: String,
    pub locks: Locks,
    /// Disruption-budget slots (`NIO_BUDGETS`).
    pub budgets: Locks,
    pub heartbeats: Heartbeats,
    pub limits: ConnectLimits,
    pub identities: Identities,
    pub sources: SourceCache,
    pub seal: Option<SealKey>,
    pub connect: ConnectOptions,
    pub metrics: Arc<Metrics>,
    pub cmds: Commands,
    pub kexec_tarball: Option<Vec<u8>>,
    pub ready: Arc<AtomicBool>,
    /// Idle connections kept for the machines' next jobs.
    pub pool: Pool<SshHost>,
}

/// Creates the streams if missing and the site consumers, refusing to run against incompatible settings.
pub async fn ensure_consumers(
    js: &jetstream::Context,
    cfg: &ExecutorConfig,
) -> Result<Vec<(SiteLimits, PullConsumer)>> {
    nio_shared::nats::ensure_streams(js, cfg.stream_replicas).await.map_err(|e| Error::nats("streams", e))?;
    let stream =
        nio_shared::nats::retrying("stream NIO_JOBS", || async { Ok(js.get_stream(subjects::JOBS_STREAM).await?) })
            .await
            .map_err(|e| Error::nats("jobs stream", e))?;
    let mut out = Vec::new();
    for site in &cfg.sites {
        let want = nio_shared::nats::site_consumer(site, cfg);
        let name = subjects::site_consumer(&site.name);
        let (consumer, info) = nio_shared::nats::retrying(&format!("consumer {name}"), || async {
            let mut c: PullConsumer = match stream.get_consumer(&name).await {
                Ok(c) => c,
                Err(_) => stream.create_consumer(want.clone()).await?,
            };
            let info = c.info().await?.clone();
            Ok((c, info))
        })
        .await
        .map_err(|e| Error::nats(format!("consumer {name}"), e))?;
        let diff = nio_shared::nats::consumer_mismatches(&info.config.into_pull(), &want);
        if !diff.is_empty() {
            return Err(Error::Nats { what: format!("site {}: {}", site.name, diff.join("; ")), source: None });
        }
        out.push((site.clone(), consumer));
    }
    Ok(out)
}

trait IntoPull {
    fn into_pull(self) -> jetstream::consumer::pull::Config;
}

impl IntoPull for jetstream::consumer::Config {
    fn into_pull(self) -> jetstream::consumer::pull::Config {
        jetstream::consumer::pull::Config {
            durable_name: self.durable_name,
            filter_subject: self.filter_subject,
            ack_policy: self.ack_policy,
            max_ack_pending: self.max_ack_pending,
            ..Default::default()
        }
    }
}

impl Executor {
    /// Pulls and runs jobs until `shutdown`; then finishes in-flight jobs within `grace` and naks the rest.
    pub async fn run(
        self: Arc<Self>,
        consumers: Vec<(SiteLimits, PullConsumer)>,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Result<()> {
        let hard = CancellationToken::new();
        let mut tasks = Vec::new();
        for (site, consumer) in consumers {
            self.metrics.site_limit.get_or_create(&metrics::site(&site.name)).set(i64::from(site.max_in_flight));
            self.metrics.init_site(&site.name);
            tasks.push(tokio::spawn(pending_gauge(
                self.metrics.clone(),
                site.name.clone(),
                consumer.clone(),
                shutdown.clone(),
            )));
            let me = self.clone();
            let (shutdown, hard) = (shutdown.clone(), hard.clone());
            tasks.push(tokio::spawn(async move { me.site_loop(site, consumer, shutdown, hard).await }));
        }
        self.ready.store(true, Ordering::SeqCst);
        shutdown.cancelled().await;
        self.ready.store(false, Ordering::SeqCst);
        tracing::info!(?grace, "shutting down: no new jobs; finishing in-flight jobs");
        let all = futures::future::join_all(tasks);
        tokio::pin!(all);
        tokio::select! {
            _ = &mut all => {}
            _ = tokio::time::sleep(grace) => {
                tracing::warn!("grace period over: returning unfinished jobs to the queue");
                hard.cancel();
                all.await;
            }
        }
        Ok(())
    }

    /// Keeps pull requests outstanding for every free slot of the site: each freed slot goes into a new
    /// request at once (several requests may wait at the broker together), so a slot never idles while jobs
    /// are queued. Each job runs in its own task. The broker's `max_ack_pending` caps the site across all
    /// executors.
    async fn site_loop(
        self: Arc<Self>,
        site: SiteLimits,
        consumer: PullConsumer,
        shutdown: CancellationToken,
        hard: CancellationToken,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(site.max_in_flight as usize));
        let tasks = tokio_util::task::TaskTracker::new();
        loop {
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.cancelled() => break,
            };
            let mut permits = vec![first];
            while let Ok(p) = slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            let batch = consumer.batch().max_messages(permits.len()).expires(PULL_EXPIRES).messages().await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(site = %site.name, error = %e, "pulling jobs failed; retrying");
                    drop(permits);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            };
            // Hand this request's messages to jobs while the loop goes on to request for the next freed slot.
            let (me, name, hard, shutdown, spawner) =
                (self.clone(), site.name.clone(), hard.clone(), shutdown.clone(), tasks.clone());
            tasks.spawn(async move {
                loop {
                    let next = tokio::select! {
                        m = batch.next() => m,
                        _ = shutdown.cancelled() => None,
                    };
                    let Some(m) = next else { break };
                    match m {
                        Ok(msg) => {
                            let Some(permit) = permits.pop() else { break };
                            let (me, name, hard) = (me.clone(), name.clone(), hard.clone());
                            spawner.spawn(async move {
                                me.handle(&name, msg, hard).await;
                                drop(permit);
                            });
                        }
                        // The request is over (e.g. 503 while the stream's leader moves to another member of a
                        // NATS cluster): after a pause its slots go back and the loop asks again (without the
                        // pause it would ask thousands of times a second until the new leader is elected).
                        Err(e) => {
                            tracing::warn!(site = %name, error = %e, "pulling jobs failed; asking again");
                            tokio::select! {
                                _ = tokio::time::sleep(PULL_ERROR_PAUSE) => {}
                                _ = shutdown.cancelled() => {}
                            }
                            break;
                        }
                    }
                }
                if shutdown.is_cancelled() {
                    // Jobs already on their way to this executor go back to the queue now, not after ack_wait.
                    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_millis(50), batch.next()).await {
                        nio_shared::nats::ack(&msg, AckKind::Nak(None)).await;
                    }
                }
                // Slots this request did not fill are free again when it ends.
            });
        }
        tasks.close();
        tasks.wait().await;
    }

    /// Handles one message; never fails the worker.
    async fn handle(self: Arc<Self>, site: &str, msg: jetstream::Message, hard: CancellationToken) {
        let start = Instant::now();
        let in_flight = self.metrics.in_flight.get_or_create(&metrics::site(site)).clone();
        in_flight.inc();
        let job = match Job::decode(&msg.payload) {
            Ok(j) => j,
            Err(e) => {
                self.metrics.malformed.inc();
                tracing::error!(subject = %msg.subject, error = %e, "terminating an undecodable job");
                if let Some(s) = subjects::parse_job_subject(&msg.subject) {
                    let rep = Reporter::new(self.clone(), undecodable_job(&s), None);
                    rep.finish_failed(Step::Lock, FailureCategory::InvalidJob, e.to_string(), vec![]).await;
                }
                nio_shared::nats::ack(&msg, AckKind::Term).await;
                in_flight.dec();
                return;
            }
        };
        let (delivered, seq) = msg.info().map_or((1, 0), |i| (i.delivered, i.stream_sequence));
        let queued = Queued { subject: msg.subject.to_string(), seq };
        let span = tracing::info_span!(
            "job.execute",
            otel.kind = "consumer",
            nio.site = %job.site,
            nio.cluster = %job.cluster,
            nio.action = job.action.as_str(),
            nio.commit = job.source.as_ref().map(|s| s.commit.as_str()).unwrap_or(""),
            nio.outcome = tracing::field::Empty,
            nio.queue_wait_ms = tracing::field::Empty,
            error.type = tracing::field::Empty,
            server.address = %job.endpoint.host,
            messaging.system = "nats",
        );
        nio_shared::telemetry::set_parent_from(&span, msg.headers.as_ref());
        let queue_wait = (Utc::now() - job.enqueued_at).to_std().unwrap_or_default();
        self.metrics.queue_wait.get_or_create(&metrics::site(site)).observe(queue_wait.as_secs_f64());
        span.record("nio.queue_wait_ms", queue_wait.as_millis() as u64);
        // Keep the message ours while the job runs and its outcome is reported (and not a moment longer: the
        // ticker stops when this function ends, however it ends).
        let ticker = tokio_util::task::AbortOnDropHandle::new({
            let every = Duration::from_secs(self.cfg.ack_wait_seconds.max(3) / 3);
            let msg = msg.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if msg.ack_with(AckKind::Progress).await.is_err() {
                        return;
                    }
                }
            })
        });
        tracing::debug!(parent: &span, machine = %job.machine, id = %job.id, delivered, seq, budgets = job.budgets.len(), "job received");
        let (outcome, held) = self.clone().process(site, job.clone(), queued, hard).instrument(span.clone()).await;
        if let Err(Stale(label)) = outcome {
            // Another delivery of this job finished it, or a newer job for the machine replaced it: this one
            // reports nothing (the finished delivery did) and acks (a no-op for a message already gone).
            ticker.abort();
            tracing::info!(parent: &span, machine = %job.machine, id = %job.id, delivered, seq, outcome = label, "job not run: {label}");
            nio_shared::nats::ack(&msg, AckKind::Ack).await;
            if let Some(h) = held {
                h.release().await;
            }
            self.count(site, &job, label, "none");
            in_flight.dec();
            return;
        }
        let rep = Reporter::new(self.clone(), job.clone(), Some(span.clone()));
        let mut settlement = settle(&outcome, delivered, self.cfg.max_deliver, &self.cfg.backoff_seconds);
        let reported = match (&settlement, outcome) {
            (_, Ok(o)) => rep.finish_ok(o).instrument(span.clone()).await,
            (Settlement::Retry { delay, .. }, Err(Failed(e))) => {
                let attempt = format!("attempt {delivered} of {}", self.cfg.max_deliver);
                rep.step(e.step(), format!("{e}; retrying in {delay:?} ({attempt})")).instrument(span.clone()).await;
                true
            }
            (Settlement::Fail { .. }, Err(Failed(e))) => {
                span.record("error.type", e.category().as_str());
                tracing::warn!(parent: &span, machine = %job.machine, error = %e, "job failed");
                rep.finish_failed(e.step(), e.category(), e.to_string(), e.tail()).instrument(span.clone()).await
            }
            (_, Err(_)) => true,
        };
        ticker.abort();
        if !reported {
            // The outcome never reached the controller: settling now would leave the Machine Applying for good.
            // The job goes back to the queue; run again, it finds the host done and reports that.
            tracing::error!(parent: &span, machine = %job.machine, "outcome not reported; returning the job to the queue");
            settlement = Settlement::Requeue;
        }
        // Succeeded jobs wait for the broker to confirm the ack: a lost one would run the job again.
        if matches!(settlement, Settlement::Done { .. }) {
            if let Err(e) = msg.double_ack().await {
                tracing::warn!(parent: &span, error = %e, "the broker did not confirm a finished job's ack");
            }
        } else {
            nio_shared::nats::ack(&msg, settlement.ack()).await;
        }
        // The machine is released only once its message is settled: a second delivery of the same message
        // (a NATS cluster changing leaders can hand one out twice) waiting for the machine then finds it gone
        // and runs nothing, instead of running again outside the broker's count of the site's jobs.
        if let Some(h) = held {
            h.release().await;
        }
        let (label, category) = settlement.labels();
        tracing::debug!(parent: &span, machine = %job.machine, outcome = label, "job settled");
        span.record("nio.outcome", label);
        self.count(site, &job, label, category);
        self.metrics.job_duration.get_or_create(&metrics::site(site)).observe(start.elapsed().as_secs_f64());
        in_flight.dec();
    }

    /// Counts a settled job in `nio_executor_jobs_total`.
    fn count(&self, site: &str, job: &Job, outcome: &str, category: &str) {
        let labels = OutcomeLabels {
            site: site.into(),
            action: job.action.as_str().into(),
            outcome: outcome.into(),
            category: category.into(),
        };
        self.metrics.jobs.get_or_create(&labels).inc();
    }

    /// Runs the job; returns its outcome and, when it ran to its end holding the machine, the machine's lock
    /// (released by the caller once the message is settled). A job cut short by its timeout or a hard stop
    /// drops the lock unreleased: a remote command may still run, so the machine stays locked for the TTL.
    async fn process(
        self: Arc<Self>,
        site: &str,
        job: Job,
        queued: Queued,
        hard: CancellationToken,
    ) -> (Result<Outcome, Failure>, Option<Held>) {
        if let Err(e) = actions::check_job(&job) {
            return (Err(Failed(e)), None);
        }
        let rep = Reporter::new(self.clone(), job.clone(), Some(tracing::Span::current()));
        let timeout = self.job_deadline(&job);
        // The job's time runs from when it holds its machine and budget slots (waiting for those is bounded
        // apart, and a wait that runs out is retried): a job queued behind others for a disruption budget
        // would otherwise spend its own time waiting and fail as a timeout.
        let work = self.clone().locked(site, &job, &queued, &rep, timeout);
        tokio::select! {
            r = work => r,
            _ = hard.cancelled() => (Err(Cancelled), None),
        }
    }

    /// Why a job's message must not run, checked when it arrives and again once the job holds its machine:
    /// `superseded`, a newer job for the machine and kind is on the queue (the queue keeps a few per machine and
    /// kind, because a message replaced while its job runs would be forgotten by the broker, freeing its site
    /// slot), or `duplicate`, it is gone: another delivery of it settled it (the broker removes a settled job).
    /// None while it is the newest, or when NATS cannot tell.
    async fn stale(&self, queued: &Queued) -> Option<&'static str> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let stream = self.js.get_stream_no_info(subjects::JOBS_STREAM).await.ok()?;
        match stream.get_last_raw_message_by_subject(&queued.subject).await {
            Ok(last) if last.sequence > queued.seq => Some("superseded"),
            Ok(last) if last.sequence == queued.seq || queued.seq == 0 => None,
            Ok(_) => Some("duplicate"),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Some("duplicate"),
            Err(_) => None,
        }
    }

    /// The job's own timeout, else the executor's default: what building and activating may take.
    fn job_timeout(&self, job: &Job) -> Duration {
        let secs = if job.timeout_seconds > 0 { job.timeout_seconds } else { self.cfg.job_timeout_seconds };
        Duration::from_secs(secs)
    }

    /// The whole job's bound: build and activation, then the confirmation window and the health check, each
    /// bounded on its own (docs/remote-protocol.md).
    fn job_deadline(&self, job: &Job) -> Duration {
        let after = match job.action {
            Action::Switch | Action::Test | Action::Remove => {
                let health = job.health_check.as_ref().map_or(300, |h| h.timeout_seconds);
                u64::from(job.confirm_timeout_seconds) + u64::from(health) + 60
            }
            _ => 0,
        };
        self.job_timeout(job).saturating_add(Duration::from_secs(after))
    }

    /// Runs the job once its machine is held. The queue check (is this job still the newest?) and the first lock
    /// attempt go out together, so a job whose machine is free is one broker round trip from its SSH login; a job
    /// that had to wait for its machine is checked again once it holds it.
    async fn locked(
        self: Arc<Self>,
        site: &str,
        job: &Job,
        queued: &Queued,
        rep: &Reporter,
        timeout: Duration,
    ) -> (Result<Outcome, Failure>, Option<Held>) {
        let key = subjects::lock_key(&job.endpoint.host, job.endpoint.port);
        let lock_span = tracing::info_span!("lock", nio.lock = %key);
        // check_job bounds the job's times; a deadline past what the clock can hold is a year away.
        let deadline = Instant::now().checked_add(timeout).unwrap_or_else(|| Instant::now() + YEAR);
        let (stale, first) =
            tokio::join!(self.stale(queued), self.locks.try_acquire(&key).instrument(lock_span.clone()));
        if let Some(label) = stale {
            return (Err(Stale(label)), first.ok().flatten());
        }
        // The start is reported while the job goes on (one broker round trip less before the first command). It
        // is sent first, so it reaches the stream ahead of the job's steps.
        let started = rep.event(Phase::Started, None, None, String::new());
        let work = async {
            let held = match first {
                Ok(Some(h)) => h,
                Ok(None) if job.action.kind() == JobKind::Probe => {
                    let busy = Outcome {
                        skipped: true,
                        message: "machine busy with another job; probe skipped".into(),
                        ..Default::default()
                    };
                    return (Ok(busy), None);
                }
                Ok(None) => match self.wait_for_machine(site, &key, rep, deadline).instrument(lock_span).await {
                    Ok(h) => {
                        if let Some(label) = self.stale(queued).await {
                            return (Err(Stale(label)), Some(h));
                        }
                        h
                    }
                    Err(e) => return (Err(Failed(e)), None),
                },
                Err(e) => return (Err(Failed(e)), None),
            };
            let slots = match self.budget_slots(job, rep, deadline).await {
                Ok(s) => s,
                Err(e) => return (Err(Failed(e)), Some(held)),
            };
            let result = match tokio::time::timeout(timeout, self.connected(site, job, rep)).await {
                Ok(r) => r.map_err(Failed),
                Err(_) => Err(Failed(Error::Timeout { step: rep.current_step(), after: timeout })),
            };
            for slot in slots {
                slot.release().await;
            }
            (result, Some(held))
        };
        tokio::join!(started, work).1
    }

    /// Waits until the machine `key`, held by another job, is this job's: its holder finishes, or its holder's
    /// executor is gone and the machine is taken over. Says once that the machine is busy.
    async fn wait_for_machine(&self, site: &str, key: &str, rep: &Reporter, deadline: Instant) -> Result<Held> {
        let mut announced = false;
        loop {
            // The holder's executor died: its job (often this very one, redelivered) is ours to finish.
            if let Some((h, dead)) = self.locks.take_over(key, &self.heartbeats).await? {
                rep.step(Step::Lock, format!("took the machine over from {dead}, whose executor is gone")).await;
                return Ok(h);
            }
            if !announced {
                self.metrics.lock_waits.get_or_create(&metrics::site(site)).inc();
                let holder = self.locks.holder(key).await.unwrap_or_default();
                rep.step(Step::Lock, format!("machine busy ({holder}); waiting for the running job to finish")).await;
                announced = true;
            }
            if Instant::now() > deadline {
                return Err(Error::LockBusy);
            }
            // A holder that dies is noticed within a second of its heartbeat expiring.
            self.locks.wait_released(key, Duration::from_secs(1)).await;
            if let Some(h) = self.locks.try_acquire(key).await? {
                return Ok(h);
            }
        }
    }

    async fn budget_slots(&self, job: &Job, rep: &Reporter, deadline: Instant) -> Result<Vec<crate::lock::Held>> {
        let mut held = Vec::new();
        for claim in &job.budgets {
            let mut announced = false;
            loop {
                if let Some(h) = self.take_slot(claim).await? {
                    held.push(h);
                    break;
                }
                if !announced {
                    let what =
                        format!("waiting for disruption budget {} (at most {} machines at once)", claim.key, claim.max);
                    rep.step(Step::Lock, what).await;
                    announced = true;
                }
                if Instant::now() > deadline {
                    for h in held {
                        h.release().await;
                    }
                    return Err(Error::LockBusy);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(held)
    }

    async fn take_slot(&self, claim: &nio_shared::protocol::BudgetClaim) -> Result<Option<crate::lock::Held>> {
        let keys: Vec<String> = (0..claim.max).map(|i| format!("{}.{i}", claim.key)).collect();
        for key in &keys {
            if let Some(h) = self.budgets.try_acquire(key).await? {
                return Ok(Some(h));
            }
        }
        for key in &keys {
            if let Some((h, _)) = self.budgets.take_over(key, &self.heartbeats).await? {
                return Ok(Some(h));
            }
        }
        Ok(None)
    }

    /// `nio_executor_ssh_idle`: the connections kept now.
    fn count_kept(&self) {
        self.metrics.ssh_idle.set(i64::try_from(self.pool.len()).unwrap_or(i64::MAX));
    }

    /// A connection kept from an earlier job to this machine that still answers ([`crate::pool`]).
    async fn kept(&self, job: &Job, identity_name: &str) -> Option<SshHost> {
        if self.pool.is_empty() {
            return None;
        }
        let key = pool::Key::for_job(&job.endpoint, identity_name, crate::ssh::normalise_host_key)?;
        let taken = self.pool.take(&key, Instant::now());
        self.count_kept();
        let host = match taken {
            Ok(h) => h,
            Err(expired) => {
                close_all(expired);
                return None;
            }
        };
        let span = tracing::info_span!(
            "ssh.reuse",
            server.address = %job.endpoint.host,
            server.port = job.endpoint.port,
            nio.outcome = tracing::field::Empty
        );
        let alive = host.alive(KEPT_ALIVE_WITHIN).instrument(span.clone()).await;
        span.record("nio.outcome", if alive { "reused" } else { "dead" });
        if alive {
            return Some(host);
        }
        tracing::debug!(machine = %job.machine, "kept SSH connection no longer answers; connecting anew");
        None
    }

    /// Keeps `host`, a connection that ended a successful job, for the machine's next job.
    fn keep(&self, job: &Job, identity_name: &str, host: SshHost) {
        let key = pool::Key::new(&job.endpoint, identity_name, host.host_key());
        let born = host.opened_at();
        close_all(self.pool.put(key, host, born, Instant::now()));
        self.count_kept();
    }

    /// Closes the kept connections idle for too long, until `stop`; then all of them.
    pub async fn sweep_kept(&self, stop: CancellationToken) {
        if self.pool.sweep_every().is_zero() {
            return stop.cancelled().await;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.pool.sweep_every()) => {}
                _ = stop.cancelled() => break,
            }
            close_all(self.pool.expire(Instant::now()));
            self.count_kept();
        }
        for old in self.pool.drain() {
            old.close().await;
        }
        self.metrics.ssh_idle.set(0);
    }

    async fn connected(&self, site: &str, job: &Job, rep: &Reporter) -> Result<Outcome> {
        let identity_name = job.endpoint.identity.clone().unwrap_or_else(|| crate::ssh::DEFAULT_IDENTITY.to_string());
        let identity = self.identities.get(&identity_name)?;
        let conn = SshConnector {
            exec: self,
            job,
            identity: identity.clone(),
            identity_name: identity_name.clone(),
            kept: std::sync::Mutex::new(None),
        };
        let kept = self.kept(job, &identity_name).await;
        let reused = kept.is_some();
        let host = match kept {
            Some(h) => {
                self.metrics.ssh_reused.get_or_create(&metrics::site(site)).inc();
                h
            }
            None => {
                let waited =
                    self.limits.wait(site).instrument(tracing::info_span!("ratelimit.wait", nio.site = %site)).await;
                if waited > Duration::from_millis(1) {
                    self.metrics.ratelimit_waits.get_or_create(&metrics::site(site)).inc();
                }
                self.metrics.ratelimit_wait.get_or_create(&metrics::site(site)).observe(waited.as_secs_f64());
                let t = Instant::now();
                let span = tracing::info_span!("ssh.connect", server.address = %job.endpoint.host, server.port = job.endpoint.port);
                let host = conn.open(job.endpoint.host_key.as_deref(), false).instrument(span).await?;
                self.metrics.ssh_connect.get_or_create(&metrics::site(site)).observe(t.elapsed().as_secs_f64());
                host
            }
        };
        let seen_key = host.host_key().to_string();
        let ctx = JobRun {
            job,
            cmds: &self.cmds,
            sources: &self.sources,
            seal: self.seal.as_ref(),
            progress: rep,
            quick: Duration::from_secs(120),
            long: self.job_timeout(job),
            kexec_tarball: self.kexec_tarball.as_deref(),
            reboot_timeout: Duration::from_secs(600),
            host_key: Some(seen_key.as_str()),
            reused,
        };
        let result = match job.action {
            Action::Install => actions::run(&conn, &host, &ctx).instrument(tracing::info_span!("install")).await,
            Action::Probe | Action::Scan => {
                actions::run(&conn, &host, &ctx).instrument(tracing::info_span!("probe")).await
            }
            // update spans (activate, health) are children of job.execute
            _ => actions::run(&conn, &host, &ctx).await,
        };
        // A machine left as the job found it or as it asked for keeps a connection for its next job: the one
        // proven after the activation when there was one. Installs reboot (their connections are gone), removals
        // hand the machine away, and failures may have broken the session.
        let keeps = matches!(
            job.action,
            Action::Switch | Action::Boot | Action::Test | Action::DryActivate | Action::Probe | Action::Scan
        ) && result.as_ref().is_ok_and(|o| o.rolled_back.is_none());
        let later = conn.kept.lock().ok().and_then(|mut k| k.take());
        // (closed in the background: a close that hangs on a dead peer is not the job's time)
        match (keeps, later) {
            (true, Some(later)) => {
                close_all([host]);
                self.keep(job, &identity_name, later);
            }
            (true, None) => self.keep(job, &identity_name, host),
            (false, later) => close_all(later.into_iter().chain([host])),
        }
        result.map(|mut o| {
            if o.installed_host_key.is_none() && job.endpoint.host_key.is_none() {
                // Trust on first use: report the key so the controller pins it.
                o.installed_host_key = Some(seen_key);
            }
            o
        })
    }
}

/// Samples the site consumer's pending count into `nio_executor_queue_pending`.
async fn pending_gauge(metrics: Arc<Metrics>, site: String, mut consumer: PullConsumer, stop: CancellationToken) {
    loop {
        if let Ok(info) = consumer.info().await {
            metrics
                .queue_pending
                .get_or_create(&metrics::site(&site))
                .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// What becomes of a job's message once it ran, and how the job is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Finished (succeeded, skipped, or failed and rolled back): acknowledged. `outcome` labels it;
    /// `category` is the rollback's cause, if any.
    Done { outcome: &'static str, category: &'static str },
    /// Stopped by shutdown before it finished: back to the queue at once for another executor.
    Requeue,
    /// A transient failure with deliveries left: redelivered after `delay`.
    Retry { delay: Duration, category: &'static str },
    /// A definite failure, or the last delivery of a transient one: terminated and reported Failed.
    Fail { category: &'static str },
}

impl Settlement {
    /// The acknowledgement that carries it out.
    pub fn ack(&self) -> AckKind {
        match self {
            Settlement::Done { .. } => AckKind::Ack,
            Settlement::Requeue => AckKind::Nak(Some(Duration::from_secs(1))),
            Settlement::Retry { delay, .. } => AckKind::Nak(Some(*delay)),
            Settlement::Fail { .. } => AckKind::Term,
        }
    }

    /// The `outcome` and `category` labels of `nio_executor_jobs_total`.
    pub fn labels(&self) -> (&'static str, &'static str) {
        match *self {
            Settlement::Done { outcome, category } => (outcome, category),
            Settlement::Requeue => ("requeued", "none"),
            Settlement::Retry { category, .. } => ("retried", category),
            Settlement::Fail { category } => ("failed", category),
        }
    }
}

/// Decides the settlement of a job from its outcome and its delivery count (`delivered`, 1 for the first).
/// Transient failures are retried `max_deliver` times in all, after the `backoff` delays (seconds, the last
/// repeating).
fn settle(outcome: &Result<Outcome, Failure>, delivered: i64, max_deliver: i64, backoff: &[u64]) -> Settlement {
    match outcome {
        Ok(o) => {
            let outcome = match (o.skipped, o.rolled_back) {
                (true, _) => "skipped",
                (false, Some(_)) => "rolled_back",
                (false, None) => "succeeded",
            };
            Settlement::Done { outcome, category: o.rolled_back.map_or("none", FailureCategory::as_str) }
        }
        Err(Cancelled) => Settlement::Requeue,
        Err(Stale(outcome)) => Settlement::Done { outcome, category: "none" },
        Err(Failed(e)) if e.is_transient() && delivered < max_deliver => {
            let idx = usize::try_from(delivered.saturating_sub(1)).unwrap_or(0);
            let secs = backoff.get(idx).or(backoff.last()).copied().unwrap_or(5);
            Settlement::Retry { delay: Duration::from_secs(secs), category: e.category().as_str() }
        }
        Err(Failed(e)) => Settlement::Fail { category: e.category().as_str() },
    }
}

/// Why processing stopped.
enum Failure {
    Failed(Error),
    Cancelled,
    /// Not run: the job's message was settled by another delivery (`duplicate`) or replaced (`superseded`).
    Stale(&'static str),
}
use Failure::{Cancelled, Failed, Stale};

/// A job's message on the queue: its subject and stream sequence.
struct Queued {
    subject: String,
    seq: u64,
}

struct SshConnector<'a> {
    exec: &'a Executor,
    job: &'a Job,
    identity: Arc<russh::keys::PrivateKey>,
    identity_name: String,
    /// The connection the job handed back to keep ([`Connector::keep`]).
    kept: std::sync::Mutex<Option<SshHost>>,
}

impl SshConnector<'_> {
    /// Connects to the job's machine expecting `host_key`; `tofu` trusts whatever key it presents (a freshly
    /// booted installer or system whose key is not known yet), whatever the executor's policy.
    async fn open(&self, host_key: Option<&str>, tofu: bool) -> Result<SshHost> {
        let mut opts = self.exec.connect.clone();
        if tofu {
            opts.policy = HostKeyPolicy::Tofu;
        }
        let identity = (self.identity_name.as_str(), self.identity.clone());
        SshHost::connect(&self.job.endpoint, host_key, identity, &opts).await
    }
}

impl Connector for SshConnector<'_> {
    type Host = SshHost;
    async fn connect(&self, host_key: Option<&str>) -> Result<SshHost> {
        self.open(host_key, host_key.is_none()).await
    }

    fn keep(&self, host: SshHost) {
        if let Ok(mut k) = self.kept.lock() {
            // One kept per job: a second (it cannot happen today) replaces the first, which then closes on drop.
            *k = Some(host);
        }
    }
}

/// Publishes status events for one job.
pub struct Reporter {
    exec: Arc<Executor>,
    job: Job,
    started_at: chrono::DateTime<Utc>,
    span: Option<tracing::Span>,
    /// The step last reported: where a job that runs out of time was.
    step: std::sync::Mutex<Step>,
}

/// A stand-in job for reporting about a message whose body could not be decoded: identity from the subject.
fn undecodable_job(s: &subjects::JobSubject) -> Job {
    Job {
        v: nio_shared::protocol::JOB_VERSION,
        id: String::new().into(),
        cluster: s.cluster.clone(),
        namespace: s.namespace.clone(),
        machine: s.machine.clone(),
        configuration: None,
        generation: 0,
        site: s.site.clone(),
        endpoint: nio_shared::protocol::Endpoint {
            host: String::new(),
            port: 22,
            user: String::new(),
            identity: None,
            host_key: None,
        },
        source: None,
        action: if s.kind == JobKind::Probe { Action::Probe } else { Action::Switch },
        files: vec![],
        secrets: vec![],
        secrets_hash: None,
        health_check: None,
        rollback: false,
        confirm_timeout_seconds: 30,
        budgets: vec![],
        timeout_seconds: 0,
        enqueued_at: Utc::now(),
    }
}

/// Closes connections in the background.
fn close_all(hosts: impl IntoIterator<Item = SshHost>) {
    for h in hosts {
        tokio::spawn(h.close());
    }
}

/// How long a kept connection may take to open a channel before the job connects anew.
const KEPT_ALIVE_WITHIN: Duration = Duration::from_secs(2);
/// How long a site's pull request that failed keeps its slots before they ask again.
const PULL_ERROR_PAUSE: Duration = Duration::from_millis(250);
/// How long a progress event is retried while JetStream cannot take it: the job does not wait longer for it.
const STEP_PATIENCE: Duration = Duration::from_secs(10);
/// How long a job's outcome is retried (the job's message kept meanwhile) before the job goes back to the queue.
/// A NATS cluster elects a new stream leader within seconds of losing one.
const OUTCOME_PATIENCE: Duration = Duration::from_secs(120);

impl Reporter {
    fn new(exec: Arc<Executor>, job: Job, span: Option<tracing::Span>) -> Self {
        Reporter { exec, job, started_at: Utc::now(), span, step: std::sync::Mutex::new(Step::Lock) }
    }

    /// An event of this job with nothing but its identity and `phase` filled in.
    fn base(&self, phase: Phase) -> StatusEvent {
        StatusEvent {
            v: STATUS_VERSION,
            job_id: self.job.id.clone(),
            cluster: self.job.cluster.clone(),
            namespace: self.job.namespace.clone(),
            machine: self.job.machine.clone(),
            configuration: self.job.configuration.clone(),
            generation: self.job.generation,
            action: self.job.action,
            phase,
            step: None,
            category: None,
            commit: self.job.source.as_ref().map(|s| s.commit.clone()),
            system: None,
            booted_system: None,
            boot_id: None,
            host_key: None,
            nixos_version: None,
            facts: None,
            message: None,
            log_tail: vec![],
            executor: self.exec.id.clone(),
            started_at: self.started_at,
            at: Utc::now(),
        }
    }

    /// The step last reported.
    fn current_step(&self) -> Step {
        self.step.lock().map_or(Step::Lock, |s| *s)
    }

    async fn event(&self, phase: Phase, step: Option<Step>, category: Option<FailureCategory>, message: String) {
        if let (Some(s), Ok(mut last)) = (step, self.step.lock()) {
            *last = s;
        }
        let ev = StatusEvent { step, category, message: Some(message).filter(|m| !m.is_empty()), ..self.base(phase) };
        self.publish(ev, STEP_PATIENCE).await;
    }

    /// Publishes `ev`, retrying for up to `patience` while JetStream cannot take it (a member lost, a leader
    /// being elected); each event has its own `Nats-Msg-Id`, so a retry of one that did arrive is dropped by
    /// the stream. Whether it was stored.
    async fn publish(&self, ev: StatusEvent, patience: Duration) -> bool {
        let span = tracing::info_span!(parent: self.span.as_ref().and_then(|s| s.id()), "status.publish", otel.kind = "producer", nio.phase = ?ev.phase);
        let mut headers = async_nats::HeaderMap::new();
        {
            let _e = span.enter();
            nio_shared::telemetry::inject(&mut headers);
        }
        headers.insert("Nats-Msg-Id", ev.message_id().as_str());
        ev.describe(&mut headers);
        let (subject, payload) = (ev.subject(), Bytes::from(ev.encode()));
        let sent = nio_shared::nats::retry_within("status event", patience, || async {
            let ack = self.exec.js.publish_with_headers(subject.clone(), headers.clone(), payload.clone()).await?;
            Ok(ack.await.map(|_| ())?)
        })
        .instrument(span)
        .await;
        if let Err(e) = &sent {
            self.exec.metrics.status_publish_errors.inc();
            tracing::error!(machine = %ev.machine, error = %e, "publishing a status event failed");
        }
        sent.is_ok()
    }

    /// Reports the outcome; whether it was stored.
    async fn finish_ok(&self, o: Outcome) -> bool {
        let phase = if o.skipped {
            Phase::Skipped
        } else if o.rolled_back.is_some() {
            Phase::RolledBack
        } else {
            Phase::Succeeded
        };
        let base = self.base(phase);
        let ev = StatusEvent {
            step: o.rolled_back.map(|_| Step::Rollback),
            category: o.rolled_back,
            commit: o.commit.or(base.commit.clone()),
            system: o.system,
            booted_system: o.booted_system,
            boot_id: o.boot_id,
            host_key: o.installed_host_key,
            nixos_version: o.nixos_version,
            facts: o.facts,
            message: Some(o.message).filter(|m| !m.is_empty()),
            log_tail: o.log_tail,
            ..base
        };
        self.publish(ev, OUTCOME_PATIENCE).await
    }

    /// Reports the failure; whether it was stored.
    async fn finish_failed(
        &self,
        step: Step,
        category: FailureCategory,
        message: String,
        log_tail: Vec<String>,
    ) -> bool {
        let ev = StatusEvent {
            step: Some(step),
            category: Some(category),
            message: Some(message),
            log_tail,
            ..self.base(Phase::Failed)
        };
        self.publish(ev, OUTCOME_PATIENCE).await
    }
}

impl Progress for Reporter {
    async fn step(&self, step: Step, message: String) {
        self.event(Phase::Step, Some(step), None, message).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(e: Error) -> Result<Outcome, Failure> {
        Err(Failed(e))
    }

    /// (case, outcome, delivery, settlement, ack)
    type Case = (&'static str, Result<Outcome, Failure>, i64, Settlement, AckKind);

    #[test]
    fn outcomes_settle_into_ack_requeue_retry_or_term() {
        let backoff = [5, 15, 60];
        let ok = |skipped, rolled_back| Ok(Outcome { skipped, rolled_back, ..Default::default() });
        let cases: Vec<Case> = vec![
            (
                "succeeded",
                ok(false, None),
                1,
                Settlement::Done { outcome: "succeeded", category: "none" },
                AckKind::Ack,
            ),
            ("skipped", ok(true, None), 1, Settlement::Done { outcome: "skipped", category: "none" }, AckKind::Ack),
            (
                "rolled back after a failed health check: finished, not retried",
                ok(false, Some(FailureCategory::HealthCheckFailed)),
                1,
                Settlement::Done { outcome: "rolled_back", category: "HealthCheckFailed" },
                AckKind::Ack,
            ),
            (
                "shutdown: back to the queue at once",
                Err(Cancelled),
                1,
                Settlement::Requeue,
                AckKind::Nak(Some(Duration::from_secs(1))),
            ),
            (
                "unreachable, first delivery: first backoff",
                failed(Error::Unreachable("refused".into())),
                1,
                Settlement::Retry { delay: Duration::from_secs(5), category: "Unreachable" },
                AckKind::Nak(Some(Duration::from_secs(5))),
            ),
            (
                "busy lock, third delivery: third backoff",
                failed(Error::LockBusy),
                3,
                Settlement::Retry { delay: Duration::from_secs(60), category: "Internal" },
                AckKind::Nak(Some(Duration::from_secs(60))),
            ),
            (
                "past the listed delays: the last one repeats",
                failed(Error::session("exec", russh::Error::Disconnect)),
                4,
                Settlement::Retry { delay: Duration::from_secs(60), category: "Unreachable" },
                AckKind::Nak(Some(Duration::from_secs(60))),
            ),
            (
                "transient on the last delivery: failed for good",
                failed(Error::Unreachable("refused".into())),
                5,
                Settlement::Fail { category: "Unreachable" },
                AckKind::Term,
            ),
            (
                "a wrong host key is never retried",
                failed(Error::HostKeyMismatch { expected: "a".into(), seen: "b".into() }),
                1,
                Settlement::Fail { category: "HostKeyMismatch" },
                AckKind::Term,
            ),
            (
                "an invalid job is never retried",
                failed(Error::InvalidJob("bad attr".into())),
                1,
                Settlement::Fail { category: "InvalidJob" },
                AckKind::Term,
            ),
        ];
        for (name, outcome, delivered, want, ack) in cases {
            let got = settle(&outcome, delivered, 5, &backoff);
            assert_eq!(got, want, "{name}");
            assert_eq!(format!("{:?}", got.ack()), format!("{ack:?}"), "{name}");
        }
        assert_eq!(
            settle(&failed(Error::Unreachable("x".into())), 1, 5, &[]),
            Settlement::Retry { delay: Duration::from_secs(5), category: "Unreachable" },
            "no delays configured: 5 s"
        );
        assert_eq!(Settlement::Requeue.labels(), ("requeued", "none"));
        assert_eq!(Settlement::Fail { category: "Unreachable" }.labels(), ("failed", "Unreachable"));
    }
}
