#!/usr/bin/env bash
# iscsi-bench.sh: forkd's iSCSI target against tgt (tgtd), side by side, in one run.
#
# Starts forkd (serving a clone three generations deep over iSCSI) and tgtd (serving a plain
# raw file holding the same data) on loopback, checks that both serve the file's data, then
# runs `qemu-img bench` (qemu's libiscsi driver, iscsi://) against each in turn, workload by
# workload: 4k reads qd32, 4k writes qd32, 1M reads qd8, 1M writes qd8.  Every run does a
# fixed number of requests, the same for both servers, calibrated on tgt so that its run takes
# about TARGET_SECS.  Prints a markdown table and writes it to bench/iscsi-results.md.
# See bench/ISCSI.md.
#
# Usage: bash bench/iscsi-bench.sh [--quick]
#   --quick             TARGET_SECS=3 and a 256 MiB file (smoke run)
# Environment:
#   ISCSI_BENCH_SCRATCH scratch dir, on the same disk as the repo (default
#                       /work/iscsi-bench-scratch); created by the script and removed at exit
#   SIZE_MIB            size of the test file in MiB (default 1024, 256 with --quick)
#   TARGET_SECS         seconds tgt's run of each workload should take; sets the request count
#                       (default 12, 3 with --quick)
#   COUNTS              "N1 N2 N3 N4": fixed request counts for the four workloads, in order;
#                       skips the calibration (use it to repeat a run with the same work)
#   STRIDE_BLOCKS       4k workloads: each request is this many 4k blocks past the previous one,
#                       modulo the disk (default 100003, a prime: every block once per pass,
#                       successive requests ~390 MiB apart); 1 makes them sequential
#   KEEP_SCRATCH=1      keep the scratch dir (qemu-img output, forkd and tgtd logs)
#   PERF=1              also `perf record` forkd during its runs and append its top symbols to
#                       the results (perturbs forkd's figures a little)
#   RESULTS             output file (default bench/iscsi-results.md)
#   FORKD_BIN           forkd binary to run as it is (default target/release/forkd, built when it
#                       is missing or older than a source file); bench/datapath-bench.sh sets it
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "iscsi-bench: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRATCH=${ISCSI_BENCH_SCRATCH:-/work/iscsi-bench-scratch}
RESULTS=${RESULTS:-$REPO/bench/iscsi-results.md}
if [[ $QUICK == 1 ]]; then
    TARGET_SECS=${TARGET_SECS:-3}
    SIZE_MIB=${SIZE_MIB:-256}
else
    TARGET_SECS=${TARGET_SECS:-12}
    SIZE_MIB=${SIZE_MIB:-1024}
fi
STRIDE_BLOCKS=${STRIDE_BLOCKS:-100003}
SIZE_BYTES=$((SIZE_MIB * 1024 * 1024))
FORKD=${FORKD_BIN:-$REPO/target/release/forkd}
SERVERS=(forkd tgt)
TGT_IQN=iqn.2026-11.dev.forkd.bench:tgt-disk

log() { printf '[iscsi-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $SIZE_MIB =~ ^[0-9]+$ && $SIZE_MIB -ge 16 ]] || die "SIZE_MIB must be an integer >= 16"
[[ $STRIDE_BLOCKS =~ ^[0-9]+$ && $STRIDE_BLOCKS -ge 1 ]] || die "STRIDE_BLOCKS must be a positive integer"
[[ $TARGET_SECS =~ ^[0-9]+([.][0-9]+)?$ ]] || die "TARGET_SECS must be a number"

# ---------------------------------------------------------------- cleanup
declare -A PID=()          # server name -> pid (every long-lived process this script starts)
PERF_PID=""
SCRATCH_CREATED=0
TGT_CTL=""                 # tgtd's control port (its management socket is /run/tgtd/socket.N)
TGT_SOCKET_OURS=0          # 1 once our tgtd is known to own that socket

source "$REPO/bench/lib.sh" # free_ports (its stop_pid is replaced by the one below, which takes a signal)
stop_pid() { # name pid [signal]: signal (default SIGTERM), wait up to 10 s, then SIGKILL
    local name=$1 pid=$2 sig=${3:-TERM} i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    log "$name (pid $pid) did not stop on SIG$sig; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

stop_tgtd() { # tgtd ignores SIGTERM: delete the target, then the system (makes it exit)
    local pid=$1 i
    if kill -0 "$pid" 2>/dev/null; then
        tgtadm -C "$TGT_CTL" --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1
        tgtadm -C "$TGT_CTL" --op delete --mode system >/dev/null 2>&1
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    stop_pid tgtd "$pid" KILL
    # its management socket and lock file (tgtd leaves them behind)
    if [[ $TGT_SOCKET_OURS == 1 ]]; then
        rm -f -- "/run/tgtd/socket.$TGT_CTL" "/run/tgtd/socket.$TGT_CTL.lock"
    fi
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -n $PERF_PID ]] && stop_pid perf "$PERF_PID" INT
    local name
    for name in "${!PID[@]}"; do
        if [[ $name == tgt ]]; then stop_tgtd "${PID[$name]}"; else stop_pid "$name" "${PID[$name]}"; fi
    done
    if [[ $SCRATCH_CREATED == 1 ]]; then
        if [[ ${KEEP_SCRATCH:-0} == 1 ]]; then
            log "kept scratch dir $SCRATCH"
        else
            rm -rf -- "$SCRATCH"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- checks
for tool in qemu-img tgtd tgtadm python3 openssl; do
    command -v "$tool" >/dev/null || die "$tool is not installed (see /work/shared/TESTING.md)"
done
[[ -x /usr/bin/time ]] || die "/usr/bin/time is not installed (package time)"
[[ $(id -u) == 0 ]] || die "tgtd needs root"
if [[ ${PERF:-0} == 1 ]]; then command -v perf >/dev/null || die "PERF=1 but perf is not installed"; fi
if [[ -n ${COUNTS:-} ]]; then
    read -r -a FIXED_COUNTS <<<"$COUNTS"
    [[ ${#FIXED_COUNTS[@]} == 4 ]] || die "COUNTS needs four numbers, got '$COUNTS'"
    for c in "${FIXED_COUNTS[@]}"; do [[ $c =~ ^[1-9][0-9]*$ ]] || die "COUNTS: '$c' is not a count"; done
fi

# Build forkd when the binary is missing or older than any source file (cargo does nothing
# when it is up to date, but finding out takes it a while, so look first).  A binary named by
# FORKD_BIN is the caller's choice: used as it is.
stale=""
if [[ -n ${FORKD_BIN:-} ]]; then
    [[ -x $FORKD ]] || die "FORKD_BIN=$FORKD is not an executable"
elif [[ -x $FORKD ]]; then
    stale=$(find "$REPO" -path "$REPO/target" -prune -o -path "$REPO/.git" -prune -o \
        \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) -newer "$FORKD" -print -quit)
fi
if [[ -z ${FORKD_BIN:-} && ( ! -x $FORKD || -n $stale ) ]]; then
    log "building forkd (target/release/forkd is $([[ -n $stale ]] && echo "older than $stale" || echo missing))"
    (cd "$REPO" && cargo build --release -p forkd-daemon) || die "cargo build failed"
fi

# The scratch dir is created (and later removed) by this script only: refuse to reuse a
# directory that is not ours, so a typo cannot make the cleanup delete someone's data.
if [[ -e $SCRATCH ]]; then
    [[ -f $SCRATCH/.iscsi-bench ]] || die "$SCRATCH exists and is not an iscsi-bench scratch dir; remove it or set ISCSI_BENCH_SCRATCH"
    log "removing the leftover scratch dir $SCRATCH"
    rm -rf -- "$SCRATCH"
fi
mkdir -p -- "$SCRATCH"
SCRATCH_CREATED=1
touch "$SCRATCH/.iscsi-bench"
SCRATCH=$(cd "$SCRATCH" && pwd)

read -r API_PORT NBD_PORT FORKD_PORT TGT_PORT < <(free_ports 4)
# tgtd's "control port" is only a number (0..32767) naming its management socket,
# /run/tgtd/socket.N: take one whose socket does not exist, so no other tgtd uses it.
for ((i = 0; i < 100; i++)); do
    TGT_CTL=$((1000 + RANDOM % 31000))
    [[ -e /run/tgtd/socket.$TGT_CTL || -e /run/tgtd/socket.$TGT_CTL.lock ]] || break
done
API="http://127.0.0.1:$API_PORT"
declare -A URL=(
    [forkd]="iscsi://127.0.0.1:$FORKD_PORT/iqn.2026-11.dev.forkd:g3/0"
    [tgt]="iscsi://127.0.0.1:$TGT_PORT/$TGT_IQN/1"
)

served_size() { # server: the size its LUN reports, or nothing
    qemu-img info -f raw --output=json "${URL[$1]}" 2>/dev/null \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"])' 2>/dev/null || true
}

wait_lun() { # server: wait up to 30 s for the LUN to answer a login
    local s=$1 i
    for ((i = 0; i < 150; i++)); do
        kill -0 "${PID[$s]}" 2>/dev/null || die "$s exited during start-up (see $SCRATCH/$s.log)"
        [[ -n $(served_size "$s") ]] && return 0
        sleep 0.2
    done
    qemu-img info -f raw "${URL[$s]}" >&2 || true
    die "$s did not serve ${URL[$s]} within 30 s"
}

# ---------------------------------------------------------------- data
FILE=$SCRATCH/disk.img
log "writing ${SIZE_MIB} MiB of random data to $FILE"
openssl rand -out "$FILE" "$SIZE_BYTES" 2>/dev/null || head -c "$SIZE_BYTES" /dev/urandom >"$FILE"
[[ $(stat -c %s "$FILE") == "$SIZE_BYTES" ]] || die "$FILE has the wrong size"

# ---------------------------------------------------------------- forkd
log "starting forkd (API $API, iSCSI 127.0.0.1:$FORKD_PORT, NBD 127.0.0.1:$NBD_PORT)"
"$FORKD" serve --data-dir "$SCRATCH/forkd" --api "127.0.0.1:$API_PORT" \
    --nbd "127.0.0.1:$NBD_PORT" --iscsi "127.0.0.1:$FORKD_PORT" >"$SCRATCH/forkd.log" 2>&1 &
PID[forkd]=$!
fk() { "$FORKD" --api "$API" "$@"; }
for ((i = 0; i < 300; i++)); do
    kill -0 "${PID[forkd]}" 2>/dev/null || die "forkd exited during start-up: $(tail -5 "$SCRATCH/forkd.log")"
    fk list >/dev/null 2>&1 && break
    sleep 0.1
done
fk list >/dev/null || die "forkd's API did not come up within 30 s"

log "building src@1 -> g1@1 -> g2@1 -> g3 in forkd"
{
    fk source create src --size "${SIZE_MIB}M"
    fk ingest src --from "$FILE"
    fk clone src@1 g1
    fk snapshot g1
    fk clone g1@1 g2
    fk snapshot g2
    fk clone g2@1 g3
} >&2

# ---------------------------------------------------------------- tgt
log "starting tgtd (portal 127.0.0.1:$TGT_PORT, control port $TGT_CTL) on $FILE"
tgtd -f -C "$TGT_CTL" --iscsi "portal=127.0.0.1:$TGT_PORT" >"$SCRATCH/tgt.log" 2>&1 &
PID[tgt]=$!
ta() { tgtadm -C "$TGT_CTL" --lld iscsi "$@"; }
for ((i = 0; i < 100; i++)); do
    kill -0 "${PID[tgt]}" 2>/dev/null || die "tgtd exited during start-up: $(tail -5 "$SCRATCH/tgt.log")"
    ta --op show --mode target >/dev/null 2>&1 && break
    sleep 0.1
done
ta --op show --mode target >/dev/null || die "tgtd's management socket did not come up within 10 s"
kill -0 "${PID[tgt]}" 2>/dev/null || die "tgtd exited during start-up: $(tail -5 "$SCRATCH/tgt.log")"
TGT_SOCKET_OURS=1
# tgtd keeps running when it cannot bind its portal: look for that in its log
if grep -q 'failed to create/bind to portal' "$SCRATCH/tgt.log"; then
    die "tgtd could not listen on 127.0.0.1:$TGT_PORT: $(grep -m1 portal "$SCRATCH/tgt.log")"
fi
ta --op new --mode target --tid 1 -T "$TGT_IQN"
ta --op new --mode logicalunit --tid 1 --lun 1 -b "$FILE"
ta --op bind --mode target --tid 1 -I ALL

# ---------------------------------------------------------------- check the data
for s in "${SERVERS[@]}"; do
    wait_lun "$s"
    got=$(served_size "$s")
    [[ $got == "$SIZE_BYTES" ]] || die "$s's LUN holds $got bytes, expected $SIZE_BYTES"
done
for s in "${SERVERS[@]}"; do
    log "checking that $s serves the file's data (qemu-img compare ${URL[$s]})"
    qemu-img compare -f raw -F raw "${URL[$s]}" "$FILE" >&2 \
        || die "$s's LUN differs from $FILE: not measuring (forkd log: $(tail -3 "$SCRATCH/forkd.log"))"
done

# ---------------------------------------------------------------- measuring
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # utime+stime of a process, all its threads included
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
load1() { cut -d' ' -f1 /proc/loadavg; }
sys_ticks() { # "busy total" jiffies of the whole machine, summed over all CPUs
    awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t; exit }' /proc/stat
}

# name rw bs depth
WORKLOADS=(
    "read-4k-qd32 read 4k 32"
    "write-4k-qd32 write 4k 32"
    "read-1M-qd8 read 1M 8"
    "write-1M-qd8 write 1M 8"
)
bytes_of() { case $1 in 4k) echo 4096 ;; 1M) echo 1048576 ;; esac; }
step_of() { # bs: the offset step; 4k strided across the disk, 1M sequential
    if [[ $1 == 4k ]]; then echo $((STRIDE_BLOCKS * 4096)); else bytes_of "$1"; fi
}

# qemu-img bench: -t none (cache.direct=on, cache.writeback=on: no flushes, and no client-side
# allocation-status cache); writes carry a non-zero byte (0xa5 for 4k, 0x5a for 1M), not
# qemu's default zeros, so that no server can take a shortcut on zero data, and so that the
# check after the runs can tell which workload wrote what.
BENCH_ERR=""
bench() { # server rw bs depth count out: runs one qemu-img bench, prints its seconds
    local s=$1 rw=$2 bs=$3 qd=$4 count=$5 out=$6 secs
    local args=(bench -f raw -t none -c "$count" -d "$qd" -s "$(bytes_of "$bs")" -S "$(step_of "$bs")")
    [[ $rw == write ]] && args+=(-w "--pattern=$([[ $bs == 4k ]] && echo 0xa5 || echo 0x5a)")
    if ! /usr/bin/time -f '%U %S' -o "$out.time" qemu-img "${args[@]}" "${URL[$s]}" >"$out" 2>&1; then
        BENCH_ERR="qemu-img ${args[*]} ${URL[$s]} failed: $(tail -3 "$out" | tr '\n' ' ')"
        return 1
    fi
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' "$out")
    [[ -n $secs ]] || { BENCH_ERR="no 'Run completed' line in $out: $(tail -3 "$out" | tr '\n' ' ')"; return 1; }
    echo "$secs"
}
bench_or_die() {
    bench "$@" || {
        log "forkd log, last lines:"; tail -20 "$SCRATCH/forkd.log" >&2
        log "tgtd log, last lines:"; tail -5 "$SCRATCH/tgt.log" >&2
        die "$BENCH_ERR"
    }
}

declare -A COUNT=()
if [[ -n ${COUNTS:-} ]]; then
    for i in "${!WORKLOADS[@]}"; do
        read -r name _ <<<"${WORKLOADS[$i]}"
        COUNT[$name]=${FIXED_COUNTS[$i]}
    done
    COUNT_HOW="fixed by COUNTS"
else
    # Calibrate on tgt, the reference: grow a probe until it runs >= 1 s (0.5 s with --quick),
    # then scale it to TARGET_SECS.  forkd then does exactly the same requests.
    COUNT_HOW="calibrated on tgt for ~${TARGET_SECS} s"
    min_probe=$([[ $QUICK == 1 ]] && echo 0.5 || echo 1)
    for w in "${WORKLOADS[@]}"; do
        read -r name rw bs qd <<<"$w"
        c=$([[ $bs == 4k ]] && echo 8192 || echo 256)
        while :; do
            t=$(bench_or_die tgt "$rw" "$bs" "$qd" "$c" "$SCRATCH/calibrate.$name.out")
            if awk -v t="$t" -v m="$min_probe" 'BEGIN { exit !(t >= m) }' || ((c >= 100000000)); then break; fi
            c=$(awk -v c="$c" -v t="$t" -v m="$min_probe" \
                'BEGIN { f = (t > 0 ? 1.5 * m / t : 16); if (f > 16) f = 16; if (f < 2) f = 2; printf "%d", c * f }')
        done
        COUNT[$name]=$(awk -v c="$c" -v t="$t" -v T="$TARGET_SECS" \
            'BEGIN { n = c * T / t; if (n < c) n = c; printf "%d", n }')
        log "calibration $name: $c requests took $t s on tgt -> ${COUNT[$name]} requests per run"
    done
fi

declare -A SECS=() VAL=() SCPU=() SCPUS=() QCPU=() MCPU=() LOAD=()
PERF_REPORTS=""
START_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
UPTIME_START=$(uptime)
log "measuring: ${#WORKLOADS[@]} workloads x ${#SERVERS[@]} servers"
for wi in "${!WORKLOADS[@]}"; do
    read -r name rw bs qd <<<"${WORKLOADS[$wi]}"
    # alternate which server goes first, so that neither always runs on a calmer machine
    if ((wi % 2 == 0)); then order=(forkd tgt); else order=(tgt forkd); fi
    for s in "${order[@]}"; do
        out=$SCRATCH/bench.$name.$s.out
        l_before=$(load1)
        t0=$(date +%s.%N)
        c0=$(cpu_ticks "${PID[$s]}")
        read -r b0 a0 < <(sys_ticks)
        if [[ ${PERF:-0} == 1 && $s == forkd ]]; then
            perf record -q -F 499 -p "${PID[forkd]}" -o "$SCRATCH/perf.$name.data" >/dev/null 2>&1 &
            PERF_PID=$!
        fi
        secs=$(bench_or_die "$s" "$rw" "$bs" "$qd" "${COUNT[$name]}" "$out")
        c1=$(cpu_ticks "${PID[$s]}")
        read -r b1 a1 < <(sys_ticks)
        t1=$(date +%s.%N)
        if [[ -n $PERF_PID ]]; then
            kill -INT "$PERF_PID" 2>/dev/null || true
            wait "$PERF_PID" 2>/dev/null || true
            PERF_PID=""
            PERF_REPORTS+=$'\n'"### forkd, $name"$'\n\n```\n'
            PERF_REPORTS+=$(perf report -i "$SCRATCH/perf.$name.data" --stdio --no-children \
                --sort dso,symbol --percent-limit 1.5 2>/dev/null \
                | grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' | head -25)
            PERF_REPORTS+=$'\n```\n'
        fi
        kill -0 "${PID[$s]}" 2>/dev/null || die "$s died during $name"
        SECS[$name,$s]=$secs
        # IOPS for 4k, MiB/s for 1M (1 request = 1 MiB)
        VAL[$name,$s]=$(awk -v n="${COUNT[$name]}" -v t="$secs" 'BEGIN { printf "%.1f", (t > 0 ? n / t : 0) }')
        SCPUS[$name,$s]=$(awk -v a="$c0" -v b="$c1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / hz }')
        SCPU[$name,$s]=$(awk -v a="$c0" -v b="$c1" -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" \
            'BEGIN { printf "%.0f", 100 * (b - a) / hz / (t1 - t0) }')
        QCPU[$name,$s]=$(awk -v t0="$t0" -v t1="$t1" '{ printf "%.0f", 100 * ($1 + $2) / (t1 - t0) }' "$out.time")
        # whole machine busy % (100 % = one core): what is left after the server and qemu-img is
        # interference from other processes plus kernel work charged to neither (softirqs of
        # loopback TCP, kworkers)
        MCPU[$name,$s]=$(awk -v a="$b0" -v b="$b1" -v ta="$a0" -v tb="$a1" -v n="$(nproc)" \
            'BEGIN { printf "%.0f", (tb > ta ? 100 * n * (b - a) / (tb - ta) : 0) }')
        LOAD[$name,$s]="$l_before -> $(load1)"
        log "$name $s: ${COUNT[$name]} requests in $secs s = ${VAL[$name,$s]} $([[ $bs == 4k ]] && echo IOPS || echo MiB/s), server CPU ${SCPUS[$name,$s]} s (${SCPU[$name,$s]}%), qemu-img ${QCPU[$name,$s]}%, machine ${MCPU[$name,$s]}%, load ${LOAD[$name,$s]}"
    done
done
UPTIME_END=$(uptime)

# Both servers received the very same writes (same offsets, same bytes; each run writes one
# byte value, so the order within a run does not matter): forkd's g3 must now equal the file
# tgt wrote to.  A failure is reported in the results, not fatal: the figures stand, but a
# server that dropped writes has no business passing.
log "checking that forkd's g3 and tgt's file hold the same data after the writes"
if qemu-img compare -f raw -F raw "${URL[forkd]}" "$FILE" >"$SCRATCH/compare-after.out" 2>&1; then
    AFTER_CHECK="forkd's g3 and tgt's file are identical after the runs (\`qemu-img compare\`)"
else
    AFTER_CHECK="**forkd's g3 differs from tgt's file after the runs**: $(tr '\n' ' ' <"$SCRATCH/compare-after.out")"
    log "WARNING: $AFTER_CHECK"
fi

# ---------------------------------------------------------------- report
fmt_val() { # value bs
    if [[ $2 == 4k ]]; then awk -v v="$1" 'BEGIN { printf "%.1fk IOPS", v / 1000 }'
    else awk -v v="$1" 'BEGIN { printf "%.0f MiB/s", v }'; fi
}

{
    echo "# forkd iSCSI vs tgt"
    echo
    echo "Generated by \`bench/iscsi-bench.sh$([[ $QUICK == 1 ]] && echo ' --quick')\` on $START_DATE."
    echo
    echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, kernel $(uname -r)"
    echo "- forkd: $("$FORKD" --version) (git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$([[ -n $(git -C "$REPO" status --porcelain 2>/dev/null) ]] && echo ', dirty tree'))"
    echo "- tgt: $(tgtd --version 2>&1 | head -1) (bs_rdwr backing store, default I/O threads)"
    echo "- client: $(qemu-img --version | head -1), libiscsi driver, \`qemu-img bench -f raw -t none\`"
    echo "- data: ${SIZE_MIB} MiB of random data; forkd serves clone g3 (src@1 -> g1@1 -> g2@1 -> g3)"
    echo "  as iqn.2026-11.dev.forkd:g3 LUN 0, tgt serves the raw file as LUN 1; both checked"
    echo "  with \`qemu-img compare\` before measuring"
    echo "- requests per run: ${COUNT_HOW}, the same for both servers;"
    echo "  4k: each request ${STRIDE_BLOCKS} blocks (x 4 KiB) past the previous one, modulo the disk;"
    echo "  1M: sequential; 4k writes carry the byte 0xa5, 1M writes 0x5a"
    echo "- after the runs: $AFTER_CHECK"
    echo "- uptime before: \`$(echo "$UPTIME_START" | sed 's/^ *//')\`"
    echo "- uptime after: \`$(echo "$UPTIME_END" | sed 's/^ *//')\`"
    [[ ${PERF:-0} == 1 ]] && echo "- PERF=1: forkd ran under \`perf record\` (its figures are slightly pessimistic)"
    echo
    echo "time = qemu-img's \"Run completed in\" seconds; 4k workloads in IOPS, 1M workloads in MiB/s"
    echo "(requests / time). ratio = forkd / tgt; goal: at least 1.0x tgt."
    echo
    echo "| workload | requests | forkd time s | forkd | tgt time s | tgt | ratio | >= 1.0x tgt |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|"
    for w in "${WORKLOADS[@]}"; do
        read -r name rw bs qd <<<"$w"
        ratio=$(awk -v f="${VAL[$name,forkd]}" -v b="${VAL[$name,tgt]}" 'BEGIN { printf "%.2f", (b > 0 ? f / b : 0) }')
        verdict=$(awk -v r="$ratio" 'BEGIN { print (r >= 1.0 ? "PASS" : "MISS") }')
        echo "| $name | ${COUNT[$name]} | ${SECS[$name,forkd]} | $(fmt_val "${VAL[$name,forkd]}" "$bs") | ${SECS[$name,tgt]} | $(fmt_val "${VAL[$name,tgt]}" "$bs") | $ratio | $verdict |"
    done
    echo
    echo "CPU during each run (from just before qemu-img starts to just after it exits, login"
    echo "included), 100% = one core of $(nproc): server CPU s = its utime+stime, all threads"
    echo "(/proc/PID/stat); per request = that / requests; qemu-img = its user+sys; machine = all"
    echo "CPUs busy (/proc/stat); other = machine - server - qemu-img (other processes, plus"
    echo "softirq/kworker time charged to no one); load1 = 1-minute load average before -> after:"
    echo
    echo "| workload | server | server CPU s | µs CPU / request | server CPU % | qemu-img CPU % | machine % | other % | load1 |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---|"
    for w in "${WORKLOADS[@]}"; do
        read -r name rw bs qd <<<"$w"
        for s in "${SERVERS[@]}"; do
            per=$(awk -v c="${SCPUS[$name,$s]}" -v n="${COUNT[$name]}" 'BEGIN { printf "%.1f", 1e6 * c / n }')
            o=$((MCPU[$name,$s] - SCPU[$name,$s] - QCPU[$name,$s]))
            echo "| $name | $s | ${SCPUS[$name,$s]} | $per | ${SCPU[$name,$s]} | ${QCPU[$name,$s]} | ${MCPU[$name,$s]} | $o | ${LOAD[$name,$s]} |"
        done
    done
    if [[ -n $PERF_REPORTS ]]; then
        echo
        echo "## perf: forkd's top symbols (self time, >= 1.5 %)"
        echo "$PERF_REPORTS"
    fi
} | tee "$RESULTS"
log "results written to $RESULTS"
