"""The slice of the KVM API (``linux/kvm.h``, x86-64) that ``virtwire kvm`` uses.

Ioctl numbers are computed with the kernel's ``_IOC`` encoding; structures are ctypes mirrors of
the UAPI structs with the same field names, so one grep spans Linux and virtwire. ``kvm_run`` is
not a ctypes structure: the run loop reads its few hot fields at fixed offsets from the mmap
(``RUN_*`` below), which is cheaper per exit than building ctypes objects.

# SAFETY: every structure passed to ``ioctl`` is a ctypes object owned by the caller for the
# duration of the call; the kernel writes at most ``sizeof`` bytes into it.
"""

from __future__ import annotations

import ctypes

__all__ = [
    "KvmRegs", "KvmSregs", "KvmSegment", "KvmDtable", "KvmUserspaceMemoryRegion",
    "KvmPitConfig", "KvmIrqLevel", "KvmCpuidEntry2", "KvmTranslation", "KvmMsi",
    "KvmVcpuEvents", "cpuid2_type", "EXIT_NAMES",
]

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


class KvmRegs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16), ("type", ctypes.c_uint8),
                ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8), ("db", ctypes.c_uint8),
                ("s", ctypes.c_uint8), ("l", ctypes.c_uint8), ("g", ctypes.c_uint8),
                ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
                ("padding", ctypes.c_uint8)]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment),
                ("fs", KvmSegment), ("gs", KvmSegment), ("ss", KvmSegment),
                ("tr", KvmSegment), ("ldt", KvmSegment), ("gdt", KvmDtable),
                ("idt", KvmDtable), ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64),
                ("cr3", ctypes.c_uint64), ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64),
                ("efer", ctypes.c_uint64), ("apic_base", ctypes.c_uint64),
                ("interrupt_bitmap", ctypes.c_uint64 * 4)]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32 * 15)]


class KvmIrqLevel(ctypes.Structure):
    _fields_ = [("irq", ctypes.c_uint32), ("level", ctypes.c_uint32)]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [("function", ctypes.c_uint32), ("index", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("eax", ctypes.c_uint32), ("ebx", ctypes.c_uint32),
                ("ecx", ctypes.c_uint32), ("edx", ctypes.c_uint32),
                ("padding", ctypes.c_uint32 * 3)]


def cpuid2_type(n: int) -> type[ctypes.Structure]:
    """``struct kvm_cpuid2`` with room for ``n`` entries."""

    class KvmCpuid2(ctypes.Structure):
        _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                    ("entries", KvmCpuidEntry2 * n)]

    return KvmCpuid2


class KvmTranslation(ctypes.Structure):
    _fields_ = [("linear_address", ctypes.c_uint64), ("physical_address", ctypes.c_uint64),
                ("valid", ctypes.c_uint8), ("writeable", ctypes.c_uint8),
                ("usermode", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 5)]


class KvmMsi(ctypes.Structure):
    _fields_ = [("address_lo", ctypes.c_uint32), ("address_hi", ctypes.c_uint32),
                ("data", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("devid", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 12)]


class KvmVcpuEvents(ctypes.Structure):
    """``struct kvm_vcpu_events`` (64 bytes); only the exception part is used (#BP injection)."""

    _fields_ = [("exception_injected", ctypes.c_uint8), ("exception_nr", ctypes.c_uint8),
                ("exception_has_error_code", ctypes.c_uint8),
                ("exception_pending", ctypes.c_uint8), ("exception_error_code", ctypes.c_uint32),
                ("interrupt", ctypes.c_uint8 * 4), ("nmi", ctypes.c_uint8 * 4),
                ("sipi_vector", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("smi", ctypes.c_uint8 * 4), ("reserved", ctypes.c_uint8 * 27),
                ("exception_has_payload", ctypes.c_uint8),
                ("exception_payload", ctypes.c_uint64)]


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, ctypes.sizeof(KvmIrqLevel))
KVM_CREATE_PIT2 = _iow(0x77, ctypes.sizeof(KvmPitConfig))
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(KvmSregs))
KVM_TRANSLATE = _iowr(0x85, ctypes.sizeof(KvmTranslation))
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_MP_STATE = _ior(0x98, 4)
KVM_GET_VCPU_EVENTS = _ior(0x9F, ctypes.sizeof(KvmVcpuEvents))
KVM_SET_VCPU_EVENTS = _iow(0xA0, ctypes.sizeof(KvmVcpuEvents))
KVM_SIGNAL_MSI = _iow(0xA5, ctypes.sizeof(KvmMsi))

KVM_API_VERSION = 12
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_PIT2 = 33
KVM_PIT_SPEAKER_DUMMY = 1

# kvm_run: the fields the run loop reads (offsets in the mmap'ed struct).
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_IO = 32          # u8 direction, u8 size, u16 port, u32 count, u64 data_offset
RUN_MMIO = 32        # u64 phys_addr, u8 data[8], u32 len, u8 is_write
RUN_FAIL_ENTRY = 32  # u64 hardware_entry_failure_reason, u32 cpu
RUN_INTERNAL = 32    # u32 suberror, u32 ndata, u64 data[16]
RUN_SYSTEM_EVENT = 32
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

EXIT_NAMES: dict[int, str] = {
    v: k[len("KVM_EXIT_"):] for k, v in dict(globals()).items()
    if k.startswith("KVM_EXIT_") and isinstance(v, int) and not k.startswith("KVM_EXIT_IO_")
}

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
INTERNAL_ERROR_NAMES = {1: "emulation failure", 2: "exception while delivering an exception",
                        3: "cannot deliver an event", 4: "unexpected exit reason"}

KVM_MP_STATE_NAMES = {0: "RUNNABLE", 1: "UNINITIALIZED", 2: "INIT_RECEIVED", 3: "HALTED",
                      4: "SIPI_RECEIVED", 5: "STOPPED", 6: "CHECK_STOP", 7: "OPERATING",
                      8: "LOAD"}

# x86 control bits used to build guest state.
CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
