#!/usr/bin/env bash
# Installs what is missing (Debian 12), builds Hyperfleet in release mode,
# builds the static guest agent and the guest assets into the data directory
# (default /var/lib/hyperfleet, or $HYPERFLEET_DATA_DIR). Then run:
#   ./target/release/hyperfleet serve
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --workspace --bins
# The data directory holds the database (key hashes, machine env, access
# tokens) and admin.key: private to this user from the start. `install -d`
# also tightens an existing one; nothing below loosens it (the daemon
# tightens it again at every start).
install -d -m 0700 "${HYPERFLEET_DATA_DIR:-/var/lib/hyperfleet}"
agent=$(bash scripts/build-agent.sh)
cp "$agent" target/release/hyperfleet-agent
./target/release/hyperfleet assets build --agent target/release/hyperfleet-agent 2>&1 \
  | grep -v '^ *[][{}"]'
./target/release/hyperfleet doctor || true
