"""Fuzz target for the PCI proxy server: hostile message streams over a real socket.

Theory of operation
-------------------
A case is a list of steps: a proxy message (QEMU's ``x-pci-proxy-dev`` wire format; SYNC_SYSMEM
with real memfds -- sealed, sealable, unsealable, short -- and random gpas/sizes/offsets;
SET_IRQFD with eventfds, pipes or files; config and BAR reads/writes at random and at virtio's
interesting offsets), a write of random bytes into guest RAM, a truncation of the RAM file, or
raw bytes on the socket. ``run_steps`` serves a fresh ``VirtioPciDevice``/``VirtioNet`` (null
backend) with ``PciProxyServer`` on its own loop (no thread), the QEMU end draining replies.
Invariants: no callback fails in the loop, nothing raises out of it, the process survives
(truncation exercises the SIGBUS guard) and no fd is left after ``close()``. The loop itself is
``vhost_fuzz.coverage_loop``.
"""

from __future__ import annotations

import array
import mmap
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass

from virtwire.hosts import pci_proxy as pp
from virtwire.hosts.vhost_fuzz import FuzzReport, coverage_loop, fuzz_memfd, run_guarded

__all__ = ["ProxyStep", "build_case", "run_steps", "fuzz"]

RAM = 1 << 20


@dataclass
class ProxyStep:
    kind: str  # "msg", "poke", "truncate", "raw"
    cmd: int = 0
    payload: bytes = b""
    fds: tuple[str, ...] = ()
    offset: int = 0
    data: bytes = b""


def _sysmem(rng: random.Random) -> ProxyStep:
    n = rng.choice([1, 1, 1, 2, 8])
    gpas = [rng.choice([0, 0, RAM, 1 << 32, rng.getrandbits(64)]) for _ in range(n)]
    sizes = [rng.choice([RAM, RAM, RAM // 2, 0, 4096, RAM * 4]) for _ in range(n)]
    offs = [rng.choice([0, 0, 4096, -1, 3]) for _ in range(n)]
    pad = 8 - n
    payload = pp.SYNC_SYSMEM.pack(*gpas, *[0] * pad, *sizes, *[0] * pad, *offs, *[0] * pad)
    kinds = tuple(rng.choice(["mem-sealed", "mem-sealed", "mem-sealable", "mem-unsealable",
                              "pipe"]) for _ in range(rng.choice([n, n, n - 1, n + 1])))
    return ProxyStep("msg", pp.MPQEMU_CMD_SYNC_SYSMEM, payload, kinds)


def _access(rng: random.Random) -> ProxyStep:
    cmd = rng.choice([pp.MPQEMU_CMD_PCI_CFGREAD, pp.MPQEMU_CMD_PCI_CFGWRITE,
                      pp.MPQEMU_CMD_BAR_READ, pp.MPQEMU_CMD_BAR_WRITE])
    width = rng.choice([1, 2, 4, 4, 8, 3, 0])
    if cmd in (pp.MPQEMU_CMD_PCI_CFGREAD, pp.MPQEMU_CMD_PCI_CFGWRITE):
        addr = rng.choice([0, 4, 0x10, 0x14, 0x34, 0x40, 0x50, 0x60, 0xFE, 0x100,
                           rng.randrange(256)])
        return ProxyStep("msg", cmd, pp.PCI_CONF_DATA.pack(addr, rng.getrandbits(32), width))
    addr = rng.choice([0, 0x14, 0x16, 0x1C, 0x20, 0x28, 0x30, 0x1000, 0x2000, 0x3000,
                       rng.getrandbits(16), rng.getrandbits(64)])
    return ProxyStep("msg", cmd, pp.BAR_ACCESS.pack(addr, rng.getrandbits(64), width,
                                                    rng.random() < 0.7))


def _random_step(rng: random.Random) -> ProxyStep:
    k = rng.random()
    if k < 0.45:
        return _access(rng)
    if k < 0.6:
        return ProxyStep("poke", offset=rng.randrange(0, RAM - 256),
                         data=rng.randbytes(rng.choice([2, 16, 256])))
    if k < 0.65:
        return ProxyStep("truncate", offset=rng.choice([0, 4096]))
    if k < 0.67:  # rare: a partial message holds the proxy's blocking read for 2 s
        return ProxyStep("raw", data=rng.randbytes(rng.randint(1, 40)))
    if k < 0.8:
        return ProxyStep("msg", pp.MPQEMU_CMD_SET_IRQFD, b"",
                         tuple(rng.choice(["efd", "efd", "pipe", "file"])
                               for _ in range(rng.choice([2, 2, 1, 3]))))
    if k < 0.85:
        return _sysmem(rng)
    return ProxyStep("msg", rng.choice([pp.MPQEMU_CMD_DEVICE_RESET, pp.MPQEMU_CMD_RET, 9, -1]),
                     rng.randbytes(rng.choice([0, 8, 24])))


def build_case(rng: random.Random) -> list[ProxyStep]:
    steps = [_sysmem(rng)] + [_access(rng) for _ in range(rng.randint(5, 20))]
    for _ in range(rng.randint(3, 20)):
        steps.insert(rng.randint(1, len(steps)), _random_step(rng))
    return steps


class _Case:
    def __init__(self) -> None:
        from virtwire.backends.null import NullBackend
        from virtwire.net.device import VirtioNet
        from virtwire.pci.device import VirtioPciDevice

        self.qemu, remote = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.qemu.setblocking(False)
        be = NullBackend("fuzz")
        self.server = pp.PciProxyServer(remote, VirtioPciDevice(VirtioNet(be, queue_size=64)),
                                        [be])
        self.ram_fd: int | None = None
        self.ram: mmap.mmap | None = None

    def fd(self, kind: str) -> int:
        if kind.startswith("mem-"):
            fd = fuzz_memfd(kind, "vwfuzz-ram", RAM)
            if self.ram_fd is None:
                self.ram_fd = os.dup(fd)
                self.ram = mmap.mmap(self.ram_fd, RAM)
            return fd
        if kind == "efd":
            return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            return r
        return os.open("/dev/null", os.O_RDWR)

    def step(self, s: ProxyStep) -> None:
        if s.kind == "msg":
            fds = [self.fd(k) for k in s.fds]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            try:
                self.qemu.sendmsg([pp.encode(s.cmd & 0x7FFFFFFF, s.payload)], anc)
            except OSError:
                pass  # the server closed the connection
            finally:
                for fd in fds:
                    os.close(fd)
        elif s.kind == "poke" and self.ram is not None:
            self.ram[s.offset:s.offset + len(s.data)] = s.data
        elif s.kind == "truncate" and self.ram_fd is not None:
            try:
                os.ftruncate(self.ram_fd, s.offset)
            except OSError:
                pass
            else:
                if self.ram is not None:
                    self.ram.close()
                    self.ram = None
        elif s.kind == "raw":
            try:
                self.qemu.send(s.data)
            except OSError:
                pass
        for _ in range(3):
            self.server.loop.run_once(0)
            try:
                while self.qemu.recv(4096):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        self.qemu.close()
        for _ in range(3):
            self.server.loop.run_once(0)
        self.server.close()
        if self.ram is not None:
            self.ram.close()
        if self.ram_fd is not None:
            os.close(self.ram_fd)


def run_steps(steps: list[ProxyStep]) -> str | None:
    return run_guarded(_Case, steps, lambda case: case.server.loop.errors,
                       stop=lambda case: case.server.remote.closed)


def fuzz(cases: int, seconds: float, seed: int = 0,
         progress: Callable[[FuzzReport], None] | None = None) -> FuzzReport:
    return coverage_loop(cases, seconds, seed, build_case, _random_step, run_steps, progress)
