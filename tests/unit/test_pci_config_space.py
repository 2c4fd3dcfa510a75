"""PCI configuration space: header fields, BAR sizing, capability list, access checks."""

import pytest

from virtwire.pci.config_space import (
    PCI_CAP_ID_VNDR,
    BarKind,
    PciConfigError,
    PciConfigSpace,
)


def make() -> PciConfigSpace:
    cs = PciConfigSpace(vendor_id=0x1AF4, device_id=0x1041, class_code=0x020000, revision_id=1,
                        subsystem_vendor_id=0x1AF4, subsystem_id=1)
    cs.add_bar(0, 0x40, BarKind.IO)
    cs.add_bar(4, 0x4000, BarKind.MEM32)
    return cs


def test_header_identifies_the_function():
    cs = make()
    assert cs.read(0x00, 2) == 0x1AF4
    assert cs.read(0x02, 2) == 0x1041
    assert cs.read(0x00, 4) == 0x10411AF4
    assert cs.read(0x08, 1) == 1  # revision
    assert cs.read(0x08, 4) >> 8 == 0x020000  # class code: network, ethernet
    assert cs.read(0x0A, 2) == 0x0200
    assert cs.read(0x0E, 1) == 0  # type-0 header, single function
    assert cs.read(0x2C, 2) == 0x1AF4 and cs.read(0x2E, 2) == 1
    assert cs.read(0x3D, 1) == 1  # INTA#


def test_read_only_fields_ignore_writes():
    cs = make()
    for off in (0x00, 0x02, 0x08, 0x0A, 0x2C, 0x3D):
        before = cs.read(off, 2)
        cs.write(off, 2, 0xBEEF)
        assert cs.read(off, 2) == before


def test_command_register_keeps_only_defined_bits_and_interrupt_line_is_writable():
    cs = make()
    cs.write(0x04, 2, 0xFFFF)
    assert cs.read(0x04, 2) == 0x1 | 0x2 | 0x4 | 0x40 | 0x100 | 0x400
    cs.write(0x3C, 1, 11)
    assert cs.interrupt_line == 11 and cs.read(0x3C, 1) == 11


@pytest.mark.parametrize("index,size,kind,flags", [(0, 0x40, BarKind.IO, 1),
                                                   (4, 0x4000, BarKind.MEM32, 0)])
def test_bar_sizing_reads_back_the_size_mask(index, size, kind, flags):
    cs = make()
    reg = 0x10 + 4 * index
    assert cs.read(reg, 4) == flags
    cs.write(reg, 4, 0xFFFFFFFF)
    probe = cs.read(reg, 4)
    assert probe == (~(size - 1) & 0xFFFFFFFF) | flags
    # The proxy's own computation (hw/remote/proxy.c probe_pci_info) recovers the size.
    assert ((~(probe & 0xFFFFFFF0)) + 1) & 0xFFFFFFFF == size
    assert cs.bars[index].base == 0  # a sizing probe is not a programmed base
    base = 0xC000 if kind is BarKind.IO else 0xFEB00000
    cs.write(reg, 4, base | 0xF)  # low bits are flags, not writable
    assert cs.read(reg, 4) == base | flags
    assert cs.bars[index].base == base


def test_unaligned_bar_base_is_truncated_to_the_bar_size():
    cs = make()
    cs.write(0x20, 4, 0xFEB01234)
    assert cs.bars[4].base == 0xFEB00000


def test_partial_bar_writes_merge_into_the_dword():
    cs = make()
    cs.write(0x20, 4, 0xFEB00000)
    cs.write(0x23, 1, 0xFD)
    assert cs.bars[4].base == 0xFDB00000
    cs.write(0x22, 2, 0xFFFF)
    assert cs.read(0x20, 4) == 0xFFFF0000
    cs.write(0x20, 2, 0xFFFF)
    assert cs.read(0x20, 4) == 0xFFFFC000


def test_unimplemented_bars_and_rom_read_zero():
    cs = make()
    for reg in (0x14, 0x18, 0x1C, 0x24, 0x28, 0x30):
        cs.write(reg, 4, 0xFFFFFFFF)
        assert cs.read(reg, 4) == 0, hex(reg)


def test_bar_decode_of_absolute_addresses():
    cs = make()
    cs.write(0x10, 4, 0xC000)
    cs.write(0x20, 4, 0xFEB00000)
    assert cs.bar_at(0xFEB00010, 4, memory=True) == (cs.bars[4], 0x10)
    assert cs.bar_at(0xFEB03FFC, 4, memory=True) == (cs.bars[4], 0x3FFC)
    assert cs.bar_at(0xFEB03FFE, 4, memory=True) is None  # runs past the end
    assert cs.bar_at(0xFEB00010, 4, memory=False) is None  # wrong space
    assert cs.bar_at(0xC013, 1, memory=False) == (cs.bars[0], 0x13)
    assert cs.bar_at(0xC040, 1, memory=False) is None


def test_capability_list_is_a_terminated_chain():
    cs = make()
    offs = [cs.add_capability(PCI_CAP_ID_VNDR, bytes([16, n]) + bytes(12)) for n in range(3)]
    assert cs.read(0x06, 2) & 0x10  # Capabilities List bit
    ptr = cs.read(0x34, 1)
    seen = []
    while ptr:
        assert ptr >= 0x40 and ptr % 4 == 0
        assert cs.read(ptr, 1) == PCI_CAP_ID_VNDR
        seen.append(ptr)
        ptr = cs.read(ptr + 1, 1)
    assert seen == offs
    assert cs.read(offs[1] + 3, 1) == 1  # body bytes in place


def test_capability_write_mask_and_overflow():
    cs = make()
    off = cs.add_capability(PCI_CAP_ID_VNDR, bytes(6), writable=bytes([0, 0, 0xFF, 0xFF, 0, 0]))
    cs.write(off + 2, 4, 0xFFFFFFFF)
    assert cs.read(off + 2, 4) == 0xFFFF0000
    with pytest.raises(PciConfigError):
        for _ in range(64):
            cs.add_capability(PCI_CAP_ID_VNDR, bytes(14))


def test_bad_accesses_read_zero_and_are_counted(caplog):
    cs = make()
    assert cs.read(0xFE, 4) == 0
    assert cs.read(0x00, 3) == 0
    cs.write(0x100, 1, 1)
    cs.write(0x04, 8, 0xFFFF)
    assert cs.read(0x04, 2) == 0
    assert cs.refused == 4
    assert "refused" in caplog.text


def test_hooks_take_over_their_range_and_listeners_see_writes():
    cs = make()
    seen = []
    cs.add_read_hook(0x50, 0x54, lambda off, w: 0x11223344 >> (8 * (off - 0x50)))
    cs.add_write_hook(0x50, 0x54, lambda off, w, v: seen.append(("hook", off, w, v)))
    cs.on_write.append(lambda off, w, v: seen.append(("listener", off, w, v)))
    assert cs.read(0x50, 4) == 0x11223344
    assert cs.read(0x52, 2) == 0x1122
    cs.write(0x51, 1, 7)
    cs.write(0x3C, 1, 5)
    assert seen == [("hook", 0x51, 1, 7), ("listener", 0x3C, 1, 5)]


def test_bar_setup_errors_are_ours():
    cs = make()
    with pytest.raises(PciConfigError):
        cs.add_bar(4, 0x1000, BarKind.MEM32)  # taken
    with pytest.raises(PciConfigError):
        cs.add_bar(1, 0x3000, BarKind.MEM32)  # not a power of two
    with pytest.raises(PciConfigError):
        cs.add_bar(6, 0x1000, BarKind.MEM32)
