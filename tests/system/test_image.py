"""The guest image build: cached second build (no apt-get), byte-identical rebuild, contents."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from virtwire.guest import image

pytestmark = pytest.mark.system


@pytest.fixture
def no_apt_get(tmp_path, monkeypatch):
    """PATH with an apt-get that records any call and fails: builds must not need it."""
    shim = tmp_path / "shim"
    shim.mkdir()
    marker = tmp_path / "apt-get-called"
    (shim / "apt-get").write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    (shim / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
    return marker


def test_second_build_is_cached_and_downloads_nothing(guest_image, no_apt_get):
    proc = subprocess.run([sys.executable, "-m", "virtwire", "image", "build", "--json"],
                          capture_output=True, text=True, timeout=120, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["cached"] is True
    assert result["downloaded"] == []
    assert result["key"] == guest_image.key
    assert result["initramfs"] == str(guest_image.initramfs)
    assert not no_apt_get.exists(), "apt-get was run for a cached image"
    assert "cached" in proc.stderr  # the progress line says so


def test_rebuild_elsewhere_is_byte_identical(guest_image, no_apt_get, tmp_path):
    # A second, independent build from the cached .debs into another cache directory.
    result = image.build_image(root=tmp_path / "cache", debs=image.cache_root() / "debs")
    assert result["cached"] is False and result["downloaded"] == []
    assert not no_apt_get.exists()
    assert result["key"] == guest_image.key
    assert Path(result["initramfs"]).read_bytes() == guest_image.initramfs.read_bytes()
    assert Path(result["kernel"]).read_bytes() == guest_image.kernel.read_bytes()


def test_image_path_json(guest_image):
    proc = subprocess.run([sys.executable, "-m", "virtwire", "image", "path", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["kernel"] == str(guest_image.kernel)
    assert out["initramfs"] == str(guest_image.initramfs)
    assert out["kernel_release"] == guest_image.kernel_release


def test_initramfs_contents(guest_image):
    data = gzip.decompress(guest_image.initramfs.read_bytes())
    names = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True,
                           check=True).stdout.decode().split()
    assert names == sorted(names)
    rel = guest_image.kernel_release
    for must in ["init", "bin/busybox", "bin/sh", "usr/bin/iperf3", "dev/console",
                 "lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libiperf.so.0",
                 "lib/x86_64-linux-gnu/libc.so.6", "lib/modules/load-order"]:
        assert must in names, must
    mods = [os.path.basename(n)[:-3] for n in names if n.startswith(f"lib/modules/{rel}/")
            and n.endswith(".ko")]
    assert set(mods) == {"virtio", "virtio_ring", "virtio_pci_modern_dev",
                         "virtio_pci_legacy_dev", "virtio_pci", "failover", "net_failover",
                         "virtio_net",
                         # the emulated NICs `virtwire compare` boots the same guest on
                         "mii", "8139too", "8139cp", "e1000",
                         # VLAN interfaces in the guest (the device's VLAN filter)
                         "8021q", "garp", "mrp", "stp", "llc"}
    order = guest_image.manifest["modules"]
    # every module after what it depends on (modprobe order of the initramfs's /init)
    for dep, mod in [("virtio_ring", "virtio_net"), ("virtio_pci", "virtio_net"),
                     ("net_failover", "virtio_net"), ("failover", "net_failover"),
                     ("mii", "8139too"), ("mii", "8139cp"), ("garp", "8021q"),
                     ("mrp", "8021q"), ("stp", "garp"), ("llc", "stp")]:
        assert order.index(dep) < order.index(mod), (dep, mod, order)
    assert guest_image.manifest["packages"]["iperf3"]
