"""A pcapng writer: every frame through the device, both directions, with the direction recorded.

Theory of operation
-------------------
Classic pcap has no per-packet direction, so virtwire writes pcapng (the format tshark and
Wireshark read natively; IETF draft "PCAP Next Generation (pcapng) Capture File Format"):

- one Section Header Block (byte-order magic 0x1A2B3C4D, version 1.0, section length -1);
- one Interface Description Block, LINKTYPE_ETHERNET (1), snaplen 262144, ``if_name`` and
  ``if_tsresol`` = 9 (timestamps in nanoseconds);
- one Enhanced Packet Block per frame whose ``epb_flags`` option (code 2) carries the direction in
  bits 0-1: 1 = inbound, 2 = outbound. tshark shows it as ``frame.packet_flags_direction``.

Direction is the *guest's* view of its network card: a frame the guest transmits (the device's TX
queue) is **outbound**, a frame delivered to the guest (RX queue) is **inbound**.

Writes are serialized by a lock (a device may run queues in several threads) and buffered; the file
is complete after ``close()`` (tshark also reads a file cut after any whole block).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from typing import IO

__all__ = ["PcapWriter", "PcapError", "read_pcapng", "LINKTYPE_ETHERNET", "EPB_INBOUND",
           "EPB_OUTBOUND"]

LINKTYPE_ETHERNET = 1
BT_SHB = 0x0A0D0D0A
BT_IDB = 0x00000001
BT_EPB = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_ENDOFOPT = 0
OPT_COMMENT = 1
SHB_USERAPPL = 4
IF_NAME = 2
IF_TSRESOL = 9
EPB_FLAGS = 2
EPB_INBOUND = 1
EPB_OUTBOUND = 2
SNAPLEN = 262144


class PcapError(Exception):
    """The capture file cannot be written or read."""


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * _pad4(len(value))


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


class PcapWriter:
    """Appends Ethernet frames to a pcapng stream (see module docstring)."""

    def __init__(self, out: IO[bytes], if_name: str = "virtwire", close_out: bool = True) -> None:
        self._out = out
        self._close_out = close_out
        self._lock = threading.Lock()
        self.frames = 0
        self.closed = False
        shb_opts = _option(SHB_USERAPPL, b"virtwire") + _option(OPT_ENDOFOPT, b"")
        out.write(_block(BT_SHB, struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + shb_opts))
        idb_opts = (_option(IF_NAME, if_name.encode()) + _option(IF_TSRESOL, b"\x09")
                    + _option(OPT_ENDOFOPT, b""))
        out.write(_block(BT_IDB, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, SNAPLEN) + idb_opts))

    @classmethod
    def open(cls, path: str | os.PathLike[str], if_name: str = "virtwire") -> PcapWriter:
        try:
            f = open(path, "wb")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise PcapError(f"cannot write pcap {path}: {e.strerror}") from None
        return cls(f, if_name)

    def write(self, frame: bytes | bytearray | memoryview, outbound: bool,
              ts_ns: int | None = None) -> None:
        """Append one frame; ``outbound`` = sent by the guest (see module docstring)."""
        data = bytes(frame)
        cap = data[:SNAPLEN]
        ts = time.time_ns() if ts_ns is None else ts_ns
        flags = EPB_OUTBOUND if outbound else EPB_INBOUND
        body = (struct.pack("<IIIII", 0, (ts >> 32) & 0xFFFFFFFF, ts & 0xFFFFFFFF, len(cap),
                            len(data))
                + cap + b"\0" * _pad4(len(cap))
                + _option(EPB_FLAGS, struct.pack("<I", flags)) + _option(OPT_ENDOFOPT, b""))
        blk = _block(BT_EPB, body)
        with self._lock:
            if self.closed:
                return
            self._out.write(blk)
            self.frames += 1

    def flush(self) -> None:
        with self._lock:
            if not self.closed:
                self._out.flush()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._out.flush()
            if self._close_out:
                self._out.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_pcapng(path: str | os.PathLike[str]) -> list[tuple[int, int, bytes]]:
    """(timestamp ns, epb direction flags, frame) of each packet of a little-endian pcapng file
    with one nanosecond interface, as ``PcapWriter`` writes it (a test and ``explain`` helper)."""
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        raise PcapError(f"cannot read pcap {path}: {e.strerror}") from None
    out: list[tuple[int, int, bytes]] = []
    off = 0
    while off + 12 <= len(buf):
        btype, total = struct.unpack_from("<II", buf, off)
        if total < 12 or total % 4 or off + total > len(buf):
            raise PcapError(f"bad block at offset {off}")
        if btype == BT_SHB and struct.unpack_from("<I", buf, off + 8)[0] != BYTE_ORDER_MAGIC:
            raise PcapError("not a little-endian pcapng section")
        if btype == BT_EPB:
            _if, hi, lo, caplen, _orig = struct.unpack_from("<IIIII", buf, off + 8)
            data_off = off + 28
            if data_off + caplen > off + total - 4:
                raise PcapError(f"packet at offset {off} overruns its block")
            frame = buf[data_off:data_off + caplen]
            flags = 0
            o = data_off + caplen + _pad4(caplen)
            while o + 4 <= off + total - 4:
                code, ln = struct.unpack_from("<HH", buf, o)
                if code == OPT_ENDOFOPT:
                    break
                if code == EPB_FLAGS and ln == 4:
                    flags = struct.unpack_from("<I", buf, o + 4)[0]
                o += 4 + ln + _pad4(ln)
            out.append(((hi << 32) | lo, flags & 3, frame))
        off += total
    if off != len(buf):
        raise PcapError(f"truncated block at offset {off}")
    return out
