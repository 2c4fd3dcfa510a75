"""A KVM virtual machine with one vCPU, driven from Python.

Theory of operation
-------------------
``Vm`` opens ``/dev/kvm``, creates a VM with the in-kernel irqchip (PIC, IOAPIC, LAPIC) and PIT,
backs guest RAM with one memfd (so the same RAM can later be handed to a vhost-user back end) and
registers it as memory slots, then creates one vCPU and maps its ``kvm_run`` page.

Guest-physical layout: RAM from 0 to ``ram_size``, except that 0xF0000-0xFFFFF can be a 64 KiB
ROM (``load_rom``) that is also mapped at the top of 4 GiB (0xFFFF0000), so a flat binary placed
there starts at the real-mode reset vector F000:FFF0. Everything else (BARs the guest programs, a
hostile guest's wild pointers) is unbacked: accesses exit to user space as ``KVM_EXIT_MMIO``.

The run loop (``run``) is the hot path. ``KVM_RUN`` is called through ``fcntl.ioctl`` with an
integer argument, which drops the GIL, so the event-loop thread serving the device runs while the
vCPU executes; a guest ``hlt`` waits in the kernel (in-kernel irqchip) until an interrupt arrives.
Measured (tools/bench_kvm.py): 9.7-10 us per port exit against 8.1-8.4 us for a C loop.
Each exit is decoded from fixed offsets of the ``kvm_run`` mmap and dispatched by one dict
lookup: ``KVM_EXIT_IO`` to the port handlers (``ports``, then ``port_fallback`` for BARs),
``KVM_EXIT_MMIO`` to the MMIO handler. Everything else ends the run with a
``StopReason`` naming the exit in one line (SHUTDOWN: a triple fault; FAIL_ENTRY: the hardware
reason; INTERNAL_ERROR: the suberror, RIP and the instruction bytes, read from guest RAM).

Stopping from another thread (watchdog, SIGTERM): ``request_stop`` sets ``immediate_exit`` in
``kvm_run`` and sends SIGUSR1 to the vCPU thread; ``KVM_RUN`` returns EINTR and the loop returns.
The vCPU thread must have a SIGUSR1 handler (``install_kick_signal``, from the main thread).
Never call a vCPU ioctl (registers, MP state) from another thread while ``run`` may be inside
KVM_RUN: the kernel holds the vCPU's mutex there, and the caller would wait for the next exit.

# SAFETY: guest RAM is one shared mmap of the memfd; KVM gets its address (taken from a ctypes
# ``from_buffer`` export kept for the VM's lifetime), device code gets memoryviews of it. The
# ``kvm_run`` page is an mmap of the vCPU fd read with ``struct.unpack_from``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from virtwire.errors import UserFacingError
from virtwire.kvm import abi
from virtwire.memory import MemoryRegion, RegionMemory

__all__ = ["Vm", "KvmError", "StopReason", "HANDLED", "install_kick_signal", "ROM_BASE", "ROM_SIZE",
           "HIGH_ROM_BASE", "flat_segments"]

log = logging.getLogger(__name__)


def flat_segments(s: abi.KvmSregs, code: int, data: int) -> None:
    """Flat 4 GiB 32-bit segments in ``s``: CS (execute/read, accessed) with selector ``code``,
    DS/ES/FS/GS/SS (read/write) with selector ``data``; present, ring 0, 4 KiB granularity."""
    for name in ("ds", "es", "fs", "gs", "ss"):
        seg = getattr(s, name)
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, data, 3
        seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = 1, 0, 1, 1, 0, 1
    s.cs.base, s.cs.limit, s.cs.selector, s.cs.type = 0, 0xFFFFFFFF, code, 11
    s.cs.present, s.cs.dpl, s.cs.db, s.cs.s, s.cs.l, s.cs.g = 1, 0, 1, 1, 0, 1

ROM_BASE = 0xF0000
ROM_SIZE = 0x10000
HIGH_ROM_BASE = 0xFFFF0000
KICK_SIGNAL = signal.SIGUSR1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_ioctl_nogil = _libc.ioctl  # ctypes releases the GIL around the call

_IO = struct.Struct("<BBHIQ")
_MMIO = struct.Struct("<Q8sIB")
_U32 = struct.Struct("<I")


class KvmError(UserFacingError):
    """KVM is missing, refused, or the VM could not be built (one line for a person)."""


@dataclass
class StopReason:
    """Why the run loop returned: ``kind`` is a short word, ``message`` the one-line diagnosis,
    ``status`` the exit status the CLI returns."""

    kind: str
    message: str
    status: int
    rip: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


# What an ``on_exit`` hook returns when it dealt with the exit and the vCPU should go on.
HANDLED = StopReason("handled", "", 0)


def install_kick_signal() -> None:
    """Give SIGUSR1 a (no-op) handler so it interrupts ``KVM_RUN`` instead of killing us.
    Python installs it without SA_RESTART. Call from the main thread."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(KICK_SIGNAL, lambda *_: None)


def _kvm_ioctl(fd: int, req: int, arg: Any = 0, what: str = "") -> int:
    if isinstance(arg, int):  # fcntl.ioctl takes a C int; addresses need the whole long
        r = _ioctl_nogil(fd, req, arg)
        if r < 0:
            raise KvmError(f"KVM {what or hex(req)} failed: {os.strerror(ctypes.get_errno())}")
        return r
    try:
        return fcntl.ioctl(fd, req, arg)
    except OSError as e:
        raise KvmError(f"KVM {what or hex(req)} failed: {e.strerror}") from None


def open_kvm(path: str = "/dev/kvm") -> int:
    """Open ``/dev/kvm`` or raise a one-line ``KvmError`` saying why not."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmError(f"{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd, "
                       "or enable nested virtualization)") from None
    except PermissionError:
        raise KvmError(f"no permission to open {path} (add this user to group "
                       f"'kvm' or run as root)") from None
    except OSError as e:
        raise KvmError(f"cannot open {path}: {e.strerror}") from None
    version = fcntl.ioctl(fd, abi.KVM_GET_API_VERSION, 0)
    if version != abi.KVM_API_VERSION:
        os.close(fd)
        raise KvmError(f"{path}: KVM API version {version}, expected {abi.KVM_API_VERSION}")
    return fd


class Vm:
    """One VM, its RAM, one vCPU and the exit dispatch tables (module docstring)."""

    def __init__(self, ram_size: int = 32 << 20, *, kvm_path: str = "/dev/kvm",
                 rom: bool = False) -> None:
        if ram_size < 2 << 20 or ram_size % 4096 or ram_size > 3 << 30:
            raise KvmError(f"guest RAM of {ram_size:#x} bytes: expected 2 MiB..3 GiB, 4 KiB pages")
        self.ram_size = ram_size
        self.kvm_fd = open_kvm(kvm_path)
        self._closers: list[Callable[[], None]] = []
        self._exports: list[Any] = []
        self.slots = 0
        try:
            self.vm_fd = _kvm_ioctl(self.kvm_fd, abi.KVM_CREATE_VM, 0, "CREATE_VM")
            self._closers.append(lambda: os.close(self.vm_fd))
            _kvm_ioctl(self.vm_fd, abi.KVM_SET_TSS_ADDR, 0xFFFBD000, "SET_TSS_ADDR")
            ident = ctypes.c_uint64(0xFFFBC000)
            _kvm_ioctl(self.vm_fd, abi.KVM_SET_IDENTITY_MAP_ADDR, ident, "SET_IDENTITY_MAP_ADDR")
            _kvm_ioctl(self.vm_fd, abi.KVM_CREATE_IRQCHIP, 0, "CREATE_IRQCHIP")
            pit = abi.KvmPitConfig(flags=abi.KVM_PIT_SPEAKER_DUMMY)
            _kvm_ioctl(self.vm_fd, abi.KVM_CREATE_PIT2, pit, "CREATE_PIT2")
            self._map_ram(rom)
            self._create_vcpu()
        except BaseException:
            self.close()
            raise
        self.ports: dict[int, Callable[[int, int, int | None], int]] = {}
        self.port_fallback: Callable[[int, int, int | None], int | None] | None = None
        self.mmio: Callable[[int, int, int | None], int | None] | None = None
        self.on_unclaimed: Callable[[str, int, int, int | None], None] | None = None
        self.exit_counts: dict[tuple[str, int], int] = {}
        self.count_exits = False
        self.exits = 0
        self.run_seconds = 0.0
        self.stop_reason: StopReason | None = None
        self._stop: StopReason | None = None
        self._thread_id: int | None = None
        self._irq_lock = threading.Lock()

    # -- building ----------------------------------------------------------------------------
    def _map_ram(self, rom: bool) -> None:
        fd = os.memfd_create("virtwire-kvm-ram", os.MFD_CLOEXEC)
        self.ram_fd = fd
        self._closers.append(lambda: os.close(fd))
        os.ftruncate(fd, self.ram_size + (ROM_SIZE if rom else 0))
        self.ram_map = mmap.mmap(fd, self.ram_size + (ROM_SIZE if rom else 0),
                                 mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        buf = (ctypes.c_char * len(self.ram_map)).from_buffer(self.ram_map)
        self._exports.append(buf)
        self.host_base = ctypes.addressof(buf)
        self.mem = RegionMemory()
        view = memoryview(self.ram_map)
        if rom:
            self._slot(0, ROM_BASE, 0)
            self._slot(0x100000, self.ram_size - 0x100000, 0x100000)
            self._slot(ROM_BASE, ROM_SIZE, self.ram_size)
            self._slot(HIGH_ROM_BASE, ROM_SIZE, self.ram_size)
            self.mem.add_region(MemoryRegion(0, ROM_BASE, view[:ROM_BASE]))
            self.mem.add_region(MemoryRegion(0x100000, self.ram_size - 0x100000,
                                             view[0x100000:self.ram_size]))
            self.rom_view = view[self.ram_size:self.ram_size + ROM_SIZE]
        else:
            self._slot(0, self.ram_size, 0)
            self.mem.add_region(MemoryRegion(0, self.ram_size, view[:self.ram_size]))
            self.rom_view = None

    def _slot(self, gpa: int, size: int, offset: int) -> None:
        region = abi.KvmUserspaceMemoryRegion(slot=self.slots, flags=0, guest_phys_addr=gpa,
                                              memory_size=size,
                                              userspace_addr=self.host_base + offset)
        _kvm_ioctl(self.vm_fd, abi.KVM_SET_USER_MEMORY_REGION, region, "SET_USER_MEMORY_REGION")
        self.slots += 1

    def _create_vcpu(self) -> None:
        self.vcpu_fd = _kvm_ioctl(self.vm_fd, abi.KVM_CREATE_VCPU, 0, "CREATE_VCPU")
        self._closers.append(lambda: os.close(self.vcpu_fd))
        size = fcntl.ioctl(self.kvm_fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0)
        self.run_map = mmap.mmap(self.vcpu_fd, size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)

    def load(self, gpa: int, data: bytes) -> None:
        """Copy ``data`` into guest RAM at ``gpa`` (KvmError if it does not fit)."""
        if not self.mem.contains(gpa, max(len(data), 1)):
            raise KvmError(f"{len(data)} bytes at {gpa:#x} do not fit in guest RAM")
        self.mem.write(gpa, data)

    def load_rom(self, data: bytes) -> None:
        """A flat binary ending at the reset vector: its last byte lands at 0xFFFFF/0xFFFFFFFF."""
        if self.rom_view is None:
            raise KvmError("this VM was built without a ROM")
        if not data or len(data) > ROM_SIZE:
            raise KvmError(f"a flat binary of {len(data)} bytes: expected 1..{ROM_SIZE}")
        self.rom_view[ROM_SIZE - len(data):] = data

    # -- registers ---------------------------------------------------------------------------
    def get_regs(self) -> abi.KvmRegs:
        regs = abi.KvmRegs()
        _kvm_ioctl(self.vcpu_fd, abi.KVM_GET_REGS, regs, "GET_REGS")
        return regs

    def set_regs(self, regs: abi.KvmRegs) -> None:
        _kvm_ioctl(self.vcpu_fd, abi.KVM_SET_REGS, regs, "SET_REGS")

    def get_sregs(self) -> abi.KvmSregs:
        sregs = abi.KvmSregs()
        _kvm_ioctl(self.vcpu_fd, abi.KVM_GET_SREGS, sregs, "GET_SREGS")
        return sregs

    def set_sregs(self, sregs: abi.KvmSregs) -> None:
        _kvm_ioctl(self.vcpu_fd, abi.KVM_SET_SREGS, sregs, "SET_SREGS")

    def set_cpuid(self, entries: list[abi.KvmCpuidEntry2]) -> None:
        cpuid = abi.cpuid2_type(len(entries))()
        cpuid.nent = len(entries)
        for i, e in enumerate(entries):
            cpuid.entries[i] = e
        _kvm_ioctl(self.vcpu_fd, abi.KVM_SET_CPUID2, cpuid, "SET_CPUID2")

    def supported_cpuid(self) -> list[abi.KvmCpuidEntry2]:
        cpuid = abi.cpuid2_type(256)()
        cpuid.nent = 256
        _kvm_ioctl(self.kvm_fd, abi.KVM_GET_SUPPORTED_CPUID, cpuid, "GET_SUPPORTED_CPUID")
        return [cpuid.entries[i] for i in range(cpuid.nent)]

    def mp_state(self) -> str:
        st = ctypes.c_uint32()
        try:
            fcntl.ioctl(self.vcpu_fd, abi.KVM_GET_MP_STATE, st)
        except OSError:
            return "?"
        return abi.KVM_MP_STATE_NAMES.get(st.value, str(st.value))

    def translate(self, linear: int) -> int | None:
        tr = abi.KvmTranslation(linear_address=linear)
        try:
            fcntl.ioctl(self.vcpu_fd, abi.KVM_TRANSLATE, tr)
        except OSError:
            return None
        return tr.physical_address if tr.valid else None

    def code_bytes(self, n: int = 15) -> tuple[int, bytes]:
        """(RIP, up to ``n`` instruction bytes at CS:RIP) for diagnoses; bytes may be empty."""
        regs, sregs = self.get_regs(), self.get_sregs()
        linear = (sregs.cs.base + regs.rip) & 0xFFFFFFFFFFFFFFFF
        gpa = self.translate(linear) if sregs.cr0 & abi.CR0_PG else linear
        out = b""
        if gpa is not None:
            for k in range(n, 0, -1):
                if self.mem.contains(gpa, k):
                    out = self.mem.read(gpa, k)
                    break
            else:
                if self.rom_view is not None and ROM_BASE <= gpa & 0xFFFFF and (
                        gpa >= HIGH_ROM_BASE or ROM_BASE <= gpa < ROM_BASE + ROM_SIZE):
                    off = (gpa & 0xFFFF)
                    out = bytes(self.rom_view[off:off + n])
        return regs.rip, out

    # -- interrupts --------------------------------------------------------------------------
    def irq_line(self, gsi: int, level: bool) -> None:
        """Drive input ``gsi`` of the in-kernel PIC/IOAPIC (``KVM_IRQ_LINE``); any thread."""
        arg = abi.KvmIrqLevel(irq=gsi, level=int(level))
        fcntl.ioctl(self.vm_fd, abi.KVM_IRQ_LINE, arg)

    def signal_msi(self, address: int, data: int) -> int:
        msi = abi.KvmMsi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return fcntl.ioctl(self.vm_fd, abi.KVM_SIGNAL_MSI, msi)

    def inject_exception(self, vector: int) -> None:
        """Queue exception ``vector`` (no error code) for delivery at the next entry."""
        ev = abi.KvmVcpuEvents()
        _kvm_ioctl(self.vcpu_fd, abi.KVM_GET_VCPU_EVENTS, ev, "GET_VCPU_EVENTS")
        ev.exception_injected = 1
        ev.exception_nr = vector
        ev.exception_has_error_code = 0
        ev.flags = 0
        _kvm_ioctl(self.vcpu_fd, abi.KVM_SET_VCPU_EVENTS, ev, "SET_VCPU_EVENTS")

    def complete_int3(self) -> bool:
        """After an INTERNAL_ERROR: if the emulator refused an ``int3`` (0xCC at RIP), do what
        the CPU does instead -- RIP past it and #BP delivered as a trap -- and return True."""
        sub = struct.unpack_from("<I", self.run_map, abi.RUN_INTERNAL)[0]
        if sub != abi.KVM_INTERNAL_ERROR_EMULATION:
            return False
        _rip, code = self.code_bytes(1)
        if code[:1] != b"\xcc":
            return False
        regs = self.get_regs()
        regs.rip += 1
        self.set_regs(regs)
        self.inject_exception(3)
        return True

    # -- running -----------------------------------------------------------------------------
    def request_stop(self, reason: StopReason) -> None:
        """End ``run`` from any thread (module docstring)."""
        if self._stop is None:
            self._stop = reason
        try:
            self.run_map[abi.RUN_IMMEDIATE_EXIT] = 1
        except ValueError:
            return  # closed
        tid = self._thread_id
        if tid is not None and tid != threading.get_ident():
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def run(self, on_exit: Callable[[int], StopReason | None] | None = None) -> StopReason:
        """Run the vCPU until something ends it (module docstring); returns why."""
        self._thread_id = threading.get_ident()
        t0 = time.perf_counter()
        try:
            reason = self._loop(on_exit)
        finally:
            self.run_seconds += time.perf_counter() - t0
            self._thread_id = None
        self.stop_reason = reason
        return reason

    def _loop(self, on_exit: Callable[[int], StopReason | None] | None) -> StopReason:
        # The hot path: locals only, one dict lookup per port exit. ``fcntl.ioctl`` with an
        # integer argument drops the GIL around the call (the device thread runs meanwhile) and
        # costs less per call than a ctypes foreign call; EINTR (a stop request or a signal)
        # arrives as InterruptedError.
        run_map, fd, kvm_run, ioctl = self.run_map, self.vcpu_fd, abi.KVM_RUN, fcntl.ioctl
        words = memoryview(run_map).cast("I")
        io_unpack, mmio_unpack = _IO.unpack_from, _MMIO.unpack_from
        ports, counts, count = self.ports, self.exit_counts, self.count_exits
        handle_io, handle_mmio = self._io_slow, self._mmio
        from_bytes = int.from_bytes
        exits = 0
        try:
            while True:
                try:
                    ioctl(fd, kvm_run, 0)
                except InterruptedError:
                    run_map[abi.RUN_IMMEDIATE_EXIT] = 0
                    if self._stop is not None:
                        return self._stop
                    continue
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        continue
                    return StopReason("error", f"KVM_RUN failed: {e.strerror}", 1)
                exits += 1
                reason = words[2]  # kvm_run.exit_reason
                if reason == 2:  # KVM_EXIT_IO
                    direction, size, port, n, off = io_unpack(run_map, 32)
                    h = ports.get(port)
                    if h is not None and n == 1:
                        if direction:
                            h(port, size, run_map[off] if size == 1 else words[off >> 2]
                              if size == 4 else from_bytes(run_map[off:off + size], "little"))
                        else:
                            run_map[off:off + size] = (h(port, size, None) & (
                                (1 << (8 * size)) - 1)).to_bytes(size, "little")
                    else:
                        handle_io(direction, size, port, n, off)
                    if count:
                        k = ("io", port)
                        counts[k] = counts.get(k, 0) + 1
                elif reason == 6:  # KVM_EXIT_MMIO
                    addr, data, length, is_write = mmio_unpack(run_map, 32)
                    handle_mmio(addr, data, length, is_write)
                    if count:
                        k = ("mmio", addr)
                        counts[k] = counts.get(k, 0) + 1
                else:
                    stop = on_exit(reason) if on_exit is not None else None
                    if stop is HANDLED:
                        continue
                    if stop is None:
                        stop = self._other_exit(reason)
                    if stop is not None:
                        return stop
                # a handler that ends the run (exit port) set immediate_exit: the next
                # KVM_RUN returns EINTR at once and the stop is seen there
        finally:
            words.release()
            self.exits += exits

    def _io_slow(self, direction: int, size: int, port: int, count: int, off: int) -> None:
        """A port no fixed handler claims, or a string (``rep ins/outs``) access."""
        run_map = self.run_map
        mask = (1 << (8 * size)) - 1
        for i in range(min(count, 4096)):
            at = off + i * size
            h = self.ports.get(port) or self.port_fallback
            if direction:
                value = int.from_bytes(run_map[at:at + size], "little")
                r = h(port, size, value) if h is not None else None
                if h is None or r is None and h is self.port_fallback:
                    self._unclaimed("io", port, size, value)
            else:
                r = h(port, size, None) if h is not None else None
                if r is None:
                    self._unclaimed("io", port, size, None)
                    r = mask  # nothing on the bus: all ones
                run_map[at:at + size] = (r & mask).to_bytes(size, "little")

    def _mmio(self, addr: int, data: bytes, length: int, is_write: int) -> None:
        if not 1 <= length <= 8:
            self._unclaimed("mmio", addr, length, None)
            return
        h = self.mmio
        if is_write:
            value = int.from_bytes(data[:length], "little")
            if h is None or h(addr, length, value) is None:
                self._unclaimed("mmio", addr, length, value)
            return
        r = h(addr, length, None) if h is not None else None
        if r is None:
            self._unclaimed("mmio", addr, length, None)
            r = (1 << (8 * length)) - 1
        mm = self.run_map
        mm[abi.RUN_MMIO + 8:abi.RUN_MMIO + 8 + length] = r.to_bytes(8, "little")[:length]

    def _unclaimed(self, kind: str, addr: int, size: int, value: int | None) -> None:
        if self.on_unclaimed is not None:
            self.on_unclaimed(kind, addr, size, value)

    def _other_exit(self, reason: int) -> StopReason | None:
        """Exits other than I/O: a one-line diagnosis that ends the run, or None to go on."""
        name = abi.EXIT_NAMES.get(reason, f"exit reason {reason}")
        if reason in (abi.KVM_EXIT_INTR, abi.KVM_EXIT_IRQ_WINDOW_OPEN):
            return None
        rip, code = self._safe_code()
        where = f"RIP={rip:#x}" + (f" bytes {code.hex(' ')}" if code else "")
        if reason == abi.KVM_EXIT_SHUTDOWN:
            return StopReason("shutdown", f"guest shut down (triple fault) at {where}", 3, rip)
        if reason == abi.KVM_EXIT_FAIL_ENTRY:
            hw = struct.unpack_from("<Q", self.run_map, abi.RUN_FAIL_ENTRY)[0]
            return StopReason("fail_entry", f"KVM could not enter the guest (hardware entry "
                              f"failure reason {hw:#x}) at {where}", 3, rip)
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            sub, ndata = struct.unpack_from("<II", self.run_map, abi.RUN_INTERNAL)
            what = abi.INTERNAL_ERROR_NAMES.get(sub, f"suberror {sub}")
            msg = (f"KVM internal error: {what} at {where}"
                   + (" (this host's KVM cannot emulate that instruction)" if sub == 1 else ""))
            return StopReason("internal_error", msg, 4, rip,
                              {"suberror": sub, "bytes": code.hex()})
        if reason == abi.KVM_EXIT_HLT:
            return StopReason("hlt", f"guest halted at {where}", 5, rip)
        if reason == abi.KVM_EXIT_SYSTEM_EVENT:
            kind = struct.unpack_from("<I", self.run_map, abi.RUN_SYSTEM_EVENT)[0]
            return StopReason("system_event", f"guest system event {kind} (1 shutdown, 2 reset) "
                              f"at {where}", 3, rip)
        return StopReason("exit", f"unhandled KVM exit {name} at {where}", 3, rip)

    def _safe_code(self) -> tuple[int, bytes]:
        try:
            return self.code_bytes()
        except KvmError:
            return 0, b""

    def close(self) -> None:
        for attr in ("run_map",):
            m = getattr(self, attr, None)
            if m is not None:
                m.close()
        mem = getattr(self, "mem", None)
        if mem is not None:
            for r in list(mem.regions):
                mem.remove_region(r.gpa).release()
        self.rom_view = None
        self._exports.clear()
        ram = getattr(self, "ram_map", None)
        if ram is not None:
            try:
                ram.close()
            except BufferError:
                log.debug("guest RAM still exported; unmapped at exit")
        for fn in reversed(self._closers):
            try:
                fn()
            except OSError:
                pass
        self._closers.clear()
        if getattr(self, "kvm_fd", -1) >= 0:
            os.close(self.kvm_fd)
            self.kvm_fd = -1
