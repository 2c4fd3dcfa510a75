"""A sans-I/O model of the Realtek RTL8139 (classic) register file over guest memory.

Theory of operation
-------------------
The RTL8139 is a "full virtualization" NIC: the guest's stock driver (Linux ``8139too``) talks to
it through a 256-byte register file, and every one of those accesses is a trap to us. This module
is that register file and the DMA the chip does; it performs no I/O of its own. A host (the PCI
function in ``rtl8139.pci``) hands it register accesses (``read`` / ``write`` at an offset and a
width), guest RAM (``attach``), frames from the wire (``receive``) and takes frames for the wire
(``send_frame``) and the interrupt level (``on_irq``).

- **Transmit** (datasheet "Transmit"): four descriptors, each a status/command register TSDn and
  a buffer address TSADn. The driver copies a frame to the buffer and writes TSDn with the size
  (bits 12:0) and OWN clear; the chip reads ``size`` bytes at TSADn, puts the frame on the wire,
  then sets OWN (DMA done) and TOK in TSDn and TOK in ISR. The early-TX threshold is ignored.
  Descriptors are sent in the order their TSD was written, only while CR.TE is set.
- **Receive**: one ring buffer at RBSTART of 8, 16, 32 or 64 KiB (RCR bits 12:11). The chip
  writes each accepted frame at CBR: a 4-byte header (status, length including the 4-byte CRC),
  the frame, its CRC, and advances CBR to the next 4-byte boundary. The driver consumes frames
  and writes CAPR = its read offset - 16. Free space is ``(CAPR + 16 - CBR) mod size`` (0 means
  empty); a frame that does not fit is dropped with ISR.RXOVW and MPC counted. With RCR.WRAP
  clear a frame that runs past the end continues at the ring's start; with WRAP set (8139too's
  choice) it runs on contiguously past the end, into the driver's padding. CR.BUFE reads 1 while
  the ring is empty.
- **Address filter** (RCR): broadcast (AB), multicast (AM, through the 64-bit MAR hash indexed
  by the top 6 bits of the big-endian CRC-32 of the address), our address (APM, IDR0-5), all
  (AAP). Frames shorter than 60 bytes are padded as the wire would.
- **Interrupts**: the line is ``ISR & IMR != 0``; ISR bits are cleared by writing 1s.
- **Stranded frames**: 8139too acks ROK per frame and polls only while ROK/RXOVW is set, so
  frames left in the ring when its NAPI budget runs out wait for the next arrival. A real chip
  keeps receiving from the wire (and overflows, raising RXOVW); here the host stops reading its
  backend while the ring is full (nothing is lost), so the chip re-raises ROK when it stops
  (``nudge_rx("full")``) and when the driver unmasks ROK with frames still unread
  (``nudge_rx("unmask")``): the driver always learns of frames in the ring.
- **Configuration**: 9346CR selects normal, programming (the EEPROM pins, ``eeprom``) or
  config-write mode (CONFIG0-5 and BMCR are writable only then). The internal PHY's BMCR, BMSR
  (link up, autonegotiation complete), ANAR, ANLPAR, ANER live at 0x62-0x6A, where 8139too's
  ``mdio_read`` for "PHY 32" reads them.

Hostile guests. Every value the guest writes is checked where it is used: a TX size of 0 or over
1792 bytes, a TX buffer or RX ring outside guest RAM, garbage in CAPR or RBSTART. A bad TX is
completed with TABT and ISR.TER (the driver's error path), counted in ``tx_bad_size`` or
``dma_errors``; a bad RX write drops the frame (``dma_errors``). Accesses to unknown offsets read
as zero and are counted (``unknown_accesses``), logged at power-of-two counts. Nothing here raises
on guest input.

Every access is counted by register name (``accesses``: ``{"TSD0": n, ...}``, the name of the
register at the access's offset), interrupts (rising edges of the line) in ``counters``.
"""

from __future__ import annotations

import logging
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from virtwire.rtl8139 import regs as r
from virtwire.rtl8139.eeprom import Eeprom93C46

__all__ = ["Rtl8139", "MAX_TX_SIZE", "MAX_RX_FRAME", "ether_crc_be", "mar_bit"]

log = logging.getLogger(__name__)

MAX_TX_SIZE = 1792  # the largest TX buffer the chip takes (datasheet, TSD SIZE)
MAX_RX_FRAME = 1792  # larger frames are dropped (8139too refuses rx_size > 1792 + 4)
MIN_FRAME = 60
HWVER_8139C = 0x74000000  # TCR bits 30:26,23:22 of an RTL8139C ("RTL-8139C" in 8139too)
HWVER_8139CPLUS = 0x74800000
_TCR_VERSION = 0x7CC00000
BMSR_UP = 0x782D  # 100/10 full/half capable, autoneg complete + capable, link up, ext caps
BMSR_DOWN = 0x7809
_U16 = struct.Struct("<HH")


def ether_crc_be(data: bytes) -> int:
    """Linux's ``ether_crc``: the CRC-32 register, MSB first, without the final inversion
    (``bitrev32(crc32_le(~0, data))``), computed from zlib's reflected CRC."""
    v = zlib.crc32(data) ^ 0xFFFFFFFF
    return int(f"{v:032b}"[::-1], 2)


def mar_bit(addr: bytes) -> int:
    """The MAR hash bit (0-63) of a multicast address."""
    return ether_crc_be(addr[:6]) >> 26


class _NoBackend:
    def send_frame(self, frame: bytes) -> bool:
        return True


class Rtl8139:
    """The RTL8139 register model (see module docstring).

    ``send_frame(bytes) -> bool`` puts a frame on the wire; ``on_irq(level)`` gets the INTx
    level whenever it changes; ``on_rx_space()`` is called when the guest frees ring space after
    the ring was too full to take a frame (a host resumes reading its backend) or enables RX;
    ``on_tx(i)`` (optional) learns of a TX request instead of it being sent at once.
    """

    REGISTER_MAP: tuple[tuple[int, int, str], ...] = r.REGISTERS

    def __init__(self, mac: bytes, *, revision: int = 0x10,
                 send_frame: Callable[[bytes], bool] | None = None,
                 on_irq: Callable[[bool], None] | None = None, name: str = "rtl8139") -> None:
        if len(mac) != 6:
            raise ValueError("mac must be 6 bytes")
        self.mac = bytes(mac)
        self.revision = revision
        self.name = name
        self.mem: Any = None
        self.send_frame = send_frame or _NoBackend().send_frame
        self.on_irq = on_irq or (lambda level: None)
        self.on_rx_space: Callable[[], None] | None = None
        # Descriptor ``i`` was handed to the chip. None: send at once; a host that answers the
        # guest first (the PCI proxy) sets it and calls ``run_tx`` later.
        self.on_tx: Callable[[int], None] | None = None
        self.eeprom = Eeprom93C46(self.mac)
        self.link_up = True
        self.regs = bytearray(256)
        self.table = r.register_table(self.REGISTER_MAP)
        self.accesses: dict[str, int] = {}
        self.counters: dict[str, int] = {
            "reads": 0, "writes": 0, "interrupts": 0, "tx_frames": 0, "tx_bytes": 0,
            "rx_frames": 0, "rx_bytes": 0, "rx_filtered": 0, "rx_overflow": 0,
            "rx_oversize": 0, "rx_disabled": 0, "tx_bad_size": 0, "dma_errors": 0,
            "tx_backend_drops": 0, "unknown_accesses": 0, "ro_writes": 0, "locked_writes": 0,
            "resets": 0,
        }
        self.isr_causes: dict[str, int] = {}
        self._bad_seen: dict[str, int] = {}
        self.level = False
        self.tx_queue: deque[int] = deque()
        self.rx_starved = False
        self._t0 = time.monotonic()
        self._getters: dict[int, Callable[[], int]] = {}
        self._setters: dict[int, Callable[[int, int], None]] = {}
        self._install()
        self.reset()

    # -- register plumbing -------------------------------------------------------------------
    def _install(self) -> None:
        g, s = self._getters, self._setters
        for i in range(4):
            s[r.TSD0 + 4 * i] = lambda v, m, i=i: self._write_tsd(i, v, m)
        g[r.CR] = self._get_cr
        s[r.CR] = self._set_cr
        s[r.CAPR] = self._set_capr
        g[r.CBR] = lambda: self.cbr
        s[r.CBR] = self._ro
        g[r.ISR] = lambda: self.isr
        s[r.ISR] = self._set_isr
        g[r.IMR] = lambda: self.imr
        s[r.IMR] = self._set_imr
        g[r.TCR] = lambda: (self._plain(r.TCR) & ~_TCR_VERSION) | self._hwver
        s[r.TCR] = lambda v, m: self._store(r.TCR, v & ~(_TCR_VERSION | 1), m)
        g[r.TCTR] = lambda: int((time.monotonic() - self._t0) * 33_000_000) & 0xFFFFFFFF
        s[r.TCTR] = self._set_tctr
        g[r.MPC] = lambda: self.missed & 0xFFFFFF
        s[r.MPC] = self._set_mpc
        g[r.CR9346] = self._get_9346
        s[r.CR9346] = self._set_9346
        for off in (r.CONFIG0, r.CONFIG1, r.CONFIG3, r.CONFIG4, r.CONFIG5):
            s[off] = lambda v, m, off=off: self._locked_store(off, v, m)
        g[r.MSR] = lambda: 0x00 if self.link_up else 0x04
        s[r.MSR] = self._ro
        g[r.TSAD_SUMMARY] = self._get_tsad_summary
        s[r.TSAD_SUMMARY] = self._ro
        s[r.BMCR] = self._set_bmcr
        g[r.BMSR] = lambda: BMSR_UP if self.link_up else BMSR_DOWN
        s[r.BMSR] = self._ro
        g[r.ANLPAR] = lambda: 0x45E1 if self.link_up else 0
        s[r.ANLPAR] = self._ro
        g[r.ANER] = lambda: 0x0001
        s[r.ANER] = self._ro
        s[0x34] = self._ro  # ERBCR
        s[0x36] = self._ro  # ERSR
        s[r.HLTCLK] = lambda v, m: None  # 'R' / 'H': clock run / halt, nothing to model

    @property
    def _hwver(self) -> int:
        return HWVER_8139CPLUS if self.revision >= 0x20 else HWVER_8139C

    def _plain(self, off: int) -> int:
        reg = self.table[off]
        assert reg is not None
        return int.from_bytes(self.regs[off : off + reg[1]], "little")

    def _store(self, off: int, value: int, mask: int) -> None:
        reg = self.table[off]
        assert reg is not None
        w = reg[1]
        old = int.from_bytes(self.regs[off : off + w], "little")
        self.regs[off : off + w] = ((old & ~mask) | (value & mask)).to_bytes(w, "little")

    def _ro(self, value: int, mask: int) -> None:
        self.counters["ro_writes"] += 1

    def _bad(self, what: str) -> None:
        """Count and log (1st, 2nd, 4th, 8th... time per reason) a refused guest value."""
        seen = self._bad_seen
        k = seen.get(what, 0) + 1
        if len(seen) < 256 or what in seen:
            seen[what] = k
        if k & (k - 1) == 0:
            log.warning("%s: %s (%d times)", self.name, what, k)

    def reg_name(self, off: int) -> str:
        reg = self.table[off] if 0 <= off < 256 else None
        return reg[2] if reg is not None else f"unknown@{off:#04x}"

    # -- the guest's accesses ----------------------------------------------------------------
    def read(self, off: int, width: int) -> int:
        """A register read of ``width`` (1, 2 or 4) bytes at ``off`` (0-255)."""
        self.counters["reads"] += 1
        if not self._access_ok("read", off, width):
            return 0
        value = 0
        for o, start, w, stop in self._spans("read", off, off + width):
            get = self._getters.get(start)
            full = get() if get is not None else int.from_bytes(self.regs[start : start + w],
                                                                  "little")
            nbytes = stop - o
            piece = (full >> (8 * (o - start))) & ((1 << (8 * nbytes)) - 1)
            value |= piece << (8 * (o - off))
        return value

    def write(self, off: int, width: int, value: int) -> None:
        """A register write of ``width`` (1, 2 or 4) bytes at ``off`` (0-255)."""
        self.counters["writes"] += 1
        if not self._access_ok("write", off, width):
            return
        value &= (1 << (8 * width)) - 1
        for o, start, _w, stop in self._spans("write", off, off + width):
            nbytes = stop - o
            shift = 8 * (o - start)
            piece = (value >> (8 * (o - off))) & ((1 << (8 * nbytes)) - 1)
            mask = ((1 << (8 * nbytes)) - 1) << shift
            setter = self._setters.get(start)
            if setter is not None:
                setter(piece << shift, mask)
            else:
                self._store(start, piece << shift, mask)

    def _access_ok(self, kind: str, off: int, width: int) -> bool:
        """Check a guest access's width and offset (counted and logged when bad) and count it
        against the register at ``off``."""
        if width not in (1, 2, 4) or not 0 <= off <= 256 - width:
            self.counters["unknown_accesses"] += 1
            self._bad(f"{kind} of width {width} at {off:#x}")
            return False
        name = self.reg_name(off)
        self.accesses[name] = self.accesses.get(name, 0) + 1
        return True

    def _spans(self, kind: str, off: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """(o, register start, register width, stop) for each register piece of [off, end);
        bytes at unknown offsets are counted, logged and skipped."""
        o = off
        while o < end:
            reg = self.table[o]
            if reg is None:
                self.counters["unknown_accesses"] += 1
                self._bad(f"{kind} at unknown offset {o:#x}")
                o += 1
                continue
            start, w, _ = reg
            stop = min(start + w, end)
            yield o, start, w, stop
            o = stop

    # -- reset -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Power-on / software reset (CR.RST): registers to defaults, MAC from the EEPROM."""
        self.counters["resets"] += 1
        mar = bytes(self.regs[r.MAR0 : r.MAR0 + 8])
        self.regs[:] = bytes(256)
        self.regs[r.MAR0 : r.MAR0 + 8] = mar
        for i in range(3):
            word = self.eeprom.words[7 + i]
            self.regs[2 * i] = word & 0xFF
            self.regs[2 * i + 1] = word >> 8
        for i in range(4):
            self._store(r.TSD0 + 4 * i, r.TSD_OWN, 0xFFFFFFFF)
        self.cr = 0
        self.cbr = 0
        self._store(r.CAPR, 0xFFF0, 0xFFFF)
        self.isr = 0
        self.imr = 0
        self.missed = 0
        self.tx_queue.clear()
        self.cr9346 = 0
        self.eeprom.reset()
        self._store(r.CONFIG0, 0x00, 0xFF)
        self._store(r.CONFIG1, 0x0D, 0xFF)  # PMEn | IOMAP | MEMMAP (LWACT clear)
        self._store(r.CONFIG3, 0x40, 0xFF)
        self._store(r.CONFIG4, 0x00, 0xFF)
        self._store(r.CONFIG5, 0x00, 0xFF)
        self._store(r.BMCR, 0x3100, 0xFFFF)  # 100 Mb/s, autoneg on, full duplex
        self._store(r.ANAR, 0x01E1, 0xFFFF)
        self._store(r.CSCR, 0x0400, 0xFFFF)
        self._update_irq()

    # -- CR, 9346CR, CONFIG, PHY -------------------------------------------------------------
    def _get_cr(self) -> int:
        return (self.cr & (r.CR_RE | r.CR_TE)) | (r.CR_BUFE if self._ring_empty() else 0)

    def _set_cr(self, value: int, mask: int) -> None:
        if value & r.CR_RST:
            self.reset()
            return
        was = self.cr
        self.cr = value & (r.CR_RE | r.CR_TE)
        if self.cr & r.CR_TE and not was & r.CR_TE:
            self.run_tx()
        if self.cr & r.CR_RE and not was & r.CR_RE and self.on_rx_space is not None:
            self.on_rx_space()

    def _get_9346(self) -> int:
        v = self.cr9346 & 0xFE
        if self.cr9346 & r.EEM_MASK == r.EEM_PROGRAM:
            v |= self.eeprom.do
        return v

    def _set_9346(self, value: int, mask: int) -> None:
        self.cr9346 = value & 0xFF & ~r.EE_DO
        if value & r.EEM_MASK == r.EEM_PROGRAM:
            self.eeprom.pins(bool(value & r.EE_CS), bool(value & r.EE_SK), bool(value & r.EE_DI))
        else:
            self.eeprom.reset()

    @property
    def config_writable(self) -> bool:
        return self.cr9346 & r.EEM_MASK == r.EEM_CONFIG_WRITE

    def _locked_store(self, off: int, value: int, mask: int) -> None:
        if not self.config_writable:
            self.counters["locked_writes"] += 1
            return
        self._store(off, value, mask)

    def _set_bmcr(self, value: int, mask: int) -> None:
        if not self.config_writable:
            self.counters["locked_writes"] += 1
            return
        # reset (15) and restart-autonegotiation (9) complete at once and read back as 0
        self._store(r.BMCR, value & ~0x8200, mask)

    def set_link(self, up: bool) -> None:
        """The host changes the link (BMSR/MSR follow; 8139too polls them in its timer)."""
        self.link_up = up

    # -- interrupts --------------------------------------------------------------------------
    def _set_isr(self, value: int, mask: int) -> None:
        self.isr &= ~(value & mask)
        self._update_irq()

    def _set_imr(self, value: int, mask: int) -> None:
        was = self.imr
        self.imr = (self.imr & ~mask) | (value & mask)
        if self.imr & r.INT_ROK and not was & r.INT_ROK:
            self.nudge_rx("unmask")
        self._update_irq()

    def nudge_rx(self, why: str) -> None:
        """Re-raise ROK while the ring holds unread frames (see "Stranded frames" above)."""
        if self.rx_enabled and not self._ring_empty() and not self.isr & r.INT_ROK:
            self.raise_isr(r.INT_ROK, f"ROK-{why}")

    def raise_isr(self, bits: int, cause: str) -> None:
        self.isr |= bits
        self.isr_causes[cause] = self.isr_causes.get(cause, 0) + 1
        self._update_irq()

    def _update_irq(self) -> None:
        want = bool(self.isr & self.imr)
        if want != self.level:
            self.level = want
            if want:
                self.counters["interrupts"] += 1
            self.on_irq(want)

    def _set_tctr(self, value: int, mask: int) -> None:
        self._t0 = time.monotonic()

    def _set_mpc(self, value: int, mask: int) -> None:
        self.missed = 0

    # -- transmit ----------------------------------------------------------------------------
    def _write_tsd(self, i: int, value: int, mask: int) -> None:
        off = r.TSD0 + 4 * i
        # The host writes size and threshold; status bits are the chip's.
        status = r.TSD_OWN | r.TSD_TOK | r.TSD_TUN | r.TSD_TABT | 0x80000000 | 0x3F000000
        self._store(off, value & ~status, mask & ~status)
        if mask & r.TSD_OWN and not value & r.TSD_OWN:
            self._store(off, 0, status)  # a new transmission: clear the old status
            if i not in self.tx_queue:
                self.tx_queue.append(i)
            if self.on_tx is None:
                self.run_tx()
            else:
                self.on_tx(i)

    @property
    def tx_pending(self) -> bool:
        return bool(self.tx_queue) and bool(self.cr & r.CR_TE)

    def run_tx(self) -> int:
        """Send every queued descriptor while TE is set; returns how many were completed."""
        done = 0
        while self.tx_queue and self.cr & r.CR_TE:
            self._tx_one(self.tx_queue.popleft())
            done += 1
        return done

    def _tx_one(self, i: int) -> None:
        off = r.TSD0 + 4 * i
        tsd = self._plain(off)
        size = tsd & r.TSD_SIZE
        addr = self._plain(r.TSAD0 + 4 * i)
        if not 0 < size <= MAX_TX_SIZE:
            self.counters["tx_bad_size"] += 1
            self._bad(f"TSD{i} size {size} (1..{MAX_TX_SIZE})")
            self._tx_abort(off)
            return
        mem = self.mem
        if mem is None or not mem.contains(addr, size):
            self.counters["dma_errors"] += 1
            self._bad(f"TSAD{i} buffer {addr:#x}+{size} outside guest RAM")
            self._tx_abort(off)
            return
        frame = mem.read(addr, size)
        if not self.send_frame(frame):
            self.counters["tx_backend_drops"] += 1
        self.counters["tx_frames"] += 1
        self.counters["tx_bytes"] += size
        self._store(off, r.TSD_OWN | r.TSD_TOK, r.TSD_OWN | r.TSD_TOK)
        self.raise_isr(r.INT_TOK, "TOK")

    def _tx_abort(self, off: int) -> None:
        self._store(off, r.TSD_OWN | r.TSD_TABT, r.TSD_OWN | r.TSD_TABT)
        self.raise_isr(r.INT_TER, "TER")

    def _get_tsad_summary(self) -> int:
        v = 0
        for i in range(4):
            tsd = self._plain(r.TSD0 + 4 * i)
            v |= (bool(tsd & r.TSD_TOK) << (12 + i)) | (bool(tsd & r.TSD_TUN) << (8 + i))
            v |= (bool(tsd & r.TSD_TABT) << (4 + i)) | (bool(tsd & r.TSD_OWN) << i)
        return v

    # -- receive -----------------------------------------------------------------------------
    @property
    def ring_size(self) -> int:
        return 8192 << ((self._plain(r.RCR) >> r.RCR_RBLEN_SHIFT) & 3)

    @property
    def capr(self) -> int:
        return self._plain(r.CAPR)

    def _set_capr(self, value: int, mask: int) -> None:
        self._store(r.CAPR, value, mask)
        if self.rx_starved and self.rx_room(MAX_RX_FRAME):
            self.rx_starved = False
            if self.on_rx_space is not None:
                self.on_rx_space()

    def _free(self) -> int:
        size = self.ring_size
        return (self.capr + 16 - self.cbr) % size

    def _ring_empty(self) -> bool:
        return self._free() == 0

    def rx_room(self, length: int) -> bool:
        """Would a frame of ``length`` bytes fit in the ring now?"""
        free = self._free()
        need = (4 + max(length, MIN_FRAME) + 4 + 3) & ~3
        return free == 0 or need < free

    @property
    def rx_enabled(self) -> bool:
        return bool(self.cr & r.CR_RE)

    def _accept(self, frame: bytes | bytearray | memoryview) -> int:
        """The RX header status bits for ``frame``, or 0 when RCR does not accept it."""
        rcr = self._plain(r.RCR)
        dst = bytes(frame[:6])
        if dst == b"\xff" * 6:
            status = r.RX_BAR
            ok = bool(rcr & r.RCR_AB)
        elif dst[0] & 1:
            status = r.RX_MAR
            bit = mar_bit(dst)
            ok = bool(rcr & r.RCR_AM) and bool(self.regs[r.MAR0 + (bit >> 3)] >> (bit & 7) & 1)
        else:
            ours = dst == bytes(self.regs[0:6])
            status = r.RX_PAM if ours else 0
            ok = ours and bool(rcr & r.RCR_APM)
        if rcr & r.RCR_AAP:
            ok = True
        return status | r.RX_ROK if ok else 0

    def receive(self, frame: bytes | bytearray | memoryview) -> bool:
        """A frame from the wire. False when it could not be stored for lack of ring space (the
        frame is dropped, ISR.RXOVW raised); True when it was delivered or filtered/dropped."""
        admitted = self._rx_admit(frame)
        if admitted is None:
            return True
        frame, n, status = admitted
        if not self.rx_room(n):
            self.counters["rx_overflow"] += 1
            self.missed += 1
            self.raise_isr(r.INT_RXOVW, "RXOVW")
            return False
        blob = _U16.pack(status, n + 4) + bytes(frame) + zlib.crc32(frame).to_bytes(4, "little")
        if not self._ring_write(blob):
            return True
        self.cbr = (self.cbr + ((len(blob) + 3) & ~3)) % self.ring_size
        self.counters["rx_frames"] += 1
        self.counters["rx_bytes"] += n
        self.raise_isr(r.INT_ROK, "ROK")
        return True

    def _rx_admit(
        self, frame: bytes | bytearray | memoryview
    ) -> tuple[bytes | bytearray | memoryview, int, int] | None:
        """The receive checks both RX modes share: None when the frame is dropped (receiver off,
        bad length, address filter; each counted), else (frame padded to MIN_FRAME, its length,
        the RX status bits from the filter)."""
        n = len(frame)
        if not self.rx_enabled:
            self.counters["rx_disabled"] += 1
            return None
        if n > MAX_RX_FRAME or n < 14:
            self.counters["rx_oversize"] += 1
            return None
        status = self._accept(frame)
        if not status:
            self.counters["rx_filtered"] += 1
            return None
        if n < MIN_FRAME:
            frame = bytes(frame) + bytes(MIN_FRAME - n)
            n = MIN_FRAME
        return frame, n, status

    def _ring_write(self, blob: bytes) -> bool:
        mem = self.mem
        base = self._plain(r.RBSTART)
        size = self.ring_size
        at = self.cbr
        wrap = not self._plain(r.RCR) & r.RCR_WRAP or size == 65536
        first = len(blob) if not wrap else min(len(blob), size - at)
        pieces = [(base + at, blob[:first])]
        if first < len(blob):
            pieces.append((base, blob[first:]))
        if mem is None or not all(mem.contains(a, len(b)) for a, b in pieces):
            self.counters["dma_errors"] += 1
            self._bad(f"RX ring {base:#x}+{size:#x} (write at {at:#x}) outside guest RAM")
            return False
        for a, b in pieces:
            mem.write(a, b)
        return True

    # -- memory ------------------------------------------------------------------------------
    def attach(self, mem: Any) -> None:
        self.mem = mem

    def release_memory_views(self) -> None:
        """No views are cached: every DMA checks and copies."""

    def stats(self) -> dict[str, Any]:
        return {"model": "rtl8139", "revision": self.revision, "mac": self.mac.hex(":"),
                "link": self.link_up, "counters": dict(self.counters),
                "accesses": dict(sorted(self.accesses.items())),
                "isr_causes": dict(self.isr_causes), "isr": self.isr, "imr": self.imr,
                "cbr": self.cbr, "capr": self.capr, "ring_size": self.ring_size}
