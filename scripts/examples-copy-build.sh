#!/usr/bin/env bash
# Builds every example the way an application that copied it would: the example's folder is
# copied out of the repository, its headroom dependencies point at this checkout's crates by
# absolute path, it gets its own [workspace], and it builds alone. The repository's Cargo.lock
# goes along so the versions match the ones CI already fetched (hence --offline).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# Dependencies build once for every copy, and again on later runs.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"

for dir in examples/*/; do
    example="$(basename "$dir")"
    copy="$scratch/$example"
    echo "== $example (copied to $copy)"
    cp -R "$dir" "$copy"
    rm -rf "$copy/target"
    sed -i.orig "s#path = \"\.\./\.\./crates/#path = \"$root/crates/#g" "$copy/Cargo.toml"
    rm "$copy/Cargo.toml.orig"
    if grep -n 'path = "\.\.' "$copy/Cargo.toml"; then
        echo "$example: a dependency path still points into the repository" >&2
        exit 1
    fi
    printf '\n[workspace]\n' >>"$copy/Cargo.toml"
    cp Cargo.lock "$copy/Cargo.lock"
    cargo build --offline --manifest-path "$copy/Cargo.toml"
done
echo "every example built from a copy"
