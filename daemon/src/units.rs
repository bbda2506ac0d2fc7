//! Sizes and durations as people read them (sizes: `catalog::format_size`), for the command line and the agent's output.

/// A size in binary units with one decimal (`4.0 KiB`); the catalog's, so errors it words
/// read the same.
pub use catalog::format_size as humanize;

/// A duration in milliseconds, short: `850ms`, `3.2s`, `12m05s`, `2h03m`.
pub fn human_duration_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        let s = ms / 1000;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = ms / 60_000;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(human_duration_ms(850), "850ms");
        assert_eq!(human_duration_ms(3_200), "3.2s");
        assert_eq!(human_duration_ms(725_000), "12m05s");
        assert_eq!(human_duration_ms(7_380_000), "2h03m");
    }
}
