#!/usr/bin/env bash
# The TypeScript SDK (sdk/typescript): installs the pinned Node.js into
# target/node (scripts/install-node.sh), its dev dependencies from the
# lockfile (`npm ci`), checks the generated types against docs/openapi.json,
# builds it (tsc), and runs its tests (node's test runner) against the real
# daemon in target/debug: the stub backend for breadth, one QEMU guest for
# commands and files (skipped loudly without QEMU and guest assets, a
# failure when CI is set). Needs `cargo build` (hyperfleet and
# hyperfleet-testvmm) first; `HYPERFLEET_BIN` points at another build.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/install-node.sh
export PATH="$ROOT/target/node/bin:$PATH"
bin="${HYPERFLEET_BIN:-$ROOT/target/debug/hyperfleet}"
for f in "$bin" "$(dirname "$bin")/hyperfleet-testvmm"; do
    if [ ! -x "$f" ]; then
        echo "test-ts-sdk: MISSING: $f — run \`cargo build -p hyperfleet -p hyperfleet-testvmm\` first" >&2
        exit 1
    fi
done
export HYPERFLEET_BIN="$bin"
cd sdk/typescript
npm ci --no-audit --no-fund --loglevel=error
npm run --silent check
npm run --silent build
npm run --silent build:test
npm test
