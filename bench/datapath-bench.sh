#!/usr/bin/env bash
# datapath-bench.sh: issue 13's data-path goals, each against its peer, in one run.
#
# Parts (see bench/DATAPATH.md for the method and each row of the table):
#   nbd      fio's nbd engine on forkd's clone g3 (src@1 -> g1@1 -> g2@1 -> g3), on qemu-nbd
#            serving a qcow2 overlay chain of depth 3 over the same raw image, and on nbdkit
#            serving a raw copy: randread 4k qd32, randwrite 4k qd32, read 1M qd8, write 1M qd8
#   iscsi    bench/iscsi-bench.sh (forkd against tgt, qemu-img bench), its four rows folded in
#   ingest   full ingest against cp of the same image; incremental ingest (by digest) after 1 %
#            and after 10 % of the 4 KiB blocks changed
#   clones   randwrite 4k qd8 on four clones at once against one clone alone, and against four
#            qemu-nbd processes each serving its own qcow2 overlay of the same base
#   latency  p99 of randread 4k qd1 on clone A, idle and while clone B is written flat out and a
#            fully written clone C is deleted
#   list     `forkd list` (and GET /v1/volumes) with LIST_CLONES clones, each with data written
# Prints a markdown table and writes it to bench/datapath-results.md.
#
# Usage: bash bench/datapath-bench.sh [--quick] [--only PARTS]
#   --quick             SIZE_MIB=256, RUNTIME=3, LIST_CLONES=50 (smoke run, a few minutes)
#   --only PARTS        comma-separated parts to run (default all), e.g. --only nbd,list
# Environment:
#   DATAPATH_BENCH_SCRATCH  scratch dir, on the disk being measured (default
#                       /work/datapath-bench-scratch); created by the script and removed at exit,
#                       refused if it exists and is not ours
#   SIZE_MIB            size of the image and of every volume in MiB (default 1024)
#   RUNTIME             seconds per fio run, and per tgt run of the iSCSI part (default 15)
#   LIST_CLONES         clones for the list part (default 1000)
#   KEEP_SCRATCH=1      keep the scratch dir (fio JSON, logs); each part's data is still removed
#                       when the part ends, to keep the disk use down
#   RESULTS             output file (default bench/datapath-results.md)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

ALL_PARTS=(nbd iscsi ingest clones latency list)
QUICK=0
ONLY=""
while (($#)); do
    case $1 in
    --quick) QUICK=1 ;;
    --only) [[ $# -ge 2 ]] || { echo "datapath-bench: --only needs a list of parts" >&2; exit 2; }
        ONLY=$2; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    -h | --help) usage; exit 0 ;;
    *) echo "datapath-bench: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRATCH=${DATAPATH_BENCH_SCRATCH:-/work/datapath-bench-scratch}
RESULTS=${RESULTS:-$REPO/bench/datapath-results.md}
if ((QUICK)); then
    SIZE_MIB=${SIZE_MIB:-256}; RUNTIME=${RUNTIME:-3}; LIST_CLONES=${LIST_CLONES:-50}
else
    SIZE_MIB=${SIZE_MIB:-1024}; RUNTIME=${RUNTIME:-15}; LIST_CLONES=${LIST_CLONES:-1000}
fi
MIB=1048576
SIZE_BYTES=$((SIZE_MIB * MIB))
FORKD=$REPO/target/release/forkd
SYS_PY=/usr/bin/python3 # Debian's python: python3-libnbd's `nbd` module lives there

log() { printf '[datapath-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

int_at_least() { # name value min
    if [[ ! $2 =~ ^[0-9]+$ ]] || ((10#$2 < $3)); then die "$1 must be an integer >= $3"; fi
}
int_at_least SIZE_MIB "$SIZE_MIB" 64
int_at_least RUNTIME "$RUNTIME" 2
int_at_least LIST_CLONES "$LIST_CLONES" 1

declare -A RUN=()
if [[ -z $ONLY ]]; then
    for p in "${ALL_PARTS[@]}"; do RUN[$p]=1; done
else
    IFS=, read -r -a picked <<<"$ONLY"
    for p in "${picked[@]}"; do
        [[ " ${ALL_PARTS[*]} " == *" $p "* ]] || die "--only: unknown part '$p' (parts: ${ALL_PARTS[*]})"
        RUN[$p]=1
    done
fi
wants() { [[ -n ${RUN[$1]:-} ]]; }

# ---------------------------------------------------------------- cleanup
declare -A PID=()          # name -> pid of every process still running that this script started
SCRATCH_CREATED=0
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh" # stop_pid, free_ports

cleanup() {
    local rc=$? name
    set +e
    trap - EXIT INT TERM ERR
    for name in "${!PID[@]}"; do stop_pid "${PID[$name]}" "$name"; done
    if ((SCRATCH_CREATED)); then
        if [[ ${KEEP_SCRATCH:-0} == 1 ]]; then log "kept scratch dir $SCRATCH"; else rm -rf -- "$SCRATCH"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# a command that fails outside a `die` (a curl, a jq, an awk) says where before set -e ends the run
set -E
trap 'log "ERROR: line $LINENO: \`$BASH_COMMAND\` failed"' ERR

# spawn NAME LOGFILE CMD...: start a long-lived process in the background, stopped at exit
spawn() {
    local name=$1 logf=$2
    shift 2
    "$@" >"$logf" 2>&1 &
    PID[$name]=$!
}
# halt NAME: stop a process started by spawn
halt() {
    [[ -n ${PID[$1]:-} ]] || return 0
    stop_pid "${PID[$1]}" "$1"
    unset "PID[$1]"
}

# ---------------------------------------------------------------- checks
declare -A PKG=([fio]=fio [qemu-img]=qemu-utils [qemu-nbd]=qemu-utils [nbdkit]=nbdkit
    [nbdinfo]=libnbd-bin [jq]=jq [curl]=curl [python3]=python3 [openssl]=openssl
    [tgtd]=tgt [tgtadm]=tgt)
need=(fio qemu-img nbdinfo jq curl python3 openssl)
if wants nbd || wants clones; then need+=(qemu-nbd); fi
if wants nbd; then need+=(nbdkit); fi
if wants iscsi; then need+=(tgtd tgtadm); fi
missing=()
for tool in "${need[@]}"; do command -v "$tool" >/dev/null || missing+=("${PKG[$tool]}"); done
if wants list && ! "$SYS_PY" -c 'import nbd' 2>/dev/null; then missing+=(python3-libnbd); fi
if ((${#missing[@]})); then
    die "missing: $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')(apt-get install -y them; see /work/shared/TESTING.md)"
fi
[[ $(fio --enghelp 2>/dev/null) == *nbd* ]] || die "this fio has no nbd engine (fio --enghelp); Debian's fio package has it"
if wants iscsi; then
    [[ $(id -u) == 0 ]] || die "the iscsi part runs tgtd, which needs root (or leave it out: --only)"
    [[ -x /usr/bin/time ]] || die "the iscsi part needs /usr/bin/time (apt-get install -y time)"
    [[ $(qemu-img --help) == *iscsi* ]] || die "qemu-img has no iscsi driver: install qemu-block-extra matching qemu-utils (see /work/shared/TESTING.md)"
fi
if [[ ! -x $FORKD ]]; then
    log "building forkd (target/release/forkd is missing)"
    (cd "$REPO" && cargo build --release -p forkd-daemon) || die "cargo build failed"
fi

# The scratch dir is created (and later removed) by this script only: refuse to reuse a
# directory that is not ours, so a typo cannot make the cleanup delete someone's data.
if [[ -e $SCRATCH ]]; then
    [[ -f $SCRATCH/.datapath-bench ]] || die "$SCRATCH exists and is not a datapath-bench scratch dir; remove it or set DATAPATH_BENCH_SCRATCH"
    log "removing the leftover scratch dir $SCRATCH"
    rm -rf -- "$SCRATCH"
fi
mkdir -p -- "$SCRATCH"
SCRATCH_CREATED=1
touch "$SCRATCH/.datapath-bench"
SCRATCH=$(cd "$SCRATCH" && pwd)
# at most, in the nbd and clones parts: the image, forkd's copy and writes, the peers' copies
# and overlays (qcow2 allocates 64 KiB clusters, so four overlays under random 4k writes each
# grow to about the image's size)
want=$((6 * SIZE_BYTES + 1024 * MIB))
avail=$(df -B1 --output=avail "$SCRATCH" | tail -1)
((avail > want)) || die "need about $((want / MIB)) MiB free in $SCRATCH, have $((avail / MIB)) MiB"

# ---------------------------------------------------------------- helpers
now() { echo "$EPOCHREALTIME"; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; } # printf-format awk-expression
load1() { cut -d' ' -f1 /proc/loadavg; }
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
# judge VALUE OP GOAL -> PASS or MISS
judge() {
    awk -v v="$1" -v op="$2" -v g="$3" 'BEGIN {
        ok = (op == ">=") ? v >= g : (op == "<=") ? v <= g : (op == "<") ? v < g : v > g
        print (ok ? "PASS" : "MISS") }'
}
fmt_iops() { calc '%.1fk IOPS' "$1 / 1000"; }
fmt_mibs() { calc '%.0f MiB/s' "$1"; }
fmt_val() { if [[ $2 == 4k ]]; then fmt_iops "$1"; else fmt_mibs "$1"; fi; } # value bs

ROWS=()                    # "part|workload|forkd|peer|ratio|goal|result", in table order
NOTES=()                   # markdown lines for the details section
row() { local IFS='|'; ROWS+=("$*"); }
note() { NOTES+=("$*"); }

# fio JSON readers: file direction(read|write)
fio_iops() { jq -r --arg d "$2" '.jobs[0][$d].iops' "$1"; }
fio_mibs() { jq -r --arg d "$2" '.jobs[0][$d].bw_bytes / 1048576' "$1"; }
fio_p99() { jq -r --arg d "$2" '.jobs[0][$d].clat_ns.percentile["99.000000"] / 1000' "$1"; } # µs
fio_p50() { jq -r --arg d "$2" '.jobs[0][$d].clat_ns.percentile["50.000000"] / 1000' "$1"; } # µs
dir_of() { if [[ $1 == *write* ]]; then echo write; else echo read; fi; }
fio_val() { # file rw bs: IOPS for 4k, MiB/s otherwise
    if [[ $3 == 4k ]]; then fio_iops "$1" "$(dir_of "$2")"; else fio_mibs "$1" "$(dir_of "$2")"; fi
}
# fio_nbd OUT RW BS QD URI...: one fio for RUNTIME s, one job per URI (the jobs run at once and
# group_reporting sums them), JSON into OUT
fio_nbd() {
    local out=$1 rw=$2 bs=$3 qd=$4 i=0 jobs=() uri
    shift 4
    for uri in "$@"; do jobs+=(--name="j$i" --uri="$uri"); i=$((i + 1)); done
    fio --ioengine=nbd --rw="$rw" --bs="$bs" --iodepth="$qd" --size="${SIZE_MIB}M" \
        --runtime="$RUNTIME" --time_based --group_reporting --output-format=json \
        --output="$out" "${jobs[@]}" >/dev/null 2>"$out.err" \
        || die "fio $rw $bs qd$qd on ${jobs[*]} failed: $(tail -3 "$out.err")"
}

# serve_nbd NAME LOG EXPORT CMD...: start an NBD server on a free port, CMD saying @PORT@ where
# the port goes, and wait for its export to answer; sets SERVED_URI.  Another process can take a
# free port before the server binds it (a first run here met that), so a server that exits
# saying its address is in use is tried again on another port.
SERVED_URI=""
serve_nbd() {
    local name=$1 logf=$2 export=$3 port try i
    shift 3
    for ((try = 1; try <= 5; try++)); do
        read -r port < <(free_ports 1)
        spawn "$name" "$logf" "${@//@PORT@/$port}"
        SERVED_URI=nbd://127.0.0.1:$port/$export
        for ((i = 0; i < 300; i++)); do
            nbdinfo --size "$SERVED_URI" >/dev/null 2>&1 && return 0
            kill -0 "${PID[$name]}" 2>/dev/null || break
            sleep 0.1
        done
        ((i < 300)) || die "$name did not serve $SERVED_URI within 30 s"
        halt "$name"
        grep -qi 'in use' "$logf" || die "$name exited during start-up: $(tail -3 "$logf")"
        log "$name: port $port was taken before it could bind it; trying another"
    done
    die "$name found no free port in 5 tries"
}
wait_nbd() { # name uri: wait up to 30 s for the export to answer a handshake
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "${PID[$1]}" 2>/dev/null || die "$1 exited during start-up (see its log in $SCRATCH)"
        nbdinfo --size "$2" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$1 did not serve $2 within 30 s"
}
same_data() { # what uri file: stop unless the export holds the file's data
    qemu-img compare -q -f raw -F raw "$2" "$3" >&2 || die "$1 ($2) differs from $3: not measuring"
}

# ---------------------------------------------------------------- forkd
API=""
NBD_PORT=""
fk() { "$FORKD" --api "$API" "$@"; }
nbd_uri() { echo "nbd://127.0.0.1:$NBD_PORT/$1"; }
start_forkd() { # dir: a fresh `forkd serve` keeping its data in dir/forkd; sets API, NBD_PORT
    local dir=$1 api_port iscsi_port i
    read -r api_port NBD_PORT iscsi_port < <(free_ports 3)
    API=http://127.0.0.1:$api_port
    # --low-space-threshold 0: a disk merely full of other things must not refuse the clones
    spawn forkd "$dir/forkd.log" "$FORKD" serve --data-dir "$dir/forkd" --api "127.0.0.1:$api_port" \
        --nbd "127.0.0.1:$NBD_PORT" --iscsi "127.0.0.1:$iscsi_port" --low-space-threshold 0
    for ((i = 0; i < 300; i++)); do
        kill -0 "${PID[forkd]}" 2>/dev/null || die "forkd serve exited during start-up: $(tail -5 "$dir/forkd.log")"
        curl -sf "$API/v1/volumes" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "forkd's API did not come up on $API within 30 s"
}
make_src() { # logfile: source `src` holding the image, as src@1
    fk source create src --size "${SIZE_MIB}M" >>"$1"
    fk ingest src --from "$IMAGE" >>"$1"
}

# ---------------------------------------------------------------- part timing
declare -A PART_WALL=() PART_LOAD=()
PART_T0=""
PART_L0=""
part_begin() { # part
    log "---- part $1"
    mkdir -p "$SCRATCH/$1"
    PART_T0=$(now)
    PART_L0=$(load1)
}
part_end() { # part: stop what it left running, drop its data, keep its logs
    local dir=$SCRATCH/$1 name
    for name in "${!PID[@]}"; do halt "$name"; done
    PART_WALL[$1]=$(calc '%.0f' "$(now) - $PART_T0")
    PART_LOAD[$1]="$PART_L0 -> $(load1)"
    rm -rf -- "$dir/forkd"
    find "$dir" -maxdepth 1 -type f \( -name '*.raw' -o -name '*.qcow2' \) -delete
}

# ================================================================ parts

part_nbd() {
    local dir=$SCRATCH/nbd s w name rw bs qd out
    part_begin nbd
    start_forkd "$dir"
    log "building src@1 -> g1@1 -> g2@1 -> g3 in forkd"
    make_src "$dir/cli.log"
    { fk clone src@1 g1; fk snapshot g1; fk clone g1@1 g2; fk snapshot g2; fk clone g2@1 g3; } >>"$dir/cli.log"
    log "qcow2 chain $IMAGE <- o1 <- o2 <- o3; raw copy for nbdkit"
    qemu-img create -q -f qcow2 -b "$IMAGE" -F raw "$dir/o1.qcow2"
    qemu-img create -q -f qcow2 -b "$dir/o1.qcow2" -F qcow2 "$dir/o2.qcow2"
    qemu-img create -q -f qcow2 -b "$dir/o2.qcow2" -F qcow2 "$dir/o3.qcow2"
    cp -- "$IMAGE" "$dir/nbdkit.raw"
    local -A uri=([forkd]=$(nbd_uri g3))
    wait_nbd forkd "${uri[forkd]}"
    serve_nbd qemu-nbd "$dir/qemu-nbd.log" disk qemu-nbd -f qcow2 -x disk -p @PORT@ -b 127.0.0.1 -t \
        --cache=writeback --aio=io_uring "$dir/o3.qcow2"
    uri[qemu-nbd]=$SERVED_URI
    serve_nbd nbdkit "$dir/nbdkit.log" disk nbdkit -f -p @PORT@ -i 127.0.0.1 --exportname=disk file "$dir/nbdkit.raw"
    uri[nbdkit]=$SERVED_URI
    for s in forkd qemu-nbd nbdkit; do
        log "checking that $s serves the image (qemu-img compare)"
        same_data "$s" "${uri[$s]}" "$IMAGE"
    done

    # servers interleaved per workload, in the same order (forkd, qemu-nbd, nbdkit), reads
    # before writes, as nbd-bench.sh does: each write workload finds the state the earlier
    # ones left on every server alike (no fresh copy per run)
    local -A val=() p99=()
    for w in "randread-4k-qd32 randread 4k 32" "randwrite-4k-qd32 randwrite 4k 32" \
        "read-1M-qd8 read 1M 8" "write-1M-qd8 write 1M 8"; do
        read -r name rw bs qd <<<"$w"
        for s in forkd qemu-nbd nbdkit; do
            out=$dir/fio.$name.$s.json
            fio_nbd "$out" "$rw" "$bs" "$qd" "${uri[$s]}"
            kill -0 "${PID[$s]}" 2>/dev/null || die "$s died during $name"
            val[$s]=$(fio_val "$out" "$rw" "$bs")
            p99[$s]=$(fio_p99 "$out" "$(dir_of "$rw")")
            log "nbd $name $s: $(fmt_val "${val[$s]}" "$bs"), p99 $(calc '%.0f' "${p99[$s]}") µs"
        done
        local rq rk
        rq=$(calc '%.2f' "${val[forkd]} / ${val[qemu-nbd]}")
        rk=$(calc '%.2f' "${val[forkd]} / ${val[nbdkit]}")
        row "NBD" "$name" "$(fmt_val "${val[forkd]}" "$bs")" "qemu-nbd qcow2 chain: $(fmt_val "${val[qemu-nbd]}" "$bs")" \
            "${rq}x" ">= 1.5x" "$(judge "$rq" '>=' 1.5)"
        row "NBD" "$name" "$(fmt_val "${val[forkd]}" "$bs")" "nbdkit raw: $(fmt_val "${val[nbdkit]}" "$bs")" \
            "${rk}x" ">= 0.9x" "$(judge "$rk" '>=' 0.9)"
        note "NBD $name p99 completion latency (µs): forkd $(calc '%.0f' "${p99[forkd]}"), qemu-nbd qcow2 $(calc '%.0f' "${p99[qemu-nbd]}"), nbdkit $(calc '%.0f' "${p99[nbdkit]}")"
    done
    part_end nbd
}

part_iscsi() {
    local dir=$SCRATCH/iscsi res line name req fs ts fv tv r bs args=()
    part_begin iscsi
    if ((QUICK)); then args+=(--quick); fi
    res=$dir/iscsi-results.md
    log "running bench/iscsi-bench.sh (its log follows)"
    # its own scratch dir inside ours (it creates, marks and removes it, KEEP_SCRATCH or not:
    # its data goes like every part's); RUNTIME is the time tgt's run of each workload should
    # take; FORKD_LOW_SPACE_THRESHOLD=0 reaches its forkd serve as --low-space-threshold 0 ours
    FORKD_BIN=$FORKD ISCSI_BENCH_SCRATCH=$dir/scratch RESULTS=$res SIZE_MIB=$SIZE_MIB \
        TARGET_SECS=$RUNTIME FORKD_LOW_SPACE_THRESHOLD=0 KEEP_SCRATCH=0 \
        bash "$REPO/bench/iscsi-bench.sh" "${args[@]}" >"$dir/iscsi-bench.out" &
    PID[iscsi-bench]=$!
    if ! wait "${PID[iscsi-bench]}"; then unset 'PID[iscsi-bench]'; die "bench/iscsi-bench.sh failed"; fi
    unset 'PID[iscsi-bench]'
    # its table: | workload | requests | forkd time s | forkd | tgt time s | tgt | ratio | verdict |
    for name in read-4k-qd32 write-4k-qd32 read-1M-qd8 write-1M-qd8; do
        line=$(grep -m1 "^| $name |" "$res") || die "no row $name in $res"
        IFS='|' read -r _ _ req fs _ ts _ _ <<<"$line"
        fv=$(calc '%.1f' "$req / $fs")
        tv=$(calc '%.1f' "$req / $ts")
        r=$(calc '%.2f' "$fv / $tv")
        bs=${name#*-}; bs=${bs%%-*}
        row "iSCSI" "$name" "$(fmt_val "$fv" "$bs")" "tgt: $(fmt_val "$tv" "$bs")" "${r}x" ">= 1.2x" "$(judge "$r" '>=' 1.2)"
    done
    note "iSCSI (bench/iscsi-bench.sh, qemu-img bench over libiscsi; its report is iscsi-results.md in the scratch dir): $(grep -m1 '^- requests per run' "$res" | sed 's/^- //') $(sed -n '/^- requests per run/{n;p;n;p}' "$res" | sed 's/^ *//' | paste -sd ' ')"
    note "iSCSI, $(grep -m1 '^- after the runs' "$res" | sed 's/^- //')"
    cp -- "$res" "$SCRATCH/iscsi-results.md"
    part_end iscsi
}

# change_blocks FILE PCT SEED: overwrite PCT % of its 4 KiB blocks (distinct, drawn at random,
# seeded) with random data, in place; prints how many
change_blocks() {
    python3 - "$@" <<'PY'
import os, random, sys
path, pct, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
blocks = os.path.getsize(path) // 4096
picked = sorted(random.Random(seed).sample(range(blocks), round(blocks * pct / 100)))
fd = os.open(path, os.O_WRONLY)
try:
    for b in picked:
        os.pwrite(fd, os.urandom(4096), b * 4096)   # all-zero: odds of 2^-32768
finally:
    os.close(fd)
print(len(picked))
PY
}
cp_timed() { # from to: seconds one cp takes (after a sync, so no earlier writeback lands in it)
    local t0 t1
    sync
    t0=$(now); cp -- "$1" "$2"; t1=$(now)
    rm -f -- "$2"
    calc '%.3f' "$t1 - $t0"
}
ingest_stats() { # the latest snapshot of `ing`: "changed_bytes sent_bytes duration_ms"
    curl -sf "$API/v1/volumes/ing?space=false" \
        | jq -r '.snapshots[-1].ingest | "\(.changed_bytes) \(.sent_bytes) \(.duration_ms)"'
}

part_ingest() {
    local dir=$SCRATCH/ingest img t0 t1 k best=""
    part_begin ingest
    img=$dir/ingest.raw
    cp -- "$IMAGE" "$img" # the increments change it: a private copy
    local -A wall=()
    for k in cp1 cp2; do wall[$k]=$(cp_timed "$img" "$dir/copy.raw"); log "ingest: $k ${wall[$k]} s"; done
    start_forkd "$dir"
    fk source create ing --size "${SIZE_MIB}M" >>"$dir/cli.log"
    sync
    t0=$(now); fk ingest ing --from "$img" >>"$dir/cli.log"; t1=$(now)
    wall[full]=$(calc '%.3f' "$t1 - $t0")
    log "ingest: full ${wall[full]} s"
    # once more after the ingest, so that a calmer or busier moment favours neither
    wall[cp3]=$(cp_timed "$img" "$dir/copy.raw")
    log "ingest: cp3 ${wall[cp3]} s"
    for k in cp1 cp2 cp3; do
        if [[ -z $best ]] || (($(awk -v a="${wall[$k]}" -v b="$best" 'BEGIN { print (a < b) }'))); then best=${wall[$k]}; fi
    done
    local r
    r=$(calc '%.2f' "${wall[full]} / $best")
    row "ingest" "full, ${SIZE_MIB} MiB" "${wall[full]} s ($(calc '%.0f' "$SIZE_MIB / ${wall[full]}") MiB/s)" \
        "cp (best of 3): $best s ($(calc '%.0f' "$SIZE_MIB / $best") MiB/s)" "${r}x time" "<= 1.25x time" "$(judge "$r" '<=' 1.25)"
    note "ingest: cp runs ${wall[cp1]} s, ${wall[cp2]} s (before the ingest), ${wall[cp3]} s (after), no sync; forkd's ingest ends with its durable flush; full ingest daemon stats (changed, sent bytes, duration_ms): $(ingest_stats)"

    local pct n
    for pct in 1 10; do
        n=$(change_blocks "$img" "$pct" "$pct") # the percentage is the seed
        sync
        t0=$(now); fk ingest ing --from "$img" >>"$dir/cli.log"; t1=$(now)
        wall[inc$pct]=$(calc '%.3f' "$t1 - $t0")
        log "ingest: $pct % ($n blocks) changed: ${wall[inc$pct]} s"
        note "ingest: $pct % changed = $n blocks of 4 KiB, by digest (no --changed-blocks): ${wall[inc$pct]} s; daemon stats (changed, sent bytes, duration_ms): $(ingest_stats)"
    done
    r=$(calc '%.2f' "${wall[inc10]} / ${wall[inc1]}")
    row "ingest" "incremental 10 % vs 1 % changed" "t(10 %) ${wall[inc10]} s, t(1 %) ${wall[inc1]} s" "—" \
        "${r}x" ">= 7x" "$(judge "$r" '>=' 7)"
    part_end ingest
}

part_clones() {
    local dir=$SCRATCH/clones c i one four q1 q4 uris=() r
    part_begin clones
    start_forkd "$dir"
    make_src "$dir/cli.log"
    for c in solo w1 w2 w3 w4; do fk clone src@1 "$c" >>"$dir/cli.log"; done
    wait_nbd forkd "$(nbd_uri solo)"
    log "clones: forkd, one clone alone"
    fio_nbd "$dir/fio.forkd-one.json" randwrite 4k 8 "$(nbd_uri solo)"
    one=$(fio_iops "$dir/fio.forkd-one.json" write)
    log "clones: forkd, four clones at once"
    for i in 1 2 3 4; do uris+=("$(nbd_uri "w$i")"); done
    fio_nbd "$dir/fio.forkd-four.json" randwrite 4k 8 "${uris[@]}"
    four=$(fio_iops "$dir/fio.forkd-four.json" write)
    # forkd's data goes before the peers' overlays grow, to keep the disk use down
    halt forkd
    rm -rf -- "$dir/forkd"

    log "clones: qemu-nbd, one qcow2 overlay alone, then four qemu-nbd at once"
    qemu-img create -q -f qcow2 -b "$IMAGE" -F raw "$dir/qsolo.qcow2"
    serve_nbd qemu-solo "$dir/qemu-solo.log" disk qemu-nbd -f qcow2 -x disk -p @PORT@ -b 127.0.0.1 -t \
        --cache=writeback --aio=io_uring "$dir/qsolo.qcow2"
    fio_nbd "$dir/fio.qemu-one.json" randwrite 4k 8 "$SERVED_URI"
    q1=$(fio_iops "$dir/fio.qemu-one.json" write)
    halt qemu-solo
    rm -f -- "$dir/qsolo.qcow2"
    uris=()
    for i in 1 2 3 4; do
        qemu-img create -q -f qcow2 -b "$IMAGE" -F raw "$dir/q$i.qcow2"
        serve_nbd "qemu-nbd-$i" "$dir/qemu-nbd-$i.log" disk qemu-nbd -f qcow2 -x disk -p @PORT@ \
            -b 127.0.0.1 -t --cache=writeback --aio=io_uring "$dir/q$i.qcow2"
        uris+=("$SERVED_URI")
    done
    fio_nbd "$dir/fio.qemu-four.json" randwrite 4k 8 "${uris[@]}"
    q4=$(fio_iops "$dir/fio.qemu-four.json" write)
    log "clones: forkd one $(fmt_iops "$one"), four $(fmt_iops "$four"); qemu-nbd one $(fmt_iops "$q1"), four $(fmt_iops "$q4")"

    r=$(calc '%.2f' "$four / $one")
    row "clones" "randwrite-4k-qd8 on 4 clones at once (total)" "$(fmt_iops "$four")" "forkd, 1 clone alone: $(fmt_iops "$one")" \
        "${r}x" ">= 1.6x" "$(judge "$r" '>=' 1.6)"
    r=$(calc '%.2f' "$four / $q4")
    row "clones" "randwrite-4k-qd8 on 4 clones at once (total)" "$(fmt_iops "$four")" "4 qemu-nbd, own qcow2 overlay each: $(fmt_iops "$q4")" \
        "${r}x" ">= 1.0x" "$(judge "$r" '>=' 1.0)"
    note "clones: qemu-nbd with one overlay alone: $(fmt_iops "$q1") (four at once / one: $(calc '%.2f' "$q4 / $q1")x)"
    part_end clones
}

part_latency() {
    local dir=$SCRATCH/latency c idle loaded p50i p50l r t_read dstart dend dres bmibs owned
    part_begin latency
    start_forkd "$dir"
    make_src "$dir/cli.log"
    for c in A B C; do fk clone src@1 "$c" >>"$dir/cli.log"; done
    wait_nbd forkd "$(nbd_uri C)"
    log "latency: writing all of clone C (${SIZE_MIB} MiB of fresh random data) so that it owns its blocks"
    fio --name=fill --ioengine=nbd --uri="$(nbd_uri C)" --rw=write --bs=1M --iodepth=8 \
        --size="${SIZE_MIB}M" --refill_buffers --end_fsync=1 --output-format=json \
        --output="$dir/fio.fill-C.json" >/dev/null 2>"$dir/fio.fill-C.err" \
        || die "filling clone C failed: $(tail -3 "$dir/fio.fill-C.err")"
    owned=$(curl -sf "$API/v1/volumes/C" | jq -r '.unique_bytes')
    [[ $owned =~ ^[0-9]+$ ]] || die "GET /v1/volumes/C: unique_bytes is '$owned'"
    log "latency: C holds $((owned / MIB)) MiB alone"

    log "latency: randread 4k qd1 on A, idle"
    fio_nbd "$dir/fio.idle.json" randread 4k 1 "$(nbd_uri A)"
    idle=$(fio_p99 "$dir/fio.idle.json" read)
    p50i=$(fio_p50 "$dir/fio.idle.json" read)

    log "latency: randread 4k qd1 on A, while B is written (write 1M qd8) and C is deleted"
    # B's writer runs a second longer than the reader on each side, so it covers the whole read
    fio --name=writer --ioengine=nbd --uri="$(nbd_uri B)" --rw=write --bs=1M --iodepth=8 \
        --size="${SIZE_MIB}M" --runtime="$((RUNTIME + 2))" --time_based --output-format=json \
        --output="$dir/fio.writer-B.json" >/dev/null 2>"$dir/fio.writer-B.err" &
    PID[fio-writer]=$!
    sleep 1
    t_read=$(now)
    (
        sleep 1
        s=$(now)
        if fk delete C >"$dir/delete.out" 2>&1; then res=ok; else res=failed; fi
        echo "$s $(now) $res" >"$dir/delete.time"
    ) &
    PID[delete]=$!
    fio_nbd "$dir/fio.loaded.json" randread 4k 1 "$(nbd_uri A)"
    wait "${PID[fio-writer]}" || die "the writer on B failed: $(tail -3 "$dir/fio.writer-B.err")"
    unset 'PID[fio-writer]'
    log "latency: waiting for the delete of C to end"
    wait "${PID[delete]}" || true
    unset 'PID[delete]'
    read -r dstart dend dres <"$dir/delete.time"
    [[ $dres == ok ]] || die "forkd delete C failed: $(cat "$dir/delete.out")"
    loaded=$(fio_p99 "$dir/fio.loaded.json" read)
    p50l=$(fio_p50 "$dir/fio.loaded.json" read)
    bmibs=$(fio_mibs "$dir/fio.writer-B.json" write)

    r=$(calc '%.2f' "$loaded / $idle")
    row "latency" "randread-4k-qd1 p99 on clone A, loaded vs idle" "loaded $(calc '%.0f' "$loaded") µs" \
        "idle $(calc '%.0f' "$idle") µs" "${r}x" "<= 2x" "$(judge "$r" '<=' 2)"
    row "latency" "\`forkd delete C\` during that run" "$(calc '%.2f' "$dend - $dstart") s" "—" "—" "—" "info"
    note "latency: C held $((owned / MIB)) MiB alone before the delete; the delete started $(calc '%.1f' "$dstart - $t_read") s after the reader and ended $(calc '%.1f' "$dend - $t_read") s after it (the reader ran ${RUNTIME} s); B was written at $(fmt_mibs "$bmibs") meanwhile; A's p50: idle $(calc '%.0f' "$p50i") µs, loaded $(calc '%.0f' "$p50l") µs; A's IOPS: idle $(fmt_iops "$(fio_iops "$dir/fio.idle.json" read)"), loaded $(fmt_iops "$(fio_iops "$dir/fio.loaded.json" read)")"
    part_end latency
}

# clones_with_data API NBD_PORT N SIZE: N clones of src@1 through POST /v1/clones (8 at a
# time), then 4 KiB of random data written and flushed into each over NBD (libnbd, 4 at a
# time); prints "seconds-to-create seconds-to-write"
clones_with_data() {
    (cd "$SCRATCH" && "$SYS_PY" - "$@") <<'PY'
import json, os, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
import nbd
api, port, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
names = [f"l{i:05d}" for i in range(n)]
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def clone(name):
    req = urllib.request.Request(api + "/v1/clones", method="POST",
                                 data=json.dumps({"from": "src@1", "name": name}).encode(),
                                 headers={"Content-Type": "application/json"})
    with http.open(req, timeout=120) as r:
        r.read()
blocks = size // 4096
def write(i):
    h = nbd.NBD()
    h.connect_uri(f"nbd://127.0.0.1:{port}/{names[i]}")
    h.pwrite(os.urandom(4096), (i * 7919 % blocks) * 4096)
    h.flush()
    h.shutdown()
t0 = time.monotonic()
with ThreadPoolExecutor(8) as ex:
    list(ex.map(clone, names))
t1 = time.monotonic()
with ThreadPoolExecutor(4) as ex:
    list(ex.map(write, range(n)))
t2 = time.monotonic()
print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
PY
}

part_list() {
    local dir=$SCRATCH/list tc tw count k t0 t1 lists=() curls=() lm cm
    part_begin list
    start_forkd "$dir"
    make_src "$dir/cli.log"
    log "list: $LIST_CLONES clones of src@1, 4 KiB written into each"
    read -r tc tw < <(clones_with_data "$API" "$NBD_PORT" "$LIST_CLONES" "$SIZE_BYTES") \
        || die "creating or writing the clones failed"
    [[ -n ${tw:-} ]] || die "creating or writing the clones failed"
    count=$(curl -sf "$API/v1/volumes" | jq '.volumes | length')
    ((count == LIST_CLONES + 1)) || die "GET /v1/volumes lists $count volumes, expected $((LIST_CLONES + 1))"
    log "list: created in $tc s, written in $tw s; timing forkd list and GET /v1/volumes, 5 runs each"
    for ((k = 0; k < 5; k++)); do
        t0=$(now); fk list >"$dir/list.out"; t1=$(now)
        lists+=("$(calc '%.3f' "1000 * ($t1 - $t0)")")
        curls+=("$(curl -sf -o /dev/null -w '%{time_total}' "$API/v1/volumes" | awk '{ printf "%.3f", 1000 * $1 }')")
    done
    lm=$(printf '%s\n' "${lists[@]}" | median)
    cm=$(printf '%s\n' "${curls[@]}" | median)
    row "list" "\`forkd list\` with $LIST_CLONES clones (wall, median of 5)" "$(calc '%.1f' "$lm") ms" "—" "—" "< 100 ms" "$(judge "$lm" '<' 100)"
    row "list" "\`curl /v1/volumes\` alone (median of 5)" "$(calc '%.1f' "$cm") ms" "—" "—" "—" "info"
    note "list: $count volumes listed; runs of forkd list (ms): ${lists[*]}; of curl (ms): ${curls[*]}; $LIST_CLONES clones created through POST /v1/clones (8 at a time) in $tc s, 4 KiB written and flushed into each over NBD (4 at a time) in $tw s; $(wc -l <"$dir/list.out") lines of output"
    part_end list
}

# ================================================================ run
IMAGE=$SCRATCH/image.raw
# the tree as the run starts (at the end, the results file being written would count as a change)
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')
if [[ -n $(git -C "$REPO" status --porcelain 2>/dev/null) ]]; then GIT_REV+=", dirty tree"; fi
START_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
UPTIME_START=$(uptime)
T_START=$SECONDS
if wants nbd || wants ingest || wants clones || wants latency || wants list; then
    log "writing ${SIZE_MIB} MiB of random data to $IMAGE"
    openssl rand -out "$IMAGE" "$SIZE_BYTES" 2>/dev/null || head -c "$SIZE_BYTES" /dev/urandom >"$IMAGE"
    [[ $(stat -c %s "$IMAGE") == "$SIZE_BYTES" ]] || die "$IMAGE has the wrong size"
fi
for p in "${ALL_PARTS[@]}"; do
    if wants "$p"; then "part_$p"; fi
done
UPTIME_END=$(uptime)
T_TOTAL=$((SECONDS - T_START))

# ================================================================ report
{
    echo "# forkd data path (issue 13): goals against peers, one run"
    echo
    echo "Generated by \`bench/datapath-bench.sh$( ((QUICK)) && echo ' --quick')$([[ -n $ONLY ]] && echo " --only $ONLY")\` on $START_DATE, in ${T_TOTAL} s. See bench/DATAPATH.md."
    echo
    echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, kernel $(uname -r); scratch on $(df -T "$SCRATCH" | awk 'NR == 2 { print $1 " (" $2 ")" }')"
    echo "- forkd: $("$FORKD" --version) (binary built $(date -u -r "$FORKD" '+%Y-%m-%d %H:%M UTC'); tree at git $GIT_REV at the start)"
    echo "- $(qemu-nbd --version | head -1); nbdkit $(nbdkit --version | awk '{ print $2 }'); $(fio --version); libnbd $(nbdinfo --version 2>/dev/null | awk 'NR == 1 { print $2 }')$(wants iscsi && echo "; tgt $(tgtd --version 2>&1 | head -1)")"
    echo "- parameters: SIZE_MIB=$SIZE_MIB (image and volumes), RUNTIME=$RUNTIME s per fio run, LIST_CLONES=$LIST_CLONES; parts: $(for p in "${ALL_PARTS[@]}"; do wants "$p" && printf '%s ' "$p"; done)"
    echo "- uptime before: \`${UPTIME_START# *}\`"
    echo "- uptime after: \`${UPTIME_END# *}\`"
    echo
    echo "4k workloads in IOPS, 1M workloads in MiB/s. ratio = forkd / peer, except where it says"
    echo "time (forkd's time / the peer's) and for latency (loaded / idle)."
    echo
    echo "| part | workload | forkd | peer | ratio | goal | result |"
    echo "|---|---|---:|---:|---:|---|---|"
    for r in "${ROWS[@]}"; do echo "| ${r//|/ | } |"; done
    echo
    pass=0; miss=0
    for r in "${ROWS[@]}"; do
        case ${r##*|} in PASS) pass=$((pass + 1)) ;; MISS) miss=$((miss + 1)) ;; esac
    done
    echo "$pass goals met, $miss missed."
    echo
    echo "## Details"
    echo
    for n in "${NOTES[@]}"; do echo "- $n"; done
    echo
    echo "| part | wall s | load1 before -> after |"
    echo "|---|---:|---|"
    for p in "${ALL_PARTS[@]}"; do
        if wants "$p"; then echo "| $p | ${PART_WALL[$p]} | ${PART_LOAD[$p]} |"; fi
    done
    echo
    echo "The space and read-depth goals of bench/README.md still apply; they are measured by"
    echo "\`cargo run --release -p forkd-bench -- space read\` (bench/README.md), not here."
} | tee "$RESULTS"
log "results written to $RESULTS"
