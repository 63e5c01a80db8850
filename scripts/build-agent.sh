#!/usr/bin/env bash
# Builds the guest agent as a fully static binary (it runs as PID 1 inside
# guests, where there is no dynamic loader). No musl target is available, so
# glibc is linked statically; `--target` keeps RUSTFLAGS off build scripts and
# proc-macros. Also builds hf-guest-testkit (servers the network tests run in
# guests) the same way. Prints the agent's path.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --target x86_64-unknown-linux-gnu -p guest-agent -p guest-testkit >&2
out=target/x86_64-unknown-linux-gnu/release
for b in hyperfleet-agent hf-guest-testkit; do
  file "$out/$b" | grep -Eq "static(-pie)? linked|statically linked" || { echo "build-agent: $out/$b is not static" >&2; exit 1; }
done
echo "$out/hyperfleet-agent"
