#!/usr/bin/env bash
# list-bench.sh: how long `forkd list` takes with many clones that each hold data of their
# own, and what a large delete does to reads of another clone (issue 13).
#
# Usage: bench/list-bench.sh [--clones N] [--runs R] [--delete-mib M] [--dir DIR] [--forkd PATH] [--keep]
#   --clones N     clones (default 1000)
#   --runs R       timed runs of each list (default 20)
#   --delete-mib M data written into the clone the delete phase deletes (default 1024; 0 skips it)
#   --dir DIR      scratch dir (default /work/bench-scratch-list); created and removed by this
#                  script, refused if it exists and is not ours
#   --forkd PATH   forkd binary (default target/release/forkd of this workspace; not built here)
#   --keep         keep the scratch dir
#
# Setup: a daemon on the scratch dir; one source of 1 GiB with 64 MiB of random data ingested
# (the rest zeros);
# N clones of its snapshot, each with one 4 KiB write of its own (so each has a private path
# through its tree and 4 KiB unique).
# list: `forkd list` (wall time, the CLI process included) and `GET /v1/volumes` (curl's
#   %{time_total}), R runs each, after one untimed warm-up; then the daemon is restarted and
#   the first `GET /v1/volumes` after the restart is timed on its own, once as soon as the
#   daemon answers and once (after another restart) 2 s later.
# delete: a clone with M MiB of its own is deleted (DELETE /v1/volumes/C, curl's time) while a
#   loop reads 4 KiB of another clone (GET .../data, curl's time) until the delete has answered
#   and the extent file has given the space back; the reads' latencies during that are reported.
# Output: a markdown report on stdout.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRATCH=/work/bench-scratch-list
FORKD=$REPO/target/release/forkd
CLONES=1000
RUNS=20
DELETE_MIB=1024
KEEP=0
while (($#)); do
    case $1 in
    --clones) CLONES=$2; shift ;;
    --runs) RUNS=$2; shift ;;
    --delete-mib) DELETE_MIB=$2; shift ;;
    --dir) SCRATCH=$2; shift ;;
    --forkd) FORKD=$2; shift ;;
    --keep) KEEP=1 ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see -h)" >&2; exit 1 ;;
    esac
    shift
done
for n in "$CLONES" "$RUNS" "$DELETE_MIB"; do
    [[ $n =~ ^[0-9]+$ ]] || { echo "--clones, --runs and --delete-mib take numbers" >&2; exit 1; }
done
((RUNS >= 1 && CLONES >= 2)) || { echo "--runs 1 or more, --clones 2 or more" >&2; exit 1; }

log() { printf '[list-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

DAEMON_PID=""
READER_PID=""
SCRATCH_CREATED=0
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh" # stop_pid
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -n $READER_PID ]] && kill "$READER_PID" 2>/dev/null && wait "$READER_PID" 2>/dev/null
    [[ -n $DAEMON_PID ]] && stop_pid "$DAEMON_PID"
    if ((SCRATCH_CREATED)); then
        if ((KEEP)); then log "kept scratch dir $SCRATCH"; else rm -rf -- "$SCRATCH"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for tool in curl python3; do command -v "$tool" >/dev/null || die "missing $tool"; done
[[ -x $FORKD ]] || die "no forkd binary at $FORKD: build it (cargo build --release) or pass --forkd PATH"
if [[ -e $SCRATCH ]]; then
    [[ -f $SCRATCH/.list-bench ]] || die "$SCRATCH exists and is not a list-bench scratch dir; remove it or pass --dir"
    rm -rf -- "$SCRATCH"
fi
mkdir -p -- "$SCRATCH"
SCRATCH_CREATED=1
touch "$SCRATCH/.list-bench"
SCRATCH=$(cd "$SCRATCH" && pwd)
cp -- "$FORKD" "$SCRATCH/forkd"
FORKD=$SCRATCH/forkd
FORKD_ID="$("$FORKD" --version 2>/dev/null || echo forkd), $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?') ($(git -C "$REPO" rev-parse --abbrev-ref HEAD 2>/dev/null || echo '?'))"

read -r API_PORT NBD_PORT ISCSI_PORT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
API=http://127.0.0.1:$API_PORT
export FORKD_API=$API

start_daemon() {
    "$FORKD" serve --data-dir "$SCRATCH/d" --api "127.0.0.1:$API_PORT" --nbd "127.0.0.1:$NBD_PORT" \
        --iscsi "127.0.0.1:$ISCSI_PORT" --low-space-threshold 0 >>"$SCRATCH/forkd.log" 2>&1 &
    DAEMON_PID=$!
    for ((i = 0; ; i++)); do
        curl -sf -o /dev/null "$API/v1/openapi.json" 2>/dev/null && break
        kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$SCRATCH/forkd.log" >&2; die "forkd serve exited"; }
        ((i < 600)) || die "forkd serve did not answer on $API within 60 s"
        sleep 0.1
    done
}

# api METHOD PATH [CURL ARGS...]: any non-2xx is fatal
api() {
    local m=$1 p=$2 code
    shift 2
    code=$(curl -sS -o "$SCRATCH/body" -w '%{http_code}' -X "$m" "$@" "$API$p") || die "curl $m $p failed"
    [[ $code == 2* ]] || die "$m $p: HTTP $code: $(head -c 300 "$SCRATCH/body")"
}
json() { api "$1" "$2" -H 'Content-Type: application/json' --data-binary "$3"; }
# timed METHOD PATH: curl's %{time_total} in ms
timed() {
    curl -sS -o /dev/null -w '%{time_total}\n' -X "$1" "$API$2" | awk '{printf "%.2f\n", $1 * 1000}'
}
stats() { python3 -c '
import statistics, sys
v = sorted(float(x) for x in sys.stdin.read().split())
p = lambda q: v[min(len(v) - 1, int(q * len(v)))]
print(f"| {sys.argv[1]} | {statistics.median(v):.1f} | {p(0.9):.1f} | {v[0]:.1f} | {v[-1]:.1f} | {len(v)} |")' "$1"; }

start_daemon
log "forkd serve (pid $DAEMON_PID) on $API; $CLONES clones to make"
head -c $((64 << 20)) /dev/urandom >"$SCRATCH/image"
truncate -s 1G "$SCRATCH/image"
"$FORKD" source create db --size 1G >/dev/null
"$FORKD" ingest db --from "$SCRATCH/image" >/dev/null
head -c 4096 /dev/urandom >"$SCRATCH/block"
for ((i = 0; i < CLONES; i++)); do
    json POST /v1/clones "{\"from\":\"db@1\",\"name\":\"c$i\"}"
    # each clone writes a block of its own, spread over the source's 64 MiB
    api PUT "/v1/volumes/c$i/data?offset=$(((i * 4096 * 61) % (64 << 20)))" --data-binary "@$SCRATCH/block"
    ((i % 200 == 199)) && log "$((i + 1)) clones"
done
curl -sS -o /dev/null "$API/v1/volumes"

CLI_MS=()
for ((r = 0; r < RUNS; r++)); do
    t0=$(date +%s%N)
    "$FORKD" list >/dev/null
    CLI_MS+=("$(((($(date +%s%N) - t0) / 10000)))")
done
API_MS=$(for ((r = 0; r < RUNS; r++)); do timed GET /v1/volumes; done)
stop_pid "$DAEMON_PID"
start_daemon
FIRST_MS=$(timed GET /v1/volumes)
stop_pid "$DAEMON_PID"
start_daemon
sleep 2
LATER_MS=$(timed GET /v1/volumes)
log "list timed"

DELETE_LINE="not run (--delete-mib 0)"
READS=""
if ((DELETE_MIB > 0)); then
    json POST /v1/clones '{"from":"db@1","name":"big"}'
    head -c $((64 << 20)) /dev/urandom >"$SCRATCH/chunk"
    for ((m = 0; m < DELETE_MIB; m += 64)); do
        api PUT "/v1/volumes/big/data?offset=$((m << 20))" --data-binary "@$SCRATCH/chunk"
    done
    api POST /v1/volumes/big/flush
    before=$(du -B1 "$SCRATCH/d/extents.0" | cut -f1)
    (while [[ ! -e $SCRATCH/stop ]]; do timed GET "/v1/volumes/c1/data?offset=0&length=4096" >>"$SCRATCH/reads"; done) &
    READER_PID=$!
    sleep 1
    : >"$SCRATCH/reads"
    t0=$(date +%s%N)
    DEL_MS=$(timed DELETE /v1/volumes/big)
    for ((i = 0; i < 600; i++)); do
        now=$(du -B1 "$SCRATCH/d/extents.0" | cut -f1)
        ((before - now >= (DELETE_MIB << 20) * 9 / 10)) && break
        sleep 0.05
    done
    GONE_MS=$((($(date +%s%N) - t0) / 1000000))
    touch "$SCRATCH/stop"
    wait "$READER_PID" || true
    READER_PID=""
    READS=$(stats "reads of c1 from the delete until the space was back" <"$SCRATCH/reads")
    DELETE_LINE="DELETE answered in $DEL_MS ms; extents.0 gave back 90 % of the $DELETE_MIB MiB within $GONE_MS ms of the request (du polled every 50 ms)"
fi

cat <<EOF
## forkd list with $CLONES clones ($FORKD_ID, $(date -u '+%Y-%m-%d %H:%M UTC'))

One source (64 MiB ingested), $CLONES clones of its snapshot, each with one 4 KiB write of its own.

| what (ms) | median | p90 | min | max | runs |
|---|---|---|---|---|---|
$(printf '%s\n' "${CLI_MS[@]}" | awk '{printf "%.1f\n", $1 / 100}' | stats "forkd list (CLI process included)")
$(printf '%s\n' "$API_MS" | stats "GET /v1/volumes (curl time_total)")
| first GET /v1/volumes after a restart, at once | $FIRST_MS | | | | 1 |
| first GET /v1/volumes after a restart, 2 s later | $LATER_MS | | | | 1 |
$([[ -n $READS ]] && printf '%s\n' "$READS")

Delete of a clone holding $DELETE_MIB MiB alone: $DELETE_LINE.
EOF
