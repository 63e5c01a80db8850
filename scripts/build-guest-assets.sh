#!/usr/bin/env bash
# build-guest-assets.sh OUTDIR [AGENT_BINARY]
#
# Builds Hyperfleet's guest assets from Debian packages only (nothing is installed on the host):
#   OUTDIR/vmlinux           uncompressed PVH-capable ELF kernel (from linux-image-*-cloud-amd64)
#   OUTDIR/initramfs.cpio[.gz|.lz4]  busybox-static + virtio/vsock/button/evdev modules + /init
#   OUTDIR/rootfs.ext4       sparse ext4 image (mkfs.ext4 -d): busybox + modules + /sbin/init
#   OUTDIR/kernel.config     the kernel's config (for feature checks)
#   OUTDIR/manifest.json     file name, sha256, size, source package + version of each asset
# /init is AGENT_BINARY when given, else guest/placeholder-init.sh (beside this script).
#
# Environment:
#   HF_KERNEL_PKG        kernel package, NAME or NAME=VERSION (default: the dependency of the
#                        candidate linux-image-cloud-amd64 metapackage)
#   HF_INITRD_COMPRESS   none (default: fastest under TCG, see NOTES.md) | gzip | lz4
#   HF_ROOTFS_SIZE       size of rootfs.ext4 (default 512M; sparse)
#   HF_EXTRA_MODULES     more module names to include (deps resolved through modules.dep)
#   HF_DEB_CACHE         where downloaded .debs are kept (default /var/cache/hyperfleet/debs)
#   SOURCE_DATE_EPOCH    timestamp for every file/inode/superblock (default: the kernel
#                        package's vmlinuz mtime, so output depends only on package versions)
set -euo pipefail
export LC_ALL=C TZ=UTC

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { printf '[build-guest-assets] %s\n' "$*" >&2; }
die() { printf '[build-guest-assets] ERROR: %s\n' "$*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 OUTDIR [AGENT_BINARY]"
OUTDIR=$1
AGENT=${2:-}
[ -z "$AGENT" ] || [ -f "$AGENT" ] || die "agent binary $AGENT not found"
INITRD_COMPRESS=${HF_INITRD_COMPRESS:-none}
ROOTFS_SIZE=${HF_ROOTFS_SIZE:-512M}
DEB_CACHE=${HF_DEB_CACHE:-/var/cache/hyperfleet/debs}
PLACEHOLDER=$HERE/guest/placeholder-init.sh
[ -f "$PLACEHOLDER" ] || die "missing $PLACEHOLDER"

# Modules the guest needs, in load order (deps are inserted before each one from modules.dep).
MODULES=(virtio_ring virtio virtio_mmio virtio_blk virtio_net virtio_console
         vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport button evdev)
# shellcheck disable=SC2206
MODULES+=(${HF_EXTRA_MODULES:-})
# Built in and required (checked against the package's config).
REQUIRED_BUILTIN=(CONFIG_PVH CONFIG_EXT4_FS CONFIG_DEVTMPFS CONFIG_BLK_DEV_INITRD CONFIG_ACPI
                  CONFIG_SERIAL_8250_CONSOLE CONFIG_UNIX CONFIG_INET)

for t in apt-get apt-cache dpkg-deb lz4 cpio depmod mkfs.ext4 debugfs readelf sha256sum gzip od dd; do
  command -v "$t" >/dev/null || die "$t not found (run install-deps.sh)"
done

WORK=$(mktemp -d /tmp/hf-assets.XXXXXX)
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$OUTDIR" "$DEB_CACHE"
OUTDIR=$(cd "$OUTDIR" && pwd)

# --- packages --------------------------------------------------------------------------------
# candidate_field PKG FIELD: the field of the candidate version (what `apt-get install` would pick)
# first_field FIELD: value of the first "FIELD: " line on stdin (reads all input: no SIGPIPE upstream)
first_field() { awk -v k="$1: " '!done && index($0, k) == 1 { print substr($0, length(k) + 1); done = 1 }'; }
candidate_field() { apt-cache show --no-all-versions "$1" 2>/dev/null | first_field "$2"; }

APT_UPDATED=0
# candidate_version PKG: like candidate_field PKG Version, running `apt-get update` once when
# apt's lists do not know PKG yet
candidate_version() {
  local v
  v=$(candidate_field "$1" Version)
  if [ -z "$v" ] && [ "$APT_UPDATED" = 0 ]; then
    log "apt lists do not know $1: apt-get update"
    apt-get update -q >&2 </dev/null
    APT_UPDATED=1
    v=$(candidate_field "$1" Version)
  fi
  [ -n "$v" ] || die "apt knows no package $1"
  echo "$v"
}

# fetch_deb NAME [VERSION] -> prints the path of the .deb in the cache, verified against the
# SHA256 of apt's (signed) index
fetch_deb() {
  local name=$1 ver=${2:-} info sha file tmp
  [ -n "$ver" ] || ver=$(candidate_version "$name")
  info=$(apt-cache show "$name=$ver" 2>/dev/null) || die "apt has no $name=$ver"
  sha=$(first_field SHA256 <<<"$info")
  file=$DEB_CACHE/$(basename "$(first_field Filename <<<"$info")")
  if [ -f "$file" ] && [ "$(sha256sum "$file" | cut -d' ' -f1)" = "$sha" ]; then
    log "cached $(basename "$file")"
  else
    log "apt-get download $name=$ver"
    tmp=$(mktemp -d "$DEB_CACHE/.dl.XXXXXX")
    (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$name=$ver" >&2 </dev/null)
    mv -f "$tmp"/*.deb "$file"; rmdir "$tmp"
    [ "$(sha256sum "$file" | cut -d' ' -f1)" = "$sha" ] || { rm -f "$file"; die "sha256 of $file does not match apt's index"; }
  fi
  echo "$file"
}

if [ -n "${HF_KERNEL_PKG:-}" ]; then
  KPKG=${HF_KERNEL_PKG%%=*}
  KVER_PKG=; [ "$HF_KERNEL_PKG" = "$KPKG" ] || KVER_PKG=${HF_KERNEL_PKG#*=}
else
  meta_ver=$(candidate_version linux-image-cloud-amd64)
  # e.g. "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
  dep=$(apt-cache show "linux-image-cloud-amd64=$meta_ver" | first_field Depends | tr ',' '\n' | grep -m1 -o 'linux-image-[^ ]*-cloud-amd64 ([^)]*)') \
    || die "cannot read the kernel dependency of linux-image-cloud-amd64"
  KPKG=${dep%% *}
  KVER_PKG=$(echo "$dep" | sed -E 's/.*\(= *([^)]*)\)/\1/')
  log "linux-image-cloud-amd64 $meta_ver depends on $KPKG ($KVER_PKG)"
fi
KDEB=$(fetch_deb "$KPKG" "$KVER_PKG")
KVER_PKG=$(dpkg-deb -f "$KDEB" Version)
BBDEB=$(fetch_deb busybox-static)
BB_VER=$(dpkg-deb -f "$BBDEB" Version)

log "dpkg -x $(basename "$KDEB") (unpacked in $WORK, never installed)"
dpkg -x "$KDEB" "$WORK/k"
dpkg -x "$BBDEB" "$WORK/bb"
KREL=$(basename "$(ls -d "$WORK"/k/lib/modules/*/ | head -n1)")
KCONFIG=$WORK/k/boot/config-$KREL
BZIMAGE=$WORK/k/boot/vmlinuz-$KREL
[ -f "$KCONFIG" ] && [ -f "$BZIMAGE" ] || die "package lacks boot/config-$KREL or boot/vmlinuz-$KREL"
: "${SOURCE_DATE_EPOCH:=$(stat -c %Y "$BZIMAGE")}"
export SOURCE_DATE_EPOCH
log "kernel release $KREL, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH"

cfg() { sed -n "s/^$1=//p" "$KCONFIG"; }
for c in "${REQUIRED_BUILTIN[@]}"; do
  [ "$(cfg "$c")" = y ] || die "kernel config: $c is '$(cfg "$c")', need y"
done

# --- vmlinux out of the bzImage --------------------------------------------------------------
# The setup header gives the payload position: (setup_sects+1)*512 + payload_offset (0x248),
# length payload_length (0x24c); the build appends the uncompressed size as 4 LE bytes.
u8()  { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
setup_sects=$(u8 "$BZIMAGE" $((0x1f1))); [ "$setup_sects" != 0 ] || setup_sects=4
poff=$(( (setup_sects + 1) * 512 + $(u32 "$BZIMAGE" $((0x248))) ))
plen=$(u32 "$BZIMAGE" $((0x24c)))
[ "$(cfg CONFIG_KERNEL_LZ4)" = y ] || die "kernel is not LZ4-compressed (only LZ4 is handled/tested)"
# LZ4 legacy frame magic 0x184C2102 (bytes 02 21 4c 18); the first hit must be the payload start.
moff=$(grep -m1 -obUaP '\x02\x21\x4c\x18' "$BZIMAGE"); moff=${moff%%$'\n'*}; moff=${moff%%:*}
[ "$moff" = "$poff" ] || die "LZ4 magic at $moff but header payload at $poff"
usize=$(u32 "$BZIMAGE" $((poff + plen - 4)))
log "bzImage: LZ4 payload at $poff, $plen bytes, uncompressed $usize bytes"
dd if="$BZIMAGE" iflag=skip_bytes,count_bytes skip="$poff" count=$((plen - 4)) bs=1M status=none | lz4 -dc > "$WORK/vmlinux"
[ "$(stat -c %s "$WORK/vmlinux")" = "$usize" ] || die "vmlinux size mismatch"
[ "$(head -c 4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || die "vmlinux is not ELF"
# PVH entry = Xen ELF note type 18 (XEN_ELFNOTE_PHYS32_ENTRY); binutils 2.40 prints it as 0x00000012.
notes=$(readelf -Wn "$WORK/vmlinux")
grep -Eq '^[[:space:]]*Xen[[:space:]]+0x[0-9a-f]+[[:space:]]+(Unknown note type: \(0x00000012\)|.*PHYS32_ENTRY)' <<<"$notes" \
  || die "vmlinux has no Xen PVH (PHYS32_ENTRY) note"
log "vmlinux: ELF with PVH note OK"

# --- modules ---------------------------------------------------------------------------------
KMODDIR=$WORK/k/lib/modules/$KREL
depmod -b "$WORK/k" "$KREL"
if [ "$(cfg CONFIG_MODULE_DECOMPRESS)" = y ]; then MODDECOMP=yes; else MODDECOMP=no; fi
log "kernel in-kernel module decompression (CONFIG_MODULE_DECOMPRESS): $MODDECOMP; modules are stored decompressed"

declare -A SEEN=()
ORDER=()   # "name relpath(.ko)"
add_module() { # add_module NAME: its deps first (modules.dep lists them so that reversed = load order)
  local name=$1 line path deps d i
  [ -n "${SEEN[$name]:-}" ] && return 0
  if grep -Eq "/$name\.ko(\.[a-z0-9]+)?\$" "$KMODDIR/modules.builtin"; then
    log "module $name is built in"; SEEN[$name]=1; return 0
  fi
  line=$(grep -E "(^|/)$name\.ko(\.[a-z0-9]+)?:" "$KMODDIR/modules.dep" | head -n1) || die "module $name not in modules.dep"
  path=${line%%:*}
  read -r -a deps <<<"${line#*:}"
  for ((i=${#deps[@]}-1; i>=0; i--)); do
    d=$(basename "${deps[$i]}"); d=${d%%.ko*}
    add_module "$d"
  done
  [ -n "${SEEN[$name]:-}" ] && return 0
  SEEN[$name]=1
  ORDER+=("$name ${path%%.ko*}.ko")
  mkdir -p "$WORK/mods/$(dirname "$path")"
  case "$path" in
    *.ko)     cp "$KMODDIR/$path" "$WORK/mods/${path}" ;;
    *.ko.xz)  xz -dc "$KMODDIR/$path" > "$WORK/mods/${path%.xz}" ;;
    *.ko.zst) zstd -qdc "$KMODDIR/$path" > "$WORK/mods/${path%.zst}" ;;
    *.ko.gz)  gzip -dc "$KMODDIR/$path" > "$WORK/mods/${path%.gz}" ;;
    *) die "unknown module file $path" ;;
  esac
}
for m in "${MODULES[@]}"; do add_module "$m"; done
log "module load order: $(printf '%s\n' "${ORDER[@]}" | cut -d' ' -f1 | tr '\n' ' ')"

# --- staging tree (shared by the initramfs and the rootfs) ----------------------------------
S=$WORK/stage
mkdir -p "$S"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,mnt,newroot,root,etc/acpi/PWRF,var/log}
chmod 1777 "$S/tmp"
install -m 0755 "$WORK/bb/bin/busybox" "$S/bin/busybox"
"$S/bin/busybox" --list-full | while read -r a; do
  [ "$a" = bin/busybox ] && continue
  mkdir -p "$S/$(dirname "$a")"
  ln -sf /bin/busybox "$S/$a"
done
mknod -m 600 "$S/dev/console" c 5 1
mknod -m 666 "$S/dev/null" c 1 3
mkdir -p "$S/lib/modules/$KREL"
cp -a "$WORK/mods/." "$S/lib/modules/$KREL/"
cp "$KMODDIR"/modules.{builtin,builtin.modinfo,order} "$S/lib/modules/$KREL/"
depmod -b "$S" "$KREL"
rm -f "$S/lib/modules/$KREL"/*.bin   # binary indexes are not reproducible byte-for-byte; text ones suffice
{ echo "# name path (relative to /lib/modules/$KREL), load in this order with finit_module"
  printf '%s\n' "${ORDER[@]}"; } > "$S/lib/modules/$KREL/hf-modules.load"
printf '#!/bin/sh\nexec poweroff\n' > "$S/etc/acpi/PWRF/00000080"; chmod 0755 "$S/etc/acpi/PWRF/00000080"
echo "root:x:0:0:root:/root:/bin/sh" > "$S/etc/passwd"
echo "root:x:0:" > "$S/etc/group"
install -m 0755 "$PLACEHOLDER" "$S/bin/hf-placeholder-init"
if [ -n "$AGENT" ]; then
  install -m 0755 "$AGENT" "$S/sbin/hf-agent"
  INIT_SRC=/sbin/hf-agent
else
  INIT_SRC=/bin/hf-placeholder-init
fi
ln -sf "$INIT_SRC" "$S/sbin/init"

# fixed mtimes everywhere
normalize() { find "$1" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +; }

# initramfs = stage + /init + marker
I=$WORK/initramfs
cp -a "$S" "$I"
cp "$S$INIT_SRC" "$I/init"; chmod 0755 "$I/init"
: > "$I/.hf-initramfs"
normalize "$I"
case "$INITRD_COMPRESS" in
  none) INITRD=initramfs.cpio;     comp=(cat) ;;
  gzip) INITRD=initramfs.cpio.gz;  comp=(gzip -n -9) ;;
  lz4)  INITRD=initramfs.cpio.lz4; comp=(lz4 -l -9 -c) ;;   # kernel wants the legacy LZ4 format
  *) die "HF_INITRD_COMPRESS must be none, gzip or lz4" ;;
esac
(cd "$I" && find . -mindepth 1 | sort | cpio -o -H newc --reproducible -R 0:0 --quiet) | "${comp[@]}" > "$WORK/$INITRD"
log "initramfs: $INITRD $(stat -c %s "$WORK/$INITRD") bytes"

# rootfs = stage (with /init too, so it can also be booted with root= by an agent that does it)
R=$WORK/rootfs
cp -a "$S" "$R"
ln -sf "$INIT_SRC" "$R/init"
normalize "$R"
UUID=$(printf '%s' "hyperfleet-rootfs-$KREL-$SOURCE_DATE_EPOCH" | sha256sum | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
truncate -s "$ROOTFS_SIZE" "$WORK/rootfs.ext4"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -F -L hf-root -U "$UUID" -m 0 \
  -E "hash_seed=$UUID,root_owner=0:0,lazy_itable_init=0,nodiscard" -d "$R" "$WORK/rootfs.ext4"
# mkfs.ext4 -d copies each source file's ctime (which touch cannot set): pin it with debugfs.
(cd "$R" && find . -mindepth 1 | sort | sed "s|^\.\(.*\)|sif \"\1\" ctime @$SOURCE_DATE_EPOCH|") > "$WORK/ctime.debugfs"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f "$WORK/ctime.debugfs" "$WORK/rootfs.ext4" >/dev/null 2>"$WORK/debugfs.err" \
  || { cat "$WORK/debugfs.err" >&2; die "debugfs failed"; }
log "rootfs.ext4: $ROOTFS_SIZE sparse, $(du -k "$WORK/rootfs.ext4" | cut -f1) KiB allocated, UUID $UUID"

cp "$KCONFIG" "$WORK/kernel.config"

# --- output + manifest -----------------------------------------------------------------------
rm -f "$OUTDIR"/initramfs.cpio "$OUTDIR"/initramfs.cpio.gz "$OUTDIR"/initramfs.cpio.lz4
for f in vmlinux "$INITRD" rootfs.ext4 kernel.config; do
  cp --sparse=always "$WORK/$f" "$OUTDIR/$f.tmp" && mv -f "$OUTDIR/$f.tmp" "$OUTDIR/$f"
done
entry() { # entry FILE KIND PKG VER
  printf '    {"file": "%s", "kind": "%s", "sha256": "%s", "size": %s, "source_packages": [%s]}' \
    "$1" "$2" "$(sha256sum "$OUTDIR/$1" | cut -d' ' -f1)" "$(stat -c %s "$OUTDIR/$1")" "$3"
}
pk() { printf '{"name": "%s", "version": "%s"}' "$1" "$2"; }
KP=$(pk "$KPKG" "$KVER_PKG"); BP=$(pk busybox-static "$BB_VER")
agent_json=null
[ -z "$AGENT" ] || agent_json="{\"file\": \"$(basename "$AGENT")\", \"sha256\": \"$(sha256sum "$AGENT" | cut -d' ' -f1)\"}"
mods_json=$(printf '%s\n' "${ORDER[@]}" | awk '{printf "%s{\"name\": \"%s\", \"path\": \"%s\"}", (NR>1?", ":""), $1, $2}')
{
  echo '{'
  echo '  "format": 1,'
  echo "  \"kernel_release\": \"$KREL\","
  echo "  \"source_date_epoch\": $SOURCE_DATE_EPOCH,"
  echo "  \"init\": \"$INIT_SRC\","
  echo "  \"agent\": $agent_json,"
  echo "  \"initramfs_compression\": \"$INITRD_COMPRESS\","
  echo "  \"rootfs_uuid\": \"$UUID\","
  echo "  \"kernel_module_decompression\": $( [ $MODDECOMP = yes ] && echo true || echo false ),"
  echo "  \"modules_load_order\": [$mods_json],"
  echo '  "assets": ['
  entry vmlinux kernel "$KP"; echo ','
  entry "$INITRD" initramfs "$KP, $BP"; echo ','
  entry rootfs.ext4 rootfs "$KP, $BP"; echo ','
  entry kernel.config kernel-config "$KP"; echo
  echo '  ]'
  echo '}'
} > "$OUTDIR/manifest.json.tmp"
mv -f "$OUTDIR/manifest.json.tmp" "$OUTDIR/manifest.json"
log "wrote $OUTDIR/manifest.json"
cat "$OUTDIR/manifest.json"
