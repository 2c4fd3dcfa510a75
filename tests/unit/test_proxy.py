"""The PCI proxy remote over a socketpair: codec, dispatch, guest RAM sync, hostile messages."""

from __future__ import annotations

import array
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtwire.hosts import pci_proxy as pp
from virtwire.pci.config_space import BarKind, PciConfigSpace


class FakeTarget:
    """A PCI function with one 16-byte memory BAR of plain registers."""

    def __init__(self) -> None:
        self.cfg = PciConfigSpace(vendor_id=0x1AF4, device_id=0x1041, class_code=0x020000)
        self.bar = self.cfg.add_bar(0, 0x1000, BarKind.MEM32)
        self.cfg.write(0x10, 4, 0xFEB00000)
        self.regs = bytearray(0x1000)
        self.resets = 0
        self.mem = None

    def config_read(self, offset, width):
        return self.cfg.read(offset, width)

    def config_write(self, offset, width, value):
        self.cfg.write(offset, width, value)

    def bar_read(self, addr, width, memory):
        hit = self.cfg.bar_at(addr, width, memory)
        if hit is None:
            return None
        _, off = hit
        return int.from_bytes(self.regs[off : off + width], "little")

    def bar_write(self, addr, width, value, memory):
        hit = self.cfg.bar_at(addr, width, memory)
        if hit is None:
            return False
        _, off = hit
        self.regs[off : off + width] = value.to_bytes(width, "little")
        return True

    def reset(self):
        self.resets += 1

    def set_memory(self, mem):
        self.mem = mem
        self.memory_sets = getattr(self, "memory_sets", 0) + 1


@pytest.fixture
def link():
    qemu, remote_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu.settimeout(2)
    target = FakeTarget()
    remote = pp.PciProxyRemote(remote_sock, target)
    yield qemu, remote, target
    remote.close()
    qemu.close()


def send(qemu: socket.socket, cmd: int, payload: bytes = b"", fds=(), size: int | None = None):
    hdr = pp.HEADER.pack(cmd, len(payload) if size is None else size)
    if fds:
        qemu.sendmsg([hdr + payload],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        qemu.sendall(hdr + payload)


def ret(qemu: socket.socket) -> int:
    data = b""
    while len(data) < 24:
        chunk = qemu.recv(24 - len(data))
        assert chunk, "remote closed"
        data += chunk
    cmd, size = pp.HEADER.unpack(data[:16])
    assert (cmd, size) == (pp.MPQEMU_CMD_RET, 8)
    return struct.unpack("<Q", data[16:])[0]


def no_reply(qemu: socket.socket) -> bool:
    qemu.setblocking(False)
    try:
        qemu.recv(1)
    except BlockingIOError:
        return True
    finally:
        qemu.settimeout(2)
    return False


def cfg(cmd, addr, val=0, length=4):
    return cmd, pp.PCI_CONF_DATA.pack(addr, val, length)


def bar(cmd, addr, val=0, size=4, memory=True):
    return cmd, pp.BAR_ACCESS.pack(addr, val, size, memory)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_message_table_matches_qemu_sizes():
    assert pp.HEADER.size == 16
    assert pp.PCI_CONF_DATA.size == 12
    assert pp.BAR_ACCESS.size == 24
    assert pp.SYNC_SYSMEM.size == 192
    assert [pp.MESSAGES[c].name for c in range(8)] == [
        "SYNC_SYSMEM", "RET", "PCI_CFGWRITE", "PCI_CFGREAD", "BAR_WRITE", "BAR_READ",
        "SET_IRQFD", "DEVICE_RESET"]
    assert pp.encode_ret(5) == struct.pack("<i4xQQ", 1, 8, 5)


def test_config_and_bar_round_trips(link):
    qemu, remote, target = link
    send(qemu, *cfg(pp.MPQEMU_CMD_PCI_CFGREAD, 0, length=4))
    assert remote.handle_one()
    assert ret(qemu) == 0x10411AF4
    send(qemu, *cfg(pp.MPQEMU_CMD_PCI_CFGWRITE, 0x3C, 10, 1))
    remote.handle_one()
    assert ret(qemu) == 0
    assert target.cfg.interrupt_line == 10
    send(qemu, *bar(pp.MPQEMU_CMD_BAR_WRITE, 0xFEB00008, 0xDEADBEEF, 4))
    remote.handle_one()
    assert ret(qemu) == 0
    send(qemu, *bar(pp.MPQEMU_CMD_BAR_READ, 0xFEB0000A, size=2))
    remote.handle_one()
    assert ret(qemu) == 0xDEAD
    send(qemu, pp.MPQEMU_CMD_DEVICE_RESET)
    remote.handle_one()
    assert ret(qemu) == 0 and target.resets == 1
    assert remote.refused == 0


def test_after_reply_runs_after_the_ret_is_sent(link):
    qemu, remote, _ = link
    order = []
    remote.after_reply.append(lambda: order.append(no_reply(qemu)))
    send(qemu, *cfg(pp.MPQEMU_CMD_PCI_CFGREAD, 0))
    remote.handle_one()
    assert order == [False]  # the RET was already in QEMU's socket


def test_peer_closing_ends_serving(link):
    qemu, remote, _ = link
    qemu.shutdown(socket.SHUT_WR)
    assert remote.handle_one() is False
    assert remote.closed


# -- hostile messages ----------------------------------------------------------------------
def assert_refused_then_in_step(qemu, remote, caplog, expect_ret: bool, words: str):
    before = remote.refused
    assert remote.handle_one()
    assert remote.refused == before + 1
    assert words in caplog.text
    if expect_ret:
        assert ret(qemu) == 0
    else:
        assert no_reply(qemu)
    # The stream is still in step: a normal request is answered correctly.
    send(qemu, *cfg(pp.MPQEMU_CMD_PCI_CFGREAD, 2, length=2))
    assert remote.handle_one()
    assert ret(qemu) == 0x1041


def test_bad_payload_size_is_refused_with_a_ret(link, caplog):
    qemu, remote, _ = link
    send(qemu, pp.MPQEMU_CMD_PCI_CFGREAD, b"\x00" * 11)
    assert_refused_then_in_step(qemu, remote, caplog, True, "payload of 11 bytes, expected 12")


def test_oversized_payload_is_drained(link, caplog):
    qemu, remote, _ = link
    send(qemu, pp.MPQEMU_CMD_BAR_READ, b"\xAA" * 4096)
    assert_refused_then_in_step(qemu, remote, caplog, True, "exceeds 192")


def test_unknown_commands_get_a_neutral_ret(link, caplog):
    qemu, remote, _ = link
    for cmd in (8, 99, -1, 0x7FFFFFFF):
        send(qemu, cmd, b"\x01\x02")
        assert_refused_then_in_step(qemu, remote, caplog, True, f"unknown command {cmd}")


def test_stray_ret_is_refused_without_a_reply(link, caplog):
    qemu, remote, _ = link
    send(qemu, pp.MPQEMU_CMD_RET, struct.pack("<Q", 1))
    assert_refused_then_in_step(qemu, remote, caplog, False, "RET nobody asked for")


def test_wrong_fd_counts_are_refused_and_fds_closed(link, caplog):
    qemu, remote, _ = link
    r, w = os.pipe()
    base = open_fds()
    send(qemu, *cfg(pp.MPQEMU_CMD_PCI_CFGREAD, 0), fds=[r])
    assert_refused_then_in_step(qemu, remote, caplog, True, "PCI_CFGREAD: 1 fds, expected 0")
    send(qemu, pp.MPQEMU_CMD_SET_IRQFD, fds=[r])
    assert_refused_then_in_step(qemu, remote, caplog, False, "SET_IRQFD: 1 fds, expected 2")
    send(qemu, pp.MPQEMU_CMD_SYNC_SYSMEM, bytes(192))
    assert_refused_then_in_step(qemu, remote, caplog, False, "SYNC_SYSMEM: 0 fds, expected 1-8")
    send(qemu, pp.MPQEMU_CMD_SYNC_SYSMEM, bytes(192), fds=[r] * 9)
    assert_refused_then_in_step(qemu, remote, caplog, False, "9 fds, expected 1-8")
    send(qemu, pp.MPQEMU_CMD_DEVICE_RESET, fds=[r] * 40)  # beyond the ancillary buffer
    assert_refused_then_in_step(qemu, remote, caplog, True, "DEVICE_RESET")
    assert open_fds() == base  # every fd that arrived was closed
    os.close(r)
    os.close(w)


def test_out_of_range_bar_addresses_and_widths_are_refused(link, caplog):
    qemu, remote, _ = link
    cases = [
        (bar(pp.MPQEMU_CMD_BAR_READ, 0xFEB01000), "0xfeb01000+4 is in no BAR"),
        (bar(pp.MPQEMU_CMD_BAR_READ, 0xFEB00FFE, size=4), "is in no BAR"),
        (bar(pp.MPQEMU_CMD_BAR_WRITE, 0xFEB00000, memory=False), "I/O address"),
        (bar(pp.MPQEMU_CMD_BAR_READ, 0xFEB00000, size=3), "BAR access width 3"),
        (bar(pp.MPQEMU_CMD_BAR_WRITE, 0xFFFFFFFFFFFFFFFC, size=8), "wraps"),
        (bar(pp.MPQEMU_CMD_BAR_READ, 0, size=0), "width 0"),
        (cfg(pp.MPQEMU_CMD_PCI_CFGREAD, 0xFE, length=4), "beyond 256 bytes"),
        (cfg(pp.MPQEMU_CMD_PCI_CFGWRITE, 0xFFFFFFFF, length=1), "beyond 256 bytes"),
        (cfg(pp.MPQEMU_CMD_PCI_CFGREAD, 0, length=-4), "width -4"),
    ]
    for (cmd, payload), words in cases:
        send(qemu, cmd, payload)
        assert_refused_then_in_step(qemu, remote, caplog, True, words)


def test_truncated_payload_at_eof_does_not_crash(link, caplog):
    qemu, remote, _ = link
    qemu.sendall(pp.HEADER.pack(pp.MPQEMU_CMD_PCI_CFGREAD, 12) + b"\x00" * 5)
    qemu.shutdown(socket.SHUT_WR)
    assert remote.handle_one()  # refused (payload never completed)
    assert "not received" in caplog.text
    assert remote.handle_one() is False  # then EOF


# -- guest RAM -----------------------------------------------------------------------------
def memfd(size: int) -> int:
    fd = os.memfd_create("vwx-test")
    os.ftruncate(fd, size)
    return fd


def sysmem(regions):
    gpas = [r[0] for r in regions] + [0] * (8 - len(regions))
    sizes = [r[1] for r in regions] + [0] * (8 - len(regions))
    offs = [r[2] for r in regions] + [0] * (8 - len(regions))
    return pp.SYNC_SYSMEM.pack(*gpas, *sizes, *offs)


def test_sync_sysmem_maps_keeps_and_replaces_regions(link):
    qemu, remote, target = link
    fd = memfd(0x200000)
    os.pwrite(fd, b"hello", 0x100000 + 0x10)
    base = open_fds()
    layout = [(0, 0xA0000, 0), (0x100000, 0x100000, 0x100000)]
    send(qemu, pp.MPQEMU_CMD_SYNC_SYSMEM, sysmem(layout), fds=[fd, fd])
    remote.handle_one()
    assert no_reply(qemu)
    assert target.mem is remote.mem
    assert target.mem.read(0x100010, 5) == b"hello"
    held = open_fds()
    assert held > base  # the region fds (and mmap's own dups) are held
    region = target.mem.regions[1]
    # Same layout again, new fds: mapping kept, new fds closed.
    send(qemu, pp.MPQEMU_CMD_SYNC_SYSMEM, sysmem(layout), fds=[fd, fd])
    remote.handle_one()
    assert target.mem.regions[1] is region
    assert target.memory_sets == 1  # nothing changed: the device is not told again
    assert open_fds() == held
    # A changed layout: the high region moves; old one unmapped, its fd closed.
    send(qemu, pp.MPQEMU_CMD_SYNC_SYSMEM,
         sysmem([(0, 0xA0000, 0), (0x200000, 0x100000, 0x100000)]), fds=[fd, fd])
    remote.handle_one()
    assert [r.gpa for r in target.mem.regions] == [0, 0x200000]
    assert target.memory_sets == 2
    assert target.mem.read(0x200010, 5) == b"hello"
    assert not target.mem.contains(0x100010, 1)
    assert open_fds() == held
    remote.close()
    assert open_fds() == base - 1  # the remote's socket is gone too
    os.close(fd)


def test_sync_sysmem_bad_tables_are_refused_whole(link, caplog):
    qemu, remote, target = link
    fd = memfd(0x10000)
    base = open_fds()
    bad = [
        ([(0, 0x8000, 0), (0x4000, 0x8000, 0)], "overlap"),
        ([(0, 0, 0)], "size 0x0"),
        ([(0, 0x10000, -4096)], "offset"),
        ([(0, 0x20000, 0)], "beyond its file"),
        ([(0xFFFFFFFFFFFFF000, 0x2000, 0)], "region 0"),
    ]
    for layout, words in bad:
        send(qemu, pp.MPQEMU_CMD_SYNC_SYSMEM, sysmem(layout), fds=[fd] * len(layout))
        assert_refused_then_in_step(qemu, remote, caplog, False, words)
    assert target.mem is None
    assert open_fds() == base
    os.close(fd)


def test_set_irqfd_hands_over_an_irqfd(link):
    qemu, remote, _ = link
    a, b = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    got = []
    remote.on_irqfd = got.append
    send(qemu, pp.MPQEMU_CMD_SET_IRQFD, fds=[a, b])
    remote.handle_one()
    assert no_reply(qemu)
    (irq,) = got
    irq.set_level(True)
    assert os.eventfd_read(a) == 1
    os.eventfd_write(b, 1)
    irq.on_resample()  # still asserted: re-raised
    assert os.eventfd_read(a) == 1
    os.close(a)
    os.close(b)


# -- random streams ------------------------------------------------------------------------
SIZES = [0, 1, 8, 11, 12, 13, 23, 24, 25, 191, 192, 193, 300]

message = st.tuples(
    st.one_of(st.integers(0, 9), st.integers(-(2**31), 2**31 - 1)),
    st.one_of(st.sampled_from(SIZES).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
              st.binary(max_size=64)),
    st.integers(0, 3),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(message, max_size=12))
def test_random_messages_never_crash_the_remote(msgs):
    qemu, remote_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu.settimeout(2)
    remote = pp.PciProxyRemote(remote_sock, FakeTarget())
    base = len(os.listdir("/proc/self/fd"))
    r, w = os.pipe()
    try:
        for cmd, payload, nfds in msgs:
            send(qemu, cmd, payload, fds=[r] * nfds)
            assert remote.handle_one()
            spec = pp.MESSAGES.get(cmd)
            if spec is None or spec.reply:
                ret(qemu)  # exactly one RET, whatever its value
            assert no_reply(qemu)
        send(qemu, *cfg(pp.MPQEMU_CMD_PCI_CFGREAD, 0, length=2))
        assert remote.handle_one()
        assert ret(qemu) == 0x1AF4
    finally:
        os.close(r)
        os.close(w)
        remote.close()
        qemu.close()
    assert len(os.listdir("/proc/self/fd")) <= base - 1  # nothing leaked


def test_a_flood_of_bad_messages_is_answered_but_logged_sparingly(link, caplog):
    qemu, remote, _ = link
    for _ in range(100):
        send(qemu, *bar(pp.MPQEMU_CMD_BAR_READ, 0xDEAD0000))
        assert remote.handle_one()
        assert ret(qemu) == 0  # every blocked vCPU is released
    assert remote.refused == 100
    lines = [r for r in caplog.records if "refused message" in r.getMessage()]
    assert len(lines) == 7  # 1, 2, 4, 8, 16, 32, 64
