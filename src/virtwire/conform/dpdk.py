"""DPDK's testpmd with a vhost PMD port: the back end our front end drives.

``Testpmd`` starts ``dpdk-testpmd`` without hugepages (``--no-huge -m 512``; the vhost PMD maps
our memfd regions), one vhost port listening on a UNIX socket (``client=0``), forwarding in
``io`` (frames come back unchanged on the same port) or ``macswap`` mode. testpmd waits on stdin
for Enter before it exits; we keep a pipe open and close it (then kill) on ``close``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time

from virtwire.errors import UserFacingError

__all__ = ["Testpmd"]


class Testpmd:
    """One testpmd process serving a vhost-user socket (see module docstring)."""

    __test__ = False  # not a pytest class

    def __init__(self, forward_mode: str = "io", name: str = "vwd", lcores: str = "0,1",
                 extra_vdev: str = "", queues: int = 1, vdev: str | None = None) -> None:
        if shutil.which("dpdk-testpmd") is None:
            raise UserFacingError("dpdk-testpmd not found (install Debian's dpdk-dev)")
        self.dir = tempfile.mkdtemp(prefix=f"{name}-dpdk-")
        self.sock = os.path.join(self.dir, "vhost.sock")
        self.prefix = f"{name}-{os.getpid()}-{os.path.basename(self.dir)[-6:]}"
        self.out_path = os.path.join(self.dir, "testpmd.log")
        # ``vdev``: another device instead of the vhost PMD (net_virtio_user0,path=...: DPDK's
        # virtio driver against someone's vhost-user socket)
        vdev = vdev or f"net_vhost0,iface={self.sock},client=0,queues={queues}"
        if extra_vdev:
            vdev += "," + extra_vdev
        self.argv = [
            "dpdk-testpmd", "-l", lcores, "--no-huge", "-m", "512", "--no-pci",
            "--file-prefix", self.prefix, "--vdev", vdev, "--",
            "--total-num-mbufs", "16384", f"--forward-mode={forward_mode}", "--nb-cores=1",
            f"--rxq={queues}", f"--txq={queues}",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Testpmd:
        out = open(self.out_path, "wb")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.sock) and "net_vhost0" in self.argv[self.argv.index(
                "--vdev") + 1]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log_tail()
                self.close()
                raise UserFacingError(f"testpmd did not open its vhost socket: {log}")
            time.sleep(0.05)
        return self

    def log_tail(self, n: int = 1200) -> str:
        try:
            with open(self.out_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def close(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(OSError):
                assert p.stdin is not None
                p.stdin.write(b"\n")
                p.stdin.close()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        # testpmd's runtime directory (/var/run/dpdk/PREFIX) is left by a killed run
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Testpmd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
