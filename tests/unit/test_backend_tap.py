"""TAP backend pieces that need no TAP: offload flags from features, name checks."""

from __future__ import annotations

import pytest

from virtwire.backends.base import BackendError
from virtwire.backends.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    TapBackend,
    TapError,
    tun_offload_flags,
)
from virtwire.virtio import spec as s


@pytest.mark.parametrize(
    "features,flags",
    [
        (0, 0),
        (s.bit(s.VIRTIO_NET_F_GUEST_CSUM), TUN_F_CSUM),
        (s.bit(s.VIRTIO_NET_F_GUEST_CSUM, s.VIRTIO_NET_F_GUEST_TSO4, s.VIRTIO_NET_F_GUEST_TSO6,
               s.VIRTIO_NET_F_GUEST_ECN), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN),
        (s.bit(s.VIRTIO_NET_F_GUEST_CSUM, s.VIRTIO_NET_F_GUEST_UFO), TUN_F_CSUM | TUN_F_UFO),
        # tun refuses TSO without CSUM; ECN without TSO means nothing
        (s.bit(s.VIRTIO_NET_F_GUEST_TSO4), 0),
        (s.bit(s.VIRTIO_NET_F_GUEST_CSUM, s.VIRTIO_NET_F_GUEST_ECN), TUN_F_CSUM),
        # HOST_* features are about the other direction
        (s.bit(s.VIRTIO_NET_F_CSUM, s.VIRTIO_NET_F_HOST_TSO4), 0),
    ],
)
def test_tun_offload_flags(features: int, flags: int) -> None:
    assert tun_offload_flags(features) == flags


@pytest.mark.parametrize("name", ["", "a" * 16, "a/b"])
def test_bad_names_refused_before_any_syscall(name: str) -> None:
    with pytest.raises(TapError, match="bad interface name") as e:
        TapBackend(name)
    assert isinstance(e.value, BackendError)
