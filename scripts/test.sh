#!/usr/bin/env bash
# The whole test suite: installs what the tests need, then runs every unit,
# integration, crash (real SIGKILL at every step boundary) and storm test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# `failpoints` compiles the crash points in; the crash tests need them.
# Binaries of other packages (the stand-in VMM) are not built by `cargo test`
# for hyperfleet's integration tests, so build every binary first.
cargo build --workspace --bins --features hyperfleet/failpoints
cargo test --workspace --features hyperfleet/failpoints "$@"
