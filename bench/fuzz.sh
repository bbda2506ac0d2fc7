#!/usr/bin/env bash
# fuzz.sh: issue 15, item 5: runs every cargo-fuzz target of fuzz/ for SECONDS each, one after
# another (the machine may be shared: never two at once), and reports executions and crashes
# per target. What each target covers: bench/FUZZ.md.
#
# Usage: bash bench/fuzz.sh [SECONDS] [TARGET...]
#   SECONDS   seconds per target (default 60)
#   TARGET    only these targets (default all of `cargo fuzz list`)
# Environment:
#   FUZZ_SECONDS_<TARGET>  seconds for one target, overriding SECONDS (e.g. FUZZ_SECONDS_api_bodies=300)
#   SANITIZER  cargo-fuzz --sanitizer (default none: the fuzzed crates forbid unsafe code, so
#              address sanitizing finds nothing a panic would not and costs half the speed;
#              SANITIZER=address to use it)
#   JOBS       libFuzzer -fork jobs per target (default 1)
#   RESULTS    output file (default bench/fuzz-results.md)
# Each target runs `cargo +nightly fuzz run TARGET fuzz/target/corpus/TARGET fuzz/corpus/TARGET
# -- -max_total_time=SECONDS -print_final_stats=1`: new inputs go to the ignored work corpus, the
# committed seeds stay as they are. Crash inputs land in fuzz/artifacts/TARGET/ (ignored; a
# crash worth keeping is copied to fuzz/artifacts-found/).
set -uo pipefail

cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
shift || true
SANITIZER=${SANITIZER:-none}
RESULTS=${RESULTS:-bench/fuzz-results.md}
LOGS=fuzz/target/logs
mkdir -p "$LOGS"

if [ $# -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(cd fuzz && cargo +nightly fuzz list)
fi

echo "building ${TARGETS[*]} (sanitizer $SANITIZER)" >&2
(cd fuzz && cargo +nightly fuzz build --sanitizer "$SANITIZER" >"../$LOGS/build.log" 2>&1) || {
    echo "build failed: $LOGS/build.log" >&2
    tail -30 "$LOGS/build.log" >&2
    exit 1
}

rows=()
total_crashes=0
for t in "${TARGETS[@]}"; do
    var="FUZZ_SECONDS_$t"
    secs=${!var:-$SECONDS_EACH}
    mkdir -p "fuzz/target/corpus/$t" "fuzz/corpus/$t"
    log="$LOGS/$t.log"
    extra=()
    # A data frame of one block is 4113 bytes; longer inputs only slow the frame target down.
    [ "$t" = ingest_frames ] && extra=(-max_len=4200)
    echo "fuzzing $t for ${secs}s" >&2
    start=$(date +%s)
    (cd fuzz && cargo +nightly fuzz run --sanitizer "$SANITIZER" "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 "${extra[@]}") >"$log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
    if [ -z "$execs" ]; then
        # A crash ends the run before the final stats: the last status line has the count.
        execs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')
    fi
    crashes=$(grep -c 'Test unit written to' "$log")
    corpus=$(find "fuzz/target/corpus/$t" -type f | wc -l)
    note=""
    if [ "$crashes" -gt 0 ] || [ "$rc" -ne 0 ]; then
        what=$(grep -m1 -E "panicked at|ERROR: (libFuzzer|AddressSanitizer)" "$log" | cut -c1-160)
        where=$(grep -m1 -o 'Test unit written to [^ ]*' "$log" | sed 's/Test unit written to //')
        note="exit $rc; ${what:-see $log}${where:+; input $where}"
        [ "$crashes" -eq 0 ] && crashes=1
    fi
    total_crashes=$((total_crashes + crashes))
    rows+=("| \`$t\` | ${execs:-?} | $took | $crashes | $corpus | $note |")
    echo "  $t: ${execs:-?} executions in ${took}s, $crashes crashes" >&2
done

{
    echo "# Fuzzing results"
    echo
    overrides=$(env | grep '^FUZZ_SECONDS_' | sort | tr '\n' ' ')
    echo "\`${overrides}bash bench/fuzz.sh $SECONDS_EACH ${*:-}\` on $(date -u +%Y-%m-%d), $(nproc) cores (shared), sanitizer \`$SANITIZER\`,"
    echo "$(cargo +nightly --version 2>/dev/null | cut -d' ' -f1-2), $(cargo fuzz --version 2>/dev/null). Method and targets: bench/FUZZ.md."
    echo "Seconds are wall time including start-up; corpus is the work corpus's size afterwards."
    echo
    echo "| target | executions | seconds | crashes | corpus | note |"
    echo "|---|---:|---:|---:|---:|---|"
    printf '%s\n' "${rows[@]}"
} >"$RESULTS.new"
if [ -n "${APPEND_NOTES:-}" ] && [ -f "$APPEND_NOTES" ]; then
    { echo; cat "$APPEND_NOTES"; } >>"$RESULTS.new"
fi
mv "$RESULTS.new" "$RESULTS"
cat "$RESULTS"
[ "$total_crashes" -eq 0 ]
