"""``switch`` backend: a learning L2 switch inside one process joining several device ports.

Theory of operation
-------------------
``L2Switch`` owns a forwarding database (FDB: source MAC -> port, with a last-seen time) and a
set of ports. Each ``SwitchPort`` is the ``NetBackend`` of one virtio-net device (a vhost-user
port of ``virtwire serve``); an optional TAP uplink joins the host's network (IEEE 802.1D
learning bridge behaviour, without spanning tree -- a single switch cannot loop by itself).

Forwarding, per TX batch of a port: learn each frame's source MAC on the ingress port (never a
group address); look the destination up; a known unicast goes to its port unless that is the
ingress port (then it is filtered); unknown unicast, multicast and broadcast are flooded to every
other port. FDB entries older than ``aging`` seconds are ignored and replaced (lazy aging; 300 s
as 802.1D's default). A frame is copied once out of the sender's guest memory (its buffers are
returned to the guest right after); the copy is queued on each egress port (bounded by
``queue_limit``; overflow is a counted drop) and each egress port is woken once per batch.

VLANs (``netlab/vlan.py``): a port may be an access port (``set_vlans(N)``) or an 802.1Q trunk
(``set_vlans(native, {A, B})``), and so may the uplink (``set_uplink_vlans``). As soon as one is,
the switch forwards per VLAN (``vlan_forward``): a frame is classified on ingress (its tag is
removed), learnt and looked up in its VLAN's part of the FDB, and delivered only to ports of that
VLAN, tagged where the egress port is a trunk of it. Ports without VLAN settings form the
untagged domain 0 among themselves, as before.

Queue pairs: a port made with ``queues=N`` (``port.queues``; the port itself is pair 0) is one
identity on the switch -- frames sent on any pair are learnt on the port -- while its RX is
spread over its enabled pairs by a flow hash (``netlab/rss.py``, as a NIC's RSS), so a flow
stays on one queue; each pair (``SwitchQueue``) has its own RX queue and wake-up eventfd.

Readiness: each queue's ``fileno()`` is an epoll fd holding the port's wake-up eventfd and, with
an uplink, the uplink TAP's fd, so a host's event loop that watches every port fd (as
``virtwire serve`` does) also learns when the uplink has frames: serving any port first drains
the uplink (``drain_wakeup`` -> ``poll_uplink``), which queues those frames on their ports.

Offloads travel with the frame, as between two TAPs on a Linux bridge: a port takes checksum
and TCP segmentation offload from its guest (CSUM, HOST_TSO4/6/ECN), so a guest sends 64 KiB TCP
super-frames. Each egress adapts: a guest that negotiated the matching GUEST_* offloads gets
the frame as it is; otherwise the switch segments it (``header.gso_segment``) and/or completes
its checksum in software. The uplink TAP takes everything as is (its kernel side handles it).
"""

from __future__ import annotations

import logging
import select
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from virtwire.backends.base import BackendBase, Frame
from virtwire.net.header import (
    ETH_HLEN,
    MAX_FRAME,
    GsoError,
    VirtioNetHdr,
    finish_checksum,
    gso_segment,
    scatter,
)
from virtwire.netlab import rss
from virtwire.netlab import vlan as vl
from virtwire.virtio.spec import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    bit,
)

__all__ = ["L2Switch", "SwitchPort", "SwitchQueue", "Switch"]

log = logging.getLogger(__name__)

# A queued frame: (flags, gso_type, gso_size, hdr_len, csum_start, csum_offset, frame bytes).
_Item = tuple[int, int, int, int, int, int, bytes]
_GSO_NEEDS = {VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_GUEST_TSO4,
              VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_GUEST_TSO6}


class SwitchQueue(BackendBase):
    """One queue pair of a ``SwitchPort``: the backend of that pair of the port's device.

    TX from any queue enters the switch as the port (one identity, one FDB entry per MAC); RX
    frames are queued here by the port's flow hash (``SwitchPort.enqueue``), each queue with its
    own wake-up eventfd."""

    vnet_hdr = True
    host_offloads = bit(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
                        VIRTIO_NET_F_HOST_ECN)

    def __init__(self, port: SwitchPort, switch: L2Switch, index: int) -> None:
        super().__init__(f"switch:{switch.name}:{port.port_name}" + (f".{index}" if index else ""))
        self.port = port
        self.switch = switch
        self.index = index
        self.rx: deque[_Item] = deque()
        self.counters.update({"rx_queue_drops": 0, "tx_bad": 0, "gso_segmented": 0,
                              "gso_errors": 0, "vlan_drops": 0})
        self.guest_csum = False
        self._ep: select.epoll | None = None

    def fileno(self) -> int | None:
        """An epoll fd: this queue's wake-up eventfd plus the uplink TAP (module docstring)."""
        if self._ep is None:
            efd = super().fileno()
            self._ep = select.epoll()
            self._ep.register(efd, select.EPOLLIN)
            up = self.switch.uplink_fileno()
            if up is not None:
                self._ep.register(up, select.EPOLLIN)
        return self._ep.fileno()

    def watch_uplink(self, fd: int) -> None:
        if self._ep is not None:
            self._ep.register(fd, select.EPOLLIN)

    def drain_wakeup(self) -> None:
        super().drain_wakeup()
        if self.switch.uplink is not None:
            self.switch.poll_uplink(skip_wake=self)

    def configure(self, features: int, hdr_len: int) -> None:
        super().configure(features, hdr_len)
        self.guest_csum = bool(features >> VIRTIO_NET_F_GUEST_CSUM & 1)

    def set_enabled(self, enabled: bool) -> None:
        """A disabled queue takes no RX: what waits on it moves to the port's other queues."""
        super().set_enabled(enabled)
        if not enabled and self.rx and self.port.queues_enabled():
            moved, self.rx = self.rx, deque()
            for item in moved:
                self.port.enqueue(item)
            for q in self.port.queues:
                if q.rx and q is not self:
                    q.wake()

    def send(self, frames: Sequence[Frame]) -> int:
        hl = self.hdr_len
        items: list[_Item] = []
        c = self.counters
        for f in frames:
            data = b"".join(f)
            if len(data) < hl + ETH_HLEN:
                c["tx_bad"] += 1
                continue
            h = VirtioNetHdr.unpack(data, 10)
            items.append((h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM, h.gso_type, h.gso_size,
                          h.hdr_len, h.csum_start, h.csum_offset, data[hl:]))
            c["tx_frames"] += 1
            c["tx_bytes"] += len(data) - hl
        self.switch.forward(self.port, items)
        return len(frames)

    def _takes_gso(self, gso_type: int) -> bool:
        need = _GSO_NEEDS.get(gso_type & ~VIRTIO_NET_HDR_GSO_ECN)
        f = self.features
        if need is None or not f >> need & 1:
            return False
        return not gso_type & VIRTIO_NET_HDR_GSO_ECN or bool(f >> VIRTIO_NET_F_GUEST_ECN & 1)

    def take(self, item: _Item, tag: int = -1) -> bool:
        """Queue a frame for the guest on this queue; ``tag`` > 0: add that 802.1Q tag."""
        if item[1] and not self._takes_gso(item[1]):
            # This guest cannot receive the super-frame: cut it as a NIC would (TSO).
            h = VirtioNetHdr(flags=item[0], gso_type=item[1], gso_size=item[2],
                             hdr_len=item[3], csum_start=item[4], csum_offset=item[5])
            try:
                segs = gso_segment(item[6], h)
            except GsoError:
                self.counters["gso_errors"] += 1
                self.counters["drops"] += 1
                return False
            self.counters["gso_segmented"] += 1
            ok = False
            for sg in segs:
                seg: _Item = (0, 0, 0, 0, 0, 0, sg)
                ok = self._put(vl.insert(seg, tag) if tag > 0 else seg) or ok
            return ok
        return self._put(vl.insert(item, tag) if tag > 0 else item)

    def _put(self, item: _Item) -> bool:
        if len(self.rx) >= self.switch.queue_limit:
            self.counters["rx_queue_drops"] += 1
            self.counters["drops"] += 1
            return False
        self.rx.append(item)
        return True

    def pending_len(self) -> int | None:
        return self.hdr_len + len(self.rx[0][6]) if self.rx else 0

    def recv(self, bufs: Sequence[memoryview]) -> int:
        if not self.rx:
            return 0
        flags, gso_type, gso_size, hdr_len, cs, co, frame = self.rx.popleft()
        if flags and not self.guest_csum:
            fb = bytearray(frame)
            try:
                finish_checksum(fb, cs, co)
            except ValueError:
                self.counters["drops"] += 1
                return 0
            frame = bytes(fb)
            flags = 0
        hdr = VirtioNetHdr(flags=flags, gso_type=gso_type, hdr_len=hdr_len, gso_size=gso_size,
                           csum_start=cs if flags else 0, csum_offset=co if flags else 0,
                           num_buffers=1).pack(self.hdr_len)
        n = scatter(bufs, hdr) + scatter(bufs, frame, self.hdr_len)
        self.counters["rx_frames"] += 1
        self.counters["rx_bytes"] += len(frame)
        return n

    def close(self) -> None:
        if self._ep is not None:
            self._ep.close()
            self._ep = None
        super().close()


class SwitchPort(SwitchQueue):
    """One port of an ``L2Switch``: its identity on the switch, and the backend of its first
    queue pair; ``queues[i]`` is the backend of pair ``i`` (``SwitchQueue``)."""

    def __init__(self, switch: L2Switch, name: str, queues: int = 1) -> None:
        self.port_name = name
        super().__init__(self, switch, 0)
        self.vlans = vl.Membership()
        self.queues: list[SwitchQueue] = [self]
        self.queues += [SwitchQueue(self, switch, i) for i in range(1, queues)]

    def queues_enabled(self) -> list[SwitchQueue]:
        return [q for q in self.queues if q.enabled]

    @property
    def accepting(self) -> bool:
        """Does the port take frames (some queue pair enabled)?"""
        return any(q.enabled for q in self.queues)

    def set_vlans(self, vlan: int | None, trunk: frozenset[int] | None = None) -> None:
        """Access port of ``vlan``, or a trunk of ``trunk`` (``vlan``: its native VLAN)."""
        self.vlans = vl.Membership(vlan, frozenset(trunk or ()))
        self.switch.vlans_changed()

    def enqueue(self, item: _Item, tag: int = -1) -> SwitchQueue | None:
        """Queue a frame for this port's guest on the queue its flow hashes to (RSS); returns
        that queue (to be woken), None when it was dropped."""
        q: SwitchQueue = self
        if len(self.queues) > 1:
            live = self.queues_enabled() or self.queues
            q = live[rss.pick(item[6], len(live))]
        return q if q.take(item, tag) else None

    def port_stats(self) -> dict[str, Any]:
        """The port's counters summed over its queues (and per queue when there are several)."""
        total: dict[str, Any] = {}
        for q in self.queues:
            for k, v in q.counters.items():
                total[k] = total.get(k, 0) + v
        if len(self.queues) > 1:
            total["queues"] = [dict(q.counters) for q in self.queues]
        return total

    def close(self) -> None:
        self.switch.remove_port(self)
        super().close()


class _Uplink:
    """The TAP side of the switch: frames out with ``writev``, frames in by ``poll_uplink``."""

    def __init__(self, tap: Any) -> None:
        self.tap = tap
        self.port_name = "uplink"
        self.counters = {"tx_frames": 0, "rx_frames": 0, "drops": 0, "vlan_drops": 0}
        self.vlans = vl.Membership()
        tap.configure(0, 12)  # the kernel finishes checksums and segments before handing over
        self.scratch = bytearray(12 + MAX_FRAME)  # one uplink read

    def enqueue(self, item: _Item, tag: int = -1) -> _Uplink | None:
        if tag > 0:
            item = vl.insert(item, tag)
        flags, gso_type, gso_size, hdr_len, cs, co, frame = item
        hdr = VirtioNetHdr(flags=flags, gso_type=gso_type, hdr_len=hdr_len, gso_size=gso_size,
                           csum_start=cs if flags else 0, csum_offset=co if flags else 0
                           ).pack(12)
        if self.tap.send([[memoryview(hdr), memoryview(frame)]]):
            self.counters["tx_frames"] += 1
            return self
        self.counters["drops"] += 1
        return None

    def wake(self) -> None:
        pass


def _wake_all(woken: dict[int, Any], skip_wake: Any) -> None:
    """Wake each egress port a batch queued to once, except ``skip_wake``."""
    for p in woken.values():
        if p is not skip_wake:
            p.wake()


class L2Switch:
    """A learning switch (see module docstring). ``clock`` is injectable for aging tests."""

    def __init__(self, name: str = "sw0", *, aging: float = 300.0, queue_limit: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.aging = aging
        self.queue_limit = queue_limit
        self.clock = clock
        self.ports: dict[str, SwitchPort] = {}
        self.uplink: _Uplink | None = None
        self.fdb: dict[bytes, tuple[Any, float]] = {}
        self.counters = {"forwarded": 0, "flooded": 0, "filtered": 0, "learned": 0,
                         "moved": 0, "aged": 0}
        self.vlan_aware = False  # any port with vlan=/trunk=: forward per VLAN (vlan_forward)
        self.overlay: Any = None  # a netlab.overlay.Overlay joined to the uplink, if any

    def port(self, name: str, queues: int = 1) -> SwitchPort:
        """A new port with ``queues`` queue pairs (``port.queues``: their backends)."""
        if name in self.ports or name == "uplink":
            raise ValueError(f"switch {self.name}: port {name!r} exists")
        p = SwitchPort(self, name, queues)
        self.ports[name] = p
        return p

    add_port = port

    def add_uplink(self, ifname: str, *, netns: str | None = None) -> None:
        """Create or attach TAP ``ifname`` (link up) and join it as the uplink."""
        from virtwire.backends.tap import TapBackend

        self.attach_uplink(TapBackend(ifname, netns=netns))

    def remove_port(self, port: SwitchPort) -> None:
        if self.ports.get(port.port_name) is port:
            del self.ports[port.port_name]
            self.fdb = {m: e for m, e in self.fdb.items() if e[0] is not port}

    def attach_uplink(self, tap: Any) -> None:
        """Join a ``TapBackend`` as the uplink (its frames are read by ``poll_uplink``)."""
        if self.uplink is not None:
            raise ValueError(f"switch {self.name} already has an uplink")
        self.uplink = _Uplink(tap)
        for p in self.ports.values():
            for q in p.queues:
                q.watch_uplink(tap.fileno())

    def uplink_fileno(self) -> int | None:
        return self.uplink.tap.fileno() if self.uplink is not None else None

    def poll_uplink(self, limit: int = 256, skip_wake: Any = None) -> int:
        """Read up to ``limit`` frames from the uplink TAP and forward them; returns the count."""
        up = self.uplink
        if up is None:
            return 0
        items: list[_Item] = []
        view = memoryview(up.scratch)
        for _ in range(limit):
            n = up.tap.recv([view])
            if n == 0:
                break
            if n < 12 + ETH_HLEN or n > len(view):
                up.counters["drops"] += 1
                continue
            h = VirtioNetHdr.unpack(view, 10)
            items.append((h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM, h.gso_type, h.gso_size,
                          h.hdr_len, h.csum_start, h.csum_offset, bytes(view[12:n])))
            up.counters["rx_frames"] += 1
        if items:
            self.forward(up, items, skip_wake=skip_wake)
        return len(items)

    # -- forwarding --------------------------------------------------------------------------
    def _egress(self, ingress: Any) -> list[Any]:
        out: list[Any] = [p for p in self.ports.values() if p is not ingress and p.accepting]
        if self.uplink is not None and self.uplink is not ingress:
            out.append(self.uplink)
        return out

    def lookup(self, mac: bytes) -> Any | None:
        e = self.fdb.get(mac)
        if e is None:
            return None
        if self.clock() - e[1] > self.aging:
            del self.fdb[mac]
            self.counters["aged"] += 1
            return None
        return e[0]

    def vlans_changed(self) -> None:
        """A port's VLAN mode changed: forward per VLAN from now on, with a fresh FDB."""
        members = [p.vlans for p in self.ports.values()]
        if self.uplink is not None:
            members.append(self.uplink.vlans)
        self.vlan_aware = any(m.aware for m in members)
        self.fdb.clear()

    def set_uplink_vlans(self, vlan: int | None, trunk: frozenset[int] | None = None) -> None:
        if self.uplink is None:
            raise ValueError(f"switch {self.name} has no uplink")
        self.uplink.vlans = vl.Membership(vlan, frozenset(trunk or ()))
        self.vlans_changed()

    def forward(self, ingress: Any, items: Sequence[_Item], skip_wake: Any = None) -> None:
        """Learn, look up and queue a batch of frames from ``ingress``; wake egress ports once."""
        if self.vlan_aware:
            self.vlan_forward(ingress, items, skip_wake)
            return
        now = self.clock()
        woken: dict[int, Any] = {}
        flood: list[Any] | None = None
        for item in items:
            frame = item[6]
            src, dst = frame[6:12], frame[0:6]
            if not frame[6] & 1:
                self.learn(src, ingress, now)
            out = None if dst[0] & 1 else self.lookup(dst)
            if out is None:
                if flood is None:
                    flood = self._egress(ingress)
                self.counters["flooded"] += 1
                for p in flood:
                    q = p.enqueue(item)
                    if q is not None:
                        woken[id(q)] = q
            elif out is ingress:
                self.counters["filtered"] += 1
            else:
                self.counters["forwarded"] += 1
                q = out.enqueue(item)
                if q is not None:
                    woken[id(q)] = q
        _wake_all(woken, skip_wake)

    def learn(self, key: bytes, ingress: Any, now: float) -> None:
        """Record that the source ``key`` (MAC, or VLAN id + MAC) was seen on ``ingress``."""
        old = self.fdb.get(key)
        if old is None:
            self.counters["learned"] += 1
        elif old[0] is not ingress:
            self.counters["moved"] += 1
        self.fdb[key] = (ingress, now)

    def vlan_forward(self, ingress: Any, items: Sequence[_Item], skip_wake: Any = None) -> None:
        """``forward`` per VLAN: classify (and untag) on ingress, learn and look up in that
        VLAN's part of the FDB (keys: 2-byte VLAN id + MAC), deliver to member ports only,
        tagged where the egress port is a trunk of that VLAN (netlab/vlan.py)."""
        now = self.clock()
        woken: dict[int, Any] = {}
        member = ingress.vlans
        for item in items:
            tagged = vl.tag_of(item[6])
            vid = member.ingress(tagged)
            if vid is None:
                ingress.counters["vlan_drops"] += 1
                continue
            if tagged is not None:
                item = vl.strip(item)
            frame = item[6]
            pre = vid.to_bytes(2, "big") if vid else b""
            src, dst = pre + frame[6:12], pre + frame[0:6]
            if not frame[6] & 1:
                self.learn(src, ingress, now)
            out = None if frame[0] & 1 else self.lookup(dst)
            if out is ingress:
                self.counters["filtered"] += 1
                continue
            targets = self._egress(ingress) if out is None else [out]
            self.counters["flooded" if out is None else "forwarded"] += 1
            for p in targets:
                tag = p.vlans.egress(vid)
                q = p.enqueue(item, tag) if tag is not None else None
                if q is not None:
                    woken[id(q)] = q
        _wake_all(woken, skip_wake)

    def close(self) -> None:
        """Close the uplink TAP and any overlay (ports are closed by their owners)."""
        if self.overlay is not None:
            self.overlay.close()
            self.overlay = None
        if self.uplink is not None:
            self.uplink.tap.close()
            self.uplink = None

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "switch": self.name,
            **self.counters,
            "fdb": [{"mac": ":".join(f"{b:02x}" for b in m[-6:]), "port": e[0].port_name,
                     "vlan": int.from_bytes(m[:2], "big") if len(m) == 8 else 0,
                     "age": round(now - e[1], 3)} for m, e in self.fdb.items()],
            "vlans": {n: p.vlans.describe() for n, p in self.ports.items()},
            "ports": {n: p.port_stats() for n, p in self.ports.items()},
            "uplink": dict(self.uplink.counters) if self.uplink is not None else None,
        }


Switch = L2Switch  # the name ``virtwire serve`` uses
