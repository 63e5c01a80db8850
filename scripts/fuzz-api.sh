#!/usr/bin/env bash
# fuzz-api.sh — schema-driven fuzzing of the live API against docs/openapi.json (schemathesis from
# PyPI, pinned, in a virtualenv under target/). A daemon with the stub backend runs on a fresh
# data dir; schemathesis generates requests from the schema (examples, boundary values, random
# data, stateful sequences) and fails on any 5xx, any response that does not match its schema,
# any status code the schema does not document, and any schema-valid request the server rejects.
#
#   bash scripts/fuzz-api.sh [MAX_SECONDS]    (default 120; scripts/test.sh runs it)
#   HF_FUZZ_SEED=N bash scripts/fuzz-api.sh   (replays the run the report names by its seed)
#
# The whole report is kept in target/fuzz-api.log (and the daemon's log beside it); schemathesis
# keeps its state (failures to replay first next time, the example database) under
# target/fuzz-api/.
#
# The daemon and the stand-in VMMs of its machines (they outlive a daemon by design) are ended by
# pid when the script exits, whatever happens. Needs the debug build (cargo build --workspace
# --bins).
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
# The stand-in VMMs of this run's machines: their command line names this run's data directory.
vmm_pids() {
  local f
  for f in /proc/[0-9]*/cmdline; do
    if { tr '\0' ' ' <"$f"; } 2>/dev/null | grep -q "hyperfleet-testvmm .*$DATA/machines/"; then
      f=${f#/proc/}; echo "${f%/cmdline}"
    fi
  done
}
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  # Twice: a VMM the daemon was spawning as it stopped shows its own command line only once
  # it has started.
  for _ in 1 2; do
    for p in $(vmm_pids); do kill -9 "$p" 2>/dev/null || true; done
    sleep 0.5
  done
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

WORK=$PWD/target/fuzz-api
mkdir -p "$WORK"
cat >"$WORK/schemathesis.toml" <<'TOML'
# 504 TIMEOUT is the documented answer of a request that waits (`?timeout=N`, 0-600 s) when its
# deadline passes before the machine gets there; the operation goes on. The fuzzer picks short
# deadlines (0 s) on purpose, so a 504 is the server keeping its word, not a server fault. It is
# still checked to be documented for the route and to match its schema; every other 5xx fails.
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "504"]

# `follow=true` keeps the console log open until the machine is deleted: a response that never
# ends cannot be checked. The tail itself (follow=false) is fuzzed like everything else.
[[operations]]
include-path = "/machines/{id}/logs"
parameters = { "query.follow" = "false" }

# A long poll lasts its whole deadline when the status does not come (default 60 s, up to 600 s),
# longer than a request may take here; the fuzzer waits 1 s. The bounds of `timeout` are the same
# code as the actions', fuzzed there.
[[operations]]
include-path = "/machines/{id}/wait"
parameters = { "query.timeout" = 1 }

# The fuzz daemon has no guest assets (and no KVM), so a machine of a real backend cannot be
# created here: `POST /machines` with `"vmm": "qemu"` or `"firecracker"` answers the documented
# 503 UNAVAILABLE naming what is missing. That 5xx is right on this host, and allowed on this
# route only; their create path is covered by the QEMU and Firecracker integration tests.
[[operations]]
include-path = "/machines"
include-method = "POST"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503", "504"]
TOML
SEED=()
if [ -n "${HF_FUZZ_SEED:-}" ]; then SEED=(--seed "$HF_FUZZ_SEED"); fi

# Revoking keys is left out: the fuzzer would revoke the key it runs with (the last-admin guard
# has its own tests). Everything else, every phase, every check.
# One worker: schemathesis parses Python source from several threads otherwise, which CPython
# 3.11 (Debian bookworm's python3) fails at now and then ("AST constructor recursion depth
# mismatch", a CPython bug) and reports as an error of the run.
# Excluded: DELETE /keys/{id} (it would revoke the key the run uses),
# POST /images/import (a tar body the fuzzer cannot make) and /images (a pull
# of whatever reference it makes up would go to that registry, Docker Hub by
# default; tests/images.rs covers the route against a local registry).
set +e
(cd "$WORK" && "$OLDPWD/$VENV/bin/schemathesis" --config-file "$WORK/schemathesis.toml" \
  run "$OLDPWD/docs/openapi.json" --url "$URL" \
  -H "Authorization: Bearer $KEY" \
  --exclude-path-regex '^/keys/\{id\}$|^/images/import$|^/images$' \
  --checks all "${SEED[@]}" \
  --max-time "$MAX_TIME" --workers 1 --request-timeout 30 --no-color) \
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
