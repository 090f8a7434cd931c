#!/usr/bin/env bash
# The instruction-count regression gate: runs every hot path of benches/src/bin/gate.rs under
# callgrind (counting the inclusive cost of its measured function) and compares instructions per
# iteration with benches/gate-baseline.txt. Fails when any path costs more than 5 % over its
# baseline, has no baseline, or counted no instructions (callgrind wrote no totals, or the
# measured function was never entered), and when the baseline was recorded with another
# toolchain (its first line, `toolchain <rustc -V>`): counts from another compiler are not
# comparable.
#
# Refresh the baseline with `scripts/bench-gate.sh --update` (it records the toolchain too) and
# commit that on its own, reviewed.
set -euo pipefail
cd "$(dirname "$0")/.."

threshold_percent=5
baseline=benches/gate-baseline.txt
update=false
[ "${1:-}" = "--update" ] && update=true

if ! command -v valgrind >/dev/null 2>&1; then
    echo "valgrind not found: installing it with apt-get"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q valgrind
fi

toolchain=$(rustc -V)
recorded=$(sed -n 's/^toolchain //p' "$baseline" 2>/dev/null || true)
if ! $update && [ "$recorded" != "$toolchain" ]; then
    echo "gate: FAILED: the baseline was recorded with '${recorded:-no toolchain}', this is '$toolchain'."
    echo "Instruction counts from different compilers are not comparable: run"
    echo "scripts/bench-gate.sh --update on this toolchain and commit benches/gate-baseline.txt."
    exit 1
fi

cargo build --locked --profile bench -p headroom-benches --bin gate
gate="${CARGO_TARGET_DIR:-target}/release/gate"
iterations=$($gate --list | awk '/^iterations/ {print $2}')
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

failed=0
uncounted=0
printf '%-34s %12s %12s %9s\n' bench baseline current change
echo "toolchain $toolchain" > "$out/current.txt"
for name in $($gate --list | grep -v '^iterations'); do
    valgrind --tool=callgrind --callgrind-out-file="$out/$name.cg" "$gate" "$name" >/dev/null 2>&1
    # The inclusive cost of the path's measured function itself. (Toggling collection on
    # `gate::measured_*` also toggled it off again inside a closure of that function when the
    # compiler kept the closure apart, and counted almost nothing.)
    total=$(callgrind_annotate --inclusive=yes --threshold=100 "$out/$name.cg" 2>/dev/null \
        | awk '/:gate::measured_[a-z0-9_]+ \[/ && !found {gsub(",", "", $1); print $1; found = 1}')
    if [ -z "$total" ] || [ "$total" = 0 ]; then
        printf '%-34s %12s %12s %9s %s\n' "$name" "-" "-" "-" "NO COUNT"
        echo "  callgrind counted no instructions in a gate::measured_* function (total: '${total}')"
        failed=1
        uncounted=1
        continue
    fi
    current=$(awk -v t="$total" -v n="$iterations" 'BEGIN {printf "%.1f", t / n}')
    echo "$name $current" >> "$out/current.txt"
    base=$(awk -v n="$name" '$1 == n {print $2}' "$baseline" 2>/dev/null || true)
    if [ -z "$base" ]; then
        printf '%-34s %12s %12s %9s\n' "$name" "-" "$current" "new"
        $update || failed=1
        continue
    fi
    change=$(awk -v c="$current" -v b="$base" 'BEGIN {printf "%+.2f%%", (c - b) / b * 100}')
    verdict=$(awk -v c="$current" -v b="$base" -v t="$threshold_percent" \
        'BEGIN {print (c > b * (1 + t / 100)) ? "REGRESSED" : "ok"}')
    printf '%-34s %12s %12s %9s %s\n' "$name" "$base" "$current" "$change" "$verdict"
    [ "$verdict" = ok ] || failed=1
done

if $update; then
    if [ "$uncounted" -ne 0 ]; then
        echo "gate: baseline NOT written: a hot path counted no instructions"
        exit 1
    fi
    cp "$out/current.txt" "$baseline"
    echo "baseline written to $baseline (instructions per iteration, $toolchain)"
    exit 0
fi
if [ "$failed" -ne 0 ]; then
    echo "gate: FAILED (a hot path regressed by more than ${threshold_percent} %, has no baseline, or counted nothing)"
    exit 1
fi
echo "gate: passed (every hot path within ${threshold_percent} % of its baseline)"
