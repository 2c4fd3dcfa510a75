"""``tap`` backend: a Linux TAP device, zero-copy ``readv``/``writev`` on guest buffers.

Theory of operation
-------------------
The TAP is opened from ``/dev/net/tun`` with ``TUNSETIFF`` (``IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR``, plus ``IFF_MULTI_QUEUE`` when the device has several queue pairs: each pair opens
its own fd on the same interface). The name is created when missing (gone again when the last fd
closes, unless someone made it persistent) and attached to when it exists ("create or attach").

Because of IFF_VNET_HDR every frame read or written starts with a ``virtio_net_hdr`` of the size
set by ``TUNSETVNETHDRSZ`` -- exactly the guest's header (10 or 12 bytes), so a guest TX chain is
handed to ``os.writev`` unchanged (header and frame straight from the descriptor views) and an RX
frame is ``os.readv``-ed straight into the guest's writable buffers. tun ignores ``num_buffers``
on write and leaves it untouched on read; the device fills it in.

``TUNSETOFFLOAD`` says what the *reader* (the guest) can take: TUN_F_CSUM for GUEST_CSUM,
TUN_F_TSO4/6 for GUEST_TSO4/6, TUN_F_TSO_ECN for GUEST_ECN, TUN_F_UFO for GUEST_UFO. Without
them the kernel finishes checksums and segments before the frame reaches us. Writes may carry
any GSO type (the kernel validates the header itself; a refused frame is an ``EINVAL`` we count).

The fd is non-blocking: a read with nothing pending is ``BlockingIOError`` (returns 0), a write
the kernel cannot queue now is back-pressure (``send`` returns the frames taken so far).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import TypeVar

from virtwire.backends.base import Frame, readv_frame
from virtwire.net.backend import count_into
from virtwire.netns import TapError, run_in_netns
from virtwire.virtio.spec import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    bit,
)

__all__ = ["TapBackend", "TapError", "tun_offload_flags", "in_netns"]

log = logging.getLogger(__name__)

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
# linux/sockios.h, linux/if.h
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16
CLONE_NEWNET = 0x40000000

_T = TypeVar("_T")

_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags (union, 24 bytes)


def tun_offload_flags(features: int) -> int:
    """TUNSETOFFLOAD flags for what the guest negotiated to receive (GUEST_* features)."""
    f = 0
    if features >> VIRTIO_NET_F_GUEST_CSUM & 1:
        f |= TUN_F_CSUM
        # tun refuses TSO/UFO flags without CSUM; GUEST_TSO* require GUEST_CSUM (§5.1.3.1).
        if features >> VIRTIO_NET_F_GUEST_TSO4 & 1:
            f |= TUN_F_TSO4
        if features >> VIRTIO_NET_F_GUEST_TSO6 & 1:
            f |= TUN_F_TSO6
        if f & (TUN_F_TSO4 | TUN_F_TSO6) and features >> VIRTIO_NET_F_GUEST_ECN & 1:
            f |= TUN_F_TSO_ECN
        if features >> VIRTIO_NET_F_GUEST_UFO & 1:
            f |= TUN_F_UFO
    return f


def _set_link_up(ifname: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = _IFREQ.pack(ifname.encode(), 0)
        flags = _IFREQ.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, _IFREQ.pack(ifname.encode(), flags | IFF_UP))


def in_netns(netns: str | None, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` inside network namespace ``netns`` (``/run/netns/NAME``), or here if None."""
    return run_in_netns(netns, fn, TapError)


class TapBackend:
    """One queue of a TAP interface (see module docstring).

    ``multi_queue`` must be the same for every fd of one interface (the kernel refuses a mix).
    ``up`` brings the link up after creating it. ``fd`` adopts an already-open TAP fd (e.g.
    passed by libvirt) instead of opening one. ``netns`` names a network namespace
    (``ip netns``) to create or attach the TAP in.
    """

    vnet_hdr = True
    host_offloads = bit(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
                        VIRTIO_NET_F_HOST_ECN)

    def __init__(self, ifname: str, *, multi_queue: bool = False, up: bool = True,
                 fd: int | None = None, netns: str | None = None) -> None:
        if not ifname or len(ifname.encode()) >= IFNAMSIZ or "/" in ifname:
            raise TapError(f"bad interface name {ifname!r} (1..15 bytes, no '/')")
        self.ifname = ifname
        self.name = f"tap:{ifname}"
        self.multi_queue = multi_queue
        self.netns = netns
        self.hdr_len = 12
        self.offload_flags = 0
        self.enabled = True
        self.counters: dict[str, int] = {"tx_frames": 0, "tx_bytes": 0, "rx_frames": 0,
                                         "rx_bytes": 0, "tx_errors": 0, "tx_eagain": 0,
                                         "rx_errors": 0}
        if fd is not None:
            self.fd = fd
            os.set_blocking(fd, False)
            self._check_adopted()
        else:
            self.fd = in_netns(netns, self._open)
        try:
            self._ioctl_int(TUNSETVNETHDRSZ, self.hdr_len, "TUNSETVNETHDRSZ")
            self._ioctl_int(TUNSETOFFLOAD, 0, "TUNSETOFFLOAD")
            if up:
                try:
                    in_netns(netns, lambda: _set_link_up(ifname))
                except OSError as e:
                    raise TapError(f"cannot bring {ifname} up: {e.strerror}") from None
        except TapError:
            self.close()
            raise

    def _open(self) -> int:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(f"cannot open /dev/net/tun: {e.strerror}") from None
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        if self.multi_queue:
            flags |= IFF_MULTI_QUEUE
        try:
            fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(self.ifname.encode(), flags))
        except OSError as e:
            os.close(fd)
            hint = ""
            if e.errno == errno.EINVAL:
                hint = (" (the interface exists with other flags: TUN vs TAP, or "
                        "multi-queue mismatch)")
            elif e.errno == errno.EPERM:
                hint = " (needs CAP_NET_ADMIN, or the TAP belongs to another user)"
            elif e.errno == errno.EBUSY:
                hint = " (already attached by another process and not multi-queue)"
            raise TapError(f"TUNSETIFF {self.ifname}: {e.strerror}{hint}") from None
        return fd

    def _check_adopted(self) -> None:
        try:
            buf = fcntl.ioctl(self.fd, TUNGETIFF, bytes(40))
        except OSError as e:
            raise TapError(f"fd {self.fd} is not a TAP: {e.strerror}") from None
        _name, flags = _IFREQ.unpack(buf[: _IFREQ.size])
        if not flags & IFF_TAP or not flags & IFF_VNET_HDR or not flags & IFF_NO_PI:
            raise TapError(f"fd {self.fd}: TAP lacks IFF_TAP|IFF_NO_PI|IFF_VNET_HDR "
                           f"(flags {flags:#x})")

    def _ioctl_int(self, req: int, value: int, what: str) -> None:
        # TUNSETVNETHDRSZ reads an int through a pointer; TUNSETOFFLOAD takes the value itself.
        arg: int | bytes = value if req == TUNSETOFFLOAD else struct.pack("i", value)
        try:
            fcntl.ioctl(self.fd, req, arg)
        except OSError as e:
            raise TapError(f"{what}({value:#x}) on {self.ifname}: {e.strerror}") from None

    # -- NetBackend --------------------------------------------------------------------------
    def fileno(self) -> int:
        return self.fd

    def native_fd(self) -> int | None:
        """For the device's C fast paths: frames are written to and read from this fd (header
        kept; ``NetBackend.native_fd``)."""
        return self.fd if self.fd >= 0 else None

    def drain_wakeup(self) -> None:
        """Nothing to clear: the TAP fd is readable exactly while frames are queued."""

    def count_native(self, *, tx_frames: int = 0, tx_bytes: int = 0, tx_errors: int = 0,
                     rx_frames: int = 0, rx_bytes: int = 0, rx_errors: int = 0) -> None:
        count_into(self.counters, tx_frames=tx_frames, tx_bytes=tx_bytes, tx_errors=tx_errors,
                   rx_frames=rx_frames, rx_bytes=rx_bytes, rx_errors=rx_errors)

    def configure(self, features: int, hdr_len: int) -> None:
        """Header size = the guest's; offloads = what the guest can receive."""
        if hdr_len != self.hdr_len:
            self._ioctl_int(TUNSETVNETHDRSZ, hdr_len, "TUNSETVNETHDRSZ")
            self.hdr_len = hdr_len
        flags = tun_offload_flags(features)
        if flags != self.offload_flags:
            self._ioctl_int(TUNSETOFFLOAD, flags, "TUNSETOFFLOAD")
            self.offload_flags = flags

    def set_enabled(self, enabled: bool) -> None:
        """Attach/detach this queue (MQ): the kernel steers no frames to a detached queue."""
        if not self.multi_queue or enabled == self.enabled:
            self.enabled = enabled
            return
        flag = IFF_ATTACH_QUEUE if enabled else IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(self.fd, TUNSETQUEUE, _IFREQ.pack(b"", flag))
        except OSError as e:
            log.warning("%s: TUNSETQUEUE %s: %s", self.name,
                        "attach" if enabled else "detach", e.strerror)
            return
        self.enabled = enabled

    def send(self, frames: Sequence[Frame]) -> int:
        """``writev`` each frame (header + data views as they sit in guest memory)."""
        c = self.counters
        fd = self.fd
        writev = os.writev
        done = 0
        ok = 0
        nbytes = 0
        for f in frames:
            try:
                nbytes += writev(fd, f)
                ok += 1
            except BlockingIOError:
                c["tx_eagain"] += 1
                break
            except OSError as e:
                # EINVAL: the kernel refused the virtio_net_hdr (virtio_net_hdr_to_skb) or a
                # malformed frame; EIO: the link is down. The frame is dropped, counted.
                c["tx_errors"] += 1
                if c["tx_errors"] & (c["tx_errors"] - 1) == 0:
                    log.warning("%s: write refused: %s (%d so far)", self.name, e.strerror,
                                c["tx_errors"])
            done += 1
        c["tx_frames"] += ok
        c["tx_bytes"] += nbytes
        return done

    def recv(self, bufs: Sequence[memoryview]) -> int:
        """``readv`` one frame (header first) straight into ``bufs``; 0 when none pending."""
        return readv_frame(self.fd, bufs, self.counters, self.name, log)

    def pending_len(self) -> int | None:
        return None

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def __repr__(self) -> str:
        return f"TapBackend({self.ifname!r}, fd={self.fd})"
