#!/usr/bin/env bash
# The whole test suite, as CI runs it, on a fresh Debian/Ubuntu machine with Rust installed.
# Installs redis-server (tests start their own servers and clusters on free loopback ports) and
# Prometheus's promtool (the SLO tests check the generated alerting rules with it).
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
apt_updated=""
install() {
    echo "$1 not found: installing the $2 package with apt-get"
    [ -n "$apt_updated" ] || $sudo_cmd apt-get update -q
    apt_updated=1
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "$2"
}
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    install redis-server redis-server
fi
command -v promtool >/dev/null 2>&1 || install promtool prometheus
redis-server --version
promtool --version | head -1

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo fmt --all --check
# The fuzz targets are a workspace of their own with their own lock file: a dependency added to
# a headroom crate must be recorded there too, or the fuzz run fails on it much later.
(cd fuzz && cargo metadata --locked --format-version 1 > /dev/null)
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
cargo test --workspace --all-features --locked
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --locked
bash scripts/loom.sh
