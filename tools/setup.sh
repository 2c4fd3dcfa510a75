#!/usr/bin/env bash
# Installs what virtwire needs on a Debian 12 machine (idempotent, quiet when nothing is missing):
# Debian packages, the Python package with its test extras, and the default guest image.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(qemu-system-x86 qemu-utils iproute2 kmod cpio busybox-static iperf3 dpdk dpdk-dev tshark
      ethtool socat chromium gcc
      libxml2-utils libvirt-clients)  # virt-xml-validate + libvirt's schemas (virtwire libvirt)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! python3 -c 'import virtwire, pytest, hypothesis, numpy' 2>/dev/null || [ -n "${CI:-}" ]; then
  echo "setup: installing virtwire (editable) with test extras"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
fi
if python3 -m virtwire image --help >/dev/null 2>&1; then
  python3 -m virtwire image build
fi
