"""Network namespaces: run code inside one, and make one with TAPs or a bridge for a while.

``run_in_netns(name, fn)`` runs ``fn`` inside namespace ``/run/netns/NAME`` (the TAP backend
opens its TAP there, the PCI NIC its backend, conform its packet sockets). ``netns``,
``netns_with_tap`` and ``netns_with_bridge`` make a namespace for a test, the demo or a
conformance target and remove it after.

Everything lives inside a namespace created here, so addresses only ever go on links we made and
nothing touches the host's own interfaces. Removal happens in ``finally`` blocks: a failing test
still deletes its namespace (which destroys the TAPs and bridges in it). Stop QEMU before leaving
the context: a namespace a process still uses disappears only when that process exits.

    with netns_with_tap("vwf", addr="10.7.0.1/24") as (ns, tap):
        with GuestVM(net=[f"qemu-tap,ifname={tap}"], ip="10.7.0.2/24", netns=ns.name) as vm: ...

    with netns_with_bridge("vwf", taps=2, addr="10.7.1.1/24") as (ns, bridge, taps): ...
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from virtwire.backends.base import BackendError
from virtwire.errors import UserFacingError

__all__ = ["IFNAMSIZ", "NetnsError", "TapError", "run_in_netns", "Netns", "netns",
           "netns_with_tap", "netns_with_bridge", "netns_exists", "unique_name", "valid_ifname"]

IFNAMSIZ = 16  # Linux interface names hold at most IFNAMSIZ - 1 = 15 bytes
CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")


class NetnsError(UserFacingError):
    """A namespace, TAP, bridge or address could not be set up."""


class TapError(NetnsError, BackendError):
    """A TAP could not be created, attached or configured (with the kernel's reason)."""


def run_in_netns(name: str | None, fn: Callable[[], _T],
                 error: type[Exception] = NetnsError) -> _T:
    """Run ``fn`` inside network namespace ``name`` (``/run/netns/NAME``), or here if None.

    # SAFETY: setns(CLONE_NEWNET) changes only the calling thread's namespace, so ``fn`` runs on
    # a short-lived thread of its own and the caller's namespace is untouched; fds it opens (a
    # tun fd, a socket) keep the namespace they were opened in after the thread is gone. libc's
    # setns is reached through ctypes (Python 3.11 has no os.setns).

    A namespace that cannot be entered raises ``error`` with the reason; what ``fn`` raises is
    raised in the caller's thread.
    """
    if not name:
        return fn()
    if "/" in name or name in (".", ".."):
        raise error(f"bad network namespace name {name!r}")
    box: dict[str, object] = {}

    def run() -> None:
        try:
            nsfd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            box["e"] = error(f"network namespace {name!r}: {e.strerror}")
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(nsfd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                box["e"] = error(f"cannot enter network namespace {name!r}: {os.strerror(err)}")
                return
            box["v"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["e"] = e
        finally:
            os.close(nsfd)

    t = threading.Thread(target=run, name=f"netns-{name}")
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]  # type: ignore[misc]
    return box["v"]  # type: ignore[return-value]


def _ip(args: Sequence[str], what: str, err: type[NetnsError] = NetnsError) -> str:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise NetnsError(f"{what}: the ip command (iproute2) is not installed") from e
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise err(f"{what}: {msg}")
    return proc.stdout


def unique_name(prefix: str, maxlen: int = IFNAMSIZ - 1) -> str:
    """``prefix`` + pid + random hex, cut to ``maxlen`` (namespace names have no such limit)."""
    base = f"{prefix}{os.getpid() % 100000}{secrets.token_hex(3)}"
    return base[:maxlen]


def valid_ifname(name: str) -> bool:
    return bool(name) and len(name.encode()) < IFNAMSIZ and name not in (".", "..") and not any(
        c in name for c in "/: \t\n")


@dataclass
class Netns:
    """A network namespace we created (``ip netns add``)."""

    name: str
    links: list[str] = field(default_factory=list)

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
            ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace; stdout/stderr captured as text."""
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              text=True, check=check, timeout=timeout)

    def add_tap(self, ifname: str, *, addr: str | None = None, master: str | None = None,
                up: bool = True, multi_queue: bool = False) -> str:
        """Create a persistent TAP ``ifname`` in this namespace (for QEMU to open by name);
        ``multi_queue`` makes it IFF_MULTI_QUEUE (one fd per queue pair)."""
        if not valid_ifname(ifname):
            raise TapError(f"cannot create TAP {ifname!r}: bad interface name "
                           f"(1-{IFNAMSIZ - 1} characters, no '/', ':' or whitespace)")
        _ip(["-n", self.name, "tuntap", "add", "dev", ifname, "mode", "tap",
             *(["multi_queue"] if multi_queue else [])],
            f"cannot create TAP {ifname!r}", TapError)
        self.links.append(ifname)
        self._configure(ifname, addr=addr, master=master, up=up)
        return ifname

    def add_bridge(self, ifname: str, *, addr: str | None = None) -> str:
        if not valid_ifname(ifname):
            raise NetnsError(f"cannot create bridge {ifname!r}: bad interface name")
        _ip(["-n", self.name, "link", "add", ifname, "type", "bridge"],
            f"cannot create bridge {ifname!r}")
        self.links.append(ifname)
        self._configure(ifname, addr=addr, up=True)
        return ifname

    def _configure(self, ifname: str, *, addr: str | None, master: str | None = None,
                   up: bool) -> None:
        if ifname not in self.links:
            raise NetnsError(f"{ifname} was not created by this helper")
        if master:
            _ip(["-n", self.name, "link", "set", ifname, "master", master],
                f"cannot attach {ifname} to {master}")
        if addr:
            _ip(["-n", self.name, "addr", "add", addr, "dev", ifname],
                f"cannot add {addr} to {ifname}")
        if up:
            _ip(["-n", self.name, "link", "set", ifname, "up"], f"cannot bring {ifname} up")

    def link_stats(self, ifname: str) -> dict[str, int]:
        """rx/tx packet and byte counters of one of our links."""
        out = {}
        for d in ("rx", "tx"):
            for what in ("packets", "bytes"):
                path = f"/sys/class/net/{ifname}/statistics/{d}_{what}"
                out[f"{d}_{what}"] = int(self.run(["cat", path]).stdout.strip() or 0)
        return out


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


@contextmanager
def netns(prefix: str = "vw", name: str | None = None) -> Iterator[Netns]:
    """A fresh network namespace (loopback up), deleted on exit even if the body fails."""
    name = name or f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise NetnsError(f"bad network namespace name {name!r}")
    _ip(["netns", "add", name], f"cannot create network namespace {name!r}")
    try:
        _ip(["-n", name, "link", "set", "lo", "up"], "cannot bring lo up")
        yield Netns(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@contextmanager
def netns_with_tap(prefix: str = "vw", *, addr: str | None = None,
                   tap: str | None = None) -> Iterator[tuple[Netns, str]]:
    """A namespace holding one TAP (with ``addr`` on the host end if given)."""
    with netns(prefix) as ns:
        name = ns.add_tap(tap or unique_name(prefix), addr=addr)
        yield ns, name


@contextmanager
def netns_with_bridge(prefix: str = "vw", *, taps: int = 2, addr: str | None = None
                      ) -> Iterator[tuple[Netns, str, list[str]]]:
    """A namespace with a bridge (``addr`` on it if given) and ``taps`` TAPs enslaved to it."""
    with netns(prefix) as ns:
        br = ns.add_bridge(f"{prefix}br0"[: IFNAMSIZ - 1], addr=addr)
        names = [ns.add_tap(f"{prefix}t{i}"[: IFNAMSIZ - 1], master=br) for i in range(taps)]
        yield ns, br, names
