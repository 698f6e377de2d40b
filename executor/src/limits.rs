//! Per-site limits. The in-flight limit is the site consumer's `max_ack_pending` (held by the broker across
//! all executors); this module paces new SSH sessions per executor with a governor rate limiter.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use nio_shared::config::SiteLimits;

/// New-session rate limiters by site.
pub struct ConnectLimits {
    sites: HashMap<String, DefaultDirectRateLimiter>,
}

impl ConnectLimits {
    pub fn new(sites: &[SiteLimits]) -> Self {
        let sites = sites
            .iter()
            .map(|s| {
                let period = Duration::from_secs_f64(1.0 / s.connect_rate.max(0.001));
                let burst = NonZeroU32::new(s.burst).unwrap_or(NonZeroU32::MIN);
                let quota =
                    Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN)).allow_burst(burst);
                (s.name.clone(), RateLimiter::direct(quota))
            })
            .collect();
        ConnectLimits { sites }
    }

    /// Waits until a new SSH session may start at `site`; returns how long it waited.
    pub async fn wait(&self, site: &str) -> Duration {
        let start = Instant::now();
        if let Some(l) = self.sites.get(site) {
            l.until_ready().await;
        }
        start.elapsed()
    }
}
