//! Push webhooks from Git hosts (GitHub, GitLab, Gitea, Forgejo, and a generic JSON form): a verified push to
//! repository R, branch or tag B refreshes exactly the NixosConfigurations whose `gitRepo` is R and whose `ref`
//! is B, by setting their `nixos.infra/refresh` annotation (the same path as a human's refresh).
//!
//! The payload is trusted for nothing but *which* configurations to refresh: the commit is always resolved from
//! Git by the reconcile, never taken from the request. Checks, in order: rate (429), size (413), signature
//! (401: HMAC-SHA256 of the body with the shared secret; GitLab's token), delivery id (400 without one; a
//! delivery seen within the replay window changes nothing). Every replica serves the webhook: the annotation
//! is written through the API, and whichever replica leads reconciles it (a standby answers like the leader).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{KeyInit, Mac};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use nio_shared::crd::{NixosConfiguration, REFRESH_ANNOTATION, REFRESH_TRACE_ANNOTATION};
use serde_json::{Value, json};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::{DeliveryLabels, Metrics};

/// The path deliveries are posted to.
pub const PATH: &str = "/hooks/git";

/// How the webhook is served.
#[derive(Debug, Clone)]
pub struct Settings {
    pub addr: SocketAddr,
    /// The shared secret (HMAC key; GitLab's token).
    pub secret: Vec<u8>,
    /// Largest body accepted.
    pub max_body: usize,
    /// Deliveries accepted per second (bursts of twice as many).
    pub per_second: NonZeroU32,
    /// How long a delivery id is remembered.
    pub replay_window: Duration,
}

impl Settings {
    /// Defaults for `addr` and `secret`: 1 MiB bodies, 20 deliveries a second, ids remembered for a day.
    pub fn new(addr: SocketAddr, secret: Vec<u8>) -> Self {
        Settings {
            addr,
            secret,
            max_body: 1 << 20,
            per_second: NonZeroU32::MIN.saturating_add(19),
            replay_window: Duration::from_secs(24 * 3600),
        }
    }
}

/// Who sent a delivery, from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    GitHub,
    GitLab,
    Gitea,
    Forgejo,
    Generic,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::GitHub => "github",
            Provider::GitLab => "gitlab",
            Provider::Gitea => "gitea",
            Provider::Forgejo => "forgejo",
            Provider::Generic => "generic",
        }
    }

    /// Forgejo also sends Gitea's headers, so it is asked first.
    pub fn detect(h: &HeaderMap) -> Provider {
        if h.contains_key("x-forgejo-event") {
            Provider::Forgejo
        } else if h.contains_key("x-gitea-event") {
            Provider::Gitea
        } else if h.contains_key("x-github-event") {
            Provider::GitHub
        } else if h.contains_key("x-gitlab-event") {
            Provider::GitLab
        } else {
            Provider::Generic
        }
    }

    fn headers(self) -> (&'static str, &'static str) {
        // (event, delivery id)
        match self {
            Provider::GitHub => ("x-github-event", "x-github-delivery"),
            Provider::GitLab => ("x-gitlab-event", "x-gitlab-event-uuid"),
            Provider::Gitea => ("x-gitea-event", "x-gitea-delivery"),
            Provider::Forgejo => ("x-forgejo-event", "x-forgejo-delivery"),
            Provider::Generic => ("x-nio-event", "x-nio-delivery"),
        }
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Whether `sig_hex` is the HMAC-SHA256 of `body` under `secret` (compared in constant time).
fn hmac_ok(secret: &[u8], body: &[u8], sig_hex: &str) -> bool {
    let Ok(sig) = hex::decode(sig_hex) else { return false };
    let Ok(mut mac) = HmacSha256::new_from_slice(secret) else { return false };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// Checks the delivery's signature (or GitLab's token) against `secret`.
pub fn verify(p: Provider, h: &HeaderMap, body: &[u8], secret: &[u8]) -> Result<(), &'static str> {
    let prefixed = |name: &str| header(h, name).and_then(|s| s.strip_prefix("sha256="));
    let ok = match p {
        Provider::GitHub => prefixed("x-hub-signature-256").is_some_and(|s| hmac_ok(secret, body, s)),
        Provider::Generic => prefixed("x-nio-signature-256").is_some_and(|s| hmac_ok(secret, body, s)),
        Provider::Gitea => header(h, "x-gitea-signature").is_some_and(|s| hmac_ok(secret, body, s)),
        Provider::Forgejo => header(h, "x-forgejo-signature").is_some_and(|s| hmac_ok(secret, body, s)),
        // GitLab sends the secret itself: compare keyed digests, so the comparison leaks nothing about it.
        Provider::GitLab => header(h, "x-gitlab-token").is_some_and(|t| {
            let digest = |v: &[u8]| HmacSha256::new_from_slice(b"nio-gitlab-token").map(|m| m.chain_update(v));
            match (digest(t.as_bytes()), digest(secret)) {
                (Ok(a), Ok(b)) => a.verify_slice(&b.finalize().into_bytes()).is_ok(),
                _ => false,
            }
        }),
    };
    if ok { Ok(()) } else { Err("signature missing or wrong") }
}

/// A push: which repository (every URL form the host gave) and which ref.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub repos: Vec<String>,
    pub git_ref: String,
}

/// The push in a verified body; None for other events (ping, issues, …); an error says what is wrong with it.
pub fn parse(p: Provider, h: &HeaderMap, body: &[u8]) -> Result<Option<Push>, String> {
    let event = header(h, p.headers().0).unwrap_or("push");
    let is_push = match p {
        Provider::GitLab => matches!(event, "Push Hook" | "Tag Push Hook"),
        _ => event == "push",
    };
    if !is_push {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let git_ref = v["ref"].as_str().ok_or("no \"ref\"")?.to_string();
    let fields: &[&str] = match p {
        Provider::GitLab => &["/project/git_http_url", "/project/git_ssh_url", "/project/web_url", "/repository/url"],
        Provider::Generic => &["/repository"],
        _ => &["/repository/clone_url", "/repository/ssh_url", "/repository/html_url", "/repository/git_url"],
    };
    let repos: Vec<String> = fields.iter().filter_map(|f| v.pointer(f)?.as_str()).filter_map(repo_key).collect();
    if repos.is_empty() {
        return Err("no repository URL".into());
    }
    Ok(Some(Push { repos, git_ref }))
}

/// A repository URL reduced to what identifies the repository: lowercase `host/path` without user, port,
/// scheme or `.git` (https, ssh and scp-like `git@host:path` forms of one repository agree); `file` URLs keep
/// their path.
pub fn repo_key(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let (host, path) = if raw.contains("://") {
        let u = url::Url::parse(raw).ok()?;
        (u.host_str().unwrap_or("").to_string(), u.path().to_string())
    } else {
        // scp-like: [user@]host:path
        let (left, path) = raw.split_once(':')?;
        let host = left.rsplit('@').next()?;
        (host.to_string(), path.to_string())
    };
    let path = path.trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path).trim_end_matches('/');
    if path.is_empty() {
        return None;
    }
    Some(format!("{}/{}", host.to_lowercase(), path.to_lowercase()))
}

/// Whether a configuration following `wanted` (a branch, a tag, or a full ref) follows `pushed` (a full ref).
pub fn ref_matches(wanted: &str, pushed: &str) -> bool {
    wanted == pushed
        || pushed.strip_prefix("refs/heads/") == Some(wanted)
        || pushed.strip_prefix("refs/tags/") == Some(wanted)
}

/// Delivery ids seen within a window (at most `cap` of them; the oldest are forgotten first).
#[derive(Debug)]
pub struct Replays {
    window: Duration,
    cap: usize,
    seen: Mutex<Seen>,
}

/// When each id was remembered, and the ids in that order.
type Seen = (HashMap<String, Instant>, VecDeque<(Instant, String)>);

impl Replays {
    pub fn new(window: Duration, cap: usize) -> Self {
        Replays { window, cap, seen: Mutex::default() }
    }

    /// Whether `id` was remembered within the window.
    pub fn seen(&self, id: &str, now: Instant) -> bool {
        self.seen.lock().map(|s| s.0.get(id).is_some_and(|t| now.duration_since(*t) < self.window)).unwrap_or(false)
    }

    /// Remembers `id` (once it was handled).
    pub fn remember(&self, id: &str, now: Instant) {
        let Ok(mut s) = self.seen.lock() else { return };
        let (map, order) = &mut *s;
        while let Some((t, old)) = order.front() {
            if now.duration_since(*t) < self.window && map.len() < self.cap {
                break;
            }
            if map.get(old) == Some(t) {
                map.remove(old);
            }
            order.pop_front();
        }
        map.insert(id.to_string(), now);
        order.push_back((now, id.to_string()));
    }
}

struct Hook {
    settings: Settings,
    client: kube::Client,
    namespaces: Vec<String>,
    metrics: Arc<Metrics>,
    replays: Replays,
    limiter: governor::DefaultDirectRateLimiter,
}

/// Serves the webhook on `settings.addr` until the process ends; returns the bound address.
pub async fn serve(
    settings: Settings,
    client: kube::Client,
    namespaces: Vec<String>,
    metrics: Arc<Metrics>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding the webhook to {}: {e}", settings.addr)))?;
    let bound = listener.local_addr()?;
    let quota = governor::Quota::per_second(settings.per_second)
        .allow_burst(settings.per_second.saturating_mul(NonZeroU32::MIN.saturating_add(1)));
    let hook = Arc::new(Hook {
        replays: Replays::new(settings.replay_window, 100_000),
        limiter: governor::RateLimiter::direct(quota),
        settings,
        client,
        namespaces,
        metrics,
    });
    let app = axum::Router::new().route(PATH, axum::routing::post(deliver)).with_state(hook);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the webhook server stopped");
        }
    });
    tracing::info!(%bound, path = PATH, "serving Git push webhooks");
    Ok(bound)
}

/// Most of an oversize body read and dropped before its 413 goes out, and for how long. Answering while the
/// sender still writes closes the connection under it, and the sender sees a reset instead of the answer (GitHub's
/// delivery log would say "connection reset", not why). Deliveries are capped at 25 MB by GitHub; a body declared
/// larger than this is refused at once.
const DRAIN_MAX: usize = 32 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// The body, if it is at most `limit` bytes; else None, once the rest was read and dropped (up to [`DRAIN_MAX`]
/// in all, within [`DRAIN_TIME`]) so the sender gets to read the refusal.
async fn read_limited(body: Body, limit: usize) -> Option<bytes::Bytes> {
    use futures::StreamExt;
    let mut chunks = body.into_data_stream();
    let mut kept = bytes::BytesMut::new();
    let mut seen = 0usize;
    let read = async {
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.ok()?;
            seen = seen.saturating_add(chunk.len());
            if seen <= limit {
                kept.extend_from_slice(&chunk);
            } else if seen > DRAIN_MAX {
                return None;
            }
        }
        Some(())
    };
    tokio::time::timeout(DRAIN_TIME, read).await.ok().flatten()?;
    (seen <= limit).then(|| kept.freeze())
}

fn answer(code: StatusCode, body: Value) -> Response {
    (code, axum::Json(body)).into_response()
}

async fn deliver(State(hook): State<Arc<Hook>>, headers: HeaderMap, body: Body) -> Response {
    let provider = Provider::detect(&headers);
    let span = tracing::info_span!(
        "webhook.delivery",
        otel.kind = "server",
        nio.provider = provider.as_str(),
        nio.outcome = tracing::field::Empty,
        nio.refreshed = tracing::field::Empty,
    );
    let (outcome, response) = handle(&hook, provider, &headers, body).instrument(span.clone()).await;
    span.record("nio.outcome", outcome);
    hook.metrics
        .webhook_deliveries
        .get_or_create(&DeliveryLabels { provider: provider.as_str().into(), outcome: outcome.into() })
        .inc();
    response
}

async fn handle(hook: &Hook, provider: Provider, headers: &HeaderMap, body: Body) -> (&'static str, Response) {
    if hook.limiter.check().is_err() {
        return ("rate_limited", answer(StatusCode::TOO_MANY_REQUESTS, json!({"error": "too many deliveries"})));
    }
    let limit = hook.settings.max_body;
    let too_large =
        || ("too_large", answer(StatusCode::PAYLOAD_TOO_LARGE, json!({"error": format!("over {limit} bytes")})));
    let declared = header(headers, "content-length").and_then(|l| l.parse::<usize>().ok());
    if declared.is_some_and(|l| l > DRAIN_MAX) {
        return too_large();
    }
    let Some(body) = read_limited(body, limit).await else { return too_large() };
    if let Err(why) = verify(provider, headers, &body, &hook.settings.secret) {
        tracing::warn!(provider = provider.as_str(), why, "refused a webhook delivery");
        return ("unauthorized", answer(StatusCode::UNAUTHORIZED, json!({"error": why})));
    }
    let Some(delivery) = header(headers, provider.headers().1).filter(|d| !d.is_empty() && d.len() <= 128) else {
        let error = format!("{} (1 to 128 characters) is required", provider.headers().1);
        return ("bad_request", answer(StatusCode::BAD_REQUEST, json!({ "error": error })));
    };
    let id = format!("{}:{delivery}", provider.as_str());
    if hook.replays.seen(&id, Instant::now()) {
        return ("duplicate", answer(StatusCode::OK, json!({"delivery": id, "duplicate": true, "refreshed": []})));
    }
    let push = match parse(provider, headers, &body) {
        Ok(Some(p)) => p,
        Ok(None) => {
            hook.replays.remember(&id, Instant::now());
            return ("ignored", answer(StatusCode::OK, json!({"delivery": id, "ignored": "not a push"})));
        }
        Err(e) => return ("bad_request", answer(StatusCode::BAD_REQUEST, json!({ "error": e }))),
    };
    match refresh(hook, &push, &id).await {
        Ok(refreshed) => {
            hook.replays.remember(&id, Instant::now());
            tracing::Span::current().record("nio.refreshed", refreshed.len());
            // A log line names a few configurations, however many a push refreshed (the answer names them all).
            let named: Vec<&String> = refreshed.iter().take(5).collect();
            let refreshed_n = refreshed.len();
            tracing::info!(delivery = %id, git_ref = %push.git_ref, refreshed = refreshed_n, first = ?named, "push delivery handled");
            let outcome = if refreshed.is_empty() { "no_match" } else { "refreshed" };
            let code = if refreshed.is_empty() { StatusCode::OK } else { StatusCode::ACCEPTED };
            (outcome, answer(code, json!({"delivery": id, "refreshed": refreshed})))
        }
        Err(e) => {
            tracing::error!(delivery = %id, error = %e, "refreshing configurations for a push failed");
            ("error", answer(StatusCode::SERVICE_UNAVAILABLE, json!({"error": "cannot reach the Kubernetes API"})))
        }
    }
}

/// Sets the refresh annotation (the delivery id) and the delivery's trace context on every configuration that
/// follows the pushed repository and ref; returns their `namespace/name`.
async fn refresh(hook: &Hook, push: &Push, id: &str) -> Result<Vec<String>, kube::Error> {
    let apis: Vec<Api<NixosConfiguration>> = if hook.namespaces.is_empty() {
        vec![Api::all(hook.client.clone())]
    } else {
        hook.namespaces.iter().map(|ns| Api::namespaced(hook.client.clone(), ns)).collect()
    };
    let mut traceparent = async_nats::HeaderMap::new();
    nio_shared::telemetry::inject_context(&tracing::Span::current().context(), &mut traceparent);
    let traceparent = traceparent.get("traceparent").map(|v| v.as_str().to_string());
    let mut refreshed = Vec::new();
    for api in apis {
        for cfg in api.list(&ListParams::default()).await? {
            let follows = repo_key(&cfg.spec.git_repo).is_some_and(|k| push.repos.contains(&k))
                && ref_matches(&cfg.spec.git_ref, &push.git_ref);
            if !follows {
                continue;
            }
            let ns = cfg.namespace().unwrap_or_default();
            let patch =
                json!({"metadata": {"annotations": {REFRESH_ANNOTATION: id, REFRESH_TRACE_ANNOTATION: traceparent}}});
            Api::<NixosConfiguration>::namespaced(hook.client.clone(), &ns)
                .patch(&cfg.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            refreshed.push(format!("{ns}/{}", cfg.name_any()));
        }
    }
    Ok(refreshed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    /// A body sent in `n` chunks of `size` bytes, counting the chunks read.
    fn chunked(n: usize, size: usize, read: Arc<std::sync::atomic::AtomicUsize>) -> Body {
        use futures::StreamExt;
        let chunks = futures::stream::iter(0..n).map(move |_| {
            read.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; size]))
        });
        Body::from_stream(chunks)
    }

    #[tokio::test]
    async fn an_oversize_body_is_read_to_its_end_before_it_is_refused() {
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let body = read_limited(chunked(4, 1000, read.clone()), 4000).await;
        assert_eq!(body.map(|b| b.len()), Some(4000), "at the limit: kept whole");
        read.store(0, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(read_limited(chunked(40, 1000, read.clone()), 4000).await, None, "over the limit");
        assert_eq!(read.load(std::sync::atomic::Ordering::SeqCst), 40, "read to its end, so the sender reads the 413");
        read.store(0, std::sync::atomic::Ordering::SeqCst);
        let huge = read_limited(chunked(DRAIN_MAX / (1 << 20) + 8, 1 << 20, read.clone()), 4000).await;
        assert_eq!(huge, None);
        let chunks = read.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(chunks, DRAIN_MAX / (1 << 20) + 1, "no more than DRAIN_MAX is read");
    }

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(secret).unwrap();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn repository_urls_of_one_repository_agree_in_every_form() {
        let same = [
            "https://github.com/Example/Fleet.git",
            "https://github.com/example/fleet",
            "https://user:token@GitHub.com:443/example/fleet.git/",
            "ssh://git@github.com:22/example/fleet.git",
            "git@github.com:example/fleet.git",
            "github.com:example/fleet",
            "git://github.com/example/fleet.git",
        ];
        for u in same {
            assert_eq!(repo_key(u).as_deref(), Some("github.com/example/fleet"), "{u}");
        }
        assert_eq!(repo_key("file:///srv/git/fleet.git").as_deref(), Some("/srv/git/fleet"));
        assert_ne!(repo_key("https://github.com/example/fleet-2"), repo_key("https://github.com/example/fleet"));
        assert_ne!(repo_key("https://gitlab.com/example/fleet"), repo_key("https://github.com/example/fleet"));
        assert_eq!(repo_key("https://github.com/"), None);
        assert_eq!(repo_key("not a url"), None);
    }

    #[test]
    fn refs_match_by_branch_tag_or_full_name_and_never_by_prefix() {
        for (wanted, pushed, matches) in [
            ("main", "refs/heads/main", true),
            ("refs/heads/main", "refs/heads/main", true),
            ("v1.2", "refs/tags/v1.2", true),
            ("main", "refs/heads/main-2", false),
            ("main", "refs/tags/main-x", false),
            ("heads/main", "refs/heads/main", false),
            ("4bbd834c936c7c992f2727805e2ff68f3e00ce57", "refs/heads/main", false),
        ] {
            assert_eq!(ref_matches(wanted, pushed), matches, "{wanted} vs {pushed}");
        }
    }

    #[test]
    fn signatures_are_checked_per_provider() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let secret = b"s3cret";
        let good = sign(secret, body);
        let bad = sign(b"other", body);
        let cases: Vec<(HeaderMap, bool)> = vec![
            (headers(&[("x-github-event", "push"), ("x-hub-signature-256", &format!("sha256={good}"))]), true),
            (headers(&[("x-github-event", "push"), ("x-hub-signature-256", &format!("sha256={bad}"))]), false),
            (headers(&[("x-github-event", "push"), ("x-hub-signature-256", &good)]), false),
            (headers(&[("x-github-event", "push")]), false),
            (headers(&[("x-gitea-event", "push"), ("x-gitea-signature", &good)]), true),
            (headers(&[("x-gitea-event", "push"), ("x-gitea-signature", "zz")]), false),
            (headers(&[("x-forgejo-event", "push"), ("x-gitea-event", "push"), ("x-forgejo-signature", &good)]), true),
            (headers(&[("x-forgejo-event", "push"), ("x-gitea-signature", &good)]), false),
            (headers(&[("x-gitlab-event", "Push Hook"), ("x-gitlab-token", "s3cret")]), true),
            (headers(&[("x-gitlab-event", "Push Hook"), ("x-gitlab-token", "s3cret ")]), true),
            (headers(&[("x-gitlab-event", "Push Hook"), ("x-gitlab-token", "s3cre")]), false),
            (headers(&[("x-nio-signature-256", &format!("sha256={good}"))]), true),
            (headers(&[]), false),
        ];
        for (i, (h, ok)) in cases.into_iter().enumerate() {
            let p = Provider::detect(&h);
            assert_eq!(verify(p, &h, body, secret).is_ok(), ok, "case {i}: {p:?} {h:?}");
        }
    }

    #[test]
    fn pushes_are_read_from_each_providers_payload_and_other_events_are_not_pushes() {
        let gh = json!({"ref": "refs/heads/main", "repository": {"clone_url": "https://github.com/ex/fleet.git", "ssh_url": "git@github.com:ex/fleet.git"}});
        let gl =
            json!({"ref": "refs/tags/v1", "project": {"git_http_url": "https://gitlab.example.org/ops/fleet.git"}});
        let generic = json!({"ref": "refs/heads/prod", "repository": "ssh://git@git.example.org/ops/fleet.git"});
        let body = |v: &Value| serde_json::to_vec(v).unwrap();
        let p = parse(Provider::GitHub, &headers(&[("x-github-event", "push")]), &body(&gh)).unwrap().unwrap();
        assert_eq!(p.git_ref, "refs/heads/main");
        assert_eq!(p.repos, ["github.com/ex/fleet", "github.com/ex/fleet"]);
        let p = parse(Provider::GitLab, &headers(&[("x-gitlab-event", "Tag Push Hook")]), &body(&gl)).unwrap().unwrap();
        assert_eq!((p.git_ref.as_str(), p.repos[0].as_str()), ("refs/tags/v1", "gitlab.example.org/ops/fleet"));
        let p = parse(Provider::Generic, &headers(&[]), &body(&generic)).unwrap().unwrap();
        assert_eq!(p.repos, ["git.example.org/ops/fleet"]);
        assert_eq!(parse(Provider::GitHub, &headers(&[("x-github-event", "ping")]), &body(&gh)), Ok(None));
        assert_eq!(parse(Provider::GitLab, &headers(&[("x-gitlab-event", "Issue Hook")]), &body(&gl)), Ok(None));
        assert!(parse(Provider::Gitea, &headers(&[("x-gitea-event", "push")]), b"{not json").is_err());
        assert!(parse(Provider::Gitea, &headers(&[("x-gitea-event", "push")]), br#"{"ref":"refs/heads/x"}"#).is_err());
    }

    /// Deliveries over the rate are refused with 429 before anything else is looked at.
    #[tokio::test]
    async fn deliveries_over_the_rate_are_refused_with_429() {
        let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut settings = Settings::new(addr, b"0123456789abcdef".to_vec());
        settings.per_second = NonZeroU32::MIN; // 1 a second, bursts of 2
        // Never contacted: every delivery here is refused before the API would be.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let bound = serve(settings, client, vec![], Arc::new(Metrics::new("test"))).await.unwrap();
        let http = reqwest::Client::new();
        let mut codes = Vec::new();
        for _ in 0..3 {
            let r = http.post(format!("http://{bound}{PATH}")).header("x-github-event", "push").body("{}").send();
            codes.push(r.await.unwrap().status().as_u16());
        }
        assert_eq!(codes, [401, 401, 429]);
    }

    /// A sender that writes a whole oversize body before reading (as Git hosts do) reads the 413: the
    /// connection is not closed under it while it writes.
    #[tokio::test]
    async fn a_sender_still_writing_an_oversize_body_reads_its_413() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let settings = Settings::new(([127, 0, 0, 1], 0).into(), b"0123456789abcdef".to_vec());
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let bound = serve(settings, client, vec![], Arc::new(Metrics::new("test"))).await.unwrap();
        let mut conn = tokio::net::TcpStream::connect(bound).await.unwrap();
        let size = 4 << 20;
        let head = format!(
            "POST {PATH} HTTP/1.1\r\nhost: nio\r\nx-github-event: push\r\ncontent-type: application/json\r\ncontent-length: {size}\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b' '; 64 << 10];
        for i in 0..size / chunk.len() {
            if i % 8 == 0 {
                // The server has seen the head and may answer meanwhile.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            conn.write_all(&chunk).await.unwrap_or_else(|e| panic!("writing the body, chunk {i}: {e}"));
        }
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("bytes\"}") {
            let n = conn.read(&mut buf).await.unwrap_or_else(|e| panic!("reading the answer: {e}"));
            assert!(n > 0, "closed before the answer: {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("over 1048576 bytes"), "{answer}");
    }

    #[test]
    fn delivery_ids_are_remembered_for_the_window_and_the_oldest_go_first_at_the_cap() {
        let r = Replays::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        r.remember("a", t0);
        assert!(r.seen("a", t0 + Duration::from_secs(59)));
        assert!(!r.seen("a", t0 + Duration::from_secs(60)), "forgotten after the window");
        assert!(!r.seen("b", t0));
        for (i, id) in ["b", "c", "d"].into_iter().enumerate() {
            r.remember(id, t0 + Duration::from_secs(i as u64 + 1));
        }
        let now = t0 + Duration::from_secs(10);
        assert!(!r.seen("a", now), "the oldest went at the cap");
        assert!(r.seen("b", now) && r.seen("c", now) && r.seen("d", now));
    }
}
