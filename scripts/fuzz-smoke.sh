#!/usr/bin/env bash
# Builds every fuzz target and runs each for a short time (FUZZ_SECONDS, default 30) from its
# committed seed corpus. cargo-fuzz needs nightly features: RUSTC_BOOTSTRAP=1 enables them on
# the stable toolchain. Installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${FUZZ_SECONDS:-30}"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

# `cargo fuzz build` has no --locked flag: `cargo fetch --locked` first fails when
# fuzz/Cargo.lock is missing or out of date, so the build below resolves nothing new.
cargo fetch --locked
cargo fuzz build
for target in $(cargo fuzz list); do
    echo "== fuzz $target for ${seconds}s"
    # A scratch corpus: new inputs found here are not committed.
    work=$(mktemp -d)
    cp corpus/"$target"/seed-* "$work"/ 2>/dev/null || true
    if ! cargo fuzz run "$target" "$work" -- -max_total_time="$seconds" -print_final_stats=1 \
        > "$work/log" 2>&1; then
        tail -n 40 "$work/log"
        echo "fuzz target $target failed"
        exit 1
    fi
    grep -E '^(Done|stat::number_of_executed_units)' "$work/log"
    rm -rf "$work"
done
