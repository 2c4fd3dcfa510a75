"""QEMU's qtest protocol: a client, and a launcher for a VM our driver drives.

Theory of operation
-------------------
qtest (QEMU docs/devel/qtest.rst) is a line protocol on a chardev: each request is one line
(``outl 0xcf8 0x80000000``, ``readl 0xe0000000``, ``write 0x1000 4 0xdeadbeef``), each reply one
line starting ``OK`` (optionally followed by a value) or ``FAIL``/``ERR``. Between replies QEMU may
send asynchronous lines ``IRQ raise N`` / ``IRQ lower N`` for GPIO lines intercepted with
``irq_intercept_in``/``irq_intercept_out``; the client records their levels and counts raises, so a
driver can wait on "line N went up" without losing an edge that arrived inside another reply.

The VM (``QtestVM``) is built for a driver that is its own firmware:

- Debian's QEMU has no ``-accel qtest``: the VM runs ``-accel tcg`` with ``-qtest unix:PATH``.
- With ``-S`` devices never process queues, so the vCPU runs the halt firmware
  (``drive.firmware``): it executes ``cli; hlt`` and nothing else ever touches the hardware.
- Guest RAM is a ``memory-backend-file`` with ``share=on`` in /dev/shm; we map the same file with
  ``MmapGuestMemory``, so rings and buffers are read and written directly (no qtest round trip per
  descriptor). Only port I/O, MMIO and interrupts go over qtest (one round trip is 20-70 us).
- A QMP socket is kept for the few things only the monitor does (``set_link`` for link changes).

Every value QEMU sends back is parsed strictly; a malformed line raises ``QtestError``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from virtwire.drive.firmware import write_firmware
from virtwire.errors import UserFacingError
from virtwire.memory import MmapGuestMemory

__all__ = ["QtestError", "QtestClient", "QmpClient", "QtestVM", "QtestVMConfig", "QemuNetHarness"]

log = logging.getLogger(__name__)


class QtestError(Exception):
    """QEMU refused a qtest request, sent a malformed line, or went away."""


class QtestClient:
    """The client side of one qtest connection (see module docstring)."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self._buf = bytearray()
        self.irq_level: dict[int, bool] = {}
        self.irq_raises: dict[int, int] = {}
        self.intercepted: set[str] = set()  # qom paths whose IRQ inputs are reported
        self.round_trips = 0

    # -- line transport ----------------------------------------------------------------------
    def _readline(self, timeout: float | None = None) -> str | None:
        """One line from QEMU; None when ``timeout`` (0 = non-blocking) expires first."""
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i]).decode("ascii", "replace").rstrip("\r")
                del self._buf[: i + 1]
                return line
            old = self.sock.gettimeout()
            if timeout is not None:
                self.sock.settimeout(timeout if timeout > 0 else 0.0)
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, TimeoutError):
                if timeout is not None:
                    return None
                raise QtestError("qtest: no reply from QEMU (timeout)") from None
            except OSError as e:
                raise QtestError(f"qtest: connection lost: {e}") from None
            finally:
                if timeout is not None:
                    self.sock.settimeout(old)
            if not chunk:
                raise QtestError("qtest: QEMU closed the connection")
            self._buf += chunk

    def _async(self, line: str) -> bool:
        """Record an asynchronous ``IRQ raise|lower N`` line; False if ``line`` is not one."""
        parts = line.split()
        if len(parts) == 3 and parts[0] == "IRQ" and parts[1] in ("raise", "lower"):
            try:
                n = int(parts[2], 0)
            except ValueError:
                raise QtestError(f"qtest: malformed IRQ line {line!r}") from None
            up = parts[1] == "raise"
            self.irq_level[n] = up
            if up:
                self.irq_raises[n] = self.irq_raises.get(n, 0) + 1
            return True
        return False

    def command(self, line: str) -> list[str]:
        """Send one request; returns the reply's words after ``OK``."""
        try:
            self.sock.sendall(line.encode("ascii") + b"\n")
        except OSError as e:
            raise QtestError(f"qtest: cannot send {line.split()[0]!r}: {e}") from None
        self.round_trips += 1
        while True:
            reply = self._readline()
            assert reply is not None
            if self._async(reply):
                continue
            words = reply.split()
            if words and words[0] == "OK":
                return words[1:]
            raise QtestError(f"qtest: {line!r} -> {reply!r}")

    def poll_async(self, timeout: float = 0.0) -> None:
        """Drain asynchronous lines that arrived outside a request (IRQ edges)."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            line = self._readline(timeout=left if left > 0 else 0)
            if line is None:
                return
            if not self._async(line):
                raise QtestError(f"qtest: unexpected line {line!r}")

    @staticmethod
    def _value(words: list[str], what: str) -> int:
        if len(words) != 1:
            raise QtestError(f"qtest: {what}: expected one value, got {words!r}")
        try:
            return int(words[0], 16 if words[0].lower().startswith("0x") else 10)
        except ValueError:
            raise QtestError(f"qtest: {what}: bad value {words[0]!r}") from None

    # -- port I/O ----------------------------------------------------------------------------
    def outb(self, port: int, value: int) -> None:
        self.command(f"outb {port:#x} {value & 0xFF:#x}")

    def outw(self, port: int, value: int) -> None:
        self.command(f"outw {port:#x} {value & 0xFFFF:#x}")

    def outl(self, port: int, value: int) -> None:
        self.command(f"outl {port:#x} {value & 0xFFFFFFFF:#x}")

    def inb(self, port: int) -> int:
        return self._value(self.command(f"inb {port:#x}"), "inb") & 0xFF

    def inw(self, port: int) -> int:
        return self._value(self.command(f"inw {port:#x}"), "inw") & 0xFFFF

    def inl(self, port: int) -> int:
        return self._value(self.command(f"inl {port:#x}"), "inl") & 0xFFFFFFFF

    # -- memory (MMIO) -----------------------------------------------------------------------
    def writeb(self, addr: int, value: int) -> None:
        self.command(f"writeb {addr:#x} {value & 0xFF:#x}")

    def writew(self, addr: int, value: int) -> None:
        self.command(f"writew {addr:#x} {value & 0xFFFF:#x}")

    def writel(self, addr: int, value: int) -> None:
        self.command(f"writel {addr:#x} {value & 0xFFFFFFFF:#x}")

    def writeq(self, addr: int, value: int) -> None:
        self.command(f"writeq {addr:#x} {value & 0xFFFFFFFFFFFFFFFF:#x}")

    def readb(self, addr: int) -> int:
        return self._value(self.command(f"readb {addr:#x}"), "readb") & 0xFF

    def readw(self, addr: int) -> int:
        return self._value(self.command(f"readw {addr:#x}"), "readw") & 0xFFFF

    def readl(self, addr: int) -> int:
        return self._value(self.command(f"readl {addr:#x}"), "readl") & 0xFFFFFFFF

    def readq(self, addr: int) -> int:
        return self._value(self.command(f"readq {addr:#x}"), "readq")

    def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes of guest-physical memory (hex-encoded on the wire)."""
        if size <= 0:
            return b""
        words = self.command(f"read {addr:#x} {size:#x}")
        if len(words) != 1 or not words[0].lower().startswith("0x"):
            raise QtestError(f"qtest: read: malformed reply {words!r}")
        try:
            data = bytes.fromhex(words[0][2:])
        except ValueError:
            raise QtestError("qtest: read: reply is not hex") from None
        if len(data) != size:
            raise QtestError(f"qtest: read: asked {size} bytes, got {len(data)}")
        return data

    def write(self, addr: int, data: bytes) -> None:
        if data:
            self.command(f"write {addr:#x} {len(data):#x} 0x{bytes(data).hex()}")

    # -- interrupts and clock ------------------------------------------------------------------
    def irq_intercept_in(self, qom_path: str) -> None:
        """Report the GPIO *inputs* of ``qom_path`` (e.g. ``ioapic``) as IRQ lines (once: QEMU
        refuses a second interception)."""
        if qom_path in self.intercepted:
            return
        self.command(f"irq_intercept_in {qom_path}")
        self.intercepted.add(qom_path)

    def irq_intercept_out(self, qom_path: str) -> None:
        self.command(f"irq_intercept_out {qom_path}")

    def set_irq_in(self, qom_path: str, name: str, num: int, level: int) -> None:
        self.command(f"set_irq_in {qom_path} {name} {num} {level}")

    def clock_step(self, ns: int | None = None) -> int:
        words = self.command("clock_step" if ns is None else f"clock_step {ns}")
        return self._value(words, "clock_step") if words else 0

    def wait_irq(self, n: int, timeout: float) -> bool:
        """Wait until line ``n`` is (or goes) high; True if it is high."""
        deadline = time.monotonic() + timeout
        while not self.irq_level.get(n):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.poll_async(timeout=min(left, 0.05))
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class QmpClient:
    """A minimal QMP client (JSON lines) for monitor-only operations such as ``set_link``."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self._f = sock.makefile("rb")
        self.events: list[dict] = []
        greeting = self._recv()
        if "QMP" not in greeting:
            raise QtestError(f"qmp: unexpected greeting {greeting!r}")
        self.execute("qmp_capabilities")

    def _recv(self) -> dict:
        line = self._f.readline()
        if not line:
            raise QtestError("qmp: QEMU closed the monitor")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QtestError(f"qmp: malformed line {line[:80]!r}") from None
        if not isinstance(msg, dict):
            raise QtestError("qmp: message is not an object")
        return msg

    def execute(self, cmd: str, **arguments: object) -> object:
        req: dict[str, object] = {"execute": cmd}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._recv()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise QtestError(f"qmp: {cmd}: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()
            self.sock.close()


def _die_with_parent() -> None:
    """preexec hook: QEMU gets SIGKILL when the process that started it dies (PR_SET_PDEATHSIG),
    so a killed test run never leaves a qtest VM behind."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class QtestVMConfig:
    """What the qtest VM holds: RAM size and the ``-device``/``-netdev`` arguments under test."""

    ram_mb: int = 64
    devices: Sequence[str] = ()
    netdevs: Sequence[str] = ()
    extra_args: Sequence[str] = ()
    machine: str = "pc"
    qemu: str = "qemu-system-x86_64"
    name: str = "vwd"
    timeout: float = 15.0
    workdir: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    netns: str | None = None  # run QEMU inside this network namespace (its TAPs live there)
    pass_fds: Sequence[int] = ()  # descriptors QEMU inherits (x-pci-proxy-dev,fd=N)


class QtestVM:
    """A QEMU process running the halt firmware, driven over qtest, RAM shared with us.

    Use as a context manager; ``close()`` kills QEMU and removes every file it created.
    """

    def __init__(self, config: QtestVMConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.qtest: QtestClient
        self.qmp: QmpClient
        self.mem: MmapGuestMemory
        self.ram_size = config.ram_mb << 20
        self._tmp = tempfile.mkdtemp(prefix=f"{config.name}-qt-", dir=config.workdir)
        self._ram_path = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else self._tmp,
                                      f"{os.path.basename(self._tmp)}-ram")
        self._ram_fd = -1
        self.stderr_path = os.path.join(self._tmp, "qemu.stderr")

    def argv(self, qtest_path: str, qmp_path: str, firmware: str) -> list[str]:
        c = self.config
        args = [
            c.qemu, "-machine", f"{c.machine},memory-backend=mem", "-accel", "tcg",
            "-m", f"{c.ram_mb}M",
            "-object", f"memory-backend-file,id=mem,size={c.ram_mb}M,mem-path={self._ram_path},"
            "share=on",
            "-bios", firmware, "-nodefaults", "-display", "none", "-vga", "none",
            "-serial", "none", "-parallel", "none", "-monitor", "none", "-no-user-config",
            "-qtest", f"unix:{qtest_path}", "-qtest-log", "/dev/null",
            "-chardev", f"socket,id=qmp0,path={qmp_path}", "-mon", "chardev=qmp0,mode=control",
        ]
        for n in c.netdevs:
            args += ["-netdev", n]
        for d in c.devices:
            args += ["-device", d]
        args += list(c.extra_args)
        if c.netns:
            args = ["ip", "netns", "exec", c.netns, *args]
        return args

    def start(self) -> QtestVM:
        if shutil.which(self.config.qemu) is None:
            raise UserFacingError(f"{self.config.qemu} not found (install qemu-system-x86)")
        fw = write_firmware(self._tmp)
        qtest_path = os.path.join(self._tmp, "qtest.sock")
        qmp_path = os.path.join(self._tmp, "qmp.sock")
        # Create the RAM file ourselves so its size is right before QEMU maps it.
        self._ram_fd = os.open(self._ram_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._ram_fd, self.ram_size)
        listeners = []
        for p in (qtest_path, qmp_path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(p)
            s.listen(1)
            s.settimeout(self.config.timeout)
            listeners.append(s)
        err = open(self.stderr_path, "wb")
        try:
            self.proc = subprocess.Popen(self.argv(qtest_path, qmp_path, fw),
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         preexec_fn=_die_with_parent,
                                         pass_fds=tuple(self.config.pass_fds))
        finally:
            err.close()
        try:
            qt, _ = listeners[0].accept()
            qm, _ = listeners[1].accept()
        except (TimeoutError, OSError):
            self.close()
            raise QtestError(f"QEMU did not connect: {self.stderr_tail()}") from None
        finally:
            for s in listeners:
                s.close()
        self.qtest = QtestClient(qt, timeout=self.config.timeout)
        try:
            self.qmp = QmpClient(qm, timeout=self.config.timeout)
            self.qtest.command("endianness")
            self.mem = MmapGuestMemory()
            self.mem.map_fd(self._ram_fd, 0, min(self.ram_size, 0xE0000000))
        except Exception:
            self.close()
            raise
        return self

    def stderr_tail(self, n: int = 800) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                data = f.read()
        except OSError:
            return ""
        return data[-n:].decode("utf-8", "replace").strip()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        for attr in ("qtest", "qmp"):
            obj = getattr(self, attr, None)
            if obj is not None:
                obj.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        mem = getattr(self, "mem", None)
        if mem is not None:
            mem.close()
        if self._ram_fd >= 0:
            os.close(self._ram_fd)
            self._ram_fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._ram_path)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> QtestVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class QemuNetHarness:
    """QEMU's virtio-net-pci under qtest with a datagram peer we hold, for tests and ``conform``.

    The device's netdev is ``-netdev dgram`` between two UNIX datagram sockets: QEMU's end and
    ours (``peer``). Every frame the device transmits arrives on ``peer`` as one datagram without
    a virtio-net header; every datagram we send to QEMU's end is one frame the device receives.
    ``transitional`` keeps the legacy I/O BAR (device id 0x1000); otherwise ``disable-legacy=on``
    (0x1041). ``props`` adds ``-device`` properties (``packed=on``, ``mrg_rxbuf=off``, ...).
    """

    def __init__(self, transitional: bool = False, props: str = "", name: str = "vwd",
                 ram_mb: int = 64, timeout: float = 15.0) -> None:
        self.transitional = transitional
        self.props = props
        self._dir = tempfile.mkdtemp(prefix=f"{name}-net-")
        self.qemu_path = os.path.join(self._dir, "qemu.sock")
        self.peer_path = os.path.join(self._dir, "peer.sock")
        self.peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.peer.bind(self.peer_path)
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        dev = "virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:12:34:56"
        if not transitional:
            dev += ",disable-legacy=on"
        if props:
            dev += "," + props
        netdev = (f"dgram,id=n0,local.type=unix,local.path={self.qemu_path},"
                  f"remote.type=unix,remote.path={self.peer_path}")
        self.vm = QtestVM(QtestVMConfig(ram_mb=ram_mb, devices=[dev], netdevs=[netdev],
                                        name=name, timeout=timeout))

    def start(self) -> QemuNetHarness:
        try:
            self.vm.start()
        except Exception:
            self.close()
            raise
        return self

    def send_to_device(self, frame: bytes) -> None:
        """One frame into the device's receive path (blocks briefly if QEMU is not reading)."""
        self.peer.settimeout(5.0)
        self.peer.sendto(frame, self.qemu_path)

    def recv_from_device(self, timeout: float = 5.0) -> bytes | None:
        """The next frame the device transmitted, or None after ``timeout``."""
        self.peer.settimeout(timeout)
        try:
            return self.peer.recv(1 << 17)
        except (TimeoutError, BlockingIOError):
            return None

    def drain(self) -> int:
        n = 0
        while self.recv_from_device(0.0005) is not None:
            n += 1
        return n

    def close(self) -> None:
        self.vm.close()
        self.peer.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> QemuNetHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
