#!/usr/bin/env bash
# The fleet trial: a Redis Cluster of 3 masters with a replica each, 6 service processes and an
# open-loop load through a rolling deploy, a crash, a write burst, a master failover, a slot
# migration, one instance cut from Redis, and overload. Exits non-zero when a promise is broken.
#
#   bash scripts/fleet-trial.sh           # the full schedule (about 5 minutes)
#   bash scripts/fleet-trial.sh --short   # the CI schedule (about 2 minutes after the build)
#
# Writes target/fleet-trial/{report.txt,report.json,timeline.svg}.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo build --release --locked -p headroom-fleet
target_dir="${CARGO_TARGET_DIR:-target}"
"$target_dir/release/fleet-trial" --out "$target_dir/fleet-trial" "$@"
