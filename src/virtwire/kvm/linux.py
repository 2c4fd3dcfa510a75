"""Booting a Linux kernel on ``virtwire kvm``: PVH entry for an ELF vmlinux; a bzImage is unpacked.

Theory of operation
-------------------
- **ELF vmlinux**: its ``PT_LOAD`` segments are copied to their physical addresses and the
  kernel is entered at the PVH entry point (the ``XEN_ELFNOTE_PHYS32_ENTRY`` note, type 18 of
  name "Xen"): 32-bit protected mode, paging off, flat CS/DS/ES/SS, a 32-bit TSS in TR, and EBX
  pointing at ``struct hvm_start_info`` (xen/include/public/arch-x86/hvm/start_info.h, version 1:
  command line, the initrd as module 0, and an e820-style memory map).
- **bzImage** (x86 boot protocol, Documentation/arch/x86/boot.rst): the header's
  ``payload_offset``/``payload_length`` locate the compressed vmlinux; the VMM decompresses it
  (xz, gzip, bzip2, lzma: what Python's standard library reads) and boots that ELF by PVH, rather
  than run the kernel's own decompressor, which at this host's emulation speed (1-2 M
  instructions/s at CPL0) would take minutes.
- **CPUID**: what KVM supports minus what this host's emulator cannot execute at CPL0 (popcnt,
  cmpxchg16b, xsave/AVX, SSE4, rdrand, ...), so the kernel's alternatives do not pick them.
  The same bits are also cleared on the command line (``clearcpuid=``) and the extra arguments
  are printed.
- **int3**: the kernel executes ``int3`` in self-tests and while patching alternatives; this
  host's emulator fails it (KVM_EXIT_INTERNAL_ERROR). The VMM completes it as the CPU would:
  RIP past the ``0xCC``, #BP injected (a trap: the pushed RIP is the next instruction).
  ``Vm.complete_int3`` does that (for every guest; ``machine.Machine`` counts it); any other
  failed instruction ends the run with its bytes, RIP and (with a System.map) its symbol.

Nobody waits here for a full boot (hours at this speed); on a host with hardware virtualization
the same code runs the kernel at full speed.
"""

from __future__ import annotations

import bisect
import bz2
import lzma
import struct
import zlib
from typing import Any

from virtwire.kvm import abi
from virtwire.kvm.vm import KvmError, Vm, flat_segments

__all__ = ["LinuxBoot", "unpack_bzimage", "pvh_entry", "elf_segments", "EXTRA_ARGS",
           "CLEARED_CPUID"]

HVM_START_MAGIC = 0x336EC578
XEN_ELFNOTE_PHYS32_ENTRY = 18
START_INFO = 0x6000
MEMMAP = 0x6100
CMDLINE = 0x7000
GDT = 0x500
TSS = 0x600
E820_RAM, E820_RESERVED = 1, 2
EXTRA_ARGS = "nosmp noapic nolapic acpi=off pci=off mitigations=off"
# (leaf, register, bit, name): features this host's CPL0 emulator cannot execute
CLEARED_CPUID = (
    (1, "ecx", 23, "popcnt"), (1, "ecx", 13, "cx16"), (1, "ecx", 26, "xsave"),
    (1, "ecx", 27, "osxsave"), (1, "ecx", 28, "avx"), (1, "ecx", 19, "sse4_1"),
    (1, "ecx", 20, "sse4_2"), (1, "ecx", 9, "ssse3"), (1, "ecx", 30, "rdrand"),
    (1, "ecx", 29, "f16c"), (1, "ecx", 12, "fma"), (1, "ecx", 25, "aes"),
    (1, "ecx", 1, "pclmulqdq"), (1, "ecx", 21, "x2apic"), (1, "ecx", 24, "tsc_deadline_timer"),
    (7, "ebx", 5, "avx2"), (7, "ebx", 3, "bmi1"), (7, "ebx", 8, "bmi2"),
    (7, "ebx", 0, "fsgsbase"), (7, "ebx", 10, "invpcid"), (7, "ebx", 18, "rdseed"),
    (7, "ebx", 19, "adx"), (7, "ebx", 20, "smap"), (7, "ebx", 7, "smep"),
    (7, "ebx", 16, "avx512f"), (7, "ecx", 2, "umip"), (7, "ebx", 29, "sha_ni"),
    (0x80000001, "ecx", 5, "abm"),
)


def _decompress(data: bytes) -> bytes:
    """One compressed stream; what follows it (the kernel build appends the uncompressed size)
    is ignored."""
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if data[:2] == b"\x1f\x8b":
        return zlib.decompressobj(wbits=31).decompress(data)
    if data[:3] == b"BZh":
        return bz2.BZ2Decompressor().decompress(data)
    if data[:3] == b"\x5d\x00\x00":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
    raise KvmError(f"bzImage payload compressed with an unsupported method (magic "
                   f"{data[:4].hex()}); give the uncompressed ELF vmlinux instead")


def unpack_bzimage(data: bytes) -> bytes:
    """The ELF vmlinux inside a bzImage (KvmError when it is not one we can unpack)."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise KvmError("not a bzImage (no HdrS header)")
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < 0x208:
        raise KvmError(f"boot protocol {version >> 8}.{version & 0xff}: payload fields need 2.08")
    setup = (data[0x1F1] or 4) + 1
    off, length = struct.unpack_from("<II", data, 0x248)
    start = setup * 512 + off
    if start + length > len(data):
        raise KvmError("bzImage payload runs past the end of the file")
    try:
        return _decompress(data[start:start + length])
    except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError) as e:
        raise KvmError(f"cannot unpack the bzImage payload: {e}") from None


def elf_segments(elf: bytes) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int]]]:
    """(PT_LOAD (paddr, offset, filesz, memsz) list, PT_NOTE (offset, size) list)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise KvmError("not a 64-bit little-endian ELF kernel")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    loads, notes = [], []
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + 56 > len(elf):
            raise KvmError("ELF program headers run past the end of the file")
        p_type, _flags, off, _vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", elf, at)
        if off + filesz > len(elf):
            raise KvmError(f"ELF segment {i} runs past the end of the file")
        if p_type == 1:
            loads.append((paddr, off, filesz, memsz))
        elif p_type == 4:
            notes.append((off, filesz))
    return loads, notes


def pvh_entry(elf: bytes, notes: list[tuple[int, int]]) -> int | None:
    for off, size in notes:
        at, end = off, off + size
        while at + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, at)
            name = elf[at + 12:at + 12 + namesz].rstrip(b"\0")
            desc = at + 12 + ((namesz + 3) & ~3)
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and descsz >= 4:
                return int.from_bytes(elf[desc:desc + min(descsz, 8)], "little")
            at = desc + ((descsz + 3) & ~3)
    return None


class LinuxBoot:
    """Load a kernel (+ initrd, command line) into ``vm`` and set the vCPU up for PVH entry."""

    def __init__(self, vm: Vm, kernel: str, initrd: str | None, append: str,
                 system_map: str | None = None) -> None:
        self.vm = vm
        self.symbols: list[tuple[int, str]] = []
        try:
            data = open(kernel, "rb").read()
        except OSError as e:
            raise KvmError(f"cannot read kernel {kernel}: {e.strerror}") from None
        elf = data if data[:4] == b"\x7fELF" else unpack_bzimage(data)
        loads, notes = elf_segments(elf)
        entry = pvh_entry(elf, notes)
        if entry is None:
            raise KvmError(f"{kernel}: no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); this "
                           "kernel was built without CONFIG_PVH")
        for paddr, off, filesz, memsz in loads:
            if not vm.mem.contains(paddr, max(memsz, 1)):
                raise KvmError(f"kernel segment at {paddr:#x}+{memsz:#x} does not fit in "
                               f"{vm.ram_size >> 20} MiB of guest RAM (--memory)")
            vm.mem.write(paddr, elf[off:off + filesz])
            vm.mem.fill(paddr + filesz, memsz - filesz)
        self.kernel_end = max(p + m for p, _o, _f, m in loads)
        self.cmdline = (append + " " + self.extra_args()).strip()
        self._start_info(initrd)
        self._cpuid()
        self._registers(entry)
        if system_map:
            self._load_map(system_map)

    @staticmethod
    def extra_args() -> str:
        return EXTRA_ARGS + " clearcpuid=" + ",".join(n for *_x, n in CLEARED_CPUID)

    def _start_info(self, initrd: str | None) -> None:
        vm = self.vm
        cmd = self.cmdline.encode() + b"\0"
        if len(cmd) > 4096:
            raise KvmError("kernel command line longer than 4095 bytes")
        vm.load(CMDLINE, cmd)
        mods, nmods = 0, 0
        if initrd:
            try:
                rd = open(initrd, "rb").read()
            except OSError as e:
                raise KvmError(f"cannot read initrd {initrd}: {e.strerror}") from None
            at = (vm.ram_size - len(rd) - 0x100000) & ~0xFFF
            if at < self.kernel_end:
                raise KvmError("the initrd does not fit above the kernel (--memory)")
            vm.load(at, rd)
            mods, nmods = START_INFO + 0x80, 1
            vm.load(mods, struct.pack("<QQQQ", at, len(rd), 0, 0))
        memmap = [(0, 0x9FC00, E820_RAM), (0x9FC00, 0x60400, E820_RESERVED),
                  (0x100000, vm.ram_size - 0x100000, E820_RAM)]
        vm.load(MEMMAP, b"".join(struct.pack("<QQII", a, s, t, 0) for a, s, t in memmap))
        vm.load(START_INFO, struct.pack("<IIIIQQQQII", HVM_START_MAGIC, 1, 0, nmods, mods,
                                        CMDLINE, 0, MEMMAP, len(memmap), 0))
        self.memmap = memmap

    def _cpuid(self) -> None:
        entries = self.vm.supported_cpuid()
        for e in entries:
            for leaf, reg, bit, _name in CLEARED_CPUID:
                if e.function == leaf and (leaf != 7 or e.index == 0):
                    setattr(e, reg, getattr(e, reg) & ~(1 << bit))
            if e.function == 0xD:  # no XSAVE state components
                e.eax = e.ebx = e.ecx = e.edx = 0
        self.vm.set_cpuid(entries)

    def _registers(self, entry: int) -> None:
        vm = self.vm
        # GDT: null, null, code 0x10, data 0x18, TSS 0x20 (32-bit available TSS at TSS)
        tss_desc = (0x67 | (TSS & 0xFFFFFF) << 16 | 0x89 << 40 | (TSS >> 24) << 56)
        vm.load(GDT, struct.pack("<QQQQQ", 0, 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF,
                                 tss_desc))
        s = vm.get_sregs()
        flat_segments(s, code=0x10, data=0x18)
        s.tr.base, s.tr.limit, s.tr.selector, s.tr.type = TSS, 0x67, 0x20, 11
        s.tr.present, s.tr.s, s.tr.db, s.tr.g = 1, 0, 0, 0
        s.gdt.base, s.gdt.limit = GDT, 39
        s.cr0 = abi.CR0_PE | abi.CR0_ET
        s.cr4 = 0
        s.efer = 0
        vm.set_sregs(s)
        regs = abi.KvmRegs()
        regs.rip, regs.rflags, regs.rbx = entry, 2, START_INFO
        vm.set_regs(regs)

    def _load_map(self, path: str) -> None:
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[1] in "tTwW":
                        self.symbols.append((int(parts[0], 16), parts[2]))
        except (OSError, ValueError) as e:
            raise KvmError(f"cannot read System.map {path}: {e}") from None
        self.symbols.sort()

    def symbol(self, rip: int) -> str:
        if not self.symbols:
            return ""
        i = bisect.bisect_right(self.symbols, (rip, "\uffff")) - 1
        if i < 0:
            return ""
        addr, name = self.symbols[i]
        return f" ({name}+{rip - addr:#x})"

    def describe(self) -> dict[str, Any]:
        return {"cmdline": self.cmdline, "memmap": [
            {"addr": a, "size": s, "type": "ram" if t == E820_RAM else "reserved"}
            for a, s, t in self.memmap]}

