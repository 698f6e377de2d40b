//! `/metrics`, `/healthz` and `/readyz`, served the same way by the controller and the executor.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// What the endpoints report.
#[derive(Clone)]
pub struct Probes {
    /// The OpenMetrics text for `/metrics`.
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// While it waits for something (e.g. NATS), `/readyz` answers 503 "starting: …" whatever `ready` says.
    pub startup: Startup,
    /// Once started: whether `/readyz` answers 200, and the body that says why (e.g. "leading", "standby").
    pub ready: Arc<dyn Fn() -> (bool, String) + Send + Sync>,
}

impl Probes {
    /// The endpoints of a process that starts by `stage` (see [`Startup`]; `probes.startup` moves it on).
    pub fn new(
        stage: &'static str,
        metrics: impl Fn() -> String + Send + Sync + 'static,
        ready: impl Fn() -> (bool, String) + Send + Sync + 'static,
    ) -> Self {
        Probes { metrics: Arc::new(metrics), startup: Startup::new(stage), ready: Arc::new(ready) }
    }
}

/// What a starting process is still waiting for. The endpoints are served from the first moment, so `/healthz`
/// answers while the process waits (a liveness probe must not restart a process that waits for NATS to come
/// back) and `/readyz` says what it waits for.
#[derive(Clone, Debug)]
pub struct Startup(Arc<std::sync::Mutex<Option<&'static str>>>);

impl Startup {
    /// A process that starts by `stage`, e.g. "connecting to NATS".
    pub fn new(stage: &'static str) -> Self {
        Startup(Arc::new(std::sync::Mutex::new(Some(stage))))
    }

    /// The process goes on to `stage`.
    pub fn stage(&self, stage: &'static str) {
        self.set(Some(stage));
    }

    /// The process has started: `/readyz` now reports its own readiness.
    pub fn done(&self) {
        self.set(None);
    }

    /// "starting: <stage>" while the process starts; None once it has.
    pub fn waiting(&self) -> Option<String> {
        let stage = *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        stage.map(|s| format!("starting: {s}"))
    }

    fn set(&self, stage: Option<&'static str>) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = stage;
    }
}

fn router(p: Probes) -> axum::Router {
    let Probes { metrics, startup, ready } = p;
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = metrics();
                async move { ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let (ok, text) = startup.waiting().map_or_else(|| ready(), |w| (false, w));
                let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                async move { (code, text).into_response() }
            }),
        )
}

/// Serves the endpoints on `metrics_addr`, and on `health_addr` too when it is another address (a kubelet probe
/// port apart from the scrape port), until the process ends. Returns the bound addresses.
pub async fn serve(
    metrics_addr: Option<SocketAddr>,
    health_addr: Option<SocketAddr>,
    probes: Probes,
) -> std::io::Result<Vec<SocketAddr>> {
    let mut bound = Vec::new();
    for addr in [metrics_addr, health_addr.filter(|h| Some(*h) != metrics_addr)].into_iter().flatten() {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
        bound.push(listener.local_addr()?);
        let app = router(probes.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }
    if !bound.is_empty() {
        tracing::info!(?bound, "serving /metrics, /healthz, /readyz");
    }
    Ok(bound)
}

/// This machine's host name (for identities), or `fallback`.
pub fn hostname(fallback: &str) -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| fallback.to_string())
}
