"""The guest program of ``virtwire kvm`` (``kvm/guest/*.c``): build, load and talk to it.

Theory of operation
-------------------
The guest is a freestanding 32-bit C program (``guest/guest.c``, entry ``guest/start.S``, linked
at 0x10000 by ``guest/link.ld``) that drives our virtio-net PCI function the way Linux's
virtio_pci and virtio_net do, and a small classic-RTL8139 driver (``guest/rtl8139.c``, included
by ``guest.c``) used when bus 0 holds 10ec:8139 instead. ``build()`` compiles it with the system
gcc on first use, like the native helper, into a per-user cache directory (mode 0700) keyed by
a hash of the sources and flags; without gcc it raises ``KvmError`` with one line. Flags: CPL0
code is emulated by this host's KVM, which cannot run SSE arithmetic, x87 or popcnt, hence
``-mgeneral-regs-only -mno-popcnt`` and friends.

The VMM and the program share a parameter block at 0x7000 (``PARAMS``, mirrored from
``guest/vw.h``): mode, IPv4 address, burst size, the INTx GSI, and a ``stop`` word the VMM sets to
ask for the final report. The program exits by writing ``0x5657SSSS`` to port 0x501; ``SS`` is one
of ``GUEST_STATUS``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from virtwire.kvm.vm import KvmError

__all__ = ["build", "Params", "MODES", "GUEST_STATUS", "LOAD_ADDR", "PARAMS_ADDR",
           "STACK_TOP", "EXIT_PORT", "EXIT_TAG", "BENCH_PORT", "CFLAGS", "cache_dir"]

SRC_DIR = Path(__file__).with_name("guest")
SOURCES = ("start.S", "guest.c")
LOAD_ADDR = 0x10000
PARAMS_ADDR = 0x7000
STACK_TOP = 0x80000
EXIT_PORT = 0x501
BENCH_PORT = 0x502
EXIT_TAG = 0x5657
MAGIC = 0x564B5756
CFLAGS = ("-m32", "-ffreestanding", "-mgeneral-regs-only", "-mno-popcnt", "-mno-sse",
          "-mno-mmx", "-mno-80387", "-fno-pic", "-fno-pie", "-nostdlib", "-O2",
          "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-builtin")
MODES = {"ping": 1, "burst": 2, "garbage": 10, "badbar": 11, "badring": 12, "badinsn": 13,
         "int3": 14, "exits": 20}
GUEST_STATUS = {0x00: "ok", 0x20: "no virtio or RTL8139 device on bus 0",
                0x21: "device initialisation failed", 0x22: "device said NEEDS_RESET",
                0x23: "hostile test finished", 0x24: "no parameter block",
                0x30: "guest took an exception"}

# struct vw_params: magic, mode, ip[4], prefix, burst_count, burst_size, irq, stop,
# exits_count, queue_size
_PARAMS = struct.Struct("<II4sIIIIIII")
STOP_OFFSET = 28


class Params:
    """The parameter block the VMM writes at ``PARAMS_ADDR`` (``guest/vw.h``)."""

    def __init__(self, mode: str = "ping", ip: str = "10.0.2.15", prefix: int = 24,
                 burst_count: int = 0, burst_size: int = 60, irq: int = 10,
                 exits_count: int = 0, queue_size: int = 64) -> None:
        if mode not in MODES:
            raise KvmError(f"unknown guest mode {mode!r} (known: {', '.join(MODES)})")
        self.mode, self.ip, self.prefix = mode, ip, prefix
        self.burst_count, self.burst_size, self.irq = burst_count, burst_size, irq
        self.exits_count, self.queue_size = exits_count, queue_size

    def pack(self) -> bytes:
        try:
            ip = bytes(int(x) for x in self.ip.split("."))
        except ValueError:
            ip = b""
        if len(ip) != 4:
            raise KvmError(f"guest address {self.ip!r} is not an IPv4 address")
        return _PARAMS.pack(MAGIC, MODES[self.mode], ip, self.prefix, self.burst_count,
                            self.burst_size, self.irq, 0, self.exits_count, self.queue_size)


def cache_dir() -> Path:
    """``~/.cache/virtwire/kvm-guest`` (or a 0700 directory under /tmp), created mode 0700."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for d in (Path(base) / "virtwire" / "kvm-guest",
              Path(tempfile.gettempdir()) / f"virtwire-kvm-{os.getuid()}"):
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = d.stat()
            if st.st_uid == os.getuid() and not st.st_mode & 0o022:
                return d
        except OSError:
            continue
    raise KvmError("no private cache directory for the guest program (~/.cache not writable)")


def _tag() -> str:
    h = hashlib.sha256()
    for name in (*SOURCES, "rtl8139.c", "vw.h", "link.ld"):
        h.update((SRC_DIR / name).read_bytes())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:16]


def build() -> bytes:
    """The guest program as a flat binary to load at ``LOAD_ADDR`` (built once, cached)."""
    out = cache_dir() / f"guest-{_tag()}.bin"
    if out.exists():
        return out.read_bytes()
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise KvmError(f"the kvm guest program needs a C compiler: {cc} not found "
                       "(install gcc, with 32-bit support: gcc-multilib)")
    with tempfile.TemporaryDirectory(prefix="vw-guest-", dir=out.parent) as tmp:
        objs = []
        for name in SOURCES:
            obj = os.path.join(tmp, name + ".o")
            _run([cc, *CFLAGS, "-c", str(SRC_DIR / name), "-o", obj])
            objs.append(obj)
        elf = os.path.join(tmp, "guest.elf")
        _run([cc, "-m32", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
              "-Wl,--no-warn-rwx-segments", "-Wl,-z,noexecstack", "-T",
              str(SRC_DIR / "link.ld"), "-o", elf, *objs])
        tmp_bin = os.path.join(tmp, "guest.bin")
        _run([os.environ.get("OBJCOPY", "objcopy"), "-O", "binary", elf, tmp_bin])
        os.replace(tmp_bin, out)
    return out.read_bytes()


def _run(argv: list[str]) -> None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise KvmError(f"building the kvm guest program failed: {e}") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise KvmError(f"building the kvm guest program failed: {last}")
