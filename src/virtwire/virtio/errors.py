"""Errors of the virtio core, split as h11 splits them.

``DriverError`` and its subclasses mean the *other side* (a guest driver, a front end) broke the
spec: the caller logs the reason, marks the device NEEDS_RESET or refuses the chain, and goes on.
Any other exception is a virtwire bug and is allowed to propagate.
"""

from __future__ import annotations

from virtwire.memory import GuestMemoryError


class DriverError(Exception):
    """The driver (guest or front end) misused the device; never our own bug."""


class QueueError(DriverError):
    """A malformed ring: bad descriptor chain, index jump, loop, out-of-range address."""


class FeatureError(DriverError):
    """A feature negotiation rule was broken (unknown bits, missing dependencies, late change)."""


class StatusError(DriverError):
    """A device status transition the spec does not allow."""


__all__ = ["DriverError", "QueueError", "FeatureError", "StatusError", "GuestMemoryError"]
