"""One vhost-user connection's byte stream, never blocking the loop that serves every port.

Theory of operation
-------------------
``serve`` runs every port on one thread, so a front end must never be able to hold it: a
message trickled one byte at a time, or a peer that stops reading our replies, would otherwise
freeze every other port, the stats socket and SIGTERM (issue 14, defect 2).

- ``MessageReader`` reassembles messages from a non-blocking socket: each readable event reads
  what is there (never past the current message, so the fds riding with the next message's first
  byte stay with it) and returns a complete ``Message`` or None. ``started`` is when the first
  byte of an incomplete message arrived; the owner drops the connection when the whole message
  has not arrived within its deadline.
- ``ReplyQueue`` sends replies without blocking: what the socket does not take now is queued and
  retried from a timer; a peer that lets more than ``limit`` bytes pile up is dropped.
- ``peer_uid`` reads the connecting process's credentials (``SO_PEERCRED``).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable

from virtwire.hosts import vhost_user_proto as vp
from virtwire.hosts.vhost_user_proto import FramingError, Message, ProtocolError
from virtwire.loop import EventLoop, TimerHandle

__all__ = ["MessageReader", "ReplyQueue", "RateLimit", "peer_uid", "is_eventfd",
           "MESSAGE_DEADLINE"]

MESSAGE_DEADLINE = 2.0  # seconds from a message's first byte to its last
_CRED = struct.Struct("iII")  # struct ucred {pid_t pid; uid_t uid; gid_t gid}


def peer_uid(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UNIX socket."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


class MessageReader:
    """Non-blocking reassembly of one connection's messages (see module docstring)."""

    def __init__(self) -> None:
        self._hdr = bytearray()
        self._body = bytearray()
        self._size: int | None = None
        self._fds: list[int] = []
        self._ctrunc = False
        self.started: float | None = None

    def _recv(self, sock: socket.socket, n: int) -> bytes | None:
        try:
            data, anc, flags, _ = sock.recvmsg(n, _ANC,
                                               socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        self._fds.extend(_fds(anc))
        if flags & socket.MSG_CTRUNC:
            self._ctrunc = True
        if not data:
            if self._hdr or self._fds:
                raise FramingError(f"connection closed inside a message "
                                   f"({len(self._hdr) + len(self._body)} bytes read)")
            raise EOFError
        if self.started is None:
            self.started = time.monotonic()
        return data

    def read(self, sock: socket.socket) -> Message | None:
        """The next complete message, or None when the rest has not arrived yet.

        Raises ``EOFError`` on a clean end of stream, ``FramingError`` when the stream is
        unusable and ``ProtocolError`` for a message that carried too many fds (closed; the
        stream stays in step)."""
        try:
            while self._size is None:
                data = self._recv(sock, vp.VHOST_USER_HDR_SIZE - len(self._hdr))
                if data is None:
                    return None
                self._hdr += data
                if len(self._hdr) == vp.VHOST_USER_HDR_SIZE:
                    self._size = vp.decode_header(bytes(self._hdr))[2]
            while len(self._body) < self._size:
                data = self._recv(sock, self._size - len(self._body))
                if data is None:
                    return None
                self._body += data
        except BaseException:
            self.reset()
            raise
        request, mflags, _ = vp.decode_header(bytes(self._hdr))
        msg = Message(request, mflags, bytes(self._body), self._fds)
        ctrunc = self._ctrunc
        self._fds = []
        self.reset()
        if ctrunc or len(msg.fds) > vp.VHOST_USER_MAX_FDS:
            msg.close_fds()
            raise ProtocolError(f"{msg.name}: too many fds (ancillary data truncated), closed")
        return msg

    def reset(self) -> None:
        """Forget a partial message, closing the fds it brought."""
        for fd in self._fds:
            _close(fd)
        self._fds = []
        self._hdr = bytearray()
        self._body = bytearray()
        self._size = None
        self._ctrunc = False
        self.started = None


class ReplyQueue:
    """Replies sent without blocking; the rest retried from a timer (see module docstring)."""

    def __init__(self, loop: EventLoop, sock: socket.socket, on_fail: Callable[[str], None],
                 limit: int = 1 << 20) -> None:
        self.loop, self.sock, self.on_fail, self.limit = loop, sock, on_fail, limit
        self._out = bytearray()
        self._timer: TimerHandle | None = None
        self._since = 0.0

    @property
    def queued(self) -> int:
        return len(self._out)

    def send(self, data: bytes) -> None:
        if not self._out:
            self._since = time.monotonic()
        self._out += data
        if len(self._out) > self.limit:
            self.close()
            self.on_fail(f"{len(self._out)} bytes of replies unread")
            return
        self._flush()

    def _flush(self) -> None:
        self._timer = None
        while self._out:
            try:
                n = self.sock.send(self._out, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.close()
                self.on_fail(f"send failed: {e}")
                return
            del self._out[:n]
        if self._out:
            if time.monotonic() - self._since > MESSAGE_DEADLINE * 5:
                self.close()
                self.on_fail("peer stopped reading replies")
                return
            self._timer = self.loop.call_later(0.005, self._flush)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._out = bytearray()


# Room for more fds than allowed, so an excess is seen (and closed) rather than silently cut.
_ANC = socket.CMSG_SPACE((vp.VHOST_USER_MAX_FDS + 8) * 4)


def _fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    out: list[int] = []
    for level, ctype, data in anc:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            out.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return out


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def is_eventfd(fd: int) -> bool:
    """True when ``fd`` is an eventfd (kick/call/err fds must be: issue 14, defect 5)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class RateLimit:
    """At most one log line per ``interval`` seconds per key; the rest are counted and the
    count is reported with the next line that passes."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def __call__(self, key: str) -> int | None:
        """None to stay silent, else how many lines were suppressed since the last one."""
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return None
        if len(self._last) > 256:  # keys come from peers' input: keep the table bounded
            self._last.clear()
        self._last[key] = now
        return self._dropped.pop(key, 0)
