"""The virtio-net device's options: QEMU's ``virtio-net-pci`` property names and what they mean.

The one table of device options. ``NET_OPTIONS`` maps each on/off switch to the feature bits it
withdraws when off; the value options (``queues``, ``mac``, ``mtu``, ...) are listed in
``VALUE_OPTIONS``. ``SWITCHES`` are the on/off device switches a user may give on ``--port`` and
``--net`` (derived from the two). ``on_off`` is the one on/off parser, ``MAC_RE`` /
``is_unicast_mac`` the one MAC check. ``parse_options`` checks a ``"key=val,..."`` string or a
mapping against the table; ``mac_bytes`` and ``random_mac`` are the device's MAC helpers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from virtwire.virtio import spec as s

__all__ = ["NET_OPTIONS", "VALUE_OPTIONS", "BOOL", "SWITCHES", "BOOL_VALUE_OPTIONS", "MAC_RE",
           "on_off", "is_unicast_mac", "parse_options", "mac_bytes", "random_mac"]

# QEMU-style per-device switches (``-device virtio-net-pci,mrg_rxbuf=off``) -> feature bits.
NET_OPTIONS: dict[str, tuple[int, ...]] = {
    "csum": (s.VIRTIO_NET_F_CSUM,),
    "guest_csum": (s.VIRTIO_NET_F_GUEST_CSUM,),
    "gso": (s.VIRTIO_NET_F_HOST_TSO4, s.VIRTIO_NET_F_HOST_TSO6, s.VIRTIO_NET_F_HOST_ECN),
    "guest_tso4": (s.VIRTIO_NET_F_GUEST_TSO4,),
    "guest_tso6": (s.VIRTIO_NET_F_GUEST_TSO6,),
    "guest_ecn": (s.VIRTIO_NET_F_GUEST_ECN,),
    "host_tso4": (s.VIRTIO_NET_F_HOST_TSO4,),
    "host_tso6": (s.VIRTIO_NET_F_HOST_TSO6,),
    "host_ecn": (s.VIRTIO_NET_F_HOST_ECN,),
    "mrg_rxbuf": (s.VIRTIO_NET_F_MRG_RXBUF,),
    "status": (s.VIRTIO_NET_F_STATUS,),
    "ctrl_vq": (s.VIRTIO_NET_F_CTRL_VQ,),
    "ctrl_rx": (s.VIRTIO_NET_F_CTRL_RX,),
    "ctrl_vlan": (s.VIRTIO_NET_F_CTRL_VLAN,),
    "ctrl_mac_addr": (s.VIRTIO_NET_F_CTRL_MAC_ADDR,),
    "ctrl_guest_offloads": (s.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,),
    "guest_announce": (s.VIRTIO_NET_F_GUEST_ANNOUNCE,),
    "mq": (s.VIRTIO_NET_F_MQ,),
}
BOOL = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False,
         "1": True, "0": False}
VALUE_OPTIONS = ("queues", "mac", "mtu", "host_mtu", "rx_queue_size", "tx_queue_size",
                  "queue_size", "packed", "event_idx", "indirect_desc", "link")
# Value options that are on/off too (ring layout and ring features, the link state).
BOOL_VALUE_OPTIONS = ("packed", "event_idx", "indirect_desc", "link")
# The on/off device switches of ``--port`` and ``--net`` (QEMU's property names).
SWITCHES: tuple[str, ...] = (*NET_OPTIONS, *(k for k in BOOL_VALUE_OPTIONS if k != "link"))
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def on_off(value: str) -> bool:
    """``on``/``off`` (also yes/no, true/false, 1/0, any case) -> bool; ValueError otherwise."""
    v = BOOL.get(value.lower())
    if v is None:
        raise ValueError(f"{value!r}: expected on or off")
    return v


def is_unicast_mac(mac: str) -> bool:
    """Is ``mac`` written xx:xx:xx:xx:xx:xx with the multicast bit clear?"""
    return bool(MAC_RE.match(mac)) and not int(mac[:2], 16) & 1


def parse_options(options: str | Mapping[str, Any] | None) -> dict[str, str]:
    """``"mrg_rxbuf=off,queues=2"`` or a mapping -> ``{name: value}`` (names checked)."""
    if options is None:
        return {}
    if isinstance(options, str):
        items: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in options.split(","))):
            k, _, v = part.partition("=")
            items[k.strip()] = v.strip() if _ else "on"
    else:
        items = dict(options)
    out: dict[str, str] = {}
    for k, v in items.items():
        key = k.replace("-", "_")
        if key not in NET_OPTIONS and key not in VALUE_OPTIONS:
            raise ValueError(f"unknown virtio-net option {k!r} (known: "
                             f"{', '.join(sorted([*NET_OPTIONS, *VALUE_OPTIONS]))})")
        val = ("on" if v else "off") if isinstance(v, bool) else str(v).lower()
        if (key in NET_OPTIONS or key in BOOL_VALUE_OPTIONS) and val not in BOOL:
            raise ValueError(f"virtio-net option {k}={v!r}: expected on/off")
        out[key] = val
    return out


def random_mac() -> bytes:
    """A locally administered unicast MAC (52:54:00 is QEMU's; we use 02:76:77 = 'vw')."""
    import os

    return b"\x02\x76\x77" + os.urandom(3)


def mac_bytes(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes | bytearray):
        b = bytes(mac)
    else:
        try:
            b = bytes(int(x, 16) for x in mac.split(":"))
        except ValueError:
            raise ValueError(f"bad MAC address {mac!r}") from None
    if len(b) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return b
