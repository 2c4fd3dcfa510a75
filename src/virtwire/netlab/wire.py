"""How ``virtwire serve`` applies the netlab keys to a port: at start and at run time.

``wire_port(cfg, backends, switches)`` runs right after a port's backends are made and before
its device: it sets the VLAN mode of a switch port (and of the switch's uplink), joins a
``vxlan:`` uplink to the other hosts (``overlay``) and fixes the device MTU for it, and wraps each
queue pair's backend in a ``ShapedBackend`` when any ``tx.*``/``rx.*`` key or ``shape=on`` is
given (a port without them keeps its backends as they are, native fast path included).

``set_port(port, changes)`` is ``virtwire ctl port/set``: the merged settings are checked as a
whole first, and only then applied, so a refused change leaves the old settings in force.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from virtwire.netlab import keys
from virtwire.netlab.keys import NetlabError

__all__ = ["wire_port", "set_port", "port_settings", "shaped"]

log = logging.getLogger(__name__)


def _opts(cfg: Any) -> dict[str, str]:
    opts = getattr(cfg, "netlab", None)
    if opts is None:
        opts = {}
        cfg.netlab = opts
    return opts


def wants_shaping(opts: Mapping[str, str]) -> bool:
    if opts.get("shape", "off").lower() in ("on", "yes", "true", "1"):
        return True
    return any(k.partition(".")[0] in keys.DIRECTIONS for k in opts)


def wire_port(cfg: Any, backends: list[Any], switches: Mapping[str, Any]) -> list[Any]:
    """Apply a port's netlab keys (module docstring); returns the backends to use."""
    opts = _opts(cfg)
    if cfg.backend == "switch":
        sw = switches.get(cfg.switch)
        if sw is not None:
            _wire_switch(cfg, sw, backends, opts)
    if not wants_shaping(opts):
        return backends
    from virtwire.backends.shape import ShapedBackend

    tx, rx = keys.dir_spec(opts, "tx"), keys.dir_spec(opts, "rx")
    seed = int(opts["seed"]) if "seed" in opts else None
    return [ShapedBackend(b, tx=tx, rx=rx, seed=None if seed is None else seed + i)
            for i, b in enumerate(backends)]


def _wire_switch(cfg: Any, sw: Any, backends: list[Any], opts: Mapping[str, str]) -> None:
    vlan = keys.parse_vlan("vlan", opts["vlan"]) if "vlan" in opts else None
    trunk = keys.parse_vlan_list("trunk", opts["trunk"]) if "trunk" in opts else None
    for b in backends:
        if hasattr(b, "set_vlans"):
            b.set_vlans(vlan, trunk)
    if ("uplink_vlan" in opts or "uplink_trunk" in opts) and sw.uplink is None:
        raise NetlabError("uplink_vlan=/uplink_trunk= need an uplink (uplink=TAP)")
    if "uplink_vlan" in opts or "uplink_trunk" in opts:
        uv = keys.parse_vlan("uplink_vlan", opts["uplink_vlan"]) if "uplink_vlan" in opts else None
        ut = (keys.parse_vlan_list("uplink_trunk", opts["uplink_trunk"])
              if "uplink_trunk" in opts else None)
        sw.set_uplink_vlans(uv, ut)
    vx = getattr(cfg, "netlab_vxlan", None)
    if vx is not None and getattr(sw, "overlay", None) is None and sw.uplink is not None:
        from virtwire.netlab.overlay import join_vxlan

        sw.overlay = join_vxlan(sw.uplink.tap.ifname, vx, dev=opts.get("uplink_dev"))
    ov = getattr(sw, "overlay", None)
    if ov is not None:
        if cfg.mtu is None:
            cfg.mtu = ov.guest_mtu
            log.info("port %s: MTU %d (VXLAN over %s, MTU %d, %d bytes overhead); the guest "
                     "learns it with VIRTIO_NET_F_MTU (QEMU: host_mtu=%d)", cfg.name,
                     ov.guest_mtu, ov.dev, ov.underlay_mtu, ov.overhead, ov.guest_mtu)
        elif cfg.mtu > ov.guest_mtu:
            raise NetlabError(f"mtu={cfg.mtu}: VXLAN over {ov.dev} (MTU {ov.underlay_mtu}) "
                              f"carries at most {ov.guest_mtu} (50 bytes of VXLAN overhead)")


def shaped(port: Any) -> list[Any]:
    from virtwire.backends.shape import ShapedBackend

    return [b for b in port.backends if isinstance(b, ShapedBackend)]


def port_settings(port: Any) -> dict[str, str]:
    return dict(_opts(port.config))


def set_port(port: Any, changes: Mapping[str, str]) -> dict[str, str]:
    """Change a running port's settings (``virtwire ctl port/set``); returns the new settings.

    A value of "" removes a key (back to its default). Everything is checked before anything
    changes: on NetlabError the port keeps its old settings."""
    if not changes:
        raise NetlabError("port/set: nothing to set (give KEY=VALUE ...)")
    cfg = port.config
    merged = dict(_opts(cfg))
    for k, v in changes.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise NetlabError("port/set: keys and values are strings")
        if not keys.is_key(k):
            keys.parse_value(k, v)  # raises: unknown key, with the list
        if k not in keys.RUNTIME_KEYS:
            raise NetlabError(f"{k}= cannot change at run time (restart serve with it)")
        if v == "":
            merged.pop(k, None)
        else:
            keys.parse_value(k, v)
            merged[k] = v
    tx, rx = keys.dir_spec(merged, "tx"), keys.dir_spec(merged, "rx")
    touches_shape = any(k.partition(".")[0] in keys.DIRECTIONS for k in changes)
    sb = shaped(port)
    if touches_shape and not sb:
        raise NetlabError(f"port {cfg.name} was started without shaping: add shape=on (or any "
                          "tx./rx. key) to its --port to change impairments at run time")
    vlan_keys = {"vlan", "trunk"} & set(changes)
    if vlan_keys and cfg.backend != "switch":
        raise NetlabError(f"{sorted(vlan_keys)[0]}= needs backend=switch")
    # Checked: apply.
    for b in sb:
        b.update(tx, rx)
    if vlan_keys:
        vlan = keys.parse_vlan("vlan", merged["vlan"]) if "vlan" in merged else None
        trunk = keys.parse_vlan_list("trunk", merged["trunk"]) if "trunk" in merged else None
        for b in port.backends:
            inner = getattr(b, "inner", b)
            if hasattr(inner, "set_vlans"):
                inner.set_vlans(vlan, trunk)
    cfg.netlab = merged
    log.info("port %s: settings now %s", cfg.name,
             ",".join(f"{k}={v}" for k, v in sorted(merged.items())) or "(none)")
    return dict(merged)
