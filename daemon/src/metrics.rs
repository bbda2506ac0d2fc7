//! Prometheus metrics: counters the store and API bump, gauges refreshed after catalog
//! operations, rendered as text for `GET /metrics`. Names start with `forkd_`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The daemon's metrics, registered in their own registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Bytes returned by reads.
    pub read_bytes: IntCounter,
    /// Bytes accepted by writes and ingest.
    pub written_bytes: IntCounter,
    /// Blocks whose crc32 did not match, on a read or in a scrub (each damaged block once per
    /// scrub).
    pub checksum_errors: IntCounter,
    /// Damaged blocks the last complete scrub found (0 until one completes).
    pub scrub_damaged_blocks: IntGauge,
    /// Completed flushes.
    pub flushes: IntCounter,
    /// Bytes of extents freed and punched.
    pub freed_bytes: IntCounter,
    /// API requests answered with an error.
    pub api_errors: IntCounter,
    /// Volumes in the catalog.
    pub volumes: IntGauge,
    /// Snapshots in the catalog.
    pub snapshots: IntGauge,
    /// Slots handed out so far (extent file length in blocks).
    pub extent_slots: IntGauge,
    /// Bytes `meta/` takes on disk, as of the last upkeep.
    pub meta_disk_bytes: IntGauge,
    /// Bytes of `meta/` a compaction could give back, as of the last upkeep (estimated where
    /// the engine cannot say).
    pub meta_reclaimable_bytes: IntGauge,
    /// Compactions of `meta/` run by the daemon's upkeep.
    pub meta_compactions: IntCounter,
    /// Open NBD connections and closed ones by reason.
    pub nbd_connections: ConnectionMetrics,
    /// NBD requests by command.
    pub nbd_requests: IntCounterVec,
    /// NBD error replies by errno.
    pub nbd_errors: IntCounterVec,
    /// Open iSCSI connections and closed ones by reason.
    pub iscsi_connections: ConnectionMetrics,
    /// SCSI commands over iSCSI answered with CHECK CONDITION, by sense key.
    pub iscsi_check_conditions: IntCounterVec,
    /// Hook runs by event and result (`ok`, `failed`, `timeout`, `refused`).
    pub hook_runs: IntCounterVec,
    /// Hook run durations by event, in seconds.
    pub hook_seconds: HistogramVec,
    /// Clones whose `lease-expiring` hook ran and that have not expired yet.
    pub leases_expiring: IntGauge,
    /// Clones deleted because their lease expired, by reason (`expired`, `idle`).
    pub lease_expiries: IntCounterVec,
    /// Schedule runs.
    pub schedules: ScheduleMetrics,
    /// Free space, the low-space threshold and quotas.
    pub space: SpaceMetrics,
    /// Background garbage collection.
    pub gc: GcMetrics,
}

/// The garbage collector's metrics (`store::gc`).
#[derive(Debug)]
pub struct GcMetrics {
    /// Tree nodes waiting in the garbage queue as last counted; 0 only when it is empty and the
    /// space of what was collected is back.
    pub queued_nodes: IntGauge,
    /// Tree nodes dismantled by the background collector's steps.
    pub freed_nodes: IntCounter,
}

impl GcMetrics {
    fn new(r: &Registry) -> GcMetrics {
        GcMetrics {
            queued_nodes: gauge(
                r,
                "forkd_gc_queued_nodes",
                "Tree nodes waiting in the garbage queue (0 only when it is empty and their space is back)",
            ),
            freed_nodes: counter(
                r,
                "forkd_gc_freed_nodes_total",
                "Tree nodes dismantled by background garbage collection",
            ),
        }
    }
}

/// The space gauges, refreshed at each scrape (`store::pool`).
#[derive(Debug)]
pub struct SpaceMetrics {
    /// Free bytes on the data directory's filesystem.
    pub free: IntGauge,
    /// The low-space threshold in bytes.
    pub threshold: IntGauge,
    /// Each quota'd clone's unique bytes.
    pub quota_used: IntGaugeVec,
    /// Each quota'd clone's quota.
    pub quota_limit: IntGaugeVec,
}

impl SpaceMetrics {
    fn new(r: &Registry) -> SpaceMetrics {
        SpaceMetrics {
            free: gauge(r, "forkd_pool_free_bytes", "Free bytes on the data directory's filesystem"),
            threshold: gauge(
                r,
                "forkd_pool_low_space_threshold_bytes",
                "Below this much free space new clones and ingests are refused",
            ),
            quota_used: gauge_vec(r, "forkd_quota_used_bytes", "Unique bytes of each clone with a quota", "volume"),
            quota_limit: gauge_vec(r, "forkd_quota_limit_bytes", "Quota of each clone with one", "volume"),
        }
    }
}

/// The scheduler's metrics (`server::scheduler`).
#[derive(Debug)]
pub struct ScheduleMetrics {
    /// When each schedule's last successful run ended, unix seconds (for "no success for 26 h").
    pub last_success: IntGaugeVec,
    /// Schedule runs by schedule and result (`ok`, `failed`, `interrupted`).
    pub runs: IntCounterVec,
}

impl ScheduleMetrics {
    fn new(r: &Registry) -> ScheduleMetrics {
        ScheduleMetrics {
            last_success: gauge_vec(
                r,
                "forkd_schedule_last_success_timestamp_seconds",
                "When each schedule's last successful run ended, unix seconds",
                "schedule",
            ),
            runs: counter_vec2(
                r,
                "forkd_schedule_runs_total",
                "Schedule runs by schedule and result",
                &["schedule", "result"],
            ),
        }
    }
}

/// The two metrics every protocol listener keeps: open connections, and closed ones by reason.
/// Only the server's listener life cycle (`server::listener`) touches them.
#[derive(Debug, Clone)]
pub struct ConnectionMetrics {
    /// Open connections (`forkd_<protocol>_connections`).
    pub open: IntGauge,
    /// Closed connections by reason (`forkd_<protocol>_connections_closed_total{reason}`).
    pub closed: IntCounterVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    counter_vec2(r, name, help, &[label])
}

fn counter_vec2(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable_metric(name));
    let _ = r.register(Box::new(c.clone()));
    c
}

fn histogram_vec(r: &Registry, name: &str, help: &str, label: &str, buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &[label])
        .unwrap_or_else(|_| unreachable_metric(name));
    let _ = r.register(Box::new(h.clone()));
    h
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|_| unreachable_metric(name));
    let _ = r.register(Box::new(c.clone()));
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|_| unreachable_metric(name));
    let _ = r.register(Box::new(g.clone()));
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), &[label]).unwrap_or_else(|_| unreachable_metric(name));
    let _ = r.register(Box::new(g.clone()));
    g
}

/// Metric names and help texts are constants checked by the unit test below.
fn unreachable_metric(name: &str) -> ! {
    panic!("invalid metric definition {name}")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Metrics {
        let r = Registry::new();
        Metrics {
            read_bytes: counter(&r, "forkd_read_bytes_total", "Bytes returned by reads"),
            written_bytes: counter(&r, "forkd_written_bytes_total", "Bytes accepted by writes and ingest"),
            checksum_errors: counter(
                &r,
                "forkd_checksum_errors_total",
                "Blocks whose crc32 did not match, on a read or in a scrub",
            ),
            scrub_damaged_blocks: gauge(
                &r,
                "forkd_scrub_damaged_blocks",
                "Damaged blocks the last complete scrub found",
            ),
            flushes: counter(&r, "forkd_flushes_total", "Completed flushes"),
            freed_bytes: counter(&r, "forkd_freed_bytes_total", "Bytes of extents freed"),
            api_errors: counter(&r, "forkd_api_errors_total", "API requests answered with an error"),
            volumes: gauge(&r, "forkd_volumes", "Volumes in the catalog"),
            snapshots: gauge(&r, "forkd_snapshots", "Snapshots in the catalog"),
            nbd_connections: ConnectionMetrics {
                open: gauge(&r, "forkd_nbd_connections", "Open NBD connections"),
                closed: counter_vec(
                    &r,
                    "forkd_nbd_connections_closed_total",
                    "Closed NBD connections by reason",
                    "reason",
                ),
            },
            nbd_requests: counter_vec(&r, "forkd_nbd_requests_total", "NBD requests by command", "command"),
            nbd_errors: counter_vec(&r, "forkd_nbd_errors_total", "NBD error replies by errno", "errno"),
            iscsi_connections: ConnectionMetrics {
                open: gauge(&r, "forkd_iscsi_connections", "Open iSCSI connections"),
                closed: counter_vec(
                    &r,
                    "forkd_iscsi_connections_closed_total",
                    "Closed iSCSI connections by reason",
                    "reason",
                ),
            },
            iscsi_check_conditions: counter_vec(
                &r,
                "forkd_iscsi_check_conditions_total",
                "SCSI commands answered with CHECK CONDITION, by sense key",
                "sense_key",
            ),
            hook_runs: counter_vec2(&r, "forkd_hook_runs_total", "Hook runs by event and result", &["event", "result"]),
            hook_seconds: histogram_vec(
                &r,
                "forkd_hook_duration_seconds",
                "Hook run durations by event",
                "event",
                vec![0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0],
            ),
            extent_slots: gauge(&r, "forkd_extent_slots", "4 KiB slots handed out in the extent file"),
            meta_disk_bytes: gauge(&r, "forkd_meta_disk_bytes", "Bytes meta/ takes on disk"),
            meta_reclaimable_bytes: gauge(
                &r,
                "forkd_meta_reclaimable_bytes",
                "Bytes of meta/ a compaction could give back",
            ),
            meta_compactions: counter(&r, "forkd_meta_compactions_total", "Compactions of meta/ by the upkeep"),
            leases_expiring: gauge(
                &r,
                "forkd_leases_expiring",
                "Clones warned of their lease's expiry, not yet expired",
            ),
            lease_expiries: counter_vec(
                &r,
                "forkd_lease_expiries_total",
                "Clones deleted at their lease's expiry, by reason",
                "reason",
            ),
            schedules: ScheduleMetrics::new(&r),
            space: SpaceMetrics::new(&r),
            gc: GcMetrics::new(&r),
            registry: r,
        }
    }

    /// Refresh the catalog gauges.
    pub fn update_volumes(&self, cat: &catalog::Catalog) {
        let vols = cat.volumes();
        self.volumes.set(i64::try_from(vols.len()).unwrap_or(i64::MAX));
        let snaps: usize = vols.values().map(|v| v.snapshots.len()).sum();
        self.snapshots.set(i64::try_from(snaps).unwrap_or(i64::MAX));
        self.extent_slots.set(i64::try_from(cat.map().stats().high_water - 1).unwrap_or(i64::MAX));
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_every_metric() {
        let m = super::Metrics::new();
        m.flushes.inc();
        let text = m.render();
        assert!(text.contains("forkd_flushes_total 1"), "{text}");
        assert!(text.contains("forkd_volumes 0"));
    }
}
