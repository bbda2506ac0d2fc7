//! Reservations: persistent reservations (SPC-4 §5.7): PERSISTENT RESERVE IN (READ KEYS, READ
//! RESERVATION, REPORT CAPABILITIES, READ FULL STATUS) and OUT (REGISTER, REGISTER AND IGNORE
//! EXISTING KEY, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT AND ABORT); the SPC-2 reservations
//! of RESERVE / RELEASE (6) and (10); and the conflict rule every other command goes through.
//!
//! SPC-2 reservations are the whole logical unit held by one I_T nexus (no extents, no third
//! party). While one is held, another nexus may only run INQUIRY, REQUEST SENSE, REPORT LUNS,
//! PREVENT ALLOW MEDIUM REMOVAL with PREVENT 0 and RELEASE (which does nothing); everything
//! else is RESERVATION CONFLICT, and so are PERSISTENT RESERVE IN/OUT from every nexus, the
//! holder too (SPC-3 §5.6.1). The other way round, RESERVE and RELEASE while persistent
//! registrations exist follow SPC-4 §5.13.3: from the persistent reservation holder (or a
//! registrant, for the registrants-only and all-registrants types) they complete and do
//! nothing, from anyone else they conflict. Unlike persistent reservations, an SPC-2
//! reservation ends with its I_T nexus and with a logical unit reset: the transport reports
//! those through [`super::LunState::nexus_lost`] and [`super::LunState::reset`].
//!
//! State: one registration per I_T nexus (the `initiator` string given to `execute`), in
//! registration order, and at most one reservation with its type and holder. For the
//! all-registrants types every registrant is a holder. Unsupported, and refused with sense:
//! APTPL (nothing survives a restart), SPEC_I_PT, ALL_TG_PT, REGISTER AND MOVE. Unit
//! attentions to other nexuses after a preempt or release are not generated (the model has no
//! unit attention queue); there are no tasks to abort for PREEMPT AND ABORT.

use super::{len32, op, truncate, Access, Cdb, CmdResult, Failure, Sense};

const WRITE_EXCLUSIVE: u8 = 1;
const EXCLUSIVE_ACCESS: u8 = 3;
const WRITE_EXCLUSIVE_RO: u8 = 5;
const EXCLUSIVE_ACCESS_RO: u8 = 6;
const WRITE_EXCLUSIVE_AR: u8 = 7;
const EXCLUSIVE_ACCESS_AR: u8 = 8;

#[derive(Debug, Clone)]
struct Reservation {
    holder: String,
    kind: u8,
}

impl Reservation {
    fn all_registrants(&self) -> bool {
        matches!(self.kind, WRITE_EXCLUSIVE_AR | EXCLUSIVE_ACCESS_AR)
    }
}

/// The persistent reservation state of one LUN.
#[derive(Debug, Clone, Default)]
pub(crate) struct PrState {
    generation: u32,
    /// `(I_T nexus, key)`, in registration order.
    registrations: Vec<(String, u64)>,
    reservation: Option<Reservation>,
    /// The I_T nexus holding the SPC-2 reservation of the logical unit, if any.
    spc2: Option<String>,
}

fn valid_type(t: u8) -> bool {
    matches!(
        t,
        WRITE_EXCLUSIVE
            | EXCLUSIVE_ACCESS
            | WRITE_EXCLUSIVE_RO
            | EXCLUSIVE_ACCESS_RO
            | WRITE_EXCLUSIVE_AR
            | EXCLUSIVE_ACCESS_AR
    )
}

/// The iSCSI TransportID (SPC-4 §7.6.4.6) for READ FULL STATUS: the I_T nexus id as the
/// iSCSI name, NUL-terminated and padded to a multiple of 4 bytes (at least 20 in all); format
/// 01b (name plus ISID) when the id has the `,i,0x` separator RFC 7143 uses for it.
fn transport_id(nexus: &str) -> Vec<u8> {
    let name: Vec<u8> = nexus.bytes().filter(|&b| b != 0).take(220).collect();
    let format = if nexus.contains(",i,0x") { 0x40 } else { 0x00 };
    let padded = (name.len() + 1).div_ceil(4).max(4) * 4;
    let mut t = vec![format | 0x05, 0];
    t.extend_from_slice(&u16::try_from(padded).unwrap_or(u16::MAX).to_be_bytes());
    t.extend_from_slice(&name);
    t.resize(4 + padded, 0);
    t
}

impl PrState {
    fn key_of(&self, nexus: &str) -> Option<u64> {
        self.registrations.iter().find(|(n, _)| n == nexus).map(|&(_, k)| k)
    }

    fn is_holder(&self, nexus: &str) -> bool {
        match &self.reservation {
            Some(r) if r.all_registrants() => self.key_of(nexus).is_some(),
            Some(r) => r.holder == nexus,
            None => false,
        }
    }

    /// Whether the command `c` of class `access` from `nexus` is refused with RESERVATION
    /// CONFLICT.
    pub(crate) fn conflicts(&self, nexus: &str, c: &Cdb, access: Access) -> bool {
        if let Some(holder) = &self.spc2 {
            let pr = matches!(c.opcode(), op::PERSISTENT_RESERVE_IN | op::PERSISTENT_RESERVE_OUT);
            if pr || (holder != nexus && !spc2_allowed(c)) {
                return true;
            }
        }
        let Some(r) = &self.reservation else { return false };
        if access == Access::Always || self.is_holder(nexus) {
            return false;
        }
        let registered = self.key_of(nexus).is_some();
        match r.kind {
            WRITE_EXCLUSIVE => access == Access::Write,
            EXCLUSIVE_ACCESS => true,
            WRITE_EXCLUSIVE_RO | WRITE_EXCLUSIVE_AR => !registered && access == Access::Write,
            _ => !registered,
        }
    }

    /// Removes the registration of `nexus`; a reservation it held alone goes with it, and an
    /// all-registrants reservation goes with the last registrant.
    fn unregister(&mut self, nexus: &str) {
        self.registrations.retain(|(n, _)| n != nexus);
        self.drop_orphan_reservation();
    }

    fn drop_orphan_reservation(&mut self) {
        let keep = match &self.reservation {
            Some(r) if r.all_registrants() => !self.registrations.is_empty(),
            Some(r) => self.registrations.iter().any(|(n, _)| *n == r.holder),
            None => true,
        };
        if !keep {
            self.reservation = None;
        }
    }

    pub(crate) fn reserve_in(&self, c: &Cdb) -> CmdResult {
        let alloc = u32::from(c.u16(7));
        let mut d = self.generation.to_be_bytes().to_vec();
        match c.sa() {
            0x00 => {
                d.extend_from_slice(&len32(8 * self.registrations.len()));
                for (_, k) in &self.registrations {
                    d.extend_from_slice(&k.to_be_bytes());
                }
            }
            0x01 => match &self.reservation {
                None => d.extend_from_slice(&[0; 4]),
                Some(r) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    let key = if r.all_registrants() { 0 } else { self.key_of(&r.holder).unwrap_or(0) };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, r.kind & 0x0F, 0, 0]);
                }
            },
            0x03 => {
                let mut descs = Vec::new();
                for (n, k) in &self.registrations {
                    let holder = self.is_holder(n);
                    descs.extend_from_slice(&k.to_be_bytes());
                    descs.extend_from_slice(&[0; 4]);
                    descs.push(u8::from(holder));
                    descs.push(match &self.reservation {
                        Some(r) if holder => r.kind & 0x0F,
                        _ => 0,
                    });
                    descs.extend_from_slice(&[0; 4]);
                    descs.extend_from_slice(&1u16.to_be_bytes()); // relative target port 1
                    let tid = transport_id(n);
                    descs.extend_from_slice(&len32(tid.len()));
                    descs.extend_from_slice(&tid);
                }
                d.extend_from_slice(&len32(descs.len()));
                d.extend_from_slice(&descs);
            }
            0x02 => {
                // Length 8; no CRH/SIP_C/ATP_C/PTPL_C; TMV; the type mask.
                d = vec![0x00, 0x08, 0x00, 0x80, 0xEA, 0x01, 0x00, 0x00];
            }
            _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
        }
        Ok(truncate(d, alloc))
    }

    pub(crate) fn reserve_out(&mut self, c: &Cdb, data_out: &[u8], nexus: &str) -> CmdResult {
        let sa = c.sa();
        let scope = c.b(2) >> 4;
        let kind = c.b(2) & 0x0F;
        let plen = c.u32(5);
        if sa > 0x06 {
            // REGISTER AND MOVE (7) and anything else is not supported.
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        if plen != 24 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let p = data_out.get(..24).ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
        let key = u64::from_be_bytes([p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]]);
        let sa_key = u64::from_be_bytes([p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15]]);
        // SPEC_I_PT, ALL_TG_PT and APTPL are not supported.
        if p[20] & 0x0D != 0 {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
        let needs_type = matches!(sa, 0x01 | 0x02 | 0x04 | 0x05);
        if needs_type && (scope != 0 || !valid_type(kind)) {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        let current = self.key_of(nexus);
        match sa {
            0x00 | 0x06 => {
                if sa == 0x00 && current.unwrap_or(0) != key {
                    return Err(Failure::Conflict);
                }
                match (current, sa_key) {
                    (None, 0) => {}
                    (Some(_), 0) => {
                        self.unregister(nexus);
                        self.bump();
                    }
                    (Some(_), k) => {
                        for (n, slot) in &mut self.registrations {
                            if n.as_str() == nexus {
                                *slot = k;
                            }
                        }
                        self.bump();
                    }
                    (None, k) => {
                        self.registrations.push((nexus.to_string(), k));
                        self.bump();
                    }
                }
                Ok(Vec::new())
            }
            _ => {
                if current != Some(key) {
                    return Err(Failure::Conflict);
                }
                match sa {
                    0x01 => self.reserve(nexus, kind),
                    0x02 => self.release(nexus, kind),
                    0x03 => {
                        self.registrations.clear();
                        self.reservation = None;
                        self.bump();
                        Ok(Vec::new())
                    }
                    _ => self.preempt(nexus, kind, sa_key),
                }
            }
        }
    }

    /// Under persistent registrations, RESERVE and RELEASE do nothing for the holder (or a
    /// registrant of a registrants-only or all-registrants type) and conflict for anyone
    /// else; `None` when no registration exists and SPC-2 rules apply.
    fn spc2_under_pr(&self, nexus: &str) -> Option<CmdResult> {
        if self.registrations.is_empty() && self.reservation.is_none() {
            return None;
        }
        let registered = self.key_of(nexus).is_some();
        let shared = self.reservation.as_ref().is_some_and(|r| r.kind >= WRITE_EXCLUSIVE_RO);
        if self.is_holder(nexus) || (registered && shared) {
            return Some(Ok(Vec::new()));
        }
        Some(Err(Failure::Conflict))
    }

    /// RESERVE (6) / (10): the logical unit for `nexus`. Re-reserving is allowed; a holder
    /// other than `nexus` was already refused by [`PrState::conflicts`].
    pub(crate) fn reserve_spc2(&mut self, c: &Cdb, nexus: &str) -> CmdResult {
        check_spc2_cdb(c)?;
        if let Some(r) = self.spc2_under_pr(nexus) {
            return r;
        }
        self.spc2 = Some(nexus.to_string());
        Ok(Vec::new())
    }

    /// RELEASE (6) / (10): ends the SPC-2 reservation if `nexus` holds it; from anyone else it
    /// completes and changes nothing.
    pub(crate) fn release_spc2(&mut self, c: &Cdb, nexus: &str) -> CmdResult {
        check_spc2_cdb(c)?;
        if let Some(r) = self.spc2_under_pr(nexus) {
            return r;
        }
        if self.spc2.as_deref() == Some(nexus) {
            self.spc2 = None;
        }
        Ok(Vec::new())
    }

    /// The I_T nexus `nexus` is gone (logout, dropped connection, session reinstatement): its
    /// SPC-2 reservation ends. Persistent reservations stay.
    pub(crate) fn nexus_lost(&mut self, nexus: &str) {
        if self.spc2.as_deref() == Some(nexus) {
            self.spc2 = None;
        }
    }

    /// A logical unit reset (LUN RESET, TARGET WARM/COLD RESET): the SPC-2 reservation ends.
    /// Persistent reservations stay.
    pub(crate) fn reset(&mut self) {
        self.spc2 = None;
    }

    fn bump(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    fn reserve(&mut self, nexus: &str, kind: u8) -> CmdResult {
        let held = self.reservation.as_ref().map(|r| r.kind);
        match held {
            None => {
                self.reservation = Some(Reservation { holder: nexus.to_string(), kind });
                Ok(Vec::new())
            }
            Some(k) if k == kind && self.is_holder(nexus) => Ok(Vec::new()),
            Some(_) => Err(Failure::Conflict),
        }
    }

    fn release(&mut self, nexus: &str, kind: u8) -> CmdResult {
        let held = self.reservation.as_ref().map(|r| r.kind);
        match held {
            Some(k) if self.is_holder(nexus) => {
                if k != kind {
                    return Err(Sense::INVALID_RELEASE.into());
                }
                self.reservation = None;
                Ok(Vec::new())
            }
            // No reservation, or held by someone else: nothing to do.
            _ => Ok(Vec::new()),
        }
    }

    fn preempt(&mut self, nexus: &str, kind: u8, sa_key: u64) -> CmdResult {
        let Some(r) = self.reservation.clone() else {
            return self.remove_key(nexus, sa_key);
        };
        if r.all_registrants() {
            if sa_key == 0 {
                self.registrations.retain(|(n, _)| n == nexus);
                self.reservation = Some(Reservation { holder: nexus.to_string(), kind });
                self.bump();
                return Ok(Vec::new());
            }
            return self.remove_key(nexus, sa_key);
        }
        let holder_key = self.key_of(&r.holder);
        if holder_key == Some(sa_key) {
            self.registrations.retain(|(n, k)| n == nexus || *k != sa_key);
            self.reservation = Some(Reservation { holder: nexus.to_string(), kind });
            self.bump();
            return Ok(Vec::new());
        }
        self.remove_key(nexus, sa_key)
    }

    /// PREEMPT without touching the reservation: removes every other registration with
    /// `sa_key`; none found is a conflict.
    fn remove_key(&mut self, nexus: &str, sa_key: u64) -> CmdResult {
        if sa_key == 0 {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
        let before = self.registrations.len();
        self.registrations.retain(|(n, k)| n == nexus || *k != sa_key);
        if self.registrations.len() == before {
            return Err(Failure::Conflict);
        }
        self.drop_orphan_reservation();
        self.bump();
        Ok(Vec::new())
    }
}

/// Commands another I_T nexus may run while an SPC-2 reservation is held (SPC-2 §5.5.1).
fn spc2_allowed(c: &Cdb) -> bool {
    match c.opcode() {
        op::INQUIRY | op::REQUEST_SENSE | op::REPORT_LUNS | op::RELEASE_6 | op::RELEASE_10 => true,
        op::PREVENT_ALLOW => c.b(4) & 0x03 == 0,
        _ => false,
    }
}

/// RESERVE / RELEASE reserve the whole logical unit for the sender only: the obsolete
/// extent and SCSI-2 reservation-id fields and third-party reservations are refused. Bits 7-5
/// of byte 1 (the SCSI-1 LUN) are ignored.
fn check_spc2_cdb(c: &Cdb) -> Result<(), Failure> {
    let bad = match c.opcode() {
        op::RESERVE_6 | op::RELEASE_6 => c.b(1) & 0x1F != 0 || c.b(2) != 0 || c.u16(3) != 0,
        // 3RDPTY, LONGID, EXTENT; the obsolete reservation id.
        _ => c.b(1) & 0x13 != 0 || c.b(2) != 0,
    };
    if bad {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    Ok(())
}
