#!/bin/busybox sh
# virtwire guest /init (packed into the initramfs by virtwire.guest.image).
#
# Mounts proc/sys/dev, loads the virtio-net modules listed in /lib/modules/load-order (dependencies
# first), reads vw.* kernel arguments from /proc/cmdline, configures the NICs, prints the ready
# marker on the console and runs a shell on ttyS0. When that shell exits, the guest powers off.
#
# Kernel arguments (dotted names are not passed to init by the kernel; we read /proc/cmdline):
#   vw.ip=ADDR/LEN     address of eth0        vw.ipN=ADDR/LEN  address of ethN (N = 1, 2, ...)
#   vw.gw=ADDR         default route          vw.hostname=NAME
#   vw.mtu=N           MTU for every ethN that gets an address
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root TERM=vt100 PS1='vw# '
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

# busybox insmod does not read /proc/cmdline: pass each `module.param=value` kernel argument to its
# module ourselves (as the kernel does for built-in code), e.g. virtio_pci.force_legacy=1.
cmdline=$(cat /proc/cmdline)
while read -r mod; do
  [ -n "$mod" ] || continue
  name=${mod##*/}; name=${name%.ko}; name=$(echo "$name" | tr - _)
  params=
  for arg in $cmdline; do
    case "$arg" in "$name".*=*) params="$params ${arg#"$name".}" ;; esac
  done
  # shellcheck disable=SC2086
  insmod "/lib/modules/$mod" $params || echo "virtwire-init: insmod $mod failed"
done < /lib/modules/load-order

ip link set lo up

gw=; mtu=; ips=
for arg in $(cat /proc/cmdline); do
  key=${arg%%=*}
  val=${arg#*=}
  case "$key" in
    vw.ip) ips="$ips 0=$val" ;;
    vw.ip[0-9]|vw.ip[0-9][0-9]) ips="$ips ${key#vw.ip}=$val" ;;
    vw.gw) gw=$val ;;
    vw.mtu) mtu=$val ;;
    vw.hostname) hostname "$val" ;;
  esac
done

summary=
for pair in $ips; do
  dev=eth${pair%%=*}
  addr=${pair#*=}
  i=0
  while [ ! -e "/sys/class/net/$dev" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  if [ ! -e "/sys/class/net/$dev" ]; then
    echo "virtwire-init: no $dev for address $addr"
    continue
  fi
  [ -n "$mtu" ] && ip link set "$dev" mtu "$mtu"
  ip addr add "$addr" dev "$dev" && ip link set "$dev" up
  summary="$summary $dev=$addr"
done
[ -n "$gw" ] && ip route add default via "$gw"

echo "virtwire-guest-ready kernel=$(uname -r)$summary"
setsid cttyhack sh
poweroff -f
