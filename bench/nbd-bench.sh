#!/usr/bin/env bash
# nbd-bench.sh: forkd's NBD server against qemu-nbd and nbdkit, side by side, in one run.
#
# Starts forkd (serving a clone three generations deep), qemu-nbd and nbdkit (serving a plain
# raw file holding the same data) on loopback, then runs fio's nbd engine against each in turn,
# workload by workload: randread 4k qd32, randwrite 4k qd32, read 1M qd8, write 1M qd8.
# Prints a markdown table and writes it to bench/nbd-results.md.  See bench/NBD.md.
#
# Usage: bash bench/nbd-bench.sh [--quick]
#   --quick             RUNTIME=3 and a 256 MiB file (smoke run)
# Environment:
#   NBD_BENCH_SCRATCH   scratch dir, on the same disk as the repo (default /work/nbd-bench-scratch);
#                       created by the script and removed at exit
#   RUNTIME             seconds per fio run (default 15)
#   SIZE_MIB            size of the test file in MiB (default 1024, 256 with --quick)
#   KEEP_SCRATCH=1      keep the scratch dir (fio JSON, forkd log) instead of removing it
#   PERF=1              also `perf record` forkd during its runs and append its top symbols to
#                       the results (perturbs forkd's figures a little)
#   RESULTS             output file (default bench/nbd-results.md)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "nbd-bench: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRATCH=${NBD_BENCH_SCRATCH:-/work/nbd-bench-scratch}
RESULTS=${RESULTS:-$REPO/bench/nbd-results.md}
if [[ $QUICK == 1 ]]; then
    RUNTIME=${RUNTIME:-3}
    SIZE_MIB=${SIZE_MIB:-256}
else
    RUNTIME=${RUNTIME:-15}
    SIZE_MIB=${SIZE_MIB:-1024}
fi
SIZE_BYTES=$((SIZE_MIB * 1024 * 1024))
FORKD=$REPO/target/release/forkd
SERVERS=(forkd qemu-nbd nbdkit)

log() { printf '[nbd-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
declare -A PID=()          # server name -> pid (every long-lived process this script starts)
PERF_PID=""
SCRATCH_CREATED=0

source "$REPO/bench/lib.sh" # stop_pid, free_ports

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -n $PERF_PID ]] && stop_pid "$PERF_PID" perf
    local name
    for name in "${!PID[@]}"; do stop_pid "${PID[$name]}" "$name"; done
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
for tool in qemu-nbd nbdkit fio nbdinfo qemu-img python3; do
    command -v "$tool" >/dev/null || die "$tool is not installed (see /work/shared/TESTING.md)"
done
if command -v jq >/dev/null; then HAVE_JQ=1; else HAVE_JQ=0; fi
if [[ ${PERF:-0} == 1 ]]; then command -v perf >/dev/null || die "PERF=1 but perf is not installed"; fi

if [[ ! -x $FORKD ]]; then
    log "building forkd (target/release/forkd is missing)"
    (cd "$REPO" && cargo build --release -p forkd-daemon) || die "cargo build failed"
fi

# The scratch dir is created (and later removed) by this script only: refuse to reuse a
# directory that is not ours, so a typo cannot make the cleanup delete someone's data.
if [[ -e $SCRATCH ]]; then
    [[ -f $SCRATCH/.nbd-bench ]] || die "$SCRATCH exists and is not an nbd-bench scratch dir; remove it or set NBD_BENCH_SCRATCH"
    log "removing the leftover scratch dir $SCRATCH"
    rm -rf -- "$SCRATCH"
fi
mkdir -p -- "$SCRATCH"
SCRATCH_CREATED=1
touch "$SCRATCH/.nbd-bench"
SCRATCH=$(cd "$SCRATCH" && pwd)

read -r API_PORT FORKD_PORT ISCSI_PORT QEMU_PORT NBDKIT_PORT < <(free_ports 5)
API="http://127.0.0.1:$API_PORT"
declare -A PORT=([forkd]=$FORKD_PORT [qemu-nbd]=$QEMU_PORT [nbdkit]=$NBDKIT_PORT)
declare -A EXPORT=([forkd]=g3 [qemu-nbd]=disk [nbdkit]=disk)
uri() { echo "nbd://127.0.0.1:${PORT[$1]}/${EXPORT[$1]}"; }

wait_nbd() { # server: wait up to 30 s for the export to answer a handshake
    local s=$1 i
    for ((i = 0; i < 300; i++)); do
        kill -0 "${PID[$s]}" 2>/dev/null || die "$s exited during start-up (see $SCRATCH/$s.log)"
        nbdinfo --size "$(uri "$s")" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$s did not serve $(uri "$s") within 30 s"
}

# ---------------------------------------------------------------- data
FILE=$SCRATCH/disk.img
log "writing ${SIZE_MIB} MiB of random data to $FILE"
openssl rand -out "$FILE" "$SIZE_BYTES" 2>/dev/null || head -c "$SIZE_BYTES" /dev/urandom >"$FILE"
[[ $(stat -c %s "$FILE") == "$SIZE_BYTES" ]] || die "$FILE has the wrong size"

# ---------------------------------------------------------------- forkd
log "starting forkd (API $API, NBD 127.0.0.1:$FORKD_PORT)"
"$FORKD" serve --data-dir "$SCRATCH/forkd" --api "127.0.0.1:$API_PORT" \
    --nbd "127.0.0.1:$FORKD_PORT" --iscsi "127.0.0.1:$ISCSI_PORT" >"$SCRATCH/forkd.log" 2>&1 &
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
wait_nbd forkd
log "checking that forkd's g3 holds the file's data (qemu-img compare)"
qemu-img compare -f raw -F raw "$(uri forkd)" "$FILE" >&2 \
    || die "forkd's g3 differs from $FILE: not measuring"

# ---------------------------------------------------------------- peers
log "starting qemu-nbd (port $QEMU_PORT) and nbdkit (port $NBDKIT_PORT) on $FILE"
qemu-nbd -f raw -x disk -p "$QEMU_PORT" -b 127.0.0.1 -t --cache=writeback --aio=io_uring \
    "$FILE" >"$SCRATCH/qemu-nbd.log" 2>&1 &
PID[qemu-nbd]=$!
nbdkit -f -p "$NBDKIT_PORT" -i 127.0.0.1 --exportname=disk file "$FILE" \
    >"$SCRATCH/nbdkit.log" 2>&1 &
PID[nbdkit]=$!
wait_nbd qemu-nbd
wait_nbd nbdkit
for s in "${SERVERS[@]}"; do
    got=$(nbdinfo --size "$(uri "$s")")
    [[ $got == "$SIZE_BYTES" ]] || die "$s exports $got bytes, expected $SIZE_BYTES"
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

# name rw bs iodepth
WORKLOADS=(
    "randread-4k-qd32 randread 4k 32"
    "randwrite-4k-qd32 randwrite 4k 32"
    "read-1M-qd8 read 1M 8"
    "write-1M-qd8 write 1M 8"
)

# fio JSON -> "value p99_us fio_cpu_pct": IOPS for 4k, MiB/s for 1M, p99 completion latency in us
extract() { # json_file rw bs
    local dir=read
    [[ $2 == *write* ]] && dir=write
    if [[ $HAVE_JQ == 1 ]]; then
        jq -r --arg d "$dir" --arg bs "$3" '.jobs[0] as $j | $j[$d] as $r
            | [ (if $bs == "4k" then $r.iops else $r.bw_bytes / 1048576 end),
                ($r.clat_ns.percentile["99.000000"] / 1000),
                ($j.usr_cpu + $j.sys_cpu) ] | @tsv' "$1"
    else
        python3 - "$1" "$dir" "$3" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]; r = j[sys.argv[2]]
v = r["iops"] if sys.argv[3] == "4k" else r["bw_bytes"] / 1048576
print(v, r["clat_ns"]["percentile"]["99.000000"] / 1000, j["usr_cpu"] + j["sys_cpu"], sep="\t")
EOF
    fi
}

declare -A VAL=() P99=() SCPU=() FCPU=() MCPU=() LOAD=()
PERF_REPORTS=""
START_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
UPTIME_START=$(uptime)
log "measuring: ${#WORKLOADS[@]} workloads x ${#SERVERS[@]} servers x ${RUNTIME} s"
for w in "${WORKLOADS[@]}"; do
    read -r name rw bs qd <<<"$w"
    for s in "${SERVERS[@]}"; do
        out=$SCRATCH/fio.$name.$s.json
        l_before=$(load1)
        t0=$(date +%s.%N)
        c0=$(cpu_ticks "${PID[$s]}")
        read -r b0 a0 < <(sys_ticks)
        if [[ ${PERF:-0} == 1 && $s == forkd ]]; then
            perf record -q -F 499 -p "${PID[forkd]}" -o "$SCRATCH/perf.$name.data" \
                -- sleep "$((RUNTIME > 2 ? RUNTIME - 1 : RUNTIME))" >/dev/null 2>&1 &
            PERF_PID=$!
        fi
        fio --name="$name" --ioengine=nbd --uri="$(uri "$s")" --rw="$rw" --bs="$bs" \
            --iodepth="$qd" --size="${SIZE_MIB}M" --runtime="$RUNTIME" --time_based \
            --group_reporting --output-format=json --output="$out" >/dev/null \
            || die "fio $name against $s failed"
        c1=$(cpu_ticks "${PID[$s]}")
        read -r b1 a1 < <(sys_ticks)
        t1=$(date +%s.%N)
        if [[ -n $PERF_PID ]]; then
            wait "$PERF_PID" 2>/dev/null || true
            PERF_PID=""
            PERF_REPORTS+=$'\n'"### forkd, $name"$'\n\n```\n'
            PERF_REPORTS+=$(perf report -i "$SCRATCH/perf.$name.data" --stdio --no-children \
                --sort dso,symbol --percent-limit 1.5 2>/dev/null \
                | grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' | head -25)
            PERF_REPORTS+=$'\n```\n'
        fi
        kill -0 "${PID[$s]}" 2>/dev/null || die "$s died during $name"
        read -r v p f < <(extract "$out" "$rw" "$bs")
        VAL[$name,$s]=$v
        P99[$name,$s]=$p
        FCPU[$name,$s]=$f
        SCPU[$name,$s]=$(awk -v a="$c0" -v b="$c1" -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" \
            'BEGIN { printf "%.0f", 100 * (b - a) / hz / (t1 - t0) }')
        # whole machine busy % (100 % = one core): what is left after the server and fio is
        # interference from other processes (a compiler, another benchmark) plus kernel work
        # not charged to either (softirqs of loopback TCP, kworkers)
        MCPU[$name,$s]=$(awk -v a="$b0" -v b="$b1" -v ta="$a0" -v tb="$a1" -v n="$(nproc)" \
            'BEGIN { printf "%.0f", (tb > ta ? 100 * n * (b - a) / (tb - ta) : 0) }')
        LOAD[$name,$s]="$l_before -> $(load1)"
        log "$name $s: $v $([[ $bs == 4k ]] && echo IOPS || echo MiB/s), p99 ${p} us, server CPU ${SCPU[$name,$s]}%, machine ${MCPU[$name,$s]}%, load ${LOAD[$name,$s]}"
    done
done
UPTIME_END=$(uptime)

# ---------------------------------------------------------------- report
fmt_val() { # value bs
    if [[ $2 == 4k ]]; then awk -v v="$1" 'BEGIN { printf "%.1fk IOPS", v / 1000 }'
    else awk -v v="$1" 'BEGIN { printf "%.0f MiB/s", v }'; fi
}
fmt_us() { awk -v v="$1" 'BEGIN { printf "%.0f", v }'; }

{
    echo "# forkd NBD vs qemu-nbd and nbdkit"
    echo
    echo "Generated by \`bench/nbd-bench.sh$([[ $QUICK == 1 ]] && echo ' --quick')\` on $START_DATE."
    echo
    echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, kernel $(uname -r)"
    echo "- forkd: $("$FORKD" --version) (git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$([[ -n $(git -C "$REPO" status --porcelain 2>/dev/null) ]] && echo ', dirty tree'))"
    echo "- qemu-nbd: $(qemu-nbd --version | head -1)"
    echo "- nbdkit: $(nbdkit --version | head -1)"
    echo "- fio: $(fio --version)"
    echo "- data: ${SIZE_MIB} MiB of random data; forkd serves clone g3 (src@1 -> g1@1 -> g2@1 -> g3),"
    echo "  qemu-nbd and nbdkit serve the raw file; fio nbd engine, 1 job, ${RUNTIME} s per run"
    echo "- uptime before: \`$(echo "$UPTIME_START" | sed 's/^ *//')\`"
    echo "- uptime after: \`$(echo "$UPTIME_END" | sed 's/^ *//')\`"
    [[ ${PERF:-0} == 1 ]] && echo "- PERF=1: forkd ran under \`perf record\` (its figures are slightly pessimistic)"
    echo
    echo "4k workloads in IOPS, 1M workloads in MiB/s; p99 = 99th percentile completion latency in µs."
    echo "ratio = forkd / max(qemu-nbd, nbdkit); PASS if >= 1.0."
    echo
    echo "| workload | forkd | p99 µs | qemu-nbd | p99 µs | nbdkit | p99 µs | ratio | verdict |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
    for w in "${WORKLOADS[@]}"; do
        read -r name rw bs qd <<<"$w"
        best=$(awk -v a="${VAL[$name,qemu-nbd]}" -v b="${VAL[$name,nbdkit]}" 'BEGIN { print (a > b ? a : b) }')
        ratio=$(awk -v f="${VAL[$name,forkd]}" -v b="$best" 'BEGIN { printf "%.2f", (b > 0 ? f / b : 0) }')
        verdict=$(awk -v r="$ratio" 'BEGIN { print (r >= 1.0 ? "PASS" : "MISS") }')
        row="| $name"
        for s in "${SERVERS[@]}"; do
            row+=" | $(fmt_val "${VAL[$name,$s]}" "$bs") | $(fmt_us "${P99[$name,$s]}")"
        done
        echo "$row | $ratio | $verdict |"
    done
    echo
    echo "CPU use during each run, 100% = one core of $(nproc): server = its utime+stime; fio = usr+sys"
    echo "as fio reports it; machine = all CPUs busy (from /proc/stat); other = machine - server - fio"
    echo "(other processes, plus softirq/kworker time charged to no one); load1 = 1-minute load"
    echo "average before -> after the run:"
    echo
    echo "| workload | server | server CPU % | fio CPU % | machine % | other % | load1 |"
    echo "|---|---|---:|---:|---:|---:|---|"
    for w in "${WORKLOADS[@]}"; do
        read -r name rw bs qd <<<"$w"
        for s in "${SERVERS[@]}"; do
            f=$(awk -v v="${FCPU[$name,$s]}" 'BEGIN { printf "%.0f", v }')
            o=$((MCPU[$name,$s] - SCPU[$name,$s] - f))
            echo "| $name | $s | ${SCPU[$name,$s]} | $f | ${MCPU[$name,$s]} | $o | ${LOAD[$name,$s]} |"
        done
    done
    if [[ -n $PERF_REPORTS ]]; then
        echo
        echo "## perf: forkd's top symbols (self time, >= 1.5 %)"
        echo "$PERF_REPORTS"
    fi
} | tee "$RESULTS"
log "results written to $RESULTS"
