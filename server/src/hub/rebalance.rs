//! Rebalancing. Long-lived connections do not move when replicas are added, so new
//! replicas would sit idle while old ones stay hot. Every replica publishes its agent
//! count each second; one holding clearly more than the average closes its excess with
//! 1012 at a bounded rate, and the load balancer spreads the reconnections. Commands are
//! not at risk: they live in the database and are delivered on the next connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use super::Hub;
use super::cluster::Cluster;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::tasks::Task;
use crate::ws::protocol;

/// How many agents this replica should shed now: the amount above the cluster average,
/// if it exceeds the average by more than `tolerance` (0.1 = 10 %). `counts` holds every
/// live replica's count, this one's included.
pub(crate) fn excess(mine: usize, counts: &HashMap<String, u64>, tolerance: f64) -> usize {
    if counts.len() < 2 {
        return 0;
    }
    let total: u64 = counts.values().sum();
    let average = total as f64 / counts.len() as f64;
    if (mine as f64) <= average * (1.0 + tolerance) {
        return 0;
    }
    mine.saturating_sub(average.ceil() as usize)
}

/// Shedding moves at least this share of the excess per second, so a large excess is
/// worked off in about this many seconds (then the reconnections that landed back here
/// in half that, and so on): fleets of any size even out in about a minute.
const SHED_HORIZON_SECS: usize = 30;

/// This second's budget: REBALANCE_RATE, or more when the excess is large.
pub(crate) fn budget(excess: usize, rate: u32) -> usize {
    excess.min((rate as usize).max(excess.div_ceil(SHED_HORIZON_SECS)))
}

/// The rebalancing job, run every second in cluster mode: publishes this replica's
/// count, reads everyone's, and sheds the excess if this replica holds clearly more than
/// its share.
pub(crate) struct Rebalancer {
    pub(crate) hub: Hub,
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) lifecycle: Arc<Lifecycle>,
    /// REBALANCE: whether to shed at all (counts are published either way).
    pub(crate) enabled: bool,
    /// REBALANCE_TOLERANCE: the share above the average that is left alone (0.1 = 10 %).
    pub(crate) tolerance: f64,
    /// REBALANCE_RATE: agents closed per second at least, when over the average.
    pub(crate) rate: u32,
    /// Consecutive seconds this replica was above the cluster average: counts are
    /// published a second apart, so one reading alone may be stale (a fleet connecting
    /// in a burst); shedding waits for two.
    pub(crate) over_average_streak: AtomicU32,
}

impl Task for Rebalancer {
    async fn run_once(&self) {
        let cluster = &self.cluster;
        if self.lifecycle.is_draining() {
            // A draining replica is leaving: it must not attract or count agents.
            cluster.leave().await;
            return;
        }
        let Some(mut counts) = cluster.exchange_counts(self.hub.len()).await else {
            return;
        };
        let mine = self.hub.len();
        counts.insert(cluster.pod().to_string(), mine as u64);
        self.metrics.cluster_pods.set(counts.len() as i64);
        if !self.enabled {
            return;
        }
        let shed = budget(excess(mine, &counts, self.tolerance), self.rate);
        if shed == 0 {
            self.over_average_streak.store(0, Ordering::Relaxed);
            return;
        }
        if self.over_average_streak.fetch_add(1, Ordering::Relaxed) < 1 {
            return;
        }
        // The longest-connected agents go first: the ones that just moved here stay.
        let mut sessions = self.hub.sessions();
        sessions.sort_by_key(|s| s.connected_at_ms);
        for s in sessions.iter().take(shed) {
            s.close(protocol::REBALANCE);
        }
        self.metrics.rebalance_closes.inc_by(shed as u64);
        tracing::info!(
            shed,
            mine,
            pods = counts.len(),
            "rebalancing: closed agents above the cluster average"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> HashMap<String, u64> {
        pairs.iter().map(|(p, c)| (p.to_string(), *c)).collect()
    }

    #[test]
    fn a_lone_replica_never_sheds() {
        assert_eq!(excess(1000, &counts(&[("a", 1000)]), 0.1), 0);
    }

    #[test]
    fn after_scale_out_old_replicas_shed_down_to_the_average() {
        let c = counts(&[("a", 500), ("b", 500), ("c", 0), ("d", 0)]);
        assert_eq!(excess(500, &c, 0.1), 250);
        assert_eq!(excess(0, &c, 0.1), 0);
    }

    #[test]
    fn shedding_is_gradual_but_keeps_up_with_large_excesses() {
        assert_eq!(budget(3, 10), 3);
        assert_eq!(budget(100, 10), 10);
        assert_eq!(budget(5000, 10), 167);
    }

    #[test]
    fn replicas_within_the_tolerance_stay_put() {
        let c = counts(&[("a", 108), ("b", 92)]);
        assert_eq!(excess(108, &c, 0.1), 0);
        let c = counts(&[("a", 130), ("b", 70)]);
        assert_eq!(excess(130, &c, 0.1), 30);
    }
}
