#!/usr/bin/env bash
# Builds the guest agent as a fully static binary (it runs as PID 1 inside
# guests, where there is no dynamic loader). No musl target is available, so
# glibc is linked statically; `--target` keeps RUSTFLAGS off build scripts and
# proc-macros. Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --target x86_64-unknown-linux-gnu -p guest-agent >&2
bin=target/x86_64-unknown-linux-gnu/release/hyperfleet-agent
file "$bin" | grep -Eq "static(-pie)? linked|statically linked" || { echo "build-agent: $bin is not static" >&2; exit 1; }
echo "$bin"
