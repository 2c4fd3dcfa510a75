"""Driver conformance: virtwire's device watches a driver and reports, per clause, what the
spec requires of drivers.

Theory of operation
-------------------
There is no second ring parser here. The device's own code paths already check every driver
rule they depend on (``virtio.chain``, ``virtio.split_ring``/``packed_ring``, the status and
feature checks in ``virtio.device``, the transmit header checks in ``net.tx``) and, when tracing
is on, report what they did through ``virtwire.trace``: status writes, feature offer/ack/
negotiation, every chain popped (descriptors, head, lengths, indirect), every used element,
kicks, control commands; plus the refusals the recording hook adds (``status.refused``,
``status.needs_reset``, ``feature.refused``, ``frame.dropped`` with the device's reason).

``Recorder`` is a ``trace.Tracer`` that keeps the events in memory (``recording`` installs it
for an in-process device); a device in another process (``virtwire serve --trace``, the PCI
proxy host) writes the same events to a file, read back with ``trace.reader``. ``analyze``
turns either into the device suite's report shape (``format_table`` prints it): one result per
clause, failing with the device's own words as evidence.

What an in-process recording sees that a trace file does not: the transmit header of each
chain (the recorder reads it from guest memory when the device pops the chain, so the MTU rule
of §5.1.4.1 and ``num_buffers`` on transmit are checked).
"""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Iterator
from typing import Any

from virtwire import trace
from virtwire.conform.context import FAIL, PASS, SKIP, WARN
from virtwire.conform.features import dependency_findings
from virtwire.memory import GuestMemory
from virtwire.virtio import spec

__all__ = ["Recorder", "recording", "analyze", "DRIVER_CHECKS"]

ACK, DRV, FOK, DOK = (spec.VIRTIO_CONFIG_S_ACKNOWLEDGE, spec.VIRTIO_CONFIG_S_DRIVER,
                      spec.VIRTIO_CONFIG_S_FEATURES_OK, spec.VIRTIO_CONFIG_S_DRIVER_OK)


class Recorder(trace.Tracer):
    """A tracer that keeps events in ``events``; with ``mem``, each transmit chain's
    virtio-net header is read when the device pops it (``tx_headers``)."""

    def __init__(self, mem: GuestMemory | None = None, tx_queues: frozenset[int] = frozenset(
            range(1, 64, 2))) -> None:
        self.events: list[dict[str, Any]] = []
        self.mem = mem
        self.tx_queues = tx_queues
        self.hdr_len = 12
        self.tx_headers: list[dict[str, int]] = []
        super().__init__(io.StringIO(), None, 1, close_out=False)

    def _write(self, rec: dict[str, Any]) -> None:
        self.events.append(rec)
        if rec.get("cat") == "feature" and rec.get("ev") == "negotiated":
            f = int(rec["features"], 16)
            self.hdr_len = 12 if f >> spec.VIRTIO_F_VERSION_1 & 1 or f >> (
                spec.VIRTIO_NET_F_MRG_RXBUF) & 1 else 10
        elif rec.get("cat") == "chain" and self.mem is not None and rec["q"] in self.tx_queues:
            self._tx_header(rec)

    def _tx_header(self, rec: dict[str, Any]) -> None:
        raw = b""
        for addr, ln, flags in rec["descs"]:
            if flags & spec.VIRTQ_DESC_F_WRITE or len(raw) >= self.hdr_len:
                break
            try:
                raw += self.mem.read(addr, min(ln, self.hdr_len - len(raw)))  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - the device reports bad addresses itself
                return
        if len(raw) < 10:
            return
        flags, gso, hdr_len, gso_size, cs, co = struct.unpack_from("<BBHHHH", raw)
        nb = struct.unpack_from("<H", raw, 10)[0] if len(raw) >= 12 and self.hdr_len == 12 else 0
        self.tx_headers.append({"q": rec["q"], "flags": flags, "gso_type": gso,
                                "frame_len": rec["rlen"] - self.hdr_len, "num_buffers": nb})


@contextlib.contextmanager
def recording(mem: GuestMemory | None = None) -> Iterator[Recorder]:
    """Install a ``Recorder`` as the process's tracer (before the driver's DRIVER_OK, so the
    device wraps its rings); the previous tracer comes back afterwards."""
    prev = trace.TRACE
    rec = Recorder(mem)
    trace.TRACE = rec
    try:
        yield rec
    finally:
        trace.TRACE = prev


# ------------------------------------------------------------------------------------------------
# the checks: (id, title, clause, fn(Facts) -> (status, detail))
# ------------------------------------------------------------------------------------------------

class Facts:
    """The events of one recording, sorted into what the checks ask about."""

    def __init__(self, events: list[dict[str, Any]], tx_headers: list[dict[str, int]],
                 mtu: int | None) -> None:
        self.events = events
        self.tx_headers = tx_headers
        self.mtu = mtu
        self.faults = [e["reason"] for e in events
                       if e.get("cat") == "status" and e.get("ev") == "needs_reset"]
        self.refused = [e for e in events if e.get("cat") == "status" and e.get("ev") == "refused"]
        self.offers = [int(e["features"], 16) for e in events
                       if e.get("cat") == "feature" and e.get("ev") == "offer"]
        self.acks = [int(e["features"], 16) for e in events
                     if e.get("cat") == "feature" and e.get("ev") == "ack"]
        self.negotiated = [int(e["features"], 16) for e in events
                           if e.get("cat") == "feature" and e.get("ev") == "negotiated"]
        self.feature_refusals = [e["reason"] for e in events
                                 if e.get("cat") == "feature" and e.get("ev") == "refused"]
        self.tx_drops = [e["reason"] for e in events
                         if e.get("cat") == "frame" and e.get("ev") == "dropped"]
        self.chains = [e for e in events if e.get("cat") == "chain"]
        self.kicks = [e for e in events if e.get("cat") == "kick"]

    def faults_matching(self, *words: str) -> list[str]:
        return [f for f in self.faults if any(w in f for w in words)]


def _init_order(f: Facts) -> tuple[str, str]:
    seq = [(e["old"], e["new"]) for e in f.events if e.get("cat") == "status" and e.get("ev") in (
        "set", "refused")]
    if not seq:
        return SKIP, "no status writes recorded"
    bad = []
    modern = any(n >> spec.VIRTIO_F_VERSION_1 & 1 for n in f.negotiated + f.acks)
    for old, new in seq:
        if new == 0:
            continue
        if new & DRV and not new & ACK:
            bad.append(f"{new:#x}: DRIVER without ACKNOWLEDGE")
        if new & FOK and not old & FOK and not f.acks:
            bad.append(f"{new:#x}: FEATURES_OK before any feature write")
        if modern and new & DOK and not new & FOK:
            bad.append(f"{new:#x}: DRIVER_OK without FEATURES_OK")
        if old == 0 and new not in (ACK, ACK | spec.VIRTIO_CONFIG_S_FAILED):
            bad.append(f"first write after reset {new:#x}, not ACKNOWLEDGE")
    pci = any(e.get("cat") == "pci" for e in f.events)
    if pci and modern:
        bad += _pci_order(f)
    if bad:
        return FAIL, "; ".join(dict.fromkeys(bad))
    extra = ("; FEATURES_OK re-read before DRIVER_OK, no queue enabled after DRIVER_OK (PCI "
             "register accesses)" if pci and modern else
             "; the FEATURES_OK re-read is not observable on this transport")
    return PASS, (f"{len(seq)} status writes in §3.1.1 order (ACKNOWLEDGE, DRIVER, features, "
                  "FEATURES_OK, DRIVER_OK)" + extra)


def _pci_order(f: Facts) -> list[str]:
    """§3.1.1 steps 6-7 from the PCI register accesses: the status re-read after FEATURES_OK,
    and queue_enable written before DRIVER_OK (after it only with RING_RESET, §2.6.1)."""
    bad = []
    status = 0
    want_reread = reread = False
    ring_reset = any(n >> spec.VIRTIO_F_RING_RESET & 1 for n in f.negotiated)
    for e in f.events:
        cat, ev = e.get("cat"), e.get("ev")
        if cat == "status" and ev == "set":
            new = e["new"]
            if new & DOK and not status & DOK and want_reread and not reread:
                bad.append("DRIVER_OK without re-reading device status after FEATURES_OK "
                           "(§3.1.1 step 6)")
            if new & FOK and not status & FOK:
                want_reread, reread = True, False
            status = new
        elif cat == "pci" and e.get("reg") == "common_cfg.device_status" and ev == "bar_read":
            reread = reread or want_reread
        elif (cat == "pci" and ev == "bar_write" and e.get("reg") == "common_cfg.queue_enable"
              and status & DOK and not ring_reset):
            bad.append("queue_enable written after DRIVER_OK without RING_RESET (§3.1.1 step 7)")
    return bad


def _status(f: Facts) -> tuple[str, str]:
    if f.refused:
        return FAIL, "; ".join(f"{e['old']:#x} -> {e['new']:#x}: {e['reason']}"
                               for e in f.refused[:4])
    return PASS, "no status write the device refused"


def _features(f: Facts) -> tuple[str, str]:
    if not f.acks:
        return SKIP, "no feature write recorded"
    offered = f.offers[-1] if f.offers else None
    bad = list(f.feature_refusals)
    # over vhost-user the word the back end gets is the front end's: QEMU keeps CTRL_VQ for
    # itself but passes GUEST_ANNOUNCE on, so dependencies are not the driver's to answer for
    vhost = any(e.get("cat") == "vhost" for e in f.events)
    for a in f.acks:
        if offered is not None and a & ~offered:
            bad.append(f"accepted {spec.feature_names(a & ~offered)} not offered")
        if not vhost:
            fails, _ = dependency_findings(a & ~spec.bit(spec.VHOST_USER_F_PROTOCOL_FEATURES))
            bad += [x.replace("offered without", "accepted without") for x in fails]
    if bad:
        return FAIL, "; ".join(dict.fromkeys(bad))
    deps = ("dependencies not judged (vhost-user: the front end chose the word)" if vhost
            else "dependencies kept")
    return PASS, f"accepted {spec.feature_names(f.acks[-1])}, all offered, {deps}"


def _faults(*words: str, what: str) -> Any:
    def fn(f: Facts) -> tuple[str, str]:
        hit = f.faults_matching(*words)
        if hit:
            return FAIL, "; ".join(hit[:4]) + (f" (+{len(hit) - 4} more)" if len(hit) > 4 else "")
        return PASS, f"{len(f.chains)} chains, {what}"
    return fn


def _reuse(f: Facts) -> tuple[str, str]:
    inflight: dict[int, set[int]] = {}
    bad = []
    for e in f.events:
        if e.get("cat") == "chain":
            s = inflight.setdefault(e["q"], set())
            if e["head"] in s:
                bad.append(f"queue {e['q']}: head {e['head']} made available again before "
                           "the device used it")
            s.add(e["head"])
        elif e.get("cat") == "used" and e.get("ev") == "used":
            inflight.setdefault(e["q"], set()).discard(e["id"])
        elif e.get("cat") == "status" and e.get("ev") in ("set", "reset") and not e.get("new"):
            inflight.clear()
    if bad:
        return FAIL, "; ".join(bad[:4])
    return PASS, f"{len(f.chains)} chains, none reposted while in flight"


def _tx_rules(f: Facts) -> tuple[str, str]:
    bad = [f"device dropped a transmit frame: {r}" for r in dict.fromkeys(f.tx_drops)]
    lim = f.mtu + 14 if f.mtu else None
    over = [h["frame_len"] for h in f.tx_headers if lim is not None and h["frame_len"] > lim
            and not h["gso_type"] & ~spec.VIRTIO_NET_HDR_GSO_ECN]
    if over:
        bad.append(f"{len(over)} non-GSO frames above mtu {f.mtu} + 14 (e.g. {over[0]} B; "
                   "§5.1.4.1)")
    nb = [h["num_buffers"] for h in f.tx_headers if h["num_buffers"]]
    if nb:
        bad.append(f"{len(nb)} transmit headers with num_buffers {nb[0]} (§5.1.6.2: set to 0)")
    if bad:
        return FAIL, "; ".join(bad)
    seen = f"{len(f.tx_headers)} transmit headers read" if f.tx_headers else (
        "headers checked by the device")
    return PASS, f"{seen}; no frame dropped for its header" + (
        f"; none above mtu {f.mtu} without GSO" if f.mtu and f.tx_headers else "")


def _notify(f: Facts) -> tuple[str, str]:
    if not f.chains:
        return SKIP, "no buffers made available"
    return PASS, (f"{len(f.kicks)} notifications for {len(f.chains)} chains (a driver MAY "
                  "notify more than asked; the device's suppression is the device suite's "
                  "notify.* checks)")


def _ctrl(f: Facts) -> tuple[str, str]:
    cmds = [e for e in f.events if e.get("cat") == "ctrl" and e.get("ev") == "cmd"]
    if not cmds:
        return SKIP, ("no control-queue command reached the device (over vhost-user the "
                      "front end keeps the control queue)" if any(
                          e.get("cat") == "vhost" for e in f.events) else
                      "no control-queue command recorded")
    refused = [f"{e.get('class_name')}.{e.get('cmd_name')}" for e in cmds if e.get("ack")]
    if refused:
        # the device answered VIRTIO_NET_ERR: a malformed or unnegotiated command (§5.1.6.5.1
        # driver MUST NOT issue them), or a command the device lacks -- judged by hand
        return WARN, f"{len(refused)} of {len(cmds)} commands answered ERR: {refused[:6]}"
    names = sorted({f"{e.get('class_name')}.{e.get('cmd_name')}" for e in cmds})
    return PASS, f"{len(cmds)} commands, all answered OK: {', '.join(names)}"


DRIVER_CHECKS: list[tuple[str, str, str, Any]] = [
    ("driver.init_order", "Initialisation in §3.1.1 order", "virtio 1.2 §3.1.1 (driver MUST "
     "follow the sequence: ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues, DRIVER_OK)",
     _init_order),
    ("driver.status", "Status writes the device accepts", "virtio 1.2 §2.1.1 (driver MUST set "
     "the bits of the completed steps and MUST NOT clear a device status bit)", _status),
    ("driver.features", "Accepted features were offered and keep their dependencies",
     "virtio 1.2 §2.2.1 (driver MUST NOT accept a feature the device did not offer, nor one "
     "that requires a feature not accepted), §5.1.3.1", _features),
    ("driver.avail_idx", "avail idx moves forward by at most the queue size",
     "virtio 1.2 §2.7.6.1 (driver MUST NOT decrement the available idx); §2.7.13.3",
     _faults("avail idx", what="avail idx always within a queue size of the device's")),
    ("driver.descriptors", "Descriptor chains in bounds, no loops, not longer than the queue",
     "virtio 1.2 §2.7.5.2 (no chain longer than 2^32 bytes or than the queue size)",
     _faults("next ", "outside guest RAM", "exceeds", "total length", "no descriptors",
             "loop", what="every chain in bounds")),
    ("driver.write_after_read", "Device-writable descriptors follow readable ones",
     "virtio 1.2 §2.6.4.2 (driver MUST place device-writable descriptors after "
     "device-readable ones)", _faults("readable descriptor after writable",
                                      what="readable before writable in each")),
    ("driver.indirect", "Indirect tables: negotiated, len a multiple of 16, not nested, no NEXT",
     "virtio 1.2 §2.7.5.3.1 (MUST NOT set INDIRECT unless negotiated, within a table, or with "
     "NEXT), §2.7.5.3 (table of len/16 descriptors)",
     _faults("indirect", "INDIRECT", what="indirect tables well formed")),
    ("driver.buffer_reuse", "No buffer made available again before the device used it",
     "virtio 1.2 §2.7.13 (buffers belong to the device until it returns them, §2.7.14)",
     _reuse),
    ("driver.tx_header", "Transmit headers: negotiated offloads, MTU, num_buffers 0",
     "virtio 1.2 §5.1.6.2.1 (driver MUST NOT set gso_type/NEEDS_CSUM without the feature; "
     "csum_start/offset in the frame), §5.1.4.1 (non-GSO frames within mtu + Ethernet header)",
     _tx_rules),
    ("driver.ctrl", "Control-queue commands well formed and negotiated",
     "virtio 1.2 §5.1.6.5 (command layout: class, command, data, ack), §5.1.6.5.1 (driver "
     "MUST NOT issue commands for features it did not negotiate)", _ctrl),
    ("driver.notifications", "Notifications recorded against buffers made available",
     "virtio 1.2 §2.7.10 / §2.7.13.4 (available buffer notification suppression)", _notify),
]


def analyze(events: list[dict[str, Any]], name: str, description: str,
            tx_headers: list[dict[str, int]] | None = None,
            mtu: int | None = None) -> dict[str, Any]:
    """The driver suite's report (the device suite's shape) for one recording."""
    f = Facts(events, tx_headers or [], mtu)
    results = []
    for cid, title, clause, fn in DRIVER_CHECKS:
        status, detail = fn(f)
        results.append({"id": cid, "title": title, "clause": clause, "status": status,
                        "detail": detail, "data": {}, "seconds": 0.0})
    summary = {s: sum(1 for r in results if r["status"] == s) for s in (PASS, FAIL, WARN, SKIP)}
    return {"target": name, "description": description, "checks": results, "summary": summary,
            "suite": "driver"}


def observe_local(drive: Any, options: str = "mtu=1500", name: str = "virtwire-driver",
                  description: str = "virtwire's own driver (net.driver) on the device model "
                  "in process") -> dict[str, Any]:
    """Run ``drive(target)`` against virtwire's device in process while recording, and
    analyze it. ``target`` is a ``LocalTarget``: ``target.driver()`` brings up our driver,
    ``target.dev``/``target.mem`` let a test break the rules by hand."""
    from virtwire.conform.targets_local import LocalTarget

    t = LocalTarget(options, enforce_mtu=False)
    t.open()
    with recording(t.mem) as rec:
        drive(t)
    assert t.dev is not None
    return analyze(rec.events, name, description, rec.tx_headers, t.dev.mtu)
