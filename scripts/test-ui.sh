#!/usr/bin/env bash
# test-ui.sh — the web console in a real browser: headless Chromium driven by Selenium
# (crates/hyperfleet/tests/ui/test_console.py) against a real daemon, with a real QEMU guest for
# the terminal when the guest assets are built (target/hf-test-data/assets/current, as
# scripts/test.sh builds them). Screenshots, the browser's console and the daemon's log go to
# target/ui-test/.
#
#   bash scripts/test-ui.sh        (needs the debug build: cargo build --workspace --bins)
#
# Installs Debian's chromium, chromium-driver and python3-selenium when missing. When they cannot
# be installed the test is skipped loudly, and fails when CI is set. The test starts only its own
# processes (the daemon, chromedriver and its Chromium, the machines' VMMs) and ends them by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's python3 (where python3-selenium installs), not another python3 earlier on PATH.
PY=/usr/bin/python3

have() {
  command -v chromium >/dev/null && command -v chromedriver >/dev/null &&
    "$PY" -c 'import selenium' 2>/dev/null
}

if ! have; then
  echo "test-ui: installing chromium, chromium-driver and python3-selenium"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends chromium chromium-driver python3-selenium >/dev/null; } || ! have; then
    if [ -n "${CI:-}" ]; then
      echo "test-ui: FAILED: cannot install headless Chromium and Selenium (CI is set)" >&2
      exit 1
    fi
    echo "test-ui: SKIPPED (loudly): cannot install headless Chromium and Selenium; the web console was not tested in a browser" >&2
    exit 0
  fi
fi

for b in target/debug/hyperfleet target/debug/hyperfleet-testvmm; do
  [ -x "$b" ] || { echo "test-ui: $b missing: run cargo build --workspace --bins first" >&2; exit 1; }
done
exec "$PY" crates/hyperfleet/tests/ui/test_console.py
