"""Per-queue counters as typed records (``@dataclass(slots=True)``), readable as a mapping.

``QueueCounters`` holds what every virtio device counts per queue (kicks, chains, interrupts,
errors); a device type extends it per queue role (``net.counters``: RX and TX). The data path
updates attributes (``c.frames += n``); readers may index them like the dicts they replaced
(``c["frames"]``, ``c.get(...)``, ``dict(c)``), where a counter beyond the ``ALWAYS`` set is
listed only once it moved, as before. ``as_dict()`` -- what ``stats()`` reports -- always has
every key, zeros included, so scrapers see a stable set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import ClassVar

__all__ = ["QueueCounters"]


@dataclass(slots=True)
class QueueCounters:
    """Counters of one virtqueue (see module docstring)."""

    ALWAYS: ClassVar[frozenset[str]] = frozenset({"kicks", "chains", "interrupts", "errors"})
    kicks: int = 0
    chains: int = 0
    interrupts: int = 0
    errors: int = 0

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def as_dict(self) -> dict[str, int]:
        """Every counter, zeros included."""
        return {n: getattr(self, n) for n in self.names()}

    # -- mapping view (the keys a dict of these counters had) --------------------------------
    def keys(self) -> list[str]:
        return [n for n in self.names() if n in self.ALWAYS or getattr(self, n)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.keys()

    def __getitem__(self, key: str) -> int:
        try:
            value: int = getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None
        return value

    def __setitem__(self, key: str, value: int) -> None:
        setattr(self, key, value)

    def get(self, key: str, default: int | None = None) -> int | None:
        return getattr(self, key, default)

    def items(self) -> list[tuple[str, int]]:
        return [(k, getattr(self, k)) for k in self.keys()]
