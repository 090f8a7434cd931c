#!/usr/bin/env bash
# Builds every example and runs each briefly with its smoke flag, as CI does.
# Memory backends by default; export REDIS_URL=redis://127.0.0.1:6379 to run them on Redis.
set -euo pipefail
cd "$(dirname "$0")/.."

examples=(quickstart axum-service idempotent-payments sharded-orders flash-sale)
packages=()
for example in "${examples[@]}"; do
    packages+=(-p "$example")
done
cargo build --release --locked "${packages[@]}"
target_dir="${CARGO_TARGET_DIR:-target}"

for example in "${examples[@]}"; do
    echo "== $example --smoke"
    flags=(--smoke)
    # The flash sale also fails the run when headroom misses a spike target.
    if [ "$example" = flash-sale ]; then flags+=(--check); fi
    timeout 60 "$target_dir/release/$example" "${flags[@]}"
done
echo "every example ran"
