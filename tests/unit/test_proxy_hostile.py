"""Issue 14 against the PCI proxy server over a real socket: a peer that shrinks guest RAM
under the mapping (defect 1) or passes a pipe as the irqfd's resample fd (defect 5)."""

from __future__ import annotations

import array
import os
import socket
import time

from virtwire.backends.memory import MemoryBackend
from virtwire.hosts import pci_proxy as pp
from virtwire.memory import MmapGuestMemory
from virtwire.net.device import VirtioNet
from virtwire.net.driver import DmaAllocator, NetDriverConfig, VirtioNetDriver
from virtwire.pci import driver as pdrv
from virtwire.pci.device import VirtioPciDevice

RAM = 8 << 20


def _rig(seal: bool):  # noqa: ANN202
    from tests.unit.test_proxy_server import ProxyBus  # the QEMU side of the wire

    qemu, remote = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu.settimeout(5)
    be = MemoryBackend("mem0")
    net = VirtioNet(be, mac="52:54:00:aa:bb:cc", queue_size=64)
    server = pp.PciProxyServer(remote, VirtioPciDevice(net), [be])
    server.start_thread()
    fd = os.memfd_create("vwx-ram", os.MFD_ALLOW_SEALING if seal else 0)
    os.ftruncate(fd, RAM)
    mem = MmapGuestMemory()
    mem.map_fd(fd, 0, RAM)
    gpas, sizes, offs = [0] + [0] * 7, [RAM] + [0] * 7, [0] * 8
    qemu.sendmsg([pp.encode(pp.MPQEMU_CMD_SYNC_SYSMEM, pp.SYNC_SYSMEM.pack(*gpas, *sizes, *offs))],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    return ProxyBus(qemu), server, mem, fd


def test_shrunk_guest_ram_closes_the_connection_not_the_process() -> None:
    """In a child process (on main the SIGBUS kills it): bring the device up, truncate the
    unsealable memfd, kick; the server must drop the connection and the process live."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            bus, server, mem, fd = _rig(seal=False)
            t = pdrv.probe_pci_transport(bus, legacy=False)
            drv = VirtioNetDriver(t, mem, DmaAllocator(0x100000, RAM - 0x100000),
                                  NetDriverConfig(queue_size=64))
            drv.probe()
            drv.send([b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + bytes(46)])
            os.ftruncate(fd, 0)
            for _ in range(20):
                try:
                    t.notify(1)  # kick TX: the device touches the shrunk RAM
                    bus.inl(0xCFC)
                except (AssertionError, OSError):
                    break
                time.sleep(0.05)
            code = 0 if server.stopped.wait(5) else 2
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"killed by signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) == 0


def test_resample_fd_must_be_an_eventfd() -> None:
    bus, server, mem, fd = _rig(seal=True)
    intr = os.eventfd(0, os.EFD_NONBLOCK)
    r, w = os.pipe()
    os.close(w)  # a pipe whose writer is gone: readable forever
    try:
        before = server.remote.refused
        bus.sock.sendmsg([pp.encode(pp.MPQEMU_CMD_SET_IRQFD)],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [intr, r]))])
        deadline = time.monotonic() + 5
        while server.remote.refused == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.remote.refused == before + 1
        assert not isinstance(server.transport.intx, pp.IrqfdIntx)
        iterations = server.loop.iterations
        time.sleep(0.2)
        assert server.loop.iterations - iterations < 100  # not spinning on the pipe
        assert bus.request(pp.MPQEMU_CMD_PCI_CFGREAD, pp.PCI_CONF_DATA.pack(0, 0, 2)) == 0x1AF4
    finally:
        os.close(intr)
        os.close(r)
        bus.sock.close()
        server.stopped.wait(5)
        server.close()
        mem.close()
        os.close(fd)
