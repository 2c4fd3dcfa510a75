"""Optional native batch helpers (a small C file built on first use with the system compiler).

Theory of operation
-------------------
``vwnet.c`` holds the TX and RX fast paths (split and packed rings) of the virtio-net device
(see the comments in it).
``load()`` compiles it once into a per-user cache directory (keyed by a hash of the source)
and loads it with ctypes; without a compiler, or with ``VIRTWIRE_NATIVE=0``, it returns None and
the device uses its pure-Python path, which the test suite always covers as well.

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
import subprocess
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["load", "VwRegion", "VwSplit", "VwPacked", "VwResult", "VwRxStash", "VwRxResult",
           "VwRxFilter", "VwPackedRx", "RX_MAXC", "RX_MAXS", "GuestView"]

_SRC = Path(__file__).with_name("vwnet.c")
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


RX_MAC_MAX = 64  # vwnet.c RX_MAC_MAX (= net/device.py MAC_TABLE_MAX)


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


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = Path(base) / "virtwire"
    try:
        d.mkdir(parents=True, exist_ok=True)
        return d
    except OSError:
        d = Path(tempfile.gettempdir()) / f"virtwire-native-{os.getuid()}"
        d.mkdir(mode=0o700, exist_ok=True)
        return d


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
        tag = hashlib.sha256(src).hexdigest()[:16]
        so = _cache_dir() / f"vwnet-{tag}.so"
        if not so.exists():
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            cc = os.environ.get("CC", "cc")
            r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(_SRC)],
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
        _lib = lib
    except (OSError, subprocess.SubprocessError) as e:
        log.info("native helper unavailable (%s): using the pure-Python path", e)
        _lib = None
    return _lib


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
