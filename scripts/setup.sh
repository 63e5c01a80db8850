#!/usr/bin/env bash
# Installs what is missing (Debian 12), builds Hyperfleet in release mode,
# builds the static guest agent and the guest assets into the data directory
# (default /var/lib/hyperfleet, or $HYPERFLEET_DATA_DIR). Then run:
#   ./target/release/hyperfleet serve
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --workspace --bins
agent=$(bash scripts/build-agent.sh)
cp "$agent" target/release/hyperfleet-agent
./target/release/hyperfleet assets build --agent target/release/hyperfleet-agent 2>&1 \
  | grep -v '^ *[][{}"]'
./target/release/hyperfleet doctor || true
