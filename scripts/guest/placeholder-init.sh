#!/bin/busybox sh
# Hyperfleet placeholder guest init (stand-in for the Rust agent as PID 1).
#
# Stage 1 (in the initramfs, marker /.hf-initramfs): mount proc/sys/dev, load the modules listed
# in /lib/modules/<release>/hf-modules.load in that order, then, when the kernel command line
# carries hf.root=DEV, mount DEV and switch_root to its /sbin/init (this same script).
# Stage 2 (or stage 1 without hf.root=): configure eth0 from hf.ip=/hf.gw=, start busybox acpid
# for the ACPI power button, print "HF-READY ..." on the console and on the virtio-serial port
# named hf.agent (default; override with hf.port=), answer "ping" lines on that port with
# "pong <uptime>", and power off cleanly on SIGUSR2 (busybox `poweroff`, which the acpid action
# sends) or on a "poweroff" line.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

log() { echo "hf-init: $*" > /dev/console; }
up() { read -r _up _ < /proc/uptime; echo "$_up"; } # no fork: builtin read

# (busybox-static has no `mountpoint` applet)
[ -e /proc/self ] || mount -t proc -o nosuid,nodev,noexec proc /proc
is_mounted() { grep -q "^[^ ]* $1 " /proc/mounts; }
is_mounted /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
is_mounted /dev || mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
[ -e /dev/console ] || mknod -m 600 /dev/console c 5 1

read -r CMDLINE < /proc/cmdline
T_INIT=${T_INIT:-$(up)}
arg() { # arg NAME -> value of NAME= on the kernel command line
  for w in $CMDLINE; do case "$w" in "$1="*) echo "${w#*=}"; return 0;; esac; done; return 1
}

load_modules() {
  rel=$(uname -r)
  list=/lib/modules/$rel/hf-modules.load
  [ -f "$list" ] || { log "no module list $list"; return 0; }
  while read -r name path; do
    case "$name" in ''|'#'*) continue;; esac
    insmod "/lib/modules/$rel/$path" || log "insmod $name failed"
  done < "$list"
}

grep -q '^virtio_console ' /proc/modules 2>/dev/null || { load_modules; T_MODS=$(up); }

if [ -e /.hf-initramfs ] && root=$(arg hf.root); then
  i=0
  while [ ! -b "$root" ] && [ $i -lt 2000 ]; do usleep 1000; i=$((i+1)); done
  mkdir -p /newroot
  if mount -t "$(arg hf.rootfstype || echo ext4)" -o "$(arg hf.rootflags || echo rw,noatime)" "$root" /newroot \
     && [ -x /newroot/sbin/init ]; then
    T_SWITCH=$(up) # before /proc moves away
    for m in dev proc sys; do mkdir -p /newroot/$m; mount --move /$m /newroot/$m; done
    export T_INIT T_MODS T_SWITCH
    exec switch_root /newroot /sbin/init
  fi
  log "HF-ROOT-FAILED: could not mount $root or no /sbin/init on it; staying in the initramfs"
fi

mkdir -p /tmp /run
is_mounted /tmp || mount -t tmpfs -o mode=1777 tmpfs /tmp
is_mounted /run || mount -t tmpfs -o mode=0755 tmpfs /run
hostname "$(arg hf.hostname || echo hyperfleet)"
ip link set lo up 2>/dev/null
if ip=$(arg hf.ip); then
  ip link set eth0 up && ip addr add "$ip" dev eth0 || log "eth0 setup failed"
  gw=$(arg hf.gw) && ip route add default via "$gw"
fi

# Power button: busybox acpid runs /etc/acpi/PWRF/00000080 (which calls `poweroff`, i.e. SIGUSR2
# to PID 1) when the ACPI button driver reports KEY_POWER through evdev.
acpid -c /etc/acpi -l /run/acpid.log 2>/dev/null || log "acpid failed to start"

shutdown_now() {
  log "shutting down ($1)"
  kill -TERM -1 2>/dev/null
  sync
  mount -o remount,ro / 2>/dev/null
  sync
  if [ "$1" = reboot ]; then reboot -f; else poweroff -f; fi
}
trap 'shutdown_now poweroff' USR2
trap 'shutdown_now poweroff' USR1
trap 'shutdown_now reboot' TERM

stage=rootfs; [ -e /.hf-initramfs ] && stage=initramfs
pname=$(arg hf.port || echo hf.agent)
port=
i=0
while [ -z "$port" ] && [ $i -lt 5000 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ -f "$p/name" ] && [ "$(cat "$p/name")" = "$pname" ] && port=/dev/${p##*/}
  done
  [ -n "$port" ] && [ -c "$port" ] && break
  port=; usleep 1000; i=$((i+1))
done
arg hf.dmesg >/dev/null && dmesg > /dev/console # debugging aid: kernel log on the console
ready="HF-READY stage=$stage uptime=$(up) init=$T_INIT modules=${T_MODS:-} switch_root=${T_SWITCH:-}"
echo "$ready" > /dev/console
if [ -n "$port" ]; then
  # One opener only (virtio-console ports allow a single open): the responder owns the port.
  (
    exec 3<>"$port"
    echo "$ready" >&3
    while :; do
      if read -r line <&3; then
        case "$line" in
          ping*) read -r u _ < /proc/uptime; echo "pong $u" >&3 ;;
          poweroff*) echo "bye" >&3; kill -USR2 1 ;;
          *) echo "err unknown" >&3 ;;
        esac
      else
        usleep 10000 # host side not connected: reads return EOF at once
      fi
    done
  ) &
else
  log "virtio-serial port $pname not found"
fi

while :; do sleep 3600 & wait $!; done
