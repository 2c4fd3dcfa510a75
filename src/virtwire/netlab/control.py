"""Requests on the ``virtwire serve`` control socket: the counters, or ``port/set``.

Protocol (one connection, one exchange): a client that sends nothing gets the counters as one
JSON object and EOF, as ``virtwire stats`` always did (after ``QUIET_WAIT`` with no request). A
client that sends one JSON object and a newline gets one JSON object back:

    {"cmd": "port/set", "port": "port0", "set": {"tx.loss": "1%", "rx.rate": "100mbit"}}
    -> {"ok": true, "port": "port0", "settings": {"rx.rate": "100mbit", "tx.loss": "1%"}}
    {"cmd": "port/get", "port": "port0"}
    -> {"ok": true, "port": "port0", "settings": {...}, "counters": [{...}, ...]}
    {"cmd": "stats"} -> the counters
    anything refused -> {"ok": false, "error": "one line"} (and the old settings stay)

Nothing here blocks the event loop: the connection is watched by the loop until the request
line, EOF or the quiet timeout; the reply (small) is written with a short timeout.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

from virtwire.netlab import wire
from virtwire.netlab.keys import NetlabError

__all__ = ["serve_client", "handle_request", "request", "QUIET_WAIT", "MAX_REQUEST"]

log = logging.getLogger(__name__)

QUIET_WAIT = 0.05  # seconds a silent client waits for the counters
MAX_REQUEST = 64 << 10


def handle_request(server: Any, req: Any) -> dict[str, Any]:
    """One decoded request -> its reply (never raises for a bad request)."""
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        return {"ok": False, "error": 'a request is a JSON object with "cmd"'}
    cmd = req["cmd"]
    if cmd == "stats":
        return dict(server.stats())
    if cmd not in ("port/set", "port/get"):
        return {"ok": False, "error": f"unknown cmd {cmd!r} (known: stats, port/get, port/set)"}
    name = req.get("port")
    ports = {p.config.name: p for p in server.ports}
    port = ports.get(name) if isinstance(name, str) else None
    if port is None:
        return {"ok": False, "error": f"no port {name!r} (ports: {', '.join(ports)})"}
    if cmd == "port/get":
        return {"ok": True, "port": name, "settings": wire.port_settings(port),
                "counters": [b.stats() for b in port.backends]}
    changes = req.get("set")
    if not isinstance(changes, dict):
        return {"ok": False, "error": 'port/set needs "set": {"KEY": "VALUE", ...}'}
    try:
        settings = wire.set_port(port, changes)
    except NetlabError as e:
        log.warning("port %s: refused %s: %s", name, changes, e)
        return {"ok": False, "error": str(e)}
    return {"ok": True, "port": name, "settings": settings}


class _Client:
    """One accepted control connection, watched by the loop until it is answered."""

    def __init__(self, server: Any, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.buf = b""
        self.done = False
        conn.setblocking(False)
        server.loop.add_reader(conn, self._readable)
        self.timer = server.loop.call_later(QUIET_WAIT, self._quiet)

    def _quiet(self) -> None:
        if not self.done and not self.buf:
            self._reply(self.server.stats())

    def _readable(self) -> None:
        try:
            data = self.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: a request without its newline, or nothing at all
            if self.buf:
                self._answer(self.buf)
            else:
                self._reply(self.server.stats())
            return
        self.buf += data
        if b"\n" in self.buf:
            self._answer(self.buf.split(b"\n", 1)[0])
        elif len(self.buf) > MAX_REQUEST:
            self._reply({"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})

    def _answer(self, line: bytes) -> None:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            self._reply({"ok": False, "error": "the request is not JSON"})
            return
        self._reply(handle_request(self.server, req))

    def _reply(self, obj: dict[str, Any]) -> None:
        if self.done:
            return
        self.done = True
        self.timer.cancel()
        self.server.loop.remove_reader(self.conn)
        try:
            self.conn.settimeout(1.0)
            self.conn.sendall(json.dumps(obj).encode() + b"\n")
        except OSError as e:
            log.debug("control client went away: %s", e)
        finally:
            self.conn.close()


def serve_client(server: Any, conn: socket.socket) -> None:
    """Take an accepted control connection (see module docstring)."""
    _Client(server, conn)


def request(path: str, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to a serve control socket and return its reply (client side)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    reply: dict[str, Any] = json.loads(data)
    return reply
