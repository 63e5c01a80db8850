#!/usr/bin/env bash
# fuzz-api.sh — schema-driven fuzzing of the live API against docs/openapi.json (schemathesis from
# PyPI, pinned, in a virtualenv under target/). A daemon with the stub backend runs on a fresh
# data dir; schemathesis generates requests from the schema (examples, boundary values, random
# data, stateful sequences) and fails on any 5xx, any response that does not match its schema,
# any status code the schema does not document, and any schema-valid request the server rejects.
#
#   bash scripts/fuzz-api.sh [MAX_SECONDS]    (default 120; scripts/test.sh runs it)
#
# The whole report is kept in target/fuzz-api.log (and the daemon's log beside it).
#
# The daemon is ended by its pid when the script exits, whatever happens. Needs the debug build
# (cargo build --workspace --bins).
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_TIME=${1:-120}
SCHEMATHESIS=schemathesis==4.32.5
VENV=target/fuzz-venv

if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "${SCHEMATHESIS#*==}"; then
  python3 -m venv "$VENV" 2>/dev/null || { apt-get install -y -q python3-venv >/dev/null; python3 -m venv "$VENV"; }
  "$VENV/bin/pip" install -q "$SCHEMATHESIS"
fi

DATA=$(mktemp -d /tmp/hf-fuzz.XXXXXX)
PID=
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$DATA"
}
trap cleanup EXIT
target/debug/hyperfleet serve --data-dir "$DATA" --port 0 --proxy-port 0 --network off \
  --default-vmm stub --stub-vmm-binary target/debug/hyperfleet-testvmm --boot-timeout 10 \
  >"$DATA/daemon.log" 2>&1 &
PID=$!
for _ in $(seq 100); do [ -s "$DATA/api.addr" ] && break; sleep 0.1; done
[ -s "$DATA/api.addr" ] || { cat "$DATA/daemon.log"; echo "fuzz-api: the daemon did not start" >&2; exit 1; }
URL="http://$(cat "$DATA/api.addr")/api/v1"
KEY=$(cat "$DATA/admin.key")

# Revoking keys is left out: the fuzzer would revoke the key it runs with (the last-admin guard
# has its own tests). Everything else, every phase.
set +e
"$VENV/bin/schemathesis" run docs/openapi.json --url "$URL" \
  -H "Authorization: Bearer $KEY" \
  --exclude-path-regex '^/keys/\{id\}$' \
  --checks all \
  --max-time "$MAX_TIME" --workers 2 --request-timeout 30 --no-color \
  >target/fuzz-api.log 2>&1
rc=$?
set -e
cp "$DATA/daemon.log" target/fuzz-api-daemon.log
tail -n 60 target/fuzz-api.log
if [ "$rc" != 0 ]; then
  echo "--- daemon log (errors) ---"
  grep -E 'ERROR|panicked' "$DATA/daemon.log" | tail -n 20 || true
  echo "fuzz-api: schemathesis found failures (exit $rc)" >&2
  exit "$rc"
fi
if grep -q 'panicked' "$DATA/daemon.log"; then
  grep -B2 -A10 'panicked' "$DATA/daemon.log" | head -n 40
  echo "fuzz-api: the daemon panicked" >&2
  exit 1
fi
echo "fuzz-api: no failures in ${MAX_TIME}s"
