#!/usr/bin/env bash
# Memory-image benchmark with real QEMU guests: create -> running from a
# template, fork of a running machine, suspend -> resume; each beside its
# floor (the same QEMU restore by hand) measured in the same run
# (scripts/bench-snapshots.py). Needs root, QEMU and the guest assets
# (scripts/test.sh or scripts/setup.sh builds them); ASSETS overrides where.
# Usage: scripts/bench-snapshots.sh [runs, default 10] [--debug]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-10}
ASSETS=${ASSETS:-$PWD/target/hf-test-data/assets/current}
[ -f "$ASSETS/manifest.json" ] || { echo "bench: no guest assets at $ASSETS (run scripts/test.sh or scripts/setup.sh)" >&2; exit 1; }
if [ "${2:-}" = --debug ]; then
  cargo build -q -p hyperfleet
  BIN=target/debug/hyperfleet
else
  cargo build --release -q -p hyperfleet
  BIN=target/release/hyperfleet
fi
echo "binary: $BIN"
HF_BENCH_N=$RUNS exec python3 scripts/bench-snapshots.py "$BIN" "$ASSETS"
