"""Target names for ``virtwire conform``: ``make_target(spec)`` -> a ``Target``."""

from __future__ import annotations

from virtwire.conform.targets import QemuTarget, Target, VhostUserTarget
from virtwire.conform.targets_local import LocalTarget
from virtwire.conform.targets_pci import PciProxyTarget
from virtwire.errors import CliError

__all__ = ["make_target", "TARGET_HELP"]

TARGET_HELP = (
    "qemu (QEMU's virtio-net-pci, modern, over qtest), qemu-legacy (the transitional device "
    "through its legacy I/O BAR), qemu-tap (modern, on a vnet_hdr TAP: offloads), dpdk (DPDK "
    "testpmd's vhost PMD, io forwarding), virtwire (virtwire serve's vhost-user back end on a "
    "TAP), virtwire-pci, virtwire-pci-legacy (virtwire's whole PCI device behind QEMU's "
    "x-pci-proxy-dev, modern or transitional, over qtest), local[:OPTIONS] (virtwire's "
    "device model in process, memory peer), "
    "vhost-user:PATH[,loopback][,mode=server|client] (any back end: mode=server (default) it "
    "listens at PATH, mode=client it connects to PATH where we listen; loopback: it echoes "
    "every frame)"
)


def make_target(spec_: str, mtu: int | None = None) -> Target:
    """A target by name (``TARGET_HELP``); ``mtu`` is what our vhost-user front end reports
    in its own config space (a back end without VHOST_USER_PROTOCOL_F_CONFIG)."""
    if mtu is not None and not 68 <= mtu <= 65535:
        raise CliError(f"--mtu {mtu}: must be 68..65535 (virtio 1.2 §5.1.4.1)")
    simple = {"qemu": lambda: QemuTarget(), "qemu-legacy": lambda: QemuTarget(legacy=True),
              "qemu-transitional": lambda: QemuTarget(legacy=True),
              "qemu-packed": lambda: QemuTarget(packed=True),
              "qemu-tap": lambda: QemuTarget(tap=True),
              "virtwire-pci": lambda: PciProxyTarget(),
              "virtwire-pci-legacy": lambda: PciProxyTarget(legacy=True)}
    if spec_ in simple:
        return simple[spec_]()
    if spec_ in ("dpdk", "virtwire"):
        return VhostUserTarget(spec_, mtu=mtu or 1500)
    if spec_ == "local" or spec_.startswith("local:"):
        opts = spec_.partition(":")[2] or "mtu=1500"
        try:
            return LocalTarget(opts)
        except ValueError as e:
            raise CliError(f"conform {spec_}: {e}") from None
    if spec_.startswith("vhost-user:") and len(spec_) > len("vhost-user:"):
        return _vhost_user_path(spec_.split(":", 1)[1], mtu)
    raise CliError(f"unknown conformance target {spec_!r}: {TARGET_HELP}")


def _vhost_user_path(rest: str, mtu: int | None) -> Target:
    path, _, tail = rest.partition(",")
    if not path:
        raise CliError("vhost-user: give a socket path, e.g. vhost-user:/tmp/vu.sock")
    opts = dict(p.partition("=")[::2] for p in tail.split(",") if p) if tail else {}
    unknown = set(opts) - {"loopback", "mode"}
    if unknown:
        raise CliError(f"vhost-user: unknown option(s) {sorted(unknown)} (loopback, mode)")
    mode = opts.get("mode", "server")
    if mode not in ("server", "client"):
        raise CliError(f"vhost-user: mode={mode}: the back end's role is server or client")
    t = VhostUserTarget("path", path, listen=mode == "client", mtu=mtu or 1500)
    if "loopback" in opts:  # the back end sends every frame back (testpmd io, a reflector)
        t.loopback = t.has_peer = True
        t.name += ",loopback"
    if mode == "client":
        t.name += ",mode=client"
    return t
