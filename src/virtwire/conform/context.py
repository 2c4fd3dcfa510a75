"""The conformance suite's frame: results, the check registry and the context a check runs in.

A check is a function ``(Context) -> Result`` registered with ``@check`` in ``CHECKS`` (the
checks live in ``checks_core`` and ``checks_offload``; ``suite`` runs them).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from virtwire.conform.peers import ETH_P_EXPERIMENTAL, MAGIC
from virtwire.conform.targets import Target
from virtwire.net.driver import NetDriverConfig, VirtioNetDriver
from virtwire.net.transport import DEFAULT_NET_FEATURES
from virtwire.virtio import spec

__all__ = ["Result", "Check", "CHECKS", "check", "Context", "Exchange", "Skip", "mismatch",
           "test_frame", "PASS", "FAIL", "WARN", "SKIP", "DST", "SRC", "frame_limit",
           "MtuRuleBroken", "ETH_HLEN", "MTU_CLAUSE"]

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"


@dataclass
class Result:
    status: str
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    clause: str
    fn: Callable[[Context], Result]


CHECKS: list[Check] = []


def check(id_: str, title: str, clause: str) -> Callable[[Callable[[Context], Result]],
                                                         Callable[[Context], Result]]:
    def deco(fn: Callable[[Context], Result]) -> Callable[[Context], Result]:
        CHECKS.append(Check(id_, title, clause, fn))
        return fn
    return deco


# ------------------------------------------------------------------------------------------------
# frames and exchange
# ------------------------------------------------------------------------------------------------

DST = bytes.fromhex("020000000002")
SRC = bytes.fromhex("020000000001")


def test_frame(rnd: random.Random, n: int) -> bytes:
    n = max(n, 18)
    return DST + SRC + ETH_P_EXPERIMENTAL.to_bytes(2, "big") + MAGIC + rnd.randbytes(n - 18)


test_frame.__test__ = False  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------
# the MTU rule the suite's own frames obey
# ------------------------------------------------------------------------------------------------

ETH_HLEN = 14
MTU_CLAUSE = ("virtio 1.2 §5.1.4.1: a driver that negotiated VIRTIO_NET_F_MTU MUST NOT transmit "
              "packets larger than mtu plus the low-level Ethernet header with gso_type NONE or "
              "ECN")


class MtuRuleBroken(AssertionError):
    """The suite itself was about to break §5.1.4.1 (a bug in a check, not a device finding)."""


def frame_limit(drv: VirtioNetDriver) -> int | None:
    """The largest non-GSO frame ``drv`` may transmit (mtu + 14), or None without MTU."""
    return drv.mtu + ETH_HLEN if drv.has(spec.VIRTIO_NET_F_MTU) and drv.mtu else None


def guard_tx(drv: VirtioNetDriver, frames: list[bytes], gso_type: int = 0) -> None:
    """Raise ``MtuRuleBroken`` if sending ``frames`` (non-GSO) would break §5.1.4.1."""
    limit = frame_limit(drv)
    if limit is None or gso_type & ~spec.VIRTIO_NET_HDR_GSO_ECN:
        return
    big = [len(f) for f in frames if len(f) > limit]
    if big:
        raise MtuRuleBroken(f"suite bug: non-GSO frames of {big[:3]} B with mtu {drv.mtu} "
                            f"negotiated ({MTU_CLAUSE})")


@dataclass
class Exchange:
    sent_out: list[bytes]
    got_out: list[bytes | None]
    sent_in: list[bytes]
    got_in: list[bytes]
    rx_meta: list[Any]


class Context:
    """What a check works with: the target, fresh drivers, frame exchange helpers."""

    def __init__(self, target: Target, seed: int = 1) -> None:
        self.t = target
        self.rnd = random.Random(seed)
        self.notes: dict[str, Any] = {}
        self._current: VirtioNetDriver | None = None

    def driver(self, **cfg: Any) -> VirtioNetDriver:
        return self.driver_on(self.t, **cfg)

    def driver_on(self, target: Target, **cfg: Any) -> VirtioNetDriver:
        # A watchdog kick is a finding (notify.no_stall): wait long enough that a busy host
        # delaying a correct device is not mistaken for a stall.
        cfg.setdefault("stall_kick_after", 0.25)
        drv = target.driver(NetDriverConfig(**cfg))
        self._current = drv
        return drv

    def driver_without_mtu(self, target: Target | None = None, **cfg: Any) -> VirtioNetDriver:
        """A driver that does not negotiate VIRTIO_NET_F_MTU: any frame size is then allowed
        without GSO (the way to send large non-GSO frames while obeying §5.1.4.1)."""
        cfg["features"] = cfg.get("features", DEFAULT_NET_FEATURES) & ~spec.bit(
            spec.VIRTIO_NET_F_MTU)
        return self.driver_on(target or self.t, **cfg)

    def send(self, drv: VirtioNetDriver, frames: list[bytes], **hdr: Any) -> int:
        """``drv.send`` after checking the frames obey the MTU rule (``guard_tx``)."""
        guard_tx(drv, frames, hdr.get("gso_type", 0))
        return drv.send(frames, **hdr)

    def rand_sizes(self, drv: VirtioNetDriver, k: int, lo: int = 60, hi: int = 1514) -> list[int]:
        """``k`` random frame sizes in lo..hi, capped at the negotiated MTU's frame limit."""
        hi = min(hi, frame_limit(drv) or hi)
        return [self.rnd.randint(min(lo, hi), hi) for _ in range(k)]

    def exchange(self, drv: VirtioNetDriver, sizes: list[int], target: Target | None = None,
                 batch: int = 32, timeout: float = 5.0) -> Exchange:
        """Send frames of ``sizes`` out and (with a peer) the same number in, batch by batch."""
        t = target or self.t
        out = [test_frame(self.rnd, n) for n in sizes]
        guard_tx(drv, out)
        inn = out if t.loopback else [test_frame(self.rnd, n) for n in sizes]
        ex = Exchange(out, [], inn, [], [])
        for k in range(0, len(out), batch):
            b = out[k : k + batch]
            if drv.send_all(b, timeout=timeout) != len(b):
                raise AssertionError(f"transmit ring stuck after {k} frames")
            if not t.loopback:
                for _ in b:
                    ex.got_out.append(self.peer_recv(t, drv, timeout))
                for f in inn[k : k + batch]:
                    t.peer_send(f)
            rx = drv.poll_receive(len(b), timeout=timeout)
            ex.got_in += [r.data for r in rx]
            ex.rx_meta += rx
            if len(rx) < len(b):
                break
        if t.loopback:
            ex.got_out = list(ex.got_in)  # what came back is what went out
        return ex

    @staticmethod
    def peer_recv(t: Target, drv: VirtioNetDriver, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            f = t.peer_recv(0.002)
            if f is not None:
                return f
            drv.service()
        return None


def mismatch(sent: list[bytes], got: list[Any]) -> list[str]:
    bad = []
    for i, s in enumerate(sent):
        g = got[i] if i < len(got) else None
        if g is None:
            bad.append(f"#{i} ({len(s)} B) lost")
        elif g != s:
            if len(g) != len(s):
                bad.append(f"#{i} ({len(s)} B) arrived as {len(g)} B")
            else:
                bad.append(f"#{i} ({len(s)} B) corrupted")
    return bad



class Skip(Exception):
    pass


