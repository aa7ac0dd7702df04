//! Per-request measurements, keyed by phase and endpoint: status counts, latency samples and retry counts.
//!
//! Every sample is kept (a demo run makes tens of thousands of requests, a few hundred KB) and sorted once at the
//! end, so percentiles are exact rather than estimated from buckets.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// The status recorded for a request that got no HTTP answer (connect error, timeout, broken body).
pub const STATUS_TRANSPORT_ERROR: u16 = 0;

/// When in the run a request was made; each phase gets its own table in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Accounts, product, drop, connection warm-up.
    Setup,
    /// The reservation attempts fired at the opening instant (and their 429/503 retries).
    Spike,
    /// What holders do next (pay, decline, cancel) and refused buyers' retries while stock comes back.
    Settle,
    /// Reads after the run (drop state, released reservations).
    Verify,
    /// The drop-state poller that runs alongside the spike and the settle phase.
    Monitor,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Setup => "setup",
            Self::Spike => "spike",
            Self::Settle => "settle",
            Self::Verify => "verify",
            Self::Monitor => "monitor",
        }
    }
}

#[derive(Debug, Default)]
struct Series {
    statuses: BTreeMap<u16, u64>,
    latencies_us: Vec<u64>,
    retries: u64,
}

/// Shared by every task of a run. One short lock per request: contention is negligible next to an HTTP call.
#[derive(Debug, Default)]
pub struct Recorder {
    series: Mutex<BTreeMap<(Phase, &'static str), Series>>,
}

/// Latency percentiles of one endpoint, in milliseconds (nearest-rank over all samples).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One endpoint's numbers in one phase.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointSummary {
    pub endpoint: &'static str,
    pub requests: u64,
    /// Status code (0 = no HTTP answer) to count.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests repeated after a 429/503 with `Retry-After`.
    pub retries: u64,
    pub latency: Option<LatencySummary>,
}

impl Recorder {
    /// Records one finished request.
    pub fn record(&self, phase: Phase, endpoint: &'static str, status: u16, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let mut series = self.lock();
        let entry = series.entry((phase, endpoint)).or_default();
        *entry.statuses.entry(status).or_default() += 1;
        entry.latencies_us.push(micros);
    }

    /// Counts one retry after a 429/503.
    pub fn retried(&self, phase: Phase, endpoint: &'static str) {
        self.lock().entry((phase, endpoint)).or_default().retries += 1;
    }

    /// Every endpoint's summary for one phase, in endpoint order.
    pub fn summary(&self, phase: Phase) -> Vec<EndpointSummary> {
        let mut series = self.lock();
        series
            .iter_mut()
            .filter(|((p, _), _)| *p == phase)
            .map(|((_, endpoint), s)| EndpointSummary {
                endpoint,
                requests: s.statuses.values().sum(),
                statuses: s.statuses.clone(),
                retries: s.retries,
                latency: latency_summary(&mut s.latencies_us),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Phase, &'static str), Series>> {
        // A panic while holding this lock can only come from a bug in `record`; the counts stay usable.
        self.series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Sorts the samples (microseconds) and reads p50/p90/p99/max; `None` without samples.
pub fn latency_summary(samples_us: &mut [u64]) -> Option<LatencySummary> {
    samples_us.sort_unstable();
    let max = *samples_us.last()?;
    let ms = |us: u64| us as f64 / 1000.0;
    Some(LatencySummary {
        p50_ms: ms(percentile(samples_us, 50.0)),
        p90_ms: ms(percentile(samples_us, 90.0)),
        p99_ms: ms(percentile(samples_us, 99.0)),
        max_ms: ms(max),
    })
}

/// Nearest-rank percentile of sorted, non-empty samples: the smallest sample with at least `p`% of the samples
/// at or below it.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    debug_assert!(!sorted.is_empty());
    debug_assert!(sorted.windows(2).all(|w| w[0] <= w[1]));
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50.0), 50);
        assert_eq!(percentile(&samples, 90.0), 90);
        assert_eq!(percentile(&samples, 99.0), 99);
        assert_eq!(percentile(&samples, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[1, 2], 50.0), 1);
        assert_eq!(percentile(&[1, 2], 51.0), 2);
    }

    #[test]
    fn summary_sorts_unsorted_samples() {
        let mut samples = vec![9_000, 1_000, 5_000, 3_000];
        let summary = latency_summary(&mut samples).unwrap();
        assert_eq!(summary.p50_ms, 3.0);
        assert_eq!(summary.max_ms, 9.0);
        assert!(latency_summary(&mut []).is_none());
    }

    #[test]
    fn recorder_groups_by_phase_and_endpoint() {
        let recorder = Recorder::default();
        recorder.record(Phase::Spike, "POST /x", 201, Duration::from_millis(2));
        recorder.record(Phase::Spike, "POST /x", 409, Duration::from_millis(1));
        recorder.record(Phase::Settle, "POST /x", 201, Duration::from_millis(1));
        recorder.retried(Phase::Spike, "POST /x");
        let spike = recorder.summary(Phase::Spike);
        assert_eq!(spike.len(), 1);
        assert_eq!(spike[0].requests, 2);
        assert_eq!(spike[0].retries, 1);
        assert_eq!(spike[0].statuses.get(&409), Some(&1));
        assert_eq!(recorder.summary(Phase::Settle)[0].requests, 1);
        assert!(recorder.summary(Phase::Verify).is_empty());
    }
}
