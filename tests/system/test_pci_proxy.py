"""A Debian guest under QEMU TCG on virtwire's whole virtio-net PCI device (QEMU's PCI proxy).

``GuestVM(net=["pci,backend=tap,ifname=T"])`` starts QEMU with ``-device x-pci-proxy-dev,fd=N``
and serves the other end of the socketpair in a sidecar thread: every config and BAR access of
the guest is a round trip to our ``VirtioPciDevice``, guest RAM is mapped from SYNC_SYSMEM, and
interrupts go through the qtest server beside the guest. Each test makes its own namespace with a
persistent TAP (10.78.x.1/24, the host end) which the sidecar opens inside that namespace.
Teardown (QEMU, sidecar, namespace) happens in ``finally`` blocks of the context managers.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from virtwire.guest.qemu import GuestVM
from virtwire.netns import Netns, netns_with_tap
from virtwire.testing import transfer

pytestmark = pytest.mark.system

MIB16 = 16 << 20


@contextmanager
def pci_guest(image, subnet: int, *, transitional: bool = False, opts: str = "",
              memory: str = "256M") -> Iterator[tuple[Netns, str, GuestVM]]:
    with netns_with_tap("vwx", addr=f"10.78.{subnet}.1/24") as (ns, tap):
        net = f"pci,backend=tap,ifname={tap}" + (",transitional=on" if transitional else "")
        net += f",{opts}" if opts else ""
        vm = GuestVM([net], ip=f"10.78.{subnet}.2/24", netns=ns.name, image=image,
                     memory=memory, name=f"vwx{os.getpid() % 10000}",
                     append="virtio_pci.force_legacy=1" if transitional else "")
        with vm:
            vm.wait_ready(90)
            yield ns, tap, vm
        # The sidecar stopped with QEMU: nothing it logged may be a crash.
        assert vm.pci_proxy.stopped.is_set()


def _sysfs(vm: GuestVM) -> dict[str, str]:
    """vendor/device/subsystem/class/driver of the one virtio-net function the guest sees."""
    out = vm.run(
        "for d in /sys/bus/pci/devices/*; do "
        "[ \"$(cat $d/vendor)\" = 0x1af4 ] || continue; echo dev=${d##*/}; "
        "for f in vendor device subsystem_vendor subsystem_device class revision; do "
        "echo $f=$(cat $d/$f); done; echo driver=$(basename $(readlink $d/driver)); "
        "echo net=$(ls $d/virtio*/net); done", timeout=20).output
    return dict(line.split("=", 1) for line in out.split() if "=" in line)


# The guest's /init hands ``module.param=`` kernel arguments to insmod: force_legacy must be set.
_FORCE_LEGACY = "cat /sys/module/virtio_pci/parameters/force_legacy"


def _ping_received(output: str) -> int:
    m = re.search(r"(\d+) packets received", output)
    assert m, output
    return int(m.group(1))


def tcp_both_ways(vm: GuestVM, ns: Netns, host_ip: str, guest_ip: str, size: int) -> None:
    """``size`` random bytes guest -> host and host -> guest; sha256 must match both ways."""
    transfer.tcp_both_ways(vm, ns, host_ip, guest_ip, size, ports=(5301, 5302), io_timeout=180)


def _check_sidecar(vm: GuestVM) -> dict:
    st = vm.pci_proxy.stats()
    assert st["proxy"]["refused"] == 0, st["proxy"]
    assert st["transport"]["bad_accesses"] == 0, st["transport"]
    assert st["intx"]["raises"] > 0 and st["intx"]["lower_timeouts"] == 0, st["intx"]
    assert st["device"]["counters"]["needs_reset"] == 0, st["device"]
    return st


def test_modern_device_binds_pings_and_carries_16mib_each_way(guest_image):
    with pci_guest(guest_image, 1) as (ns, tap, vm):
        f = _sysfs(vm)
        assert (f["vendor"], f["device"], f["subsystem_vendor"], f["subsystem_device"],
                f["class"], f["revision"]) == ("0x1af4", "0x1041", "0x1af4", "0x1100",
                                               "0x020000", "0x01"), f
        assert f["driver"] == "virtio-pci" and f["net"] == "eth0", f
        mac = vm.run("cat /sys/class/net/eth0/address", timeout=20).output.strip()
        assert bytes.fromhex(mac.replace(":", "")) == vm.pci_proxy.device.mac
        out = vm.run("ping -c 100 -i 0.05 -W 2 10.78.1.1", timeout=120).output
        assert _ping_received(out) == 100, out
        tcp_both_ways(vm, ns, "10.78.1.1", "10.78.1.2", MIB16)
        # A link change is a configuration interrupt (ISR bit 1) through the same INTx path.
        px = vm.pci_proxy
        for up, want in ((False, "0"), (True, "1")):
            px.call_in_loop(lambda up=up: px.device.set_link(up))
            deadline = time.monotonic() + 10
            while vm.run("cat /sys/class/net/eth0/carrier", timeout=20).output.strip() != want:
                assert time.monotonic() < deadline, f"guest carrier never became {want}"
                time.sleep(0.2)
        assert _ping_received(vm.run("ping -c 5 -i 0.1 -W 2 10.78.1.1", timeout=30).output) == 5
        st = _check_sidecar(vm)
        assert "VERSION_1" in st["device"]["features"]
        assert not vm.pci_proxy.device.legacy
        assert ns.link_stats(tap)["rx_packets"] >= 100


def test_transitional_device_under_force_legacy(guest_image):
    # EVENT_IDX stays on: the legacy interface is always split, so the guest's control commands
    # are kicked only if the device re-arms avail_event after each one.
    with pci_guest(guest_image, 2, transitional=True) as (ns, tap, vm):
        out = vm.run(_FORCE_LEGACY, timeout=20).output
        assert out.strip().endswith("Y"), out
        f = _sysfs(vm)
        assert (f["vendor"], f["device"], f["subsystem_vendor"], f["subsystem_device"],
                f["class"], f["revision"]) == ("0x1af4", "0x1000", "0x1af4", "0x0001",
                                               "0x020000", "0x00"), f
        assert f["driver"] == "virtio-pci" and f["net"] == "eth0", f
        # The guest drives the legacy I/O BAR: 32 feature bits, no VERSION_1.
        feats = vm.run("cat /sys/class/net/eth0/device/features", timeout=20).output.strip()
        assert len(feats) == 64 and "1" not in feats[32:], feats
        assert vm.pci_proxy.device.legacy
        out = vm.run("ping -c 100 -i 0.05 -W 2 10.78.2.1", timeout=120).output
        assert _ping_received(out) == 100, out
        tcp_both_ways(vm, ns, "10.78.2.1", "10.78.2.2", MIB16)
        st = _check_sidecar(vm)
        assert "VERSION_1" not in st["device"]["features"]
        assert "EVENT_IDX" in st["device"]["features"]  # the control queue re-arms its kicks
        assert vm.pci_proxy.transport.legacy_bar.base != 0

