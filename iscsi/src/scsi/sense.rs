//! SCSI status codes and sense data in the fixed format (SPC-4 §4.5.3). The model never
//! reports descriptor-format sense: the control mode page it returns has `D_SENSE` = 0.
//!
//! [`Sense`] is a plain value (key, additional sense code and qualifier, and the optional
//! INFORMATION field); the named constants are the conditions the model reports, so every
//! caller spells a condition the same way.

/// SCSI status bytes (SAM-5 §5.3) the model returns.
pub mod status {
    /// The command completed.
    pub const GOOD: u8 = 0x00;
    /// The command failed; sense data says why.
    pub const CHECK_CONDITION: u8 = 0x02;
    /// A persistent reservation held through another I_T nexus forbids the command.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
}

/// Sense keys (SPC-4 table 48).
pub mod key {
    /// No error.
    pub const NO_SENSE: u8 = 0x00;
    /// The medium could not be read or written.
    pub const MEDIUM_ERROR: u8 = 0x03;
    /// Bad CDB, parameter list or addressed LBA.
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    /// The medium is write protected.
    pub const DATA_PROTECT: u8 = 0x07;
    /// The data compared differ (VERIFY, COMPARE AND WRITE).
    pub const MISCOMPARE: u8 = 0x0E;
    /// ABORTED COMMAND.
    pub const ABORTED_COMMAND: u8 = 0x0B;
}

/// Sense data for a CHECK CONDITION. `information`, when set, fills the INFORMATION field and
/// sets the VALID bit (COMPARE AND WRITE and VERIFY put the offset of the first miscompare
/// there). `field`, when set, is the sense-key specific field pointer: which CDB byte (and
/// bit) is invalid, for the errors where an initiator must tell "this field is wrong" from
/// "this command is not implemented" (libiscsi reads an INVALID FIELD IN CDB without a
/// pointer, or pointing at the service action, on MAINTENANCE IN as "not implemented").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// The sense key.
    pub key: u8,
    /// The additional sense code.
    pub asc: u8,
    /// The additional sense code qualifier.
    pub ascq: u8,
    /// The INFORMATION field, if valid.
    pub information: Option<u32>,
    /// The field pointer, if valid: the byte of the CDB and, if known, the bit in it.
    pub field: Option<(u16, Option<u8>)>,
}

impl Sense {
    /// Length of fixed-format sense data as returned by [`Sense::to_fixed`].
    pub const FIXED_LEN: usize = 18;

    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    /// ILLEGAL REQUEST, INVALID FIELD IN INFORMATION UNIT: the data-out length does not match
    /// what the CDB announced (the response libiscsi's residual tests accept besides a
    /// partial transfer).
    pub const INVALID_FIELD_IN_INFORMATION_UNIT: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x0E, 0x03);
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    /// ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION.
    pub const INVALID_RELEASE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04);
    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR.
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1A, 0x00);
    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// DATA PROTECT, WRITE PROTECTED.
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    /// DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT (a thin LUN out of space).
    pub const SPACE_ALLOCATION_FAILED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
    /// MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION.
    pub const MISCOMPARE: Sense = Sense::new(key::MISCOMPARE, 0x1D, 0x00);
    /// MEDIUM ERROR, UNRECOVERED READ ERROR.
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    /// MEDIUM ERROR, WRITE ERROR.
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0C, 0x00);
    /// NO SENSE, NO ADDITIONAL SENSE INFORMATION (what REQUEST SENSE returns).
    pub const NO_SENSE: Sense = Sense::new(key::NO_SENSE, 0x00, 0x00);
    /// ABORTED COMMAND / DATA PHASE ERROR: the command's Data-Out PDUs were out of sequence.
    pub const DATA_PHASE_ERROR: Sense = Sense::new(key::ABORTED_COMMAND, 0x4B, 0x00);

    /// Sense data with the given key, ASC and ASCQ and no INFORMATION.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense { key, asc, ascq, information: None, field: None }
    }

    /// The same condition with the INFORMATION field set.
    pub const fn with_information(self, information: u32) -> Sense {
        Sense { information: Some(information), ..self }
    }

    /// The same condition pointing at byte `byte` (and bit `bit`, if given) of the CDB.
    pub const fn in_cdb(self, byte: u16, bit: Option<u8>) -> Sense {
        Sense { field: Some((byte, bit)), ..self }
    }

    /// The 18 bytes of fixed-format sense data: response code 0x70 (current error), VALID when
    /// INFORMATION is set, ADDITIONAL SENSE LENGTH 10, and the field pointer (SKSV, C/D = 1
    /// for a CDB field, BPV when the bit is known) when `field` is set.
    pub fn to_fixed(&self) -> [u8; Self::FIXED_LEN] {
        let mut b = [0u8; Self::FIXED_LEN];
        b[0] = 0x70;
        if let Some(info) = self.information {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = self.key & 0x0F;
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some((byte, bit)) = self.field {
            b[15] = 0x80 | 0x40 | bit.map_or(0, |bit| 0x08 | (bit & 0x07));
            b[16..18].copy_from_slice(&byte.to_be_bytes());
        }
        b
    }
}
