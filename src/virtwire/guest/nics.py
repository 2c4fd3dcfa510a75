"""NIC kinds for the guest launcher: ``--net KIND,key=val,...`` -> QEMU arguments and sidecars.

Registry interface (stable; other modules register kinds against it)
--------------------------------------------------------------------
A kind is a name plus a *builder*::

    from virtwire.guest.nics import NicContext, NicPlan, NicSpec, register_nic_kind

    def build_vhost_user(spec: NicSpec, ctx: NicContext) -> NicPlan:
        sock = ctx.tmpdir / f"{ctx.id}.sock"
        return NicPlan(
            qemu_args=["-chardev", f"socket,id={ctx.id}c,path={sock}",
                       "-netdev", f"vhost-user,id={ctx.id},chardev={ctx.id}c",
                       "-device", f"virtio-net-pci,netdev={ctx.id},mac={ctx.mac},vectors=0"],
            start=lambda: ...,   # called before QEMU starts (e.g. start a device server)
            stop=lambda: ...,    # called after QEMU has exited (always, also on failure)
        )

    register_nic_kind("vhost-user", build_vhost_user, keys={"socket", "queues"},
                      help="virtwire's device over vhost-user")

* ``NicSpec`` is the parsed ``--net`` value: ``kind``, ``options`` (str -> str, only the keys the
  kind declared plus the generic ``ip``, ``mac``) and ``index`` (0 for the first NIC: eth0).
* ``NicContext`` carries what a builder may need from the VM: a QEMU id for this NIC (``net0``), a
  MAC (``mac=`` if given, else one derived from the VM name and index), the VM's private tmpdir,
  its accelerator (under TCG, vhost-user devices need ``vectors=0``), its netns, and the path of
  the qtest socket (only set when some plan asked for it).
* ``NicPlan``: ``qemu_args`` (appended to QEMU's command line), ``pass_fds`` (fds QEMU inherits
  at their own numbers, e.g. a socketpair end for ``x-pci-proxy-dev,fd=N``), optional ``start``/
  ``stop`` hooks (a sidecar: started before QEMU, stopped after it exits), ``needs_qtest`` (the VM
  then adds ``-chardev socket,id=qt0,path=..,server=on,wait=off -object qtest,id=qt,chardev=qt0,
  log=/dev/null`` once; ``ctx.qtest_path`` is that path), and ``after_launch`` (called with the
  running ``GuestVM`` once QEMU is up; e.g. connect to the qtest socket).

Kinds register at import (``qemu-tap`` and ``none`` here; ``pci`` and ``vhost-user`` in their
own modules). A kind not yet registered is looked up once in the module
``virtwire.guest.nic_<kind>`` (dashes become underscores), so a new kind needs no edit here.
The generic keys ``ip`` (guest address ADDR/LEN for this NIC) and ``mac`` are accepted by every
kind; the launcher handles ``ip`` (kernel argument ``vw.ipN``).
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtwire.errors import CliError
from virtwire.keyvals import parse_key_values, split_options
from virtwire.net.options import MAC_RE
from virtwire.netns import IFNAMSIZ, valid_ifname

GENERIC_KEYS = frozenset({"ip", "mac"})
_IP_RE = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})/(\d{1,2})$")


@dataclass(frozen=True)
class NicSpec:
    """A parsed ``--net KIND,key=val,...``."""

    kind: str
    options: dict[str, str] = field(default_factory=dict)
    index: int = 0

    def __str__(self) -> str:
        return ",".join([self.kind, *(f"{k}={v}" for k, v in self.options.items())])


@dataclass(frozen=True)
class NicContext:
    """What a builder knows about the VM it builds for."""

    index: int
    id: str
    mac: str
    tmpdir: Path
    accel: str
    vm_name: str
    netns: str | None
    qtest_path: Path


@dataclass
class NicPlan:
    """What a NIC adds to a VM launch."""

    qemu_args: list[str] = field(default_factory=list)
    pass_fds: list[int] = field(default_factory=list)
    start: Callable[[], None] | None = None
    stop: Callable[[], None] | None = None
    needs_qtest: bool = False
    after_launch: Callable[[Any], None] | None = None


NicBuilder = Callable[[NicSpec, NicContext], NicPlan]


@dataclass(frozen=True)
class NicKind:
    name: str
    builder: NicBuilder
    keys: frozenset[str]
    required: frozenset[str]
    help: str
    check: Callable[[NicSpec], None] | None = None


_KINDS: dict[str, NicKind] = {}


def register_nic_kind(name: str, builder: NicBuilder, *, keys: Iterable[str] = (),
                      required: Iterable[str] = (), help: str = "",
                      check: Callable[[NicSpec], None] | None = None) -> None:
    """Register (or replace) a NIC kind.

    ``keys``: option names it accepts besides ip/mac; ``required``: keys that must be given;
    ``check``: called with the parsed spec at parse time (raise CliError for a bad value), so
    bad flags are reported before anything is started.
    """
    if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise ValueError(f"bad NIC kind name {name!r}")
    _KINDS[name] = NicKind(name, builder, frozenset(keys) | GENERIC_KEYS, frozenset(required),
                           help, check)


def get_nic_kind(name: str) -> NicKind:
    """The registered kind ``name``; tries ``virtwire.guest.nic_<name>`` once if unknown."""
    if name not in _KINDS and re.fullmatch(r"[a-z][a-z0-9-]*", name):
        modname = "virtwire.guest.nic_" + name.replace("-", "_")
        try:
            importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
    if name not in _KINDS:
        raise CliError(f"unknown --net kind {name!r} (known: {', '.join(nic_kinds())})")
    return _KINDS[name]


def nic_kinds() -> list[str]:
    """Registered kinds plus those a ``virtwire.guest.nic_<kind>`` module would register."""
    import virtwire.guest

    found = {m.name[4:].replace("_", "-") for m in pkgutil.iter_modules(virtwire.guest.__path__)
             if m.name.startswith("nic_")}
    return sorted(set(_KINDS) | found)


def parse_nic_spec(text: str, index: int = 0) -> NicSpec:
    """Parse ``KIND,key=val,...`` (``,,`` is a comma in a value); unknown kinds, unknown keys and
    bad values raise CliError."""
    parts = split_options(text)
    kind_name = parts[0]
    if not kind_name:
        raise CliError(f"--net {text!r}: missing kind (known: {', '.join(nic_kinds())})")
    kind = get_nic_kind(kind_name)
    options = parse_key_values(f"--net {kind_name}", parts[1:], kind.keys)
    missing = kind.required - options.keys()
    if missing:
        raise CliError(f"--net {kind_name}: missing key {sorted(missing)[0]!r}")
    if "mac" in options:
        check_mac(options["mac"])
    if "ip" in options:
        check_ip(options["ip"])
    spec = NicSpec(kind_name, options, index)
    if kind.check:
        kind.check(spec)
    return spec


def check_mac(mac: str) -> str:
    if not MAC_RE.match(mac):
        raise CliError(f"bad MAC address {mac!r} (expected xx:xx:xx:xx:xx:xx)")
    if int(mac[:2], 16) & 1:
        raise CliError(f"bad MAC address {mac!r}: multicast bit set")
    return mac.lower()


def check_ip(ip: str) -> str:
    m = _IP_RE.match(ip)
    if not m or any(int(x) > 255 for x in m.groups()[:4]) or not 0 < int(m.group(5)) <= 32:
        raise CliError(f"bad guest address {ip!r} (expected A.B.C.D/LEN, e.g. 10.1.2.3/24)")
    return ip


def check_ifname(name: str) -> str:
    """Validate a Linux interface name (``dev_valid_name``): 1-15 bytes, no '/', ':' or space."""
    if not valid_ifname(name):
        raise CliError(f"bad TAP name {name!r}: 1-{IFNAMSIZ - 1} characters, no '/', ':' "
                       "or whitespace")
    return name


def derive_mac(vm_name: str, index: int) -> str:
    """A locally administered unicast MAC, stable for (vm_name, index)."""
    h = hashlib.sha256(f"{vm_name}/{index}".encode()).digest()
    return f"52:54:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}:{index & 0xFF:02x}"


# ---------------------------------------------------------------------------------------------
# Built-in kinds


def _build_qemu_tap(spec: NicSpec, ctx: NicContext) -> NicPlan:
    ifname = check_ifname(spec.options.get("ifname", f"vwtap{ctx.index}"))
    return NicPlan(qemu_args=[
        "-netdev", f"tap,id={ctx.id},ifname={ifname},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev={ctx.id},mac={ctx.mac}",
    ])


def _build_none(spec: NicSpec, ctx: NicContext) -> NicPlan:
    return NicPlan()


def _check_qemu_tap(spec: NicSpec) -> None:
    if "ifname" in spec.options:
        check_ifname(spec.options["ifname"])


register_nic_kind("qemu-tap", _build_qemu_tap, keys={"ifname"}, check=_check_qemu_tap,
                  help="QEMU's own virtio-net-pci on a TAP (ifname=, mac=)")
register_nic_kind("none", _build_none, help="no NIC")
