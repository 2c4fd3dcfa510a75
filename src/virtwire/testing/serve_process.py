"""``virtwire serve`` as a subprocess for tests and demos: started, killed and restarted at will.

``start`` returns once every port's socket listens (``serve`` writes one byte on the fd named by
``VIRTWIRE_SERVE_READY_FD``); the server's output goes to ``log``. With a ``Netns`` it runs inside
that namespace, where its TAP back ends live.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from virtwire.netns import Netns, netns

__all__ = ["ServeProcess", "serve_on_tap"]


class ServeProcess:
    """``virtwire serve -q --port P ...`` (restartable; ``starts`` counts the starts)."""

    def __init__(self, ns: Netns | None, ports: list[str], log: Path) -> None:
        self.ns, self.ports, self.log = ns, ports, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 20.0) -> None:
        argv = [sys.executable, "-m", "virtwire", "-v", "serve", "-q"]
        for p in self.ports:
            argv += ["--port", p]
        if self.ns is not None:
            argv = ["ip", "netns", "exec", self.ns.name, *argv]
        r, w = os.pipe()
        env = dict(os.environ, VIRTWIRE_SERVE_READY_FD=str(w))
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=f, pass_fds=(w,), env=env,
                                         stdin=subprocess.DEVNULL)
        os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], timeout)
            if not (ready and os.read(r, 1) == b"1"):
                self.stop()
                raise RuntimeError("virtwire serve did not start:\n"
                                   + self.log.read_text(errors="replace")[-2000:])
        finally:
            os.close(r)
        self.starts += 1

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def stats(self, path: str) -> dict:
        """``virtwire stats PATH`` (a port's socket or the control socket), parsed."""
        out = subprocess.run([sys.executable, "-m", "virtwire", "stats", path, "--compact"],
                             capture_output=True, text=True, check=True, timeout=20)
        return json.loads(out.stdout)


@contextmanager
def serve_on_tap(tmp_path: Path, prefix: str, *, tap_addr: str, port_opts: str = "",
                 queues: int = 1, start: bool = True
                 ) -> Iterator[tuple[Netns, ServeProcess, str]]:
    """A namespace ``PREFIX-*`` with a TAP ``PREFIXt0`` at ``tap_addr`` and ``virtwire serve`` on
    it (socket ``tmp_path/PREFIX.sock``, log ``tmp_path/PREFIX-serve.log``): ``(ns, serve,
    socket)``. ``start=False`` leaves starting it to the caller. On the way out the server is
    stopped and its log must hold no traceback."""
    sock = str(tmp_path / f"{prefix}.sock")
    tap = f"{prefix}t0"
    with netns(prefix) as ns:
        ns.add_tap(tap, addr=tap_addr, multi_queue=queues > 1)
        port = (f"vhost-user,path={sock},backend=tap,ifname={tap},queues={queues}"
                + (f",{port_opts}" if port_opts else ""))
        srv = ServeProcess(ns, [port], tmp_path / f"{prefix}-serve.log")
        if start:
            srv.start()
        try:
            yield ns, srv, sock
        finally:
            srv.stop()
            log = srv.log.read_text(errors="replace") if srv.log.exists() else ""
            assert "Traceback" not in log, log[-3000:]
