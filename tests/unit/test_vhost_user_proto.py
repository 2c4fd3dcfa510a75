"""vhost-user codec: table shape, encode/decode round trips, hostile messages, fd passing."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from virtwire.hosts import vhost_user_proto as vp
from virtwire.hosts.vhost_user_proto import (
    REQUESTS,
    ConfigSpace,
    FramingError,
    MemRegion,
    MemTable,
    Message,
    P,
    ProtocolError,
    VringAddr,
    VringFile,
    VringState,
    decode_header,
    decode_reply,
    decode_request,
    encode,
    encode_payload,
    recv_message,
    send_message,
)
from virtwire.hosts.vhost_user_proto import (
    VhostUserRequest as R,
)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _memfds(n: int) -> list[int]:
    return [os.memfd_create(f"vwv-proto-{i}") for i in range(n)]


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def test_every_request_code_is_in_the_table_with_its_name():
    for code in R:
        assert REQUESTS[code].name == code.name
    assert REQUESTS[R.GET_FEATURES].reply is P.U64
    assert REQUESTS[R.GET_VRING_BASE].reply is P.STATE
    assert REQUESTS[R.SET_VRING_NUM].reply is None


def test_header_encoding_matches_the_wire_layout():
    data = encode(R.SET_FEATURES, encode_payload(P.U64, 1 << 32), need_reply=True)
    assert data[:12] == struct.pack("<III", 2, 0x1 | 0x8, 8)
    assert decode_header(data[:12]) == (2, 0x9, 8)
    reply = encode(R.GET_FEATURES, encode_payload(P.U64, 5), reply=True)
    assert struct.unpack_from("<I", reply, 4)[0] == 0x5


@pytest.mark.parametrize(
    "kind,value",
    [
        (P.U64, 0xFFFF_0000_1234_5678),
        (P.STATE, VringState(3, 256)),
        (P.ADDR, VringAddr(1, 0, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0)),
        (P.CONFIG, ConfigSpace(0, 6, 0, b"\x52\x54\x00\x12\x34\x56")),
    ],
)
def test_round_trip(kind, value):
    code = {P.U64: R.SET_FEATURES, P.STATE: R.SET_VRING_NUM, P.ADDR: R.SET_VRING_ADDR,
            P.CONFIG: R.SET_CONFIG}[kind]
    msg = Message(code, 1, encode_payload(kind, value))
    spec, got = decode_request(msg)
    assert got == value


def test_memory_table_decodes_qemu_and_full_sizes_with_one_fd_per_region():
    regions = (MemRegion(0, 0xA0000, 0x7F0000000000, 0), MemRegion(0xC0000, 0x1000, 0x7F00000C0000,
                                                                  0xC0000))
    body = encode_payload(P.MEMTABLE, MemTable(regions))
    assert len(body) == 8 + 2 * 32
    _, table = decode_request(Message(R.SET_MEM_TABLE, 1, body, [10, 11]))
    assert [r.fd for r in table.regions] == [10, 11]
    assert table.regions[1].userspace_addr == 0x7F00000C0000
    full = body + bytes(6 * 32)
    _, table = decode_request(Message(R.SET_MEM_TABLE, 1, full, [10, 11]))
    assert len(table.regions) == 2


HOSTILE = [
    (Message(R.SET_FEATURES, 1, b"\x00" * 4), "expected 8"),
    (Message(R.SET_VRING_NUM, 1, b"\x00" * 12), "expected 8"),
    (Message(R.GET_FEATURES, 1, b"\x00" * 3), "expected none"),
    (Message(99, 1, b""), "unknown request"),
    (Message(R.SET_OWNER, 1 | 4, b""), "REPLY flag"),
    (Message(R.SET_OWNER, 1 | 0x100, b""), "unknown header flags"),
    (Message(R.SET_MEM_TABLE, 1, struct.pack("<II", 0, 0), []), "0 regions"),
    (Message(R.SET_MEM_TABLE, 1, struct.pack("<II", 9, 0) + bytes(9 * 32), []), "9 regions"),
    (Message(R.SET_MEM_TABLE, 1, struct.pack("<II", 2, 0) + bytes(32), []), "payload of 40"),
    (Message(R.SET_MEM_TABLE, 1, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 4096, 1, 0),
             []), "0 fds for 1 regions"),
    (Message(R.SET_MEM_TABLE, 1, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 0, 1, 0),
             [5]), "size 0"),
    (Message(R.SET_MEM_TABLE, 1, struct.pack("<II", 1, 0)
             + struct.pack("<QQQQ", 2**64 - 4096, 8192, 1, 0), [5]), "wraps"),
    (Message(R.SET_MEM_TABLE, 1, struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 0, 8192, 1, 0)
             + struct.pack("<QQQQ", 4096, 8192, 1, 0), [5, 6]), "overlap"),
    (Message(R.SET_VRING_KICK, 1, struct.pack("<Q", 0), []), "an fd expected"),
    (Message(R.SET_VRING_KICK, 1, struct.pack("<Q", 0x100), [5]), "NOFD set"),
    (Message(R.SET_VRING_CALL, 1, struct.pack("<Q", 0x200), [5]), "unknown bits"),
    (Message(R.SET_OWNER, 1, b"", [5]), "1 fds, expected 0"),
    (Message(R.ADD_MEM_REG, 1, bytes(40), []), "0 fds, expected 1"),
    (Message(R.GET_CONFIG, 1, struct.pack("<III", 250, 10, 0) + bytes(10)), "beyond 256"),
    (Message(R.GET_CONFIG, 1, struct.pack("<III", 0, 10, 0) + bytes(4)), "for size 10"),
    (Message(R.GET_CONFIG, 1, b"\x00"), "shorter than its header"),
]


@pytest.mark.parametrize("msg,reason", HOSTILE, ids=[h[1] for h in HOSTILE])
def test_hostile_requests_are_refused_with_a_reason(msg, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode_request(msg)


def test_vring_file_nofd_and_fd_forms():
    _, f = decode_request(Message(R.SET_VRING_CALL, 1, struct.pack("<Q", 0x103)))
    assert f == VringFile(3, None, 0x103)
    _, f = decode_request(Message(R.SET_VRING_KICK, 1, struct.pack("<Q", 2), [42]))
    assert f.index == 2 and f.fd == 42


def test_framing_errors():
    with pytest.raises(FramingError, match="version"):
        decode_header(struct.pack("<III", 1, 2, 0))
    with pytest.raises(FramingError, match="exceeds"):
        decode_header(struct.pack("<III", 1, 1, 1 << 20))
    with pytest.raises(FramingError, match="short"):
        decode_header(b"\x01")


def test_reply_decoding_for_the_front_end():
    msg = Message(R.GET_VRING_BASE, 1 | 4, encode_payload(P.STATE, VringState(1, 77)))
    assert decode_reply(R.GET_VRING_BASE, msg) == VringState(1, 77)
    ack = Message(R.SET_MEM_TABLE, 1 | 4, struct.pack("<Q", 0))
    assert decode_reply(R.SET_MEM_TABLE, ack) == 0
    with pytest.raises(ProtocolError, match="REPLY flag missing"):
        decode_reply(R.GET_FEATURES, Message(R.GET_FEATURES, 1, struct.pack("<Q", 0)))
    with pytest.raises(ProtocolError, match="got a reply to"):
        decode_reply(R.GET_FEATURES, Message(R.GET_QUEUE_NUM, 5, struct.pack("<Q", 0)))


def test_fds_cross_a_socketpair_with_the_header(pair):
    a, b = pair
    fds = _memfds(2)
    os.ftruncate(fds[0], 4096)
    body = encode_payload(P.MEMTABLE, MemTable((MemRegion(0, 4096, 0x1000, 0),
                                                MemRegion(0x10000, 4096, 0x20000, 0))))
    send_message(a, encode(R.SET_MEM_TABLE, body, need_reply=True), fds)
    msg = recv_message(b)
    assert msg is not None and msg.request == R.SET_MEM_TABLE and msg.need_reply
    assert len(msg.fds) == 2 and not set(msg.fds) & set(fds)
    assert os.fstat(msg.fds[0]).st_size == 4096  # the same memfd
    _, table = decode_request(msg)
    kept = msg.take_fd(table.regions[0].fd)
    msg.close_fds()
    assert _fd_open(kept) and not _fd_open(table.regions[1].fd)
    os.close(kept)
    for fd in fds:
        os.close(fd)


def test_too_many_fds_are_closed_and_the_stream_stays_in_step(pair):
    a, b = pair
    fds = _memfds(12)
    send_message(a, encode(R.SET_OWNER), fds)
    send_message(a, encode(R.GET_FEATURES))
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ProtocolError, match="too many fds"):
        recv_message(b)
    assert len(os.listdir("/proc/self/fd")) == before  # received fds were closed again
    nxt = recv_message(b)
    assert nxt is not None and nxt.request == R.GET_FEATURES
    for fd in fds:
        os.close(fd)


def test_eof_and_truncated_message(pair):
    a, b = pair
    a.sendall(encode(R.SET_FEATURES, b"\x00" * 8)[:15])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(FramingError, match="closed inside"):
        recv_message(b)
    assert recv_message(b) is None


def test_protocol_feature_names():
    assert vp.protocol_feature_names(0b1001) == ["MQ", "REPLY_ACK"]
