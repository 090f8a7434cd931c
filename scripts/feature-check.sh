#!/usr/bin/env bash
# Checks each workspace package's tests on its default features, then every package with no
# features, with each feature alone and with all of them (cargo hack --each-feature), without
# dev-dependencies: a feature that fails to build on its own, or a `cfg` that forgot one, fails
# here. Only `cargo check`, to keep CI time down.
# Installs cargo-hack if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-hack >/dev/null 2>&1 || cargo install cargo-hack --locked

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
start=$(date +%s)
# Each package's tests on its default features, as `cargo test -p <package>` builds them: a
# test that needs a feature says so (`required-features`), or this fails.
cargo hack check --workspace --tests --locked
# Without dev-dependencies cargo would prune the lock file, so --locked cannot be used; the
# committed Cargo.lock is put back afterwards (and `--locked` everywhere else guards it).
cp Cargo.lock "${TMPDIR:-/tmp}/headroom-feature-check.lock"
trap 'cp "${TMPDIR:-/tmp}/headroom-feature-check.lock" Cargo.lock' EXIT
cargo hack check --workspace --each-feature --no-dev-deps
echo "feature check: every package and feature passed in $(( $(date +%s) - start )) s"
