//! The pool's low-space threshold: new clones and ingests are refused with a clear error
//! while the data directory's filesystem has less free space than `low_space_threshold`
//! (default 5 % of the filesystem), well before the disk is full. Writes to existing clones,
//! trims and deletes go on; the full-disk rules (`space`) still hold beneath it. Also the
//! space gauges: free bytes, the threshold, and each quota'd clone's use and limit.

use std::sync::atomic::Ordering;

use catalog::format_size;

use super::{Result, Store, StoreError};

/// `low_space_threshold`: a share of the filesystem or a size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threshold {
    /// Hundredths of a percent of the filesystem's size (0 turns the check off).
    BasisPoints(u64),
    /// Bytes.
    Bytes(u64),
}

impl Threshold {
    /// `5%`, `10G`, `512M` or `0`.
    pub fn parse(text: &str) -> std::result::Result<Threshold, String> {
        let t = text.trim();
        let bad = || format!("low_space_threshold `{text}`: give a percentage of the filesystem (5%) or a size (10G)");
        match t.strip_suffix('%') {
            Some(p) => match basis_points(p.trim()) {
                Some(bp) if bp < 10_000 => Ok(Threshold::BasisPoints(bp)),
                _ => Err(bad()),
            },
            None if t == "0" => Ok(Threshold::Bytes(0)),
            None => catalog::parse_size(t).map(Threshold::Bytes).map_err(|_| bad()),
        }
    }
}

/// `5` → 500, `0.25` → 25: a percentage with at most two decimals, in hundredths.
fn basis_points(p: &str) -> Option<u64> {
    let (whole, frac) = p.split_once('.').unwrap_or((p, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (p.contains('.') && !digits(frac)) || frac.len() > 2 {
        return None;
    }
    let frac: u64 = format!("{frac:0<2}").parse().ok()?;
    whole.parse::<u64>().ok()?.checked_mul(100)?.checked_add(frac)
}

impl Default for Threshold {
    fn default() -> Self {
        Threshold::BasisPoints(500)
    }
}

impl Store {
    /// Set the low-space threshold; a percentage is taken of the filesystem's size now.
    pub fn set_low_space_threshold(&self, t: Threshold) {
        let bytes = match t {
            Threshold::Bytes(b) => b,
            Threshold::BasisPoints(bp) => {
                let total = nix::sys::statvfs::statvfs(&self.dir).map(|s| s.blocks() * s.fragment_size()).unwrap_or(0);
                u64::try_from(u128::from(total) * u128::from(bp) / 10_000).unwrap_or(u64::MAX)
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
        let quotas = self.catalog().quotas();
        match quotas {
            Ok(quotas) => {
                for (name, q) in quotas {
                    m.quota_used.with_label_values(&[&name]).set(gauge(q.used_bytes));
                    m.quota_limit.with_label_values(&[&name]).set(gauge(q.limit_bytes));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot count the quota'd clones' use"),
        }
    }
}

/// The message of [`StoreError::LowSpace`].
pub(super) fn low_space_message(free: u64, threshold: u64, what: &str) -> String {
    format!(
        "the pool is low on space: {} free, below low_space_threshold ({}): new {what} are refused until \
         space is freed (delete clones or snapshots, trim, or lower low_space_threshold)",
        format_size(free),
        format_size(threshold)
    )
}

#[cfg(test)]
mod tests {
    use super::Threshold;

    #[test]
    fn thresholds_parse() {
        assert_eq!(Threshold::parse("5%"), Ok(Threshold::BasisPoints(500)));
        assert_eq!(Threshold::parse("0.5 %"), Ok(Threshold::BasisPoints(50)));
        assert_eq!(Threshold::parse("12.25%"), Ok(Threshold::BasisPoints(1225)));
        assert_eq!(Threshold::parse("10G"), Ok(Threshold::Bytes(10 << 30)));
        assert_eq!(Threshold::parse("0"), Ok(Threshold::Bytes(0)));
        for bad in ["100%", "-1%", "x%", "1.234%", ".5%", "5.%", "lots", ""] {
            assert!(Threshold::parse(bad).is_err(), "{bad}");
        }
    }
}
