#!/usr/bin/env bash
# env-bench.sh: `forkd env snapshot` and `forkd env clone` of 2 and of 20 members, at 1 GiB and
# at 1 TiB per member, against a single-volume snapshot and against the peers this machine can
# run (btrfs subvolume snapshots; LVM thin and ZFS when the kernel has them), in one run,
# reported as ratios.
#
# Usage: bench/env-bench.sh [--runs R] [--quick] [--dir DIR] [--forkd PATH] [--keep] [--out FILE]
#   --runs R     timed runs per case (default 40; 2 untimed warm-up runs come first)
#   --quick      5 runs, no 256 MiB case, report to stdout only (a smoke test)
#   --dir DIR    scratch dir (default /work/bench-scratch-env); created and removed by this
#                script, refused if it exists and is not ours
#   --forkd PATH forkd binary (default target/release/forkd of this workspace)
#   --keep       keep the scratch dir (the btrfs file system is unmounted all the same)
#   --out FILE   also write the report to FILE (default bench/environments-results.md)
#
# What is measured (every case interleaved with the others, run by run, so drift hits all alike;
# before each case's untimed writes and timed operation, `sync`, so no other case's writeback
# lands in its flushes):
# - forkd: sources of 1 GiB and 1 TiB, each snapshotted once; clones of them, 16 MiB of random
#   data written to every clone in 64 pieces of 256 KiB spread over the whole volume; one
#   environment of 2 and one of 20 such clones per size, and one lone clone per size.
#   Before every timed run, 4 KiB is written to every member at a random offset (untimed), so
#   every snapshot has fresh writes to take. Timed, client-side, curl's %{time_total} of:
#     POST /v1/environments/ENV/snapshots           (= forkd env snapshot ENV)
#     POST /v1/volumes/VOL/snapshots                (= forkd snapshot VOL, the lone clone)
#     POST /v1/environments/clones {"from":"ENV@latest","name":NEW}   (= forkd env clone)
#     DELETE /v1/environments/NEW                   (= forkd env delete NEW, reported too)
#   Then (not with --quick) 256 MiB more, in 256 pieces of 1 MiB spread over the volume, is
#   written to member m0 of each 1 TiB environment, and the env snapshots are timed again.
# - btrfs (a file system on a loop device in the scratch dir): the same files (sparse, same
#   sizes, same amount and spread of data), in two layouts:
#     per-member: one subvolume per member; an "environment snapshot" is N read-only subvolume
#       snapshots one after the other (BTRFS_IOC_SNAP_CREATE_V2, what `btrfs subvolume snapshot
#       -r` calls; each commits a transaction), NOT one instant: btrfs has no multi-subvolume
#       snapshot;
#     one-subvolume: all N member files in one subvolume; one snapshot of it: one instant.
#   "Clone" is N writable snapshots of the members' newest snapshots (one for one-subvolume),
#   deleted untimed afterwards. Timed in-process around the ioctls (no process start-up).
# Output: a markdown report on stdout and in --out.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
INVOCATION="bench/env-bench.sh${*:+ $*}"
SCRATCH=/work/bench-scratch-env
FORKD=$REPO/target/release/forkd
RUNS=40
QUICK=0
KEEP=0
OUT=""
while (($#)); do
    case $1 in
    --runs) RUNS=$2; shift ;;
    --quick) QUICK=1; RUNS=5 ;;
    --dir) SCRATCH=$2; shift ;;
    --forkd) FORKD=$2; shift ;;
    --keep) KEEP=1 ;;
    --out) OUT=$2; shift ;;
    -h | --help) sed -n '2,39p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 1 ;;
    esac
    shift
done
[[ $RUNS =~ ^[0-9]+$ ]] && ((RUNS >= 1)) || { echo "--runs takes a positive number" >&2; exit 1; }
if [[ -z $OUT ]]; then if ((QUICK)); then OUT=/dev/null; else OUT=$REPO/bench/environments-results.md; fi; fi

log() { printf '[env-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
DAEMON_PID=""
SCRATCH_CREATED=0
BTRFS_MNT=""
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh" # stop_pid
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -n $DAEMON_PID ]] && stop_pid "$DAEMON_PID"
    if [[ -n $BTRFS_MNT ]] && mountpoint -q "$BTRFS_MNT"; then
        umount "$BTRFS_MNT" || umount -l "$BTRFS_MNT" # mount -o loop: the loop device goes with it
    fi
    if ((SCRATCH_CREATED)); then
        if ((KEEP)); then log "kept scratch dir $SCRATCH"; else rm -rf -- "$SCRATCH"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- checks
command -v python3 >/dev/null || die "python3 is needed"
command -v curl >/dev/null || die "curl is needed"
if [[ ! -x $FORKD ]]; then
    log "building forkd ($FORKD is missing)"
    (cd "$REPO" && cargo build --release -p forkd-daemon) || die "cargo build failed"
fi
if [[ -e $SCRATCH ]]; then
    [[ -f $SCRATCH/.env-bench ]] || die "$SCRATCH exists and is not an env-bench scratch dir; remove it or pass --dir"
    if mountpoint -q "$SCRATCH/btrfs" 2>/dev/null; then umount "$SCRATCH/btrfs"; fi
    log "removing the leftover scratch dir $SCRATCH"
    rm -rf -- "$SCRATCH"
fi
mkdir -p -- "$SCRATCH"
SCRATCH_CREATED=1
touch "$SCRATCH/.env-bench"
SCRATCH=$(cd "$SCRATCH" && pwd)
avail=$(df -B1 --output=avail "$SCRATCH" | tail -1)
((avail > 8 * 1024 * 1024 * 1024)) || die "need about 8 GiB free in $SCRATCH, have $((avail >> 20)) MiB"

# ---------------------------------------------------------------- peers: which can run here
kconfig() { # OPTION: its line in /proc/config.gz, or "(no /proc/config.gz)"
    if [[ -r /proc/config.gz ]]; then
        zcat /proc/config.gz | grep -E "^(# )?$1[= ]" | head -1 || echo "$1 absent from /proc/config.gz"
    else echo "(no /proc/config.gz)"; fi
}
modules_note() {
    local m
    m="$(kconfig CONFIG_MODULES)"
    if [[ -d /lib/modules/$(uname -r) ]]; then m+=", /lib/modules/$(uname -r) exists"; else m+=", no /lib/modules/$(uname -r)"; fi
    command -v modprobe >/dev/null || m+=", no modprobe"
    echo "$m"
}
# LVM thin needs device-mapper (dm-mod, dm-thin-pool).
if [[ -e /dev/mapper/control ]] && grep -qw device-mapper /proc/devices; then
    LVM_STATUS="not run: this kernel has device-mapper, but this script has no LVM thin case yet (it was written on a machine without device-mapper, where it could not be tested)"
else
    dmv=""
    if command -v dmsetup >/dev/null; then dmv="; \`dmsetup version\` says: $(dmsetup version 2>&1 | grep -m1 -iE 'failure|no such' || true)"; fi
    LVM_STATUS="not run: the kernel has no device-mapper, so no LVM thin pool can exist: /proc/devices lists no device-mapper, /dev/mapper/control is absent$dmv; $(kconfig CONFIG_MD) and $(kconfig CONFIG_BLK_DEV_DM), and dm-mod cannot be loaded ($(modules_note))"
fi
if grep -qw zfs /proc/filesystems || [[ -d /sys/module/zfs ]]; then
    ZFS_STATUS="not run: the zfs module is present, but this script has no ZFS case yet (it was written on a machine without ZFS, where it could not be tested)"
else
    ZFS_STATUS="not run: zfs is not in /proc/filesystems, there is no /sys/module/zfs, and no module can be loaded ($(modules_note))"
fi
BTRFS=1
BTRFS_STATUS="ran: btrfs $(uname -r) in-kernel, btrfs-progs $(btrfs --version 2>/dev/null | awk '{print $2}'), file system on a loop device backed by a sparse file in the scratch dir"
if ! grep -qw btrfs /proc/filesystems; then BTRFS=0; BTRFS_STATUS="not run: btrfs is not in /proc/filesystems"
elif ((EUID != 0)); then BTRFS=0; BTRFS_STATUS="not run: mounting a loop device needs root"
elif ! command -v mkfs.btrfs >/dev/null; then BTRFS=0; BTRFS_STATUS="not run: mkfs.btrfs missing (apt-get install -y btrfs-progs)"
fi
if ((BTRFS)); then
    BTRFS_MNT=$SCRATCH/btrfs
    mkdir -p "$BTRFS_MNT"
    truncate -s 16G "$SCRATCH/btrfs.img"
    if mkfs.btrfs -q "$SCRATCH/btrfs.img" >"$SCRATCH/mkfs.log" 2>&1 && mount -o loop "$SCRATCH/btrfs.img" "$BTRFS_MNT" 2>>"$SCRATCH/mkfs.log"; then
        log "btrfs mounted on $BTRFS_MNT"
    else
        BTRFS=0; BTRFS_STATUS="not run: mkfs.btrfs or mount -o loop failed: $(tail -1 "$SCRATCH/mkfs.log")"
        BTRFS_MNT=""
    fi
fi
log "LVM thin: $LVM_STATUS"
log "ZFS: $ZFS_STATUS"
log "btrfs: $BTRFS_STATUS"

# ---------------------------------------------------------------- daemon
read -r API_PORT < <(python3 -c '
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
API=http://127.0.0.1:$API_PORT
"$FORKD" serve --data-dir "$SCRATCH/d" --api "127.0.0.1:$API_PORT" --nbd 127.0.0.1:0 \
    --iscsi 127.0.0.1:0 >"$SCRATCH/forkd.log" 2>&1 &
DAEMON_PID=$!
for ((i = 0; ; i++)); do
    curl -sf "$API/v1/volumes" >/dev/null 2>&1 && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$SCRATCH/forkd.log" >&2; die "forkd serve exited"; }
    ((i < 300)) || die "forkd serve did not answer on $API within 30 s"
    sleep 0.1
done
log "forkd serve (pid $DAEMON_PID) answers on $API"

# ---------------------------------------------------------------- the measurement
cat >"$SCRATCH/driver.py" <<'EOF'
import fcntl, http.client, json, math, os, random, struct, subprocess, sys, time

api_port, runs, quick, btrfs_mnt, raw_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5]
API = f"http://127.0.0.1:{api_port}"
WARMUP = 2
GIB, TIB, MIB, KIB = 1 << 30, 1 << 40, 1 << 20, 1 << 10
# size class: (volume size, MiB more written to member m0 of each environment)
SIZES = {"1GiB": (GIB, 0), "1TiB": (TIB, 0)}
if not quick: SIZES["1TiB+256MiB"] = (TIB, 256)
HISTORY = 0 if quick else 200   # extra env snapshots at the end, to see the cost of a long history
NS = (2, 20)
rng = random.Random(11)

def log(msg):
    print(f"[env-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

# ---- forkd over HTTP (untimed set-up calls: http.client with keep-alive)
conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=600)
def call(method, path, body=None, ctype="application/json"):
    global conn
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdr = {"Content-Type": ctype} if data is not None else {}
    for attempt in (0, 1):
        try:
            conn.request(method, path, body=data, headers=hdr)
            r = conn.getresponse(); out = r.read()
            break
        except (http.client.HTTPException, ConnectionError):
            if attempt: raise
            conn.close(); conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=600)
    if r.status // 100 != 2:
        sys.exit(f"{method} {path}: {r.status} {out[:300]!r}")
    return json.loads(out) if out else None

def curl_timed(method, path, body):
    """One API call by curl; returns curl's %{time_total} in seconds and the parsed answer."""
    cmd = ["curl", "-sS", "-X", method, "-w", "\n%{http_code} %{time_total}", f"{API}{path}"]
    if body is not None:
        cmd[2:2] = ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0: sys.exit(f"curl {method} {path}: {p.stderr.strip()}")
    text, _, tail = p.stdout.rpartition("\n")
    code, t = tail.split()
    if not code.startswith("2"): sys.exit(f"{method} {path}: {code} {text[:300]}")
    return float(t), (json.loads(text) if text else None)

def layout(size, pieces, piece):
    """pieces offsets, 4 KiB aligned, one in each of `pieces` equal stretches of the volume."""
    span = size // pieces
    return [k * span + rng.randrange(0, (span - piece) // 4096 + 1) * 4096 for k in range(pieces)]

def put(vol, off, data):
    call("PUT", f"/v1/volumes/{vol}/data?offset={off}", data, "application/octet-stream")

# ---- btrfs
BTRFS = bool(btrfs_mnt)
SNAP_CREATE_V2 = 0x50009417   # _IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2), 4096 bytes
RDONLY = 1 << 1
def bt_snap(src, dstdir, name, ro):
    s = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    d = os.open(dstdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(4096)
        struct.pack_into("<qQQ", buf, 0, s, 0, RDONLY if ro else 0)
        nb = name.encode(); buf[56:56 + len(nb)] = nb
        fcntl.ioctl(d, SNAP_CREATE_V2, buf)
    finally:
        os.close(s); os.close(d)
def bt_write(path, off, data):
    fd = os.open(path, os.O_WRONLY)
    try: os.pwrite(fd, data, off)
    finally: os.close(fd)

# ---- set-up: the same volumes for forkd and btrfs
# members[(size, n)] = forkd volume names; bt_members[(size, n)] = (subvolume, file) pairs per member
fk_env, fk_members, fk_solo = {}, {}, {}
bt_sub, bt_one, bt_solo = {}, {}, {}   # per-member subvolume paths; one-subvolume path + files; solo subvolume
t_setup = time.time()
for sz, (size, extra) in SIZES.items():
    src = f"src-{sz.lower().replace('+', '-')}"
    call("POST", "/v1/sources", {"name": src, "size": size})
    call("POST", f"/v1/volumes/{src}/snapshots", {})
    if BTRFS:
        os.makedirs(f"{btrfs_mnt}/snaps", exist_ok=True)
    def new_clone(name):
        call("POST", "/v1/clones", {"from": f"{src}@1", "name": name})
    def new_sub(name):
        subprocess.run(["btrfs", "-q", "subvolume", "create", f"{btrfs_mnt}/{name}"], check=True, stdout=subprocess.DEVNULL)
        return f"{btrfs_mnt}/{name}"
    def new_file(path):
        with open(path, "wb") as f: f.truncate(size)
    def fill(vol, files):   # 16 MiB: 64 pieces of 256 KiB spread over the volume; the same bytes to every copy
        for off in layout(size, 64, 256 * KIB):
            data = os.urandom(256 * KIB)
            if vol: put(vol, off, data)
            for f in files: bt_write(f, off, data)
    def more(vol, files):   # `extra` MiB: pieces of 1 MiB spread over the volume
        for off in layout(size, extra, MIB) if extra else []:
            data = os.urandom(MIB)
            put(vol, off, data)
            for f in files: bt_write(f, off, data)
    for n in NS:
        tag = f"{sz.lower().replace('+', '-')}-{n}"
        fk_env[(sz, n)] = f"env-{tag}"
        fk_members[(sz, n)] = []
        if BTRFS:
            bt_sub[(sz, n)] = []
            one = new_sub(f"one-{tag}")
            bt_one[(sz, n)] = (one, [f"{one}/m{i}.img" for i in range(n)])
        for i in range(n):
            vol = f"{tag}-m{i}"
            new_clone(vol)
            fk_members[(sz, n)].append(vol)
            files = []
            if BTRFS:
                sub = new_sub(f"per-{tag}-m{i}")
                bt_sub[(sz, n)].append(sub)
                files = [f"{sub}/disk.img", bt_one[(sz, n)][1][i]]
                for f in files: new_file(f)
            fill(vol, files)
            if i == 0: more(vol, files)
        call("POST", "/v1/environments", {"name": fk_env[(sz, n)], "members": {f"m{i}": v for i, v in enumerate(fk_members[(sz, n)])}})
    if not extra:   # the lone volume, for reference
        vol = f"solo-{sz.lower()}"
        new_clone(vol)
        fk_solo[sz] = vol
        files = []
        if BTRFS:
            bt_solo[sz] = new_sub(f"solo-{sz.lower()}")
            files = [f"{bt_solo[sz]}/disk.img"]
            new_file(files[0])
        fill(vol, files)
    log(f"{sz}: a forkd source, {sum(NS) + (0 if extra else 1)} clones with 16 MiB each"
        + (f" ({extra} MiB more in each environment's m0)" if extra else "") + ", 2 environments" + (", btrfs copies" if BTRFS else ""))
if BTRFS:
    subprocess.run(["sync"], check=True)
log(f"set-up took {time.time() - t_setup:.0f} s")

# ---- cases: (key, dirty-before, timed action)
samples = {}
def dirty_fk(vols, size):
    for v in vols:
        put(v, rng.randrange(0, size // 4096) * 4096, os.urandom(4096))
def dirty_bt(files, size):
    for f in files:
        bt_write(f, rng.randrange(0, size // 4096) * 4096, os.urandom(4096))

def snapshot_cases():
    cases = []
    for sz, (size, extra) in SIZES.items():
        for n in NS:
            env, vols = fk_env[(sz, n)], fk_members[(sz, n)]
            cases.append((f"snap|forkd env|{sz}|{n}",
                          lambda vols=vols, size=size: dirty_fk(vols, size),
                          lambda env=env: curl_timed("POST", f"/v1/environments/{env}/snapshots", {})[0]))
            if BTRFS:
                subs, (one, ofiles) = bt_sub[(sz, n)], bt_one[(sz, n)]
                def per(subs=subs):
                    t0 = time.perf_counter()
                    for s in subs:
                        k = counters[s] = counters.get(s, 0) + 1
                        bt_snap(s, f"{btrfs_mnt}/snaps", f"{os.path.basename(s)}@{k}", True)
                    return time.perf_counter() - t0
                def onesnap(one=one):
                    k = counters[one] = counters.get(one, 0) + 1
                    t0 = time.perf_counter()
                    bt_snap(one, f"{btrfs_mnt}/snaps", f"{os.path.basename(one)}@{k}", True)
                    return time.perf_counter() - t0
                cases.append((f"snap|btrfs per-member|{sz}|{n}",
                              lambda subs=subs, size=size: dirty_bt([f"{s}/disk.img" for s in subs], size), per))
                cases.append((f"snap|btrfs one-subvolume|{sz}|{n}",
                              lambda ofiles=ofiles, size=size: dirty_bt(ofiles, size), onesnap))
        if extra: continue
        vol = fk_solo[sz]
        cases.append((f"snap|forkd single|{sz}|1",
                      lambda vol=vol, size=size: dirty_fk([vol], size),
                      lambda vol=vol: curl_timed("POST", f"/v1/volumes/{vol}/snapshots", {})[0]))
        if BTRFS:
            sub = bt_solo[sz]
            def solosnap(sub=sub):
                k = counters[sub] = counters.get(sub, 0) + 1
                t0 = time.perf_counter()
                bt_snap(sub, f"{btrfs_mnt}/snaps", f"{os.path.basename(sub)}@{k}", True)
                return time.perf_counter() - t0
            cases.append((f"snap|btrfs single|{sz}|1", lambda sub=sub, size=size: dirty_bt([f"{sub}/disk.img"], size), solosnap))
    return cases
counters = {}

def clone_cases():
    cases = []
    for sz, (size, extra) in SIZES.items():
        for n in NS:
            env = fk_env[(sz, n)]
            def fkclone(env=env, key=f"delete|forkd env|{sz}|{n}"):
                t, _ = curl_timed("POST", "/v1/environments/clones", {"from": f"{env}@latest", "name": "bench-clone"})
                td, ans = curl_timed("DELETE", "/v1/environments/bench-clone", None)
                samples.setdefault(key, []).append(td)
                return t
            cases.append((f"clone|forkd env|{sz}|{n}", None, fkclone))
            if BTRFS:
                subs, (one, _) = bt_sub[(sz, n)], bt_one[(sz, n)]
                def per(subs=subs):
                    made = []
                    t0 = time.perf_counter()
                    for s in subs:
                        b = os.path.basename(s)
                        bt_snap(f"{btrfs_mnt}/snaps/{b}@{counters[s]}", btrfs_mnt, f"clone-{b}", False)
                        made.append(f"{btrfs_mnt}/clone-{b}")
                    t = time.perf_counter() - t0
                    subprocess.run(["btrfs", "-q", "subvolume", "delete", *made], check=True, stdout=subprocess.DEVNULL)
                    return t
                def onec(one=one):
                    b = os.path.basename(one)
                    t0 = time.perf_counter()
                    bt_snap(f"{btrfs_mnt}/snaps/{b}@{counters[one]}", btrfs_mnt, f"clone-{b}", False)
                    t = time.perf_counter() - t0
                    subprocess.run(["btrfs", "-q", "subvolume", "delete", f"{btrfs_mnt}/clone-{b}"], check=True, stdout=subprocess.DEVNULL)
                    return t
                cases.append((f"clone|btrfs per-member|{sz}|{n}", None, per))
                cases.append((f"clone|btrfs one-subvolume|{sz}|{n}", None, onec))
        if extra: continue
        vol = fk_solo[sz]
        def soloclone(vol=vol):
            t, _ = curl_timed("POST", "/v1/clones", {"from": f"{vol}@latest", "name": "bench-solo-clone"})
            call("DELETE", "/v1/volumes/bench-solo-clone")
            return t
        cases.append((f"clone|forkd single|{sz}|1", None, soloclone))
    return cases

def measure(cases, label):
    t0 = time.time()
    base = {k: len(v) for k, v in samples.items()}
    for r in range(WARMUP + runs):
        order = cases[r % len(cases):] + cases[:r % len(cases)]   # rotate the order run by run
        for key, dirty, action in order:
            # a quiet disk first (the other cases' writeback must not land in this one's fsync),
            # then this case's own fresh writes, then the timed operation
            os.sync()
            if dirty: dirty()
            t = action()
            if r >= WARMUP: samples.setdefault(key, []).append(t)
        if r == WARMUP - 1:   # warm-up samples of the side measurements (deletes) are dropped too
            for k in [k for k in samples if k.startswith("delete|")]: del samples[k][base.get(k, 0):]
    log(f"{label}: {len(cases)} cases x ({WARMUP} + {runs}) runs in {time.time() - t0:.0f} s")

measure(snapshot_cases(), "snapshots")
measure(clone_cases(), "clones")
snaps_before_history = len(call("GET", f"/v1/volumes/{fk_members[('1TiB', 20)][1]}?space=false").get("snapshots", []))
if HISTORY:
    # a long history: HISTORY more forkd snapshots of the 1 TiB environments and lone volume
    hist = [(k.replace("snap|", "hist|"), d, a) for k, d, a in snapshot_cases()
            if k.startswith("snap|forkd") and k.split("|")[2] == "1TiB"]
    saved, runs = runs, HISTORY
    measure(hist, "history")
    runs = saved

# sanity: what forkd holds for one member
show = call("GET", f"/v1/volumes/{fk_members[('1TiB', 20)][1]}?space=false")
info = {"member_example": {k: show.get(k) for k in ("name", "size_bytes", "allocated_bytes")} | {"snapshots": len(show.get("snapshots", []))}}
with open(raw_path, "w") as f:
    json.dump({"samples": samples, "info": info, "warmup": WARMUP, "runs": runs, "history": HISTORY,
               "snaps_before_history": snaps_before_history}, f)
EOF

log "set-up and measurement ($RUNS runs per case, 2 warm-up runs first)"
python3 "$SCRATCH/driver.py" "$API_PORT" "$RUNS" "$QUICK" "$BTRFS_MNT" "$SCRATCH/raw.json"
stop_pid "$DAEMON_PID"
DAEMON_PID=""

# ---------------------------------------------------------------- report
export LVM_STATUS ZFS_STATUS BTRFS_STATUS INVOCATION
python3 - "$SCRATCH/raw.json" "$(nproc)" "$(uname -r)" "$(date -u '+%Y-%m-%d %H:%M UTC')" \
    "$(df -T "$SCRATCH" | awk 'NR==2{print $1" ("$2")"}')" "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" "$(cut -d' ' -f1-3 /proc/loadavg)" "$RUNS" "$QUICK" <<'EOF' | tee "$OUT"
import json, math, os, statistics, sys
raw, ncpu, kernel, date, disk, rev, cpu, load, runs, quick = sys.argv[1:11]
d = json.load(open(raw)); S = d["samples"]
def med(k): return statistics.median(S[k])
def p90(k):
    v = sorted(S[k]); return v[max(0, math.ceil(0.9 * len(v)) - 1)]
def ms(x): return f"{x * 1000:.2f}"
have = lambda k: k in S and S[k]
print(f"# forkd environment snapshot and clone benchmark{' (--quick)' if quick == '1' else ''}\n")
print(f"- date {date}; forkd at {rev}; {ncpu} CPUs ({cpu}); kernel {kernel}; scratch on {disk}; load1/5/15 at the end {load}")
print(f"- {runs} timed runs per case after {d['warmup']} untimed warm-up runs; all cases interleaved run by run")
print(f"- example member at the end: {json.dumps(d['info']['member_example'])}")
print("- times in milliseconds; forkd: curl's `%{time_total}` of the API call (client-side, no CLI start-up); "
      "btrfs: wall time around the snapshot ioctls in one process\n")
print("## Peers\n")
print(f"- btrfs: {os.environ['BTRFS_STATUS']}")
print(f"- LVM thin: {os.environ['LVM_STATUS']}")
print(f"- ZFS: {os.environ['ZFS_STATUS']}\n")
SZ = ["1GiB", "1TiB", "1TiB+256MiB"]
print("## Commands\n")
print(f"""- this report: `{os.environ['INVOCATION']}`; the daemon: `forkd serve --data-dir SCRATCH/d --api 127.0.0.1:PORT --nbd 127.0.0.1:0 --iscsi 127.0.0.1:0`
- set-up (untimed): `POST /v1/sources {{"name":SRC,"size":SIZE}}`, `POST /v1/volumes/SRC/snapshots {{}}`, `POST /v1/clones {{"from":"SRC@1","name":VOL}}`,
  `PUT /v1/volumes/VOL/data?offset=O` (the data), `POST /v1/environments {{"name":ENV,"members":{{"m0":VOL0,..}}}}`;
  btrfs: `truncate -s 16G btrfs.img; mkfs.btrfs -q btrfs.img; mount -o loop btrfs.img MNT; btrfs subvolume create MNT/SUB`, sparse files written with `pwrite`
- before every timed operation (untimed): `sync`, then 4 KiB at a random offset into every member (`PUT .../data?offset=O`; `pwrite` for btrfs, not synced)
- timed, forkd (`curl -sS -X METHOD -H 'Content-Type: application/json' --data-binary BODY -w '%{{http_code}} %{{time_total}}' URL`):
  env snapshot `POST /v1/environments/ENV/snapshots {{}}`; single snapshot `POST /v1/volumes/VOL/snapshots {{}}`;
  env clone `POST /v1/environments/clones {{"from":"ENV@latest","name":"bench-clone"}}` then `DELETE /v1/environments/bench-clone` (timed too);
  single clone `POST /v1/clones {{"from":"VOL@latest","name":..}}` (deleted untimed)
- timed, btrfs: `ioctl(BTRFS_IOC_SNAP_CREATE_V2)` with `BTRFS_SUBVOL_RDONLY` per subvolume (what `btrfs subvolume snapshot -r SUB MNT/snaps/NAME` does),
  and without it from the newest read-only snapshots for the clones (`btrfs subvolume snapshot`), deleted untimed with `btrfs subvolume delete`
""")
print("Sizes: `1GiB` and `1TiB` are the logical size of every member, each holding 16 MiB (64 pieces of 256 KiB "
      "spread over the volume); `1TiB+256MiB`: the same, plus 256 MiB (256 pieces of 1 MiB spread over it) in member m0 "
      "of each environment. `median last 10 / first 10 runs` shows the drift over the run (each run adds a snapshot).\n")
def table(op, title, systems):
    print(f"## {title}\n")
    print("| system | volume size | members | median ms | p90 ms | min ms | max ms | runs | median last 10 / first 10 runs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for sysname in systems:
        for sz in SZ:
            for n in ("1", "2", "20"):
                k = f"{op}|{sysname}|{sz}|{n}"
                if have(k):
                    v = S[k]
                    drift = f"{statistics.median(v[-10:]) / statistics.median(v[:10]):.2f}" if len(v) >= 20 else "—"
                    print(f"| {sysname} | {sz} | {n} | {ms(med(k))} | {ms(p90(k))} | {ms(min(v))} | {ms(max(v))} | {len(v)} | {drift} |")
    print()
table("snap", "Snapshot of every member (forkd: one environment snapshot; btrfs per-member: N snapshots in a row)",
      ["forkd env", "forkd single", "btrfs one-subvolume", "btrfs per-member", "btrfs single"])
table("clone", "Clone of every member (forkd: env clone ENV@latest NEW; btrfs: writable snapshots of the newest snapshots)",
      ["forkd env", "forkd single", "btrfs one-subvolume", "btrfs per-member"])
table("delete", "Delete of that environment clone (forkd env delete NEW, measured after each clone)", ["forkd env"])

if d.get("history"):
    print(f"## A long history (forkd, 1 TiB): {d['history']} more snapshots, after {d['snaps_before_history']} per member\n")
    print("| case | median ms, first 20 | median ms, last 20 | last / first | ms more per 100 snapshots |")
    print("|---|---:|---:|---:|---:|")
    for n in ("2", "20", "1"):
        k = f"hist|forkd {'single' if n == '1' else 'env'}|1TiB|{n}"
        if have(k):
            v = S[k]; a, b = statistics.median(v[:20]), statistics.median(v[-20:])
            print(f"| forkd {'single volume' if n == '1' else f'env snapshot, {n} members'} | {ms(a)} | {ms(b)} | {b / a:.2f} | {(b - a) * 1000 / ((len(v) - 20) / 100):.2f} |")
    print()
print("## Ratios\n")
print("| ratio | of medians | of p90s | of minimums |")
print("|---|---:|---:|---:|")
def ratio(name, a, b):
    if have(a) and have(b): print(f"| {name} | {med(a) / med(b):.2f} | {p90(a) / p90(b):.2f} | {min(S[a]) / min(S[b]):.2f} |")
for op, what in (("snap", "env snapshot"), ("clone", "env clone")):
    for sz in SZ:
        ratio(f"forkd {what}, {sz}: 20 members / 2 members", f"{op}|forkd env|{sz}|20", f"{op}|forkd env|{sz}|2")
    for n in ("2", "20"):
        ratio(f"forkd {what}, {n} members: 1 TiB / 1 GiB (constant in size: about 1)", f"{op}|forkd env|1TiB|{n}", f"{op}|forkd env|1GiB|{n}")
        ratio(f"forkd {what}, {n} members: 1 TiB + 256 MiB in m0 / 1 TiB", f"{op}|forkd env|1TiB+256MiB|{n}", f"{op}|forkd env|1TiB|{n}")
    ratio(f"forkd single-volume {'snapshot' if op == 'snap' else 'clone'}: 1 TiB / 1 GiB", f"{op}|forkd single|1TiB|1", f"{op}|forkd single|1GiB|1")
    for sz in ("1GiB", "1TiB"):
        for n in ("2", "20"):
            ratio(f"forkd {what}, {sz}, {n} members / forkd single volume, {sz}", f"{op}|forkd env|{sz}|{n}", f"{op}|forkd single|{sz}|1")
    for peer in ("btrfs one-subvolume", "btrfs per-member"):
        for sz in SZ:
            for n in ("2", "20"):
                ratio(f"forkd {what} / {peer}, {sz}, {n} members", f"{op}|forkd env|{sz}|{n}", f"{op}|{peer}|{sz}|{n}")
    for peer in ("btrfs one-subvolume", "btrfs per-member"):
        for sz in SZ:
            ratio(f"{peer} {'snapshot' if op == 'snap' else 'clone'}, {sz}: 20 members / 2 members", f"{op}|{peer}|{sz}|20", f"{op}|{peer}|{sz}|2")
        for n in ("2", "20"):
            ratio(f"{peer} {'snapshot' if op == 'snap' else 'clone'}, {n} members: 1 TiB / 1 GiB", f"{op}|{peer}|1TiB|{n}", f"{op}|{peer}|1GiB|{n}")
print()
EOF
log "report written to $OUT"
