"""The remote side of QEMU's multi-process PCI proxy (``-device x-pci-proxy-dev,fd=N``).

Theory of operation
-------------------
QEMU's ``x-pci-proxy-dev`` (hw/remote/proxy.c, docs/devel/multi-process.rst) is a PCI device whose
configuration space and BARs live in another process: every config access and every BAR access a
guest vCPU makes is sent over a UNIX stream socket and the vCPU blocks until the remote answers. We
are that remote. The wire format (include/hw/remote/mpqemu-link.h), checked against QEMU 7.2:

    header, 16 bytes:  int32 cmd | 4 bytes padding | uint64 size     (host order: little-endian)
    payload:           ``size`` bytes, one of the structures below
    fds:               SCM_RIGHTS attached to the header's bytes

    cmd  name            payload                                        fds  reply
    0    SYNC_SYSMEM     u64 gpas[8], u64 sizes[8], i64 offsets[8]      1-8  none
    1    RET             u64 value                                      0    (is a reply)
    2    PCI_CFGWRITE    u32 addr, u32 val, i32 len                     0    RET
    3    PCI_CFGREAD     u32 addr, u32 val, i32 len                     0    RET (value read)
    4    BAR_WRITE       u64 addr, u64 val, u32 size, u8 memory, pad    0    RET
    5    BAR_READ        u64 addr, u64 val, u32 size, u8 memory, pad    0    RET (value read)
    6    SET_IRQFD       (empty)                                        2    none
    7    DEVICE_RESET    (empty)                                        0    RET

``MESSAGES`` holds this table and ``decode`` checks each received message against it: payload size,
fd count, and the command itself. BAR addresses are absolute (guest-physical for memory BARs, port
numbers for I/O BARs): QEMU adds the BAR's mapped base. The device decodes them against the bases
the guest programmed into its BARs (``PciConfigSpace.bar_at``).

Hostile input. Nothing QEMU (or anything else on the socket) sends is trusted. A refused message
logs one line naming the reason and is counted; if its command is one QEMU waits on, it still gets
a RET carrying 0 (the neutral value), because the vCPU thread is blocked until a RET arrives.
Commands QEMU does not wait on (SYNC_SYSMEM, SET_IRQFD, and a stray RET) never get a RET: an
unsolicited RET would be taken as the answer to QEMU's next request and shift every later reply.
An unknown command gets a RET, so a sender that waits is never left hanging. Every fd received with
a refused message, or beyond what a message may carry, is closed. A payload larger than any valid
message is read and discarded (up to ``DRAIN_LIMIT`` bytes) so the stream stays in step.

Guest RAM. SYNC_SYSMEM is re-sent on every change of QEMU's memory map (for example each time the
guest programs a BAR), each time with freshly dup'ed fds. Regions whose (gpa, size, offset, file)
are unchanged keep their existing mapping (so views the data path holds stay valid) and the new fd
is closed; replaced regions are unmapped and their old fds closed.

Interrupts. The proxy's own INTx path is a KVM irqfd pair (SET_IRQFD: the interrupt eventfd and
the resample eventfd). Under TCG that path is dead; ``hosts.qtest_irq`` drives the IOAPIC input
instead. ``IrqfdIntx`` is the KVM route: raising the line writes the eventfd; KVM lowers it at EOI
and signals the resample fd, on which the device re-raises if its ISR is still set.

Cost (measured on the 2-core development machine under TCG, with a load average of 5-9 from other
jobs; ``python3 tools/bench_pci_proxy.py --rounds 2``, four rounds). Every config and BAR access
is a synchronous round trip on a vCPU thread: a guest config read of our device took 52-291 us
against 4-10 us for one QEMU emulates itself (host bridge), i.e. 47-283 us per proxied access, of
which the sidecar's own decode-dispatch-reply is 4-16 us (the rest is thread wake-ups on a busy
machine; a Python-to-Python round trip over a socketpair alone is ~18 us). An ISR read also waits
for the qtest lower: p50 24-72 us, p90 0.15-3.4 ms (QEMU's main loop must get a CPU). iperf3 over
TCP (offloads on): 320-1210 Mbit/s guest->host and 300-920 host->guest, beside 990-2730 /
690-1120 for the vhost-user device in the same runs (QEMU keeps PCI there; kicks are eventfds,
interrupts irqfds). Not waiting for the lower (``QtestIntx.wait_lower = False``) removed that
wait but made 60% of the guest's ISR reads spurious (the IOAPIC re-delivers after an EOI that
overtook the lower), so the spec-exact order is the default.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from virtwire.hosts.pump import RING, BackendPump
from virtwire.hosts.vhost_user_conn import is_eventfd
from virtwire.memory import GuestMemoryError, MmapGuestMemory
from virtwire.net import native
from virtwire.pci.function import PciFunction

__all__ = [
    "MPQEMU_CMD_SYNC_SYSMEM",
    "MPQEMU_CMD_RET",
    "MPQEMU_CMD_PCI_CFGWRITE",
    "MPQEMU_CMD_PCI_CFGREAD",
    "MPQEMU_CMD_BAR_WRITE",
    "MPQEMU_CMD_BAR_READ",
    "MPQEMU_CMD_SET_IRQFD",
    "MPQEMU_CMD_DEVICE_RESET",
    "REMOTE_MAX_FDS",
    "MESSAGES",
    "MessageSpec",
    "ProxyMessage",
    "ProxyProtocolError",
    "ProxyTarget",
    "PciProxyRemote",
    "IrqfdIntx",
    "encode",
    "encode_ret",
    "PciProxyServer",
]

log = logging.getLogger(__name__)

MPQEMU_CMD_SYNC_SYSMEM = 0
MPQEMU_CMD_RET = 1
MPQEMU_CMD_PCI_CFGWRITE = 2
MPQEMU_CMD_PCI_CFGREAD = 3
MPQEMU_CMD_BAR_WRITE = 4
MPQEMU_CMD_BAR_READ = 5
MPQEMU_CMD_SET_IRQFD = 6
MPQEMU_CMD_DEVICE_RESET = 7

REMOTE_MAX_FDS = 8
HEADER = struct.Struct("<i4xQ")  # int cmd, padding, size_t size
SYNC_SYSMEM = struct.Struct(f"<{REMOTE_MAX_FDS}Q{REMOTE_MAX_FDS}Q{REMOTE_MAX_FDS}q")
PCI_CONF_DATA = struct.Struct("<IIi")
BAR_ACCESS = struct.Struct("<QQI?3x")
RET = struct.Struct("<Q")
MAX_PAYLOAD = SYNC_SYSMEM.size  # the largest member of QEMU's message union (192 bytes)
DRAIN_LIMIT = 1 << 20
_MAX_ANCILLARY_FDS = 32  # room to receive (and then close) more fds than any message may carry
_PAYLOAD_TIMEOUT = 2.0


class ProxyProtocolError(Exception):
    """A message broke the protocol; carries the log line's reason."""


@dataclass(frozen=True)
class MessageSpec:
    """One row of the protocol table."""

    name: str
    payload: struct.Struct | None  # None: empty payload
    fds: tuple[int, int]  # (min, max) fds the message carries
    reply: bool  # does QEMU block waiting for a RET?


MESSAGES: dict[int, MessageSpec] = {
    MPQEMU_CMD_SYNC_SYSMEM: MessageSpec("SYNC_SYSMEM", SYNC_SYSMEM, (1, REMOTE_MAX_FDS), False),
    MPQEMU_CMD_RET: MessageSpec("RET", RET, (0, 0), False),
    MPQEMU_CMD_PCI_CFGWRITE: MessageSpec("PCI_CFGWRITE", PCI_CONF_DATA, (0, 0), True),
    MPQEMU_CMD_PCI_CFGREAD: MessageSpec("PCI_CFGREAD", PCI_CONF_DATA, (0, 0), True),
    MPQEMU_CMD_BAR_WRITE: MessageSpec("BAR_WRITE", BAR_ACCESS, (0, 0), True),
    MPQEMU_CMD_BAR_READ: MessageSpec("BAR_READ", BAR_ACCESS, (0, 0), True),
    MPQEMU_CMD_SET_IRQFD: MessageSpec("SET_IRQFD", None, (2, 2), False),
    MPQEMU_CMD_DEVICE_RESET: MessageSpec("DEVICE_RESET", None, (0, 0), True),
}


def command_name(cmd: int) -> str:
    spec = MESSAGES.get(cmd)
    return spec.name if spec else f"unknown({cmd})"


@dataclass
class ProxyMessage:
    """A received message: command, raw payload and the fds that came with it (ours to close)."""

    cmd: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def spec(self) -> MessageSpec | None:
        return MESSAGES.get(self.cmd)


def encode(cmd: int, payload: bytes = b"") -> bytes:
    """A message's bytes (fds travel separately, with ``sendmsg``)."""
    return HEADER.pack(cmd, len(payload)) + payload


def encode_ret(value: int) -> bytes:
    return encode(MPQEMU_CMD_RET, RET.pack(value & 0xFFFFFFFFFFFFFFFF))


def validate(msg: ProxyMessage) -> None:
    """Check a message against the table; raises ``ProxyProtocolError`` with the reason."""
    spec = msg.spec
    if spec is None:
        raise ProxyProtocolError(f"unknown command {msg.cmd}")
    want = spec.payload.size if spec.payload else 0
    if len(msg.payload) != want:
        raise ProxyProtocolError(
            f"{spec.name}: payload of {len(msg.payload)} bytes, expected {want}"
        )
    lo, hi = spec.fds
    if not lo <= len(msg.fds) <= hi:
        exp = f"{lo}" if lo == hi else f"{lo}-{hi}"
        raise ProxyProtocolError(f"{spec.name}: {len(msg.fds)} fds, expected {exp}")


# The remote serves a whole PCI function (``pci.device.VirtioPciDevice`` implements it).
ProxyTarget = PciFunction


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes | None:
    """Read exactly ``n`` bytes (the payload after a header); None on EOF or timeout."""
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(buf))
        except (TimeoutError, BlockingIOError, InterruptedError):
            continue
        finally:
            sock.settimeout(None)
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


@dataclass
class _RegionKey:
    gpa: int
    size: int
    offset: int
    dev: int
    ino: int


class IrqfdIntx:
    """INTx through QEMU's KVM irqfd pair (SET_IRQFD); see module docstring."""

    def __init__(self, intr_fd: int, resample_fd: int) -> None:
        self.intr_fd = intr_fd
        self.resample_fd = resample_fd
        self.level = False

    def set_level(self, level: bool) -> None:
        self.level = level
        if level:
            try:
                os.eventfd_write(self.intr_fd, 1)
            except OSError as e:
                log.warning("irqfd write failed: %s", e)

    def on_resample(self) -> None:
        """KVM lowered the line at EOI; re-raise if the device still asserts it."""
        try:
            os.eventfd_read(self.resample_fd)
        except OSError:
            return
        if self.level:
            self.set_level(True)

    def close(self) -> None:
        _close_all([self.intr_fd, self.resample_fd])


class PciProxyRemote:
    """Serves one ``x-pci-proxy-dev`` over a connected UNIX stream socket.

    Call ``handle_one()`` whenever the socket is readable (or ``serve_forever()``). After each
    reply, ``after_reply`` callbacks run: the transport defers queue processing there so the guest
    vCPU resumes before the device does its work (as an ioeventfd would).
    """

    def __init__(self, sock: socket.socket, target: ProxyTarget) -> None:
        self.sock = sock
        self.target = target
        # A peer's memory: sealed or SIGBUS-guarded fds only (issue 14, defect 1).
        self.mem = MmapGuestMemory(untrusted=True, guard=native.sigbus_guard())
        self._region_keys: dict[int, _RegionKey] = {}
        self._region_fds: dict[int, int] = {}
        self._memory_set = False
        self.irqfd: IrqfdIntx | None = None
        self.on_irqfd: Callable[[IrqfdIntx], None] | None = None
        self.after_reply: list[Callable[[], None]] = []
        self.counts: dict[str, int] = {}
        self.service_seconds: dict[str, float] = {}  # time from message read to reply, per name
        self.refused = 0
        self._refused_by: dict[str, int] = {}
        self.closed = False
        self._handlers: dict[int, Callable[[ProxyMessage], int | None]] = {
            MPQEMU_CMD_SYNC_SYSMEM: self._sync_sysmem,
            MPQEMU_CMD_RET: self._stray_ret,
            MPQEMU_CMD_PCI_CFGWRITE: self._cfg_write,
            MPQEMU_CMD_PCI_CFGREAD: self._cfg_read,
            MPQEMU_CMD_BAR_WRITE: self._bar_write,
            MPQEMU_CMD_BAR_READ: self._bar_read,
            MPQEMU_CMD_SET_IRQFD: self._set_irqfd,
            MPQEMU_CMD_DEVICE_RESET: self._device_reset,
        }

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- receiving ---------------------------------------------------------------------------
    def receive(self) -> ProxyMessage | None:
        """Read one message; None at EOF. Raises ``ProxyProtocolError`` for a garbled one
        (with its fds already closed); the caller refuses it."""
        fds = array.array("i")
        try:
            data, anc, flags, _ = self.sock.recvmsg(
                HEADER.size, socket.CMSG_SPACE(_MAX_ANCILLARY_FDS * fds.itemsize)
            )
        except (BlockingIOError, InterruptedError):
            raise ProxyProtocolError("spurious wake-up: nothing to read") from None
        except OSError as e:
            if e.errno not in (errno.ECONNRESET, errno.EPIPE, errno.EBADF):
                log.warning("proxy: receive failed: %s; treating the peer as gone", e)
            return None
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
        fdl = list(fds)
        if not data:
            _close_all(fdl)
            return None
        deadline = time.monotonic() + _PAYLOAD_TIMEOUT
        if len(data) < HEADER.size:
            rest = _recv_exact(self.sock, HEADER.size - len(data), deadline)
            if rest is None:
                _close_all(fdl)
                return None
            data += rest
        cmd, size = HEADER.unpack(data)
        if size > MAX_PAYLOAD:
            _close_all(fdl)
            self._drain(size, deadline)
            raise ProxyProtocolError(
                f"{command_name(cmd)}: payload size {size} exceeds {MAX_PAYLOAD}", cmd
            )
        payload = b""
        if size:
            got = _recv_exact(self.sock, size, deadline)
            if got is None:
                _close_all(fdl)
                raise ProxyProtocolError(
                    f"{command_name(cmd)}: payload of {size} bytes not received", cmd
                )
            payload = got
        if flags & socket.MSG_CTRUNC:
            _close_all(fdl)
            raise ProxyProtocolError(f"{command_name(cmd)}: too many fds (truncated)", cmd)
        return ProxyMessage(cmd, payload, fdl)

    def _drain(self, size: int, deadline: float) -> None:
        """Discard an oversized payload so the next header is read in step."""
        if size > DRAIN_LIMIT:
            log.warning("proxy: payload size %d is beyond any sane message; stream may be "
                        "out of step", size)
            size = DRAIN_LIMIT
        left = size
        while left > 0:
            got = _recv_exact(self.sock, min(left, 65536), deadline)
            if got is None:
                break
            left -= len(got)

    # -- dispatch ----------------------------------------------------------------------------
    def handle_one(self) -> bool:
        """Receive, validate, dispatch and answer one message. False when the peer is gone."""
        try:
            msg = self.receive()
        except ProxyProtocolError as e:
            cmd = e.args[1] if len(e.args) > 1 else None
            self._refuse(cmd, str(e.args[0]))
            return True
        if msg is None:
            self.closed = True
            return False
        spec = msg.spec
        name = command_name(msg.cmd)
        try:
            validate(msg)
        except ProxyProtocolError as e:
            _close_all(msg.fds)
            self._refuse(msg.cmd, str(e))
            return True
        assert spec is not None
        self.counts[name] = self.counts.get(name, 0) + 1
        t0 = time.perf_counter()
        try:
            value = self._handlers[msg.cmd](msg)
        except ProxyProtocolError as e:
            self._refuse(msg.cmd, f"{name}: {e}")
            return True
        if self.mem.faulted():  # the peer shrank guest RAM under our mapping
            log.warning("proxy: guest RAM shrank under its mapping: closing the connection")
            self.closed = True
            return False
        if spec.reply:
            self._send_ret(value or 0, t0, name)
        return True

    def _refuse(self, cmd: int | None, reason: str) -> None:
        self.refused += 1
        # One line per refusal, rate-limited so a flood cannot fill the log: each distinct reason
        # is logged on its 1st, 2nd, 4th, 8th... occurrence (at most 256 reasons are tracked;
        # beyond that the running total decides), always with the running total.
        seen = self._refused_by
        if reason in seen or len(seen) < 256:
            n = seen[reason] = seen.get(reason, 0) + 1
        else:
            n = self.refused
        if n & (n - 1) == 0:
            log.warning("proxy: refused message: %s (%d refused so far)", reason, self.refused)
        spec = MESSAGES.get(cmd) if cmd is not None else None
        # Answer whatever QEMU may be blocked on (see module docstring), never a no-reply command.
        if cmd is not None and (spec is None or spec.reply):
            self._send_ret(0)

    def _send_ret(self, value: int, t0: float | None = None, name: str = "") -> None:
        try:
            self.sock.sendall(encode_ret(value))
        except OSError as e:
            log.warning("proxy: cannot send RET: %s", e)
            self.closed = True
            return
        if t0 is not None:
            self.service_seconds[name] = (self.service_seconds.get(name, 0.0)
                                          + time.perf_counter() - t0)
        for fn in self.after_reply:
            fn()

    def serve_forever(self) -> None:
        while self.handle_one():
            pass

    # -- handlers ----------------------------------------------------------------------------
    def _cfg_read(self, msg: ProxyMessage) -> int:
        addr, _val, length = PCI_CONF_DATA.unpack(msg.payload)
        self._check_cfg(addr, length)
        return self.target.config_read(addr, length)

    def _cfg_write(self, msg: ProxyMessage) -> int:
        addr, val, length = PCI_CONF_DATA.unpack(msg.payload)
        self._check_cfg(addr, length)
        self.target.config_write(addr, length, val & ((1 << (8 * length)) - 1))
        return 0

    @staticmethod
    def _check_cfg(addr: int, length: int) -> None:
        if length not in (1, 2, 4):
            raise ProxyProtocolError(f"config access width {length}")
        if addr + length > 256:
            raise ProxyProtocolError(f"config access at {addr:#x}+{length} beyond 256 bytes")

    def _bar_read(self, msg: ProxyMessage) -> int:
        addr, _val, size, memory = BAR_ACCESS.unpack(msg.payload)
        self._check_bar(addr, size)
        value = self.target.bar_read(addr, size, bool(memory))
        if value is None:
            raise ProxyProtocolError(
                f"{'memory' if memory else 'I/O'} address {addr:#x}+{size} is in no BAR"
            )
        return value

    def _bar_write(self, msg: ProxyMessage) -> int:
        addr, val, size, memory = BAR_ACCESS.unpack(msg.payload)
        self._check_bar(addr, size)
        if not self.target.bar_write(addr, size, val & ((1 << (8 * size)) - 1), bool(memory)):
            raise ProxyProtocolError(
                f"{'memory' if memory else 'I/O'} address {addr:#x}+{size} is in no BAR"
            )
        return 0

    @staticmethod
    def _check_bar(addr: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise ProxyProtocolError(f"BAR access width {size}")
        if addr + size > 1 << 64:
            raise ProxyProtocolError(f"BAR address {addr:#x} wraps")

    def _device_reset(self, msg: ProxyMessage) -> int:
        self.target.reset()
        return 0

    def _stray_ret(self, msg: ProxyMessage) -> None:
        raise ProxyProtocolError("a RET nobody asked for")

    def _set_irqfd(self, msg: ProxyMessage) -> None:
        intr, resample = msg.fds
        if not (is_eventfd(intr) and is_eventfd(resample)):
            _close_all(msg.fds)
            raise ProxyProtocolError("SET_IRQFD: the interrupt and resample fds must be eventfds")
        msg.fds = []
        if self.irqfd is not None:
            self.irqfd.close()
        self.irqfd = IrqfdIntx(intr, resample)
        if self.on_irqfd is not None:
            self.on_irqfd(self.irqfd)

    def _sync_sysmem(self, msg: ProxyMessage) -> None:
        """Map guest RAM (module docstring, "Guest RAM"). All-or-nothing on a bad table."""
        vals = SYNC_SYSMEM.unpack(msg.payload)
        n = len(msg.fds)
        gpas, sizes, offsets = vals[0:n], vals[8 : 8 + n], vals[16 : 16 + n]
        keys: list[_RegionKey] = []
        try:
            spans = sorted(zip(gpas, sizes))
            for (g0, s0), (g1, _s1) in zip(spans, spans[1:]):
                if g0 + s0 > g1:
                    raise ProxyProtocolError(f"regions {g0:#x}+{s0:#x} and {g1:#x} overlap")
            for i in range(n):
                if sizes[i] == 0 or gpas[i] + sizes[i] > 1 << 64 or offsets[i] < 0:
                    raise ProxyProtocolError(
                        f"region {i}: gpa {gpas[i]:#x} size {sizes[i]:#x} offset {offsets[i]:#x}"
                    )
                try:
                    st = os.fstat(msg.fds[i])
                except OSError as e:
                    raise ProxyProtocolError(f"region {i}: fd unusable: {e}") from None
                if st.st_size and offsets[i] + sizes[i] > st.st_size:
                    raise ProxyProtocolError(
                        f"region {i}: {offsets[i]:#x}+{sizes[i]:#x} beyond its file"
                    )
                keys.append(_RegionKey(gpas[i], sizes[i], offsets[i], st.st_dev, st.st_ino))
        except ProxyProtocolError:
            _close_all(msg.fds)
            raise
        keep: set[int] = set()
        for key in keys:
            if self._region_keys.get(key.gpa) == key:
                keep.add(key.gpa)
        # Drop regions that are gone or changed (their old fds too), after the device has let go
        # of every view into them.
        dropped = any(gpa not in keep for gpa in self._region_keys)
        if dropped:
            release = getattr(self.target, "release_memory_views", None)
            if callable(release):
                release()
        for gpa in list(self._region_keys):
            if gpa not in keep:
                self.mem.unmap(gpa)
                del self._region_keys[gpa]
                _close_all([self._region_fds.pop(gpa)])
        changed = False
        for key, fd in zip(keys, msg.fds):
            if key.gpa in keep:
                os.close(fd)  # same mapping as before: the fresh dup is not needed
                continue
            try:
                self.mem.map_fd(fd, key.gpa, key.size, mmap_offset=key.offset)
            except GuestMemoryError as e:
                log.warning("proxy: SYNC_SYSMEM region %#x not mapped: %s", key.gpa, e)
                os.close(fd)
                continue
            self._region_keys[key.gpa] = key
            self._region_fds[key.gpa] = fd
            changed = True
        if changed or dropped or not self._memory_set:
            # Only a real change is announced: the device rebuilds cached views on it.
            log.info("proxy: guest RAM: %s", ", ".join(
                f"{r.gpa:#x}+{r.size:#x}" for r in self.mem.regions))
            self.target.set_memory(self.mem)
            self._memory_set = True

    def close(self) -> None:
        if self.irqfd is not None:
            self.irqfd.close()
            self.irqfd = None
        self.mem.close()
        _close_all(list(self._region_fds.values()))
        self._region_fds.clear()
        self._region_keys.clear()
        try:
            self.sock.close()
        except OSError:
            pass


class PciProxyServer:
    """One proxied PCI device and its frame backends, served by one ``EventLoop``.

    ``transport`` is the ``pci.device.VirtioPciDevice`` (the proxy target); its ``device`` may be
    a ``net.device.VirtioNet`` whose backends a ``hosts.pump.BackendPump`` watches (a readable fd
    calls ``device.backend_ready(pair)``; not while the guest has no RX buffers or the device is
    not active, else a level-triggered TAP would spin the loop); ``more_work(index)``
    reschedules a queue whose batch budget ran out. Notifications from the guest are run after the
    proxy has answered the access (``transport.flush`` deferred to the end of the iteration).

    ``start_thread()`` serves in a daemon thread (the sidecar of ``virtwire vm --net pci``);
    ``stop()`` ends it from any thread. The loop also ends when QEMU closes its end.
    """

    def __init__(self, sock: socket.socket, transport: Any, backends: Sequence[Any] = (),
                 loop: Any = None) -> None:
        from virtwire.loop import EventLoop  # the one loop of a serving process

        self.loop = loop or EventLoop()
        self.transport = transport
        self.device = transport.device
        self.backends = list(backends)
        self.remote = PciProxyRemote(sock, transport)
        transport.defer_notify = True
        self.remote.after_reply.append(self._after_reply)
        self.remote.on_irqfd = self._on_irqfd
        self.thread: threading.Thread | None = None
        self._calls: deque[tuple[Callable[[], Any], list[Any]]] = deque()
        self._stop_requested = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.loop.add_reader(self._wake_r, self._on_wake)
        self.loop.add_reader(self.remote.sock, self._on_proxy)
        # Nothing to deliver to before DRIVER_OK: the pump stops watching (a level-triggered TAP
        # would spin the loop) until the device is active, checked after each proxy reply.
        self.pump = BackendPump(self.loop, self.device, self.backends, ready=lambda pair: bool(
            getattr(self.device, "active", False)))
        if hasattr(self.device, "more_work"):
            self.device.more_work = self._more_work
        self.stopped = threading.Event()

    # -- loop callbacks ----------------------------------------------------------------------
    def _on_proxy(self) -> None:
        if not self.remote.handle_one() or self.remote.closed:
            log.info("proxy: QEMU closed the connection; stopping")
            self.loop.stop()

    def _after_reply(self) -> None:
        if self.transport.pending:
            self.loop.defer(("pci-flush", id(self)), self.transport.flush)
        if self.pump.waiting(RING) and getattr(self.device, "active", False):
            self.pump.resume_all(RING)

    def _more_work(self, index: int) -> None:
        dev = self.device
        self.loop.defer(("pci-more", id(self), index), dev.run_guarded, index, dev.process_queue)

    def _on_irqfd(self, irqfd: IrqfdIntx) -> None:
        # Under KVM the irqfd is the INTx route; the launcher replaces it with the qtest line
        # under TCG (where the irqfd does nothing). Keep whichever was set explicitly. KVM lowers
        # the line itself at EOI and signals the resample eventfd: re-raise there while the
        # device still asserts it.
        old = self.transport.intx
        if getattr(self.transport, "intx_is_default", False) or isinstance(old, IrqfdIntx):
            if isinstance(old, IrqfdIntx):
                self.loop.remove_reader(old.resample_fd)
            self.transport.intx = irqfd
            irqfd.level = bool(getattr(self.transport, "level", False))
            os.set_blocking(irqfd.resample_fd, False)
            self.loop.add_reader(irqfd.resample_fd, irqfd.on_resample)

    def _on_wake(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass
        while self._calls:
            fn, done = self._calls.popleft()
            try:
                done.append((True, fn()))
            except Exception as e:  # handed back to the calling thread
                done.append((False, e))
        if self._stop_requested:
            self.loop.stop()

    def call_in_loop(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``fn`` on the loop's thread (device state is only touched there) and return its
        result; e.g. ``server.call_in_loop(lambda: server.device.set_link(False))``."""
        if self.thread is None or not self.thread.is_alive():
            return fn()
        done: list[Any] = []
        self._calls.append((fn, done))
        self._wake_w.send(b"c")
        deadline = time.monotonic() + timeout
        while not done:
            if time.monotonic() > deadline:
                raise TimeoutError("the PCI proxy loop did not run the call")
            time.sleep(0.001)
        ok, value = done[0]
        if not ok:
            raise value
        return value

    # -- running -----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.loop.run()
        finally:
            self.stopped.set()

    def start_thread(self, name: str = "virtwire-pci-proxy") -> None:
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_requested = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def close(self) -> None:
        """After ``stop``: release the socket, guest RAM mappings and backends."""
        self.stop()
        self.pump.close()
        self.loop.remove_reader(self.remote.sock)
        self.loop.remove_reader(self._wake_r)
        if self.remote.irqfd is not None:
            self.loop.remove_reader(self.remote.irqfd.resample_fd)
        self.transport.release_memory_views()
        self.remote.close()
        for be in self.backends:
            be.close()
        intx = getattr(self.transport, "intx", None)
        close = getattr(intx, "close", None)
        if callable(close):
            close()
        self._wake_r.close()
        self._wake_w.close()
        self.loop.close()

    def stats(self) -> dict[str, Any]:
        intx = getattr(self.transport, "intx", None)
        return {
            "proxy": {"messages": dict(self.remote.counts), "refused": self.remote.refused,
                      "service_seconds": dict(self.remote.service_seconds)},
            "transport": self.transport.stats(),
            "intx": {**getattr(intx, "counters", {}),
                     **({"lower_seconds": intx.lower_seconds}
                        if hasattr(intx, "lower_seconds") else {})},
            "device": self.device.stats() if hasattr(self.device, "stats") else {},
            "backends": [{"name": getattr(b, "name", "?"), **b.stats()} for b in self.backends],
        }
