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
    /// Whether `/readyz` answers 200, and the body that says why (e.g. "leading", "standby").
    pub ready: Arc<dyn Fn() -> (bool, String) + Send + Sync>,
}

fn router(p: Probes) -> axum::Router {
    let Probes { metrics, ready } = p;
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
                let (ok, text) = ready();
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
