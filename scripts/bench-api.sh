#!/usr/bin/env bash
# API benchmark against a running release daemon with wrk on loopback:
#   GET /machines/{id}, GET /machines?limit=1000 (1,000 machines), POST /machines
#   (durable: 201 only after the commit is fsynced), and the daemon's peak RSS.
# Each figure is printed next to its floor measured in the same run:
#   - HTTP floor: the same daemon answering an unauthenticated unknown route
#     (the HTTP stack alone, no auth, no store);
#   - durability floor: this disk's fdatasync rate on a WAL-like append loop,
#     i.e. how many *unbatched* durable commits per second the disk allows.
# Usage: scripts/bench-api.sh [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/end-daemon.sh
DUR=${1:-10}
command -v wrk >/dev/null || { echo "bench: wrk missing; run: sudo bash scripts/install-deps.sh --bench" >&2; exit 1; }
cargo build --release -q -p hyperfleet -p hyperfleet-testvmm
BIN=target/release/hyperfleet
DATA=$(mktemp -d /tmp/hf-bench-XXXXXX)
cleanup() {
  [ -n "${PID:-}" ] && end_daemon "$DATA" "$PID" "${URL:-}" "${KEY:-}"
  rm -rf "$DATA"
}
trap cleanup EXIT
"$BIN" serve --data-dir "$DATA" --port 0 --default-vmm stub \
  --stub-vmm-binary target/release/hyperfleet-testvmm --network off --proxy-port 0 \
  >"$DATA/daemon.log" 2>&1 &
PID=$!
for _ in $(seq 100); do [ -s "$DATA/api.addr" ] && break; sleep 0.05; done
URL="http://$(cat "$DATA/api.addr")"
KEY=$(cat "$DATA/admin.key")
AUTH="Authorization: Bearer $KEY"

echo "seeding 1000 machines..."
seq 1000 | xargs -P 8 -I{} curl -sf -o /dev/null -H "$AUTH" -H 'content-type: application/json' \
  -d '{"name":"seed-{}"}' "$URL/machines"
ID=$(curl -sf -H "$AUTH" "$URL/machines?limit=1" | sed -E 's/.*"id":"([^"]+)".*/\1/')
RSS_1K=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")

run() { # name, extra wrk args...
  local name=$1; shift
  local out
  out=$(wrk -t2 -c50 -d"${DUR}s" --latency "$@")
  local rps p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  local non2xx
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  printf '%-34s %12s req/s   p99 %8s%s\n' "$name" "$rps" "$p99" "${non2xx:+   non-2xx: $non2xx}"
}

# Settle the disk first: dirty data of earlier work (a previous run's
# removed store and machine directories) would share the journal with the
# durable creates measured below.
sync
echo
echo "wrk -t2 -c50 -d${DUR}s on loopback, $(nproc) cores"
run "floor: unknown route (HTTP only)" "$URL/nope"
run "GET /machines/{id}" -H "$AUTH" "$URL/machines/$ID"
run "GET /machines?limit=1000" -H "$AUTH" "$URL/machines?limit=1000"
cat > "$DATA/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"mem_size_mib":256}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
LUA
run "POST /machines (durable)" -s "$DATA/post.lua" "$URL/machines"
CREATED=$(curl -sf -H "$AUTH" "$URL/machines?limit=1" | sed -E 's/.*"total":([0-9]+).*/\1/')

# Durability floor: append 4 KiB + fdatasync, like an unbatched WAL commit.
FLOOR=$(python3 - "$DATA" <<'PY'
import os, sys, time
p = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
buf = b"x" * 4096
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < 2.0:
    os.write(fd, buf); os.fdatasync(fd); n += 1
dt = time.perf_counter() - t0
os.close(fd); os.unlink(p)
print(f"{n/dt:.0f} fdatasync/s ({dt/n*1e6:.0f} us each)")
PY
)
HWM=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
echo
echo "durability floor (unbatched commits this disk allows): $FLOOR"
echo "machines in the store after the run: $CREATED"
echo "daemon RSS with the 1000 seeded machines: $((RSS_1K / 1024)) MiB"
echo "daemon peak RSS (VmHWM) after the create run: $((HWM / 1024)) MiB" \
  "(memory keeps at most --machine-cache records, default 4096, whatever the store holds)"
