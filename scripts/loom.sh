#!/usr/bin/env bash
# Model-checks the bulkhead's permit accounting with loom: every interleaving of taking,
# waiting for, giving up and giving back permits, and of resizing, up to a preemption bound.
# Built with its own cfg and target directory so that it does not disturb other builds.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUSTFLAGS="--cfg headroom_loom"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/loom"
cargo clippy -p headroom-limit --lib --tests --release --locked -- -D warnings
cargo test -p headroom-limit --lib --release --locked -- bulkhead::permits::model
