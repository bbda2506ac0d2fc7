//! Sizes and durations as people read them, for the command line and the agent's output.

/// A size in binary units with one decimal: `0 B`, `1023 B`, `4.0 KiB`, `10.0 GiB`.
pub fn humanize(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    // 1023.96 KiB would print as "1024.0 KiB": move to the next unit instead.
    if (value * 10.0).round() >= 10240.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

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
    fn humanize_sizes() {
        assert_eq!(humanize(0), "0 B");
        assert_eq!(humanize(1023), "1023 B");
        assert_eq!(humanize(1024), "1.0 KiB");
        assert_eq!(humanize(4096), "4.0 KiB");
        assert_eq!(humanize(1536), "1.5 KiB");
        assert_eq!(humanize(12 * 1024 * 1024), "12.0 MiB");
        assert_eq!(humanize(10 * 1024 * 1024 * 1024), "10.0 GiB");
        assert_eq!(humanize(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(humanize(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration_ms(850), "850ms");
        assert_eq!(human_duration_ms(3_200), "3.2s");
        assert_eq!(human_duration_ms(725_000), "12m05s");
        assert_eq!(human_duration_ms(7_380_000), "2h03m");
    }
}
