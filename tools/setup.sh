#!/usr/bin/env bash
# Installs what virtwire needs on a Debian 12 machine (idempotent, quiet when nothing is missing):
# Debian packages, the Python package with its test extras, and the default guest image.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(qemu-system-x86 qemu-utils iproute2 kmod cpio busybox-static iperf3 dpdk dpdk-dev tshark
      ethtool socat chromium gcc
      libxml2-utils libvirt-clients   # virt-xml-validate + libvirt's schemas (virtwire libvirt)
      libvirt-daemon libvirt-daemon-driver-qemu libvirt-dev pkg-config)  # libvirtd; libvirt-python
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# libvirtd started by hand (no systemd, no libvirt-daemon-system): the user it expects, and QEMU
# run as root with no cgroups and stdio in files. A qemu.conf someone wrote is left alone.
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
  useradd --system -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
if [ ! -e /etc/libvirt/qemu.conf ]; then
  mkdir -p /etc/libvirt
  printf '%s\n' '# written by virtwire tools/setup.sh (libvirtd without systemd)' \
    'user = "root"' 'group = "root"' 'stdio_handler = "file"' 'cgroup_controllers = [ ]' \
    > /etc/libvirt/qemu.conf
fi
if ! python3 -c 'import virtwire, pytest, hypothesis, numpy, libvirt' 2>/dev/null || [ -n "${CI:-}" ]; then
  echo "setup: installing virtwire (editable) with test extras"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
fi
if python3 -m virtwire image --help >/dev/null 2>&1; then
  python3 -m virtwire image build
fi
