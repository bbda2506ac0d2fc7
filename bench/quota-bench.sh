#!/usr/bin/env bash
# quota-bench.sh: what a quota costs forkd, against btrfs qgroups in the same run, as ratios.
#
# Usage: bench/quota-bench.sh [--runs R] [--quick] [--dir DIR] [--forkd PATH] [--keep] [--out FILE]
#   --runs R     runs (default 5); every case runs once per run, interleaved phase by phase
#   --quick      a smoke run: 64 MiB sequential, 16 MiB random, 1 run, report to stdout only
#   --dir DIR    scratch dir (default /work/bench-scratch-quota); created and removed by this
#                script, refused if it exists and is not ours
#   --forkd PATH forkd binary (default target/release/forkd of this workspace; not built here)
#   --keep       keep the scratch dir (the btrfs file systems are unmounted all the same)
#   --out FILE   also write the report to FILE (default bench/quota-results.md)
#
# Cases, each given fresh clones in every run (forkd: clones of an empty 1 GiB source's
# snapshot; btrfs: writable snapshots of an empty subvolume, the "origin"):
#   forkd none    no quota                     btrfs off    a file system without qgroups
#   forkd big     quota 100G, never reached    btrfs big    qgroups on, exclusive limit 100G
#   forkd near    quota = workload + 5% for    btrfs near   qgroups on, exclusive limit =
#                 the fresh writes, then set                workload + 5% (all phases)
#                 to the clone's exact use for
#                 the overwrites (so every write takes the map walk, see below)
# Phases of a run, each over all cases in a random order drawn afresh for every phase of every
# run (seeded, so a rerun repeats it): a fixed or merely rotated order keeps each case behind
# the same neighbour, and a first version here measured forkd's quota'd clones always right
# after the unquota'd one's 1 GiB (its background work) as a "0.6x" that an isolated A/B check
# did not show. `sync` before each timed step, so no case's writeback lands in another's:
#   seq-fresh  1 GiB of random data in 1 MiB writes from offset 0 into a new clone, flushed at
#              the end: forkd `nbdcopy --flush --request-size=1M FILE nbd://..`; btrfs
#              `dd bs=1M conv=fsync` into a new file in the clone
#   seq-over   the same again over it (other random data): forkd nbdcopy; btrfs dd conv=notrunc,fsync
#   rand-fresh 128 MiB of 4 KiB random writes (each block once, fio's random map), iodepth 16,
#              into a second new clone, flushed at the end: forkd fio nbd engine; btrfs fio
#              io_uring (buffered) into a new sparse file (fallocate=none); both --end_fsync=1
#   rand-over  the same again over the same 128 MiB
#   snap       snapshot of the 1 GiB clone (forkd: curl %{time_total} of POST
#              /v1/volumes/C/snapshots, after which the quota'd clones are re-counted by a walk
#              of what they hold alone; btrfs: `btrfs subvolume snapshot -r`, wall time)
#   clone      a clone of that snapshot (POST /v1/clones; btrfs: writable snapshot of it)
#   delete     delete of that clone (DELETE /v1/volumes/C2; btrfs: `subvolume delete --commit-after`)
#              (snap, clone, delete: 3 rounds per run, 1 with --quick; each round a new snapshot)
# Why "near" is set to the exact use for the overwrites: forkd walks the map only when a write's
# non-zero blocks would take the clone past its limit (daemon/src/store/quota.rs). Fresh writes
# under a limit of workload + 5% never do, so they measure the counting alone; overwrites at
# the limit take the walk on every write and pass because they free what they replace.
# Output: a markdown report on stdout and in --out.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
INVOCATION="bench/quota-bench.sh${*:+ $*}"
SCRATCH=/work/bench-scratch-quota
FORKD=$REPO/target/release/forkd
RUNS=5
QUICK=0
KEEP=0
OUT=""
while (($#)); do
    case $1 in
    --runs) RUNS=$2; shift ;;
    --quick) QUICK=1; RUNS=1 ;;
    --dir) SCRATCH=$2; shift ;;
    --forkd) FORKD=$2; shift ;;
    --keep) KEEP=1 ;;
    --out) OUT=$2; shift ;;
    -h | --help) sed -n '2,44p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see -h)" >&2; exit 1 ;;
    esac
    shift
done
[[ $RUNS =~ ^[0-9]+$ ]] && ((RUNS >= 1)) || { echo "--runs takes a positive number" >&2; exit 1; }
if [[ -z $OUT ]]; then if ((QUICK)); then OUT=/dev/null; else OUT=$REPO/bench/quota-results.md; fi; fi
MIB=$((1 << 20))
if ((QUICK)); then SEQ=$((64 * MIB)); RAND=$((16 * MIB)); OPS_ROUNDS=1; else SEQ=$((1024 * MIB)); RAND=$((128 * MIB)); OPS_ROUNDS=3; fi
# workload + 5%, rounded up to 4 KiB
near_of() { echo $((($1 * 105 / 100 + 4095) / 4096 * 4096)); }

log() { printf '[quota-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
DAEMON_PID=""
SCRATCH_CREATED=0
MOUNTS=()
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh" # stop_pid
cleanup() {
    local rc=$? m
    set +e
    trap - EXIT INT TERM
    [[ -n $DAEMON_PID ]] && stop_pid "$DAEMON_PID"
    for m in "${MOUNTS[@]}"; do
        if mountpoint -q "$m"; then
            umount "$m" || umount -l "$m" # mount -o loop: the loop device goes with it
        fi
    done
    if ((SCRATCH_CREATED)); then
        if ((KEEP)); then log "kept scratch dir $SCRATCH"; else rm -rf -- "$SCRATCH"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- checks
missing=()
for tool in curl python3 nbdcopy fio jq; do command -v "$tool" >/dev/null || missing+=("$tool"); done
((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (apt-get install -y curl python3 libnbd-bin fio jq)"
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine (fio --enghelp); a fio built with libnbd is needed"
[[ -x $FORKD ]] || die "no forkd binary at $FORKD: build it (cargo build --release -p forkd-daemon) or pass --forkd PATH"
# what ran: the binary is copied into the scratch dir below, so a rebuild during the run changes nothing
FORKD_ID="$FORKD ($("$FORKD" --version 2>/dev/null || echo "no --version"), modified $(date -u -r "$FORKD" "+%Y-%m-%d %H:%M UTC"), sha256 $(sha256sum "$FORKD" | cut -c1-12); its workspace's HEAD at the start: $(git -C "$(dirname "$FORKD")/../.." rev-parse --short HEAD 2>/dev/null || echo '?'))"

# btrfs, the peer: loop-mounted, so root, the kernel module and btrfs-progs
BTRFS=1
BTRFS_STATUS=""
if ! grep -qw btrfs /proc/filesystems; then BTRFS=0; BTRFS_STATUS="not run: btrfs is not in /proc/filesystems"
elif ((EUID != 0)); then BTRFS=0; BTRFS_STATUS="not run: mounting a loop device needs root"
elif ! command -v mkfs.btrfs >/dev/null; then
    log "btrfs-progs missing: apt-get install -y btrfs-progs"
    if ! { apt-get install -y btrfs-progs >/dev/null 2>&1 && command -v mkfs.btrfs >/dev/null; }; then
        BTRFS=0; BTRFS_STATUS="not run: btrfs-progs missing and apt-get install -y btrfs-progs failed"
    fi
fi

if [[ -e $SCRATCH ]]; then
    [[ -f $SCRATCH/.quota-bench ]] || die "$SCRATCH exists and is not a quota-bench scratch dir; remove it or pass --dir"
    for m in "$SCRATCH"/bt-*; do if mountpoint -q "$m" 2>/dev/null; then umount "$m"; fi; done
    log "removing the leftover scratch dir $SCRATCH"
    rm -rf -- "$SCRATCH"
fi
mkdir -p -- "$SCRATCH"
SCRATCH_CREATED=1
touch "$SCRATCH/.quota-bench"
SCRATCH=$(cd "$SCRATCH" && pwd)
cp -- "$FORKD" "$SCRATCH/forkd"
FORKD=$SCRATCH/forkd
need=$((SEQ * 10 + RAND * 10 + 512 * MIB))
avail=$(df -B1 --output=avail "$SCRATCH" | tail -1)
((avail > need)) || die "need about $((need >> 20)) MiB free in $SCRATCH, have $((avail >> 20)) MiB"

# two btrfs file systems alike but for qgroups: bt-off (never enabled) and bt-on (enabled, the
# big and near cases); discard=async so deleted data goes back to the host's disk
if ((BTRFS)); then
    img=$(((SEQ * 4 + RAND * 4) / MIB + 1024))M
    for fs in off on; do
        mnt=$SCRATCH/bt-$fs
        mkdir -p "$mnt"
        truncate -s "$img" "$SCRATCH/bt-$fs.img"
        if mkfs.btrfs -q "$SCRATCH/bt-$fs.img" >"$SCRATCH/mkfs-$fs.log" 2>&1 &&
            mount -o loop,discard=async "$SCRATCH/bt-$fs.img" "$mnt" 2>>"$SCRATCH/mkfs-$fs.log"; then
            MOUNTS+=("$mnt")
            btrfs -q subvolume create "$mnt/origin" >/dev/null
            mkdir -p "$mnt/snaps"
        else
            BTRFS=0; BTRFS_STATUS="not run: mkfs.btrfs or mount -o loop failed: $(tail -1 "$SCRATCH/mkfs-$fs.log")"
            break
        fi
    done
fi
if ((BTRFS)); then
    btrfs quota enable "$SCRATCH/bt-on"
    btrfs quota rescan -w "$SCRATCH/bt-on" >/dev/null 2>&1 || true
    BTRFS_STATUS="ran: btrfs in kernel $(uname -r), btrfs-progs $(btrfs --version | awk '{print $2}'), two file systems of $img on loop devices backed by sparse files in the scratch dir, mounted -o discard=async; qgroups (full accounting; this btrfs-progs has no --simple quotas) enabled on one"
fi
log "btrfs: ${BTRFS_STATUS}"

# ---------------------------------------------------------------- daemon
read -r API_PORT NBD_PORT ISCSI_PORT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
API=http://127.0.0.1:$API_PORT
# --low-space-threshold 0: the default (5% of the file system) refuses new clones with 507 on a
# disk that is merely full of other things (a first run here died of it at 13 GB free of 252 GB)
"$FORKD" serve --data-dir "$SCRATCH/d" --api "127.0.0.1:$API_PORT" --nbd "127.0.0.1:$NBD_PORT" \
    --iscsi "127.0.0.1:$ISCSI_PORT" --low-space-threshold 0 >"$SCRATCH/forkd.log" 2>&1 &
DAEMON_PID=$!
for ((i = 0; ; i++)); do
    curl -sf "$API/v1/volumes" >/dev/null 2>&1 && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$SCRATCH/forkd.log" >&2; die "forkd serve exited"; }
    ((i < 300)) || die "forkd serve did not answer on $API within 30 s"
    sleep 0.1
done
log "forkd serve (pid $DAEMON_PID) answers on $API, NBD on 127.0.0.1:$NBD_PORT"

# api METHOD PATH [JSON]: the answer on stdout; any non-2xx is fatal
api() {
    local out code
    out=$(curl -sS -X "$1" -H 'Content-Type: application/json' ${3:+--data-binary "$3"} \
        -w '\n%{http_code}' "$API$2") || die "curl $1 $2 failed"
    code=${out##*$'\n'}
    [[ $code == 2* ]] || die "$1 $2: HTTP $code: ${out%$'\n'*}"
    printf '%s\n' "${out%$'\n'*}"
}
# api_timed METHOD PATH [JSON]: curl's %{time_total} in seconds
api_timed() {
    local out code
    out=$(curl -sS -o "$SCRATCH/body" -X "$1" -H 'Content-Type: application/json' ${3:+--data-binary "$3"} \
        -w '%{http_code} %{time_total}' "$API$2") || die "curl $1 $2 failed"
    code=${out%% *}
    [[ $code == 2* ]] || die "$1 $2: HTTP $code: $(head -c 300 "$SCRATCH/body")"
    echo "${out#* }"
}
nbd_uri() { echo "nbd://127.0.0.1:$NBD_PORT/$1"; }

# ---------------------------------------------------------------- set-up
log "random data: 2 files of $((SEQ >> 20)) MiB"
head -c "$SEQ" /dev/urandom >"$SCRATCH/rand-a"
head -c "$SEQ" /dev/urandom >"$SCRATCH/rand-b"
api POST /v1/sources "{\"name\":\"src\",\"size\":$SEQ}" >/dev/null
api POST /v1/volumes/src/snapshots '{}' >/dev/null

SAMPLES=$SCRATCH/samples.tsv
: >"$SAMPLES"
FAILS=$SCRATCH/failures.txt
: >"$FAILS"
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$RUN.$ROUND" "$3" >>"$SAMPLES"; } # case phase value
elapsed() { # command...: runs it, prints its wall seconds; a failure prints "fail"
    local t0=$EPOCHREALTIME t1
    if "$@" >"$SCRATCH/last.log" 2>&1; then
        t1=$EPOCHREALTIME
        python3 -c "print(f'{$t1 - $t0:.6f}')"
    else echo fail; fi
    cat "$SCRATCH/last.log" >>"$SCRATCH/cmd.log"
}

CASES=(fk-none fk-big fk-near)
((BTRFS)) && CASES+=(bt-off bt-big bt-near)
# clone (forkd volume name or btrfs subvolume path) of case C for workload W (seq|rand) in run R
fk_name() { echo "r$RUN-$1-$2"; }
bt_fs() { if [[ $1 == bt-off ]]; then echo "$SCRATCH/bt-off"; else echo "$SCRATCH/bt-on"; fi; }
bt_path() { echo "$(bt_fs "$1")/r$RUN-$1-$2"; }
size_of() { if [[ $1 == seq ]]; then echo "$SEQ"; else echo "$RAND"; fi; }

phase_setup() { # case: fresh clones for both workloads
    local c=$1 w q
    for w in seq rand; do
        case $c in
        fk-none) q="" ;;
        fk-big) q=',"quota":"100G"' ;;
        fk-near) q=",\"quota\":\"$(near_of "$(size_of $w)")\"" ;;
        bt-*)
            btrfs -q subvolume snapshot "$(bt_fs "$c")/origin" "$(bt_path "$c" $w)" >/dev/null
            case $c in
            bt-big) btrfs qgroup limit -e 100G "$(bt_path "$c" $w)" ;;
            bt-near) btrfs qgroup limit -e "$(near_of "$(size_of $w)")" "$(bt_path "$c" $w)" ;;
            esac
            continue ;;
        esac
        api POST /v1/clones "{\"from\":\"src@1\",\"name\":\"$(fk_name "$c" $w)\"$q}" >/dev/null
    done
}
write_seq() { # case over: one pass of 1 MiB writes
    local c=$1 over=$2 src=$SCRATCH/rand-a
    ((over)) && src=$SCRATCH/rand-b
    case $c in
    fk-*) elapsed nbdcopy --flush --request-size=$MIB "$src" "$(nbd_uri "$(fk_name "$c" seq)")" ;;
    bt-*) if ((over)); then
            elapsed dd if="$src" of="$(bt_path "$c" seq)/disk.img" bs=1M count=$((SEQ / MIB)) conv=fsync,notrunc
        else
            elapsed dd if="$src" of="$(bt_path "$c" seq)/disk.img" bs=1M count=$((SEQ / MIB)) conv=fsync
        fi ;;
    esac
}
write_rand() { # case: one pass of 4 KiB random writes over RAND bytes
    local c=$1
    local common=(--name=rand --rw=randwrite --bs=4k --iodepth=16 --size="$RAND" --end_fsync=1)
    case $c in
    fk-*) elapsed fio "${common[@]}" --ioengine=nbd --uri="$(nbd_uri "$(fk_name "$c" rand)")" ;;
    bt-*) elapsed fio "${common[@]}" --ioengine=io_uring --fallocate=none --filename="$(bt_path "$c" rand)/disk.img" ;;
    esac
}
set_exact() { # fk-near: the quota down to what the clone holds now, before its overwrites
    local v=$1 used
    used=$(api GET "/v1/volumes/$v" | jq -r .unique_bytes)
    [[ $used =~ ^[0-9]+$ ]] && ((used >= 4096)) || die "$v: unique_bytes is $used"
    api PUT "/v1/volumes/$v/quota" "{\"quota\":\"$used\"}" >/dev/null
    echo "$used"
}
check_use() { # fk-near, after the overwrites: the clone must still hold exactly its quota
    local v=$1 want=$2 used
    used=$(api GET "/v1/volumes/$v" | jq -r .unique_bytes)
    [[ $used == "$want" ]] || echo "- run $RUN: $v holds $used bytes alone after its overwrites, quota $want" >>"$FAILS"
}
take() { # case phase value: record it, or note the failure
    if [[ $3 == fail ]]; then
        local why
        why=$(grep -m1 -iE 'error|quota|denied|fail|space' "$SCRATCH/last.log" || grep -v '^$' "$SCRATCH/last.log" | tail -1)
        echo "- run $RUN: $1 $2 failed: \`$why\`" >>"$FAILS"
        log "run $RUN: $1 $2 FAILED"
    else record "$1" "$2" "$3"; fi
}

declare -A EXACT
SEED=0
run_phase() { # phase: every case once, in an order drawn afresh (seeded) for every phase of every run
    local ph=$1 c t
    SEED=$((SEED + 1))
    read -r -a ORDER < <(python3 -c 'import random, sys; l = sys.argv[2:]; random.Random(int(sys.argv[1])).shuffle(l); print(*l)' "$SEED" "${CASES[@]}")
    echo "run $RUN round $ROUND $ph: ${ORDER[*]}" >>"$SCRATCH/orders.log"
    for c in "${ORDER[@]}"; do
        sync
        case $ph in
        setup) phase_setup "$c"; continue ;;
        seq-fresh) t=$(write_seq "$c" 0) ;;
        seq-over)
            if [[ $c == fk-near ]]; then EXACT[seq]=$(set_exact "$(fk_name "$c" seq)"); sync; fi
            t=$(write_seq "$c" 1) ;;
        rand-fresh) t=$(write_rand "$c") ;;
        rand-over)
            if [[ $c == fk-near ]]; then EXACT[rand]=$(set_exact "$(fk_name "$c" rand)"); sync; fi
            t=$(write_rand "$c") ;;
        snap) case $c in
            fk-*) t=$(api_timed POST "/v1/volumes/$(fk_name "$c" seq)/snapshots" '{}') ;;
            bt-*) t=$(elapsed btrfs -q subvolume snapshot -r "$(bt_path "$c" seq)" "$(bt_fs "$c")/snaps/r$RUN-$c-$ROUND") ;;
            esac ;;
        clone) case $c in
            fk-*) t=$(api_timed POST /v1/clones "{\"from\":\"$(fk_name "$c" seq)@latest\",\"name\":\"$(fk_name "$c" child)\"}") ;;
            bt-*) t=$(elapsed btrfs -q subvolume snapshot "$(bt_fs "$c")/snaps/r$RUN-$c-$ROUND" "$(bt_path "$c" child)") ;;
            esac ;;
        delete) case $c in
            fk-*) t=$(api_timed DELETE "/v1/volumes/$(fk_name "$c" child)") ;;
            bt-*) t=$(elapsed btrfs -q subvolume delete --commit-after "$(bt_path "$c" child)") ;;
            esac ;;
        esac
        take "$c" "$ph" "$t"
        if [[ $c == fk-near && $ph == seq-over ]]; then check_use "$(fk_name "$c" seq)" "${EXACT[seq]}"; fi
        if [[ $c == fk-near && $ph == rand-over ]]; then check_use "$(fk_name "$c" rand)" "${EXACT[rand]}"; fi
    done
}
teardown() { # untimed: this run's clones, snapshots and subvolumes go
    local c w
    for c in "${CASES[@]}"; do
        case $c in
        fk-*) for w in seq rand; do api DELETE "/v1/volumes/$(fk_name "$c" $w)" >/dev/null; done ;;
        bt-*) btrfs -q subvolume delete --commit-after "$(bt_path "$c" seq)" "$(bt_path "$c" rand)" \
                "$(bt_fs "$c")/snaps/r$RUN-$c-"* >/dev/null ;;
        esac
    done
    sync
}

# ---------------------------------------------------------------- the measurement
LOADS=()
ROUND=1
T_START=$SECONDS
PHASES=(setup seq-fresh seq-over rand-fresh rand-over)
for ((RUN = 1; RUN <= RUNS; RUN++)); do
    ROUND=1
    LOADS+=("$(cut -d' ' -f1 /proc/loadavg)")
    log "run $RUN of $RUNS (load1 ${LOADS[-1]})"
    for ph in "${PHASES[@]}"; do run_phase "$ph"; done
    for ((ROUND = 1; ROUND <= OPS_ROUNDS; ROUND++)); do
        for ph in snap clone delete; do run_phase "$ph"; done
    done
    teardown
done
T_MEASURE=$((SECONDS - T_START))
stop_pid "$DAEMON_PID"
DAEMON_PID=""
log "measured in $T_MEASURE s"

# ---------------------------------------------------------------- report
export BTRFS_STATUS INVOCATION
python3 - "$SAMPLES" "$FAILS" "$SEQ" "$RAND" "$RUNS" "$QUICK" "$(nproc)" "$(uname -r)" \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(df -T "$SCRATCH" | awk 'NR==2{print $1" ("$2")"}')" \
    "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" "${LOADS[*]}" \
    "$FORKD_ID" "$(fio --version)" "$(nbdcopy --version | head -1)" \
    "$T_MEASURE" "$(near_of "$SEQ")" "$(near_of "$RAND")" "$OPS_ROUNDS" <<'EOF' | tee "$OUT"
import collections, os, statistics, sys
(samples, fails, seq, rand, runs, quick, ncpu, kernel, date, disk, rev, cpu, loads, forkd, fio,
 nbdcopy, tmeasure, nearseq, nearrand, ops) = sys.argv[1:21]
seq, rand, runs, nearseq, nearrand = int(seq), int(rand), int(runs), int(nearseq), int(nearrand)
S = collections.defaultdict(dict)   # (case, phase) -> {run: seconds}
for line in open(samples):
    c, ph, r, v = line.split("\t")
    S[(c, ph)][r] = float(v)
failures = open(fails).read().strip()
MiB = 1 << 20
def rate(ph, t):   # MiB/s for sequential, IOPS for random, ms for the catalog operations
    if ph.startswith("seq"): return seq / MiB / t
    if ph.startswith("rand"): return rand / 4096 / t
    return t * 1000
UNIT = {"seq": "MiB/s", "rand": "IOPS", "op": "ms"}
def unit(ph): return UNIT.get(ph.split("-")[0], "ms")
def fmt(x): return f"{x:,.0f}" if x >= 100 else f"{x:.2f}" if x < 10 else f"{x:.1f}"
def vals(c, ph): return [rate(ph, t) for t in S[(c, ph)].values()]
def spread(v): return f"{fmt(min(v))} – {fmt(max(v))}" if v else "—"

print(f"# forkd quota benchmark{' (--quick)' if quick == '1' else ''}\n")
print(f"- date {date}; script from the worktree at {rev}; forkd: {forkd}; {ncpu} CPUs ({cpu}); kernel {kernel}; scratch (forkd data dir, "
      f"random files, btrfs images) on {disk}")
print(f"- {runs} runs, every case once per run (the catalog operations {ops} times per run), phase by phase, each phase in a random order (seeded, drawn afresh per phase and run); load1 at the start of each run: {loads} "
      f"(the machine is shared: 2 CPUs, other sessions at work); measured in {tmeasure} s")
print(f"- {fio}; {nbdcopy}")
print(f"- command: `{os.environ['INVOCATION']}`")
print(f"- btrfs: {os.environ['BTRFS_STATUS']}\n")
print(f"Workloads: sequential {seq // MiB} MiB in 1 MiB writes; random {rand // MiB} MiB in 4 KiB writes (each block once), "
      f"iodepth 16; each into a fresh clone, then once more over the same range. `near` quota for the fresh pass: "
      f"{nearseq} bytes (sequential), {nearrand} bytes (random) = workload + 5%; forkd's near clone then gets its exact "
      f"unique_bytes as quota for the overwrite pass.\n")

CASES = ["fk-none", "fk-big", "fk-near", "bt-off", "bt-big", "bt-near"]
NAMES = {"fk-none": "forkd, no quota", "fk-big": "forkd, quota 100G", "fk-near": "forkd, quota near (fresh: +5%; over: = use)",
         "bt-off": "btrfs, qgroups off", "bt-big": "btrfs, qgroups on, limit 100G", "bt-near": "btrfs, qgroups on, limit +5%"}
WRITES = [("seq-fresh", "sequential 1 MiB writes, fresh clone"), ("seq-over", "sequential 1 MiB writes, over them again"),
          ("rand-fresh", "random 4 KiB writes, fresh clone"), ("rand-over", "random 4 KiB writes, over them again")]
OPS = [("snap", "snapshot of the clone holding the sequential data alone"), ("clone", "clone of that snapshot"),
       ("delete", "delete of that clone")]
have = lambda c, ph: bool(S.get((c, ph)))

def table(rows, title):
    print(f"## {title}\n")
    print("| workload | case | median | min – max | samples |")
    print("|---|---|---:|---:|---:|")
    for ph, what in rows:
        for c in CASES:
            if have(c, ph):
                v = vals(c, ph)
                print(f"| {what} | {NAMES[c]} | {fmt(statistics.median(v))} {unit(ph)} | {spread(v)} | {len(v)} |")
    print()
table(WRITES, "Writes (throughput: MiB/s or IOPS, higher is better; wall time of nbdcopy / fio / dd including the final flush)")
table(OPS, "Catalog operations (ms, lower is better; forkd: curl %{time_total} of the API call; btrfs: wall time of the btrfs command)")

def ratios(c, base, ph):
    """Per run: case / base, both from the same run; for throughput the rate ratio, for ops the time ratio."""
    out = []
    for r, t in S.get((c, ph), {}).items():
        b = S.get((base, ph), {}).get(r)
        if b is not None: out.append(rate(ph, t) / rate(ph, b))
    return out
print("## Ratios, each run's case over the baseline of the same run\n")
print("Throughput ratios: below 1 means the quota costs throughput. Time ratios for the catalog operations: above 1 means the quota costs time.\n")
print("| measure | forkd big / none | forkd near / none | btrfs big / off | btrfs near / off |")
print("|---|---:|---:|---:|---:|")
def cell(c, base, ph):
    v = ratios(c, base, ph)
    if not v: return "—"
    return f"**{statistics.median(v):.2f}** ({min(v):.2f} – {max(v):.2f})"
for ph, what in WRITES + OPS:
    kind = "time" if (ph, what) in OPS else unit(ph)
    print(f"| {what} ({kind}) | {cell('fk-big', 'fk-none', ph)} | {cell('fk-near', 'fk-none', ph)} | "
          f"{cell('bt-big', 'bt-off', ph)} | {cell('bt-near', 'bt-off', ph)} |")
print("\nMedian of the per-run ratios, with their min – max.\n")
print("What the quota adds to each catalog operation, in ms: the median of the per-round differences case − baseline (min – max):\n")
print("| operation | forkd big − none | forkd near − none | btrfs big − off | btrfs near − off |")
print("|---|---:|---:|---:|---:|")
def diff(c, base, ph):
    v = [(t - S[(base, ph)][r]) * 1000 for r, t in S.get((c, ph), {}).items() if r in S.get((base, ph), {})]
    return f"**{statistics.median(v):+.1f}** ({min(v):+.1f} – {max(v):+.1f})" if v else "—"
for ph, what in OPS:
    print(f"| {what} | {diff('fk-big', 'fk-none', ph)} | {diff('fk-near', 'fk-none', ph)} | {diff('bt-big', 'bt-off', ph)} | {diff('bt-near', 'bt-off', ph)} |")
print()
print("## forkd against btrfs, baselines (no quota / qgroups off), per-run ratio forkd / btrfs\n")
print("| measure | forkd / btrfs |")
print("|---|---:|")
for ph, what in WRITES + OPS:
    print(f"| {what} | {cell('fk-none', 'bt-off', ph)} |")
print()
print("## Every sample (MiB/s, IOPS or ms; run.round)\n")
print("| measure | run | " + " | ".join(c for c in CASES if any(have(c, ph) for ph, _ in WRITES + OPS)) + " |")
cols = [c for c in CASES if any(have(c, ph) for ph, _ in WRITES + OPS)]
print("|---|---|" + "---:|" * len(cols))
for ph, _ in WRITES + OPS:
    keys = sorted({r for c in cols for r in S.get((c, ph), {})}, key=lambda k: tuple(map(int, k.split("."))))
    for r in keys:
        print(f"| {ph} | {r} | " + " | ".join(fmt(rate(ph, S[(c, ph)][r])) if r in S.get((c, ph), {}) else "—" for c in cols) + " |")
print()
print("## Failures and checks\n")
print(failures if failures else "None: every timed step succeeded.")
if " holds " not in failures:
    print("\nforkd's near clones held exactly their quota (their unique_bytes) after every overwrite pass: no write was refused, none added a block.")
print()
EOF
log "report written to $OUT"
