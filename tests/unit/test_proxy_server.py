"""Both halves over the real proxy wire protocol, without QEMU.

``ProxyBus`` plays QEMU's ``x-pci-proxy-dev``: it turns the driver's port and memory accesses
into PCI_CFGREAD/WRITE (configuration mechanism 1 at 0xCF8/0xCFC for one slot) and BAR_READ/WRITE
messages with absolute addresses, and shares guest RAM as a memfd with SYNC_SYSMEM. On the other
end ``PciProxyServer`` serves ``VirtioNet`` behind ``VirtioPciDevice`` in its own thread, with an
in-memory backend. Our virtio-net driver model drives it through the modern and the legacy
interface, frames go both ways, and the remote is torn down by closing the socket.
"""

from __future__ import annotations

import array
import os
import socket
import threading
import time

import pytest

from virtwire.backends.memory import MemoryBackend
from virtwire.hosts import pci_proxy as pp
from virtwire.memory import MmapGuestMemory
from virtwire.net.device import VirtioNet
from virtwire.net.driver import DmaAllocator, NetDriverConfig, VirtioNetDriver
from virtwire.pci import driver as pdrv
from virtwire.pci.device import VirtioPciDevice

SLOT = 3
RAM = 8 << 20


class ProxyBus:
    """``pci.driver.BusAccess`` that speaks the proxy protocol, as QEMU's proxy device does."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.addr = 0
        self.lock = threading.Lock()
        self.round_trips = 0

    def request(self, cmd: int, payload: bytes) -> int:
        with self.lock:
            self.sock.sendall(pp.encode(cmd, payload))
            data = b""
            while len(data) < 24:
                chunk = self.sock.recv(24 - len(data))
                assert chunk, "remote closed"
                data += chunk
            self.round_trips += 1
            rcmd, size = pp.HEADER.unpack(data[:16])
            assert (rcmd, size) == (pp.MPQEMU_CMD_RET, 8)
            return pp.RET.unpack(data[16:])[0]

    def _cfg(self, port: int, width: int, value: int | None) -> int:
        a = self.addr
        if not a & 0x80000000 or (a >> 16) & 0xFF or (a >> 11) & 0x1F != SLOT or (a >> 8) & 7:
            return (1 << 8 * width) - 1 if value is None else 0
        reg = (a & 0xFC) + port - 0xCFC
        if value is None:
            return self.request(pp.MPQEMU_CMD_PCI_CFGREAD, pp.PCI_CONF_DATA.pack(reg, 0, width))
        return self.request(pp.MPQEMU_CMD_PCI_CFGWRITE, pp.PCI_CONF_DATA.pack(reg, value, width))

    def _port(self, port: int, width: int, value: int | None = None) -> int:
        if port == 0xCF8 and width == 4:
            if value is not None:
                self.addr = value
            return self.addr
        if 0xCFC <= port <= 0xCFF:
            return self._cfg(port, width, value)
        return self._bar(port, width, value, memory=False)

    def _bar(self, addr: int, width: int, value: int | None, memory: bool) -> int:
        cmd = pp.MPQEMU_CMD_BAR_READ if value is None else pp.MPQEMU_CMD_BAR_WRITE
        return self.request(cmd, pp.BAR_ACCESS.pack(addr, value or 0, width, memory))

    def inb(self, p): return self._port(p, 1)  # noqa: E704
    def inw(self, p): return self._port(p, 2)  # noqa: E704
    def inl(self, p): return self._port(p, 4)  # noqa: E704
    def outb(self, p, v): self._port(p, 1, v)  # noqa: E704
    def outw(self, p, v): self._port(p, 2, v)  # noqa: E704
    def outl(self, p, v): self._port(p, 4, v)  # noqa: E704
    def readb(self, a): return self._bar(a, 1, None, True)  # noqa: E704
    def readw(self, a): return self._bar(a, 2, None, True)  # noqa: E704
    def readl(self, a): return self._bar(a, 4, None, True)  # noqa: E704
    def writeb(self, a, v): self._bar(a, 1, v, True)  # noqa: E704
    def writew(self, a, v): self._bar(a, 2, v, True)  # noqa: E704
    def writel(self, a, v): self._bar(a, 4, v, True)  # noqa: E704


@pytest.fixture
def rig(request):
    transitional = getattr(request, "param", False)
    qemu, remote = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu.settimeout(5)
    be = MemoryBackend("mem0")
    net = VirtioNet(be, mac="52:54:00:aa:bb:cc", queue_size=64)
    pci = VirtioPciDevice(net, transitional=transitional)
    server = pp.PciProxyServer(remote, pci, [be])
    server.start_thread()
    fd = os.memfd_create("vwx-ram")
    os.ftruncate(fd, RAM)
    mem = MmapGuestMemory()
    mem.map_fd(fd, 0, RAM)
    # QEMU's realize: guest RAM first (fds with the header), then config accesses.
    gpas, sizes, offs = [0] + [0] * 7, [RAM] + [0] * 7, [0] * 8
    qemu.sendmsg([pp.encode(pp.MPQEMU_CMD_SYNC_SYSMEM, pp.SYNC_SYSMEM.pack(*gpas, *sizes, *offs))],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    bus = ProxyBus(qemu)
    try:
        yield bus, server, net, be, mem, transitional
    finally:
        qemu.close()  # QEMU exits: the remote sees EOF and its loop ends
        assert server.stopped.wait(5)
        server.close()
        mem.close()
        os.close(fd)


def _bring_up(bus, mem, legacy):
    t = pdrv.probe_pci_transport(bus, legacy=legacy)
    drv = VirtioNetDriver(t, mem, DmaAllocator(0x100000, RAM - 0x100000),
                          NetDriverConfig(queue_size=64))
    return drv.probe()


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@pytest.mark.parametrize("rig", [False, True], ids=["modern", "legacy"], indirect=True)
def test_frames_both_ways_through_the_proxy(rig):
    bus, server, net, be, mem, legacy = rig
    drv = _bring_up(bus, mem, legacy)
    assert net.legacy == legacy and net.active
    assert drv.mac == bytes.fromhex("525400aabbcc")
    frames = [bytes([i]) * 6 + b"\x02" * 6 + b"\x08\x00" + os.urandom(46 + i) for i in range(100)]
    sent = 0

    def push() -> bool:
        nonlocal sent
        drv.reap_tx()  # the device works after answering the kick: the ring drains meanwhile
        sent += drv.send(frames[sent : sent + 10])
        return sent == 100

    _wait(push)
    _wait(lambda: len(be.sent) == 100)
    assert all(be.sent[i].endswith(frames[i]) for i in range(100))
    be.inject_many(frames)
    got: list[bytes] = []
    _wait(lambda: got.extend(f.data for f in drv.receive()) or len(got) >= 100)
    assert got == frames
    st = server.stats()
    assert st["proxy"]["refused"] == 0 and st["transport"]["bad_accesses"] == 0
    assert st["proxy"]["messages"]["BAR_WRITE"] > 0  # kicks went over the wire


@pytest.mark.parametrize("rig", [False], ids=["modern"], indirect=True)
def test_rx_frames_waiting_before_driver_ok_are_delivered_after(rig):
    bus, server, net, be, mem, _ = rig
    be.inject(b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"early".ljust(46, b"\0"))
    time.sleep(0.05)  # the loop sees the backend readable while the device is still reset
    drv = _bring_up(bus, mem, False)
    got: list[bytes] = []
    _wait(lambda: got.extend(f.data for f in drv.receive()) or len(got) >= 1)
    assert got[0][14:19] == b"early"


@pytest.mark.parametrize("rig", [False], ids=["modern"], indirect=True)
def test_link_change_reaches_the_driver_as_a_config_interrupt(rig):
    bus, server, net, be, mem, _ = rig
    drv = _bring_up(bus, mem, False)
    assert drv.link_up
    gen = net.config_generation
    server.call_in_loop(lambda: net.set_link(False))
    assert server.transport.isr & 2 and net.config_generation != gen  # ISR config bit set
    assert not drv.link_up
    assert drv.t.read_isr() == 2 and server.transport.isr == 0  # read-to-clear over the wire
    with pytest.raises(ZeroDivisionError):
        server.call_in_loop(lambda: 1 // 0)  # errors come back to the caller


@pytest.mark.parametrize("rig", [False], ids=["modern"], indirect=True)
def test_kvm_irqfd_route_raises_and_resamples(rig):
    bus, server, net, be, mem, _ = rig
    intr = os.eventfd(0, os.EFD_NONBLOCK)
    resample = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        bus.sock.sendmsg([pp.encode(pp.MPQEMU_CMD_SET_IRQFD)],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [intr,
                                                                                    resample]))])
        _wait(lambda: isinstance(server.transport.intx, pp.IrqfdIntx))
        server.call_in_loop(lambda: server.transport.queue(0))  # a used-buffer interrupt
        _wait(lambda: _read_efd(intr) == 1)
        os.eventfd_write(resample, 1)  # KVM: EOI while the ISR is still set -> raised again
        _wait(lambda: _read_efd(intr) == 1)
        _bring_up(bus, mem, False)  # the ISR read (reset path) drops the level: no re-raise
        os.eventfd_write(resample, 1)
        time.sleep(0.05)
        assert _read_efd(intr) == 0
    finally:
        os.close(intr)
        os.close(resample)


def _read_efd(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
