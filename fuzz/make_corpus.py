#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/corpus/<target>/: small valid inputs in the
formats of the crates' tests (handshakes, requests, PDUs, CDBs, frames, thin_delta XML, line
lists, API bodies), each with the leading mode byte its target reads. Run from anywhere."""
import json, os, struct, zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- NBD -------------------------------------------------------------------------------------
IHAVEOPT = 0x49484156454F5054


def opt(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def go(name, infos=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta(name, queries):
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def req(cmd, off, length, flags=0, cookie=1, extended=False):
    if extended:
        return struct.pack(">IHHQQQ", 0x21E41C71, flags, cmd, cookie, off, length)
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, off, length)


flags = struct.pack(">I", 3)
compact = req(1, 0, 512) + b"\xab" * 512 + req(0, 4096, 4096, cookie=2) + req(3, 0, 0) + req(2, 0, 0)
extended = (req(1, 0, 512, flags=1 << 5, extended=True) + b"\xcd" * 512 + req(7, 0, 1 << 20, extended=True)
            + req(6, 8192, 4096, flags=1 << 4, extended=True) + req(2, 0, 0, extended=True))
put("nbd_handshake", "export_name", b"\x01" + struct.pack(">I", 1) + opt(1, b"vol-a") + compact)
put("nbd_handshake", "go_default", b"\x02" + flags + opt(7, go("", (0, 1, 2, 3))) + compact)
put("nbd_handshake", "list_info_go_ro", b"\x03" + flags + opt(3) + opt(6, go("vol-a@1", (3,))) + opt(7, go("vol-a@1")) + req(0, 0, 4096))
put("nbd_handshake", "structured_meta", b"\x04" + flags + opt(8) + opt(9, meta("vol-a", ["base:"]))
    + opt(10, meta("vol-a", ["base:allocation"])) + opt(7, go("vol-a", (3,))) + req(7, 0, 65536, cookie=9) + compact)
put("nbd_handshake", "extended", b"\x05" + flags + opt(11) + opt(10, meta("vol-a", ["base:allocation"])) + opt(7, go("vol-a")) + extended)
put("nbd_handshake", "refused_abort", b"\x06" + flags + opt(7, go("secret")) + opt(7, go("nope")) + opt(5) + opt(4242, b"x" * 40) + opt(2))
put("nbd_handshake", "oversized_option", b"\x07" + flags + opt(6, b"\x00" * 5000) + opt(2))
put("nbd_request", "compact_write", b"\x00" + req(1, 0, 4096, flags=1))
put("nbd_request", "compact_read", b"\x00" + req(0, 1 << 20, 65536))
put("nbd_request", "compact_too_large", b"\x02" + req(1, 0, 1 << 24))
put("nbd_request", "extended_write", b"\x01" + req(1, 512, 512, flags=1 << 5, extended=True))
put("nbd_request", "extended_block_status", b"\x01" + req(7, 0, 1 << 40, flags=1 << 3, extended=True))
put("nbd_request", "extended_trim", b"\x03" + req(4, 0, 1 << 33, extended=True))

# --- iSCSI -----------------------------------------------------------------------------------


def pad(b):
    return b + b"\x00" * (-len(b) % 4)


def bhs(op, flags, data=b"", lun=0, itt=1, rest=b""):
    h = bytes([op, flags, 0, 0, 0]) + len(data).to_bytes(3, "big") + struct.pack(">QI", lun, itt) + rest
    h = h + b"\x00" * (48 - len(h))
    return h[:48] + pad(data)


def text(pairs):
    return b"".join(f"{k}={v}".encode() + b"\x00" for k, v in pairs)


def login(csg, nsg, transit, pairs, itt=1, cmd_sn=0, cont=False):
    f = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | nsg
    data = text(pairs)
    h = bytes([0x43, f, 0, 0, 0]) + len(data).to_bytes(3, "big")
    h += bytes([0x40, 0x01, 0x37, 0x00, 0x00, 0x01]) + b"\x00\x00" + struct.pack(">IHHII", itt, 1, 0, cmd_sn, 0)
    return h + b"\x00" * (48 - len(h)) + pad(data)


def scsi(cdb, itt, cmd_sn, edtl=0, data=b"", read=False, write=False):
    f = 0x80 | (0x40 if read else 0) | (0x20 if write else 0) | 1
    cdb = cdb + b"\x00" * (16 - len(cdb))
    return bhs(0x01, f, data, itt=itt, rest=struct.pack(">III", edtl, cmd_sn, 0) + cdb)


normal = [("InitiatorName", "iqn.2026-11.test:init"), ("SessionType", "Normal"),
          ("TargetName", "iqn.2026-11.test:open"), ("AuthMethod", "None")]
oper = [("HeaderDigest", "CRC32C,None"), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "65536"),
        ("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "65536"), ("ErrorRecoveryLevel", "0"), ("X-com.example.key", "1")]
write10 = bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 2, 0])
ff = (scsi(bytes([0x12, 0, 0, 0, 0x24, 0]), 1, 0, 36, read=True)
      + scsi(bytes([0x9E, 0x10]) + b"\x00" * 8 + b"\x00\x00\x00\x20\x00\x00", 2, 1, 32, read=True)
      + scsi(write10, 3, 2, 1024, b"\x5a" * 512, write=True)
      + bhs(0x05, 0x80, b"\xa5" * 512, itt=3, rest=struct.pack(">IIIIII", 0xFFFFFFFF, 0, 0, 0, 0, 512))
      + scsi(bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 2, 0]), 4, 3, 1024, read=True)
      + bhs(0x44, 0x80, text([("SendTargets", "All")]), itt=5, rest=struct.pack(">III", 0xFFFFFFFF, 4, 0))
      + bhs(0x40, 0x80, b"ping", itt=6, rest=struct.pack(">III", 0xFFFFFFFF, 4, 0))
      + bhs(0x02, 0x80 | 1, itt=7, rest=struct.pack(">IIII", 3, 4, 0, 0))
      + bhs(0x06, 0x80, itt=8, rest=struct.pack(">HHII", 0, 0, 5, 0)))
put("iscsi_pdu", "full_feature", b"\x00" + ff)
put("iscsi_pdu", "login_pdus", b"\x04" + login(0, 1, True, normal) + login(1, 3, True, oper, itt=2))
put("iscsi_pdu", "nop_out", b"\x00" + bhs(0x40, 0x80, itt=0xFFFFFFFF - 1, rest=struct.pack(">III", 0xFFFFFFFF, 0, 0)))


def with_digests(pdu_bytes_list):
    out = b""
    for p in pdu_bytes_list:
        h, d = p[:48], p[48:]
        out += h + struct.pack("<I", 0) + d + (struct.pack("<I", 0) if d else b"")
    return out


put("iscsi_pdu", "digests_bad", b"\x03" + with_digests([scsi(bytes([0]), 1, 0)]))
put("iscsi_keys", "keys_operational", b"\x00" + text(oper + [("MaxConnections", "1"), ("DefaultTime2Wait", "2")]))
put("iscsi_keys", "keys_discovery", b"\x02" + text([("SendTargets", "All"), ("HeaderDigest", "None")]))
put("iscsi_keys", "keys_binary", b"\x00" + text([("CHAP_C", "0x0123456789abcdef"), ("CHAP_R", "0bAAECAwQ="), ("CHAP_I", "7")]))
put("iscsi_keys", "login_open", b"\x01" + login(0, 1, True, normal) + login(1, 3, True, oper, itt=2))
chap = [("InitiatorName", "iqn.2026-11.test:init"), ("SessionType", "Normal"),
        ("TargetName", "iqn.2026-11.test:chap"), ("AuthMethod", "CHAP,None")]
put("iscsi_keys", "login_chap", b"\x03" + login(0, 0, False, chap) + login(0, 0, False, [("CHAP_A", "7,5")], itt=2)
    + login(0, 1, True, [("CHAP_N", "user"), ("CHAP_R", "0x" + "00" * 32), ("CHAP_I", "9"), ("CHAP_C", "0x" + "11" * 32)], itt=3))
put("iscsi_keys", "login_discovery", b"\x05" + login(0, 3, True, [("InitiatorName", "iqn.2026-11.test:init"),
    ("SessionType", "Discovery"), ("AuthMethod", "None"), ("HeaderDigest", "None")]))

# --- SCSI CDBs: flags, CDB length, CDB, data length (2 bytes), data -------------------------


def cmd(cdb, data=b"", flags=0):
    return bytes([flags, len(cdb)]) + cdb + struct.pack(">H", len(data)) + data


inq = [cmd(bytes([0x12, 0, 0, 0, 0xFF, 0]))] + [cmd(bytes([0x12, 1, p, 0, 0xFF, 0])) for p in (0, 0x80, 0x83, 0xB0, 0xB1, 0xB2)]
put("scsi_cdb", "inquiry", b"\x00" + b"".join(inq))
put("scsi_cdb", "capacity_status", b"\x00" + cmd(bytes([0x25]) + b"\x00" * 9) + cmd(bytes([0x9E, 0x10]) + b"\x00" * 8 + b"\x00\x00\x01\x00\x00\x00")
    + cmd(bytes([0x9E, 0x12]) + b"\x00" * 8 + b"\x00\x00\x01\x00\x00\x00") + cmd(b"\x00" * 6) + cmd(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])))
put("scsi_cdb", "read_write", b"\x00" + cmd(write10[:7] + b"\x00\x01\x00", b"\x11" * 512) + cmd(bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0]))
    + cmd(bytes([0x8A, 0x08]) + struct.pack(">QI", 16, 2) + b"\x00\x00", b"\x22" * 1024)
    + cmd(bytes([0x88, 0]) + struct.pack(">QI", 16, 2) + b"\x00\x00") + cmd(bytes([0x0A, 0, 0, 4, 1, 0]), b"\x33" * 512)
    + cmd(bytes([0x35]) + b"\x00" * 9) + cmd(bytes([0x2F, 0x02, 0, 0, 0, 8, 0, 0, 1, 0]), b"\x11" * 512))
put("scsi_cdb", "unmap_same_caw", b"\x00" + cmd(bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), struct.pack(">HH4xQI4x", 22, 16, 4, 8))
    + cmd(bytes([0x93, 0x08]) + struct.pack(">QI", 0, 32) + b"\x00\x00", b"\x44" * 512)
    + cmd(bytes([0x89, 0]) + struct.pack(">Q", 0) + b"\x00\x00\x00\x01\x00\x00", b"\x00" * 512 + b"\x55" * 512))
put("scsi_cdb", "mode", b"\x00" + cmd(bytes([0x1A, 0, 0x3F, 0, 0xFF, 0])) + cmd(bytes([0x5A, 0, 0x0A, 0, 0, 0, 0, 0, 0xFF, 0]))
    + cmd(bytes([0x15, 0x10, 0, 0, 24, 0]), bytes([0, 0, 0, 0, 0x0A, 10, 0x08] + [0] * 17)))
pr_reg = struct.pack(">QQ", 0, 0x1234) + b"\x00" * 8
put("scsi_cdb", "reservations", b"\x00" + cmd(bytes([0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0]), pr_reg)
    + cmd(bytes([0x5F, 1, 0x03, 0, 0, 0, 0, 0, 24, 0]), struct.pack(">QQ", 0x1234, 0) + b"\x00" * 8)
    + cmd(bytes([0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]), flags=1) + cmd(bytes([0x5E, 1, 0, 0, 0, 0, 0, 0x10, 0, 0]))
    + cmd(write10[:7] + b"\x00\x01\x00", b"\x11" * 512, flags=1) + cmd(bytes([0x16, 0, 0, 0, 0, 0]), flags=0x41)
    + cmd(bytes([0x17, 0, 0, 0, 0, 0]), flags=0x20))

# --- ingest frames ---------------------------------------------------------------------------


def dframe(first, blocks, corrupt=False):
    out = b"D" + struct.pack("<QI", first, len(blocks) // 4096)
    for i in range(0, len(blocks), 4096):
        out += struct.pack("<I", zlib.crc32(blocks[i:i + 4096]) ^ (1 if corrupt else 0))
    return out + blocks


blocks = bytes(range(256)) * 32
put("ingest_frames", "raw_valid", b"\x00\x05" + dframe(5, blocks[:4096]) + b"Z" + struct.pack("<QI", 9, 3) + b"E" + struct.pack("<QQ", 100, 50))
put("ingest_frames", "raw_damaged", b"\x00\x09" + dframe(0, blocks[:4096], corrupt=True))
put("ingest_frames", "raw_bad_count", b"\x00\x01" + b"Z" + struct.pack("<QI", 0, 0) + b"Q")
put("ingest_frames", "built", b"\x01\x07" + bytes([0, 5, 0, 0, 0, 1, 7, 0xFF, 0, 0, 1, 9, 0, 0, 0, 3, 0, 0, 0, 0, 2, 100, 0, 0, 0, 50, 0, 0, 0, 0]))

# --- changed blocks --------------------------------------------------------------------------
xml = b"""<superblock uuid="" time="3" transaction="7" version="2" data_block_size="128" nr_data_blocks="1600">
  <diff left="1" right="2">
    <same begin="0" length="16"/>
    <different begin="16" length="2"/>
    <right_only begin="40" length="1"/>
    <left_only begin="90" length="4"/>
  </diff>
</superblock>
"""
verbose = b"""<superblock uuid="" time="1" transaction="2" version="2" data_block_size="8" nr_data_blocks="100">
  <diff left="3" right="4">
    <different>
      <range begin="2" left_data_begin="10" right_data_begin="20" length="3"/>
    </different>
  </diff>
</superblock>
"""
put("changed_blocks", "thin_delta", b"\x01" + xml)
put("changed_blocks", "thin_delta_verbose", b"\x00" + verbose)
put("changed_blocks", "lines", b"\x01# changed since the last run\n0 4096\n0x10000 0x2000\n\n12288 1\n")
put("changed_blocks", "lines_past_end", b"\x00" + b"1048576 4096\n")

# --- API bodies: the first byte picks the type (fuzz_targets/api_bodies.rs) -----------------
bodies = [
    (0, {"name": "prod", "size": "10G"}), (0, {"name": "prod", "size": 1073741824}),
    (1, {"bookmark": "before-upgrade"}), (2, {"from": "prod@3", "name": "dev-1", "lease": "7d", "quota": "5G"}),
    (2, {"from": "prod@2026-11-01T12:00:00Z", "name": "dev-2"}), (3, {"to": "prod@2"}), (4, {"name": "b1"}),
    (5, {"size": "20GiB"}), (6, {"script": "clone-configure.sh", "timeout_secs": 30}),
    (7, {"snapshot": "prod@1", "script": "mask.sh", "into": "prod-masked"}),
    (8, {"clone_from": "masked", "default_lease": "3d", "max_lease": "30d", "default_quota": "1T"}),
    (9, {"extend": "2d", "idle": "12h", "none": False}), (9, {"expires": "2026-12-01T00:00:00Z"}),
    (10, {"quota": "10G"}), (11, {"to": "http://127.0.0.1:7070", "token": "t", "continuous": "5m"}),
    (12, {"next_block": 17}), (13, {"snapshot": "prod@4", "payload_bytes": 4096}),
    (14, {"keep_last": 5, "keep_hourly": 24, "keep_daily": 7, "keep_weekly": 4}),
    (15, {"name": "nightly", "cron": "0 2 * * *", "steps": ["snapshot prod", "refresh dev"], "catch_up": "1h"}),
    (16, {"name": "env1", "members": {"db": "prod", "cache": "redis@2"}}), (17, {"bookmark": "nightly"}),
    (18, {"from": "env1@1", "name": "env2", "lease": "1d"}), (19, {"to": "env1@1"}),
]
for i, (kind, body) in enumerate(bodies):
    put("api_bodies", f"body_{i:02}", bytes([kind]) + json.dumps(body).encode())
for i, (kind, q) in enumerate([(20, "space=true&keep_volumes=false"), (21, "owner=prod"),
                               (22, "limit=10&since=2026-11-01T00:00:00Z&volume=prod"), (23, "offset=4096&length=8192")]):
    put("api_bodies", f"query_{i}", bytes([kind]) + q.encode())
