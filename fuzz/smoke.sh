#!/usr/bin/env bash
# Fuzz smoke test: builds every cargo-fuzz target once, then runs each for SECONDS (default 30)
# on stable Rust without sanitizers (`-s none`, debug assertions on), starting from the checked-in
# corpus. Exits non-zero on the first target that crashes, leaks, times out or fails to build, and
# prints the path of the crashing input. SECONDS=0 only replays the corpus.
#
#   fuzz/smoke.sh [SECONDS]
#
# Bounded: the build gets FUZZ_BUILD_TIMEOUT seconds (default 1800), each run SECONDS + 120.
# New corpus entries and artifacts go to a temporary directory (FUZZ_OUT to keep them), never
# into fuzz/corpus/.
set -euo pipefail

secs="${1:-30}"
case "$secs" in
    '' | *[!0-9]*)
        echo "usage: $0 [SECONDS]" >&2
        exit 2
        ;;
esac
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "smoke: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

out="${FUZZ_OUT:-$(mktemp -d -t vsock-fuzz.XXXXXX)}"
mkdir -p "$out"
echo "smoke: output in $out"

build_timeout="${FUZZ_BUILD_TIMEOUT:-1800}"
if ! timeout "$build_timeout" cargo fuzz build -s none -a; then
    echo "smoke: FAILED to build the fuzz targets" >&2
    exit 1
fi

mapfile -t targets < <(cargo fuzz list)
if [ "${#targets[@]}" -eq 0 ]; then
    echo "smoke: no fuzz targets" >&2
    exit 1
fi

status=0
for t in "${targets[@]}"; do
    corpus="$out/corpus/$t"
    artifacts="$out/artifacts/$t/"
    mkdir -p "$corpus" "$artifacts"
    if [ "$secs" -eq 0 ]; then
        limit=(-runs=0)
    else
        limit=(-max_total_time="$secs")
    fi
    # Per-input limits: the device target runs real sockets and real-time timers, the others are
    # pure.
    # Its inputs are programs of up to 32 steps: allow their full length from the start.
    per_input=5
    extra=()
    if [ "$t" = device ]; then
        per_input=20
        extra=(-len_control=0 -max_len=512)
    fi
    log="$out/$t.log"
    echo "smoke: $t for ${secs}s"
    set +e
    timeout $((secs + 120)) cargo fuzz run -s none -a "$t" "$corpus" "corpus/$t" -- \
        "${limit[@]}" "${extra[@]}" -timeout="$per_input" -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts" >"$log" 2>&1
    rc=$?
    set -e
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
    crash=$(find "$artifacts" -type f | head -n1)
    if [ "$rc" -ne 0 ] || [ -n "$crash" ]; then
        echo "smoke: $t FAILED (exit $rc) after ${runs:-?} runs; log $log" >&2
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | head -n 5 >&2 || true
        if [ -n "$crash" ]; then
            echo "smoke: $t crash input: $crash" >&2
            echo "smoke: reproduce: (cd $here && cargo fuzz run -s none -a $t $crash)" >&2
        fi
        status=1
    else
        echo "smoke: $t ok: ${runs:-?} runs, ${rate:-?} exec/s"
    fi
done
exit "$status"
