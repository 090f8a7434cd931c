#!/usr/bin/env bash
# The instruction-count regression gate: runs every hot path of benches/src/bin/gate.rs under
# callgrind (counting only inside its measured function) and compares instructions per
# iteration with benches/gate-baseline.txt. Fails when any path costs more than 5 % over its
# baseline. `--update` rewrites the baseline: commit that on its own, reviewed.
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

cargo build --locked --profile bench -p headroom-benches --bin gate
gate=target/release/gate
iterations=$($gate --list | awk '/^iterations/ {print $2}')
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

failed=0
printf '%-34s %12s %12s %9s\n' bench baseline current change
: > "$out/current.txt"
for name in $($gate --list | grep -v '^iterations'); do
    valgrind --tool=callgrind --callgrind-out-file="$out/$name.cg" \
        --toggle-collect='gate::measured_*' "$gate" "$name" >/dev/null 2>&1
    total=$(awk '/^totals:/ {print $2}' "$out/$name.cg")
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
    cp "$out/current.txt" "$baseline"
    echo "baseline written to $baseline (instructions per iteration)"
    exit 0
fi
if [ "$failed" -ne 0 ]; then
    echo "gate: FAILED (a hot path regressed by more than ${threshold_percent} %, or has no baseline)"
    exit 1
fi
echo "gate: passed (every hot path within ${threshold_percent} % of its baseline)"
