#!/usr/bin/env bash
# Wake latency through the proxy with a real QEMU guest (issue 12): the first
# byte of a request to a suspended machine, p50 and p99 over N wakes, beside
# the floor in the same run (the machine resumed through the API, then the
# same request). Runs the ignored test `bench_wake_latency_through_the_proxy`
# of crates/hyperfleet/tests/network.rs (network namespaces: needs root,
# QEMU and the guest assets, as scripts/test.sh provides).
# Usage: scripts/bench-idle.sh [wakes, default 20]
set -euo pipefail
cd "$(dirname "$0")/.."
HF_BENCH_N=${1:-20} exec cargo test -q -p hyperfleet --test network \
  bench_wake_latency_through_the_proxy -- --ignored --nocapture
