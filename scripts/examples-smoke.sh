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

for example in "${examples[@]}"; do
    echo "== $example --smoke"
    timeout 60 "target/release/$example" --smoke
done
echo "every example ran"
