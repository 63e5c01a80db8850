#!/usr/bin/env bash
# test-python-sdk.sh — the Python SDK (sdk/python): installs it with pinned test tools into a
# virtualenv (target/sdk-venv, from PyPI; reused while sdk/python/requirements-test.txt is
# unchanged), checks its lints and format (ruff) and its types (mypy --strict), and runs its
# pytest suite against the real daemon (target/debug/hyperfleet, with the stub backend for
# breadth and one QEMU guest for exec and files; the tests start and end their own daemons on
# temporary data directories).
#
#   bash scripts/test-python-sdk.sh [PYTEST ARGS...]
#
# Needs the debug build (cargo build --workspace --bins), Debian's python3 and python3-venv; for
# the QEMU test qemu-system-x86_64 and the guest assets in target/hf-test-data (scripts/test.sh
# builds them; outside CI the test is skipped loudly without them, in CI it fails).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/target/sdk-venv
REQS=$ROOT/sdk/python/requirements-test.txt
PY=${PYTHON:-python3}

[ -x target/debug/hyperfleet ] && [ -x target/debug/hyperfleet-testvmm ] || {
  echo "test-python-sdk: target/debug/hyperfleet{,-testvmm} missing: run cargo build --workspace --bins first" >&2
  exit 1
}

stamp=$(sha256sum "$REQS" | cut -d' ' -f1)
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$VENV"
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    # Debian splits venv (ensurepip) out of python3.
    apt-get install -y -q --no-install-recommends python3-venv >/dev/null </dev/null
    "$PY" -m venv "$VENV"
  fi
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q -r "$REQS" </dev/null
  echo "$stamp" >"$VENV/.requirements.sha256"
fi
# The SDK as a user installs it (a wheel built from the tree), afresh every run.
PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q --no-deps --force-reinstall \
  --no-build-isolation "$ROOT/sdk/python" </dev/null

cd sdk/python
"$VENV/bin/ruff" check --no-cache .
"$VENV/bin/ruff" format --no-cache --check .
"$VENV/bin/mypy" --strict --cache-dir "$ROOT/target/sdk-mypy-cache" src/hyperfleet examples
HYPERFLEET_BIN=$ROOT/target/debug/hyperfleet PYTHONDONTWRITEBYTECODE=1 \
  "$VENV/bin/python" -m pytest -p no:cacheprovider -ra --timeout 600 tests "$@"
