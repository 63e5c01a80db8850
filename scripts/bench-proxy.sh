#!/usr/bin/env bash
# Proxy benchmark: wrk through Hyperfleet's reverse proxy to a port of a real
# guest (busybox httpd), next to wrk straight to the guest's IP, in one run
# against one guest. The daemon (release build) runs with networking on inside
# a network namespace of its own, so nothing on the host changes; everything
# is removed at the end. Needs root, QEMU, wrk and guest assets
# (scripts/test.sh or scripts/setup.sh provides them; ASSETS overrides).
# Usage: sudo scripts/bench-proxy.sh [seconds per run, default 10] [connections, default 16]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/end-daemon.sh
SECS=${1:-10}
CONNS=${2:-16}
ASSETS=${ASSETS:-$PWD/target/hf-test-data/assets/current}
[ "$(id -u)" = 0 ] || { echo "bench-proxy: needs root (TAP devices, nftables, namespaces)" >&2; exit 1; }
[ -f "$ASSETS/manifest.json" ] || { echo "bench-proxy: no guest assets at $ASSETS (run scripts/test.sh or scripts/setup.sh)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "bench-proxy: wrk is missing (apt-get install wrk)" >&2; exit 1; }
cargo build --release -q -p hyperfleet
NS=hfbench$$
DATA=$(mktemp -d /tmp/hf-bench-proxy-XXXXXX)
cleanup() {
  [ -n "${PID:-}" ] && END_DAEMON_CURL="ip netns exec $NS curl" end_daemon "$DATA" "$PID" "${API:-}" "${KEY:-}"
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT
ip netns add "$NS"
in_ns() { ip netns exec "$NS" "$@"; }
in_ns ip link set lo up
# Not through in_ns: `ip netns exec` execs the daemon, so $! is its pid
# (a function would put a subshell between).
ip netns exec "$NS" target/release/hyperfleet serve --data-dir "$DATA" --port 0 --proxy-port 0 \
  --assets-dir "$ASSETS" --default-vmm qemu --boot-timeout 300 --network on \
  >"$DATA/daemon.log" 2>&1 &
PID=$!
for _ in $(seq 200); do [ -s "$DATA/api.addr" ] && [ -s "$DATA/proxy.addr" ] && break; sleep 0.05; done
API="http://$(cat "$DATA/api.addr")"
PROXY_PORT=$(sed 's/.*://' "$DATA/proxy.addr")
KEY=$(cat "$DATA/admin.key")
api() { in_ns curl -sf -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' "$@"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
M=$(api -X POST "$API/machines" -d '{"name":"bench-web","exposed_ports":[8080],"public":true,"vcpu_count":1}')
ID=$(echo "$M" | json 'd["id"]')
api -X POST "$API/machines/$ID/start?timeout=300" >/dev/null
IP=$(api "$API/machines/$ID" | json 'd["network"]["ip"]')
api -X POST "$API/machines/$ID/exec" \
  -d '{"command":["sh","-c","mkdir -p /srv && echo hello > /srv/index.html && httpd -p 8080 -h /srv"]}' >/dev/null
for _ in $(seq 100); do in_ns curl -sf "http://$IP:8080/" >/dev/null && break; sleep 0.1; done

run() { # run LABEL wrk-args… → prints "LABEL req/s p99"
  local label=$1; shift
  local out
  out=$(in_ns wrk -t2 -c"$CONNS" -d"${SECS}s" --latency "$@")
  local rps p99
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  errs=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}' | tr '\n' ' ')
  printf '%-28s %12s req/s   p99 %-10s %s\n' "$label" "$rps" "$p99" "$errs"
  echo "$rps" >"$DATA/$label.rps"
}
echo "wrk -t2 -c$CONNS -d${SECS}s; guest $ID ($IP), busybox httpd on port 8080"
run direct "http://$IP:8080/"
run proxy -H "Host: 8080-$ID.localhost" "http://127.0.0.1:$PROXY_PORT/"
run direct-again "http://$IP:8080/"
python3 - "$DATA" <<'PY'
import sys, pathlib
d = pathlib.Path(sys.argv[1])
direct = (float((d / "direct.rps").read_text()) + float((d / "direct-again.rps").read_text())) / 2
proxy = float((d / "proxy.rps").read_text())
print(f"proxy / direct (mean of the two direct runs): {100 * proxy / direct:.1f} %  (target >= 85 %)")
PY
api -X DELETE "$API/machines/$ID?force=true" >/dev/null || true
