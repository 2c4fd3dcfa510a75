"""Wiring for ``virtwire serve``: ports -> devices -> backends -> vhost-user sockets -> one loop.

Theory of operation
-------------------
This is the one module that knows every layer (Firecracker's builder role). For each ``--port``
(``config.PortConfig``) ``build`` creates:

- the frame backend of each queue pair: a TAP queue (``IFF_MULTI_QUEUE`` when there are several
  pairs), a port of an in-process learning switch, ``null`` or ``memory``;
- the virtio-net device model (``net.device.VirtioNet``) with those backends and the port's
  feature switches, hosted through ``hosts.vhost_device.VirtioDeviceHost`` (2 rings per pair: QEMU
  keeps the control queue);
- the ``VhostUserBackend`` on the port's socket (server or client).

Everything is served by one ``loop.EventLoop``. Frames flow like this: a guest kick on a TX ring
wakes the loop; the device drains the ring into the backend in one batch. A backend fd becoming
readable (TAP, or the eventfd of an in-process backend) makes the device fill the pair's RX ring
in one batch. RX flow control is ``hosts.pump.BackendPump`` (``Port.pump``): a pair's backend fd
is *not* watched while there is a reason -- "device": its RX ring ran dry (the device's
``rx_watch(pair, False)``; it re-enables notifications, and says ``True`` once the guest's RX
kick brought buffers) -- or "ring": the RX ring is not started/enabled yet (the next RX kick
clears it). Without that a level-triggered TAP would spin the loop.

Counters: ``Server.stats()`` (JSON-ready) merges the back end's per-ring counters (kicks,
interrupts) with the device's (frames, bytes, drops) and the backends'. It is served on a small
UNIX control socket (``virtwire stats``) and dumped to stderr on SIGUSR1.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from virtwire.config import PortConfig
from virtwire.errors import UserFacingError
from virtwire.hosts.pump import BackendPump
from virtwire.hosts.vhost_device import VirtioDeviceHost
from virtwire.hosts.vhost_user import SocketAccess, VhostUserBackend
from virtwire.loop import EventLoop
from virtwire.netlab import control as netlab_control
from virtwire.netlab import wire as netlab_wire

log = logging.getLogger(__name__)

MEMORY_BACKEND_KEEP = 256  # TX frames a ``backend=memory`` port remembers (the last ones)

__all__ = ["Server", "Port", "build", "qemu_args", "libvirt_xml", "query_stats"]


@dataclass
class Port:
    config: PortConfig
    device: Any
    host: VirtioDeviceHost
    vhost: VhostUserBackend
    backends: list[Any]
    pump: BackendPump  # watches the backends' fds (``Port.pump.paused``: why one is not)


def _make_backends(cfg: PortConfig, switches: dict[str, Any]) -> list[Any]:
    pairs = cfg.queues
    if cfg.backend == "tap":
        from virtwire.backends.tap import TapBackend

        assert cfg.ifname is not None
        out = []
        try:
            for _ in range(pairs):
                out.append(TapBackend(cfg.ifname, multi_queue=pairs > 1))
        except Exception:
            for b in out:
                b.close()
            raise
        return out
    if cfg.backend == "null":
        from virtwire.backends.null import NullBackend

        return [NullBackend(f"null:{cfg.name}.{i}") for i in range(pairs)]
    if cfg.backend == "memory":
        from virtwire.backends.memory import MemoryBackend

        # Bounded: a guest sending forever must not grow serve (issue 14, defect 10).
        return [MemoryBackend(f"memory:{cfg.name}.{i}", keep=MEMORY_BACKEND_KEEP)
                for i in range(pairs)]
    if cfg.backend == "switch":
        from virtwire.backends import switch as swmod

        sw = switches.get(cfg.switch)
        if sw is None:
            sw = switches[cfg.switch] = swmod.L2Switch(cfg.switch)
        if cfg.uplink and sw.uplink is None:
            sw.add_uplink(cfg.uplink)
        return list(sw.port(cfg.name, pairs).queues)  # one switch port, a backend per pair
    raise UserFacingError(f"unknown backend {cfg.backend!r}")


def _make_device(cfg: PortConfig, backends: list[Any]) -> Any:
    """The virtio-net device model for one port (``net.device.VirtioNet``), QEMU-style options."""
    from virtwire.net.device import VirtioNet

    opts = {k: ("on" if v else "off") for k, v in cfg.features.items()}
    return VirtioNet(backends, options=opts, mac=cfg.mac, queues=cfg.queues,
                     queue_size=cfg.queue_size, mtu=cfg.mtu, name=cfg.name)


class Server:
    """All ports of one ``virtwire serve`` process and the loop that serves them."""

    def __init__(self, loop: EventLoop | None = None) -> None:
        self.loop = loop or EventLoop()
        self.ports: list[Port] = []
        self.switches: dict[str, Any] = {}
        self.control: socket.socket | None = None
        self.control_path: str | None = None
        self._ctl_links: list[str] = []  # PORT_PATH.ctl -> control socket, for ports 2..N

    # -- building -------------------------------------------------------------------------------
    def add_port(self, cfg: PortConfig) -> Port:
        backends = _make_backends(cfg, self.switches)
        try:
            backends = netlab_wire.wire_port(cfg, backends, self.switches)  # netlab: shaping..
            device = _make_device(cfg, backends)
        except Exception:
            for b in backends:
                b.close()
            raise
        host = VirtioDeviceHost(device, num_rings=2 * cfg.queues)
        vhost = VhostUserBackend(host, self.loop, cfg.path, server=cfg.server, name=cfg.name,
                                 packed=cfg.packed, queue_pairs=cfg.queues,
                                 max_queue_size=cfg.queue_size,
                                 access=SocketAccess(cfg.socket_mode, cfg.group, cfg.allow_uids))
        host.on_ring_error = vhost.ring_error
        # The device serves a pair's RX only while its ring is started and enabled; an RX
        # kick means the guest posted buffers (a paused backend is watched again).
        vrings = vhost.vrings
        pump = BackendPump(self.loop, device, backends, ready=lambda pair: (
            vrings[2 * pair].started and vrings[2 * pair].enabled and device.active))
        host.on_kicked = pump.kicked
        # When a batch budget ran out, the ring is served again.
        device.more_work = vhost.kick_ring
        port = Port(cfg, device, host, vhost, backends, pump)
        self.ports.append(port)
        return port

    def start(self, control_path: str | None = None) -> None:
        for p in self.ports:
            p.vhost.start()
        if control_path:
            self._open_control(control_path)
            self._link_control(control_path)
        self.loop.add_signal_handler(signal.SIGUSR1, self._dump_stats)
        self.loop.add_signal_handler(signal.SIGTERM, lambda _s: self.loop.stop())
        self.loop.add_signal_handler(signal.SIGINT, lambda _s: self.loop.stop())

    def run(self) -> None:
        self.loop.run()

    def close(self) -> None:
        for p in self.ports:
            p.vhost.close()
            p.pump.close()
            for be in p.backends:
                be.close()
        for sw in self.switches.values():
            close = getattr(sw, "close", None)
            if close:
                close()
        for link in self._ctl_links:
            try:
                os.unlink(link)
            except OSError:
                pass
        self._ctl_links.clear()
        if self.control is not None:
            self.loop.remove_reader(self.control)
            self.control.close()
            self.control = None
            if self.control_path:
                try:
                    os.unlink(self.control_path)
                except OSError:
                    pass
        self.loop.close()

    # -- counters -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        ports = []
        for p in self.ports:
            vs = p.vhost.stats()
            dev = p.device.stats() if hasattr(p.device, "stats") else {}
            dq = dev.get("queues", [])
            for ring in vs["rings"]:
                i = ring["index"]
                if i < len(dq):
                    for k, v in dq[i].items():
                        ring.setdefault(k, v)
                ring["role"] = ("rx" if i % 2 == 0 else "tx") + str(i // 2)
            ports.append({
                "name": p.config.name,
                "config": p.config.describe(),
                # What a guest NIC on this port must match (virtwire libvirt interface/attach).
                "attach": {"path": p.config.path, "server": p.config.server,
                           "queues": p.config.queues, "mac": p.config.mac},
                "vhost_user": vs,
                "device": {k: v for k, v in dev.items() if k != "queues"},
                "backends": [{"name": getattr(b, "name", "?"), **b.stats()} for b in p.backends],
            })
        return {"ports": ports, "loop": {"iterations": self.loop.iterations,
                                         "errors": self.loop.errors}}

    def _link_control(self, control_path: str) -> None:
        """Make ``PORT_PATH.ctl`` reach the control socket for every port, so tools that know only
        a port's socket (``virtwire stats PATH``, ``libvirt check``/``domifstat``) find it."""
        for p in self.ports:
            link = p.config.path + ".ctl"
            if os.path.abspath(link) == os.path.abspath(control_path):
                continue
            try:
                if os.path.islink(link):
                    os.unlink(link)  # left by a serve that was killed
                os.symlink(os.path.abspath(control_path), link)
            except OSError as e:
                log.warning("no %s for port %s: %s", link, p.config.name, e.strerror or e)
                continue
            self._ctl_links.append(link)

    def _dump_stats(self, _signum: int) -> None:
        sys.stderr.write(json.dumps(self.stats()) + "\n")
        sys.stderr.flush()

    def _open_control(self, path: str) -> None:
        try:
            if os.path.exists(path):
                os.unlink(path)
        except OSError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(path)
        except OSError as e:
            s.close()
            raise OSError(e.errno, e.strerror, path) from None
        s.listen(4)
        s.setblocking(False)
        self.control, self.control_path = s, path
        self.loop.add_reader(s, self._on_control)

    def _on_control(self) -> None:
        assert self.control is not None
        try:
            conn, _ = self.control.accept()
        except BlockingIOError:
            return
        netlab_control.serve_client(self, conn)  # netlab: counters, or a JSON request (ctl)


def build(configs: list[PortConfig], loop: EventLoop | None = None) -> Server:
    """Create every port of ``configs`` (closing what was made if one fails)."""
    srv = Server(loop)
    try:
        for cfg in configs:
            srv.add_port(cfg)
    except BaseException:
        srv.close()
        raise
    return srv


def query_stats(control_path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running ``virtwire serve`` for its counters over its control socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(control_path)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise UserFacingError(f"cannot read counters from {control_path}: {e.strerror or e}") \
            from None
    finally:
        s.close()
    return json.loads(data)


# -- what a user needs to attach a guest --------------------------------------------------------
def qemu_args(cfg: PortConfig, index: int = 0, *, tcg: bool = True,
              memory: str = "1G") -> list[str]:
    """QEMU arguments attaching a guest NIC to this port (memfd RAM shared with us)."""
    cid, nid = f"vwchr{index}", f"vwnet{index}"
    if cfg.server:
        chardev = f"socket,id={cid},path={cfg.path},reconnect=1"
    else:
        chardev = f"socket,id={cid},path={cfg.path},server=on"
    dev = f"virtio-net-pci,netdev={nid},mac={cfg.mac}"
    if cfg.queues > 1:
        dev += ",mq=on"
    for k, v in cfg.features.items():
        if k in ("mq",):
            continue
        dev += f",{k}={'on' if v else 'off'}"
    if cfg.mtu:
        # QEMU owns virtio-net's config space over vhost-user: without host_mtu it offers no
        # VIRTIO_NET_F_MTU and the guest never learns the port's MTU (e.g. VXLAN's 1450).
        dev += f",host_mtu={cfg.mtu}"
    if tcg:
        dev += ",vectors=0"  # QEMU 7.2 under TCG crashes with MSI-X on vhost-user
    elif cfg.queues > 1:
        dev += f",vectors={2 * cfg.queues + 2}"
    args = []
    if index == 0:
        args += ["-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
                 "-machine", "memory-backend=mem"]
    args += ["-chardev", chardev,
             "-netdev", f"vhost-user,id={nid},chardev={cid},queues={cfg.queues}",
             "-device", dev]
    return args


def libvirt_xml(cfg: PortConfig, alias: str | None = None) -> str:
    """The libvirt ``<interface type='vhostuser'>`` element (plus the memory note it needs).

    ``alias`` (a user alias, ``ua-...``) adds ``<alias name=...>``, which a TCG domain's
    ``<qemu:override>`` (vectors=0) refers to; see ``virtwire.libvirt.check``.
    """
    mode = "client" if cfg.server else "server"  # QEMU's role, the opposite of ours
    reconnect = "\n    <reconnect enabled='yes' timeout='1'/>" if cfg.server else ""
    path = xml_escape(cfg.path, {"'": "&apos;", '"': "&quot;"})
    src = (f"<source type='unix' path='{path}' mode='{mode}'>{reconnect}\n  </source>"
           if reconnect else f"<source type='unix' path='{path}' mode='{mode}'/>")
    driver = f"\n  <driver queues='{cfg.queues}'/>" if cfg.queues > 1 else ""
    if cfg.mtu:
        driver += f"\n  <mtu size='{cfg.mtu}'/>"  # libvirt passes it as QEMU's host_mtu
    return (
        "<!-- guest RAM must be shared: <memoryBacking><source type='memfd'/>"
        "<access mode='shared'/></memoryBacking> -->\n"
        "<interface type='vhostuser'>\n"
        f"  <mac address='{cfg.mac}'/>\n"
        f"  {src}\n"
        f"  <model type='virtio'/>{driver}\n"
        + (f"  <alias name='{alias}'/>\n" if alias else "")
        + "</interface>"
    )
