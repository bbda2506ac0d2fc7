//! The pool's low-space threshold: new clones and ingests are refused with a clear error
//! while the data directory's filesystem has less free space than `low_space_threshold`
//! (default 5 % of the filesystem), well before the disk is full. Writes to existing clones,
//! trims and deletes go on; the full-disk rules (`space`) still hold beneath it. Also the
//! space gauges: free bytes, the threshold, and each quota'd clone's use and limit.

use std::sync::atomic::Ordering;

use catalog::format_mib;

use super::{Result, Store, StoreError};

/// `low_space_threshold`: a share of the filesystem or a size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Threshold {
    /// Percent of the filesystem's size (0 turns the check off).
    Percent(f64),
    /// Bytes.
    Bytes(u64),
}

impl Threshold {
    /// `5%`, `10G`, `512M` or `0`.
    pub fn parse(text: &str) -> std::result::Result<Threshold, String> {
        let t = text.trim();
        let bad = || format!("low_space_threshold `{text}`: give a percentage of the filesystem (5%) or a size (10G)");
        match t.strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(p) if (0.0..100.0).contains(&p) => Ok(Threshold::Percent(p)),
                _ => Err(bad()),
            },
            None if t == "0" => Ok(Threshold::Bytes(0)),
            None => catalog::parse_size(t).map(Threshold::Bytes).map_err(|_| bad()),
        }
    }
}

impl Default for Threshold {
    fn default() -> Self {
        Threshold::Percent(5.0)
    }
}

impl Store {
    /// Set the low-space threshold; a percentage is taken of the filesystem's size now.
    pub fn set_low_space_threshold(&self, t: Threshold) {
        let bytes = match t {
            Threshold::Bytes(b) => b,
            Threshold::Percent(p) => {
                let total = nix::sys::statvfs::statvfs(&self.dir).map(|s| s.blocks() * s.fragment_size()).unwrap_or(0);
                let share = (total as f64 * p / 100.0) as u128;
                u64::try_from(share).unwrap_or(u64::MAX)
            }
        };
        self.low_space_threshold.store(bytes, Ordering::SeqCst);
    }

    /// Refuse new `what` (clones, an ingest) while free space is below the threshold, or the
    /// disk is full.
    pub fn check_pool(&self, what: &'static str) -> Result<()> {
        self.check_space()?;
        let threshold = self.low_space_threshold.load(Ordering::SeqCst);
        let free = super::space::free_bytes(&self.dir);
        if free < threshold {
            return Err(StoreError::LowSpace { free, threshold, what });
        }
        Ok(())
    }

    /// Refresh the space gauges (at each scrape of `/metrics`).
    pub fn update_space_metrics(&self) {
        let m = &self.metrics.space;
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        m.free.set(gauge(super::space::free_bytes(&self.dir)));
        m.threshold.set(gauge(self.low_space_threshold.load(Ordering::SeqCst)));
        m.quota_used.reset();
        m.quota_limit.reset();
        for (name, q) in self.catalog().quotas() {
            m.quota_used.with_label_values(&[&name]).set(gauge(q.used_bytes));
            m.quota_limit.with_label_values(&[&name]).set(gauge(q.limit_bytes));
        }
    }
}

/// The message of [`StoreError::LowSpace`].
pub(super) fn low_space_message(free: u64, threshold: u64, what: &str) -> String {
    format!(
        "the pool is low on space: {} free, below low_space_threshold ({}): new {what} are refused until \
         space is freed (delete clones or snapshots, trim, or lower low_space_threshold)",
        format_mib(free),
        format_mib(threshold)
    )
}

#[cfg(test)]
mod tests {
    use super::Threshold;

    #[test]
    fn thresholds_parse() {
        assert_eq!(Threshold::parse("5%"), Ok(Threshold::Percent(5.0)));
        assert_eq!(Threshold::parse("0.5 %"), Ok(Threshold::Percent(0.5)));
        assert_eq!(Threshold::parse("10G"), Ok(Threshold::Bytes(10 << 30)));
        assert_eq!(Threshold::parse("0"), Ok(Threshold::Bytes(0)));
        for bad in ["100%", "-1%", "x%", "lots", ""] {
            assert!(Threshold::parse(bad).is_err(), "{bad}");
        }
    }
}
