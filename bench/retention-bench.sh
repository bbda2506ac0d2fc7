#!/usr/bin/env bash
# Retention's cost at 100,000 snapshots (issue 12), in one run:
# - forkd, snapshots under their own keys (this tree): forkd-bench-retention to 100,000
#   snapshots, timed windows at 1k, 10k, 20k and 100k existing, the plan, one prune commit;
# - forkd before (OLD_COMMIT, snapshots inside the volume's record): the same bench file built
#   from that commit in a temporary worktree, to 20,000 snapshots (the old layout writes
#   O(N) bytes per snapshot: 100,000 would write about 1 TB);
# - btrfs (when it can be loop-mounted): read-only subvolume snapshots of one subvolume to
#   10,000, the same windows, then all but 30 deleted, and the cleaner waited for.
# Results: JSON in the scratch dir, a summary on stdout; bench/retention-results.md quotes them.
#
# Usage: bench/retention-bench.sh [--scratch DIR] [--old-commit REV | --old-bin PATH]
#        [--forkd-snapshots N] [--old-snapshots N] [--btrfs-snapshots N] [--no-btrfs]
# The old commit is built in a worktree with its OWN target dir (seeded with a copy of this
# tree's target/release, so only the workspace crates compile): cargo names a path package's
# artifacts without its directory, so a shared target dir would link one tree's catalog into
# the other's binaries. --old-bin skips that with a binary built before.
# Needs root for btrfs (mkfs.btrfs, mount -o loop). Runs in about 5 to 10 minutes.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCRATCH=/work/retention-bench-scratch
OLD_COMMIT=c3460e3
NEW_N=100000
OLD_N=20000
BTRFS_N=10000
BTRFS=1
WINDOW=200
OLD_BIN=
while [ $# -gt 0 ]; do
    case "$1" in
        --scratch) SCRATCH=$2; shift 2 ;;
        --old-commit) OLD_COMMIT=$2; shift 2 ;;
        --old-bin) OLD_BIN=$2; shift 2 ;;
        --forkd-snapshots) NEW_N=$2; shift 2 ;;
        --old-snapshots) OLD_N=$2; shift 2 ;;
        --btrfs-snapshots) BTRFS_N=$2; shift 2 ;;
        --no-btrfs) BTRFS=0; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
log() { echo "[$(date +%T)] $*" >&2; }

OLD_TREE=$SCRATCH/old-tree
cleanup() {
    if mountpoint -q "$SCRATCH/btrfs" 2>/dev/null; then umount "$SCRATCH/btrfs"; fi
    if [ -d "$OLD_TREE" ]; then git -C "$ROOT" worktree remove --force "$OLD_TREE" || true; fi
}
trap cleanup EXIT
mkdir -p "$SCRATCH"

# ---- machine
{
    echo "date: $(date -u +%FT%TZ)"
    echo "kernel: $(uname -r)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    echo "memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
    echo "scratch file system: $(df -T "$SCRATCH" | awk 'NR==2 {print $2, $1}')"
} | tee "$SCRATCH/machine.txt" >&2

# ---- build: this tree, and the old commit in a worktree sharing the target dir
log "building forkd-bench-retention"
(cd "$ROOT" && cargo build --release -q -p forkd-bench --bin forkd-bench-retention)
NEW_BIN=$ROOT/target/release/forkd-bench-retention
if [ -z "$OLD_BIN" ]; then
    log "building the same bench at $OLD_COMMIT"
    git -C "$ROOT" worktree add --detach "$OLD_TREE" "$OLD_COMMIT" >/dev/null 2>&1
    cp "$ROOT/bench/src/bin/retention.rs" "$OLD_TREE/bench/src/bin/retention.rs"
    printf '\n[[bin]]\nname = "forkd-bench-retention-old"\npath = "src/bin/retention.rs"\n' >>"$OLD_TREE/bench/Cargo.toml"
    mkdir -p "$SCRATCH/old-target"
    [ -d "$SCRATCH/old-target/release" ] || cp -a "$ROOT/target/release" "$SCRATCH/old-target/"
    find "$OLD_TREE" -name '*.rs' -print0 | xargs -0 touch
    (cd "$OLD_TREE" && CARGO_TARGET_DIR=$SCRATCH/old-target cargo build --release -q -p forkd-bench --bin forkd-bench-retention-old)
    OLD_BIN=$SCRATCH/old-target/release/forkd-bench-retention-old
fi

# ---- forkd, both layouts
log "forkd (snapshot keys): $NEW_N snapshots"
"$NEW_BIN" --dir "$SCRATCH/new" --snapshots "$NEW_N" --marks 1000,10000,20000,100000 --window "$WINDOW" \
    --out "$SCRATCH/forkd-new.json" >"$SCRATCH/forkd-new.txt"
log "forkd (before, $OLD_COMMIT): $OLD_N snapshots"
"$OLD_BIN" --dir "$SCRATCH/old" --snapshots "$OLD_N" --marks 1000,10000,20000 --window "$WINDOW" \
    --out "$SCRATCH/forkd-old.json" >"$SCRATCH/forkd-old.txt"

# ---- btrfs
BTRFS_STATUS="not run"
if [ "$BTRFS" = 1 ] && grep -qw btrfs /proc/filesystems && command -v mkfs.btrfs >/dev/null; then
    mkdir -p "$SCRATCH/btrfs"
    rm -f "$SCRATCH/btrfs.img"
    truncate -s 8G "$SCRATCH/btrfs.img"
    if mkfs.btrfs -q "$SCRATCH/btrfs.img" >"$SCRATCH/mkfs.log" 2>&1 && mount -o loop "$SCRATCH/btrfs.img" "$SCRATCH/btrfs"; then
        BTRFS_STATUS="ran: btrfs $(uname -r), btrfs-progs $(btrfs --version | awk '{print $2}'), on a loop device over a sparse file in the scratch dir"
        log "btrfs: $BTRFS_N read-only snapshots"
        python3 - "$SCRATCH/btrfs" "$BTRFS_N" "$WINDOW" >"$SCRATCH/btrfs.json" <<'PY'
import fcntl, json, os, struct, subprocess, sys, time
mnt, n, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
SNAP_CREATE_V2 = 0x50009417   # _IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2), 4096 bytes
SNAP_DESTROY = 0x5000940F     # _IOW(0x94, 15, struct btrfs_ioctl_vol_args), 4096 bytes
RDONLY = 1 << 1
subprocess.run(["btrfs", "-q", "subvolume", "create", f"{mnt}/src"], check=True)
with open(f"{mnt}/src/disk.img", "wb") as f:   # 64 KiB of data, like forkd's 16 blocks
    f.write(os.urandom(65536)); os.fsync(f.fileno())
os.makedirs(f"{mnt}/snaps")
src = os.open(f"{mnt}/src", os.O_RDONLY | os.O_DIRECTORY)
snaps = os.open(f"{mnt}/snaps", os.O_RDONLY | os.O_DIRECTORY)
def create(i):
    buf = bytearray(4096)
    struct.pack_into("<qQQ", buf, 0, src, 0, RDONLY)
    name = f"s{i}".encode(); buf[56:56 + len(name)] = name
    fcntl.ioctl(snaps, SNAP_CREATE_V2, buf)
def destroy(i):
    buf = bytearray(4096)
    name = f"s{i}".encode(); buf[8:8 + len(name)] = name
    fcntl.ioctl(snaps, SNAP_DESTROY, buf)
out = {"snapshots": n, "windows": []}
made, t0 = 0, time.monotonic()
for mark in [m for m in (1000, 10000, 20000, 100000) if m <= n]:
    while made < mark:
        create(made); made += 1
    times = []
    for _ in range(window):
        t = time.monotonic(); create(made); made += 1; times.append((time.monotonic() - t) * 1e6)
    times.sort()
    out["windows"].append({"existing": mark, "snapshot_us_mean": sum(times) / len(times),
                           "snapshot_us_p99": times[round((len(times) - 1) * 0.99)]})
out["build_seconds"] = time.monotonic() - t0
out["snapshots"] = made
keep = 30
t = time.monotonic()
for i in range(made - keep):
    destroy(i)
out["delete_count"] = made - keep
out["delete_seconds"] = time.monotonic() - t
t = time.monotonic()
subprocess.run(["btrfs", "-q", "subvolume", "sync", mnt], check=True)
out["cleaner_seconds"] = time.monotonic() - t
print(json.dumps(out, indent=1))
PY
    else
        BTRFS_STATUS="not run: mkfs.btrfs or mount -o loop failed: $(tail -1 "$SCRATCH/mkfs.log")"
    fi
elif [ "$BTRFS" = 1 ]; then
    BTRFS_STATUS="not run: btrfs or mkfs.btrfs missing"
fi
echo "btrfs: $BTRFS_STATUS" | tee -a "$SCRATCH/machine.txt" >&2

# ---- summary: before/after and btrfs ratios at the same numbers of existing snapshots
python3 - "$SCRATCH" <<'PY'
import json, os, sys
d = sys.argv[1]
load = lambda n: json.load(open(f"{d}/{n}")) if os.path.exists(f"{d}/{n}") else None
new, old, bt = load("forkd-new.json"), load("forkd-old.json"), load("btrfs.json")
by = lambda r: {w["existing"]: w for w in (r or {}).get("windows", [])}
n, o, b = by(new), by(old), by(bt)
print("| existing | forkd snapshot (catalog) | durable | engine B/snap | disk B/snap | before: catalog | durable | engine B/snap | disk B/snap | btrfs snapshot |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
f = lambda w, k, fmt="{:.0f}": fmt.format(w[k]) if w and k in w else "-"
for m in sorted(n):
    print(f"| {m} | {f(n[m],'snapshot_us_mean')} us | {f(n[m],'snapshot_durable_us_mean')} us | {f(n[m],'engine_bytes_per_snapshot')} "
          f"| {f(n[m],'disk_bytes_per_snapshot')} | {f(o.get(m),'snapshot_us_mean')} us | {f(o.get(m),'snapshot_durable_us_mean')} us "
          f"| {f(o.get(m),'engine_bytes_per_snapshot')} | {f(o.get(m),'disk_bytes_per_snapshot')} | {f(b.get(m),'snapshot_us_mean')} us |")
for m in sorted(set(n) & set(o)):
    r = lambda k: o[m][k] / n[m][k] if n[m][k] else float("nan")
    print(f"before/after at {m}: catalog {r('snapshot_us_mean'):.1f}x, durable {r('snapshot_durable_us_mean'):.2f}x, "
          f"engine bytes {r('engine_bytes_per_snapshot'):.0f}x, disk bytes {r('disk_bytes_per_snapshot'):.1f}x")
for m in sorted(set(n) & set(b)):
    print(f"btrfs/forkd at {m}: snapshot (durable) {b[m]['snapshot_us_mean'] / n[m]['snapshot_durable_us_mean']:.2f}x")
for name, r in (("forkd", new), ("before", old)):
    if r:
        print(f"{name}: {r['snapshots']} snapshots built in {r['build_seconds']:.1f} s; open {r['open_ms']:.0f} ms; "
              f"plan (real times) {r['plan']['plan_real_times_ms']:.1f} ms, (15 min apart) {r['plan']['plan_15min_apart_ms']:.1f} ms; "
              f"prune_plan {r['prune_plan_ms']:.1f} ms; set rules {r['set_retention_durable_ms']:.1f} ms; "
              f"prune of {r['prune_deleted']}: commit {r['prune_commit_ms']:.0f} ms, durable {r['prune_durable_ms']:.0f} ms, "
              f"{r['prune_engine_bytes']} engine bytes; meta/ after {r['meta_bytes_after']} B; RSS: peak building "
              f"{r.get('peak_rss_building_kib', '-')} KiB, reopened {r.get('rss_after_open_kib', '-')} KiB, peak {r['peak_rss_kib']} KiB")
if bt:
    print(f"btrfs: {bt['snapshots']} snapshots in {bt['build_seconds']:.1f} s; deleting {bt['delete_count']}: "
          f"{bt['delete_seconds']:.1f} s, cleaner {bt['cleaner_seconds']:.1f} s more")
PY
