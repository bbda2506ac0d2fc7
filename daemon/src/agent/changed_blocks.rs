//! `forkd ingest --changed-blocks FILE`: the byte ranges an external tracker says changed since
//! the last ingest. Only those ranges are read from the image (and, as in a full scan, only the
//! blocks whose digest differs from the daemon's are sent).
//!
//! Two formats, told apart by the first non-blank character of the file:
//!
//! - `<`: the XML `thin_delta` (thin-provisioning-tools) prints for two thin volumes, e.g.
//!   ```text
//!   <superblock uuid="" time="3" transaction="7" version="2" data_block_size="128" nr_data_blocks="1600">
//!     <diff left="1" right="2">
//!       <same begin="0" length="16"/>
//!       <different begin="16" length="2"/>
//!       <right_only begin="40" length="1"/>
//!       <left_only begin="90" length="4"/>
//!     </diff>
//!   </superblock>
//!   ```
//!   `begin` and `length` count data blocks of `data_block_size` 512-byte sectors (128 = 64 KiB)
//!   of the thin volume. `different` (remapped), `right_only` (newly mapped) and `left_only`
//!   (unmapped since: it now reads as zeros, which the scan sends as zero frames where the old
//!   snapshot had data) are changed; `same` is not. The `--verbose` form, `<different>` holding
//!   `<range begin=".." left_data_begin=".." right_data_begin=".." length=".."/>` children, is
//!   read too. Unknown elements and attributes are ignored; the scanner is a small hand-written
//!   one that checks tags nest and close, so a truncated file is an error, not fewer ranges.
//! - anything else: one `OFFSET LENGTH` pair per line, in bytes, decimal or `0x` hex; blank
//!   lines and `#` comments are allowed.
//!
//! [`parse`] returns the ranges sorted, merged and widened to whole 4 KiB blocks: a range that
//! touches a block means the whole block is read. Every error names its 1-based line.

/// Block size of forkd volumes: ranges are widened to multiples of it.
pub const BLOCK: u64 = 4096;
/// `thin_delta`'s `data_block_size` counts sectors of this many bytes.
const SECTOR: u64 = 512;
/// Longest line text quoted in an error.
const QUOTE_MAX: usize = 80;

/// What is wrong with a changed-blocks file, and on which line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct ChangedBlocksError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub kind: ErrorKind,
}

/// The kinds of [`ChangedBlocksError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    /// A line of the lines format that is not `OFFSET LENGTH`.
    #[error("`{text}`: {why}")]
    BadLine {
        /// The line (shortened when long).
        text: String,
        /// Why it is not `OFFSET LENGTH`.
        why: String,
    },
    /// A range of length 0.
    #[error("a range of length 0")]
    ZeroLength,
    /// A range that ends past the end of the image (in bytes, after converting units).
    #[error("the range of {length} bytes at offset {offset} ends past the end of the image ({image_size} bytes)")]
    PastEnd {
        /// Start of the range in bytes.
        offset: u64,
        /// Length of the range in bytes (saturated when it overflows).
        length: u64,
        /// Size of the image.
        image_size: u64,
    },
    /// Input that is not well-formed XML (as far as this scanner checks).
    #[error("malformed XML: {0}")]
    BadXml(String),
    /// A missing or invalid attribute of an element this parser reads.
    #[error("<{element}> attribute `{attribute}` {why}")]
    BadAttribute {
        /// The element.
        element: String,
        /// The attribute.
        attribute: String,
        /// What is wrong with it.
        why: String,
    },
    /// Ranges outside a `<superblock data_block_size="..">`, or no superblock at all.
    #[error("no <superblock data_block_size=\"..\"> around the ranges: not thin_delta output")]
    NoSuperblock,
}

fn err(line: usize, kind: ErrorKind) -> ChangedBlocksError {
    ChangedBlocksError { line, kind }
}

/// Parse a changed-blocks file (either format) for an image of `image_size` bytes (a multiple
/// of [`BLOCK`]). Returns `(offset, length)` byte ranges, sorted, with overlapping and adjacent
/// ones merged, each widened to whole 4 KiB blocks. A range past the end is an error.
pub fn parse(text: &str, image_size: u64) -> Result<Vec<(u64, u64)>, ChangedBlocksError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let raw =
        if text.trim_start().starts_with('<') { parse_xml(text, image_size)? } else { parse_lines(text, image_size)? };
    Ok(normalize(raw))
}

/// Sort, widen to blocks and merge `(offset, end)` ranges into `(offset, length)` ranges.
fn normalize(mut raw: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    for r in &mut raw {
        *r = (r.0 / BLOCK * BLOCK, r.1.div_ceil(BLOCK).saturating_mul(BLOCK));
    }
    raw.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(raw.len());
    for (start, end) in raw {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// A range checked against the image: `(offset, end)`.
fn checked(line: usize, offset: u64, length: u64, image_size: u64) -> Result<(u64, u64), ChangedBlocksError> {
    if length == 0 {
        return Err(err(line, ErrorKind::ZeroLength));
    }
    match offset.checked_add(length) {
        Some(end) if end <= image_size => Ok((offset, end)),
        _ => Err(err(line, ErrorKind::PastEnd { offset, length, image_size })),
    }
}

/// A decimal or `0x` hex number.
fn number(s: &str) -> Result<u64, &'static str> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err("is not a number");
    }
    u64::from_str_radix(digits, radix).map_err(|_| "is too large")
}

fn quote(line: &str) -> String {
    let line = line.trim();
    match line.char_indices().nth(QUOTE_MAX) {
        Some((at, _)) => format!("{}...", &line[..at]),
        None => line.to_string(),
    }
}

/// The lines format: `(offset, end)` per line, unsorted.
fn parse_lines(text: &str, image_size: u64) -> Result<Vec<(u64, u64)>, ChangedBlocksError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or_default();
        let bad = |why: String| err(line, ErrorKind::BadLine { text: quote(raw), why });
        let mut fields = content.split_whitespace();
        let (offset, length) = match (fields.next(), fields.next(), fields.next()) {
            (None, _, _) => continue,
            (Some(o), Some(l), None) => (o, l),
            _ => return Err(bad("expected `OFFSET LENGTH` (two numbers, in bytes)".into())),
        };
        let offset = number(offset).map_err(|why| bad(format!("OFFSET `{offset}` {why}")))?;
        let length = number(length).map_err(|why| bad(format!("LENGTH `{length}` {why}")))?;
        out.push(checked(line, offset, length, image_size)?);
    }
    Ok(out)
}

/// One tag of the XML scanner.
#[derive(Debug)]
enum Tag<'a> {
    /// `<name attr="value"...>`, or `<name .../>` when `empty`.
    Open { name: &'a str, attrs: Vec<(&'a str, &'a str)>, empty: bool },
    /// `</name>`.
    Close { name: &'a str },
}

/// A minimal XML tokenizer: tags with attributes, comments, processing instructions and
/// declarations (skipped), whitespace between tags. It tracks line numbers for errors.
struct Scanner<'a> {
    s: &'a str,
    pos: usize,
    line: usize,
}

fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.' | b':')
}

impl<'a> Scanner<'a> {
    fn new(s: &'a str) -> Scanner<'a> {
        Scanner { s, pos: 0, line: 1 }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn bad(&self, line: usize, msg: String) -> ChangedBlocksError {
        err(line, ErrorKind::BadXml(msg))
    }

    /// Move `n` bytes on, counting the newlines passed.
    fn advance(&mut self, n: usize) {
        let n = n.min(self.s.len() - self.pos);
        self.line += self.s.as_bytes()[self.pos..self.pos + n].iter().filter(|&&b| b == b'\n').count();
        self.pos += n;
    }

    /// Skip whitespace; whether there was any.
    fn skip_ws(&mut self) -> bool {
        let n = self.rest().len() - self.rest().trim_start_matches(|c: char| c.is_ascii_whitespace()).len();
        self.advance(n);
        n > 0
    }

    fn name(&mut self) -> &'a str {
        let rest = self.rest();
        let n = rest.bytes().take_while(|&b| is_name_char(b)).count();
        self.advance(n);
        &rest[..n]
    }

    /// Skip past `end`, which must come before the end of the input.
    fn skip_past(&mut self, end: &str, what: &str) -> Result<(), ChangedBlocksError> {
        let line = self.line;
        match self.rest().find(end) {
            Some(at) => {
                self.advance(at + end.len());
                Ok(())
            }
            None => Err(self.bad(line, format!("{what} is not closed with `{end}`"))),
        }
    }

    /// The next tag and the line it starts on, or `None` at the end of the input.
    fn next_tag(&mut self) -> Result<Option<(usize, Tag<'a>)>, ChangedBlocksError> {
        loop {
            self.skip_ws();
            let rest = self.rest();
            if rest.is_empty() {
                return Ok(None);
            }
            if !rest.starts_with('<') {
                let text: String = rest.chars().take_while(|&c| c != '<' && c != '\n').collect();
                return Err(self.bad(self.line, format!("unexpected text `{}`", quote(&text))));
            }
            let line = self.line;
            if rest.starts_with("<?") {
                self.skip_past("?>", "`<?`")?;
                continue;
            }
            if rest.starts_with("<!--") {
                self.skip_past("-->", "a comment `<!--`")?;
                continue;
            }
            if rest.starts_with("<!") {
                self.skip_past(">", "a declaration `<!`")?;
                continue;
            }
            if rest.starts_with("</") {
                self.advance(2);
                let name = self.name();
                if name.is_empty() {
                    return Err(self.bad(line, "`</` without an element name".into()));
                }
                self.skip_ws();
                if !self.rest().starts_with('>') {
                    return Err(self.bad(line, format!("`</{name}` is not closed with `>`")));
                }
                self.advance(1);
                return Ok(Some((line, Tag::Close { name })));
            }
            self.advance(1);
            let name = self.name();
            if name.is_empty() {
                return Err(self.bad(line, "`<` without an element name".into()));
            }
            return self.open_tag(line, name).map(Some);
        }
    }

    /// The attributes and end of a start tag whose name was just read.
    fn open_tag(&mut self, line: usize, name: &'a str) -> Result<(usize, Tag<'a>), ChangedBlocksError> {
        let mut attrs = Vec::new();
        loop {
            let spaced = self.skip_ws();
            let rest = self.rest();
            if rest.starts_with("/>") {
                self.advance(2);
                return Ok((line, Tag::Open { name, attrs, empty: true }));
            }
            if rest.starts_with('>') {
                self.advance(1);
                return Ok((line, Tag::Open { name, attrs, empty: false }));
            }
            let Some(c) = rest.chars().next() else {
                return Err(self.bad(line, format!("the <{name}> tag is not closed with `>`")));
            };
            let key = if spaced { self.name() } else { "" };
            if key.is_empty() {
                return Err(self.bad(self.line, format!("unexpected `{c}` in the <{name}> tag")));
            }
            self.skip_ws();
            if !self.rest().starts_with('=') {
                return Err(self.bad(self.line, format!("attribute `{key}` of <{name}> has no `=\"value\"`")));
            }
            self.advance(1);
            self.skip_ws();
            let quote_char = match self.rest().chars().next() {
                Some(q @ ('"' | '\'')) => q,
                _ => return Err(self.bad(self.line, format!("the value of `{key}` in <{name}> is not quoted"))),
            };
            let value_line = self.line;
            self.advance(1);
            let rest = self.rest();
            let Some(len) = rest.find(quote_char) else {
                return Err(self.bad(value_line, format!("the value of `{key}` in <{name}> is not closed")));
            };
            let value = &rest[..len];
            if value.contains(['<', '\n']) {
                return Err(self.bad(value_line, format!("the value of `{key}` in <{name}> is not closed")));
            }
            self.advance(len + 1);
            attrs.push((key, value));
        }
    }
}

/// The value of attribute `key` of `element`, if present once (twice is an error).
fn attr<'a>(
    line: usize,
    element: &str,
    attrs: &[(&str, &'a str)],
    key: &str,
) -> Result<Option<&'a str>, ChangedBlocksError> {
    let mut found = attrs.iter().filter(|(k, _)| *k == key).map(|(_, v)| *v);
    let first = found.next();
    if found.next().is_some() {
        return Err(bad_attr(line, element, key, "is given twice"));
    }
    Ok(first)
}

fn bad_attr(line: usize, element: &str, attribute: &str, why: &str) -> ChangedBlocksError {
    err(line, ErrorKind::BadAttribute { element: element.into(), attribute: attribute.into(), why: why.into() })
}

/// A required numeric attribute.
fn num_attr(line: usize, element: &str, attrs: &[(&str, &str)], key: &str) -> Result<u64, ChangedBlocksError> {
    let v = attr(line, element, attrs, key)?.ok_or_else(|| bad_attr(line, element, key, "is missing"))?;
    number(v.trim()).map_err(|why| bad_attr(line, element, key, &format!("`{v}` {why}")))
}

/// Elements whose blocks changed between the two thin volumes.
fn is_changed_kind(name: &str) -> bool {
    matches!(name, "different" | "right_only" | "left_only")
}

/// `thin_delta` XML: `(offset, end)` in bytes per changed range, unsorted.
fn parse_xml(text: &str, image_size: u64) -> Result<Vec<(u64, u64)>, ChangedBlocksError> {
    let mut sc = Scanner::new(text);
    let mut open: Vec<(&str, usize)> = Vec::new();
    // The data block size in bytes of the innermost open <superblock>.
    let mut block_bytes: Option<u64> = None;
    let mut superblocks = 0usize;
    let mut out = Vec::new();
    while let Some((line, tag)) = sc.next_tag()? {
        match tag {
            Tag::Open { name, attrs, empty } => {
                let parent = open.last().map(|p| p.0);
                // A range: a simple-format element, or a verbose <range> in a changed group.
                let range = if is_changed_kind(name) {
                    let has = |k| attrs.iter().any(|(a, _)| *a == k);
                    // `<different>` without attributes opens a --verbose group of <range>s.
                    empty || has("begin") || has("length")
                } else {
                    name == "range" && parent.is_some_and(is_changed_kind)
                };
                if name == "superblock" {
                    let sectors = num_attr(line, name, &attrs, "data_block_size")?;
                    if sectors == 0 {
                        return Err(bad_attr(line, name, "data_block_size", "is 0"));
                    }
                    let bytes = sectors
                        .checked_mul(SECTOR)
                        .ok_or_else(|| bad_attr(line, name, "data_block_size", "is too large"))?;
                    block_bytes = Some(bytes);
                    superblocks += 1;
                } else if range {
                    let begin = num_attr(line, name, &attrs, "begin")?;
                    let length = num_attr(line, name, &attrs, "length")?;
                    let bs = block_bytes.ok_or_else(|| err(line, ErrorKind::NoSuperblock))?;
                    let offset = begin.saturating_mul(bs);
                    let bytes = length.saturating_mul(bs);
                    if begin.checked_mul(bs).is_none() || length.checked_mul(bs).is_none() {
                        return Err(err(line, ErrorKind::PastEnd { offset, length: bytes, image_size }));
                    }
                    out.push(checked(line, offset, bytes, image_size)?);
                }
                if !empty {
                    open.push((name, line));
                }
            }
            Tag::Close { name } => match open.pop() {
                Some((o, _)) if o == name => {
                    if name == "superblock" {
                        block_bytes = None;
                    }
                }
                Some((o, at)) => {
                    return Err(sc.bad(line, format!("</{name}> closes <{o}>, opened on line {at}")));
                }
                None => return Err(sc.bad(line, format!("</{name}> without a matching <{name}>"))),
            },
        }
    }
    // Errors at the end of the input name the last line.
    let last = text.lines().count().max(1);
    if let Some((name, at)) = open.last() {
        return Err(sc.bad(last, format!("<{name}> (line {at}) is never closed: is the file cut short?")));
    }
    if superblocks == 0 {
        return Err(err(last, ErrorKind::NoSuperblock));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn kind(text: &str, size: u64) -> (usize, ErrorKind) {
        match parse(text, size) {
            Ok(r) => panic!("{text:?} parsed as {r:?}"),
            Err(e) => (e.line, e.kind),
        }
    }

    fn bad_line(text: &str) -> (usize, String) {
        match kind(text, 16 * MIB) {
            (line, ErrorKind::BadLine { text, .. }) => (line, text),
            other => panic!("{text:?}: {other:?}"),
        }
    }

    fn bad_xml(text: &str) -> usize {
        match kind(text, 16 * MIB) {
            (line, ErrorKind::BadXml(_)) => line,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn lines_good_input() {
        let text = "# changed since the last run\n\n8192 4096\n0x0 0x1000   # first block\n  \t\n65536\t8192\r\n";
        assert_eq!(parse(text, MIB).unwrap(), vec![(0, 4096), (8192, 4096), (65536, 8192)]);
        assert_eq!(parse("", MIB).unwrap(), vec![]);
        assert_eq!(parse("# nothing\n\n", MIB).unwrap(), vec![]);
        assert_eq!(parse("0X10 0Xff", MIB).unwrap(), vec![(0, 4096)]);
    }

    #[test]
    fn lines_merge_and_overlap() {
        // Overlapping, adjacent, contained, out of order.
        let text = "40960 8192\n0 4096\n4096 4096\n45056 100\n100000 1\n8192 1\n";
        assert_eq!(parse(text, MIB).unwrap(), vec![(0, 12288), (40960, 8192), (98304, 4096)]);
        assert_eq!(parse("0 65536\n4096 4096\n", MIB).unwrap(), vec![(0, 65536)]);
    }

    #[test]
    fn lines_widen_to_blocks() {
        assert_eq!(parse("1 1", MIB).unwrap(), vec![(0, 4096)]);
        assert_eq!(parse("4095 2", MIB).unwrap(), vec![(0, 8192)]);
        assert_eq!(parse("5000 4096", MIB).unwrap(), vec![(4096, 8192)]);
        assert_eq!(parse("1048575 1", MIB).unwrap(), vec![(MIB - 4096, 4096)]);
        // Two ranges in the same block become one.
        assert_eq!(parse("10 1\n4000 5\n", MIB).unwrap(), vec![(0, 4096)]);
    }

    #[test]
    fn lines_errors_name_their_line() {
        assert_eq!(bad_line("0 4096\n\n12 abc\n"), (3, "12 abc".into()));
        assert_eq!(bad_line("# c\n4096\n").0, 2);
        assert_eq!(bad_line("1 2 3").0, 1);
        assert_eq!(bad_line("-1 4096").0, 1);
        assert_eq!(bad_line("+1 4096").0, 1);
        assert_eq!(bad_line("0x 4096").0, 1);
        assert_eq!(bad_line("0xfg 4096").0, 1);
        assert_eq!(bad_line("1.5 4096").0, 1);
        assert_eq!(bad_line("0 1\n99999999999999999999 1").0, 2);
        assert_eq!(bad_line("0,4096").0, 1);
        let long = format!("x{}", "y".repeat(500));
        let (_, text) = bad_line(&long);
        assert!(text.len() < 100, "{text}");
        let e = parse("0 4096\nbogus line\n", MIB).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("line 2: `bogus line`"), "{msg}");
    }

    #[test]
    fn lines_zero_length_is_an_error() {
        assert_eq!(kind("0 4096\n4096 0\n", MIB), (2, ErrorKind::ZeroLength));
        assert_eq!(kind("0x10 0x0", MIB), (1, ErrorKind::ZeroLength));
    }

    #[test]
    fn lines_past_the_end_is_an_error() {
        assert_eq!(
            kind("0 4096\n1044480 8192\n", MIB),
            (2, ErrorKind::PastEnd { offset: 1_044_480, length: 8192, image_size: MIB })
        );
        assert!(matches!(kind("1048576 1", MIB), (1, ErrorKind::PastEnd { .. })));
        assert!(matches!(kind("18446744073709551615 2", MIB), (1, ErrorKind::PastEnd { .. })));
        // Exactly up to the end is fine.
        assert_eq!(parse("1044480 4096", MIB).unwrap(), vec![(1_044_480, 4096)]);
    }

    const DELTA: &str = r#"<superblock uuid="" time="3" transaction="7" version="2" data_block_size="128" nr_data_blocks="1600">
  <diff left="1" right="2">
    <same begin="0" length="16"/>
    <different begin="16" length="2"/>
    <same begin="18" length="22"/>
    <right_only begin="40" length="1"/>
    <left_only begin="90" length="4"/>
  </diff>
</superblock>
"#;

    #[test]
    fn xml_good_input() {
        let k = 64 * 1024;
        assert_eq!(parse(DELTA, 16 * MIB).unwrap(), vec![(16 * k, 2 * k), (40 * k, k), (90 * k, 4 * k)]);
        // No differences.
        let none = "<superblock uuid=\"\" time=\"0\" transaction=\"1\" data_block_size=\"128\" nr_data_blocks=\"10\">\n  <diff left=\"1\" right=\"2\">\n  </diff>\n</superblock>\n";
        assert_eq!(parse(none, MIB).unwrap(), vec![]);
    }

    #[test]
    fn xml_tolerates_order_whitespace_and_unknown_parts() {
        let text = "\n\n  <?xml version=\"1.0\"?>\n<!-- made by\n a tracker -->\n<superblock nr_data_blocks=\"9\"\n   data_block_size = '8'  uuid=\"\">\n<diff left_root=\"5\" right_root=\"6\"><extra note=\"x\"><inner/></extra>\n<different\n length=\"3\"\n begin=\"2\" />\n<left_only begin=\"0\" length=\"1\"></left_only>\n</diff  >\n</superblock>";
        // data_block_size 8 sectors = 4 KiB.
        assert_eq!(parse(text, MIB).unwrap(), vec![(0, 4096), (8192, 12288)]);
    }

    #[test]
    fn xml_verbose_form() {
        let text = r#"<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="100">
  <diff left="1" right="2">
    <same>
      <range begin="0" data_begin="0" length="4"/>
    </same>
    <different>
      <range begin="4" left_data_begin="4" right_data_begin="50" length="1"/>
    </different>
    <right_only>
      <range begin="5" data_begin="51" length="2"/>
    </right_only>
    <left_only>
      <range begin="10" data_begin="10" length="1"/>
    </left_only>
  </diff>
</superblock>"#;
        let k = 64 * 1024;
        assert_eq!(parse(text, 16 * MIB).unwrap(), vec![(4 * k, 3 * k), (10 * k, k)]);
    }

    #[test]
    fn xml_merges_and_widens() {
        // data_block_size 1 sector: 512-byte units are widened to 4 KiB blocks.
        let text = r#"<superblock data_block_size="1"><diff>
<different begin="1" length="1"/><right_only begin="7" length="2"/><left_only begin="24" length="1"/>
</diff></superblock>"#;
        assert_eq!(parse(text, MIB).unwrap(), vec![(0, 8192), (8192 + 4096, 4096)]);
    }

    #[test]
    fn xml_past_the_end_is_an_error() {
        // Block 256 of 64 KiB starts at 16 MiB, the end of a 16 MiB image.
        let text = "<superblock data_block_size=\"128\">\n<diff>\n<different begin=\"255\" length=\"1\"/>\n<right_only begin=\"256\" length=\"1\"/>\n</diff>\n</superblock>\n";
        assert_eq!(
            kind(text, 16 * MIB),
            (4, ErrorKind::PastEnd { offset: 16 * MIB, length: 65536, image_size: 16 * MIB })
        );
        let huge = "<superblock data_block_size=\"128\">\n<different begin=\"18446744073709551615\" length=\"1\"/></superblock>";
        assert!(matches!(kind(huge, 16 * MIB), (2, ErrorKind::PastEnd { .. })));
    }

    #[test]
    fn xml_attribute_errors() {
        let missing = "<superblock uuid=\"\">\n</superblock>";
        assert!(
            matches!(kind(missing, MIB), (1, ErrorKind::BadAttribute { attribute, .. }) if attribute == "data_block_size")
        );
        let zero = "<superblock data_block_size=\"0\"></superblock>";
        assert!(matches!(kind(zero, MIB), (1, ErrorKind::BadAttribute { .. })));
        let nan =
            "<superblock data_block_size=\"8\">\n<diff>\n<different begin=\"x\" length=\"1\"/>\n</diff></superblock>";
        assert!(matches!(kind(nan, MIB), (3, ErrorKind::BadAttribute { attribute, .. }) if attribute == "begin"));
        let no_len = "<superblock data_block_size=\"8\">\n<right_only begin=\"1\"/>\n</superblock>";
        assert!(matches!(kind(no_len, MIB), (2, ErrorKind::BadAttribute { attribute, .. }) if attribute == "length"));
        let empty_elem = "<superblock data_block_size=\"8\">\n\n<left_only/>\n</superblock>";
        assert!(
            matches!(kind(empty_elem, MIB), (3, ErrorKind::BadAttribute { attribute, .. }) if attribute == "begin")
        );
        let twice =
            "<superblock data_block_size=\"8\">\n<different begin=\"1\" begin=\"2\" length=\"1\"/>\n</superblock>";
        assert!(matches!(kind(twice, MIB), (2, ErrorKind::BadAttribute { .. })));
        let zero_len = "<superblock data_block_size=\"8\">\n<different begin=\"1\" length=\"0\"/>\n</superblock>";
        assert_eq!(kind(zero_len, MIB), (2, ErrorKind::ZeroLength));
    }

    #[test]
    fn xml_needs_a_superblock() {
        assert_eq!(kind("<diff>\n<different begin=\"1\" length=\"1\"/>\n</diff>", MIB), (2, ErrorKind::NoSuperblock));
        assert_eq!(kind("<diff>\n</diff>\n", MIB), (2, ErrorKind::NoSuperblock));
        let after = "<superblock data_block_size=\"8\"></superblock>\n<different begin=\"1\" length=\"1\"/>";
        assert_eq!(kind(after, MIB), (2, ErrorKind::NoSuperblock));
    }

    #[test]
    fn xml_malformed_input_names_its_line() {
        // Cut short: the superblock is never closed.
        let cut = &DELTA[..DELTA.find("</diff>").unwrap()];
        assert_eq!(bad_xml(cut), 8);
        assert_eq!(bad_xml("<superblock data_block_size=\"8\">\n<diff>\n</superblock>\n"), 3);
        assert_eq!(bad_xml("<superblock data_block_size=\"8\">\n</diff>\n"), 2);
        assert_eq!(bad_xml("<superblock data_block_size=\"8\">\nhello\n</superblock>"), 2);
        assert_eq!(bad_xml("<superblock data_block_size=\"8\">\n<different begin=1 length=\"1\"/>\n</superblock>"), 2);
        assert_eq!(
            bad_xml("<superblock data_block_size=\"8\">\n<different begin=\"1\n length=\"1/>\n</superblock>"),
            2
        );
        assert_eq!(
            bad_xml("<superblock data_block_size=\"8\">\n\n<different begin=\"1\"length=\"1\"/>\n</superblock>"),
            3
        );
        assert_eq!(bad_xml("<superblock data_block_size=\"8\">\n<different begin=\"1\" length"), 2);
        assert_eq!(bad_xml("<superblock data_block_size=\"8\">\n<different begin=\"1\" length=\"1\""), 2);
        assert_eq!(bad_xml("<superblock data_block_size=\"8\">\n<!-- never closed\n\n"), 2);
        assert_eq!(bad_xml("<superblock data_block_size=\"8\">\n< different/>\n</superblock>"), 2);
        assert_eq!(bad_xml("<superblock data_block_size=\"8\">\n</>\n</superblock>"), 2);
        assert_eq!(bad_xml("<superblock data_block_size=\"8\">\n</superblock\n"), 2);
        let e = parse("<superblock data_block_size=\"8\">\n<diff>\n</superblock>\n", MIB).unwrap_err();
        assert!(e.to_string().starts_with("line 3: malformed XML: </superblock> closes <diff>"), "{e}");
    }

    #[test]
    fn format_is_told_by_the_first_non_blank_char() {
        assert!(matches!(
            parse("\n  \n<bogus/>", MIB),
            Err(ChangedBlocksError { line: 3, kind: ErrorKind::NoSuperblock })
        ));
        assert!(matches!(parse("\u{feff}0 1", MIB).as_deref(), Ok([(0, 4096)])));
        assert!(matches!(
            parse("x <superblock>", MIB),
            Err(ChangedBlocksError { line: 1, kind: ErrorKind::BadLine { .. } })
        ));
    }
}
