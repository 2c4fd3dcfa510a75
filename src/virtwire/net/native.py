"""All ctypes binding of the C helper (``_native/vwnet.c``): structures, loading, the calls.

Theory of operation
-------------------
``vwnet.c`` holds the TX and RX fast paths (split and packed rings) of the virtio-net device
(see the comments in it). ``load()`` compiles it once into a per-user cache directory (keyed by
a hash of the source) and loads it with ctypes; without a compiler, or with
``VIRTWIRE_NATIVE=0``, it returns None and the device uses its pure-Python path, which the test
suite always covers as well.

The calls go through the rings' public position API (``DeviceQueue.positions``/``adopt``):
``tx_burst`` pops, checks and sends simple TX chains; ``NativeRx.burst`` reads frames into
mergeable RX chains (``RxStash`` is the C side's stash of popped chains, ``spill``/``load``
move chains between it and the Python stash). Stop codes are ``TxStop`` and ``RxStop``.

# SAFETY: the helper receives raw host addresses of guest memory. They are taken from
# ``ctypes`` objects created with ``from_buffer`` over the regions' memoryviews and kept alive
# for the duration of the call only (``GuestView``), so the memory cannot be unmapped while C
# code holds the pointers. The C side checks every guest address against the region table.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any

from virtwire.memory import GuestMemory
from virtwire.virtio.chain import DescriptorChain
from virtwire.virtio.packed_ring import PackedQueue
from virtwire.virtio.split_ring import SplitQueue

log = logging.getLogger(__name__)

__all__ = ["load", "TxStop", "RxStop", "TX_STOPS", "RX_STOPS", "GuestView", "guest_view",
           "tx_burst", "tx_stop", "NativeRx", "RxStash", "rx_filter_struct", "RX_MAXC", "RX_MAXS",
           "RX_MAC_MAX", "SigbusGuard", "sigbus_guard"]

_SRC = Path(__file__).resolve().parent.parent / "_native" / "vwnet.c"
_lib: Any = None
_tried = False


class VwRegion(ctypes.Structure):
    _fields_ = [("gpa", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("host", ctypes.c_void_p)]


class VwSplit(ctypes.Structure):
    _fields_ = [("desc", ctypes.c_void_p), ("avail", ctypes.c_void_p),
                ("used", ctypes.c_void_p), ("size", ctypes.c_uint32),
                ("next_avail", ctypes.c_uint16), ("next_used", ctypes.c_uint16)]


class VwPacked(ctypes.Structure):
    _fields_ = [("desc", ctypes.c_void_p), ("size", ctypes.c_uint32),
                ("next_avail", ctypes.c_uint16), ("avail_wrap", ctypes.c_uint16),
                ("inflight", ctypes.c_uint32)]


class VwResult(ctypes.Structure):
    _fields_ = [("frames", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
                ("errors", ctypes.c_uint64), ("gso", ctypes.c_uint64),
                ("stop", ctypes.c_int32)]


RX_MAXC = 1024  # stash chains (vwnet.c RX_MAXC)
RX_MAXS = 4096  # stash segments (vwnet.c RX_MAXS)


class VwRxStash(ctypes.Structure):
    """RX chains popped but not yet used (rings of chains and of their writable segments)."""

    _fields_ = [("c_start", ctypes.c_uint32), ("c_count", ctypes.c_uint32),
                ("s_start", ctypes.c_uint32), ("s_count", ctypes.c_uint32),
                ("cap", ctypes.c_uint64),
                ("head", ctypes.c_uint16 * RX_MAXC), ("seg0", ctypes.c_uint32 * RX_MAXC),
                ("nseg", ctypes.c_uint32 * RX_MAXC), ("ccap", ctypes.c_uint32 * RX_MAXC),
                ("ndesc", ctypes.c_uint16 * RX_MAXC),
                ("gpa", ctypes.c_uint64 * RX_MAXS), ("len", ctypes.c_uint32 * RX_MAXS)]


RX_MAC_MAX = 64  # vwnet.c RX_MAC_MAX (= net/ctrl.py MAC_TABLE_MAX)


class VwRxFilter(ctypes.Structure):
    """The guest's RX filter state (vwnet.c vw_rxfilter)."""

    _fields_ = [("active", ctypes.c_uint8), ("vlan", ctypes.c_uint8),
                ("mac_check", ctypes.c_uint8), ("nobcast", ctypes.c_uint8),
                ("nomulti", ctypes.c_uint8), ("multi_all", ctypes.c_uint8),
                ("nouni", ctypes.c_uint8), ("uni_all", ctypes.c_uint8),
                ("mac", ctypes.c_uint8 * 6), ("n_uc", ctypes.c_uint16), ("n_mc", ctypes.c_uint16),
                ("uc", ctypes.c_uint8 * (6 * RX_MAC_MAX)),
                ("mc", ctypes.c_uint8 * (6 * RX_MAC_MAX)),
                ("vlans", ctypes.c_uint8 * 512)]


class VwPackedRx(ctypes.Structure):
    """A packed ring's device-side positions for the RX burst (vwnet.c vw_packed_rx)."""

    _fields_ = [("desc", ctypes.c_void_p), ("size", ctypes.c_uint32),
                ("next_avail", ctypes.c_uint16), ("avail_wrap", ctypes.c_uint16),
                ("next_used", ctypes.c_uint16), ("used_wrap", ctypes.c_uint16),
                ("inflight", ctypes.c_uint32), ("have_first", ctypes.c_int32),
                ("first_slot", ctypes.c_uint16), ("first_flags", ctypes.c_uint16)]


class VwRxResult(ctypes.Structure):
    _fields_ = [("frames", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
                ("chains", ctypes.c_uint64), ("popped", ctypes.c_uint64),
                ("staged", ctypes.c_uint64), ("reads", ctypes.c_uint64),
                ("read_bytes", ctypes.c_uint64), ("errors", ctypes.c_uint64),
                ("gso", ctypes.c_uint64), ("overflow", ctypes.c_uint64),
                ("truncated", ctypes.c_uint64), ("runt", ctypes.c_uint64),
                ("filtered", ctypes.c_uint64),
                ("pending", ctypes.c_int64), ("stop", ctypes.c_int32), ("err", ctypes.c_int32)]


def _private_dir(d: Path) -> Path | None:
    """``d`` if it is (or could be made) a real directory of ours with mode 0700, else None.

    The helper is loaded into a process that may run as root: a directory another user owns or
    can write, or a symlink, could hold a planted library (issue 14, defect 8)."""
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return None
        if st.st_mode & 0o077:
            os.chmod(d, 0o700, follow_symlinks=False)
        return d
    except (OSError, NotImplementedError):
        return None


def _cache_dir() -> Path | None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = _private_dir(Path(base) / "virtwire" / "native")
    if d is None:
        d = _private_dir(Path(tempfile.gettempdir()) / f"virtwire-native-{os.getuid()}")
    if d is None:
        log.warning("no private cache directory for the native helper: using the Python path")
    return d


def _trusted_file(p: Path) -> bool:
    """A regular file (not a symlink) we own, writable by nobody else."""
    try:
        st = os.lstat(p)
    except OSError:
        return False
    return (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & 0o022)


def load() -> Any:
    """The loaded helper library, or None (no compiler, disabled, or build failed)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("VIRTWIRE_NATIVE", "1") == "0":
        return None
    try:
        src = _SRC.read_bytes()
        # VIRTWIRE_NATIVE_CFLAGS: extra compiler flags (CI builds the helper with
        # -fsanitize=address,undefined and runs the native tests with libasan preloaded).
        extra = os.environ.get("VIRTWIRE_NATIVE_CFLAGS", "").split()
        tag = hashlib.sha256(src + " ".join(extra).encode()).hexdigest()[:16]
        cache = _cache_dir()
        if cache is None:
            return None
        so = cache / f"vwnet-{tag}.so"
        if os.path.lexists(so) and not _trusted_file(so):
            log.warning("%s is not a file only we can write: using the Python path", so)
            return None
        if not so.exists():
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            cc = os.environ.get("CC", "cc")
            r = subprocess.run([cc, "-O2", "-shared", "-fPIC", *extra, "-o", str(tmp), str(_SRC)],
                               capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                log.info("native helper not built (%s): using the pure-Python path",
                         r.stderr.strip().splitlines()[-1:] or r.returncode)
                return None
            os.replace(tmp, so)
        lib = ctypes.CDLL(str(so))
        lib.vw_split_tx_burst.restype = ctypes.c_int
        lib.vw_split_tx_burst.argtypes = [ctypes.POINTER(VwSplit), ctypes.POINTER(VwRegion),
                                          ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_int, ctypes.c_int, ctypes.c_uint64,
                                          ctypes.c_int, ctypes.POINTER(VwResult)]
        lib.vw_packed_tx_pop.restype = ctypes.c_int
        lib.vw_packed_tx_pop.argtypes = [ctypes.POINTER(VwPacked), ctypes.POINTER(VwRegion),
                                         ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                         ctypes.c_int, ctypes.c_int, ctypes.c_uint64,
                                         ctypes.c_int, ctypes.POINTER(ctypes.c_uint16),
                                         ctypes.POINTER(ctypes.c_uint16),
                                         ctypes.POINTER(VwResult)]
        lib.vw_split_rx_burst.restype = ctypes.c_int
        lib.vw_split_rx_burst.argtypes = [ctypes.POINTER(VwSplit), ctypes.POINTER(VwRegion),
                                          ctypes.c_int, ctypes.POINTER(VwRxStash), ctypes.c_int,
                                          ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                                          ctypes.c_uint32, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_uint16, ctypes.POINTER(VwRxFilter),
                                          ctypes.POINTER(VwRxResult)]
        lib.vw_packed_rx_burst.restype = ctypes.c_int
        lib.vw_packed_rx_burst.argtypes = [ctypes.POINTER(VwPackedRx), ctypes.POINTER(VwRegion),
                                           ctypes.c_int, ctypes.POINTER(VwRxStash), ctypes.c_int,
                                           ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                                           ctypes.c_uint32, ctypes.c_int, ctypes.c_int,
                                           ctypes.POINTER(VwRxFilter),
                                           ctypes.POINTER(VwRxResult)]
        lib.vw_guard_add.restype = ctypes.c_int
        lib.vw_guard_add.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64]
        lib.vw_guard_faults.restype = ctypes.c_uint64
        lib.vw_guard_faults.argtypes = [ctypes.c_int]
        lib.vw_guard_remove.restype = None
        lib.vw_guard_remove.argtypes = [ctypes.c_int]
        _lib = lib
    except (OSError, subprocess.SubprocessError) as e:
        log.info("native helper unavailable (%s): using the pure-Python path", e)
        _lib = None
    return _lib


class SigbusGuard:
    """``memory.MemoryGuard`` over the helper's SIGBUS guard (vwnet.c, end of file)."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib

    def add(self, addr: int, length: int, align: int) -> int | None:
        slot = self._lib.vw_guard_add(addr, length, align)
        return None if slot < 0 else int(slot)

    def faults(self, slot: int) -> int:
        return int(self._lib.vw_guard_faults(slot))

    def remove(self, slot: int) -> None:
        self._lib.vw_guard_remove(slot)


def sigbus_guard() -> SigbusGuard | None:
    """The process's SIGBUS guard for peers' memory, or None without the helper."""
    lib = load()
    return None if lib is None else SigbusGuard(lib)


class GuestView:
    """Host addresses of a ``RegionMemory``'s regions, valid while this object lives."""

    def __init__(self, mem: Any) -> None:
        regions = list(mem.regions)
        self._keep = []
        self.table = (VwRegion * max(1, len(regions)))()
        self.n = len(regions)
        for i, r in enumerate(regions):
            buf = (ctypes.c_char * r.size).from_buffer(r.buf)
            self._keep.append(buf)
            self.table[i] = VwRegion(r.gpa, r.size, ctypes.addressof(buf))

    def host(self, gpa: int, n: int) -> int:
        for i in range(self.n):
            r = self.table[i]
            if r.gpa <= gpa and gpa + n <= r.gpa + r.size:
                return r.host + (gpa - r.gpa)
        raise ValueError(f"{gpa:#x}+{n} not in guest RAM")

    def release(self) -> None:
        self._keep.clear()


def guest_view(mem: Any) -> tuple[GuestView, bool]:
    """``mem``'s ``GuestView`` and whether the caller must ``release()`` it after the call.

    A ``RegionMemory`` keeps one per region set (``derived``: dropped, and its exports released,
    before a region is added or removed), so a burst does not rebuild it; another memory gets a
    view for the call only.
    """
    derived = getattr(mem, "derived", None)
    if derived is not None:
        return derived("native.GuestView", GuestView), False
    return GuestView(mem), True


class TxStop(IntEnum):
    """Why a TX burst stopped (vwnet.c ``vw_result.stop``)."""

    EMPTY = 0  # ring empty or budget reached
    CHAIN = 1  # a chain C does not take: Python checks it next
    BACKEND_FULL = 2
    BAD_RING = 3  # left to Python, which reports it


class RxStop(IntEnum):
    """Why an RX burst stopped (vwnet.c ``vw_rxres.stop``)."""

    EMPTY = 0  # the backend has no more frames
    CHAIN = 1  # an unusual chain or batch: the stash goes to Python, which goes on from there
    NO_BUFFERS = 2
    LIMIT = 3
    FRAME_LEFT = 4  # a frame read whose tail needs more buffers: Python finishes it


TX_STOPS = tuple(TxStop)  # by code
RX_STOPS = tuple(RxStop)


def tx_burst(lib: Any, q: SplitQueue | PackedQueue, mem: GuestMemory, *, hdr_len: int, fd: int,
             keep_hdr: bool, budget: int, features: int) -> tuple[int, VwResult | None]:
    """Pop, check and send each simple TX chain in C; ``(chains, result)`` (``result`` None
    when nothing ran). Split rings: C writes and publishes the used elements; packed rings: C
    pops, the used side goes through ``push_batch`` and ``publish`` here."""
    if isinstance(q, PackedQueue):
        return _tx_burst_packed(lib, q, mem, hdr_len, fd, keep_hdr, budget, features)
    pos = q.positions()
    if pos.in_flight or not q.has_available(mem):
        return 0, None
    gv, own = guest_view(mem)
    try:
        size = q.size
        ring = VwSplit(gv.host(q.desc_addr, 16 * size), gv.host(q.avail_addr, 6 + 2 * size),
                       gv.host(q.used_addr, 6 + 8 * size), size, pos.next_avail, pos.next_used)
        res = VwResult()
        n = lib.vw_split_tx_burst(ctypes.byref(ring), gv.table, gv.n, hdr_len, fd,
                                  int(keep_hdr), budget, features, int(q.indirect),
                                  ctypes.byref(res))
    except ValueError:
        return 0, None
    finally:
        if own:
            gv.release()
    if n:
        pos.next_avail, pos.next_used = ring.next_avail, ring.next_used
        q.adopt(pos)
    return n, res


def _tx_burst_packed(lib: Any, q: PackedQueue, mem: GuestMemory, hdr_len: int, fd: int,
                     keep_hdr: bool, lim: int, features: int) -> tuple[int, VwResult | None]:
    if not q.has_available(mem):
        return 0, None
    ids = (ctypes.c_uint16 * lim)()
    nds = (ctypes.c_uint16 * lim)()
    pos = q.positions()
    gv, own = guest_view(mem)
    try:
        ring = VwPacked(gv.host(q.desc_addr, 16 * q.size), q.size, pos.next_avail,
                        pos.avail_wrap, pos.in_flight)
        res = VwResult()
        n = lib.vw_packed_tx_pop(ctypes.byref(ring), gv.table, gv.n, hdr_len, fd,
                                 int(keep_hdr), lim, features, int(q.indirect), ids, nds,
                                 ctypes.byref(res))
    except ValueError:
        return 0, None
    finally:
        if own:
            gv.release()
    if n:
        pos.next_avail, pos.avail_wrap, pos.in_flight = (ring.next_avail, ring.avail_wrap,
                                                         ring.inflight)
        q.adopt(pos)
        q.push_batch(mem, [(DescriptorChain(head=ids[i], ring_descs=nds[i]), 0)
                           for i in range(n)])
        # Visible now: a malformed chain met next must not strand these (NEEDS_RESET).
        q.publish(mem)
    return n, res


def tx_stop(res: VwResult | None) -> TxStop:
    return TX_STOPS[res.stop] if res is not None else TxStop.EMPTY


class RxStash:
    """The C side's stash of popped RX chains (``VwRxStash``), one per queue pair.

    At most one of this and the pair's Python stash holds chains at any time: ``spill`` hands
    the chains to Python, ``load`` takes plain ones from it."""

    __slots__ = ("st", "ring")

    def __init__(self) -> None:
        self.st = VwRxStash()
        # The split ring struct for the current guest view and ring addresses:
        # ``(view, desc, avail, used, size, struct)`` (the view held, so identity is exact).
        self.ring: tuple[Any, ...] | None = None

    @property
    def c_count(self) -> int:
        return int(self.st.c_count)

    def clear(self) -> None:
        st = self.st
        st.c_start = st.c_count = st.s_start = st.s_count = st.cap = 0

    def spill(self) -> list[DescriptorChain]:
        """The stashed chains (already popped, in ring order), leaving the C stash empty."""
        st = self.st
        out: list[DescriptorChain] = []
        for i in range(st.c_count):
            ci = (st.c_start + i) & (RX_MAXC - 1)
            s0 = st.seg0[ci]
            segs = [(st.gpa[(s0 + j) & (RX_MAXS - 1)], st.len[(s0 + j) & (RX_MAXS - 1)], True)
                    for j in range(st.nseg[ci])]
            out.append(DescriptorChain(head=st.head[ci], segments=segs, writable_len=st.ccap[ci],
                                       ring_descs=st.ndesc[ci]))
        self.clear()
        return out

    def load(self, chains: Sequence[DescriptorChain], cap: int) -> bool:
        """Take ``chains`` (``cap`` bytes) when every one is plain (writable segments only,
        within the C stash's room); False leaves them with the caller."""
        st = self.st
        if st.c_count or len(chains) > RX_MAXC:
            return False
        nsegs = 0
        for c in chains:
            for _g, n, w in c.segments:
                if not w:
                    return False
                nsegs += n > 0
        if nsegs > RX_MAXS:
            return False
        k = 0
        for i, c in enumerate(chains):
            st.head[i] = c.head
            st.seg0[i] = k
            st.ccap[i] = c.writable_len
            st.ndesc[i] = c.ring_descs
            for g, n, _w in c.segments:
                if n:
                    st.gpa[k] = g
                    st.len[k] = n
                    k += 1
            st.nseg[i] = k - st.seg0[i]
        st.c_start = st.s_start = 0
        st.c_count = len(chains)
        st.s_count = k
        st.cap = cap
        return True


class NativeRx:
    """The RX burst's ctypes objects for one device: its result struct and the overflow area
    (exported to C for the device's life; the bytearray is never resized)."""

    def __init__(self, lib: Any, bounce: bytearray) -> None:
        self.lib = lib
        self.res = VwRxResult()
        self.res_ref = ctypes.byref(self.res)
        # SAFETY: ``bounce`` is created once by the device and only written into.
        self._bounce = (ctypes.c_char * len(bounce)).from_buffer(bounce)
        self._bounce_addr = ctypes.addressof(self._bounce)
        self._bounce_len = len(bounce)

    def burst(self, q: SplitQueue | PackedQueue, mem: GuestMemory, stash: RxStash, fd: int,
              hdr_len: int, window: int, clear_flags: bool, limit: int, cfilter: Any
              ) -> VwRxResult | None:
        """Frames from ``fd`` into mergeable RX chains in C (see vwnet.c); the ring adopts
        what C popped and staged. None: a ring outside guest RAM (left to Python)."""
        byref = ctypes.byref
        res = self.res
        pos = q.positions()
        packed = isinstance(q, PackedQueue)
        gv, own = guest_view(mem)
        try:
            size = q.size
            # SAFETY: the guest regions stay exported while the region set lasts.
            if packed:
                pring = VwPackedRx(gv.host(q.desc_addr, 16 * size), size, pos.next_avail,
                                   pos.avail_wrap, pos.next_used, pos.used_wrap, pos.in_flight,
                                   int(pos.staged_first is not None), 0, 0)
                self.lib.vw_packed_rx_burst(
                    byref(pring), gv.table, gv.n, byref(stash.st), fd, hdr_len, window,
                    self._bounce_addr, self._bounce_len, int(clear_flags), min(limit, 1 << 30),
                    byref(cfilter), self.res_ref)
            else:
                ring = self._split_ring(q, gv, own, stash, pos.next_avail, pos.next_used)
                self.lib.vw_split_rx_burst(
                    byref(ring), gv.table, gv.n, byref(stash.st), fd, hdr_len, window,
                    self._bounce_addr, self._bounce_len, int(clear_flags), min(limit, 1 << 30),
                    pos.staged, byref(cfilter), self.res_ref)
        except ValueError:
            return None
        finally:
            if own:
                gv.release()
        # C popped ``popped`` chains and wrote ``staged`` used elements after the ones already
        # staged, exactly as pop_batch/push would (packed: the first element's flags, held
        # back, are stored by publish).
        if packed:
            pos.next_avail, pos.avail_wrap = pring.next_avail, pring.avail_wrap
            pos.next_used, pos.used_wrap = pring.next_used, pring.used_wrap
            pos.in_flight = pring.inflight
            if pring.have_first and pos.staged_first is None:
                pos.staged_first = (pring.first_slot, pring.first_flags)
        else:
            pos.next_avail = ring.next_avail
            pos.in_flight += res.popped - res.staged
        pos.staged += res.staged
        q.adopt(pos)
        return res

    @staticmethod
    def _split_ring(q: SplitQueue, gv: GuestView, own: bool, stash: RxStash, next_avail: int,
                    next_used: int) -> VwSplit:
        size = q.size
        cr = stash.ring
        if cr is not None and cr[0] is gv and cr[1:5] == (q.desc_addr, q.avail_addr,
                                                           q.used_addr, size):
            ring: VwSplit = cr[5]
            ring.next_avail, ring.next_used = next_avail, next_used
            return ring
        ring = VwSplit(gv.host(q.desc_addr, 16 * size), gv.host(q.avail_addr, 6 + 2 * size),
                       gv.host(q.used_addr, 6 + 8 * size), size, next_avail, next_used)
        # (kept only with a view kept per region set, never one released after the call)
        stash.ring = None if own else (gv, q.desc_addr, q.avail_addr, q.used_addr, size, ring)
        return ring


def rx_filter_struct(*, active: bool, vlan: bool, mac_check: bool, nobcast: bool,
                     nomulti: bool, nouni: bool, multi_all: bool, uni_all: bool, mac: bytes,
                     uc: Sequence[bytes], mc: Sequence[bytes], vlans: Sequence[int]
                     ) -> VwRxFilter:
    """The C form of a receive filter (vwnet.c ``vw_rxfilter``)."""
    f = VwRxFilter()
    f.active, f.vlan, f.mac_check = int(active), int(vlan), int(mac_check)
    f.nobcast, f.nomulti, f.nouni = int(nobcast), int(nomulti), int(nouni)
    f.multi_all, f.uni_all = int(multi_all), int(uni_all)
    f.mac[:] = list(mac)
    for table, arr, n in ((uc, f.uc, "n_uc"), (mc, f.mc, "n_mc")):
        macs = sorted(table)[:RX_MAC_MAX]
        setattr(f, n, len(macs))
        for i, m in enumerate(macs):
            arr[6 * i : 6 * i + 6] = list(m)
    for vid in vlans:
        if 0 <= vid < 4096:
            f.vlans[vid >> 3] |= 1 << (vid & 7)
    return f
