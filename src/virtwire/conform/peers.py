"""Peers the conformance suite and system tests exchange frames with, one per target kind.

- ``VirtwireServe``: ``virtwire serve`` (our own vhost-user back end, a separate process) inside a
  network namespace we create, its port on a TAP there; the peer is an AF_PACKET socket bound to
  that TAP, opened *inside* the namespace (``netns.run_in_netns``: a socket stays in the
  namespace it was created in).

Frames the suite sends carry the IEEE local-experimental EtherType 0x88B5 and a magic, so the
namespace's own kernel traffic (IPv6 neighbour discovery on the TAP) is told apart and ignored.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from virtwire.errors import UserFacingError
from virtwire.netns import run_in_netns

__all__ = ["packet_socket_in_netns", "VirtwireServe", "TapPeer", "ETH_P_EXPERIMENTAL", "MAGIC",
           "is_test_frame"]

ETH_P_ALL = 0x0003
ETH_P_EXPERIMENTAL = 0x88B5
MAGIC = b"VWD!"


def is_test_frame(f: bytes) -> bool:
    return len(f) >= 18 and f[12:14] == ETH_P_EXPERIMENTAL.to_bytes(2, "big") and f[14:18] == MAGIC


def packet_socket_in_netns(ns: str, ifname: str) -> socket.socket:
    """A raw AF_PACKET socket on ``ifname`` in network namespace ``ns`` (see module docstring)."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            s.bind((ifname, 0))
        except OSError:
            s.close()
            raise
        return s

    s = run_in_netns(ns, make, OSError)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    return s


SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_VNET_HDR = 15
TP_STATUS_CSUMNOTREADY = 1 << 3


class TapPeer:
    """The far side of a TAP in our namespace: AF_PACKET sockets bound to it.

    ``recv`` returns frames addressed to ``dst`` (the suite's frames) with whether the kernel
    marked them CHECKSUM_PARTIAL (PACKET_AUXDATA ``TP_STATUS_CSUMNOTREADY``): a NEEDS_CSUM or
    GSO frame handed to the TAP with a virtio-net header arrives so, to be completed (or
    segmented) by the kernel where needed. ``send_gso`` injects a frame *with* a virtio-net
    header (PACKET_VNET_HDR), so the device behind the TAP receives a GSO / partial-checksum frame.
    """

    def __init__(self, ns: str, ifname: str, dst: bytes | None = None) -> None:
        self.sock = packet_socket_in_netns(ns, ifname)
        self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        self.gso = packet_socket_in_netns(ns, ifname)
        self.gso.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        self.dst = dst

    def send(self, frame: bytes) -> None:
        self.sock.settimeout(5.0)
        self.sock.send(frame)

    def send_gso(self, vnet_hdr: bytes, frame: bytes) -> None:
        """``vnet_hdr``: a 10-byte struct virtio_net_hdr (the packet socket's format)."""
        self.gso.settimeout(5.0)
        self.gso.send(vnet_hdr + frame)

    def recv(self, timeout: float) -> tuple[bytes, bool] | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, anc, _fl, addr = self.sock.recvmsg(1 << 17, socket.CMSG_SPACE(32))
            except (TimeoutError, BlockingIOError):
                return None
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            ours = is_test_frame(data) or (self.dst is not None and data[:6] == self.dst)
            if not ours:
                continue
            partial = False
            for level, typ, d in anc:
                if level == SOL_PACKET and typ == PACKET_AUXDATA and len(d) >= 4:
                    partial = bool(int.from_bytes(d[:4], "little") & TP_STATUS_CSUMNOTREADY)
            return data, partial

    def close(self) -> None:
        self.sock.close()
        self.gso.close()


class VirtwireServe:
    """``virtwire serve`` with one vhost-user port on a TAP in our namespace, plus its peer."""

    def __init__(self, name: str = "vwd", queues: int = 1, extra: str = "",
                 trace: str | None = None) -> None:
        self.name = name
        self.trace = trace  # a trace file for serve (driver conformance reads it back)
        self.queues = queues
        self.extra = extra
        self.dir = tempfile.mkdtemp(prefix=f"{name}-serve-")
        self.sock_path = os.path.join(self.dir, "vhost.sock")
        self.log_path = os.path.join(self.dir, "serve.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.peer: socket.socket | None = None
        self.tap_peer: TapPeer | None = None
        self._stack = contextlib.ExitStack()

    def start(self, timeout: float = 20.0) -> VirtwireServe:
        from virtwire.netns import netns_with_tap

        try:
            ns, tap = self._stack.enter_context(netns_with_tap(self.name))
            self.ns, self.tap = ns, tap
            # no IPv6 chatter on the TAP (the namespace is ours)
            ns.run(["sysctl", "-qw", f"net.ipv6.conf.{tap}.disable_ipv6=1"], check=False)
            # frames up to 65535 bytes in both directions (the suite's size sweep)
            ns.run(["ip", "link", "set", tap, "mtu", "65521"], check=False)
            port = f"vhost-user,path={self.sock_path},backend=tap,ifname={tap}"
            if self.queues > 1:
                port += f",queues={self.queues}"
            if self.extra:
                port += "," + self.extra
            argv = ["ip", "netns", "exec", ns.name, sys.executable, "-m", "virtwire", "serve",
                    "-q", "--port", port] + (["--trace", self.trace] if self.trace else [])
            r, w = os.pipe()
            env = dict(os.environ, VIRTWIRE_SERVE_READY_FD=str(w))
            with open(self.log_path, "ab") as f:
                self.proc = subprocess.Popen(argv, stdout=f, stderr=f, pass_fds=(w,), env=env,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            os.close(w)
            try:
                ready, _, _ = select.select([r], [], [], timeout)
                if not ready or os.read(r, 1) != b"1":
                    raise UserFacingError(f"virtwire serve did not start: {self.log_tail()}")
            finally:
                os.close(r)
            self.tap_peer = TapPeer(ns.name, tap, dst=bytes.fromhex("020000000002"))
            self.peer = self.tap_peer.sock
        except BaseException:
            self.close()
            raise
        return self

    def log_tail(self, n: int = 1500) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def send_to_device(self, frame: bytes) -> None:
        assert self.tap_peer is not None
        self.tap_peer.send(frame)

    def recv_from_device(self, timeout: float = 5.0) -> bytes | None:
        """The next test frame the device transmitted (kernel chatter skipped)."""
        assert self.tap_peer is not None
        got = self.tap_peer.recv(timeout)
        return got[0] if got is not None else None

    def frames(self) -> Iterator[bytes]:
        while (f := self.recv_from_device(0.001)) is not None:
            yield f

    def close(self) -> None:
        if self.tap_peer is not None:
            self.tap_peer.close()
            self.tap_peer = None
            self.peer = None
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self._stack.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> VirtwireServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
