#!/usr/bin/env bash
# Host packages the OCI image tests and benchmark need (issue 14):
# - docker-registry: Debian's CNCF distribution registry, started by the tests on loopback
# - skopeo, umoci: build and copy test images offline; skopeo is the benchmark's floor
# - apache2-utils: htpasswd, for the registry with basic auth
# - e2fsprogs: mkfs.ext4 -d builds each image's filesystem (already on most hosts)
# - busybox-static: the test images' userland
set -euo pipefail
pkgs=(docker-registry skopeo umoci apache2-utils e2fsprogs busybox-static)
missing=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
fi
# The package's own service is not wanted: the tests start registries of their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi
