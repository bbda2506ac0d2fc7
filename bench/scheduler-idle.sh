#!/usr/bin/env bash
# scheduler-idle.sh: what the scheduler costs a daemon that has nothing to do (issue 12): the CPU
# time and the wakeups of an idle `forkd serve` with 0, 5 and 100 schedules, next to the `cron`
# daemon with 0, 5 and 100 crontab entries, in one run, reported as ratios.
#
# Usage: bench/scheduler-idle.sh            (settings from the environment)
#   WINDOW=S   seconds measured (default 300; WINDOW=60 for a quick look)
#   SETTLE=S   seconds every process idles after its set-up, before the window (default 30)
#   COUNTS="0 5 100"   the schedule / crontab entry counts, one case each
#   FORKD=PATH forkd binary (default target/release/forkd of this workspace)
#   SCRATCH=DIR scratch dir (default /work/bench-scratch-schedidle); created and removed by this
#              script, refused if it exists and is not ours
#   OUT=FILE   the report (default bench/scheduler-results.md when WINDOW >= 300, else none);
#              the hand-written part of an existing report, below the ANALYSIS marker, is kept
#   KEEP=1     keep the scratch dir
#   FORKD_BASELINE=PATH  another forkd binary (e.g. before a change) run through the same cases,
#              in the same window, as "base"
#
# What runs (every case's process at once, so the same window and the same machine noise hit
# every case; they are idle, so they barely compete for the 2 cores):
# - forkd: one `forkd serve` per case, each on its own data dir and free 127.0.0.1 ports, with
#   the default tick (`lease_tick`, 5 s: the lease reaper's and the scheduler's). In every case a
#   1 MiB source `src` is created and fed with `forkd ingest` from a 1 MiB file, then N schedules
#   `forkd schedule add sNNN --cron "0 H * * *" --step "snapshot src"` are added, H being 12
#   hours from now (UTC), so no schedule fires during the run: pure idle overhead.
# - cron (Debian's `cron`, installed with apt-get when missing and we are root): one `cron -f` per
#   case, each in its own private mount namespace (`unshare -m`) where tmpfs hides the host's
#   /etc/cron.d, /var/spool/cron/crontabs and /run (cron's pid file: one cron per namespace) and
#   a bind mount replaces /etc/crontab; /etc/cron.d/forkdbench holds N lines "0 H * * * root
#   /bin/true". The host's cron configuration is never changed; the mounts go with the process.
# - systemd timers: skipped (see the report: they need systemd as PID 1 and their cost lands in
#   PID 1, shared with everything else it does).
# Measured per process over the window (its threads read once a second, so a thread that exits
# counts up to its last reading):
# - CPU: utime + stime from /proc/PID/stat (clock ticks, dead threads included; 10 ms steps), and
#   the sum of /proc/PID/task/*/schedstat's first field (ns on a CPU, exact);
# - wakeups: the sum of voluntary_ctxt_switches (and nonvoluntary) of /proc/PID/task/*/status;
# - threads at the end, how many exited and how many were born during the window.
# Everything is scaled to one hour. Output: a markdown report on stdout and in OUT.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WINDOW=${WINDOW:-300}
SETTLE=${SETTLE:-30}
COUNTS=${COUNTS:-0 5 100}
FORKD=${FORKD:-$REPO/target/release/forkd}
SCRATCH=${SCRATCH:-/work/bench-scratch-schedidle}
KEEP=${KEEP:-0}
BASELINE=${FORKD_BASELINE:-}
if [[ -z ${OUT:-} ]]; then if ((WINDOW >= 300)); then OUT=$REPO/bench/scheduler-results.md; else OUT=/dev/null; fi; fi
MARKER='<!-- ANALYSIS: written by hand after the run; scheduler-idle.sh keeps everything below this line -->'
[[ ${1:-} == -h || ${1:-} == --help ]] && { sed -n '2,38p' "$0"; exit 0; }
(($# == 0)) || { echo "no arguments: settings come from the environment (see --help)" >&2; exit 1; }
[[ $WINDOW =~ ^[0-9]+$ ]] && ((WINDOW >= 10)) || { echo "WINDOW: seconds, at least 10" >&2; exit 1; }
[[ $SETTLE =~ ^[0-9]+$ ]] || { echo "SETTLE: seconds" >&2; exit 1; }
[[ -z $BASELINE || -x $BASELINE ]] || { echo "FORKD_BASELINE: $BASELINE is not an executable" >&2; exit 1; }
for n in $COUNTS; do [[ $n =~ ^[0-9]+$ ]] || { echo "COUNTS: numbers" >&2; exit 1; }; done

log() { printf '[scheduler-idle %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
PIDS=()
SCRATCH_CREATED=0
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh" # stop_pid
cleanup() {
    local rc=$? pid
    set +e
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do stop_pid "$pid" process; done
    if ((SCRATCH_CREATED)); then
        if ((KEEP)); then log "kept scratch dir $SCRATCH"; else rm -rf -- "$SCRATCH"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- checks
command -v python3 >/dev/null || die "python3 is needed (free ports)"
command -v curl >/dev/null || die "curl is needed"
if [[ ! -x $FORKD ]]; then
    log "building forkd ($FORKD is missing)"
    (cd "$REPO" && cargo build --release -p forkd-daemon) || die "cargo build failed"
fi
[[ -r /proc/self/schedstat ]] || die "/proc/PID/schedstat is missing (kernel without CONFIG_SCHED_INFO)"
CRON_STATUS=""
if ! command -v cron >/dev/null && [[ -x /usr/sbin/cron ]]; then PATH=$PATH:/usr/sbin; fi
if ! command -v cron >/dev/null; then
    if ((EUID == 0)) && command -v apt-get >/dev/null; then
        log "installing the cron package (apt-get install cron)"
        apt-get install -y --no-install-recommends cron >/dev/null 2>&1 ||
            { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends cron >/dev/null 2>&1; } ||
            CRON_STATUS="not run: apt-get install cron failed"
        PATH=$PATH:/usr/sbin
    else
        CRON_STATUS="not run: cron is not installed and this script is not root (apt-get install cron)"
    fi
fi
if [[ -z $CRON_STATUS ]] && ((EUID != 0)); then CRON_STATUS="not run: its private mount namespace needs root"; fi
if [[ -z $CRON_STATUS ]] && ! unshare --mount --propagation private true 2>/dev/null; then
    CRON_STATUS="not run: unshare --mount fails here (no CAP_SYS_ADMIN?)"
fi
CRON=0
if [[ -z $CRON_STATUS ]]; then
    CRON=1
    CRON_STATUS="ran: Debian cron $(dpkg-query -W -f '${Version}' cron 2>/dev/null || echo '(version unknown)'), \`cron -f\` in a private mount namespace per case"
fi
PID1=$(cat /proc/1/comm 2>/dev/null || echo '?')
if [[ $PID1 == systemd ]]; then
    SYSTEMD_STATUS="not run: systemd is PID 1 here, but a timer's cost lands in PID 1 (and systemd-journald), shared with everything else they do, so it cannot be told apart from their other work by /proc alone; this script has no systemd case"
else
    SYSTEMD_STATUS="not run: PID 1 is \`$PID1\`, not systemd, so there is no system manager to run timers (systemctl and systemd-run need one); starting a private systemd would need a container of its own and measure far more than timers"
fi
log "cron: $CRON_STATUS"
log "systemd timers: $SYSTEMD_STATUS"

if [[ -e $SCRATCH ]]; then
    [[ -f $SCRATCH/.scheduler-idle ]] || die "$SCRATCH exists and is not a scheduler-idle scratch dir; remove it or set SCRATCH"
    log "removing the leftover scratch dir $SCRATCH"
    rm -rf -- "$SCRATCH"
fi
mkdir -p -- "$SCRATCH"
SCRATCH_CREATED=1
touch "$SCRATCH/.scheduler-idle"
SCRATCH=$(cd "$SCRATCH" && pwd)

# A fire time no case reaches: 12 hours from now, on the hour (UTC). The run lasts minutes.
HOUR=$(((10#$(date -u +%H) + 12) % 24))
CRON_EXPR="0 $HOUR * * *"
log "schedules and crontab entries fire at \`$CRON_EXPR\` (UTC), 11 to 12 hours away"

# ---------------------------------------------------------------- forkd cases
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
CASES=() # "KEY PID": forkd-N, base-N, cron-N
start_forkd() { # LABEL BINARY N: a daemon of BINARY with N schedules, case LABEL-N
    local label=$1 bin=$2 n=$3 dir=$SCRATCH/$1-$3 port api i pid
    mkdir -p "$dir"
    port=$(free_port)
    api=http://127.0.0.1:$port
    "$bin" serve --data-dir "$dir/data" --api "127.0.0.1:$port" --nbd 127.0.0.1:0 \
        --iscsi 127.0.0.1:0 >"$dir/forkd.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    for ((i = 0; ; i++)); do
        curl -sf "$api/v1/volumes" >/dev/null 2>&1 && break
        kill -0 "$pid" 2>/dev/null || { cat "$dir/forkd.log" >&2; die "forkd serve ($n schedules) exited"; }
        ((i < 300)) || die "forkd serve did not answer on $api within 30 s"
        sleep 0.1
    done
    # Every case has the source, so the cases differ only in their schedules.
    local f=(env -u FORKD_API -u FORKD_TOKEN "$bin" --api "$api") got
    head -c 1048576 /dev/urandom >"$dir/src.img"
    "${f[@]}" source create src --size 1M >/dev/null
    "${f[@]}" ingest src --from "$dir/src.img" >/dev/null
    for ((i = 1; i <= n; i++)); do
        "${f[@]}" schedule add "$(printf 's%03d' "$i")" --cron "$CRON_EXPR" --step "snapshot src" >/dev/null
    done
    got=$(curl -sf "$api/v1/schedules" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["schedules"]))')
    [[ $got == "$n" ]] || die "forkd ($n schedules) lists $got schedules"
    CASES+=("$label-$n $pid")
    log "$label: forkd serve pid $pid ($bin): $n schedules, API $api"
}

# ---------------------------------------------------------------- cron cases
cat >"$SCRATCH/cron-ns.sh" <<'EOF'
# Runs inside `unshare --mount --propagation private`: hide the host's cron configuration behind
# this case's own, then become cron. Nothing here is seen outside the namespace.
set -euo pipefail
dir=$1
mount -t tmpfs -o mode=755 forkdbench /etc/cron.d
install -m 644 -o root -g root "$dir/entries" /etc/cron.d/forkdbench
mount --bind "$dir/crontab" /etc/crontab
mount -t tmpfs -o mode=1730 forkdbench /var/spool/cron/crontabs
chgrp crontab /var/spool/cron/crontabs 2>/dev/null || true
mount -t tmpfs -o mode=755 forkdbench /run
exec cron -f
EOF
start_cron() { # N: a cron with N entries, case cron-N
    local n=$1 dir=$SCRATCH/cron-$1 i pid
    mkdir -p "$dir"
    printf 'SHELL=/bin/sh\nPATH=/usr/bin:/bin\n' >"$dir/crontab"
    : >"$dir/entries"
    for ((i = 1; i <= n; i++)); do echo "$CRON_EXPR root /bin/true" >>"$dir/entries"; done
    unshare --mount --propagation private bash "$SCRATCH/cron-ns.sh" "$dir" >"$dir/cron.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    for ((i = 0; ; i++)); do
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == cron ]] && break
        kill -0 "$pid" 2>/dev/null || { cat "$dir/cron.log" >&2; die "cron ($n entries) exited"; }
        ((i < 100)) || die "cron ($n entries) did not start within 10 s"
        sleep 0.1
    done
    CASES+=("cron-$n $pid")
    log "cron -f pid $pid: $n entries"
}

for n in $COUNTS; do start_forkd forkd "$FORKD" "$n"; done
if [[ -n $BASELINE ]]; then for n in $COUNTS; do start_forkd base "$BASELINE" "$n"; done; fi
if ((CRON)); then for n in $COUNTS; do start_cron "$n"; done; fi

# ---------------------------------------------------------------- sampling
# One poller reads every case's threads once a second over the window and keeps each thread's
# first and last reading, so a thread that exits mid-window still counts up to its last second
# (a sum of /proc/PID/task/* read only at both ends would lose it). Reading /proc does not wake
# the processes read.
cat >"$SCRATCH/measure.py" <<'EOF'
import os, sys, time

window, hz = float(sys.argv[1]), os.sysconf("SC_CLK_TCK")
cases = [a.split("=") for a in sys.argv[2:]]

def stat_ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])  # utime, stime: fields 14 and 15, dead threads included

def threads(pid):
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            ns = int(open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[0])
            st = dict(l.split(":", 1) for l in open(f"/proc/{pid}/task/{tid}/status") if ":" in l)
            out[tid] = (ns, int(st["voluntary_ctxt_switches"]), int(st["nonvoluntary_ctxt_switches"]))
        except (FileNotFoundError, ProcessLookupError, KeyError):
            pass  # exited while being read
    return out

def machine():
    f = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    u, n, s, i, w, q, sq, st = f
    return u + n + s + q + sq + st, sum(f), st

m0, t0 = machine(), time.monotonic()
first = {k: threads(p) for k, p in cases}
last = {k: dict(v) for k, v in first.items()}
born = {k: set() for k, _ in cases}
ticks0 = {k: stat_ticks(p) for k, p in cases}
end = t0 + window
while (now := time.monotonic()) < end:
    time.sleep(min(1.0, end - now))
    for k, p in cases:
        for tid, v in threads(p).items():
            if tid not in first[k]:
                born[k].add(tid)  # its counters started at 0 within the window
            last[k][tid] = v
ticks1 = {k: stat_ticks(p) for k, p in cases}
elapsed, m1 = time.monotonic() - t0, machine()
print(f"elapsed {elapsed:.3f}")
print("machine " + " ".join(str(b - a) for a, b in zip(m0, m1)))
for k, p in cases:
    alive = set(threads(p))
    zero = (0, 0, 0)
    d = [sum(last[k][t][i] - first[k].get(t, zero)[i] for t in last[k]) for i in range(3)]
    gone = len(set(last[k]) - alive)
    print(f"case {k} {ticks1[k] - ticks0[k]} {d[0]} {d[1]} {d[2]} {len(alive)} {gone} {len(born[k])}")
EOF
cat >"$SCRATCH/table.py" <<'EOF'
import sys
hz, counts, base_ran = int(sys.argv[1]), sys.argv[2].split(), sys.argv[3] == "1"
D, elapsed, mach = {}, 0.0, None
for line in open(sys.argv[4]):
    f = line.split()
    if f[0] == "elapsed": elapsed = float(f[1])
    elif f[0] == "machine": mach = [int(x) for x in f[1:]]
    elif f[0] == "case":
        t, ns, vol, nonvol, alive, gone, new = (int(x) for x in f[2:])
        D[f[1]] = {"stat": t / hz, "sched": ns / 1e9, "vol": vol, "nonvol": nonvol, "alive": alive, "gone": gone, "new": new}
per_h = 3600.0 / elapsed
for d in D.values():
    for k in ("stat", "sched", "vol", "nonvol"): d[k] *= per_h
cron = any(k.startswith("cron-") for k in D)

def ratio(a, b):
    if b <= 0: return "n/a (0)"
    r = a / b
    return f"{r:.0f}x" if r >= 10 else f"{r:.2f}x"

def cell(key, field):
    d = D.get(key)
    if d is None: return "not run"
    return f"{d[field] * 1000:.1f}" if field in ("stat", "sched") else f"{d[field]:.0f}"

print(f"Window: {elapsed:.1f} s, scaled to one hour (x {per_h:.2f}). CPU in **CPU-milliseconds per hour**: "
      "`sched` is the sum over threads of /proc/PID/task/TID/schedstat (ns on a CPU, exact; threads "
      "read every second, so one that exits still counts), `stat` is utime+stime from /proc/PID/stat "
      f"(whole process, in 10 ms clock ticks: one tick in the window is {1000 / hz * per_h:.0f} ms/h here). "
      "Wakeups: voluntary context switches of all threads (a thread that blocked and was woken), per hour.\n")
rows = [("forkd", "forkd")] + ([("base", "forkd baseline")] if base_ran else [])
hdr = "| case | CPU ms/h (sched) | CPU ms/h (stat) | / cron CPU | wakeups/h | / cron wakeups | involuntary switches/h | threads (exited, new) |"
print(hdr)
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for n in counts:
    c = D.get(f"cron-{n}")
    for label, name in rows + ([("cron", "cron")] if cron else []):
        d = D[f"{label}-{n}"]
        rc = ratio(d["sched"], c["sched"]) if c and label != "cron" else ""
        rw = ratio(d["vol"], c["vol"]) if c and label != "cron" else ""
        print(f"| {name}, {n} {'entries' if label == 'cron' else 'schedules'} | {cell(f'{label}-{n}', 'sched')} | "
              f"{cell(f'{label}-{n}', 'stat')} | {rc} | {cell(f'{label}-{n}', 'vol')} | {rw} | "
              f"{cell(f'{label}-{n}', 'nonvol')} | {d['alive']} ({d['gone']}, {d['new']}) |")
print()
print(f"Growth with the number of schedules or entries (same run, CPU from `sched`):\n")
names = [name for _, name in rows] + (["cron"] if cron else [])
print("| | " + " | ".join(f"{n} CPU | {n} wakeups" for n in names) + " |")
print("|---|" + "---:|---:|" * len(names))
b = counts[0]
labels = [l for l, _ in rows] + (["cron"] if cron else [])
for n in counts[1:]:
    cells = []
    for l in labels:
        cells += [ratio(D[f"{l}-{n}"]["sched"], D[f"{l}-{b}"]["sched"]), ratio(D[f"{l}-{n}"]["vol"], D[f"{l}-{b}"]["vol"])]
    print(f"| {n} vs {b} | " + " | ".join(cells) + " |")
hi = counts[-1]
if int(hi) > int(b):
    print()
    for l, name in zip(labels, names):
        per = (D[f"{l}-{hi}"]["sched"] - D[f"{l}-{b}"]["sched"]) / (int(hi) - int(b))
        print(f"- {name}: {per * 1000:.3f} CPU-ms per hour per {'entry' if l == 'cron' else 'schedule'} (from {b} to {hi}).")
if base_ran:
    print()
    for n in counts:
        print(f"- forkd / forkd baseline, {n} schedules: CPU {ratio(D[f'forkd-{n}']['sched'], D[f'base-{n}']['sched'])}, "
              f"wakeups {ratio(D[f'forkd-{n}']['vol'], D[f'base-{n}']['vol'])}.")
busy, total, steal = mach
ours = sum(d["stat"] for d in D.values()) / per_h * hz
print(f"\nMachine during the window: other processes kept {max(busy - ours - steal, 0) / (elapsed * hz):.2f} "
      f"of {total / (elapsed * hz):.0f} cores busy, hypervisor steal {steal / (elapsed * hz):.3f} cores.")
EOF

log "settling for $SETTLE s"
sleep "$SETTLE"
log "measuring for $WINDOW s (ends at $(date -d "+$WINDOW sec" +%H:%M:%S))"
args=()
for c in "${CASES[@]}"; do args+=("${c% *}=${c#* }"); done
python3 "$SCRATCH/measure.py" "$WINDOW" "${args[@]}" >"$SCRATCH/samples.txt"
for c in "${CASES[@]}"; do kill -0 "${c#* }" 2>/dev/null || die "${c% *} (pid ${c#* }) died during the window"; done

# ---------------------------------------------------------------- report
HZ=$(getconf CLK_TCK)
REPORT=$SCRATCH/report.md
# shellcheck disable=SC2086 # one word per count
COUNT_WORDS=$(python3 -c 'import sys; a = sys.argv[1:]; print(", ".join(a[:-1]) + " and " + a[-1] if len(a) > 1 else a[0])' $COUNTS)
python3 "$SCRATCH/table.py" "$HZ" "$COUNTS" "$([[ -n $BASELINE ]] && echo 1 || echo 0)" "$SCRATCH/samples.txt" >"$SCRATCH/table.md"

HEAD=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$REPO" status --porcelain -- daemon catalog blockmap 2>/dev/null | grep -q . && echo " plus uncommitted edits" || true)
{
    echo "# Scheduler overhead on an idle daemon (issue 12)"
    echo
    echo "\`bench/scheduler-idle.sh\` (WINDOW=$WINDOW SETTLE=$SETTLE COUNTS=\"$COUNTS\"), $(date -u +%Y-%m-%dT%H:%MZ),"
    echo "workspace at \`$HEAD\`$DIRTY. Machine: $(nproc) vCPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')),"
    echo "kernel $(uname -r), CLK_TCK $HZ."
    echo
    echo "## What was measured"
    echo
    echo "${#CASES[@]} idle processes at once, measured over the same window after $SETTLE s of settling:"
    echo
    echo "- **forkd**: \`forkd serve\` (release build) on its own data dir, default tick (\`lease_tick\` 5 s,"
    echo "  shared by the lease reaper and the scheduler; the periodic flush ticks every 5 s too), with"
    echo "  $COUNT_WORDS schedules \`--cron \"$CRON_EXPR\" --step \"snapshot src\"\` on a 1 MiB source fed by"
    echo "  \`forkd ingest\` (every case has the source, so the cases differ only in their schedules). No"
    echo "  schedule is due during the run: this is pure idle overhead."
    if [[ -n $BASELINE ]]; then
        echo "- **forkd baseline**: the same cases with \`$BASELINE\` ($("$BASELINE" --version 2>/dev/null || echo 'version unknown'))."
    fi
    echo "- **cron**: $CRON_STATUS, with $COUNT_WORDS lines \`$CRON_EXPR root /bin/true\` in"
    echo "  /etc/cron.d/forkdbench (the host's /etc/crontab, /etc/cron.d and spool hidden in that namespace)."
    echo "- **systemd timers**: $SYSTEMD_STATUS."
    echo "- **not a peer**: an idle \`sleep infinity\` (it never wakes: 0 by construction)."
    echo
    echo "CPU is the process's whole CPU time (every thread: tokio workers, the blocking pool, the timer), so"
    echo "forkd's figure is the idle daemon's, of which the scheduler's tick is one part."
    echo
    echo "## Results"
    echo
    cat "$SCRATCH/table.md"
    echo
} >"$REPORT"
cat "$REPORT"
if [[ $OUT != /dev/null ]]; then
    {
        cat "$REPORT"
        echo "$MARKER"
        if [[ -f $OUT ]] && grep -qF -- "$MARKER" "$OUT"; then
            awk -v m="$MARKER" 'kept; $0 == m { kept = 1 }' "$OUT"
        fi
    } >"$OUT.tmp"
    mv "$OUT.tmp" "$OUT"
    log "report written to $OUT"
fi
