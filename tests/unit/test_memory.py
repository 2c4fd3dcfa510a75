"""GuestMemory: bounds checks, zero-copy views, typed single-store access."""

import os

import pytest

from virtwire.memory import BytearrayGuestMemory, GuestMemoryError, MmapGuestMemory


def test_bounds_are_checked_at_every_edge():
    mem = BytearrayGuestMemory(regions=[(0x1000, 0x1000), (0x4000, 0x100)])
    mem.write(0x1FFF, b"x")
    assert mem.read(0x1FFF, 1) == b"x"
    for gpa, n in [(0x1FFF, 2), (0x0, 1), (0x2000, 1), (0x40FF, 2), (-1, 1), (0x1000, -1)]:
        with pytest.raises(GuestMemoryError):
            mem.read(gpa, n)
        assert not mem.contains(gpa, n)
    with pytest.raises(GuestMemoryError):
        mem.write_u64(0x40FC, 1)


def test_views_are_zero_copy_and_ints_little_endian():
    mem = BytearrayGuestMemory(0x100)
    v = mem.view(0x10, 4)
    v[:] = b"\x01\x02\x03\x04"
    assert mem.read_u32(0x10) == 0x04030201
    assert mem.read_u16(0x11) == 0x0302  # unaligned path
    mem.write_u64(0x21, 0x1122334455667788)
    assert mem.read(0x21, 8) == bytes.fromhex("8877665544332211")
    mem.write_u16(0x40, 0x1FFFF)  # truncated to 16 bits
    assert mem.read_u16(0x40) == 0xFFFF


def test_overlapping_regions_refused():
    with pytest.raises(GuestMemoryError):
        BytearrayGuestMemory(regions=[(0, 0x1000), (0x800, 0x1000)])


def test_mmap_memory_shares_a_memfd_and_translates_user_addresses():
    fd = os.memfd_create("virtwire-test")
    try:
        os.ftruncate(fd, 0x3000)
        mem = MmapGuestMemory()
        mem.map_fd(fd, gpa=0x10000, size=0x2000, mmap_offset=0x1000, userspace_addr=0x7F0000000000)
        mem.write_u32(0x10000, 0xDEADBEEF)
        assert os.pread(fd, 4, 0x1000) == (0xDEADBEEF).to_bytes(4, "little")
        assert mem.uva_to_gpa(0x7F0000000010, 8) == 0x10010
        with pytest.raises(GuestMemoryError):
            mem.uva_to_gpa(0x7F0000001FFC, 8)
        with pytest.raises(GuestMemoryError):
            mem.map_fd(fd, gpa=0x20000, size=0x3000, mmap_offset=0x1000)  # past end of file
        mem.close()
        assert mem.regions == ()
    finally:
        os.close(fd)


def test_derived_objects_live_until_the_region_set_changes():
    """The native path's host-address table is kept per region set; unmapping drops it first,
    so its exports never keep a region's buffer (or mapping) from being released."""
    from virtwire.net.native import guest_view

    mem = MmapGuestMemory()
    fd = os.memfd_create("vw-derived")
    try:
        os.ftruncate(fd, 1 << 16)
        mem.map_fd(fd, 0, 1 << 16)
        gv, own = guest_view(mem)
        assert not own and guest_view(mem)[0] is gv
        host = gv.host(0x100, 16)
        assert host == gv.table[0].host + 0x100
        mem.map_fd(fd, 1 << 20, 1 << 16)  # a second region: a new table with both
        gv2, _ = guest_view(mem)
        assert gv2 is not gv and gv2.n == 2 and gv._keep == []
        mem.close()  # unmap with a table made: its exports are released first, no BufferError
        assert mem.regions == () and gv2._keep == []
    finally:
        os.close(fd)
    # A memory that keeps no derived objects gets a view for the call, to release.
    class Plain:
        regions = ()

    v, own = guest_view(Plain())
    assert own and v.n == 0
