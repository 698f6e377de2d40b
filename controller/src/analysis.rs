//! Wave analyses: while a wave soaks, its PromQL query is run against the controller's Prometheus
//! (`--prometheus-url`) every `interval`, and each measurement is recorded in the wave's status; the pure
//! [`crate::waves::decide`] then fails the wave past its `failureLimit`. Only the controller's own Prometheus is
//! queried: a configuration names the query, never the server (whoever writes configurations must not make the
//! controller fetch URLs of their choosing).

use chrono::{DateTime, Utc};
use nio_shared::crd::{AnalysisStatus, WaveState, WaveStatus};

use crate::conditions::time;
use crate::waves::{Analysis, Wave};

/// How long one query may take.
const QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where and how to query.
#[derive(Clone)]
pub struct Prometheus {
    pub base: Option<url::Url>,
    pub http: reqwest::Client,
}

impl Prometheus {
    pub fn new(base: Option<url::Url>) -> Self {
        Prometheus { base, http: reqwest::Client::new() }
    }

    /// One instant query's sample values.
    async fn samples(&self, query: &str) -> Result<Vec<f64>, String> {
        let base = self.base.as_ref().ok_or("the controller has no --prometheus-url to run analyses against")?;
        let url = base.join("api/v1/query").map_err(|e| format!("{base}: {e}"))?;
        let resp = self
            .http
            .get(url)
            .query(&[("query", query)])
            .timeout(QUERY_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("querying Prometheus: {e}"))?;
        let body: serde_json::Value = resp.json().await.map_err(|e| format!("reading Prometheus' answer: {e}"))?;
        nio_shared::analysis::samples(&body)
    }

    /// Measures `a` once: the recorded status with this measurement added.
    pub async fn measure(&self, a: &Analysis, before: Option<&AnalysisStatus>, now: DateTime<Utc>) -> AnalysisStatus {
        let mut s = before.cloned().unwrap_or_default();
        s.runs += 1;
        s.last_time = Some(time(now));
        let outcome = match self.samples(&a.query).await {
            Ok(values) => {
                let shown: Vec<String> = values.iter().take(5).map(|v| format!("{v}")).collect();
                a.condition
                    .judge(&values)
                    .map(|()| shown.join(", "))
                    .map_err(|why| format!("{}: {why}", shown.join(", ")))
            }
            Err(e) => Err(e),
        };
        s.last_result = Some(match outcome {
            Ok(values) => format!("{values} (`{}`: met)", a.written),
            Err(why) => {
                s.failures += 1;
                format!("`{}` not met: {why}", a.written)
            }
        });
        s
    }
}

/// The recorded wave states with a new measurement for every soaking wave whose analysis is due.
pub async fn measure_due(
    prom: &Prometheus,
    layout: &[Wave],
    recorded: &[WaveStatus],
    now: DateTime<Utc>,
) -> Vec<WaveStatus> {
    let mut out = recorded.to_vec();
    for w in out.iter_mut().filter(|w| w.state == WaveState::Soaking) {
        let Some(a) = layout.iter().find(|l| l.name == w.name).and_then(|l| l.analysis.as_ref()) else { continue };
        if a.due(w.analysis.as_ref(), now) {
            let measured = prom.measure(a, w.analysis.as_ref(), now).await;
            tracing::info!(wave = %w.name, runs = measured.runs, failures = measured.failures, result = ?measured.last_result, "wave analysis");
            w.analysis = Some(measured);
        }
    }
    out
}
