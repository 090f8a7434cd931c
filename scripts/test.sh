#!/usr/bin/env bash
# The whole test suite, as CI runs it, on a fresh Debian/Ubuntu machine with Rust installed.
# Installs redis-server (tests start their own servers and clusters on free loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    echo "redis-server not found: installing it with apt-get"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q redis-server
fi
redis-server --version

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo fmt --all --check
# The fuzz targets are a workspace of their own with their own lock file: a dependency added to
# a headroom crate must be recorded there too, or the fuzz run fails on it much later.
(cd fuzz && cargo metadata --locked --format-version 1 > /dev/null)
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
cargo test --workspace --all-features --locked
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --locked
bash scripts/loom.sh
