"""Frame backends for the virtio-net device: ``tap``, ``switch``, ``null``, ``memory``.

Each implements ``net.backend.NetBackend`` (the protocol lives with the device that uses it);
``base`` holds the shared plumbing (``BackendBase``, ``readv_frame``). ``create(kind, **params)``
builds one by name (the ``backend=`` of ``virtwire serve --port``); the classes are importable
from their modules. Which host watches a backend's fd: ``hosts.pump.BackendPump``.
"""

from __future__ import annotations

import importlib
from typing import Any

from virtwire.backends.base import BackendError
from virtwire.net.backend import NetBackend

__all__ = ["NetBackend", "BackendError", "KINDS", "create"]

# kind -> (module, class)
KINDS: dict[str, tuple[str, str]] = {
    "tap": ("virtwire.backends.tap", "TapBackend"),
    "null": ("virtwire.backends.null", "NullBackend"),
    "memory": ("virtwire.backends.memory", "MemoryBackend"),
}


def create(kind: str, **params: Any) -> NetBackend:
    """A backend of ``kind`` (``tap``: ``ifname=``, ``multi_queue=``; ``null``; ``memory``).

    A switch port comes from its switch (``L2Switch.port(name)``), not from here.
    """
    try:
        mod, cls = KINDS[kind]
    except KeyError:
        raise BackendError(f"unknown backend {kind!r} (known: {', '.join(sorted(KINDS))}, "
                           "switch)") from None
    return getattr(importlib.import_module(mod), cls)(**params)
