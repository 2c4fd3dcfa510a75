"""pcap: the pcapng writer's blocks, directions and timestamps (tshark in tests/system)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest

from virtwire.net import frame as f
from virtwire.trace.pcap import EPB_INBOUND, EPB_OUTBOUND, PcapError, PcapWriter, read_pcapng

A, B = "52:54:00:12:34:01", "52:54:00:12:34:02"


def test_round_trip_keeps_frames_directions_and_times(tmp_path: Path) -> None:
    p = tmp_path / "x.pcapng"
    req = f.icmp_echo(A, B, "10.9.0.1", "10.9.0.2", 1, 1)
    rep = f.icmp_echo(B, A, "10.9.0.2", "10.9.0.1", 1, 1, reply=True)
    with PcapWriter.open(p) as w:
        w.write(req, outbound=True, ts_ns=1_700_000_000_123_456_789)
        w.write(memoryview(rep + b"\0"), outbound=False, ts_ns=1_700_000_000_223_456_789)
        assert w.frames == 2
    pkts = read_pcapng(p)
    assert pkts == [(1_700_000_000_123_456_789, EPB_OUTBOUND, req),
                    (1_700_000_000_223_456_789, EPB_INBOUND, rep + b"\0")]


def test_blocks_are_well_formed() -> None:
    buf = io.BytesIO()
    w = PcapWriter(buf, close_out=False)
    w.write(b"\x01" * 61, outbound=True, ts_ns=0)
    w.close()
    data = buf.getvalue()
    types = []
    off = 0
    while off < len(data):
        bt, total = struct.unpack_from("<II", data, off)
        assert total % 4 == 0
        assert struct.unpack_from("<I", data, off + total - 4)[0] == total  # trailing length
        types.append(bt)
        off += total
    assert off == len(data)
    assert types == [0x0A0D0D0A, 1, 6]
    # IDB: Ethernet link type, nanosecond resolution option present
    idb = data[struct.unpack_from("<I", data, 4)[0]:]
    assert struct.unpack_from("<H", idb, 8)[0] == 1
    assert b"\x09\x00\x01\x00\x09" in idb[:64]


def test_write_after_close_is_ignored(tmp_path: Path) -> None:
    p = tmp_path / "y.pcapng"
    w = PcapWriter.open(p)
    w.close()
    w.write(b"x" * 60, outbound=True)
    assert read_pcapng(p) == []


def test_unwritable_path_is_a_pcap_error(tmp_path: Path) -> None:
    with pytest.raises(PcapError):
        PcapWriter.open(tmp_path / "missing" / "z.pcapng")


def test_corrupt_file_is_a_pcap_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.pcapng"
    p.write_bytes(b"\x0a\x0d\x0d\x0a\xff\x00\x00\x00")
    with pytest.raises(PcapError):
        read_pcapng(p)
