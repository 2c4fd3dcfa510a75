"""virtwire kvm, the pure parts: ioctl numbers, PCI config mechanism #1, UART, exit port,
register names, the guest's parameter block and report, CLI value checks."""

from __future__ import annotations

import ctypes

import pytest

from virtwire.errors import CliError
from virtwire.kvm import abi, events, program
from virtwire.kvm.devices import ExitPort, PciHost, Uart16550
from virtwire.kvm.machine import parse_report
from virtwire.kvm.vm import KvmError, open_kvm
from virtwire.net.device import VirtioNet
from virtwire.pci.device import VirtioPciDevice


def test_ioctl_numbers_match_linux_uapi() -> None:
    # values from linux/kvm.h as compiled for x86-64
    assert abi.KVM_RUN == 0xAE80
    assert abi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert abi.KVM_GET_SREGS == 0x8138AE83
    assert abi.KVM_SET_REGS == 0x4090AE82
    assert abi.KVM_IRQ_LINE == 0x4008AE61
    assert abi.KVM_CREATE_PIT2 == 0x4040AE77
    assert abi.KVM_SIGNAL_MSI == 0x4020AEA5
    assert ctypes.sizeof(abi.KvmSregs) == 312
    assert ctypes.sizeof(abi.KvmVcpuEvents) == 64
    assert abi.EXIT_NAMES[abi.KVM_EXIT_MMIO] == "MMIO"


def _host_with_device(transitional: bool = False) -> tuple[PciHost, VirtioPciDevice]:
    from virtwire.backends.null import NullBackend

    pci = VirtioPciDevice(VirtioNet([NullBackend()]), transitional=transitional)
    host = PciHost(32 << 20, lambda p: p == 0x3F8)
    host.add(3, pci)
    return host, pci


def test_config_mechanism_1_all_widths() -> None:
    host, _pci = _host_with_device()
    ports = host.ports()
    ports[0xCF8](0xCF8, 4, 0x80000000 | 3 << 11)
    assert ports[0xCFC](0xCFC, 4, None) == 0x10411AF4
    assert ports[0xCFC](0xCFC, 2, None) == 0x1AF4
    assert ports[0xCFE](0xCFE, 2, None) == 0x1041
    assert ports[0xCFD](0xCFD, 1, None) == 0x1A
    ports[0xCF8](0xCF8, 4, 0x80000000 | 3 << 11 | 0x08)
    assert ports[0xCFC](0xCFC, 4, None) >> 8 == 0x020000
    # an empty slot, the enable bit clear, another bus: all ones
    for addr in (0x80000000 | 5 << 11, 3 << 11, 0x80010000 | 3 << 11):
        ports[0xCF8](0xCF8, 4, addr)
        assert ports[0xCFC](0xCFC, 4, None) == 0xFFFFFFFF
    # the host bridge at 00:00.0
    ports[0xCF8](0xCF8, 4, 0x80000000)
    assert ports[0xCFC](0xCFC, 4, None) & 0xFFFF == 0x8086
    # a byte write to 0xCF8 is not an address write
    ports[0xCF8](0xCF8, 4, 0x80000000 | 3 << 11)
    ports[0xCF8](0xCF8, 1, 0)
    assert host.address == 0x80000000 | 3 << 11


def test_bar_sizing_and_placement_through_cfc() -> None:
    host, pci = _host_with_device()
    ports = host.ports()
    ports[0xCF8](0xCF8, 4, 0x80000000 | 3 << 11 | 0x20)  # BAR4
    ports[0xCFC](0xCFC, 4, 0xFFFFFFFF)
    assert ports[0xCFC](0xCFC, 4, None) == 0xFFFFC000  # 16 KiB memory BAR
    ports[0xCFC](0xCFC, 4, 0xE0000000)
    ports[0xCF8](0xCF8, 4, 0x80000000 | 3 << 11 | 0x04)
    ports[0xCFC](0xCFC, 2, 0x7)
    assert host.warnings == []
    assert host.mmio(0xE0000014, 1, None) == 0  # device_status
    assert host.mmio(0xD0000000, 4, None) is None  # no BAR there
    assert events.register_name("mmio", 0xE0003004, 2, host) == "notify.q1"
    assert events.register_name("mmio", 0xE0000014, 1, host) == "common_cfg.device_status"
    assert events.register_name("mmio", 0xE0001000, 1, host) == "isr"
    assert events.register_name("io", 0x3F8, 1, host) == "uart.thr"
    assert events.register_name("mmio", 0x1234, 4, host) == "-"
    # a hostile placement over RAM is noticed
    ports[0xCF8](0xCF8, 4, 0x80000000 | 3 << 11 | 0x20)
    ports[0xCFC](0xCFC, 4, 0x4000)
    assert any("over guest RAM" in w for w in host.warnings)


def test_legacy_bar_register_names() -> None:
    host, _pci = _host_with_device(transitional=True)
    ports = host.ports()
    ports[0xCF8](0xCF8, 4, 0x80000000 | 3 << 11 | 0x10)
    ports[0xCFC](0xCFC, 4, 0xC000)
    ports[0xCF8](0xCF8, 4, 0x80000000 | 3 << 11 | 0x04)
    ports[0xCFC](0xCFC, 2, 0x1)
    assert events.register_name("io", 0xC012, 1, host) == "legacy.STATUS"
    assert events.register_name("io", 0xC010, 2, host) == "legacy.QUEUE_NOTIFY"
    assert host.io(0xC012, 1, None) == 0


def test_uart_and_exit_port() -> None:
    out: list[bytes] = []
    u = Uart16550(out.append)
    for c in b"hi\n":
        u.access(0x3F8, 1, c)
    assert b"".join(out) == b"hi\n"
    assert u.access(0x3FD, 1, None) & 0x20  # THR empty
    u.access(0x3FF, 1, 0x5A)
    assert u.access(0x3FF, 1, None) == 0x5A
    got: list[int] = []
    e = ExitPort(got.append)
    e.access(0x501, 1, 0xA5)  # garbage: counted, not an exit
    e.access(0x501, 4, 0x12345678)
    assert got == [] and e.garbage == 2
    e.access(0x501, 4, 0x56570021)
    assert got == [0x21]


def test_params_and_report() -> None:
    p = program.Params("burst", "10.1.2.3", 24, burst_count=7, burst_size=100, irq=10)
    raw = p.pack()
    assert raw[:4] == (0x564B5756).to_bytes(4, "little")
    assert raw[8:12] == bytes([10, 1, 2, 3])
    with pytest.raises(KvmError):
        program.Params("nonsense")
    with pytest.raises(KvmError):
        program.Params("ping", "10.1.2").pack()
    rep = parse_report("vwguest: device id=1af4:1041 class=020000\nnoise\n"
                       "vwguest: bar4 mem=0xe0000000 size=0x4000\n"
                       "vwguest: report tx=3 rx=4\n")
    assert rep["device"]["id"] == "1af4:1041"
    assert rep["bar4"]["mem"] == "0xe0000000"
    assert rep["report"] == {"tx": "3", "rx": "4"}


def test_open_kvm_missing_or_refused(tmp_path, monkeypatch) -> None:
    with pytest.raises(KvmError, match="does not exist"):
        open_kvm(str(tmp_path / "nokvm"))

    def refuse(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("os.open", refuse)
    with pytest.raises(KvmError, match="no permission"):
        open_kvm("/dev/kvm")


def test_cli_values_are_checked() -> None:
    from virtwire.commands import kvm as cmd

    assert cmd._parse_ip("10.0.0.2/16") == ("10.0.0.2", 16)
    for bad in ("10.0.0/24", "10.0.0.300/24", "10.0.0.1/33", "x"):
        with pytest.raises(CliError):
            cmd._parse_ip(bad)
    for bad in ("tap", "tap,ifname", "bogus", "null,x=1"):
        with pytest.raises(CliError):
            cmd._backends(bad, None)
