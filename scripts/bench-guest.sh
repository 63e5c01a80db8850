#!/usr/bin/env bash
# Real-guest benchmark: start → running, exec round trip and 256 MiB file
# transfer through a release daemon, each next to its floor measured in the
# same run (see crates/bench). Needs QEMU and guest assets (scripts/setup.sh
# or scripts/test.sh builds them); ASSETS overrides their location.
# Usage: scripts/bench-guest.sh [runs, default 5]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/end-daemon.sh
RUNS=${1:-5}
ASSETS=${ASSETS:-$PWD/target/hf-test-data/assets/current}
[ -f "$ASSETS/manifest.json" ] || { echo "bench: no guest assets at $ASSETS (run scripts/test.sh or scripts/setup.sh)" >&2; exit 1; }
cargo build --release -q -p hyperfleet -p hyperfleet-bench
DATA=$(mktemp -d /tmp/hf-bench-XXXXXX)
cleanup() {
  [ -n "${PID:-}" ] && end_daemon "$DATA" "$PID" "${URL:-}" "${KEY:-}"
  rm -rf "$DATA"
}
trap cleanup EXIT
target/release/hyperfleet serve --data-dir "$DATA" --port 0 --assets-dir "$ASSETS" \
  --default-vmm qemu --boot-timeout 300 --network off --proxy-port 0 >"$DATA/daemon.log" 2>&1 &
PID=$!
for _ in $(seq 100); do [ -s "$DATA/api.addr" ] && break; sleep 0.05; done
URL="http://$(cat "$DATA/api.addr")"
KEY=$(cat "$DATA/admin.key")
target/release/hyperfleet-bench guest "$URL" "$KEY" "$PID" "$RUNS"
