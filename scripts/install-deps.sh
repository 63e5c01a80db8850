#!/usr/bin/env bash
# Installs what building and testing Hyperfleet needs on Debian 12, idempotently
# and without prompts (CI runs it as root with no stdin). Skips what is present.
#   --bench   also install the benchmark tools (wrk)
set -euo pipefail

want_bench=0
for a in "$@"; do
  case "$a" in
    --bench) want_bench=1 ;;
    *) echo "install-deps: unknown option $a" >&2; exit 2 ;;
  esac
done

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: installing Debian packages needs root (sudo bash $0)" >&2
    exit 1
  fi
}

apt_updated=0
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  need_root
  if [ $apt_updated -eq 0 ]; then
    echo "install-deps: apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  echo "install-deps: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# A C compiler for the bundled SQLite; procps for the tests' process checks.
apt_install gcc libc6-dev procps ca-certificates
if [ $want_bench -eq 1 ]; then
  apt_install wrk curl
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found; install the Rust toolchain (rustup) first" >&2
  exit 1
fi
echo "install-deps: ok ($(cargo --version))"
