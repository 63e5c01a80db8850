# Sourced by the benchmark scripts: ends a daemon they started and the VMMs
# its machines run, by pid only.
#
# end_daemon DATA_DIR DAEMON_PID [URL KEY]
#   1. with URL and KEY: force-deletes every machine through the API, so the
#      daemon ends each VMM by the pid it recorded (VMMs outlive a daemon by
#      design, so killing the daemon alone would leave them running);
#   2. ends the daemon (SIGTERM, then SIGKILL after 10 s);
#   3. any VMM still left is reported and killed by its pid: read from /proc,
#      matching the run's own data directory (a fresh mktemp path no other
#      process can have in its command line).
# END_DAEMON_CURL overrides the curl command (e.g. "ip netns exec NS curl"
# for a daemon inside a network namespace).
end_daemon() {
  local data=$1 pid=$2 url=${3:-} key=${4:-} curl=${END_DAEMON_CURL:-curl}
  if [ -n "$url" ] && [ -n "$key" ] && kill -0 "$pid" 2>/dev/null; then
    local ids
    ids=$($curl -sf -m 10 -H "Authorization: Bearer $key" "$url/machines?limit=1000" |
      grep -o '"id":"m[0-9a-z]*"' | cut -d'"' -f4 || true)
    for id in $ids; do
      $curl -sf -m 60 -o /dev/null -X DELETE -H "Authorization: Bearer $key" \
        "$url/machines/$id?force=true" || true
    done
  fi
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  local p left=()
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = "$$" ] && continue
    { tr '\0' ' ' <"/proc/$p/cmdline"; } 2>/dev/null | grep -qF -- "$data" && left+=("$p")
  done
  if [ ${#left[@]} -gt 0 ]; then
    echo "end_daemon: killing ${#left[@]} process(es) of $data the daemon left:" >&2
    for p in "${left[@]}"; do
      echo "  $p: $({ tr '\0' ' ' <"/proc/$p/cmdline"; } 2>/dev/null | cut -c1-160)" >&2
    done
    kill -9 "${left[@]}" 2>/dev/null || true
  fi
}
