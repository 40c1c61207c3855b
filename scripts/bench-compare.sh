#!/usr/bin/env bash
# Compares the device benchmark (examples/bench) of a revision with the working tree's: builds
# REV (from `git archive`, in a temporary directory) in its own target directory, builds the
# working tree, then runs the two binaries interleaved (REV, tree, REV, tree, ...) on the same
# workloads, one run of each workload per invocation, and prints per workload the median of
# each side and the ratio tree / REV (above 1: the tree is faster; for device CPU per GiB, below
# 1: the tree is cheaper). See docs/performance.md.
#
#   scripts/bench-compare.sh [--quick] [--rounds N] [--mib N] [--only PAT,...] [--pin D,R] REV
#
#   --quick      small sizes (the benchmark's --quick) and 3 rounds: about a minute or two
#   --rounds N   invocations of each binary (default 5; --quick: 3)
#   --mib N      passed to the benchmark
#   --only PATS  passed to the benchmark (comma-separated name substrings; see `--list`)
#   --pin D,R    passed to the benchmark: device threads on CPU D, the rest on CPU R (steadier
#                figures; REV's benchmark must know --pin)
#
# REV must contain examples/bench (a revision before it has no benchmark to compare: the script
# says so and exits 2). REV's build goes to $BENCH_COMPARE_TARGET (default
# target/bench-compare, kept between invocations so that only the crate itself is rebuilt);
# the unpacked source goes to a temporary directory removed on exit. The working tree builds
# into its usual target directory. The temporary copy of each binary is what runs, so a build
# during the comparison does not change it.
set -euo pipefail

usage() {
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

quick=0
rounds=
mib=
only=
pin=
rev=
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --rounds) rounds=${2:?--rounds needs a value}; shift ;;
        --mib) mib=${2:?--mib needs a value}; shift ;;
        --only) only=${2:?--only needs a value}; shift ;;
        --pin) pin=${2:?--pin needs a value}; shift ;;
        -h|--help) usage ;;
        -*) echo "bench-compare: unknown option $1" >&2; usage ;;
        *) [ -z "$rev" ] || usage; rev=$1 ;;
    esac
    shift
done
[ -n "$rev" ] || usage
if [ -z "$rounds" ]; then
    if [ "$quick" = 1 ]; then rounds=3; else rounds=5; fi
fi
case "$rounds" in ''|*[!0-9]*) echo "bench-compare: --rounds must be a number" >&2; exit 2 ;; esac
if [ "$rounds" -lt 1 ] || [ "$rounds" -gt 50 ]; then
    echo "bench-compare: --rounds must be in 1..50" >&2
    exit 2
fi

root=$(git rev-parse --show-toplevel)
cd "$root"
commit=$(git rev-parse --verify --quiet "$rev^{commit}") || {
    echo "bench-compare: $rev is not a revision of this repository" >&2
    exit 2
}
if ! git cat-file -e "$commit:examples/bench/main.rs" 2>/dev/null; then
    echo "bench-compare: $rev ($(git rev-parse --short "$commit")) has no examples/bench;" \
        "compare against a revision that has the benchmark" >&2
    exit 2
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-compare.XXXXXX")
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

target=${BENCH_COMPARE_TARGET:-$root/target/bench-compare}
short=$(git rev-parse --short "$commit")
echo "== building $rev ($short) in $target"
mkdir -p "$tmp/src"
git archive "$commit" | tar -x -C "$tmp/src"
(cd "$tmp/src" && CARGO_TARGET_DIR="$target" cargo build --quiet --release -p vsock-router --example bench)
cp "$target/release/examples/bench" "$tmp/A"
echo "== building the working tree"
cargo build --quiet --release -p vsock-router --example bench
tree_target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
cp "$tree_target/release/examples/bench" "$tmp/B"

args=(--repeat 1 --tsv)
[ "$quick" = 1 ] && args+=(--quick)
[ -n "$mib" ] && args+=(--mib "$mib")
[ -n "$only" ] && args+=(--only "$only")
[ -n "$pin" ] && args+=(--pin "$pin")

: > "$tmp/A.tsv"
: > "$tmp/B.tsv"
for r in $(seq 1 "$rounds"); do
    for side in A B; do
        echo "== round $r/$rounds: $( [ $side = A ] && echo "$rev" || echo "working tree" )"
        # A failed workload shows as a '#' line and is left out; the run goes on.
        if ! "$tmp/$side" "${args[@]}" > "$tmp/out" 2>&1; then
            grep FAILED "$tmp/out" >&2 || tail -3 "$tmp/out" >&2
        fi
        grep -v '^#' "$tmp/out" >> "$tmp/$side.tsv" || true
    done
done

echo
echo "medians of $rounds rounds; ratio = working tree / $rev ($short); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
awk -F'\t' -v rev="$short" '
    function median(list,   n, v, i, j, t) {
        n = split(list, v, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
        return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    { side = FILENAME ~ /A\.tsv$/ ? 1 : 2 }
    NF >= 5 {
        if (!($1 in unit)) { order[++names] = $1; unit[$1] = $2 }
        rate[side, $1] = rate[side, $1] " " $3
        dev[side, $1] = dev[side, $1] " " $4
    }
    END {
        printf "%-28s %5s %10s %10s %7s   %9s %9s %7s\n", "workload", "unit", rev, "tree", "ratio", "dev " rev, "dev tree", "ratio"
        for (k = 1; k <= names; k++) {
            w = order[k]
            if (rate[1, w] == "" || rate[2, w] == "") { printf "%-28s only on one side\n", w; continue }
            a = median(rate[1, w]); b = median(rate[2, w])
            r = a > 0 ? sprintf("%.3f", b / a) : "-"
            if (dev[1, w] ~ /-/ || dev[2, w] ~ /-/) { das = dbs = dr = "-" }
            else {
                da = median(dev[1, w]); db = median(dev[2, w])
                das = sprintf("%.4f", da); dbs = sprintf("%.4f", db)
                dr = da > 0 ? sprintf("%.3f", db / da) : "-"
            }
            printf "%-28s %5s %10.1f %10.1f %7s   %9s %9s %7s\n", w, unit[w], a, b, r, das, dbs, dr
        }
    }' "$tmp/A.tsv" "$tmp/B.tsv"
echo "dev = device-thread CPU (s/GiB, or us per round trip); memcpy rows are the noise check (ratio ~1)"
