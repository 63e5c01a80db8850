#!/usr/bin/env bash
# OCI image benchmark (issue 14), on loopback with a release daemon:
#  1. pull + unpack + filesystem build of a ~100 MB image (files of Debian packages installed on
#     this host, as a 3-layer gzip OCI image made with umoci) from a local docker-registry, beside
#     `skopeo copy` of the same image to a local directory in the same run (the floor: download and
#     digest checks, no unpacking, no filesystem); medians of $RUNS runs each;
#  2. the ext4 and erofs builders on the same unpacked tree (why ext4: docs/images.md);
#  3. a create naming the image once it is ready (no image work: the image's events say `used`)
#     against a create without an image, medians of $CREATES creates each.
# Prints a markdown table; figures go to docs/benchmarks.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
CREATES=${CREATES:-20}

./scripts/install-oci-deps.sh
command -v mkfs.erofs >/dev/null || apt-get -o DPkg::Lock::Timeout=600 install -y -qq erofs-utils >/dev/null
cargo build --release -q -p hyperfleet -p hyperfleet-testvmm
BIN=$PWD/target/release/hyperfleet

W=$(mktemp -d /tmp/hf-bench-img.XXXXXX)
REG_PID= DAEMON_PID=
cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null || true
    [ -n "$REG_PID" ] && kill "$REG_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
ms() { date +%s%3N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# --- the image -----------------------------------------------------------------------------
SRC=(/usr/lib/python3.11 /usr/lib/gcc/x86_64-linux-gnu/12 /bin/busybox)
for s in "${SRC[@]}"; do [ -e "$s" ] || { echo "missing $s (python3.11, gcc-12, busybox-static)" >&2; exit 1; }; done
umoci init --layout "$W/oci" >/dev/null
umoci new --image "$W/oci:bench" >/dev/null
umoci unpack --image "$W/oci:bench" "$W/bundle" >/dev/null
mkdir -p "$W/bundle/rootfs/bin" "$W/bundle/rootfs/usr/lib/x86_64-linux-gnu" "$W/bundle/rootfs/usr/lib/gcc/x86_64-linux-gnu"
cp -a /bin/busybox "$W/bundle/rootfs/bin/"
umoci repack --refresh-bundle --image "$W/oci:bench" "$W/bundle" >/dev/null
cp -a /usr/lib/python3.11 "$W/bundle/rootfs/usr/lib/"
umoci repack --refresh-bundle --image "$W/oci:bench" "$W/bundle" >/dev/null
cp -a /usr/lib/gcc/x86_64-linux-gnu/12 "$W/bundle/rootfs/usr/lib/gcc/x86_64-linux-gnu/"
umoci repack --refresh-bundle --image "$W/oci:bench" "$W/bundle" >/dev/null
umoci config --image "$W/oci:bench" --config.cmd /bin/busybox --config.cmd sh >/dev/null
TREE_MB=$(du -sm "$W/bundle/rootfs" | cut -f1)

# --- the registry --------------------------------------------------------------------------
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$W/registry.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $W/registry
http:
  addr: 127.0.0.1:$PORT
EOF
docker-registry serve "$W/registry.yml" >"$W/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/v2/" >/dev/null && break; sleep 0.1; done
REF=127.0.0.1:$PORT/bench:1
skopeo copy --quiet --dest-tls-verify=false "oci:$W/oci:bench" "docker://$REF"
BLOB_MB=$(du -sm "$W/registry/docker/registry/v2/blobs" | cut -f1)

# --- the floor: skopeo copy to a directory ---------------------------------------------------
floor=()
for _ in $(seq "$RUNS"); do
    rm -rf "$W/floor"; sync
    t0=$(ms); skopeo copy --quiet --src-tls-verify=false "docker://$REF" "dir:$W/floor"; t1=$(ms)
    floor+=($((t1 - t0)))
done
FLOOR=$(printf '%s\n' "${floor[@]}" | median)

# --- an unpack floor: GNU tar extracting the same layer blobs in order ----------------------
LAYERS=$(curl -sf -H 'accept: application/vnd.oci.image.manifest.v1+json' \
    "http://127.0.0.1:$PORT/v2/bench/manifests/1" |
    python3 -c 'import json,sys; print(" ".join(l["digest"][7:] for l in json.load(sys.stdin)["layers"]))')
untar=()
for _ in $(seq "$RUNS"); do
    rm -rf "$W/untar"; mkdir "$W/untar"; sync
    t0=$(ms)
    for h in $LAYERS; do tar xzf "$W/floor/$h" -C "$W/untar"; done
    t1=$(ms)
    untar+=($((t1 - t0)))
done
UNTAR=$(printf '%s\n' "${untar[@]}" | median)
rm -rf "$W/untar"

# --- the daemon ----------------------------------------------------------------------------
DATA=$W/data
mkdir -p "$DATA"
"$BIN" serve --data-dir "$DATA" --port 0 --default-vmm stub \
    --stub-vmm-binary "$PWD/target/release/hyperfleet-testvmm" --network off --proxy-port 0 \
    >"$W/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 200); do [ -s "$DATA/api.addr" ] && break; sleep 0.05; done
API=http://$(cat "$DATA/api.addr")
KEY=$(cat "$DATA/admin.key")
call() { curl -sf -H "Authorization: Bearer $KEY" -H 'content-type: application/json' "$@"; }

ours=() builds=()
for i in $(seq "$RUNS"); do
    sync
    t0=$(ms)
    id=$(call -d "{\"ref\":\"$REF\"}" "$API/images" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    while :; do
        st=$(call "$API/images/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
        [ "$st" != pulling ] && break
        sleep 0.02
    done
    t1=$(ms)
    [ "$st" = ready ] || { echo "pull failed: $(call "$API/images/$id")" >&2; exit 1; }
    ours+=($((t1 - t0)))
    builds+=($(call "$API/images/$id/events" | python3 -c 'import json,sys; print([e["detail"]["duration_ms"] for e in json.load(sys.stdin)["events"] if e["kind"]=="built"][0])'))
    # The last run's image stays for the create benchmark.
    [ "$i" -lt "$RUNS" ] && call -X DELETE "$API/images/$id"
done
if [ -n "${VERBOSE:-}" ]; then
    call "$API/images/$id/events" | python3 -c 'import json,sys
for e in json.load(sys.stdin)["events"]: print(e["at"], e["kind"], json.dumps(e["detail"])[:100])' >&2
fi
OURS=$(printf '%s\n' "${ours[@]}" | median)
BUILD=$(printf '%s\n' "${builds[@]}" | median)
FS_MB=$(du -sm "$DATA"/images/fs/*/rootfs.ext4 | cut -f1)

# --- ext4 vs erofs on the same tree ----------------------------------------------------------
sync
t0=$(ms); mkfs.ext4 -q -F -t ext4 -m 0 -E root_owner=0:0 -d "$W/bundle/rootfs" "$W/t.ext4" "$(( (TREE_MB * 5 / 4 + 256) ))M" >/dev/null 2>&1; t1=$(ms)
EXT4=$((t1 - t0))
t0=$(ms); mkfs.erofs "$W/t.erofs" "$W/bundle/rootfs" >/dev/null 2>&1 || echo "mkfs.erofs failed" >&2; t1=$(ms)
EROFS=$((t1 - t0))
t0=$(ms); mkfs.erofs -zlz4 "$W/t.erofs.lz4" "$W/bundle/rootfs" >/dev/null 2>&1 || echo "mkfs.erofs -zlz4 failed" >&2; t1=$(ms)
EROFS_LZ4=$((t1 - t0))

# --- create with the ready image vs without --------------------------------------------------
plain=() withimg=()
for i in $(seq "$CREATES"); do
    plain+=($(call -o /dev/null -w '%{time_total}\n' -d "{\"name\":\"p$i\"}" "$API/machines" | awk '{printf "%d", $1*1000}'))
    withimg+=($(call -o /dev/null -w '%{time_total}\n' -d "{\"name\":\"i$i\",\"image\":\"$REF\"}" "$API/machines" | awk '{printf "%d", $1*1000}'))
done
PLAIN=$(printf '%s\n' "${plain[@]}" | median)
WITH=$(printf '%s\n' "${withimg[@]}" | median)
USED=$(call "$API/images/$id/events" | python3 -c 'import json,sys; e=json.load(sys.stdin)["events"]; print(sum(x["kind"]=="used" for x in e), sum(x["kind"]=="unpacking" for x in e))')

RATIO=$(awk -v a="$OURS" -v b="$FLOOR" 'BEGIN {printf "%.2f", a/b}')
cat <<EOF
image: ${TREE_MB} MB unpacked, ${BLOB_MB} MB of blobs in the registry (3 gzip layers); ext4 file ${FS_MB} MB on disk
| what | median ms ($RUNS runs) |
|---|---|
| skopeo copy docker:// → dir: (floor) | $FLOOR |
| hyperfleet pull + unpack + ext4 (POST /images → ready) | $OURS (${RATIO}× floor) |
| of which unpack + mkfs.ext4 (the \`built\` event) | $BUILD |
| GNU tar xzf of the same layer blobs, in order (an unpack floor) | $UNTAR |
| mkfs.ext4 -d of the tree alone | $EXT4 |
| mkfs.erofs of the tree alone (uncompressed / lz4) | $EROFS / $EROFS_LZ4 |
| create without an image (median of $CREATES) | $PLAIN |
| create with the ready image (median of $CREATES) | $WITH (+$((WITH - PLAIN)) ms) |
image events after the creates: used=$(echo "$USED" | cut -d' ' -f1), unpacking=$(echo "$USED" | cut -d' ' -f2) (unpacking counts the pull's layers only)
EOF
