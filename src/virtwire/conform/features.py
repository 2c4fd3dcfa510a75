"""Feature-bit rules the device suite checks, in the words of the clauses that state them.

virtio 1.2 §5.1.3.1 ("Feature bit requirements") lists, per bit, what it *Requires*; §2.2.2
makes it binding ("The device MUST NOT offer a feature which requires another feature which
was not offered"). ``DIRECT`` is that list as written: a failure quotes it. A bit's
*transitive* requirements (HOST_ECN needs HOST_TSO4 or HOST_TSO6, each of which needs CSUM)
are not the clause's words: a gap there is a note, never a failure of the first bit.

§2.2 allocates the bits (0..23 and 50..127 device type, 24..40 queue and feature negotiation,
41..49 and 128+ reserved), §6 defines the transport bits, §5.1.3.2 and §6.3 list the legacy-only
ones (VIRTIO_NET_F_GSO, bit 6); VHOST_F_LOG_ALL (26) and VHOST_USER_F_PROTOCOL_FEATURES (30)
are vhost protocol bits a front end consumes and should never show a virtio driver.
"""

from __future__ import annotations

from virtwire.virtio import spec

__all__ = ["DIRECT", "clause_words", "dependency_findings", "bit_findings", "KNOWN_NET",
           "KNOWN_TRANSPORT", "VHOST_ONLY", "VHOST_ONLY_MASK", "LEGACY_ONLY"]


def _name(b: int) -> str:
    n = spec.FEATURE_NAMES.get(b, f"bit {b}")
    return n if n.startswith("VIRTIO_") else f"VIRTIO_NET_F_{n}"


# feature -> ("all" | "any", required bits), exactly as §5.1.3.1 words it
DIRECT: dict[int, tuple[str, tuple[int, ...]]] = {
    f: (("any", spec.NET_FEATURE_REQUIRES_ANY[f]) if f in spec.NET_FEATURE_REQUIRES_ANY
        else ("all", reqs))
    for f, reqs in spec.NET_FEATURE_REQUIRES.items() if reqs or f in spec.NET_FEATURE_REQUIRES_ANY
}


def clause_words(feat: int) -> str:
    """§5.1.3.1's sentence for ``feat``, e.g. "VIRTIO_NET_F_HOST_ECN Requires
    VIRTIO_NET_F_HOST_TSO4 or VIRTIO_NET_F_HOST_TSO6"."""
    how, reqs = DIRECT[feat]
    return f"{_name(feat)} Requires " + (" or " if how == "any" else " and ").join(
        _name(r) for r in reqs)


def _closure(feat: int) -> set[int]:
    seen: set[int] = set()
    todo = list(DIRECT.get(feat, ("all", ()))[1]) + list(spec.NET_FEATURE_REQUIRES.get(feat, ()))
    while todo:
        r = todo.pop()
        if r not in seen:
            seen.add(r)
            todo += list(DIRECT.get(r, ("all", ()))[1])
    return seen


def dependency_findings(offered: int) -> tuple[list[str], list[str]]:
    """(failures quoting §5.1.3.1, notes on transitive gaps) for an offered feature word."""
    fails, notes = [], []
    for feat, (how, reqs) in DIRECT.items():
        if not offered >> feat & 1:
            continue
        have = [offered >> r & 1 for r in reqs]
        if not (any(have) if how == "any" else all(have)):
            fails.append(f"§5.1.3.1 \"{clause_words(feat)}\": offered without "
                         + ("any of them" if how == "any" else
                            "+".join(_name(r) for r, h in zip(reqs, have) if not h)))
        direct = set(reqs)
        gaps = sorted(r for r in _closure(feat) - direct if not offered >> r & 1)
        if gaps:
            notes.append(f"{_name(feat)} needs {'+'.join(_name(g) for g in gaps)} only "
                         "transitively (through its direct requirements): not offered")
    return fails, notes


# virtio 1.2 §2.2: 0..23 and 50..127 device type, 24..40 queue/feature negotiation, 41..49
# and 128+ reserved for future extensions.
KNOWN_NET = (frozenset(range(0, 24)) - {4, 6}) | frozenset({56, 57, 59, 60, 61, 62, 63})
KNOWN_TRANSPORT = frozenset({28, 29, 32, 33, 34, 35, 36, 37, 38, 39, 40})  # §6
LEGACY_ONLY = {6: "VIRTIO_NET_F_GSO (legacy interface only, §5.1.3.2)",
               41: "VIRTIO_NET_F_GUEST_RSC4 (legacy interface only, §5.1.3.2)",
               42: "VIRTIO_NET_F_GUEST_RSC6 (legacy interface only, §5.1.3.2)",
               24: "VIRTIO_F_NOTIFY_ON_EMPTY (legacy, §6.3)",
               27: "VIRTIO_F_ANY_LAYOUT (legacy, §6.3)"}
VHOST_ONLY = {26: "VHOST_F_LOG_ALL (a vhost protocol bit, undefined for virtio drivers)",
              30: "bit 30 (VHOST_USER_F_PROTOCOL_FEATURES; for virtio §6.3 'UNUSED ... SHOULD "
                  "NOT be negotiated')"}


VHOST_ONLY_MASK = sum(1 << b for b in VHOST_ONLY)


def bit_findings(offered: int) -> list[str]:
    """What a VERSION_1 device should not show its driver: vhost protocol bits, legacy-only
    bits, reserved bits (§2.2) and bits in a defined range that virtio 1.2 does not define.
    The spec states no MUST against offering them (hence warnings, failures under --strict):
    a driver ignores what it does not know, but a bit offered today may mean something else
    tomorrow."""
    out = []
    for b in range(64):
        if not offered >> b & 1 or b in KNOWN_NET or b in KNOWN_TRANSPORT:
            continue
        if b in VHOST_ONLY:
            out.append(f"{VHOST_ONLY[b]} reaches the driver")
        elif b in LEGACY_ONLY:
            out.append(f"{LEGACY_ONLY[b]} offered with VIRTIO_F_VERSION_1")
        elif 41 <= b <= 49:
            out.append(f"bit {b} offered (§2.2: 41 to 49 are reserved for future extensions)")
        else:
            out.append(f"bit {b} offered (not defined by virtio 1.2 for a net device)")
    return out
