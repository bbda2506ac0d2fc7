//! A minimal raw iSCSI initiator for tests that must send exact PDUs: it plays the initiator
//! with the `forkd-iscsi` codec ([`iscsi::pdu::decode`], [`Pdu::encode`]) over a blocking TCP
//! socket, one connection per session, LUN 0, ErrorRecoveryLevel 0.
//!
//! It owns the initiator's numbering (CmdSN, ExpStatSN, ITTs) and follows what the target
//! answers (ExpCmdSN, MaxCmdSN). Everything it sends can also be built by hand and sent with
//! [`Initiator::send_raw`], which is what bad-input tests do; every read is bounded by a
//! timeout, so a target that never answers fails a test instead of hanging it.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use iscsi::keys::{encode_hex, encode_text, parse_text};
use iscsi::login::ChapAlgorithm;
use iscsi::pdu::{
    decode, DataOut, LoginRequest, LoginResponse, LogoutRequest, NopOut, R2t, ScsiCommand, TaskMgmtRequest,
    RESERVED_TAG,
};
use iscsi::{Bhs, Digests, Pdu};

/// Longest any single socket read or write may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Logical block size of forkd's iSCSI LUNs.
pub const BLOCK: usize = 512;
/// The target name of volume `volume`.
pub fn target_name(volume: &str) -> String {
    format!("iqn.2026-11.dev.forkd:{volume}")
}

/// SCSI status CHECK CONDITION.
pub const CHECK_CONDITION: u8 = 0x02;
/// SCSI status GOOD.
pub const GOOD: u8 = 0x00;

/// How to log in.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    /// InitiatorName.
    pub initiator: String,
    /// TargetName.
    pub target: String,
    /// CHAP name and secret (one-way CHAP with MD5), or `None` for `AuthMethod=None`.
    pub chap: Option<(String, Vec<u8>)>,
    /// Operational keys offered in the operational stage, in order.
    pub operational: Vec<(String, String)>,
    /// Low byte of the ISID (sessions of one test differ by it).
    pub isid_tail: u8,
}

impl LoginOptions {
    /// `AuthMethod=None`, no digests, InitialR2T=No, ImmediateData=Yes, FirstBurstLength 64 KiB,
    /// MaxBurstLength 256 KiB and MaxRecvDataSegmentLength 256 KiB.
    pub fn new(initiator: &str, target: &str) -> LoginOptions {
        let op = [
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("FirstBurstLength", "65536"),
            ("MaxBurstLength", "262144"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("ErrorRecoveryLevel", "0"),
        ];
        LoginOptions {
            initiator: initiator.to_string(),
            target: target.to_string(),
            chap: None,
            operational: op.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            isid_tail: 1,
        }
    }

    /// Replace (or add) one operational key.
    pub fn set(mut self, key: &str, value: &str) -> LoginOptions {
        match self.operational.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = value.to_string(),
            None => self.operational.push((key.to_string(), value.to_string())),
        }
        self
    }
}

/// A login the target refused: the Login Response carrying the non-zero status.
#[derive(Debug, Clone)]
pub struct LoginRefused {
    /// Status-Class and Status-Detail as one number (0x0203 is "target not found").
    pub status: u16,
    /// The whole response.
    pub response: LoginResponse,
}

/// The outcome of one SCSI command.
#[derive(Debug, Clone, Default)]
pub struct ScsiResult {
    /// SCSI status.
    pub status: u8,
    /// iSCSI Response field of the SCSI Response (0: command completed at target).
    pub response: u8,
    /// Data-In, placed at the buffer offsets the target gave.
    pub data: Vec<u8>,
    /// Sense data (without the SenseLength prefix).
    pub sense: Vec<u8>,
    /// O bit.
    pub overflow: bool,
    /// U bit.
    pub underflow: bool,
    /// Residual Count.
    pub residual: u32,
    /// R2Ts the target sent for this command.
    pub r2ts: Vec<R2t>,
}

impl ScsiResult {
    /// The sense key, if there is sense data.
    pub fn sense_key(&self) -> Option<u8> {
        self.sense.get(2).map(|b| b & 0x0f)
    }

    /// (sense key, ASC, ASCQ) of fixed-format sense data.
    pub fn key_asc_ascq(&self) -> Option<(u8, u8, u8)> {
        Some((self.sense_key()?, *self.sense.get(12)?, *self.sense.get(13)?))
    }
}

/// One initiator connection.
#[derive(Debug)]
pub struct Initiator {
    /// The socket (public so tests can send arbitrary bytes).
    pub stream: TcpStream,
    /// Digests in force (none during login).
    pub digests: Digests,
    /// CmdSN of the next non-immediate request.
    pub cmd_sn: u32,
    /// ExpStatSN to send.
    pub exp_stat_sn: u32,
    /// The target's latest ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// The target's latest MaxCmdSN.
    pub max_cmd_sn: u32,
    /// The keys the target answered in the last login response.
    pub answered: Vec<(String, String)>,
    /// The TSIH the target assigned.
    pub tsih: u16,
    /// Chunk size of Data-Out PDUs.
    pub data_out_chunk: usize,
    /// The MaxRecvDataSegmentLength this initiator declared: a longer data segment from the
    /// target is an error (RFC 7143 §13.12), as it would be for a real initiator.
    pub max_recv: u32,
    buf: Vec<u8>,
    next_itt: u32,
    isid: [u8; 6],
}

impl Initiator {
    /// Connect to `addr` (bounded) without sending anything.
    pub fn connect(addr: &str) -> Initiator {
        let sa: std::net::SocketAddr = addr.parse().unwrap_or_else(|e| panic!("address {addr}: {e}"));
        let stream = TcpStream::connect_timeout(&sa, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to iSCSI {addr}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("write timeout");
        let _ = stream.set_nodelay(true);
        Initiator {
            stream,
            digests: Digests::NONE,
            cmd_sn: 1,
            exp_stat_sn: 0,
            exp_cmd_sn: 1,
            max_cmd_sn: 1,
            answered: Vec::new(),
            tsih: 0,
            data_out_chunk: 65536,
            max_recv: 8192,
            buf: Vec::new(),
            next_itt: 0x100,
            isid: [0x80, 0x12, 0x34, 0x56, 0x00, 1],
        }
    }

    /// Connect and log in to a normal session, panicking if the target refuses.
    pub fn open(addr: &str, opts: &LoginOptions) -> Initiator {
        Initiator::try_open(addr, opts).unwrap_or_else(|r| {
            panic!("login to {} refused with status {:#06x}: {:?}", opts.target, r.status, r.response)
        })
    }

    /// Connect and log in; `Err` with the refusing Login Response.
    pub fn try_open(addr: &str, opts: &LoginOptions) -> Result<Initiator, LoginRefused> {
        let mut c = Initiator::connect(addr);
        c.login(opts)?;
        Ok(c)
    }

    /// A fresh Initiator Task Tag.
    pub fn itt(&mut self) -> u32 {
        self.next_itt += 1;
        self.next_itt
    }

    /// Takes the CmdSN of the next non-immediate request.
    pub fn take_cmd_sn(&mut self) -> u32 {
        let sn = self.cmd_sn;
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        sn
    }

    fn login_pdu(&self, transit: bool, csg: u8, nsg: u8, pairs: &[(String, String)]) -> Pdu {
        let req = LoginRequest {
            transit,
            cont: false,
            csg,
            nsg: if transit { nsg } else { 0 },
            version_max: 0,
            version_min: 0,
            isid: self.isid,
            tsih: 0,
            itt: 0,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        Pdu::with_data(req, encode_text(pairs))
    }

    /// One login round trip: the response, or `Err` when its status is not 0.
    fn login_step(&mut self, pdu: &Pdu) -> Result<(LoginResponse, Vec<(String, String)>), LoginRefused> {
        self.send(pdu).expect("send a Login Request");
        let r = self.recv().unwrap_or_else(|e| panic!("no Login Response: {e}"));
        let Bhs::LoginResponse(resp) = r.bhs else { panic!("expected a Login Response, got {:?}", r.bhs) };
        let status = u16::from_be_bytes([resp.status_class, resp.status_detail]);
        if status != 0 {
            return Err(LoginRefused { status, response: resp });
        }
        let pairs = parse_text(&r.data).unwrap_or_else(|e| panic!("Login Response text: {e}"));
        Ok((resp, pairs))
    }

    /// Log in to a normal session with `opts` (security stage, then operational stage).
    pub fn login(&mut self, opts: &LoginOptions) -> Result<(), LoginRefused> {
        self.isid[5] = opts.isid_tail;
        let s = |k: &str, v: &str| (k.to_string(), v.to_string());
        let mut first =
            vec![s("InitiatorName", &opts.initiator), s("TargetName", &opts.target), s("SessionType", "Normal")];
        match &opts.chap {
            None => {
                first.push(s("AuthMethod", "None"));
                let (resp, _) = self.login_step(&self.login_pdu(true, 0, 1, &first))?;
                assert!(resp.transit && resp.nsg == 1, "the target did not move to the operational stage: {resp:?}");
            }
            Some((user, secret)) => {
                first.push(s("AuthMethod", "CHAP"));
                let (_, pairs) = self.login_step(&self.login_pdu(false, 0, 0, &first))?;
                assert!(pairs.contains(&s("AuthMethod", "CHAP")), "AuthMethod answer: {pairs:?}");
                let (_, pairs) = self.login_step(&self.login_pdu(false, 0, 0, &[s("CHAP_A", "5")]))?;
                let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
                let id: u8 = get("CHAP_I").and_then(|v| v.parse().ok()).expect("CHAP_I");
                let challenge =
                    get("CHAP_C").and_then(|v| iscsi::keys::decode_binary(&v)).expect("CHAP_C in hex or base64");
                let r = ChapAlgorithm::Md5.response(id, secret, &challenge);
                let answer = [s("CHAP_N", user), s("CHAP_R", &encode_hex(&r))];
                let (resp, _) = self.login_step(&self.login_pdu(true, 0, 1, &answer))?;
                assert!(resp.transit && resp.nsg == 1, "the target did not move to the operational stage: {resp:?}");
            }
        }
        let (resp, pairs) = self.login_step(&self.login_pdu(true, 1, 3, &opts.operational))?;
        assert!(resp.transit && resp.nsg == 3, "the target did not enter the full feature phase: {resp:?}");
        assert_ne!(resp.tsih, 0, "no TSIH in the final Login Response");
        self.tsih = resp.tsih;
        let on = |k: &str| pairs.iter().any(|(key, v)| key == k && v == "CRC32C");
        self.digests = Digests { header: on("HeaderDigest"), data: on("DataDigest") };
        let declared = opts.operational.iter().find(|(k, _)| k == "MaxRecvDataSegmentLength");
        self.max_recv = declared.and_then(|(_, v)| v.parse().ok()).unwrap_or(8192);
        self.answered = pairs;
        Ok(())
    }

    /// The value the target answered for `key` in the final Login Response.
    pub fn answered(&self, key: &str) -> Option<&str> {
        self.answered.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Send raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// The bytes of `pdu` with the digests in force.
    pub fn encode(&self, pdu: &Pdu) -> Vec<u8> {
        pdu.encode(self.digests).unwrap_or_else(|e| panic!("encode {:?}: {e}", pdu.bhs))
    }

    /// Send one PDU with the digests in force.
    pub fn send(&mut self, pdu: &Pdu) -> std::io::Result<()> {
        let b = self.encode(pdu);
        self.send_raw(&b)
    }

    /// Follow the numbering of a PDU from the target.
    fn note(&mut self, pdu: &Pdu) {
        let (stat, exp, max) = match &pdu.bhs {
            Bhs::NopIn(p) => (Some(p.stat_sn), p.exp_cmd_sn, p.max_cmd_sn),
            Bhs::ScsiResponse(p) => (Some(p.stat_sn), p.exp_cmd_sn, p.max_cmd_sn),
            Bhs::TaskMgmtResponse(p) => (Some(p.stat_sn), p.exp_cmd_sn, p.max_cmd_sn),
            Bhs::LoginResponse(p) => (Some(p.stat_sn), p.exp_cmd_sn, p.max_cmd_sn),
            Bhs::TextResponse(p) => (Some(p.stat_sn), p.exp_cmd_sn, p.max_cmd_sn),
            Bhs::LogoutResponse(p) => (Some(p.stat_sn), p.exp_cmd_sn, p.max_cmd_sn),
            Bhs::Reject(p) => (Some(p.stat_sn), p.exp_cmd_sn, p.max_cmd_sn),
            Bhs::DataIn(p) => (p.status.map(|_| p.stat_sn), p.exp_cmd_sn, p.max_cmd_sn),
            Bhs::R2t(p) => (None, p.exp_cmd_sn, p.max_cmd_sn),
            _ => (None, self.exp_cmd_sn, self.max_cmd_sn),
        };
        if let Some(s) = stat {
            self.exp_stat_sn = s.wrapping_add(1);
        }
        self.exp_cmd_sn = exp;
        self.max_cmd_sn = max;
    }

    /// Receive one PDU (bounded by [`IO_TIMEOUT`]). A PDU the codec refuses is an
    /// `InvalidData` error; a close is `UnexpectedEof`.
    pub fn recv(&mut self) -> std::io::Result<Pdu> {
        self.recv_within(IO_TIMEOUT)?.ok_or_else(|| std::io::Error::new(ErrorKind::TimedOut, "no PDU within 30 s"))
    }

    /// Receive one PDU if one arrives within `timeout`; `Ok(None)` when none did.
    pub fn recv_within(&mut self, timeout: Duration) -> std::io::Result<Option<Pdu>> {
        let started = Instant::now();
        loop {
            match decode(&self.buf, self.digests, self.max_recv) {
                Ok(Some((pdu, n))) => {
                    self.buf.drain(..n);
                    self.note(&pdu);
                    return Ok(Some(pdu));
                }
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::new(ErrorKind::InvalidData, format!("bad PDU from target: {e}"))),
            }
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left.max(Duration::from_millis(1)))).expect("read timeout");
            let mut tmp = vec![0u8; 256 << 10];
            let r = self.stream.read(&mut tmp);
            self.stream.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
            match r {
                Ok(0) => return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "the target closed the connection")),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Wait (bounded) until the target closes the connection: `true` on EOF or a reset,
    /// `false` if it is still open after `timeout`. PDUs that arrive first are returned
    /// through `received` (undecodable bytes end the collection).
    pub fn wait_closed_collect(&mut self, timeout: Duration, received: &mut Vec<Pdu>) -> bool {
        let started = Instant::now();
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return false;
            }
            match self.recv_within(left) {
                Ok(Some(p)) => received.push(p),
                Ok(None) => return false,
                Err(e) if e.kind() == ErrorKind::InvalidData => {
                    // Keep reading raw bytes until the close.
                    self.buf.clear();
                    let mut tmp = [0u8; 4096];
                    loop {
                        let left = timeout.saturating_sub(started.elapsed());
                        if left.is_zero() {
                            return false;
                        }
                        let _ = self.stream.set_read_timeout(Some(left));
                        match self.stream.read(&mut tmp) {
                            Ok(0) => return true,
                            Ok(_) => {}
                            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                            Err(_) => return true,
                        }
                    }
                }
                Err(_) => return true,
            }
        }
    }

    /// Bytes received but not yet decoded (what a closed connection left half-sent).
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The bytes of a SCSI Command PDU (`write` and the data decide the W bit). Takes a CmdSN
    /// unless `immediate`.
    pub fn command_pdu(&mut self, cdb: &[u8], edtl: u32, read: bool, write: bool, immediate_data: &[u8]) -> Pdu {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let cmd = ScsiCommand {
            immediate: false,
            final_pdu: true,
            read,
            write,
            attr: 1, // SIMPLE
            lun: 0,
            itt: self.itt(),
            expected_length: edtl,
            cmd_sn: self.take_cmd_sn(),
            exp_stat_sn: self.exp_stat_sn,
            cdb: c,
        };
        Pdu::with_data(cmd, immediate_data.to_vec())
    }

    /// A Data-Out PDU.
    pub fn data_out_pdu(&self, itt: u32, ttt: u32, data_sn: u32, offset: u32, data: &[u8], final_pdu: bool) -> Pdu {
        let d = DataOut { final_pdu, lun: 0, itt, ttt, exp_stat_sn: self.exp_stat_sn, data_sn, buffer_offset: offset };
        Pdu::with_data(d, data.to_vec())
    }

    /// Answer one R2T with Data-Out PDUs of [`Initiator::data_out_chunk`] bytes taken from
    /// `data` at the R2T's offset and length.
    pub fn answer_r2t(&mut self, r2t: &R2t, data: &[u8]) -> std::io::Result<()> {
        let start = usize::try_from(r2t.buffer_offset).expect("offset");
        let end = start + usize::try_from(r2t.desired_length).expect("length");
        assert!(end <= data.len(), "the target asked for bytes {start}..{end} of a {}-byte write", data.len());
        let mut out = Vec::new();
        let mut off = start;
        let mut sn = 0;
        while off < end {
            let n = self.data_out_chunk.min(end - off);
            let at = u32::try_from(off).expect("offset");
            out.extend(self.encode(&self.data_out_pdu(r2t.itt, r2t.ttt, sn, at, &data[off..off + n], off + n == end)));
            off += n;
            sn += 1;
        }
        self.send_raw(&out)
    }

    /// Collect the outcome of the command `itt`, answering its R2Ts from `data_out`. Other
    /// PDUs are an error.
    pub fn wait_command(&mut self, itt: u32, data_out: &[u8]) -> std::io::Result<ScsiResult> {
        let mut res = ScsiResult::default();
        loop {
            let p = self.recv()?;
            match &p.bhs {
                Bhs::R2t(r) if r.itt == itt => {
                    self.answer_r2t(r, data_out)?;
                    res.r2ts.push(r.clone());
                }
                Bhs::DataIn(d) if d.itt == itt => {
                    let at = usize::try_from(d.buffer_offset).expect("offset");
                    if res.data.len() < at + p.data.len() {
                        res.data.resize(at + p.data.len(), 0);
                    }
                    res.data[at..at + p.data.len()].copy_from_slice(&p.data);
                    if let Some(st) = d.status {
                        res.status = st;
                        res.overflow = d.overflow;
                        res.underflow = d.underflow;
                        res.residual = d.residual_count;
                        return Ok(res);
                    }
                }
                Bhs::ScsiResponse(r) if r.itt == itt => {
                    res.status = r.status;
                    res.response = r.response;
                    res.overflow = r.overflow;
                    res.underflow = r.underflow;
                    res.residual = r.residual_count;
                    if p.data.len() >= 2 {
                        let n = usize::from(u16::from_be_bytes([p.data[0], p.data[1]]));
                        res.sense = p.data[2..(2 + n).min(p.data.len())].to_vec();
                    }
                    return Ok(res);
                }
                other => {
                    return Err(std::io::Error::new(
                        ErrorKind::InvalidData,
                        format!("unexpected PDU while waiting for task {itt:#x}: {other:?}"),
                    ))
                }
            }
        }
    }

    /// Run one command: no immediate data, F bit set, Data-Out only when solicited.
    pub fn scsi(&mut self, cdb: &[u8], edtl: u32, read: bool, data_out: &[u8]) -> ScsiResult {
        let pdu = self.command_pdu(cdb, edtl, read, !data_out.is_empty(), &[]);
        let itt = pdu.bhs.itt();
        self.send(&pdu).expect("send a SCSI Command");
        self.wait_command(itt, data_out).unwrap_or_else(|e| panic!("SCSI command {:#04x}: {e}", cdb[0]))
    }

    /// READ (16) of `blocks` blocks at `lba`.
    pub fn read16(&mut self, lba: u64, blocks: u32) -> ScsiResult {
        let edtl = blocks * u32::try_from(BLOCK).expect("block");
        self.scsi(&read16_cdb(lba, blocks), edtl, true, &[])
    }

    /// WRITE (16) of `data` (whole blocks) at `lba`.
    pub fn write16(&mut self, lba: u64, data: &[u8]) -> ScsiResult {
        let blocks = u32::try_from(data.len() / BLOCK).expect("blocks");
        self.scsi(&write16_cdb(lba, blocks), u32::try_from(data.len()).expect("len"), false, data)
    }

    /// TEST UNIT READY.
    pub fn test_unit_ready(&mut self) -> ScsiResult {
        self.scsi(&[0u8; 6], 0, false, &[])
    }

    /// A NOP-Out ping (non-immediate, takes a CmdSN) carrying `data`.
    pub fn nop_pdu(&mut self, data: &[u8]) -> Pdu {
        let n = NopOut {
            immediate: false,
            lun: 0,
            itt: self.itt(),
            ttt: RESERVED_TAG,
            cmd_sn: self.take_cmd_sn(),
            exp_stat_sn: self.exp_stat_sn,
        };
        Pdu::with_data(n, data.to_vec())
    }

    /// Ping with `data` and return the NOP-In that answers it; other PDUs before it are
    /// returned too.
    pub fn ping(&mut self, data: &[u8]) -> (Pdu, Vec<Pdu>) {
        let pdu = self.nop_pdu(data);
        let itt = pdu.bhs.itt();
        self.send(&pdu).expect("send a NOP-Out");
        let mut before = Vec::new();
        for _ in 0..1000 {
            let p = self.recv().unwrap_or_else(|e| panic!("waiting for the NOP-In: {e}"));
            match &p.bhs {
                Bhs::NopIn(n) if n.itt == itt => return (p, before),
                _ => before.push(p),
            }
        }
        panic!("no NOP-In among 1000 PDUs");
    }

    /// A Task Management Function Request (immediate).
    pub fn tmf_pdu(&mut self, function: u8, referenced_task_tag: u32, ref_cmd_sn: u32) -> Pdu {
        let t = TaskMgmtRequest {
            immediate: true,
            function,
            lun: 0,
            itt: self.itt(),
            referenced_task_tag,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ref_cmd_sn,
            exp_data_sn: 0,
        };
        Pdu::new(t)
    }

    /// A Logout Request closing the session (non-immediate).
    pub fn logout_pdu(&mut self) -> Pdu {
        let l = LogoutRequest {
            immediate: false,
            reason: 0,
            itt: self.itt(),
            cid: 0,
            cmd_sn: self.take_cmd_sn(),
            exp_stat_sn: self.exp_stat_sn,
        };
        Pdu::new(l)
    }

    /// Log out and wait (bounded) for the close; panics if the logout is not answered.
    pub fn logout(mut self) {
        let pdu = self.logout_pdu();
        let itt = pdu.bhs.itt();
        self.send(&pdu).expect("send a Logout Request");
        let p = self.recv().unwrap_or_else(|e| panic!("waiting for the Logout Response: {e}"));
        match &p.bhs {
            Bhs::LogoutResponse(r) if r.itt == itt && r.response == 0 => {}
            other => panic!("expected a Logout Response, got {other:?}"),
        }
        let _ = self.stream.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        let _ = self.wait_closed_collect(Duration::from_secs(10), &mut rest);
    }
}

/// The CDB of READ (16).
pub fn read16_cdb(lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x88;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// The CDB of WRITE (16).
pub fn write16_cdb(lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = read16_cdb(lba, blocks);
    c[0] = 0x8a;
    c
}
