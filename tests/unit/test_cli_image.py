"""Image builder pieces without downloads: cpio writer, ELF deps, module order, cache checks."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys

import pytest

from virtwire.cli import main
from virtwire.guest import image
from virtwire.guest.image import CpioEntry, ImageError, elf_deps, module_load_order, write_cpio


def _parse_newc(data: bytes) -> list[tuple[str, int, int, bytes]]:
    out, pos = [], 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, size, mode, mtime = f[11], f[6], f[1], f[5]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos:pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out.append((name, mode, mtime, body))


def test_cpio_sorted_fixed_and_readable_by_cpio(tmp_path):
    entries = [
        CpioEntry("usr/bin/tool", stat.S_IFREG | 0o755, b"#!/bin/sh\n"),
        CpioEntry("init", stat.S_IFREG | 0o755, b"abc"),
        CpioEntry("usr", stat.S_IFDIR | 0o755),
        CpioEntry("usr/bin", stat.S_IFDIR | 0o755),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"/bin/busybox"),
        CpioEntry("bin", stat.S_IFDIR | 0o755),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev", stat.S_IFDIR | 0o755),
    ]
    a = write_cpio(entries)
    assert a == write_cpio(reversed(entries))  # order of input does not matter
    parsed = _parse_newc(a)
    names = [p[0] for p in parsed]
    assert names == sorted(names)
    assert all(p[2] == 0 for p in parsed)  # mtimes
    assert dict((p[0], p[3]) for p in parsed)["init"] == b"abc"
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=a, capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == names
    with pytest.raises(ImageError, match="duplicate"):
        write_cpio([CpioEntry("a", stat.S_IFREG), CpioEntry("a", stat.S_IFREG)])


def test_gzip_is_reproducible():
    data = b"x" * 10000
    assert image._gzip_n(data) == image._gzip_n(data)
    assert image._gzip_n(data)[4:8] == b"\0\0\0\0"  # mtime field zero, like gzip -n


def test_elf_deps_of_the_python_binary():
    with open(sys.executable, "rb") as f:
        needed, interp = elf_deps(f.read())
    assert any(n.startswith("libc.so") for n in needed)
    assert interp and interp.startswith("/lib")
    with pytest.raises(ImageError):
        elf_deps(b"#!/bin/sh\n" + b"\0" * 64)


def test_module_load_order_puts_dependencies_first(tmp_path):
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko "
        "kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio.ko:\n"
        "kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio_pci_legacy_dev.ko:\n"
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko "
        "kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
        "kernel/net/core/failover.ko:\n")
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci_legacy_dev.ko\n")
    order = [image._modname(p) for p in module_load_order(tmp_path, ["virtio_pci", "virtio_net"])]
    assert set(order) == {"virtio", "virtio_ring", "virtio_pci", "failover", "net_failover",
                          "virtio_net"}
    for a, b in [("virtio", "virtio_ring"), ("virtio_ring", "virtio_pci"),
                 ("failover", "net_failover"), ("net_failover", "virtio_net")]:
        assert order.index(a) < order.index(b)
    with pytest.raises(ImageError, match="not in modules.dep"):
        module_load_order(tmp_path, ["nosuch"])


def _fake_image(root, kernel=b"K" * 100, initramfs=b"I" * 50):
    key = "0123456789abcdef"
    d = root / "virtwire" / "images" / key
    d.mkdir(parents=True)
    (d / "vmlinuz").write_bytes(kernel)
    (d / "initramfs.cpio.gz").write_bytes(initramfs)
    man = {"kernel_release": "6.1.0-test", "packages": {"x": "1"},
           "kernel": {"file": "vmlinuz", "size": len(kernel),
                      "sha256": hashlib.sha256(kernel).hexdigest()},
           "initramfs": {"file": "initramfs.cpio.gz", "size": len(initramfs),
                         "sha256": hashlib.sha256(initramfs).hexdigest()}}
    (d / "manifest.json").write_text(json.dumps(man))
    (root / "virtwire" / "current.json").write_text(json.dumps({"key": key}))
    return d


def test_image_path_json_and_corruption(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = _fake_image(tmp_path)
    assert main(["image", "path", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kernel"] == str(d / "vmlinuz")
    assert out["initramfs"] == str(d / "initramfs.cpio.gz")
    assert out["kernel_release"] == "6.1.0-test"
    # Same size, one byte changed: only the checksum can tell.
    (d / "initramfs.cpio.gz").write_bytes(b"I" * 49 + b"J")
    assert main(["image", "path"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0] and "virtwire image build" in err[0]
    (d / "vmlinuz").unlink()
    assert main(["vm", "-c", "true"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
