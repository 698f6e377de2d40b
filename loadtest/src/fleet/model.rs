//! Behaviour models of simulated machines: latency distributions and failure probabilities.

use std::time::Duration;

use rand::RngExt;

/// A latency distribution, written `200ms`, `100ms..300ms` (uniform) or `exp:200ms` (exponential mean).
#[derive(Debug, Clone, PartialEq)]
pub enum Latency {
    Fixed(Duration),
    Uniform(Duration, Duration),
    Exponential(Duration),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    nio_shared::validate::duration("latency", s.trim()).map_err(|e| e.to_string())
}

impl std::str::FromStr for Latency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(mean) = s.strip_prefix("exp:") {
            return Ok(Latency::Exponential(parse_duration(mean)?));
        }
        if let Some((a, b)) = s.split_once("..") {
            let (a, b) = (parse_duration(a)?, parse_duration(b)?);
            if b < a {
                return Err(format!("{s}: the upper bound is below the lower bound"));
            }
            return Ok(Latency::Uniform(a, b));
        }
        Ok(Latency::Fixed(parse_duration(s)?))
    }
}

impl Latency {
    pub fn sample(&self) -> Duration {
        let mut rng = rand::rng();
        match self {
            Latency::Fixed(d) => *d,
            Latency::Uniform(a, b) => {
                if a == b {
                    *a
                } else {
                    Duration::from_secs_f64(rng.random_range(a.as_secs_f64()..b.as_secs_f64()))
                }
            }
            Latency::Exponential(mean) => {
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                Duration::from_secs_f64(-u.ln() * mean.as_secs_f64())
            }
        }
    }

    /// The mean, used for the ideal-time estimate.
    pub fn mean(&self) -> Duration {
        match self {
            Latency::Fixed(d) | Latency::Exponential(d) => *d,
            Latency::Uniform(a, b) => (*a + *b) / 2,
        }
    }
}

/// How a machine behaves.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Duration of an activation (build, profile, switch-to-configuration).
    pub switch_latency: Latency,
    /// Probability that a build fails.
    pub failure_rate: f64,
    /// Probability that the health check reports a degraded system.
    pub unhealthy_rate: f64,
    /// Probability that a connection is dropped before the SSH handshake.
    pub flaky_connect_rate: f64,
    /// Time a reboot (or kexec) keeps the machine unreachable.
    pub reboot: Duration,
    /// Latency of every other command.
    pub command_latency: Latency,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            switch_latency: Latency::Fixed(Duration::from_millis(200)),
            failure_rate: 0.0,
            unhealthy_rate: 0.0,
            flaky_connect_rate: 0.0,
            reboot: Duration::from_millis(500),
            command_latency: Latency::Fixed(Duration::ZERO),
        }
    }
}

/// Whether an event of probability `p` happens.
pub fn chance(p: f64) -> bool {
    p > 0.0 && rand::rng().random_bool(p.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_parse_and_sample_within_bounds() {
        assert_eq!("200ms".parse::<Latency>(), Ok(Latency::Fixed(Duration::from_millis(200))));
        let u: Latency = "100ms..300ms".parse().unwrap();
        for _ in 0..100 {
            let d = u.sample();
            assert!(d >= Duration::from_millis(100) && d < Duration::from_millis(300));
        }
        assert_eq!(u.mean(), Duration::from_millis(200));
        assert!("exp:1s".parse::<Latency>().is_ok());
        assert!("300ms..100ms".parse::<Latency>().is_err());
        assert!("fast".parse::<Latency>().is_err());
    }
}
