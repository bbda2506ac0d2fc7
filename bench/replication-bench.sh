#!/usr/bin/env bash
# replication-bench.sh: `forkd replicate` between two sites against nbdcopy of the same data over
# the same link, in one run (see bench/REPLICATION.md for the method and how to read the table).
#
# Two network namespaces joined by one veth pair, one `forkd serve` in each (as
# tests/src/twosite.rs builds them). On site A a source `db` of SIZE_MIB is ingested from a
# seeded random image in which FILL_PCT % of the CHUNK_KIB chunks hold random data (the rest
# are holes), giving db@1. Then:
#   full         `forkd replicate db --to B` into an empty B, against nbdcopy run in B's
#                namespace reading A's export db@1 into null:, into a sparse file on B (--flush)
#                and into an empty forkd clone on B (--flush); RUNS interleaved rounds, medians
#   wan          (WAN_MBIT > 0) once more each, forkd and nbdcopy into null:, with A's end of the
#                link limited to WAN_MBIT by tc tbf
#   incremental  1 % and then 10 % of the image's 4 KiB blocks rewritten (seeded, distinct),
#                ingested on A (db@2, db@3) and replicated: time, payload and bytes on the link
#                against the changed bytes (goal: link <= 1.05 x changed + 1 MiB), against
#                nbdcopy of the whole snapshot into null: (what a tool without diffs sends)
#   space        a clone dev of db@2 on A with CLONE_MIB written and snapshotted (dev@1),
#                replicated; then the allocated bytes of both sites' data/extents.0
# Every replica checked is dumped (`forkd dump`) on B and compared with A's (sha256).
# Prints a markdown table and writes it to bench/replication-results.md.
#
# Usage: bash bench/replication-bench.sh [--quick]
#   --quick      SIZE_MIB=256, RUNS=1, WAN_MBIT=0 (smoke run, under a minute)
# Environment:
#   REPL_BENCH_SCRATCH  scratch dir (default /work/replication-bench-scratch); created by the
#                script and removed at exit, refused if it exists and is not ours
#   SIZE_MIB     size of the image and of db in MiB (default 1024)
#   FILL_PCT     share of the image's chunks holding random data (default 60)
#   CHUNK_KIB    size of those chunks in KiB, a multiple of 4 (default 1024)
#   RUNS         rounds of the full-transfer part (default 3)
#   WAN_MBIT     rate of the wan part in Mbit/s, 0 to skip it (default 1000)
#   CLONE_MIB    MiB written into the clone dev (default 32)
#   SEED         seed of the image, the changes and the clone's writes (default 1)
#   KEEP_SCRATCH=1  keep the scratch dir (logs, reports); the data is removed all the same
#   RESULTS      output file (default bench/replication-results.md)
# Needs root (namespaces), iproute2 (ip, tc), nbdcopy (libnbd-bin), jq, curl, python3, openssl.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

QUICK=0
while (($#)); do
    case $1 in
    --quick) QUICK=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "replication-bench: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRATCH=${REPL_BENCH_SCRATCH:-/work/replication-bench-scratch}
RESULTS=${RESULTS:-$REPO/bench/replication-results.md}
if ((QUICK)); then
    SIZE_MIB=${SIZE_MIB:-256}; RUNS=${RUNS:-1}; WAN_MBIT=${WAN_MBIT:-0}
else
    SIZE_MIB=${SIZE_MIB:-1024}; RUNS=${RUNS:-3}; WAN_MBIT=${WAN_MBIT:-1000}
fi
FILL_PCT=${FILL_PCT:-60}
CHUNK_KIB=${CHUNK_KIB:-1024}
CLONE_MIB=${CLONE_MIB:-32}
SEED=${SEED:-1}
MIB=1048576
BS=4096
SIZE_BYTES=$((SIZE_MIB * MIB))
FORKD=$REPO/target/release/forkd

log() { printf '[replication-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

int_at_least() { # name value min
    if [[ ! $2 =~ ^[0-9]+$ ]] || ((10#$2 < $3)); then die "$1 must be an integer >= $3"; fi
}
int_at_least SIZE_MIB "$SIZE_MIB" 64
int_at_least RUNS "$RUNS" 1
int_at_least WAN_MBIT "$WAN_MBIT" 0
int_at_least CLONE_MIB "$CLONE_MIB" 4
int_at_least SEED "$SEED" 0
int_at_least FILL_PCT "$FILL_PCT" 1
int_at_least CHUNK_KIB "$CHUNK_KIB" 4
((CHUNK_KIB % 4 == 0 && SIZE_MIB * 1024 % CHUNK_KIB == 0)) || die "CHUNK_KIB must be a multiple of 4 dividing SIZE_MIB MiB"
((FILL_PCT <= 100)) || die "FILL_PCT must be at most 100"
((CLONE_MIB * 4 <= SIZE_MIB)) || die "CLONE_MIB must be at most a quarter of SIZE_MIB"

# ---------------------------------------------------------------- the two sites
# Fresh namespaces: nothing else listens there, so the ports are fixed (as in twosite.rs). The
# addresses exist only inside the two namespaces.
NS_PREFIX=frb
NS_A=${NS_PREFIX}A-$$
NS_B=${NS_PREFIX}B-$$
VETH_A=${NS_PREFIX}a$$
VETH_B=${NS_PREFIX}b$$
ADDR_A=10.251.7.1
ADDR_B=10.251.7.2
API_PORT=7480
NBD_PORT=10809
ISCSI_PORT=3260
URL_A=http://$ADDR_A:$API_PORT
URL_B=http://$ADDR_B:$API_PORT
# A's NBD listens on its link address, for nbdcopy run in B's namespace; B's on its loopback,
# for nbdcopy writing into a clone on B.
NBD_A=$ADDR_A:$NBD_PORT
NBD_B=127.0.0.1:$NBD_PORT

# ---------------------------------------------------------------- cleanup
declare -A PID=()          # name -> pid of every process still running that this script started
SCRATCH_CREATED=0
NETNS_CREATED=0
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh" # stop_pid

# remove_ns NS: SIGKILL what still runs in it, then delete it (its end of the veth pair goes too)
remove_ns() {
    local pid
    ip netns list | awk '{ print $1 }' | grep -qx -- "$1" || return 0
    for pid in $(ip netns pids "$1" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$1" 2>/dev/null || true
}
cleanup() {
    local rc=$? name
    set +e
    trap - EXIT INT TERM ERR
    for name in "${!PID[@]}"; do stop_pid "${PID[$name]}" "$name"; done
    if ((NETNS_CREATED)); then remove_ns "$NS_A"; remove_ns "$NS_B"; fi
    if ((SCRATCH_CREATED)); then
        if [[ ${KEEP_SCRATCH:-0} == 1 ]]; then
            find "$SCRATCH" \( -name '*.raw' -o -name '*.img' -o -name extents.0 \) -delete 2>/dev/null
            log "kept scratch dir $SCRATCH (data files removed)"
        else
            rm -rf -- "$SCRATCH"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
set -E
trap 'log "ERROR: line $LINENO: \`$BASH_COMMAND\` failed"' ERR

# ---------------------------------------------------------------- checks
[[ $(id -u) == 0 ]] || die "needs root: network namespaces and a veth pair"
declare -A PKG=([ip]=iproute2 [tc]=iproute2 [nbdcopy]=libnbd-bin [jq]=jq [curl]=curl
    [python3]=python3 [openssl]=openssl [sha256sum]=coreutils)
missing=()
for tool in "${!PKG[@]}"; do command -v "$tool" >/dev/null || missing+=("${PKG[$tool]}"); done
((${#missing[@]} == 0)) || die "missing: $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')(apt-get install -y them)"
if [[ ! -x $FORKD ]]; then
    log "building forkd (target/release/forkd is missing)"
    (cd "$REPO" && cargo build --release -p forkd-daemon) || die "cargo build failed"
fi

# namespaces of an earlier run that was killed before its cleanup (its pid is in their names)
for ns in $(ip netns list | awk '{ print $1 }'); do
    [[ $ns =~ ^${NS_PREFIX}[AB]-([0-9]+)$ ]] || continue
    pid=${BASH_REMATCH[1]}
    if [[ $pid != "$$" && ! -d /proc/$pid ]]; then log "removing the leftover namespace $ns"; remove_ns "$ns"; fi
done

if [[ -e $SCRATCH ]]; then
    [[ -f $SCRATCH/.replication-bench ]] || die "$SCRATCH exists and is not a replication-bench scratch dir; remove it or set REPL_BENCH_SCRATCH"
    log "removing the leftover scratch dir $SCRATCH"
    rm -rf -- "$SCRATCH"
fi
mkdir -p -- "$SCRATCH"
SCRATCH_CREATED=1
touch "$SCRATCH/.replication-bench"
SCRATCH=$(cd "$SCRATCH" && pwd)
# at the peak: the image, db and its replica (each about FILL_PCT % of the size, plus the 11 %
# changed), a copy on B, a dump
want=$((SIZE_BYTES * FILL_PCT * 5 / 100 + 2 * SIZE_BYTES / 10 + 1024 * MIB))
avail=$(df -B1 --output=avail "$SCRATCH" | tail -1)
((avail > want)) || die "need about $((want / MIB)) MiB free in $SCRATCH, have $((avail / MIB)) MiB"
DF_START=$(df -h --output=avail "$SCRATCH" | tail -1 | tr -d ' ')

# ---------------------------------------------------------------- helpers
now() { echo "$EPOCHREALTIME"; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; } # printf-format awk-expression
load1() { cut -d' ' -f1 /proc/loadavg; }
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
judge() { # VALUE OP GOAL -> PASS or MISS
    awk -v v="$1" -v op="$2" -v g="$3" 'BEGIN {
        ok = (op == ">=") ? v >= g : (op == "<=") ? v <= g : (op == "<") ? v < g : v > g
        print (ok ? "PASS" : "MISS") }'
}
mib() { calc '%.1f' "$1 / $MIB"; }

ROWS=()                    # "part|what|forkd|peer|ratio|goal|result", in table order
NOTES=()                   # markdown lines for the details section
CMDS=()                    # the commands measured, for the report
row() { local IFS='|'; ROWS+=("$*"); }
note() { NOTES+=("$*"); }

in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }
# fk SITE ARGS...: the CLI in SITE's namespace against SITE's daemon
fk() {
    local site=$1
    shift
    if [[ $site == A ]]; then
        in_a env -u FORKD_API -u FORKD_TOKEN "$FORKD" --api "$URL_A" --token-file "$SCRATCH/A/token" "$@"
    else
        in_b env -u FORKD_API -u FORKD_TOKEN "$FORKD" --api "$URL_B" --token-file "$SCRATCH/B/token" "$@"
    fi
}
tx_a() { ip -n "$NS_A" -s -j link show dev "$VETH_A" | jq -r '.[0].stats64.tx.bytes'; }
rx_a() { ip -n "$NS_A" -s -j link show dev "$VETH_A" | jq -r '.[0].stats64.rx.bytes'; }
alloc() { stat -c '%b %B' "$1" | awk '{ print $1 * $2 }'; } # allocated bytes of a file
sha() { sha256sum "$1" | cut -d' ' -f1; }

build_network() {
    ip netns add "$NS_A"
    NETNS_CREATED=1
    ip netns add "$NS_B"
    ip link add "$VETH_A" type veth peer name "$VETH_B"
    local s ns veth addr
    for s in A B; do
        if [[ $s == A ]]; then ns=$NS_A veth=$VETH_A addr=$ADDR_A; else ns=$NS_B veth=$VETH_B addr=$ADDR_B; fi
        ip link set "$veth" netns "$ns"
        ip -n "$ns" link set "$veth" addrgenmode none # no IPv6 chatter on the link
        ip -n "$ns" addr add "$addr/30" dev "$veth"
        ip -n "$ns" link set lo up
        ip -n "$ns" link set "$veth" up
    done
}

# start_site SITE: `forkd serve` in SITE's namespace on SITE's data dir, waiting until it answers
start_site() {
    local s=$1 ns addr nbd dir i
    if [[ $s == A ]]; then ns=$NS_A addr=$ADDR_A nbd=$NBD_A; else ns=$NS_B addr=$ADDR_B nbd=$NBD_B; fi
    dir=$SCRATCH/$s
    mkdir -p "$dir/hooks"
    # `ip netns exec` execs forkd: the pid is the daemon's. --low-space-threshold 0: a disk
    # merely full of other things must not refuse the ingests.
    ip netns exec "$ns" env -u FORKD_API -u FORKD_TOKEN "$FORKD" serve --data-dir "$dir/data" \
        --api "$addr:$API_PORT" --nbd "$nbd" --iscsi "127.0.0.1:$ISCSI_PORT" \
        --token-file "$dir/token" --hooks-dir "$dir/hooks" --low-space-threshold 0 >>"$dir/daemon.log" 2>&1 &
    PID[forkd-$s]=$!
    for ((i = 0; i < 300; i++)); do
        kill -0 "${PID[forkd-$s]}" 2>/dev/null || die "site $s: forkd serve exited during start-up: $(tail -5 "$dir/daemon.log")"
        fk "$s" list >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "site $s: forkd did not answer within 30 s"
}
stop_site() {
    [[ -n ${PID[forkd-$1]:-} ]] || return 0
    stop_pid "${PID[forkd-$1]}" "forkd serve (site $1)"
    unset "PID[forkd-$1]"
}
# fresh_b: B's daemon restarted on an empty data dir (no replica, no copies)
fresh_b() {
    stop_site B
    rm -rf -- "$SCRATCH/B/data"
    start_site B
}
# wait_gc SITE: until the site's garbage collection has nothing queued (at most a minute)
wait_gc() {
    local s=$1 url tok i v
    if [[ $s == A ]]; then url=$URL_A; else url=$URL_B; fi
    tok=$(cat "$SCRATCH/$s/token")
    for ((i = 0; i < 600; i++)); do
        v=$(ip netns exec "$( [[ $s == A ]] && echo "$NS_A" || echo "$NS_B")" \
            curl -sf -H "Authorization: Bearer $tok" "$url/metrics" | awk '$1 == "forkd_gc_queued_nodes" { print $2 }')
        [[ $v == 0 ]] && return 0
        sleep 0.1
    done
    die "site $s: garbage collection still has ${v:-?} nodes queued after a minute"
}

# ---------------------------------------------------------------- data
# make_image FILE SIZE FILL_PCT SEED CHUNK: a sparse file; each CHUNK-byte chunk random (seeded)
# with probability FILL_PCT %, else a hole. Prints the data bytes.
make_image() {
    python3 - "$@" <<'PY'
import os, random, sys
path, size, pct, seed, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
data = 0
with open(path, "wb") as f:
    for off in range(0, size, chunk):
        if rng.random() * 100 < pct:
            f.seek(off)
            f.write(rng.randbytes(chunk))
            data += chunk
    f.truncate(size)
print(data)
PY
}
# mutate FILE PCT SEED: rewrite PCT % of FILE's 4 KiB blocks (distinct, seeded) with random
# bytes, in place; prints how many blocks it rewrote (each one changed: random data)
mutate() {
    python3 - "$@" <<'PY'
import os, random, sys
path, pct, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
blocks = os.path.getsize(path) // 4096
n = round(blocks * pct / 100)
with open(path, "r+b") as f:
    for b in sorted(rng.sample(range(blocks), n)):
        f.seek(b * 4096)
        f.write(rng.randbytes(4096))
print(n)
PY
}
# write_clone SITE VOLUME MIB SEED: MIB of random data into VOLUME in 1 MiB pieces at distinct
# random MiB-aligned offsets (seeded), through the HTTP data route; sets WROTE_BLOCKS
WROTE_BLOCKS=0
write_clone() {
    local s=$1 vol=$2 mibs=$3 seed=$4 url tok ns i off
    if [[ $s == A ]]; then url=$URL_A ns=$NS_A; else url=$URL_B ns=$NS_B; fi
    tok=$(cat "$SCRATCH/$s/token")
    python3 - "$SIZE_MIB" "$mibs" "$seed" "$SCRATCH/piece" >"$SCRATCH/pieces.txt" <<'PY'
import random, sys
size_mib, n, seed, piece = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
for i, m in enumerate(sorted(rng.sample(range(size_mib), n))):
    with open(f"{piece}.{i}.raw", "wb") as f:
        f.write(rng.randbytes(1 << 20))
    print(i, m * (1 << 20))
PY
    while read -r i off; do
        ip netns exec "$ns" curl -sf -X PUT -H "Authorization: Bearer $tok" -H 'Content-Type: application/octet-stream' \
            --data-binary "@$SCRATCH/piece.$i.raw" "$url/v1/volumes/$vol/data?offset=$off" >/dev/null \
            || die "writing 1 MiB at $off of $vol on site $s failed"
        rm -f "$SCRATCH/piece.$i.raw"
    done <"$SCRATCH/pieces.txt"
    WROTE_BLOCKS=$((mibs * MIB / BS))
}
# verify_same REF [SHA]: REF dumped on B (and on A, or compared with SHA when given) must be
# byte-identical; sets VERIFIED_SHA
VERIFIED=()
verify_same() {
    local ref=$1 want=${2:-} f=$SCRATCH/dump.raw got
    if [[ -z $want ]]; then
        fk A dump "$ref" "$f" >/dev/null || die "forkd dump $ref on A failed"
        want=$(sha "$f"); rm -f "$f"
    fi
    fk B dump "$ref" "$f" >/dev/null || die "forkd dump $ref on B failed"
    got=$(sha "$f"); rm -f "$f"
    [[ $got == "$want" ]] || die "$ref differs between the sites: sha256 $want on A, $got on B (forkd bug: not measuring further)"
    VERIFIED+=("$ref")
}

# cpu SITE: CPU seconds (user + system, all threads) its daemon has used so far
TICK=$(getconf CLK_TCK)
cpu() { awk -v t="$TICK" '{ printf "%.2f", ($14 + $15) / t }' "/proc/${PID[forkd-$1]}/stat"; }
# measure_begin / measure_end: around one transfer, set R_SECS (wall), R_TX and R_RX (bytes A's
# end of the link sent and received) and R_CPU ("A's daemon CPU s/B's daemon CPU s")
R_SECS="" R_TX="" R_RX="" R_CPU=""
M_T0="" M_TX0="" M_RX0="" M_CA0="" M_CB0=""
measure_begin() { M_CA0=$(cpu A); M_CB0=$(cpu B); M_TX0=$(tx_a); M_RX0=$(rx_a); M_T0=$(now); }
measure_end() {
    local t1
    t1=$(now)
    R_TX=$(($(tx_a) - M_TX0)); R_RX=$(($(rx_a) - M_RX0))
    R_SECS=$(calc '%.3f' "$t1 - $M_T0")
    R_CPU="$(calc '%.2f' "$(cpu A) - $M_CA0")/$(calc '%.2f' "$(cpu B) - $M_CB0")"
}
# replicate_run OUT: `forkd replicate db --to B --json` from A, report into OUT.json; measured
# (wall time: the CLI's, start to exit)
replicate_run() {
    local out=$1
    measure_begin
    fk A replicate db --to "$URL_B" --to-token-file "$SCRATCH/B/token" --json >"$out.json" 2>"$out.err" \
        || die "forkd replicate db failed: $(tail -5 "$out.err")"
    measure_end
}
# nbdcopy_run SNAPSHOT DEST OUT [FLAGS...]: nbdcopy in B's namespace from A's export of
# SNAPSHOT to DEST; measured (wall time: nbdcopy's, start to exit)
nbdcopy_run() {
    local snap=$1 dest=$2 out=$3
    shift 3
    measure_begin
    in_b nbdcopy "$@" "nbd://$NBD_A/${snap//@/%40}" "$dest" >"$out.out" 2>&1 \
        || die "nbdcopy $* nbd://$NBD_A/${snap//@/%40} $dest failed: $(tail -5 "$out.out")"
    measure_end
}
jnum() { jq -r "$2" "$1.json"; }

# ================================================================ run
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')
if [[ -n $(git -C "$REPO" status --porcelain 2>/dev/null) ]]; then GIT_REV+=", dirty tree"; fi
# the last commit that changed anything outside bench/ (what the binary is built from)
SRC_REV=$(git -C "$REPO" log -1 --format=%h -- . ':(exclude)bench' 2>/dev/null || echo '?')
START_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
UPTIME_START=$(uptime)
T_START=$SECONDS
declare -A PART_WALL=()
part_t0=$SECONDS

IMAGE=$SCRATCH/image.raw
log "image: $SIZE_MIB MiB, $FILL_PCT % of its $CHUNK_KIB KiB chunks random (seed $SEED)"
DATA_BYTES=$(make_image "$IMAGE" "$SIZE_BYTES" "$FILL_PCT" "$SEED" "$((CHUNK_KIB * 1024))")
SHA1=$(sha "$IMAGE")

log "two namespaces $NS_A ($ADDR_A) and $NS_B ($ADDR_B), veth pair $VETH_A/$VETH_B"
build_network
for s in A B; do
    mkdir -p "$SCRATCH/$s"
    openssl rand -hex 32 >"$SCRATCH/$s/token"
    chmod 600 "$SCRATCH/$s/token"
    start_site "$s"
done
fk A source create db --size "${SIZE_MIB}M" >/dev/null
t0=$(now)
fk A ingest db --from "$IMAGE" --json >"$SCRATCH/ingest1.json" || die "ingest of db@1 on A failed"
INGEST1_SECS=$(calc '%.2f' "$(now) - $t0")
[[ $(fk A show db --json | jq -r '.snapshots[-1].name') == db@1 ]] || die "the ingest did not make db@1"
note "setup: image of $(mib "$SIZE_BYTES") MiB with $(mib "$DATA_BYTES") MiB of data ($FILL_PCT % of its $CHUNK_KIB KiB chunks random, the rest holes), allocated $(mib "$(alloc "$IMAGE")") MiB; ingested on A as db@1 in $INGEST1_SECS s"
PART_WALL[setup]=$((SECONDS - part_t0))

# ---------------------------------------------------------------- full
log "---- part full: $RUNS interleaved rounds"
part_t0=$SECONDS
declare -a F_SECS=() F_TX=() F_PAY=() F_WIRE=() F_DUR=() F_CPU=() N_SECS=() N_TX=() N_CPU=() L_SECS=() L_TX=() L_CPU=() C_SECS=() C_TX=() C_CPU=()
peer_null() {
    nbdcopy_run db@1 null: "$SCRATCH/full-null-$1"
    N_SECS+=("$R_SECS"); N_TX+=("$R_TX"); N_CPU+=("$R_CPU")
}
peer_file() {
    nbdcopy_run db@1 "$SCRATCH/B/copy.raw" "$SCRATCH/full-file-$1" --flush --destination-is-zero
    L_SECS+=("$R_SECS"); L_TX+=("$R_TX"); L_CPU+=("$R_CPU")
    rm -f "$SCRATCH/B/copy.raw"
}
peer_clone() { # into an empty clone on B (a clone of a never-ingested source: all zeros)
    fk B source create sink --size "${SIZE_MIB}M" >/dev/null
    fk B clone sink sinkc >/dev/null
    nbdcopy_run db@1 "nbd://$NBD_B/sinkc" "$SCRATCH/full-clone-$1" --flush --destination-is-zero
    C_SECS+=("$R_SECS"); C_TX+=("$R_TX"); C_CPU+=("$R_CPU")
    fk B delete sinkc >/dev/null
    fk B delete sink >/dev/null
}
forkd_full() {
    fresh_b
    replicate_run "$SCRATCH/full-forkd-$1"
    local r=$SCRATCH/full-forkd-$1
    [[ $(jnum "$r" '[.snapshots[] | .snapshot + ":" + (.base // "-")] | join(",")') == "db@1:-" ]] \
        || die "the full run sent $(jnum "$r" '[.snapshots[].snapshot] | join(",")'), expected db@1 in full"
    F_SECS+=("$R_SECS"); F_TX+=("$R_TX"); F_CPU+=("$R_CPU")
    F_PAY+=("$(jnum "$r" .payload_bytes)"); F_WIRE+=("$(jnum "$r" .wire_bytes)"); F_DUR+=("$(jnum "$r" .duration_ms)")
}
for ((k = 1; k <= RUNS; k++)); do
    # odd rounds: the peers, then forkd; even rounds: forkd, then the peers in reverse order.
    # The last odd round leaves B holding db@1 only, as the incremental part wants it.
    if ((k % 2)); then
        log "round $k: nbdcopy -> null:, -> file on B, -> forkd clone on B, then forkd replicate"
        peer_null "$k"; peer_file "$k"; peer_clone "$k"; forkd_full "$k"
    else
        log "round $k: forkd replicate, then nbdcopy -> forkd clone on B, -> file on B, -> null:"
        forkd_full "$k"; peer_clone "$k"; peer_file "$k"; peer_null "$k"
    fi
done
if ((RUNS % 2 == 0)); then
    log "B back to db@1 only (unmeasured replicate into a fresh B)"
    fresh_b
    replicate_run "$SCRATCH/full-reset"
fi
verify_same db@1 "$SHA1"
fm=$(printf '%s\n' "${F_SECS[@]}" | median)
nm=$(printf '%s\n' "${N_SECS[@]}" | median)
lm=$(printf '%s\n' "${L_SECS[@]}" | median)
cm=$(printf '%s\n' "${C_SECS[@]}" | median)
ftx=$(printf '%s\n' "${F_TX[@]}" | median)
ntx=$(printf '%s\n' "${N_TX[@]}" | median)
ltx=$(printf '%s\n' "${L_TX[@]}" | median)
ctx=$(printf '%s\n' "${C_TX[@]}" | median)
rate() { calc '%.0f MiB/s' "$SIZE_MIB / $1"; } # the volume's size over the time
cell() { echo "$(calc '%.2f' "$1") s, $(rate "$1"), $(mib "$2") MiB on the link"; } # secs tx
row full "db@1 in full vs nbdcopy → null: (B)" "$(cell "$fm" "$ftx")" "$(cell "$nm" "$ntx")" "$(calc '%.2fx' "$nm / $fm")" "—" info
row full "db@1 in full vs nbdcopy --flush → sparse file (B)" "$(cell "$fm" "$ftx")" "$(cell "$lm" "$ltx")" "$(calc '%.2fx' "$lm / $fm")" "—" info
row full "db@1 in full vs nbdcopy --flush → forkd clone (B)" "$(cell "$fm" "$ftx")" "$(cell "$cm" "$ctx")" "$(calc '%.2fx' "$cm / $fm")" "—" info
flimit=$((DATA_BYTES + DATA_BYTES / 20 + MIB))
row full "db@1: link bytes vs its data ($(mib "$DATA_BYTES") MiB; nbdcopy → null:'s link bytes as peer)" "$(mib "$ftx") MiB" "$(mib "$ntx") MiB" "$(calc '%.3fx' "$ftx / $DATA_BYTES")" "≤ 1.05x + 1 MiB" "$( ((ftx <= flimit)) && echo PASS || echo MISS)"
note "full, forkd replicate (per round): wall s ${F_SECS[*]}; daemon duration_ms ${F_DUR[*]}; payload bytes ${F_PAY[*]}; wire_bytes (forkd's count) ${F_WIRE[*]}; A's link tx bytes ${F_TX[*]}; daemons' CPU s (A/B) ${F_CPU[*]}"
note "full, nbdcopy → null: wall s ${N_SECS[*]}, tx ${N_TX[*]}, daemons' CPU s (A/B) ${N_CPU[*]}; → sparse file on B wall s ${L_SECS[*]}, tx ${L_TX[*]}, CPU ${L_CPU[*]}; → forkd clone on B wall s ${C_SECS[*]}, tx ${C_TX[*]}, CPU ${C_CPU[*]}"
PART_WALL[full]=$((SECONDS - part_t0))

# ---------------------------------------------------------------- wan
if ((WAN_MBIT > 0)); then
    log "---- part wan: A's end of the link limited to $WAN_MBIT Mbit/s (tc tbf)"
    part_t0=$SECONDS
    # a burst large enough that segmentation offload stays whole (as twosite.rs's limit_rate)
    in_a tc qdisc replace dev "$VETH_A" root tbf rate "${WAN_MBIT}mbit" burst 1mb latency 200ms
    nbdcopy_run db@1 null: "$SCRATCH/wan-null"
    wn=$R_SECS wntx=$R_TX wncpu=$R_CPU
    fresh_b
    replicate_run "$SCRATCH/wan-forkd"
    wf=$R_SECS wftx=$R_TX wfcpu=$R_CPU
    in_a tc qdisc del dev "$VETH_A" root
    line=$(calc '%.0f' "$WAN_MBIT * 1000000 / 8 / $MIB")
    row wan "db@1 in full at $WAN_MBIT Mbit/s vs nbdcopy → null:" "$(cell "$wf" "$wftx")" "$(cell "$wn" "$wntx")" "$(calc '%.2fx' "$wn / $wf")" "—" info
    note "wan: one run each (nbdcopy first, then forkd into a fresh B), tbf rate ${WAN_MBIT}mbit burst 1mb latency 200ms on A's veth: the line carries at most $line MiB/s; forkd's link bytes over the time $(calc '%.0f' "$wftx / $MIB / $wf") MiB/s, nbdcopy's $(calc '%.0f' "$wntx / $MIB / $wn") MiB/s; daemon duration_ms $(jnum "$SCRATCH/wan-forkd" .duration_ms); daemons' CPU s (A/B): forkd $wfcpu, nbdcopy $wncpu"
    PART_WALL[wan]=$((SECONDS - part_t0))
fi

# ---------------------------------------------------------------- incremental
log "---- part incremental"
part_t0=$SECONDS
declare -A SHA_OF=([db@1]=$SHA1)
incremental() { # PCT N: PCT % of the blocks changed, ingested as db@N, replicated
    local pct=$1 n=$2 blocks changed t0 isecs r=$SCRATCH/incr-$2 pay wire limit ntx
    blocks=$(mutate "$IMAGE" "$pct" "$((SEED * 100 + n))")
    changed=$((blocks * BS))
    t0=$(now)
    fk A ingest db --from "$IMAGE" --json >"$SCRATCH/ingest$n.json" || die "ingest of db@$n on A failed"
    isecs=$(calc '%.2f' "$(now) - $t0")
    [[ $(fk A show db --json | jq -r '.snapshots[-1].name') == "db@$n" ]] || die "the ingest did not make db@$n"
    SHA_OF[db@$n]=$(sha "$IMAGE")
    replicate_run "$r"
    [[ $(jnum "$r" '[.snapshots[] | .snapshot + ":" + (.base // "-")] | join(",")') == "db@$n:db@$((n - 1))" ]] \
        || die "the run sent $(jnum "$r" '[.snapshots[] | .snapshot + " from " + (.base // "nothing")] | join(", ")'), expected db@$n from db@$((n - 1))"
    pay=$(jnum "$r" .payload_bytes); wire=$(jnum "$r" .wire_bytes)
    local fs=$R_SECS ftx=$R_TX fcpu=$R_CPU
    nbdcopy_run "db@$n" null: "$SCRATCH/incr-null-$n"
    ntx=$R_TX
    limit=$((changed + changed / 20 + MIB))
    row incremental "db@$n: $pct % of the blocks changed ($(mib "$changed") MiB), time vs nbdcopy → null:" \
        "$(calc '%.2f' "$fs") s" "$(calc '%.2f' "$R_SECS") s" "$(calc '%.2fx' "$R_SECS / $fs")" "—" info
    row incremental "db@$n: link bytes vs changed bytes (nbdcopy's link bytes as peer)" \
        "$(mib "$ftx") MiB" "$(mib "$ntx") MiB" "$(calc '%.3fx' "$ftx / $changed")" "≤ 1.05x + 1 MiB" \
        "$( ((ftx <= limit)) && echo PASS || echo MISS)"
    note "incremental db@$n: $blocks blocks of 4 KiB rewritten ($changed bytes, seed $((SEED * 100 + n))); ingest on A $isecs s (changed_bytes $(jq -r '.summary.changed_bytes' "$SCRATCH/ingest$n.json")); replicate: changed_blocks $(jnum "$r" '.snapshots[0].changed_blocks'), payload $pay bytes ($(calc '%.4f' "$pay / $changed")x changed), wire_bytes $wire ($(calc '%.4f' "$wire / $changed")x), A's link tx $ftx ($(calc '%.4f' "$ftx / $changed")x; limit $limit), rx $R_RX; daemon duration_ms $(jnum "$r" .duration_ms), daemons' CPU s (A/B) $fcpu; nbdcopy of the whole db@$n → null: $R_SECS s, tx $ntx bytes ($(calc '%.1f' "$ntx / $ftx")x forkd's)"
}
incremental 1 2
incremental 10 3
# a run with nothing to send: the cost of asking
replicate_run "$SCRATCH/incr-noop"
[[ $(jnum "$SCRATCH/incr-noop" '.snapshots | length') == 0 ]] || die "a run after which nothing changed sent $(jnum "$SCRATCH/incr-noop" '[.snapshots[].snapshot] | join(",")')"
row incremental "nothing to send (up to date)" "$(calc '%.3f' "$R_SECS") s, $R_TX B on the link" "—" "—" "—" info
PART_WALL[incremental]=$((SECONDS - part_t0))

# ---------------------------------------------------------------- space
log "---- part space: clone dev of db@2 with $CLONE_MIB MiB written, dev@1, replicated"
part_t0=$SECONDS
fk A clone db@2 dev >/dev/null
write_clone A dev "$CLONE_MIB" "$((SEED * 100 + 9))"
dev_blocks=$WROTE_BLOCKS
[[ $(fk A snapshot dev --json | jq -r .snapshot) == dev@1 ]] || die "the snapshot of dev is not dev@1"
replicate_run "$SCRATCH/space"
[[ $(jnum "$SCRATCH/space" '[.snapshots[] | .snapshot + ":" + (.base // "-")] | join(",")') == "dev@1:db@2" ]] \
    || die "the run sent $(jnum "$SCRATCH/space" '[.snapshots[] | .snapshot + " from " + (.base // "nothing")] | join(", ")'), expected dev@1 from db@2"
dchanged=$((dev_blocks * BS))
dlimit=$((dchanged + dchanged / 20 + MIB))
row space "dev@1 (clone of db@2, $CLONE_MIB MiB written): link bytes vs changed" "$(mib "$R_TX") MiB in $(calc '%.2f' "$R_SECS") s" "—" "$(calc '%.3fx' "$R_TX / $dchanged")" "≤ 1.05x + 1 MiB" "$( ((R_TX <= dlimit)) && echo PASS || echo MISS)"
[[ $(fk A tree) == "$(fk B tree)" ]] || die "forkd tree differs between the sites: $(fk A tree) --- $(fk B tree)"
wait_gc A
wait_gc B
ea=$(alloc "$SCRATCH/A/data/extents.0")
eb=$(alloc "$SCRATCH/B/data/extents.0")
da=$(du -sb --apparent-size "$SCRATCH/A/data" | cut -f1)
row space "allocated bytes of data/extents.0, B (target) vs A (source)" "$(mib "$eb") MiB" "$(mib "$ea") MiB" "$(calc '%.3fx' "$eb / $ea")" "—" info
note "space: after db@1..db@3 and dev@1 on both sites, garbage collection idle on both: extents.0 allocated A $ea bytes, B $eb bytes (stat blocks x 512); whole data dirs (du -s, allocated) A $(du -sB1 "$SCRATCH/A/data" | cut -f1), B $(du -sB1 "$SCRATCH/B/data" | cut -f1); data in the snapshots: db@1 $DATA_BYTES bytes + changed blocks since; A's data dir apparent size $da"
note "dev@1: $dev_blocks blocks written ($dchanged bytes) through PUT /v1/volumes/dev/data, 1 MiB pieces; replicate: payload $(jnum "$SCRATCH/space" .payload_bytes), wire_bytes $(jnum "$SCRATCH/space" .wire_bytes), A's link tx $R_TX (limit $dlimit), daemons' CPU s (A/B) $R_CPU"
PART_WALL[space]=$((SECONDS - part_t0))

# ---------------------------------------------------------------- checks
log "---- checking the replicas: forkd dump on both sites, sha256"
part_t0=$SECONDS
verify_same db@2 "${SHA_OF[db@2]}"
verify_same db@3 "${SHA_OF[db@3]}"
verify_same db@3   # A's dump too, not only the image
verify_same dev@1
note "checked byte-identical (sha256 of \`forkd dump\` on B against A's dump or against the image ingested): ${VERIFIED[*]}; \`forkd tree\` prints the same on both sites"
PART_WALL[checks]=$((SECONDS - part_t0))

stop_site A
stop_site B
UPTIME_END=$(uptime)
T_TOTAL=$((SECONDS - T_START))

# ================================================================ report
CMDS+=("setup: \`forkd source create db --size ${SIZE_MIB}M\`, \`forkd ingest db --from image.raw\` (A)")
CMDS+=("forkd: \`ip netns exec NS_A forkd --api $URL_A --token-file A/token replicate db --to $URL_B --to-token-file B/token --json\` (B restarted on an empty data dir before each full run)")
CMDS+=("nbdcopy → null: \`ip netns exec NS_B nbdcopy nbd://$NBD_A/db%401 null:\`")
CMDS+=("nbdcopy → file: \`ip netns exec NS_B nbdcopy --flush --destination-is-zero nbd://$NBD_A/db%401 B/copy.raw\` (a new sparse file, removed after each run)")
CMDS+=("nbdcopy → forkd clone: on B \`forkd source create sink --size ${SIZE_MIB}M; forkd clone sink sinkc\`, then \`ip netns exec NS_B nbdcopy --flush --destination-is-zero nbd://$NBD_A/db%401 nbd://$NBD_B/sinkc\`, then both deleted")
CMDS+=("daemons: \`ip netns exec NS forkd serve --data-dir S/data --api ADDR:$API_PORT --nbd (A: $NBD_A, B: $NBD_B) --iscsi 127.0.0.1:$ISCSI_PORT --token-file S/token --hooks-dir S/hooks --low-space-threshold 0\`")
CMDS+=("link bytes: \`ip -n NS_A -s -j link show dev VETH_A\` → \`.stats64.tx.bytes\` before and after")
{
    echo "# forkd replication between two sites, against nbdcopy over the same link: one run"
    echo
    echo "Generated by \`bench/replication-bench.sh$( ((QUICK)) && echo ' --quick')\` on $START_DATE, in ${T_TOTAL} s. See bench/REPLICATION.md."
    echo
    echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, kernel $(uname -r); scratch on $(df -T "$SCRATCH" | awk 'NR == 2 { print $1 " (" $2 ")" }')"
    echo "- forkd: $("$FORKD" --version) (binary built $(date -u -r "$FORKD" '+%Y-%m-%d %H:%M UTC'); tree at git $GIT_REV at the start, sources outside bench/ last changed in $SRC_REV); $(nbdcopy --version | sed -n 1p)"
    echo "- link: one veth pair between namespaces $NS_A ($ADDR_A) and $NS_B ($ADDR_B), MTU $(ip -n "$NS_A" -j link show dev "$VETH_A" | jq -r '.[0].mtu'), no rate limit except in the wan part (tc tbf on A's end)"
    echo "- parameters: SIZE_MIB=$SIZE_MIB, FILL_PCT=$FILL_PCT, CHUNK_KIB=$CHUNK_KIB, RUNS=$RUNS, WAN_MBIT=$WAN_MBIT, CLONE_MIB=$CLONE_MIB, SEED=$SEED"
    echo "- uptime before: \`${UPTIME_START# *}\`"
    echo "- uptime after: \`${UPTIME_END# *}\`"
    echo
    echo "Times are wall clock (CLI or nbdcopy process, start to exit), medians of $RUNS interleaved"
    echo "rounds in the full part, one run elsewhere. MiB/s = the volume's $SIZE_MIB MiB over the time."
    echo "Link bytes: what A's end of the veth pair sent (headers included). ratio: the peer's time /"
    echo "forkd's (above 1: forkd is faster), or forkd's link bytes / the changed bytes, or B / A."
    echo
    echo "| part | what | forkd | peer | ratio | goal | result |"
    echo "|---|---|---:|---:|---:|---|---|"
    for r in "${ROWS[@]}"; do echo "| ${r//|/ | } |"; done
    echo
    echo "## Details"
    echo
    for n in "${NOTES[@]}"; do echo "- $n"; done
    echo
    echo "## Commands"
    echo
    for c in "${CMDS[@]}"; do echo "- $c"; done
    echo
    echo "| part | wall s |"
    echo "|---|---:|"
    for p in setup full wan incremental space checks; do
        [[ -n ${PART_WALL[$p]:-} ]] && echo "| $p | ${PART_WALL[$p]} |"
    done
} | tee "$RESULTS"
log "results written to $RESULTS (disk free at the start: $DF_START)"
