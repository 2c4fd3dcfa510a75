"""C+ mode of the RTL8139 (the RTL8139C+, revision 0x20): descriptor rings instead of TSD/RBSTART.

Theory of operation
-------------------
Linux's ``8139cp`` turns C+ mode on through the C+ command register (CPCR: CpRxOn, CpTxOn) and
then uses two rings of 16-byte descriptors in guest memory (datasheet "C+ mode descriptors")::

    le32 opts1   bit 31 OWN (the NIC owns it), 30 EOR (last of the ring), 29 FS, 28 LS,
                 TX: 27 LGSEN (TSO; MSS in bits 26:16), 18 IPCS, 17 UDPCS, 16 TCPCS, 15:0 size
                 RX: 12:0 buffer size (on completion: frame length + 4), 26 multicast
    le32 opts2   TX: bit 17 TAGC + the 802.1Q tag (byte-swapped) in 15:0; RX: 0 (no tag)
    le64 addr    the buffer

- **TX**: the driver fills descriptors at TNPDS (0x20, 64-bit) and writes TPPoll.NPQ (0xD9, bit
  6). The chip walks from its current descriptor while OWN is set, gathers FS..LS into one frame,
  applies the offloads (IP/TCP/UDP checksums; TCP segmentation at the MSS; VLAN tag insertion),
  clears OWN in each descriptor and raises ISR.TOK. TSO goes to a backend that takes GSO frames
  (a TAP with a virtio_net_hdr) as one frame with a GSO header; otherwise it is segmented here.
- **RX**: descriptors at RDSAR (0xE4, 64-bit). A frame (plus its CRC) is written to the current
  descriptor's buffer if the NIC owns it and it is large enough; opts1 is then written back with
  OWN clear, FS|LS and the length, and ISR.ROK raised. With no descriptor owned the frame waits
  (``rx_room`` is false: a host stops reading its backend) until the driver touches IMR or ISR,
  which ``8139cp`` does at the end of every NAPI poll, after refilling; a frame that arrives with
  no room anyway is dropped with ISR.RDU (bit 4) and MPC counted.
- **DTCCR** (0x10, 64-bit, where TSD0/TSD1 are in classic mode): writing the address with bit 3
  dumps the 64-byte tally counters there (``ethtool -S``); the bit reads back clear when done.

Every descriptor address, buffer address and size comes from the guest: each is checked against
guest RAM before use and counted (``dma_errors``, ``tx_bad_size``, ``rx_oversize``) and dropped;
a ring without EOR wraps after ``MAX_DESCRIPTORS``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Any

from virtwire.net.header import GsoError, VirtioNetHdr, gso_segment, inet_sum
from virtwire.rtl8139 import regs as r
from virtwire.rtl8139.device import MAX_RX_FRAME, MIN_FRAME, Rtl8139

__all__ = ["Rtl8139CPlus", "MAX_DESCRIPTORS", "MAX_TX_FRAME"]

MAX_DESCRIPTORS = 1024
MAX_TX_FRAME = 65535 + 18
DESC = struct.Struct("<IIQ")
OWN = 1 << 31
EOR = 1 << 30
FS = 1 << 29
LS = 1 << 28
LGSEN = 1 << 27
IPCS = 1 << 18
UDPCS = 1 << 17
TCPCS = 1 << 16
TAGC = 1 << 17
RX_MCAST = 1 << 26
DUMP_STATS = 1 << 3
_GSO_TCPV4 = 1
_NEEDS_CSUM = 1


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


class Rtl8139CPlus(Rtl8139):
    """The RTL8139C+ (see module docstring). ``offload_tx(frame, hdr)`` (optional) sends a
    frame with a virtio_net_hdr (GSO / partial checksum) to a backend that takes one."""

    REGISTER_MAP = r.REGISTERS_CPLUS

    def __init__(self, mac: bytes, **kw: Any) -> None:
        self.offload_tx: Callable[[bytes, VirtioNetHdr], bool] | None = None
        self.tx_idx = 0
        self.rx_idx = 0
        self.cpcr = 0
        super().__init__(mac, **kw)
        self.counters.update({"tpoll": 0, "tx_descriptors": 0, "rx_no_descriptor": 0,
                              "tso_frames": 0, "stats_dumps": 0})

    def _install(self) -> None:
        super()._install()
        g, s = self._getters, self._setters
        s[r.TSD0] = self._set_dtccr
        g[r.TSD0] = lambda: self._plain(r.TSD0) & ~DUMP_STATS
        s[r.TSD0 + 4] = lambda v, m: self._store(r.TSD0 + 4, v, m)
        for i in (2, 3):
            s[r.TSD0 + 4 * i] = self._ro
        s[r.TPPOLL] = self._set_tppoll
        g[r.TPPOLL] = lambda: 0
        g[r.CPCR] = lambda: self.cpcr
        s[r.CPCR] = self._set_cpcr
        s[r.IMR] = self._set_imr_cp
        s[r.ISR] = self._set_isr_cp

    def reset(self) -> None:
        self.tx_idx = self.rx_idx = 0
        self.cpcr = 0
        super().reset()
        self._store(r.RMS, 0x0600, 0xFFFF)

    # -- registers ---------------------------------------------------------------------------
    def _set_cpcr(self, value: int, mask: int) -> None:
        self.cpcr = (self.cpcr & ~mask) | (value & mask & 0x00FF)

    @property
    def cplus_rx(self) -> bool:
        return bool(self.cpcr & r.CPCR_CPRX)

    def _set_tppoll(self, value: int, mask: int) -> None:
        if value & r.TPPOLL_NPQ:
            self.counters["tpoll"] += 1
            self.tx_queue.append(0)  # one pending walk of the normal-priority ring
            if self.on_tx is None:
                self.run_tx()
            else:
                self.on_tx(0)

    def _set_imr_cp(self, value: int, mask: int) -> None:
        self._set_imr(value, mask)
        self._rx_recheck()

    def _set_isr_cp(self, value: int, mask: int) -> None:
        self._set_isr(value, mask)
        self._rx_recheck()

    def _rx_recheck(self) -> None:
        if self.rx_starved and self.rx_room(MAX_RX_FRAME):
            self.rx_starved = False
            if self.on_rx_space is not None:
                self.on_rx_space()

    def _set_dtccr(self, value: int, mask: int) -> None:
        self._store(r.TSD0, value, mask)
        lo = self._plain(r.TSD0)
        if not lo & DUMP_STATS:
            return
        addr = ((self._plain(r.TSD0 + 4) << 32) | lo) & ~0x3F
        c = self.counters
        blob = struct.pack("<QQQIHHIIQQIHH", c["tx_frames"], c["rx_frames"],
                           c["tx_bad_size"] + c["dma_errors"], 0, 0, 0, 0, 0, c["rx_frames"],
                           0, 0, 0, 0)
        if self.mem is not None and self.mem.contains(addr, len(blob)):
            self.mem.write(addr, blob)
            c["stats_dumps"] += 1
        else:
            c["dma_errors"] += 1
            self._bad(f"DTCCR dump address {addr:#x} outside guest RAM")
        self._store(r.TSD0, 0, DUMP_STATS)

    # -- descriptors -------------------------------------------------------------------------
    def _ring_addr(self, off: int) -> int:
        return self._plain(off) | self._plain(off + 4) << 32

    def _desc(self, base: int, idx: int) -> tuple[int, int, int, int] | None:
        addr = base + 16 * idx
        mem = self.mem
        if mem is None or not mem.contains(addr, 16):
            self.counters["dma_errors"] += 1
            self._bad(f"descriptor {base:#x}[{idx}] outside guest RAM")
            return None
        o1, o2, buf = DESC.unpack(mem.read(addr, 16))
        return addr, o1, o2, buf

    @staticmethod
    def _next(idx: int, opts1: int) -> int:
        return 0 if opts1 & EOR or idx + 1 >= MAX_DESCRIPTORS else idx + 1

    # -- transmit ----------------------------------------------------------------------------
    @property
    def tx_pending(self) -> bool:
        return bool(self.tx_queue) and bool(self.cr & r.CR_TE)

    def run_tx(self) -> int:
        if not self.cpcr & r.CPCR_CPTX:
            self.tx_queue.clear()
            return 0
        if not self.tx_queue or not self.cr & r.CR_TE:
            return 0
        self.tx_queue.clear()
        base = self._ring_addr(r.TNPDS)
        frags: list[bytes] = []
        descs: list[tuple[int, int]] = []
        sent = 0
        for _ in range(MAX_DESCRIPTORS):
            d = self._desc(base, self.tx_idx)
            if d is None or not d[1] & OWN:
                break
            addr, o1, o2, buf = d
            self.counters["tx_descriptors"] += 1
            self.tx_idx = self._next(self.tx_idx, o1)
            if o1 & FS:
                frags, descs = [], []
            descs.append((addr, o1))
            size = o1 & 0xFFFF
            if self.mem is None or not self.mem.contains(buf, size):
                self.counters["dma_errors"] += 1
                self._bad(f"TX buffer {buf:#x}+{size} outside guest RAM")
                frags = []
            else:
                frags.append(self.mem.read(buf, size))
            if not o1 & LS:
                continue
            frame = b"".join(frags)
            if frags and 14 <= len(frame) <= MAX_TX_FRAME:
                self._tx_frame(bytearray(frame), o1, o2)
                sent += 1
            else:
                self.counters["tx_bad_size"] += 1
                self._bad(f"C+ TX frame of {len(frame)} bytes dropped")
            for a, opts in descs:  # hand every descriptor of the frame back
                self.mem.write(a, (opts & ~OWN).to_bytes(4, "little"))
            frags, descs = [], []
        if sent:
            self.raise_isr(r.INT_TOK, "TOK")
        return sent

    def _tx_frame(self, frame: bytearray, o1: int, o2: int) -> None:
        if o2 & TAGC:
            tag = o2 & 0xFFFF
            frame[12:12] = b"\x81\x00" + bytes([tag & 0xFF, tag >> 8])
        l3 = 18 if frame[12:14] == b"\x81\x00" else 14
        try:
            if o1 & LGSEN:
                self._tx_tso(frame, l3, (o1 >> 16) & 0x7FF)
                return
            if o1 & (IPCS | TCPCS | UDPCS):
                self._checksums(frame, l3, o1)
        except (GsoError, IndexError, ValueError) as e:
            self.counters["tx_bad_size"] += 1
            self._bad(f"C+ TX offload refused: {e}")
            return
        if len(frame) < MIN_FRAME:
            frame += bytes(MIN_FRAME - len(frame))
        self._emit(bytes(frame))

    def _emit(self, frame: bytes) -> None:
        if not self.send_frame(frame):
            self.counters["tx_backend_drops"] += 1
        self.counters["tx_frames"] += 1
        self.counters["tx_bytes"] += len(frame)

    def _l4(self, frame: bytearray, l3: int) -> tuple[int, int]:
        if frame[l3 - 2 : l3] != b"\x08\x00" or frame[l3] >> 4 != 4:
            raise ValueError("not IPv4")
        return l3 + (frame[l3] & 0x0F) * 4, frame[l3 + 9]

    def _pseudo(self, frame: bytearray, l3: int, proto: int, length: int) -> int:
        return inet_sum(bytes(frame[l3 + 12 : l3 + 20]) + bytes([0, proto])
                        + length.to_bytes(2, "big"))

    def _checksums(self, frame: bytearray, l3: int, o1: int) -> None:
        l4, proto = self._l4(frame, l3)
        if o1 & IPCS:
            frame[l3 + 10 : l3 + 12] = b"\0\0"
            frame[l3 + 10 : l3 + 12] = (~inet_sum(frame[l3:l4]) & 0xFFFF).to_bytes(2, "big")
        field = 16 if o1 & TCPCS and proto == 6 else 6 if o1 & UDPCS and proto == 17 else -1
        if field < 0 or l4 + field + 2 > len(frame):
            return
        tot = int.from_bytes(frame[l3 + 2 : l3 + 4], "big")
        end = min(len(frame), l3 + tot)
        frame[l4 + field : l4 + field + 2] = b"\0\0"
        c = ~inet_sum(frame[l4:end], self._pseudo(frame, l3, proto, end - l4)) & 0xFFFF
        if c == 0 and proto == 17:
            c = 0xFFFF
        frame[l4 + field : l4 + field + 2] = c.to_bytes(2, "big")

    def _tx_tso(self, frame: bytearray, l3: int, mss: int) -> None:
        l4, proto = self._l4(frame, l3)
        if proto != 6 or mss == 0 or l4 + 20 > len(frame):
            raise GsoError("LGSEN on a frame that is not IPv4/TCP, or MSS 0")
        hlen = l4 + (frame[l4 + 12] >> 4) * 4
        self.counters["tso_frames"] += 1
        if self.offload_tx is not None:
            # Seed the TCP checksum with the pseudo-header sum of the whole segment run.
            seed = _fold(self._pseudo(frame, l3, 6, len(frame) - l4))
            frame[l4 + 16 : l4 + 18] = seed.to_bytes(2, "big")
            hdr = VirtioNetHdr(flags=_NEEDS_CSUM, gso_type=_GSO_TCPV4, hdr_len=hlen,
                               gso_size=mss, csum_start=l4, csum_offset=16)
            if not self.offload_tx(bytes(frame), hdr):
                self.counters["tx_backend_drops"] += 1
            self.counters["tx_frames"] += 1
            self.counters["tx_bytes"] += len(frame)
            return
        for seg in gso_segment(frame, VirtioNetHdr(gso_type=_GSO_TCPV4, gso_size=mss)):
            self._emit(seg)

    # -- receive -----------------------------------------------------------------------------
    def rx_room(self, length: int) -> bool:
        if not self.cplus_rx:
            return super().rx_room(length)
        d = self._peek_rx()
        return d is not None and bool(d[1] & OWN)

    def _peek_rx(self) -> tuple[int, int, int, int] | None:
        mem = self.mem
        addr = self._ring_addr(r.RDSAR) + 16 * self.rx_idx
        if mem is None or not mem.contains(addr, 16):
            return None
        o1, o2, buf = DESC.unpack(mem.read(addr, 16))
        return addr, o1, o2, buf

    def _ring_empty(self) -> bool:
        return True if self.cplus_rx else super()._ring_empty()

    def nudge_rx(self, why: str) -> None:
        if not self.cplus_rx:  # C+: written descriptors already raised ROK; refills re-check
            super().nudge_rx(why)

    def receive(self, frame: bytes | bytearray | memoryview) -> bool:
        if not self.cplus_rx:
            return super().receive(frame)
        admitted = self._rx_admit(frame)
        if admitted is None:
            return True
        frame, n, status = admitted
        d = self._desc(self._ring_addr(r.RDSAR), self.rx_idx)
        if d is None:
            return True
        addr, o1, _o2, buf = d
        if not o1 & OWN:
            self.counters["rx_no_descriptor"] += 1
            self.missed += 1
            self.raise_isr(r.INT_RXOVW, "RDU")
            return False
        blob = bytes(frame) + zlib.crc32(frame).to_bytes(4, "little")
        if len(blob) > (o1 & 0x1FFF):
            self.counters["rx_oversize"] += 1
            return True
        if self.mem is None or not self.mem.contains(buf, len(blob)):
            self.counters["dma_errors"] += 1
            self._bad(f"RX buffer {buf:#x}+{len(blob)} outside guest RAM")
            return True
        self.mem.write(buf, blob)
        done = (o1 & EOR) | FS | LS | len(blob) | (RX_MCAST if status & r.RX_MAR else 0)
        self.mem.write(addr + 4, b"\0\0\0\0")
        self.mem.write(addr, done.to_bytes(4, "little"))
        self.rx_idx = self._next(self.rx_idx, o1)
        self.counters["rx_frames"] += 1
        self.counters["rx_bytes"] += n
        self.raise_isr(r.INT_ROK, "ROK")
        return True
