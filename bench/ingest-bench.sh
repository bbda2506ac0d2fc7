#!/usr/bin/env bash
# ingest-bench.sh: `forkd ingest` (full, incremental by digest, incremental with
# --changed-blocks) against `cp` of the same image on the same disk, in one run.
#
# Usage: bench/ingest-bench.sh [--quick] [--dir DIR] [--forkd PATH] [--keep]
#   --quick      512 MiB image instead of 4 GiB
#   --dir DIR    scratch dir on the disk to measure (default /work/ingest-bench-scratch);
#                created and removed by this script, refused if it exists and is not ours
#   --forkd PATH forkd binary (default target/release/forkd of this workspace)
#   --keep       keep the scratch dir
#   --out FILE   also write the report to FILE (default bench/ingest-results.md; none with --quick)
# Output: a markdown report on stdout. See bench/INGEST.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRATCH=/work/ingest-bench-scratch
FORKD=$REPO/target/release/forkd
SIZE_MIB=4096
QUICK=0
KEEP=0
OUT=""
while (($#)); do
    case $1 in
    --quick) QUICK=1; SIZE_MIB=512 ;;
    --dir) SCRATCH=$2; shift ;;
    --forkd) FORKD=$2; shift ;;
    --keep) KEEP=1 ;;
    --out) OUT=$2; shift ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 1 ;;
    esac
    shift
done
SIZE=$((SIZE_MIB * 1024 * 1024))
MIB=1048576
# --quick is a smoke test: its report goes to stdout only unless --out is given
if [[ -z ${OUT:-} ]]; then if ((QUICK)); then OUT=/dev/null; else OUT=$REPO/bench/ingest-results.md; fi; fi

log() { printf '[ingest-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
DAEMON_PID=""
SCRATCH_CREATED=0
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh" # stop_pid
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -n $DAEMON_PID ]] && stop_pid "$DAEMON_PID"
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
if [[ ! -x $FORKD ]]; then
    log "building forkd ($FORKD is missing)"
    (cd "$REPO" && cargo build --release -p forkd-daemon) || die "cargo build failed"
fi
if [[ -e $SCRATCH ]]; then
    [[ -f $SCRATCH/.ingest-bench ]] || die "$SCRATCH exists and is not an ingest-bench scratch dir; remove it or pass --dir"
    log "removing the leftover scratch dir $SCRATCH"
    rm -rf -- "$SCRATCH"
fi
mkdir -p -- "$SCRATCH"
SCRATCH_CREATED=1
touch "$SCRATCH/.ingest-bench"
SCRATCH=$(cd "$SCRATCH" && pwd)
avail=$(df -B1 --output=avail "$SCRATCH" | tail -1)
((avail > 3 * SIZE + 1024 * MIB)) || die "need about 3 x ${SIZE_MIB} MiB free in $SCRATCH, have $((avail / MIB)) MiB"

IMAGE=$SCRATCH/image.raw
COPY=$SCRATCH/copy.raw

now() { date +%s.%N; }
load1() { cut -d' ' -f1 /proc/loadavg; }
calc() { python3 -c "print($1)"; }
fmt() { python3 -c "print(f'{$1:$2}')"; } # expr format

declare -A WALL=() LOADB=() LOADA=() CCPU=() DCPU=()
children_cpu() { # file: user+sys seconds of this shell's waited-for children, from `times >file`
    # (`times` must run in this shell itself: inside $(...) it would count the subshell's children)
    tail -1 "$1" | python3 -c '
import re, sys
print(sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", sys.stdin.read())))'
}
daemon_cpu() { # user+sys seconds of forkd serve so far (0 when it is not running)
    if [[ -n $DAEMON_PID && -r /proc/$DAEMON_PID/stat ]]; then
        awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$DAEMON_PID/stat"
    else echo 0; fi
}
timed() { # key cmd...: runs cmd, records wall seconds, CPU seconds and load1 before/after
    local key=$1 t0 t1 c0 c1 d0 d1
    shift
    LOADB[$key]=$(load1)
    d0=$(daemon_cpu)
    times >"$SCRATCH/times.0"
    t0=$(now)
    "$@"
    t1=$(now)
    times >"$SCRATCH/times.1"
    d1=$(daemon_cpu)
    c0=$(children_cpu "$SCRATCH/times.0")
    c1=$(children_cpu "$SCRATCH/times.1")
    LOADA[$key]=$(load1)
    WALL[$key]=$(calc "$t1 - $t0")
    CCPU[$key]=$(calc "$c1 - $c0")
    DCPU[$key]=$(calc "$d1 - $d0")
    log "$key: $(fmt "${WALL[$key]}" .2f) s, CPU s: command $(fmt "${CCPU[$key]}" .2f), daemon $(fmt "${DCPU[$key]}" .2f) (load1 ${LOADB[$key]} -> ${LOADA[$key]})"
}

# ---------------------------------------------------------------- 1. image
log "writing a ${SIZE_MIB} MiB image of random data"
timed image head -c "$SIZE" /dev/urandom >"$IMAGE"
# /dev/urandom can yield an all-zero 4 KiB block only with negligible probability.

# ---------------------------------------------------------------- 2. cp
cp_run() { # key [sync]
    timed "$1" bash -c 'cp -- "$1" "$2" && if [[ $3 == sync ]]; then sync; fi' _ "$IMAGE" "$COPY" "${2:-}"
    rm -f -- "$COPY"
}
cp_run cp1
cp_run cp2
cp_run cpsync sync
# the disk's own durable write speed: the bound for a full ingest, which ends durable too
timed dd bash -c 'dd if="$1" of="$2" bs=16M oflag=direct conv=fdatasync status=none' _ "$IMAGE" "$COPY"
rm -f -- "$COPY"

# ---------------------------------------------------------------- 3. daemon + full ingest
read -r API_PORT ISCSI_PORT < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
API=http://127.0.0.1:$API_PORT
"$FORKD" serve --data-dir "$SCRATCH/d" --api "127.0.0.1:$API_PORT" --nbd 127.0.0.1:0 \
    --iscsi "127.0.0.1:$ISCSI_PORT" >"$SCRATCH/forkd.log" 2>&1 &
DAEMON_PID=$!
for ((i = 0; ; i++)); do
    "$FORKD" --api "$API" list >/dev/null 2>&1 && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$SCRATCH/forkd.log" >&2; die "forkd serve exited"; }
    ((i < 300)) || die "forkd serve did not answer on $API within 30 s"
    sleep 0.1
done
log "forkd serve (pid $DAEMON_PID) answers on $API"
"$FORKD" --api "$API" source create src --size "$SIZE" >/dev/null

last_ingest() { # key: the last snapshot's ingest stats of src -> JSON in INGEST[key]
    "$FORKD" --api "$API" show src --json | python3 -c '
import json, sys
d = json.load(sys.stdin)
snaps = d.get("snapshots") or d.get("volume", {}).get("snapshots") or []
ing = None
for s in snaps:
    if s.get("ingest"): ing = s["ingest"]
if ing is None: sys.exit("no ingest stats in show --json: " + json.dumps(d)[:400])
print(json.dumps(ing))'
}
declare -A INGEST=()

log "full ingest"
timed full "$FORKD" --api "$API" ingest src --from "$IMAGE" >/dev/null
INGEST[full]=$(last_ingest)
log "full ingest stats: ${INGEST[full]}"

# cp again after the ingest (fresh page-cache pages make cp's speed vary a lot on some VMs)
cp_run cp3
cp_run cp4

# ---------------------------------------------------------------- 4./5. increments
change_blocks() { # pct seed ranges-file: rewrite pct % of the 4 KiB blocks; prints changed bytes
    python3 - "$IMAGE" "$1" "$2" "$3" <<'EOF'
import os, random, sys
path, pct, seed, ranges = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
bs = 4096
n = os.path.getsize(path) // bs
k = round(n * pct / 100)
rng = random.Random(seed)
idx = sorted(rng.sample(range(n), k))
fd = os.open(path, os.O_WRONLY)
try:
    for i in idx:
        while True:
            b = rng.randbytes(bs)
            if any(b): break
        os.pwrite(fd, b, i * bs)
finally:
    os.close(fd)
with open(ranges, "w") as f:   # contiguous changed blocks merged into one range
    start = prev = None
    for i in idx:
        if start is not None and i == prev + 1:
            prev = i; continue
        if start is not None: f.write(f"{start * bs} {(prev - start + 1) * bs}\n")
        start = prev = i
    if start is not None: f.write(f"{start * bs} {(prev - start + 1) * bs}\n")
print(k * bs)
EOF
}
declare -A CHANGED=()
increment() { # key mode pct seed
    local key=$1 mode=$2 pct=$3 seed=$4 ranges=$SCRATCH/ranges.$1
    CHANGED[$key]=$(change_blocks "$pct" "$seed" "$ranges")
    log "$key: changed $((CHANGED[$key] / 4096)) blocks ($pct %), $(wc -l <"$ranges") ranges"
    if [[ $mode == digest ]]; then
        timed "$key" "$FORKD" --api "$API" ingest src --from "$IMAGE" >/dev/null
    else
        timed "$key" "$FORKD" --api "$API" ingest src --from "$IMAGE" --changed-blocks "$ranges" >/dev/null
    fi
    INGEST[$key]=$(last_ingest)
    log "$key stats: ${INGEST[$key]}"
}
increment dig1 digest 1 101
increment dig10 digest 10 110
increment cb1 changed-blocks 1 201
increment cb10 changed-blocks 10 210

# check: a dump of src equals the final image (the ingests were correct)
log "verifying: dump src and compare with the image"
"$FORKD" --api "$API" dump src "$COPY" >/dev/null
if cmp -s "$IMAGE" "$COPY"; then VERIFY="dump of src equals the final image: yes"; else VERIFY="dump of src equals the final image: NO (mismatch)"; fi
rm -f -- "$COPY"
log "$VERIFY"

stop_pid "$DAEMON_PID"
DAEMON_PID=""

# ---------------------------------------------------------------- 6. report
export SIZE_MIB QUICK VERIFY
{
    for k in "${!WALL[@]}"; do printf 'W %s %s %s %s %s %s\n' "$k" "${WALL[$k]}" "${LOADB[$k]}" "${LOADA[$k]}" "${CCPU[$k]}" "${DCPU[$k]}"; done
    for k in "${!INGEST[@]}"; do printf 'I %s %s\n' "$k" "${INGEST[$k]}"; done
    for k in "${!CHANGED[@]}"; do printf 'C %s %s\n' "$k" "${CHANGED[$k]}"; done
} >"$SCRATCH/raw.txt"
python3 - "$SCRATCH/raw.txt" "$(nproc)" "$(uname -r)" "$(date -u '+%Y-%m-%d %H:%M UTC')" \
    "$(df -T "$SCRATCH" | awk 'NR==2{print $1" ("$2")"}')" "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" <<'EOF' | tee "$OUT"
import json, os, sys
raw, ncpu, kernel, date, disk, rev, cpu = sys.argv[1:8]
W, I, C, CPU = {}, {}, {}, {}
for line in open(raw):
    t, k, rest = line.rstrip("\n").split(" ", 2)
    if t == "W":
        w, lb, la, cc, dc = rest.split(); W[k] = (float(w), lb, la); CPU[k] = (float(cc), float(dc))
    elif t == "I": I[k] = json.loads(rest)
    else: C[k] = int(rest)
size_mib = int(os.environ["SIZE_MIB"]); MIB = 1 << 20
def rate(k): return size_mib / W[k][0]
best_before = max(rate("cp1"), rate("cp2"))
best_after = max(rate("cp3"), rate("cp4"))
best_all = max(best_before, best_after)
print(f"# forkd ingest benchmark ({size_mib} MiB image{', --quick' if os.environ['QUICK'] == '1' else ''})\n")
print(f"- date {date}; forkd at {rev}; {ncpu} CPUs ({cpu}); kernel {kernel}; scratch on {disk}")
print(f"- load1 at the end: {open('/proc/loadavg').read().split()[0]}")
print(f"- image: {size_mib} MiB from /dev/urandom, written in {W['image'][0]:.2f} s "
      f"({size_mib / W['image'][0]:.0f} MiB/s, load1 {W['image'][1]} -> {W['image'][2]})")
print(f"- {os.environ['VERIFY']}\n")
print("## Full copy\n")
print("| step | wall s | MiB/s | ratio to best cp before ingest | ratio to best cp after ingest | goal | CPU s: command / forkd serve | load1 before -> after |")
print("|---|---:|---:|---:|---:|---|---:|---|")
rows = [("cp1", "cp run 1 (before ingest), no sync"), ("cp2", "cp run 2 (before ingest), no sync"),
        ("cpsync", "cp + sync (before ingest)"),
        ("dd", "dd bs=16M oflag=direct conv=fdatasync (before ingest)"), ("full", "full `forkd ingest`"),
        ("cp3", "cp run 3 (after ingest), no sync"), ("cp4", "cp run 4 (after ingest), no sync")]
for k, name in rows:
    w, lb, la = W[k]; r = size_mib / w
    goal = ">= 0.8x" if k == "full" else ""
    mark = ""
    if k == "full":
        mark = " (" + ("PASS" if r / best_before >= 0.8 else "MISS") + " / " + ("PASS" if r / best_after >= 0.8 else "MISS") + ")"
    print(f"| {name} | {w:.2f} | {r:.0f} | {r / best_before:.2f}x | {r / best_after:.2f}x | {goal}{mark} | {CPU[k][0]:.2f} / {CPU[k][1]:.2f} | {lb} -> {la} |")
f = I["full"]
print(f"\nFull ingest against the durable peers of the same run: {W['cpsync'][0] / W['full'][0]:.2f}x the speed of "
      f"cp + sync, {W['dd'][0] / W['full'][0]:.2f}x that of dd with O_DIRECT and fdatasync (the ingest ends durable; cp does not).")
print(f"\nfull ingest, daemon stats: {json.dumps(f)}\n")
print("## Incremental ingest\n")
has_wire = any("wire_bytes" in I[k] for k in ("dig1", "dig10", "cb1", "cb10"))
hdr = "| mode | % blocks changed | changed bytes | scanned bytes | sent bytes |"
if has_wire: hdr += " wire bytes |"
hdr += " sent / (1.05 x changed + 1 MiB) | goal | wall s | daemon duration_ms | wall s per changed MiB | CPU s: client / forkd serve | load1 before -> after |"
print(hdr)
ncol = hdr.count("|") - 1
sep = ["---", "---:"] + ["---:"] * (ncol - 2)
print("|" + "|".join(sep) + "|")
per = {}
for k, mode, pct in [("dig1", "digest", 1), ("dig10", "digest", 10), ("cb1", "--changed-blocks", 1), ("cb10", "--changed-blocks", 10)]:
    s = I[k]; ch = C[k]; w, lb, la = W[k]
    sent = s.get("sent_bytes", 0)
    ratio = sent / (1.05 * ch + MIB)
    per[k] = w / (ch / MIB)
    row = f"| {mode} | {pct} | {ch} | {s.get('scanned_bytes', '?')} | {sent} |"
    if has_wire: row += f" {s.get('wire_bytes', '—')} |"
    row += f" {ratio:.3f} | <= 1 ({'PASS' if ratio <= 1 else 'MISS'}) | {w:.2f} | {s.get('duration_ms', '?')} | {per[k]:.4f} | {CPU[k][0]:.2f} / {CPU[k][1]:.2f} | {lb} -> {la} |"
    print(row)
print("\n## Does the time scale with the changed bytes?\n")
print("| mode | wall 1 % | wall 10 % | wall 10 % / 1 % | s per changed MiB, 1 % / 10 % | daemon ms 1 % / 10 % | daemon 10 % / 1 % | daemon ms per changed MiB, 1 % / 10 % |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for mode, a, b in [("digest (reads the whole image both times)", "dig1", "dig10"), ("--changed-blocks (goal: about 10x)", "cb1", "cb10")]:
    da, db = I[a].get("duration_ms"), I[b].get("duration_ms")
    dr = f"{db / da:.1f}x" if da and db else "?"
    dp = f"{da / (C[a] / MIB):.1f} / {db / (C[b] / MIB):.1f}" if da and db else "?"
    print(f"| {mode} | {W[a][0]:.2f} | {W[b][0]:.2f} | {W[b][0] / W[a][0]:.1f}x | {per[a]:.4f} / {per[b]:.4f} | {da} / {db} | {dr} | {dp} |")
print(f"\nChanged bytes 10 % / 1 %: {C['cb10'] / C['cb1']:.1f}x. Wall times include the CLI start, the HTTP calls and the final durable flush; `duration_ms` is the daemon's own figure for the ingest.")
EOF
log "results written to $OUT"
