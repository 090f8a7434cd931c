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
# A service asked to stop (SIGTERM, as a rolling deploy does) stops gracefully and exits 0,
# within its drain (10 s) though a client holds an idle connection open.
echo "== axum-service, stopped by SIGTERM"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
LISTEN_ADDR=127.0.0.1:0 env -u HEADROOM_SMOKE timeout 60 "$target_dir/release/axum-service" \
    > "$log" 2>&1 &
pid=$!
for _ in $(seq 300); do
    grep -q "^listening on" "$log" && break
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.1
done
addr=$(sed -n 's|^listening on http://\([0-9.:]*\) .*|\1|p' "$log")
stopped=false
if [ -n "$addr" ]; then
    exec 3<> "/dev/tcp/${addr%:*}/${addr##*:}"
    started=$(date +%s)
    kill -TERM "$pid"
    wait "$pid" && grep -q "^stopped gracefully" "$log" && [ $(( $(date +%s) - started )) -le 15 ] \
        && stopped=true
    exec 3<&-
fi
if ! $stopped; then
    kill "$pid" 2> /dev/null || true
    echo "axum-service did not stop gracefully on SIGTERM within its drain:"
    cat "$log"
    exit 1
fi
cat "$log"
echo "every example ran"
