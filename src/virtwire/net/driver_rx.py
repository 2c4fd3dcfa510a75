r"""The receive side of ``VirtioNetDriver`` (§5.1.6.3 / §5.1.6.4): posting buffers in Linux's
three layouts (mergeable, big, small), reaping used ones into ``RxFrame``\ s, checking what
the device wrote (used lengths, ``num_buffers``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from virtwire.memory import GuestMemory
from virtwire.net.header import VirtioNetHdr
from virtwire.net.transport import DeviceFault, NetDriverConfig, QueueState, RxBuf, RxFrame
from virtwire.virtio import spec
from virtwire.virtio.errors import QueueError
from virtwire.virtio.queue import QueueFull

__all__ = ["DriverReceive"]


class DriverReceive:
    """Receive for ``VirtioNetDriver`` (a part of it; see module docstring)."""

    # Provided by VirtioNetDriver:
    mem: GuestMemory
    alloc: Any
    cfg: NetDriverConfig
    stats: Any
    hdr_len: int
    mtu: int
    rx_layout: str
    rxqs: list[QueueState]
    has: Callable[[int], bool]
    service: Callable[[], None]
    _dma: Callable[[int], int]
    _kick: Callable[[QueueState], bool]
    _stall_kick: Callable[[QueueState, float], None]
    _rx_partial: dict[int, list[tuple[RxBuf, int]]]
    _rx_need: dict[int, int]

    # -- receive (§5.1.6.3 / §5.1.6.4) ---------------------------------------------------------
    def _rx_geometry(self) -> list[int]:
        """Writable segment lengths of one receive buffer for the negotiated layout."""
        h = self.hdr_len
        if self.rx_layout == "mergeable":
            return [max(self.cfg.mrg_buf_len, h + 64)]
        if self.rx_layout == "big":
            return [h] + [4096] * 17  # header, then pages: 69632 bytes of frame room
        frame_room = 14 + 4 + max(self.mtu, 1500)
        any_layout = self.has(spec.VIRTIO_F_VERSION_1) or self.has(spec.VIRTIO_F_ANY_LAYOUT)
        return [h + frame_room] if any_layout else [h, frame_room]

    def refill(self, rq: QueueState, limit: int | None = None, kick: bool = True) -> int:
        """Post receive buffers until the queue is full (or ``limit``); publish + kick."""
        geom = self._rx_geometry()
        want = self.cfg.rx_fill if self.cfg.rx_fill is not None else rq.size
        n = 0
        while rq.posted < want and (limit is None or n < limit):
            segs = []
            for ln in geom:
                segs.append((self._dma(ln), ln))
            buf = RxBuf(tuple(segs), sum(ln for _, ln in segs))
            try:
                rq.q.add(self.mem, (), segs, buf)
            except QueueFull:
                for gpa, _ in segs:
                    self.alloc.free(gpa)
                break
            rq.posted += 1
            n += 1
        if n and kick:
            self._kick(rq)
        return n

    def _get_used(self, qq: QueueState) -> tuple[Any, int] | None:
        """``get_used``, tolerant as Linux is of a packed-ring device that omits WRITE.

        §2.8.4: a used descriptor's length is reserved unless VIRTQ_DESC_F_WRITE is set, so the
        packed queue reports 0 for one without it. QEMU 7.2 never sets WRITE in used
        descriptors, and Linux reads the length regardless; so do we, bounded by what the
        buffer offered, and count each case (``stats.used_len_without_write``) for ``conform``.
        """
        q = qq.q
        if not self.has(spec.VIRTIO_F_RING_PACKED):
            return q.get_used(self.mem)
        at = q.desc_addr + q.last_used * spec.VIRTQ_PACKED_DESC_SIZE
        raw_len = self.mem.read_u32(at + 8)
        flags = self.mem.read_u16(at + 14)
        got = q.get_used(self.mem)
        if got is not None and not flags & spec.VIRTQ_DESC_F_WRITE and raw_len:
            buf = got[0]
            if isinstance(buf, RxBuf):
                if raw_len > buf.capacity:
                    raise QueueError(f"used len {raw_len} > {buf.capacity} writable")
                self.stats.used_len_without_write += 1
                return buf, raw_len
        return got

    def _read_buf(self, buf: RxBuf, length: int) -> bytes:
        out = bytearray()
        left = length
        for gpa, ln in buf.segs:
            if left <= 0:
                break
            k = min(ln, left)
            out += self.mem.view(gpa, k)
            left -= k
        return bytes(out)

    def _free_buf(self, buf: RxBuf) -> None:
        for gpa, _ in buf.segs:
            self.alloc.free(gpa)

    def receive(self, max_frames: int = 1 << 30, queue: int = 0) -> list[RxFrame]:
        """Reap used receive buffers into frames, then refill. Raises ``DeviceFault``."""
        rq = self.rxqs[queue]
        frames: list[RxFrame] = []
        h = self.hdr_len
        while len(frames) < max_frames:
            try:
                got = self._get_used(rq)
            except QueueError as e:
                raise DeviceFault(f"receiveq{queue}: {e}") from None
            if got is None:
                break
            buf, length = got
            rq.posted -= 1
            partial = self._rx_partial.get(queue)
            if partial is not None:
                partial.append((buf, length))
                if len(partial) < self._rx_need[queue]:
                    continue
                del self._rx_partial[queue]
                frames.append(self._assemble(partial, queue))
                continue
            if length < h:
                self._free_buf(buf)
                self.stats.rx_errors += 1
                raise DeviceFault(f"receiveq{queue}: used length {length} < header {h}")
            nb = 1
            if self.rx_layout == "mergeable":
                nb = int.from_bytes(self.mem.read(buf.segs[0][0] + 10, 2), "little")
                if nb < 1 or nb > rq.size:
                    self._free_buf(buf)
                    self.stats.rx_errors += 1
                    raise DeviceFault(f"receiveq{queue}: num_buffers {nb} (§5.1.6.4)")
            if nb == 1:
                frames.append(self._assemble([(buf, length)], queue))
            else:
                self._rx_partial[queue] = [(buf, length)]
                self._rx_need[queue] = nb
        if frames or rq.posted < rq.size // 2:
            self.refill(rq)
        return frames

    def _assemble(self, parts: list[tuple[RxBuf, int]], queue: int) -> RxFrame:
        h = self.hdr_len
        first, flen = parts[0]
        raw = self._read_buf(first, flen)
        hd = VirtioNetHdr.unpack(raw, h)
        data = bytearray(raw[h:])
        for buf, ln in parts[1:]:
            data += self._read_buf(buf, ln)
        for buf, _ in parts:
            self._free_buf(buf)
        self.stats.rx_frames += 1
        self.stats.rx_bytes += len(data)
        return RxFrame(bytes(data), hd.flags, hd.gso_type, hd.hdr_len, hd.gso_size, hd.csum_start,
                       hd.csum_offset, len(parts), queue)

    def poll_receive(self, want: int, timeout: float, queue: int = 0) -> list[RxFrame]:
        """Receive until ``want`` frames arrived or ``timeout`` seconds passed."""
        out: list[RxFrame] = []
        deadline = time.monotonic() + timeout
        idle = 0
        while len(out) < want:
            got = self.receive(want - len(out), queue)
            if got:
                out += got
                idle = 0
                self.rxqs[queue].last_progress = time.monotonic()
                continue
            now = time.monotonic()
            if now > deadline:
                break
            self.service()
            rq = self.rxqs[queue]
            if now - rq.last_progress > max(self.cfg.stall_kick_after, 0.2):
                # nothing arrived for a while: a (harmless) notification in case the device
                # is holding frames back waiting for a kick it never asked for
                self._stall_kick(rq, now)
                self.stats.stall_kicks -= 1  # idle receive is normal, not a finding
                self.stats.rx_idle_kicks += 1
            idle += 1
            time.sleep(0 if idle < 50 else 0.0002)
        return out
