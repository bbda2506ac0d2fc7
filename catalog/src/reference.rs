//! Names and references: volume names, `VOLUME@N`, `@latest`, `@BOOKMARK`, `@TIME`, and sizes.
//!
//! Parsing only; resolving a reference against the catalog happens in `catalog.rs`.

use crate::CatalogError;

/// What follows the `@` of a snapshot reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapSel {
    /// `VOLUME@N`.
    Id(u64),
    /// `VOLUME@latest`.
    Latest,
    /// `VOLUME@2026-11-21T10:00:00Z`: the newest snapshot at or before this instant (unix ms).
    At(i64),
    /// `VOLUME@NAME`: a bookmark.
    Bookmark(String),
}

/// A parsed reference to a volume or one of its snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// The volume name.
    pub volume: String,
    /// The snapshot selector, if the reference names a snapshot.
    pub snapshot: Option<SnapSel>,
}

/// Check a volume or bookmark name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
pub fn validate_name(kind: &str, name: &str) -> Result<(), CatalogError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(CatalogError::InvalidName {
            name: name.to_string(),
            why: format!("a {kind} name is 1 to 64 of A-Z a-z 0-9 . _ - and starts with a letter, digit or _"),
        })
    }
}

/// A bookmark must not look like a snapshot id, `latest` or a time.
pub(crate) fn validate_bookmark(name: &str) -> Result<(), CatalogError> {
    validate_name("bookmark", name)?;
    if name == "latest" || name.bytes().all(|c| c.is_ascii_digit()) || parse_time(name).is_some() {
        return Err(CatalogError::InvalidName {
            name: name.to_string(),
            why: "a bookmark cannot be a number, `latest` or a time".into(),
        });
    }
    Ok(())
}

/// Parse an RFC 3339 instant into unix milliseconds.
pub fn parse_time(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Format unix milliseconds as RFC 3339 (UTC, millisecond precision).
pub fn format_time(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.format(&f).unwrap_or_else(|_| ms.to_string())
}

impl Reference {
    /// Parse `VOLUME` or `VOLUME@SELECTOR`.
    pub fn parse(s: &str) -> Result<Reference, CatalogError> {
        let bad = |why: &str| CatalogError::BadReference { reference: s.to_string(), why: why.to_string() };
        let (vol, sel) = match s.split_once('@') {
            None => (s, None),
            Some((v, sel)) => (v, Some(sel)),
        };
        validate_name("volume", vol).map_err(|_| bad("the volume name before `@` is not a valid name"))?;
        let snapshot = match sel {
            None => None,
            Some("") => return Err(bad("nothing after `@`: use VOLUME@N, @latest, @BOOKMARK or @TIME")),
            Some("latest") => Some(SnapSel::Latest),
            Some(sel) if sel.bytes().all(|c| c.is_ascii_digit()) => {
                Some(SnapSel::Id(sel.parse().map_err(|_| bad("snapshot number too large"))?))
            }
            Some(sel) => match parse_time(sel) {
                Some(t) => Some(SnapSel::At(t)),
                None if sel.bytes().next().is_some_and(|c| c.is_ascii_digit()) && sel.contains('-') => {
                    return Err(bad("not an RFC 3339 time such as 2026-11-21T10:00:00Z"))
                }
                None => {
                    validate_name("bookmark", sel)
                        .map_err(|_| bad("not a snapshot number, `latest`, time or bookmark"))?;
                    Some(SnapSel::Bookmark(sel.to_string()))
                }
            },
        };
        Ok(Reference { volume: vol.to_string(), snapshot })
    }
}

/// The largest volume: 1 PiB.
const MAX_SIZE: u64 = 1 << 50;

/// Why a size is refused: the limit is named when it is the problem.
const OVER_LIMIT: &str = "larger than the limit: a volume is at most 1P (1 PiB)";
const NOT_BLOCKS: &str = "must be a positive multiple of 4096 bytes, at most 1P";

/// A size in binary units with one decimal: `0 B`, `1023 B`, `4.0 KiB`, `10.0 GiB`.
pub fn format_size(bytes: u64) -> String {
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

/// Parse a size such as `10G`, `512M`, `4096`, `1T` (binary units), which must be a positive
/// multiple of 4096 bytes and at most [`MAX_SIZE`].
pub fn parse_size(s: &str) -> Result<u64, CatalogError> {
    let bad = |why: &str| CatalogError::InvalidSize { size: s.to_string(), why: why.to_string() };
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                _ => return Err(bad("unknown suffix; use K, M, G, T or P")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad("not a whole number with an optional K/M/G/T suffix"))?;
    let bytes = n.checked_mul(mult).ok_or_else(|| bad(OVER_LIMIT))?;
    size_problem(bytes).map_or(Ok(bytes), |why| Err(bad(why)))
}

/// A volume size must be a positive multiple of 4096 bytes and at most 1 PiB.
pub fn check_size(bytes: u64) -> Result<(), CatalogError> {
    match size_problem(bytes) {
        Some(why) => Err(CatalogError::InvalidSize { size: bytes.to_string(), why: why.into() }),
        None => Ok(()),
    }
}

fn size_problem(bytes: u64) -> Option<&'static str> {
    if bytes > MAX_SIZE {
        Some(OVER_LIMIT)
    } else if bytes == 0 || !bytes.is_multiple_of(4096) {
        Some(NOT_BLOCKS)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_read_them() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1.0 KiB");
        assert_eq!(format_size(4096), "4.0 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(12 * 1024 * 1024), "12.0 MiB");
        assert_eq!(format_size(10 * 1024 * 1024 * 1024), "10.0 GiB");
        assert_eq!(format_size(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(format_size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn references() {
        assert_eq!(Reference::parse("db").unwrap(), Reference { volume: "db".into(), snapshot: None });
        assert_eq!(Reference::parse("db@3").unwrap().snapshot, Some(SnapSel::Id(3)));
        assert_eq!(Reference::parse("db@latest").unwrap().snapshot, Some(SnapSel::Latest));
        assert_eq!(Reference::parse("db@nightly").unwrap().snapshot, Some(SnapSel::Bookmark("nightly".into())));
        let t = Reference::parse("db@2026-11-21T10:00:00Z").unwrap();
        assert_eq!(t.snapshot, Some(SnapSel::At(1_795_255_200_000)));
        for bad in ["", "@1", "db@", "db@2026-13-01", "a/b", "db@x@y", "db@../x", "-x"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("8k").unwrap(), 8192);
        for bad in ["", "0", "4095", "1K", "10X", "G", "-4096", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        // Too large names the limit, not the alignment.
        for big in ["2048T", "2P", "99999999999T", "1125899906846720K"] {
            let e = parse_size(big).expect_err(big).to_string();
            assert!(e.contains("at most 1P (1 PiB)") && !e.contains("multiple"), "{big}: {e}");
        }
        assert_eq!(parse_size("1P").unwrap(), MAX_SIZE);
        assert!(check_size(MAX_SIZE + 4096).unwrap_err().to_string().contains("limit"));
    }

    #[test]
    fn times_round_trip() {
        let ms = parse_time("2026-11-21T10:00:00.250Z").unwrap();
        assert_eq!(format_time(ms), "2026-11-21T10:00:00.250Z");
    }
}
