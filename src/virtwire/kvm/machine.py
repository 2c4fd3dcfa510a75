"""One ``virtwire kvm`` machine: VM, buses, devices, guest, watchdog and the final report.

Theory of operation
-------------------
``Machine`` assembles the pieces: a ``vm.Vm``; on its port bus the UART (0x3F8), the exit port
(0x501), a counting benchmark port (0x502) and the PCI host bridge (0xCF8/0xCFC); our virtio-net
function at 00:03.0 (``pci.device.VirtioPciDevice`` over ``net.device.VirtioNet``, INTA routed to
GSI 10 and written into its Interrupt Line as firmware would); the device's loop thread
(``host.DeviceHost``, whose backends ``hosts.pump.BackendPump`` watches). Then it loads a guest:

- ``guest="ping"|"burst"|...``: our C program (``program.build``) at 0x10000, entered directly in
  32-bit flat protected mode (GDT at 0x500: null, code 0x08, data 0x10), its parameter block at
  0x7000;
- a flat binary: the last byte at 0xFFFFF, aliased at 0xFFFFFFFF; the vCPU starts at the
  real-mode reset vector F000:FFF0.

Ending a run (always one line in ``StopReason.message``): the guest's exit port; a fatal exit
(``Vm``); the watchdog (``timeout``) or SIGTERM/SIGINT, which first set the guest's ``stop`` word
and give it ``GRACE`` seconds to print its report and exit, then stop the vCPU (the final line
says where it was: RIP, interrupts on or off, halted). The vCPU runs in its own thread, so the
main thread is free for signal handlers; no vCPU ioctl is made from another thread while KVM_RUN
may be blocked (it holds the vCPU's mutex). Should KVM_RUN still not return ``FORCE`` seconds
after the stop signal, the process ends with one line rather than hang.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from virtwire.kvm import abi, events, program
from virtwire.kvm.devices import ExitPort, PciHost, Uart16550
from virtwire.kvm.host import DeviceHost, KvmIntx
from virtwire.kvm.vm import HANDLED, KvmError, StopReason, Vm, flat_segments

__all__ = ["Machine", "MachineConfig", "GRACE", "GDT_ADDR", "DEVICE_SLOT", "INTX_GSI"]

log = logging.getLogger(__name__)

GRACE = 2.0
FORCE = 5.0
GDT_ADDR = 0x500
DEVICE_SLOT = 3
INTX_GSI = 10
UNCLAIMED_LOG_MAX = 8


@dataclass
class MachineConfig:
    guest: str = "ping"                 # a program mode (program.MODES) or a flat binary path
    ram_mb: int = 32
    ip: str = "10.0.2.15"
    prefix: int = 24
    burst_count: int = 1000
    burst_size: int = 60
    exits_count: int = 0
    transitional: bool = False
    timeout: float = 0.0                # 0: no watchdog
    count_exits: bool = False
    queue_size: int = 64
    device: bool = True                 # put the NIC function on the bus
    nic: str = "virtio"                 # "virtio" (virtio-net) or "rtl8139" (classic RTL8139)
    console: Callable[[bytes], None] | None = None
    kvm_path: str = "/dev/kvm"
    kernel: str | None = None           # a Linux kernel (ELF vmlinux or bzImage): PVH entry
    initrd: str | None = None
    append: str = "console=ttyS0 earlyprintk=serial,ttyS0,115200"
    system_map: str | None = None
    stall: float = 0.0                  # stop when the console is silent this long (0: never)


@dataclass
class Result:
    reason: StopReason
    guest_status: int | None
    report: dict[str, dict[str, str]]
    console: str
    exits: int
    run_seconds: float
    exit_table: list[dict[str, Any]] = field(default_factory=list)
    unclaimed: int = 0
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


_REPORT = re.compile(r"^vwguest: (\w+) (.*)$")
_KV = re.compile(r"(\w+)=(\S+)")


def parse_report(console: str) -> dict[str, dict[str, str]]:
    """The guest's ``vwguest: <what> k=v ...`` lines as {what: {k: v}} (later lines win; the
    ``bar``/``cap``/``queue`` lines keep one entry each under ``bar0``, ``cap1``, ...)."""
    out: dict[str, dict[str, str]] = {}
    for line in console.splitlines():
        m = _REPORT.match(line.strip())
        if not m:
            continue
        what, rest = m.groups()
        kv = dict(_KV.findall(rest))
        if what.startswith("bar"):
            key = what
        elif what in ("cap", "queue"):
            key = what + (kv.get("type") or kv.get("index") or "")
        else:
            key = what
        out.setdefault(key, {}).update(kv)
    return out


class Machine:
    """See module docstring. ``backends`` are the frame backends of the NIC (one pair)."""

    def __init__(self, cfg: MachineConfig, backends: list[Any] | None = None,
                 mac: str | None = None) -> None:
        self.cfg = cfg
        self.flat = cfg.kernel is None and cfg.guest not in program.MODES
        self.linux: Any = None
        self.vm = Vm(cfg.ram_mb << 20, rom=self.flat, kvm_path=cfg.kvm_path)
        self._console = bytearray()
        self.guest_status: int | None = None
        self.unclaimed = 0
        self._unclaimed_logged = 0
        self.lock = threading.Lock()
        self.pump: DeviceHost | None = None
        self.transport: Any = None
        self._requested: tuple[str, str, int] | None = None
        self.int3 = 0
        self._done = threading.Event()
        try:
            self._build(backends or [], mac)
        except BaseException:
            self.close()
            raise

    # -- building ------------------------------------------------------------------------------
    def _build(self, backends: list[Any], mac: str | None) -> None:
        vm, cfg = self.vm, self.cfg
        uart = Uart16550(self._on_console)
        self.exit_port = ExitPort(self._on_guest_exit, program.EXIT_TAG)
        fixed = {**uart.ports(), program.EXIT_PORT: self.exit_port.access,
                 program.BENCH_PORT: lambda p, s, v: 0}
        self.pci = PciHost(vm.ram_size, lambda p: p in fixed or 0xCF8 <= p < 0xD00, self.lock)
        fixed.update(self.pci.ports())
        if cfg.device:
            self._add_nic(backends, mac)
        vm.ports.update(fixed)
        vm.port_fallback = self.pci.io
        vm.mmio = self.pci.mmio
        vm.on_unclaimed = self._on_unclaimed
        vm.count_exits = cfg.count_exits
        from virtwire import trace as _trace

        if _trace.TRACE is not None:
            self._trace_handlers()
        if self.cfg.kernel:
            from virtwire.kvm.linux import LinuxBoot

            self.linux = LinuxBoot(vm, self.cfg.kernel, self.cfg.initrd, self.cfg.append,
                                   self.cfg.system_map)
        elif self.flat:
            self._load_flat()
        else:
            self._load_program()

    def _nic_function(self, backends: list[Any], mac: Any) -> Any:
        """The NIC's PCI function: virtio-net, or the classic RTL8139 (revision 0x10)."""
        intx = KvmIntx(self.vm, INTX_GSI)
        if self.cfg.nic == "rtl8139":
            from virtwire.rtl8139.pci import Rtl8139Nic, Rtl8139Pci

            if len(backends) != 1:
                raise KvmError("the RTL8139 has one queue pair: give it one backend")
            if isinstance(mac, str):
                mac = bytes.fromhex(mac.replace(":", ""))
            nic = Rtl8139Nic(backends[0], mac=mac or b"\x02" + os.urandom(5), revision=0x10,
                             name="kvm0")
            return Rtl8139Pci(nic, intx=intx, defer_notify=True)
        from virtwire.net.device import VirtioNet
        from virtwire.pci.device import VirtioPciDevice

        net = VirtioNet(backends, mac=mac, queue_size=256, name="kvm0")
        return VirtioPciDevice(net, transitional=self.cfg.transitional, intx=intx,
                               defer_notify=True)

    def _add_nic(self, backends: list[Any], mac: Any) -> None:
        pci = self._nic_function(backends, mac)
        pci.config_write(0x3C, 1, INTX_GSI)  # firmware: INTA of slot 3 is wired to GSI 10
        pci.set_memory(self.vm.mem)
        self.pci.add(DEVICE_SLOT, pci)
        self.transport = pci
        self.pump = DeviceHost(pci, backends, self.lock)
        pump = self.pump
        self.pci.after_write.append(pump.kick)
        mmio, io = self.pci.mmio, self.pci.io

        def mmio_then_kick(addr: int, size: int, value: int | None) -> int | None:
            r = mmio(addr, size, value)
            if value is not None:
                pump.kick()
            return r

        def io_then_kick(port: int, size: int, value: int | None) -> int | None:
            r = io(port, size, value)
            if value is not None:
                pump.kick()
            return r

        self.pci.mmio = mmio_then_kick  # type: ignore[method-assign]
        self.pci.io = io_then_kick  # type: ignore[method-assign]

    def _trace_handlers(self) -> None:
        vm = self.vm
        for port, h in list(vm.ports.items()):
            vm.ports[port] = events.traced(h, "io", self.pci)  # type: ignore[assignment]
        vm.port_fallback = events.traced(self.pci.io, "io", self.pci)
        vm.mmio = events.traced(self.pci.mmio, "mmio", self.pci)

    def _load_program(self) -> None:
        cfg, vm = self.cfg, self.vm
        image = program.build()
        vm.load(program.LOAD_ADDR, image)
        params = program.Params(cfg.guest, cfg.ip, cfg.prefix, cfg.burst_count, cfg.burst_size,
                                INTX_GSI, cfg.exits_count, cfg.queue_size)
        vm.load(program.PARAMS_ADDR, params.pack())
        # GDT: null, flat 32-bit code (0x08), flat data (0x10)
        vm.load(GDT_ADDR, struct.pack("<QQQ", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF))
        s = vm.get_sregs()
        flat_segments(s, code=0x08, data=0x10)
        s.gdt.base, s.gdt.limit = GDT_ADDR, 23
        s.cr0 = abi.CR0_PE | abi.CR0_ET
        vm.set_sregs(s)
        regs = vm.get_regs()
        regs.rip, regs.rflags, regs.rsp = program.LOAD_ADDR, 2, program.STACK_TOP
        vm.set_regs(regs)

    def _load_flat(self) -> None:
        try:
            with open(self.cfg.guest, "rb") as f:
                data = f.read(0x10001)
        except OSError as e:
            raise KvmError(f"cannot read guest binary {self.cfg.guest}: {e.strerror}") from None
        self.vm.load_rom(data)  # KVM's reset state is F000:FFF0 with CS base 0xFFFF0000

    # -- callbacks from the vCPU thread --------------------------------------------------------
    def _on_console(self, b: bytes) -> None:
        self._console += b
        if self.cfg.console is not None:
            self.cfg.console(b)

    def _on_guest_exit(self, status: int) -> None:
        self.guest_status = status
        what = program.GUEST_STATUS.get(status, "") if not self.flat else ""
        msg = f"guest exited with status {status:#04x}" + (f" ({what})" if what else "")
        self.vm.request_stop(StopReason("guest_exit", msg, status, None,
                                        {"guest_status": status}))

    def _on_exit(self, reason: int) -> StopReason | None:
        """Exits the run loop does not dispatch: an ``int3`` the emulator refused is completed
        (``Vm.complete_int3``); everything else ends the run (``Vm``'s diagnosis)."""
        if reason == abi.KVM_EXIT_INTERNAL_ERROR and self.vm.complete_int3():
            self.int3 += 1
            return HANDLED
        return None

    def _on_unclaimed(self, kind: str, addr: int, size: int, value: int | None) -> None:
        self.unclaimed += 1
        if self._unclaimed_logged < UNCLAIMED_LOG_MAX:
            self._unclaimed_logged += 1
            op = "read" if value is None else f"write {value:#x}"
            where = f"port {addr:#x}" if kind == "io" else f"address {addr:#x}"
            log.info("kvm: guest %s of %d bytes at %s: nothing there", op, size, where)

    # -- running -------------------------------------------------------------------------------
    def request_stop(self, why: str, kind: str = "stopped", status: int = 0) -> None:
        """Ask the guest for its report (stop word), stop the vCPU after ``GRACE`` s, and end
        the process after ``FORCE`` more if KVM_RUN does not come back (module docstring)."""
        if self._requested is not None:
            return
        self._requested = (why, kind, status)
        ours = not self.flat and self.linux is None
        if ours:
            self.vm.mem.write_u32(program.PARAMS_ADDR + program.STOP_OFFSET, 1)

        def hard() -> None:
            if self._done.wait(GRACE if ours else 0):
                return
            self.vm.request_stop(StopReason(kind, why, status, None, {"stuck": True}))
            if not self._done.wait(FORCE):
                self._force_exit(why, status)

        threading.Thread(target=hard, daemon=True, name="virtwire-kvm-grace").start()

    def _force_exit(self, why: str, status: int) -> None:
        """KVM_RUN ignores the stop signal while this host emulates a guest that makes no exits
        (a CPL0 spin loop): only a fatal signal ends it, so end the process."""
        sys.stdout.flush()
        sys.stderr.write(f"virtwire kvm: {why}; the vCPU did not return from KVM_RUN within "
                         f"{FORCE:g} s (the guest runs emulated code without exits, which "
                         "this host's KVM does not interrupt for a signal): process ended\n")
        sys.stderr.flush()
        os._exit(status or 1)

    def _where(self, reason: StopReason) -> StopReason:
        """A stop the VMM asked for: add where the vCPU was (safe now: KVM_RUN has returned)."""
        why = reason.message
        if not self.flat and self.linux is None:
            why += " (the guest did not answer the stop request"
            why += ", halted)" if self.vm.mp_state() == "HALTED" else ")"
        try:
            regs = self.vm.get_regs()
        except KvmError:
            return StopReason(reason.kind, why, reason.status)
        iflag = "on" if regs.rflags & 0x200 else "off"
        why += f" at RIP={regs.rip:#x}, interrupts {iflag}"
        return StopReason(reason.kind, why, reason.status, regs.rip)

    def run(self) -> Result:
        from virtwire import trace as _trace

        if _trace.TRACE is not None:
            _trace.TRACE.emit("host", "start", kind="kvm", guest=self.cfg.guest)
        events.start_event(guest=self.cfg.guest, transitional=self.cfg.transitional,
                           slot=DEVICE_SLOT, gsi=INTX_GSI, ram=self.vm.ram_size)
        if self.pump is not None:
            self.pump.start()
        timer = None
        if self.cfg.timeout > 0:
            timer = threading.Timer(self.cfg.timeout, self.request_stop,
                                    (f"timeout: stopped after {self.cfg.timeout:g} s",
                                     "timeout", 124))
            timer.daemon = True
            timer.start()
        if self.cfg.stall > 0:
            threading.Thread(target=self._stall_watch, daemon=True,
                             name="virtwire-kvm-stall").start()
        try:
            reason = self._run_vcpu()
        finally:
            if timer is not None:
                timer.cancel()
            if self.pump is not None:
                self.pump.stop()
        if reason.detail.get("stuck"):
            reason = self._where(reason)
        if self.linux is not None and reason.rip is not None:
            reason.message += self.linux.symbol(reason.rip)
        if self.int3:
            reason.message += f"; {self.int3} int3 completed as #BP by the VMM"
        req = self._requested
        if req is not None and reason.kind == "guest_exit" and reason.status == 0:
            reason = StopReason(req[1], f"{req[0]} (the guest printed its report)", req[2])
        return self._result(reason)

    def _run_vcpu(self) -> StopReason:
        """The vCPU runs in its own thread so that this (main) thread stays free for signal
        handlers (SIGTERM/SIGINT -> ``request_stop``) while KVM_RUN blocks."""
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                box["reason"] = self.vm.run(self._on_exit)
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e
            finally:
                self._done.set()

        t = threading.Thread(target=body, name="virtwire-kvm-vcpu", daemon=True)
        t.start()
        while not self._done.wait(0.25):
            pass
        t.join()
        if "error" in box:
            raise box["error"]
        return box["reason"]

    def _stall_watch(self) -> None:
        """Stop a guest whose console stays silent for ``cfg.stall`` seconds (a spinning or
        waiting kernel): the run never hangs without ``--timeout``."""
        seen, since = len(self._console), time.monotonic()
        while not self._done.wait(1.0):
            n = len(self._console)
            if n != seen:
                seen, since = n, time.monotonic()
            elif time.monotonic() - since >= self.cfg.stall:
                self.request_stop(f"stall: no console output for {self.cfg.stall:g} s",
                                  "stall", 6)
                return

    def _result(self, reason: StopReason) -> Result:
        events.stop_event(reason.kind, reason.message, reason.status, self.vm.exits)
        console = self._console.decode("utf-8", "replace")
        warnings = list(self.pci.warnings)
        if self.unclaimed:
            warnings.append(f"{self.unclaimed} guest accesses hit nothing")
        res = Result(reason, self.guest_status, parse_report(console), console, self.vm.exits,
                     self.vm.run_seconds, unclaimed=self.unclaimed, warnings=warnings)
        if self.cfg.count_exits:
            res.exit_table = events.exit_table(self.vm.exit_counts, self.pci)
        if self.pump is not None:
            res.stats = self.pump.stats()
        if self.linux is not None:
            res.stats["linux"] = self.linux.describe()
        return res

    def close(self) -> None:
        if self.pump is not None:
            self.pump.close()
            self.pump = None
        self.vm.close()


def console_to_stdout(b: bytes) -> None:
    sys.stdout.buffer.write(b)
    if b == b"\n":
        sys.stdout.buffer.flush()
