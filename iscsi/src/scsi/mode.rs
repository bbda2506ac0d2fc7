//! MODE SENSE and MODE SELECT (6, 10), the two mode pages and the one mode parameter an
//! initiator may change: SWP, Software Write Protect (SPC-4 §7.5.8, control mode page byte 4
//! bit 3).
//!
//! The pages: caching (0x08) with write-back caching on (WCE = 1, forkd acknowledges writes
//! before a flush) and control (0x0A). Only SWP is changeable (the changeable values of every
//! other field are 0), and no saved page set exists (page control 3 and MODE SELECT with SP
//! are refused). MODE SELECT therefore accepts a page only when it equals the current one in
//! every bit that is not changeable; it checks the whole parameter list before it changes
//! anything, so a refused list leaves the parameters as they were.
//!
//! SWP is a logical unit parameter ([`ModeParams`] lives in the [`super::LunState`] every
//! I_T nexus shares): while it is set the medium is write protected for everyone, exactly as a
//! read-only export is (MODE SENSE reports WP in the device-specific parameter, every command
//! that would change the medium gets DATA PROTECT / WRITE PROTECTED; `mod.rs` applies it by
//! wrapping the backend). It stays when the nexus that set it goes away, and returns to its
//! default (off) on a logical unit reset: SAM-5's logical unit reset restores the saved values
//! of the mode parameters, or their defaults where none were saved, and there are no saved
//! values here. Nothing survives a daemon restart either. The model has no unit attention queue, so the other I_T nexuses are not
//! told MODE PARAMETERS CHANGED; they see WP on their next MODE SENSE and DATA PROTECT on their
//! next write.

use super::{len16, op, truncate, Backend, Cdb, CmdResult, Sense, LOGICAL_BLOCK_SIZE};

const CACHING_PAGE: u8 = 0x08;
const CONTROL_PAGE: u8 = 0x0A;
/// Byte of the control page holding SWP, and its bit.
const SWP_BYTE: usize = 4;
const SWP_BIT: u8 = 0x08;

/// The changeable mode parameters of a LUN, at their current values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ModeParams {
    /// Software Write Protect: the medium may not be changed.
    pub(crate) swp: bool,
}

/// Which values a MODE SENSE asks for (its PC field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageControl {
    Current,
    Changeable,
    Default,
}

/// A mode page's bytes: `params`' values, or the changeable mask.
fn mode_page(code: u8, pc: PageControl, params: &ModeParams) -> Option<Vec<u8>> {
    let values = match pc {
        PageControl::Current => *params,
        PageControl::Default => ModeParams::default(),
        PageControl::Changeable => return changeable(code),
    };
    let page = match code {
        CACHING_PAGE => {
            let mut p = vec![0u8; 20];
            p[0] = CACHING_PAGE;
            p[1] = 0x12;
            p[2] = 0x04; // WCE
            p
        }
        CONTROL_PAGE => {
            let mut p = vec![0u8; 12];
            p[0] = CONTROL_PAGE;
            p[1] = 0x0A;
            p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
            if values.swp {
                p[SWP_BYTE] |= SWP_BIT;
            }
            p[8] = 0xFF; // BUSY TIMEOUT PERIOD: unlimited
            p[9] = 0xFF;
            p
        }
        _ => return None,
    };
    Some(page)
}

/// The changeable mask of a page: a 1 for each bit MODE SELECT may change.
fn changeable(code: u8) -> Option<Vec<u8>> {
    let page = match code {
        CACHING_PAGE => {
            let mut p = vec![0u8; 20];
            p[0] = CACHING_PAGE;
            p[1] = 0x12;
            p
        }
        CONTROL_PAGE => {
            let mut p = vec![0u8; 12];
            p[0] = CONTROL_PAGE;
            p[1] = 0x0A;
            p[SWP_BYTE] = SWP_BIT;
            p
        }
        _ => return None,
    };
    Some(page)
}

/// MODE SENSE (6/10). `dev` is the write-protected view of the medium, so the device-specific
/// parameter's WP covers a read-only export and SWP alike.
pub(super) fn mode_sense(c: &Cdb, dev: &dyn Backend, params: &ModeParams) -> CmdResult {
    let ten = c.opcode() == op::MODE_SENSE_10;
    let dbd = c.b(1) & 0x08 != 0;
    let llbaa = ten && c.b(1) & 0x10 != 0;
    let code = c.b(2) & 0x3F;
    let subpage = c.b(3);
    let alloc = if ten { u32::from(c.u16(7)) } else { u32::from(c.b(4)) };
    let pc = match c.b(2) >> 6 {
        0 => PageControl::Current,
        1 => PageControl::Changeable,
        2 => PageControl::Default,
        _ => return Err(Sense::SAVING_PARAMETERS_NOT_SUPPORTED.into()),
    };
    let pages = match (code, subpage) {
        (0x3F, 0x00 | 0xFF) => {
            let mut all = mode_page(CACHING_PAGE, pc, params).unwrap_or_default();
            all.extend(mode_page(CONTROL_PAGE, pc, params).unwrap_or_default());
            all
        }
        (_, 0x00) => mode_page(code, pc, params).ok_or(Sense::INVALID_FIELD_IN_CDB)?,
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
    };
    let bd = block_descriptor(dev.capacity_blocks(), dbd, llbaa);
    // Device-specific parameter: WP when the medium is write protected, DPOFUA (DPO and FUA
    // honoured).
    let dsp = if dev.read_only() { 0x90 } else { 0x10 };
    let mut d = Vec::new();
    if ten {
        d.extend_from_slice(&len16(6 + bd.len() + pages.len()));
        d.extend_from_slice(&[0, dsp, u8::from(llbaa && !dbd), 0]);
        d.extend_from_slice(&len16(bd.len()));
    } else {
        d.push(u8::try_from(3 + bd.len() + pages.len()).unwrap_or(u8::MAX));
        d.extend_from_slice(&[0, dsp, u8::try_from(bd.len()).unwrap_or(u8::MAX)]);
    }
    d.extend_from_slice(&bd);
    d.extend_from_slice(&pages);
    Ok(truncate(d, alloc))
}

/// The block descriptor of MODE SENSE: none with DBD, the long form with LLBAA.
fn block_descriptor(cap: u64, dbd: bool, llbaa: bool) -> Vec<u8> {
    if dbd {
        Vec::new()
    } else if llbaa {
        let mut b = cap.to_be_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&LOGICAL_BLOCK_SIZE.to_be_bytes());
        b
    } else {
        let mut b = u32::try_from(cap).unwrap_or(u32::MAX).to_be_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(&LOGICAL_BLOCK_SIZE.to_be_bytes()[1..]);
        b
    }
}

/// MODE SELECT (6/10): a header, optional block descriptors that must describe the current
/// geometry, then pages. Each page must equal the current one except in changeable bits; the
/// new values take effect only once the whole list has been checked.
pub(super) fn mode_select(c: &Cdb, data_out: &[u8], params: &mut ModeParams) -> CmdResult {
    let ten = c.opcode() == op::MODE_SELECT_10;
    if c.b(1) & 0x01 != 0 {
        // SP: saving pages is not supported.
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let plen = if ten { usize::from(c.u16(7)) } else { usize::from(c.b(4)) };
    if plen == 0 {
        return Ok(Vec::new());
    }
    let list = data_out.get(..plen).ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
    let mut rest = pages_of(list, ten)?;
    let mut new = *params;
    while !rest.is_empty() {
        if rest.len() < 2 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        if rest[0] & 0x40 != 0 {
            // SPF: no subpages exist.
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
        let len = 2 + usize::from(rest[1]);
        let page = rest.get(..len).ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
        new = select_page(page, new)?;
        rest = &rest[len..];
    }
    *params = new;
    Ok(Vec::new())
}

/// The pages of a mode parameter list, after its header and block descriptors (which must
/// describe 512-byte blocks).
fn pages_of(list: &[u8], ten: bool) -> Result<&[u8], Sense> {
    let header = if ten { 8 } else { 4 };
    if list.len() < header {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let (bd_len, long) = if ten {
        (usize::from(u16::from_be_bytes([list[6], list[7]])), list[4] & 0x01 != 0)
    } else {
        (usize::from(list[3]), false)
    };
    let desc_len = if long { 16 } else { 8 };
    let bds = list.get(header..header + bd_len).ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
    if bd_len % desc_len != 0 {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    for bd in bds.chunks_exact(desc_len) {
        let block_len = u32::from_be_bytes([0, bd[desc_len - 3], bd[desc_len - 2], bd[desc_len - 1]]);
        if block_len != LOGICAL_BLOCK_SIZE {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
    }
    Ok(&list[header + bd_len..])
}

/// `params` with the changeable values of `page` (PAGE CODE, PAGE LENGTH and the rest) taken
/// from it, or INVALID FIELD IN PARAMETER LIST when the page is unknown, has the wrong length
/// or differs from the current page in a bit that is not changeable. The PS bit is reserved in
/// MODE SELECT and ignored.
fn select_page(page: &[u8], params: ModeParams) -> Result<ModeParams, Sense> {
    let code = page[0] & 0x3F;
    let bad = Sense::INVALID_FIELD_IN_PARAMETER_LIST;
    let current = mode_page(code, PageControl::Current, &params).ok_or(bad)?;
    let mask = changeable(code).ok_or(bad)?;
    if page.len() != current.len() {
        return Err(bad);
    }
    let fixed_differs = page.iter().zip(&current).zip(&mask).skip(1).any(|((p, c), m)| (p ^ c) & !m != 0);
    if fixed_differs {
        return Err(bad);
    }
    let mut new = params;
    if code == CONTROL_PAGE {
        new.swp = page[SWP_BYTE] & SWP_BIT != 0;
    }
    Ok(new)
}
