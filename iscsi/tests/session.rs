//! The full feature phase driven in memory: CmdSN ordering and the window, the write data
//! paths (immediate, unsolicited, R2T bursts), sequence errors, Data-In splitting and
//! residuals, task management, NOP, text continuation and logout.

use bytes::Bytes;
use iscsi::pdu::{DataOut, LogoutRequest, NopOut, ScsiCommand, TaskMgmtRequest, TextRequest};
use iscsi::scsi::{status, ScsiOutcome, Sense};
use iscsi::session::{tmf, Command, Event, Session, NO_TAG};
use iscsi::{Bhs, Pdu, SessionParams};

fn session(p: SessionParams) -> Session {
    Session::new(SessionParams { initiator_name: "iqn.test:i".into(), stat_sn: 10, exp_cmd_sn: 1, ..p }, 8)
}

fn write10(itt: u32, cmd_sn: u32, blocks: u16, edtl: u32, final_pdu: bool) -> ScsiCommand {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x2A;
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    ScsiCommand { final_pdu, write: true, itt, expected_length: edtl, cmd_sn, cdb, ..Default::default() }
}

fn read10(itt: u32, cmd_sn: u32, blocks: u16, edtl: u32) -> ScsiCommand {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x28;
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    ScsiCommand { final_pdu: true, read: true, itt, expected_length: edtl, cmd_sn, cdb, ..Default::default() }
}

fn data_out(itt: u32, ttt: u32, data_sn: u32, offset: u32, len: usize, final_pdu: bool) -> Pdu {
    let d = DataOut { final_pdu, itt, ttt, data_sn, buffer_offset: offset, ..Default::default() };
    Pdu::with_data(d, vec![(offset % 251).to_le_bytes()[0]; len])
}

fn runs(events: &[Event]) -> Vec<&Command> {
    events.iter().filter_map(|e| if let Event::Run(c) = e { Some(c) } else { None }).collect()
}

fn sent(events: &[Event]) -> Vec<&Bhs> {
    events.iter().filter_map(|e| if let Event::Send(p) = e { Some(&p.bhs) } else { None }).collect()
}

#[test]
fn cmd_sn_order_and_window() {
    let mut s = session(SessionParams::default());
    // Ahead of a gap: waits.
    let ev = s.handle(Pdu::new(read10(2, 2, 1, 512)));
    assert!(ev.is_empty());
    // Outside the window (ExpCmdSN 1, window 8: MaxCmdSN 8) and below it: dropped.
    assert!(s.handle(Pdu::new(read10(3, 9, 1, 512))).is_empty());
    assert!(s.handle(Pdu::new(read10(4, 0, 1, 512))).is_empty());
    // The gap fills: both run, in CmdSN order.
    let ev = s.handle(Pdu::new(read10(1, 1, 1, 512)));
    let itts: Vec<u32> = runs(&ev).iter().map(|c| c.itt).collect();
    assert_eq!(itts, vec![1, 2]);
    // An immediate command runs at once without taking a CmdSN.
    let mut imm = read10(5, 3, 1, 512);
    imm.immediate = true;
    assert_eq!(runs(&s.handle(Pdu::new(imm))).len(), 1);
    assert_eq!(runs(&s.handle(Pdu::new(read10(6, 3, 1, 512)))).len(), 1);
}

#[test]
fn write_immediate_unsolicited_then_r2t_bursts() {
    let p = SessionParams {
        initial_r2t: false,
        immediate_data: true,
        first_burst_length: 2048,
        max_burst_length: 4096,
        ..Default::default()
    };
    let mut s = session(p);
    // 20 blocks = 10240 bytes: 1024 immediate, 1024 unsolicited, then R2Ts of 4096, 4096, 1024.
    let cmd = Pdu::with_data(write10(7, 1, 20, 10240, false), vec![0u8; 1024]);
    assert!(s.handle(cmd).is_empty());
    let ev = s.handle(data_out(7, NO_TAG, 0, 1024, 1024, true));
    let Bhs::R2t(r) = sent(&ev)[0] else { panic!("expected an R2T: {ev:?}") };
    assert_eq!((r.buffer_offset, r.desired_length, r.r2t_sn), (2048, 4096, 0));
    let ttt = r.ttt;
    assert!(s.handle(data_out(7, ttt, 0, 2048, 2048, false)).is_empty());
    let ev = s.handle(data_out(7, ttt, 1, 4096, 2048, true));
    let Bhs::R2t(r2) = sent(&ev)[0] else { panic!("expected a second R2T: {ev:?}") };
    assert_eq!((r2.buffer_offset, r2.desired_length, r2.r2t_sn), (6144, 4096, 1));
    let ev = s.handle(data_out(7, r2.ttt, 0, 6144, 4096, true));
    let run = runs(&ev);
    assert_eq!(run.len(), 1, "{ev:?}");
    assert_eq!(run[0].data_out.len(), 10240);
    assert_eq!(run[0].data_out[2048], (2048u32 % 251).to_le_bytes()[0]);
    assert_eq!(run[0].data_out[6144], (6144u32 % 251).to_le_bytes()[0]);
    assert!(run[0].fail.is_none());
    assert_eq!(s.pending_transfers(), 0);
}

#[test]
fn sequence_errors_fail_the_command_and_keep_the_session() {
    let p = SessionParams { initial_r2t: false, first_burst_length: 65536, ..Default::default() };
    let mut s = session(p);
    assert!(s.handle(Pdu::new(write10(1, 1, 2, 1024, false))).is_empty());
    assert!(s.handle(data_out(1, NO_TAG, 0, 0, 512, false)).is_empty());
    // DataSN 0 again: the rest is drained, then the command fails.
    assert!(s.handle(data_out(1, NO_TAG, 0, 512, 512, false)).is_empty());
    let ev = s.handle(data_out(1, NO_TAG, 2, 1024, 0, true));
    let run = runs(&ev);
    assert_eq!(run[0].fail, Some(Sense::DATA_PHASE_ERROR));
    let pdus = s.complete(run[0].clone(), None);
    let Bhs::ScsiResponse(r) = &pdus[0].bhs else { panic!("{pdus:?}") };
    assert_eq!(r.status, status::CHECK_CONDITION);
    // A wrong offset fails too; the next command works.
    assert!(s.handle(Pdu::new(write10(2, 2, 1, 512, false))).is_empty());
    let ev = s.handle(data_out(2, NO_TAG, 0, 100, 512, true));
    assert_eq!(runs(&ev)[0].fail, Some(Sense::DATA_PHASE_ERROR));
    assert_eq!(runs(&s.handle(Pdu::new(read10(3, 3, 1, 512)))).len(), 1);
    // Data-Out for a task that does not exist: Reject.
    let ev = s.handle(data_out(99, NO_TAG, 0, 0, 512, true));
    assert!(matches!(sent(&ev)[0], Bhs::Reject(r) if r.reason == 0x09));
}

#[test]
fn write_residuals() {
    let mut s = session(SessionParams { immediate_data: true, ..Default::default() });
    // Two blocks asked, one block of EDTL: writes one block, overflow of 512.
    let ev = s.handle(Pdu::with_data(write10(1, 1, 2, 512, true), vec![7u8; 512]));
    let c = runs(&ev)[0].clone();
    assert_eq!(c.cdb[7..9], [0, 1]);
    assert_eq!(c.data_out.len(), 512);
    let ok = ScsiOutcome { status: status::GOOD, data_in: Vec::new(), sense: None };
    let pdus = s.complete(c, Some(ok.clone()));
    let Bhs::ScsiResponse(r) = &pdus[0].bhs else { panic!() };
    assert!(r.overflow && !r.underflow && r.residual_count == 512);
    // One block asked, 10000 bytes of EDTL: takes 512, underflow of 9488.
    let ev = s.handle(Pdu::with_data(write10(2, 2, 1, 10000, true), vec![1u8; 8192]));
    // Everything the command takes came as immediate data: it runs at once, no R2T.
    assert!(sent(&ev).is_empty(), "{ev:?}");
    let c = runs(&ev)[0].clone();
    assert_eq!(c.data_out.len(), 512);
    let pdus = s.complete(c, Some(ok));
    let Bhs::ScsiResponse(r) = &pdus[0].bhs else { panic!() };
    assert!(r.underflow && r.residual_count == 10000 - 512);
}

#[test]
fn data_in_split_with_status_and_residuals() {
    let p = SessionParams { max_xmit_data_segment_length: 1024, max_burst_length: 2048, ..Default::default() };
    let mut s = session(p);
    let c = runs(&s.handle(Pdu::new(read10(5, 1, 8, 8192))))[0].clone();
    let data: Vec<u8> = (0..4096u32).map(|i| i.to_le_bytes()[0]).collect();
    let pdus = s.complete(c, Some(ScsiOutcome { status: status::GOOD, data_in: data.clone(), sense: None }));
    assert_eq!(pdus.len(), 4);
    let mut got = Vec::new();
    for (i, p) in pdus.iter().enumerate() {
        let Bhs::DataIn(d) = &p.bhs else { panic!() };
        assert_eq!(d.data_sn as usize, i);
        assert_eq!(d.buffer_offset as usize, got.len());
        // F closes each 2048-byte burst; the status rides on the last PDU only.
        assert_eq!(d.final_pdu, i == 1 || i == 3);
        assert_eq!(d.status.is_some(), i == 3);
        got.extend_from_slice(&p.data);
    }
    assert_eq!(got, data);
    let Bhs::DataIn(last) = &pdus[3].bhs else { panic!() };
    assert!(last.underflow && last.residual_count == 8192 - 4096);
    assert_eq!(last.stat_sn, 10);
    // EDTL smaller than the data: only EDTL bytes go out, overflow reported.
    let c = runs(&s.handle(Pdu::new(read10(6, 2, 1, 200))))[0].clone();
    let pdus = s.complete(c, Some(ScsiOutcome { status: status::GOOD, data_in: vec![1; 512], sense: None }));
    let Bhs::DataIn(d) = &pdus[0].bhs else { panic!() };
    assert_eq!(pdus[0].data.len(), 200);
    assert!(d.overflow && d.residual_count == 312 && d.stat_sn == 11);
    // CHECK CONDITION: a SCSI Response with the sense data.
    let c = runs(&s.handle(Pdu::new(read10(7, 3, 1, 512))))[0].clone();
    let sense = Sense::LBA_OUT_OF_RANGE;
    let pdus =
        s.complete(c, Some(ScsiOutcome { status: status::CHECK_CONDITION, data_in: vec![], sense: Some(sense) }));
    let Bhs::ScsiResponse(r) = &pdus[0].bhs else { panic!() };
    assert_eq!(r.status, status::CHECK_CONDITION);
    assert_eq!(pdus[0].data[2 + 12], 0x21);
}

#[test]
fn task_management_nop_text_logout() {
    let mut s = session(SessionParams { initial_r2t: true, immediate_data: false, ..Default::default() });
    // A write waiting for its R2T data, then aborted.
    let ev = s.handle(Pdu::new(write10(1, 1, 1, 512, true)));
    assert!(matches!(sent(&ev)[0], Bhs::R2t(_)));
    let abort = TaskMgmtRequest {
        immediate: true,
        function: tmf::ABORT_TASK,
        itt: 2,
        referenced_task_tag: 1,
        cmd_sn: 2,
        ..Default::default()
    };
    let ev = s.handle(Pdu::new(abort.clone()));
    assert!(matches!(sent(&ev)[0], Bhs::TaskMgmtResponse(r) if r.response == tmf::COMPLETE));
    assert_eq!(s.pending_transfers(), 0);
    let ev = s.handle(Pdu::new(abort));
    assert!(matches!(sent(&ev)[0], Bhs::TaskMgmtResponse(r) if r.response == tmf::NO_TASK));
    // NOP-Out ping: echoed.
    let nop = NopOut { itt: 9, ttt: NO_TAG, cmd_sn: 2, immediate: true, ..Default::default() };
    let ev = s.handle(Pdu::with_data(nop, Bytes::from_static(b"ping")));
    let Event::Send(p) = &ev[0] else { panic!() };
    assert!(matches!(&p.bhs, Bhs::NopIn(n) if n.itt == 9));
    assert_eq!(&p.data[..], b"ping");
    // SendTargets goes to the caller; a long answer continues with the C bit.
    let text = TextRequest { final_pdu: true, itt: 11, ttt: NO_TAG, cmd_sn: 2, ..Default::default() };
    let ev = s.handle(Pdu::with_data(text, Bytes::from_static(b"SendTargets=All\0")));
    assert!(matches!(&ev[0], Event::SendTargets { itt: 11, query } if query == "All"));
    let long = vec![b'a'; 8192 + 100];
    let first = s.send_targets(11, long);
    let Bhs::TextResponse(t) = &first.bhs else { panic!() };
    assert!(t.cont && !t.final_pdu && first.data.len() == 8192);
    let more = TextRequest { final_pdu: true, itt: 11, ttt: t.ttt, cmd_sn: 3, ..Default::default() };
    let ev = s.handle(Pdu::new(more));
    let Event::Send(p) = &ev[0] else { panic!() };
    assert!(matches!(&p.bhs, Bhs::TextResponse(t) if t.final_pdu && !t.cont) && p.data.len() == 100);
    // Logout: answered, then close.
    let ev = s.handle(Pdu::new(LogoutRequest { itt: 12, cmd_sn: 4, ..Default::default() }));
    assert!(matches!(sent(&ev)[0], Bhs::LogoutResponse(r) if r.response == 0));
    assert!(matches!(ev.last(), Some(Event::Close(_))));
}
