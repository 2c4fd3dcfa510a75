"""Configuration dataclasses for ``virtwire serve``: ports, their backends, device options.

A port is written QEMU-style on the command line::

    --port vhost-user,path=/tmp/vw0.sock,backend=tap,ifname=vwtap0,queues=2,mrg_rxbuf=off

``parse_port`` turns that into a ``PortConfig`` and refuses unknown keys, bad values and missing
required keys with a one-line ``CliError`` (``keyvals``: QEMU's ``,,`` for a comma in a value).
Device feature switches (``mrg_rxbuf``, ``csum``, ``packed``...) are the device option table's
(``net.options.SWITCHES``, QEMU's names and on/off values); they end up in
``PortConfig.features`` as {name: bool} and are applied by the wiring (``serve.build``) to the
device model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from virtwire.errors import CliError
from virtwire.keyvals import parse_key_values, parse_on_off, split_options
from virtwire.net.options import SWITCHES, is_unicast_mac
from virtwire.netlab import keys as netlab_keys

__all__ = ["PortConfig", "parse_port", "BACKENDS"]

BACKENDS = ("tap", "null", "switch", "memory")

_KEYS = {"path", "server", "backend", "ifname", "switch", "uplink", "queues", "mac", "mtu",
         "queue_size", "name", "mode", "group", "allow-uid", *SWITCHES}


@dataclass
class PortConfig:
    """One ``--port``: a vhost-user socket serving one virtio-net device with one backend."""

    path: str
    server: bool = True
    backend: str = "tap"
    ifname: str | None = None
    switch: str = "sw0"
    uplink: str | None = None  # switch backend: an optional TAP joined to the switch
    queues: int = 1  # queue pairs
    mac: str = "52:54:00:12:34:56"
    mtu: int | None = None
    queue_size: int = 1024  # the largest ring the front end may configure
    name: str = ""
    features: dict[str, bool] = field(default_factory=dict)
    netlab: dict[str, str] = field(default_factory=dict)  # tx.loss=, vlan=... (netlab.keys)
    socket_mode: int = 0o600  # mode=: the listening socket's permissions
    group: int | None = None  # group=: its group (QEMU's under libvirt), a gid
    allow_uids: frozenset[int] | None = None  # allow-uid=U1:U2: SO_PEERCRED allow-list

    @property
    def packed(self) -> bool:
        return self.features.get("packed", True)

    def describe(self) -> str:
        extra = "".join(f",{k}={'on' if v else 'off'}" for k, v in self.features.items())
        be = f"tap:{self.ifname}" if self.backend == "tap" else (
            f"switch:{self.switch}" if self.backend == "switch" else self.backend)
        return (f"vhost-user {self.path} ({'server' if self.server else 'client'}) -> {be}, "
                f"{self.queues} queue pair(s){extra}")


class _PortKeys:
    """The keys ``--port`` takes: the table's, and netlab's (``tx.loss=``, ``vlan=``, ...)."""

    def __contains__(self, key: object) -> bool:
        return key in _KEYS or (isinstance(key, str) and netlab_keys.is_key(key))

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(_KEYS))

    def __len__(self) -> int:
        return len(_KEYS)


def parse_port(text: str, index: int = 0) -> PortConfig:
    """Parse ``vhost-user,key=val,...`` (see module docstring)."""
    parts = [p for p in split_options(text) if p]
    if not parts or parts[0] != "vhost-user":
        raise CliError(f"--port {text!r}: expected 'vhost-user,path=...,backend=...'")
    opts = parse_key_values("--port", parts[1:], _PortKeys())
    if "path" not in opts or not opts["path"]:
        raise CliError("--port vhost-user: missing path=SOCKET")
    cfg = PortConfig(path=opts["path"], name=opts.get("name") or f"port{index}")
    if "server" in opts:
        cfg.server = parse_on_off("--port ", "server", opts["server"])
    backend = opts.get("backend", "tap")
    if backend not in BACKENDS:
        raise CliError(f"--port backend={backend}: expected one of {', '.join(BACKENDS)}")
    cfg.backend = backend
    if backend == "tap":
        cfg.ifname = opts.get("ifname") or f"vwtap{index}"
        name = cfg.ifname
        if len(name.encode()) > 15 or any(c in name for c in "/: \t"):
            raise CliError(f"--port ifname={name}: 1-15 characters, no '/', ':' or spaces")
    elif "ifname" in opts:
        raise CliError(f"--port ifname= needs backend=tap (got backend={backend})")
    if backend == "switch":
        cfg.switch = opts.get("switch", "sw0")
        cfg.uplink = opts.get("uplink")
    elif "switch" in opts or "uplink" in opts:
        raise CliError("--port switch=/uplink= need backend=switch")
    for key in ("queues", "queue_size", "mtu"):
        if key in opts:
            try:
                val = int(opts[key], 0)
            except ValueError:
                raise CliError(f"--port {key}={opts[key]}: not a number") from None
            lo, hi = {"queues": (1, 64), "queue_size": (2, 32768), "mtu": (68, 65535)}[key]
            if not lo <= val <= hi:
                raise CliError(f"--port {key}={val}: expected {lo}..{hi}")
            setattr(cfg, key, val)
    if cfg.queue_size & (cfg.queue_size - 1):
        raise CliError(f"--port queue_size={cfg.queue_size}: not a power of 2")
    if "mac" in opts:
        if not is_unicast_mac(opts["mac"]):
            raise CliError(f"--port mac={opts['mac']}: expected a unicast xx:xx:xx:xx:xx:xx")
        cfg.mac = opts["mac"].lower()
    for k in SWITCHES:
        if k in opts:
            cfg.features[k] = parse_on_off("--port ", k, opts[k])
    if cfg.queues > 1 and cfg.features.get("mq") is False:
        raise CliError(f"--port queues={cfg.queues} needs mq=on")
    try:  # netlab: impairments, rate limits, VLANs, VXLAN uplink (netlab/keys.py)
        netlab_keys.apply_to_port(cfg, opts)
    except netlab_keys.NetlabError as e:
        raise CliError(f"--port {e}") from None
    _parse_access(cfg, opts)
    return cfg


def _parse_access(cfg: PortConfig, opts: dict[str, str]) -> None:
    """``mode=0660``, ``group=NAME|GID``, ``allow-uid=NAME|UID[:...]`` (who may connect)."""
    import grp
    import pwd

    if "mode" in opts:
        try:
            cfg.socket_mode = int(opts["mode"], 8)
        except ValueError:
            raise CliError(f"--port mode={opts['mode']}: expected an octal mode") from None
        if not 0 <= cfg.socket_mode <= 0o777:
            raise CliError(f"--port mode={opts['mode']}: expected 0..0777")
    if "group" in opts:
        g = opts["group"]
        try:
            cfg.group = int(g) if g.isdigit() else grp.getgrnam(g).gr_gid
        except KeyError:
            raise CliError(f"--port group={g}: no such group") from None
    if "allow-uid" in opts:
        uids = set()
        for u in opts["allow-uid"].split(":"):
            try:
                uids.add(int(u) if u.isdigit() else pwd.getpwnam(u).pw_uid)
            except KeyError:
                raise CliError(f"--port allow-uid={u}: no such user") from None
        cfg.allow_uids = frozenset(uids)
