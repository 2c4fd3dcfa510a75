"""Transmit (§5.1.6.2): guest TX chains to the backend, in batches.

One call per kick: pop every available chain (up to ``budget``), check each guest header
(``header.check_tx_header``: a bad one drops *that frame*, counted by reason), and hand the whole
batch to the backend as iovec lists of zero-copy guest views -- with the header when the backend
takes it (TAP), without it otherwise. Partial checksums for a backend without CSUM are finished
in software on a private copy (the device must not write TX buffers). Then one ``push`` per
chain, one ``publish``, one interrupt decision. Frames the backend did not take (back-pressure)
stay pending with their chains un-used and go first on the next call.

Native fast path: for split and packed rings and a backend with ``native_fd()`` (TAP: writev on
its fd; null: discard), the C helper (``native.tx_burst``) consumes each run of chains it can
take whole -- readable, inside guest RAM, header acceptable -- and stops at the first it cannot;
that chain goes through the Python checks right away, then C resumes, so frames leave in ring
order and every drop is decided and counted in one place. Without a C compiler (or while frames
are traced) the pure-Python path does everything; tests run both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from virtwire import trace as _trace
from virtwire.memory import GuestMemory
from virtwire.net import native
from virtwire.net.backend import NetBackend
from virtwire.net.counters import TxCounters
from virtwire.net.header import (
    ETH_HLEN,
    MAX_FRAME,
    VirtioNetHdr,
    check_tx_header,
    finish_checksum,
    gather,
    skip,
)
from virtwire.net.pair import QueuePair
from virtwire.virtio import spec as s
from virtwire.virtio.chain import DescriptorChain
from virtwire.virtio.packed_ring import PackedQueue
from virtwire.virtio.queue import DeviceQueue
from virtwire.virtio.split_ring import SplitQueue

__all__ = ["Transmit"]

log = logging.getLogger(__name__)


class Transmit:
    """The TX side of ``VirtioNet`` (a part of it; see module docstring)."""

    # Provided by VirtioNet / VirtioDevice:
    name: str
    mem: GuestMemory | None
    queues: list[Any]
    counters: list[Any]  # TxCounters on TX queues
    pairs: list[QueuePair]
    negotiated: int
    hdr_len: int
    budget: int
    max_batches: int
    native: bool
    more_work: Callable[[int], None] | None
    signal_used: Callable[[int], None]
    native_lib: Callable[[], Any]

    def process_tx(self, pair: int) -> bool:
        """Drain the TX queue of ``pair`` in batches; returns True when work was left over."""
        qi = 2 * pair + 1
        q = self.queues[qi]
        mem = self.mem
        if q is None or mem is None:
            return False
        p = self.pairs[pair]
        cnt = self.counters[qi]
        budget = self.budget
        # The C path sees no individual frames: off while frames are traced or captured.
        native_fd = (self._native_tx_fd(p.backend, q) if self.native and _trace.FRAMES is None
                     else None)
        # Without a ``more_work`` hook nobody would call again: drain completely.
        for _ in range(self.max_batches if self.more_work is not None else 1 << 62):
            q.disable_notifications(mem)
            n_chains = 0
            if native_fd is not None and not p.tx_pending and p.enabled:
                n_chains = self._tx_native_run(q, mem, p, cnt, native_fd, qi)
            room = budget - n_chains - len(p.tx_pending)
            chains = q.pop_batch(mem, room) if room > 0 and not (
                native_fd is not None and p.tx_pending) else []
            self._tx_chains(q, mem, p, cnt, chains, qi)
            n_chains += len(chains)
            if q.publish(mem) or n_chains:  # C and in-loop publishes count too
                self.signal_used(qi)
            if p.tx_pending:
                return True  # the backend is full: retried on its wake-up or the next kick
            if n_chains < budget:
                if not q.enable_notifications(mem):
                    return False
        if self.more_work is not None:
            self.more_work(qi)
        return True

    def _tx_native_run(self, q: Any, mem: GuestMemory, p: QueuePair, cnt: TxCounters,
                       fd: int, qi: int) -> int:
        """C takes each run of simple chains; the chain it stops at goes through the Python
        checks right away, so frames leave in ring order. Returns the chains consumed."""
        be = p.backend
        assert be is not None
        keep_hdr = be.vnet_hdr
        # Offloads pass through in C only to a backend that keeps the header and takes every
        # negotiated HOST_* offload; otherwise such frames are left to Python.
        feats = self.negotiated & be.host_offloads if keep_hdr else 0
        lib = self.native_lib()
        n_chains = 0
        while n_chains < self.budget:
            k, res = native.tx_burst(lib, q, mem, hdr_len=self.hdr_len, fd=fd,
                                     keep_hdr=keep_hdr, budget=self.budget, features=feats)
            if k:
                self._tx_native_count(k, res, keep_hdr, cnt, be)
            n_chains += k
            if native.tx_stop(res) is not native.TxStop.CHAIN:
                break
            c = q.pop(mem)
            if c is None:
                break
            n_chains += 1
            self._tx_chains(q, mem, p, cnt, [c], qi)
            q.publish(mem)  # C writes used slots from next_used: nothing may be staged
            if p.tx_pending:
                break
        return n_chains

    def _tx_chains(self, q: DeviceQueue, mem: GuestMemory, p: QueuePair, cnt: TxCounters,
                   chains: list[DescriptorChain], qi: int) -> None:
        """Check ``chains`` (after any pending frames), send them as one batch, push used."""
        be = p.backend
        hl = self.hdr_len
        take_hdr = be is not None and be.vnet_hdr
        view = mem.view
        batch = p.tx_pending
        p.tx_pending = []
        dropped: list[DescriptorChain] = []
        for c in chains:
            segs = c.segments
            if len(segs) == 1:
                # Fast path: one readable buffer, header without offload fields.
                gpa, n, w = segs[0]
                if not w and hl + ETH_HLEN <= n <= hl + MAX_FRAME:
                    v = view(gpa, n)
                    if not (v[0] or v[1]):
                        batch.append((c, [v] if take_hdr else [v[hl:]]))
                        continue
            iov = self.tx_frame(c, mem, cnt, self.negotiated, hl, be)
            if iov is None:
                dropped.append(c)
            else:
                batch.append((c, iov))
        for c in dropped:
            q.push(mem, c, 0)
        cnt.chains += len(chains)
        if not batch:
            return
        taken = self._tx_send(p, cnt, batch, qi, take_hdr)
        for c, _i in batch[:taken]:
            q.push(mem, c, 0)
        if taken < len(batch):
            p.tx_pending = batch[taken:]
            cnt.tx_backpressure += 1

    def _tx_send(self, p: QueuePair, cnt: TxCounters,
                 batch: list[tuple[DescriptorChain, list[Any]]], qi: int, take_hdr: bool) -> int:
        """Hand ``batch`` to the backend; how many leading frames it took."""
        be = p.backend
        hl = self.hdr_len
        if be is None or not p.enabled:
            taken = len(batch)
            cnt.drops += taken
            cnt.tx_drop_no_backend += taken
            return taken
        taken = be.send([iov for _c, iov in batch])
        while 0 < taken < len(batch):  # partial take: offer the rest while it moves
            more = be.send([iov for _c, iov in batch[taken:]])
            if not more:
                break
            taken += more
        cnt.frames += taken
        cnt.bytes += sum(c.readable_len for c, _i in batch[:taken]) - hl * taken
        fh = _trace.FRAMES
        if fh is not None:
            for _c, iov in batch[:taken]:
                fh("tx", list(iov), qi, hl if take_hdr else 0)
        return taken

    def _native_tx_fd(self, be: NetBackend | None, q: DeviceQueue) -> int | None:
        """The fd for the native TX fast path (-1: discard), or None when it does not apply."""
        if be is None or not isinstance(q, SplitQueue | PackedQueue):
            return None
        fd = be.native_fd()
        if fd is None or self.native_lib() is None:
            return None
        return fd

    def _tx_native_count(self, n: int, res: Any, keep_hdr: bool, cnt: TxCounters,
                         be: NetBackend) -> None:
        cnt.frames += res.frames
        cnt.bytes += res.bytes
        cnt.chains += n
        cnt.tx_native += n
        if res.gso:
            cnt.tx_gso += res.gso
        be.count_native(tx_frames=res.frames - res.errors,
                        tx_bytes=res.bytes + (self.hdr_len * res.frames if keep_hdr else 0),
                        tx_errors=res.errors)

    def tx_frame(self, c: DescriptorChain, mem: GuestMemory, cnt: TxCounters,
                 features: int, hl: int, be: NetBackend | None) -> list[Any] | None:
        """The iovec to hand the backend for chain ``c``, or None (dropped, counted)."""
        views = list(c.readable(mem))
        reason = None
        hdr = None
        if c.readable_len < hl:
            reason = "short_header"
        else:
            v0 = views[0]
            hb = v0[:hl] if len(v0) >= hl else gather(views, hl)
            if hb[0] or hb[1]:  # flags or gso_type: the slow path with full checks
                hdr = VirtioNetHdr.unpack(hb, hl)
                reason = check_tx_header(hdr, c.readable_len - hl, features)
            elif c.readable_len - hl < ETH_HLEN:
                reason = "runt"
            elif c.readable_len - hl > MAX_FRAME:
                reason = "oversize"
        if reason is not None:
            if _trace.TRACE is not None:  # driver conformance records header faults
                _trace.TRACE.emit("frame", "dropped", dir="tx", reason=reason)
            n = cnt.drop("tx_drop_" + reason)
            if n & (n - 1) == 0:
                log.warning("%s: TX frame dropped: %s (%d so far)", self.name, reason, n)
            return None
        take_hdr = be is not None and be.vnet_hdr
        if hdr is not None and hdr.gso_type:
            cnt.tx_gso += 1
        if hdr is not None and hdr.needs_csum and (not take_hdr or not be.host_offloads >>
                                                   s.VIRTIO_NET_F_CSUM & 1):
            # Finish the checksum on a private copy (TX buffers are read-only to the device).
            frame = bytearray(b"".join(skip(views, hl)))
            finish_checksum(frame, hdr.csum_start, hdr.csum_offset)
            cnt.tx_sw_csum += 1
            if take_hdr:
                h = VirtioNetHdr(gso_type=hdr.gso_type, hdr_len=hdr.hdr_len,
                                 gso_size=hdr.gso_size)
                return [memoryview(h.pack(hl)), memoryview(frame)]
            return [memoryview(frame)]
        if take_hdr:
            return views
        return skip(views, hl)
