#!/usr/bin/env bash
# The whole test suite: installs what the tests need (QEMU 10 from
# bookworm-backports, the asset build tools, Firecracker), builds the static
# guest agent and the guest assets, then runs every unit, integration, crash
# (real SIGKILL at every step boundary), storm and real-guest (QEMU) test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# Fast fail: formatting and lints (the workspace's [workspace.lints] plus
# clippy's defaults, every warning fatal) before the long build and tests.
cargo fmt --all --check
cargo clippy --workspace --all-targets --features hyperfleet/failpoints -- -D warnings
# `failpoints` compiles the crash points in; the crash tests need them.
# Binaries of other packages (the stand-in VMM) are not built by `cargo test`
# for hyperfleet's integration tests, so build every binary first.
cargo build --workspace --bins --features hyperfleet/failpoints
agent=$(bash scripts/build-agent.sh)
# Deterministic: an unchanged agent and kernel package reuse the same set.
HYPERFLEET_DATA_DIR="$PWD/target/hf-test-data" \
  target/debug/hyperfleet assets build --agent "$agent" 2>&1 | grep -v '^ *[][{}"]' | tail -n 3
cargo test --workspace --features hyperfleet/failpoints "$@"
# The SDKs against the daemon just built (stub backend for breadth, one real
# QEMU guest each): Python in a pinned venv, TypeScript on a pinned Node.js.
bash scripts/test-python-sdk.sh
bash scripts/test-ts-sdk.sh
# The web console in headless Chromium against a real daemon and QEMU guest
# (screenshots in target/ui-test/).
bash scripts/test-ui.sh
# The API against its OpenAPI document: schema-driven fuzzing of a live (stub) daemon, bounded.
bash scripts/fuzz-api.sh 90
