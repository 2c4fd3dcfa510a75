"""A private libvirtd for tests, and a libvirt domain driven over its serial console.

Theory of operation
-------------------
Debian 12 packages only the monolithic ``libvirtd``; without systemd it is started by hand.
``Libvirtd`` starts one with its own ``libvirtd.conf`` whose ``unix_sock_dir`` is a private
directory, so its sockets never meet another daemon's; clients reach it through the URI
``qemu:///system?socket=DIR/libvirt-sock``. The QEMU driver reads /etc/libvirt/qemu.conf, which
tools/setup.sh writes (QEMU as root, no cgroups, stdio to files); its state (domain XML under
/etc/libvirt/qemu, run files under /run/libvirt/qemu) is the host's, so every domain a test
defines through ``define`` is destroyed and undefined again by ``stop``.

``LibvirtGuest`` is a ``GuestVM`` whose QEMU libvirt starts: the domain's serial console is a
UNIX socket QEMU connects to (``virtwire.libvirt.domain.guest_domain(console_socket=...)``), so
``wait_ready``, ``run`` and ``write_file`` work as for a QEMU of our own. ``virsh start`` runs in
the background: with ``<reconnect>`` and no back end yet, it returns only once the back end is
there, and the console connects after that.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import TracebackType

from virtwire.errors import UserFacingError
from virtwire.guest.console import ConsoleClosed, SerialConsole
from virtwire.guest.qemu import GuestError, GuestVM

__all__ = ["Libvirtd", "LibvirtdError", "LibvirtGuest"]

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")


class LibvirtdError(UserFacingError):
    """libvirtd is missing, did not start, or refused a command."""


def _last_line(text: str) -> str:
    return next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")


class Libvirtd:
    """``with Libvirtd() as d: d.virsh("list")`` — a libvirtd of our own, stopped on exit."""

    def __init__(self) -> None:
        self.workdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.domains: list[str] = []

    @property
    def uri(self) -> str:
        assert self.workdir is not None, "libvirtd not started"
        return f"qemu:///system?socket={self.workdir / 'libvirt-sock'}"

    @property
    def log(self) -> str:
        if self.workdir is None:
            return ""
        return "".join(p.read_text(errors="replace") for p in
                       (self.workdir / "libvirtd.out", self.workdir / "libvirtd.log")
                       if p.exists())

    def start(self, timeout: float = 30.0) -> Libvirtd:
        binary = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
        if not os.path.exists(binary):
            raise LibvirtdError("libvirtd is not installed: run tools/setup.sh "
                                "(libvirt-daemon, libvirt-daemon-driver-qemu)")
        if not QEMU_CONF.exists():
            raise LibvirtdError(f"{QEMU_CONF} is missing: run tools/setup.sh")
        if shutil.which("virsh") is None:
            raise LibvirtdError("virsh is not installed: run tools/setup.sh (libvirt-clients)")
        self.workdir = Path(tempfile.mkdtemp(prefix="vwlibvirtd-"))
        conf = self.workdir / "libvirtd.conf"
        conf.write_text(
            f'unix_sock_dir = "{self.workdir}"\n'
            'unix_sock_rw_perms = "0700"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            f'log_outputs = "3:file:{self.workdir / "libvirtd.log"}"\n')
        with open(self.workdir / "libvirtd.out", "wb") as out:
            self.proc = subprocess.Popen(
                [binary, "--config", str(conf), "--pid-file", str(self.workdir / "pid")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                log = self.log
                self._remove_workdir()
                raise LibvirtdError(f"libvirtd exited at start-up (status "
                                    f"{self.proc.returncode}): {_last_line(log)}")
            if self.virsh("version", check=False, timeout=10).returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise LibvirtdError(f"libvirtd did not answer within {timeout:g} s")
            time.sleep(0.2)

    def virsh(self, *args: str, check: bool = True,
              timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``virsh -c URI ARGS``; with ``check``, a failure raises with virsh's error line."""
        r = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise LibvirtdError(f"virsh {' '.join(args)}: "
                                f"{_last_line(r.stderr).removeprefix('error: ')}")
        return r

    def define(self, xml: str | ET.Element) -> str:
        """Define a domain (``virsh define --validate``); ``stop`` removes it again."""
        if isinstance(xml, ET.Element):
            xml = ET.tostring(xml, encoding="unicode")
        name = ET.fromstring(xml).findtext("name") or ""
        assert self.workdir is not None
        path = self.workdir / f"{name}.xml"
        path.write_text(xml)
        self.adopt(name)
        self.virsh("define", "--validate", str(path))
        return name

    def adopt(self, name: str) -> None:
        """Remove domain ``name`` at ``stop`` (for domains defined some other way)."""
        if name not in self.domains:
            self.domains.append(name)

    def remove_domain(self, name: str) -> None:
        """Destroy (if running) and undefine ``name``; quiet when it is already gone."""
        self.virsh("destroy", name, check=False, timeout=30)
        self.virsh("undefine", name, check=False, timeout=30)
        if name in self.domains:
            self.domains.remove(name)

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                for name in list(self.domains):
                    self.remove_domain(name)
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self._remove_workdir()

    def _remove_workdir(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Libvirtd:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class LibvirtGuest(GuestVM):
    """Defined domain ``domain`` (console on ``console_socket``) started with ``virsh start``."""

    def __init__(self, daemon: Libvirtd, domain: str, console_socket: str | os.PathLike[str]
                 ) -> None:
        super().__init__(name=domain)
        self.daemon = daemon
        self.domain = domain
        self.console_socket = Path(console_socket)
        self._listener: socket.socket | None = None
        self._start_log: Path | None = None

    def start(self) -> LibvirtGuest:
        """Listen on the console socket and run ``virsh start`` in the background."""
        if self.proc is not None:
            raise GuestError("guest already started")
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"virtwire-{self.domain}-"))
        self.console_socket.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.console_socket))
        self._listener.listen(1)
        self._listener.settimeout(0.2)
        self._start_log = self.tmpdir / "virsh-start.log"
        self._t_start = time.monotonic()
        with open(self._start_log, "wb") as out:
            self.proc = subprocess.Popen(["virsh", "-c", self.daemon.uri, "start", self.domain],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        return self

    def state(self) -> str:
        """``virsh domstate``: running, paused, shut off, ..."""
        r = self.daemon.virsh("domstate", self.domain, check=False, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else "unknown"

    def connect_console(self, timeout: float = 60.0) -> bool:
        """Accept QEMU's console connection; False if it did not come within ``timeout``."""
        if self.console is not None:
            return True
        assert self._listener is not None and self.proc is not None, "guest not started"
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn, _ = self._listener.accept()
                break
            except TimeoutError:
                pass
            if self.proc.poll() not in (None, 0):
                raise GuestError(self._exit_message("virsh start failed"))
            if time.monotonic() > deadline:
                return False
        conn.settimeout(None)
        self.console = SerialConsole(conn, self.console_log)
        return True

    def wait_ready(self, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        if not self.connect_console(timeout):
            raise GuestError(self._exit_message(
                f"domain {self.domain} did not connect its console within {timeout:g} s"))
        return super().wait_ready(max(1.0, timeout - (time.monotonic() - t0)))

    def is_running(self) -> bool:
        return self.state() in ("running", "paused", "in shutdown")

    @property
    def pid(self) -> int | None:
        return None

    def _reap(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.is_running() and time.monotonic() < deadline:
            time.sleep(0.2)

    def _qemu_stderr(self) -> str:
        parts = []
        for p in (self._start_log, QEMU_LOG_DIR / f"{self.domain}.log"):
            try:
                if p is not None:
                    parts.append(p.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(parts)

    def _exit_message(self, what: str) -> str:
        line = _last_line(self._qemu_stderr())
        return f"{what}" + (f": {line}" if line else "")

    def shutdown(self, timeout: float = 10.0) -> int | None:
        """Power the guest off over its console, then ``virsh destroy``; clean up."""
        try:
            if self.console is not None and not self.console.closed and self.is_running():
                try:
                    self.console.send(b"\x03\x15poweroff -f\n")
                except ConsoleClosed:
                    pass
                self._reap(timeout)
        finally:
            self._cleanup()
        return None

    def _cleanup(self) -> None:
        if self.is_running():
            self.daemon.virsh("destroy", self.domain, check=False, timeout=30)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.console is not None:
            self.console.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.console_socket.unlink(missing_ok=True)
        if self.tmpdir is not None and self.tmpdir.exists():
            shutil.rmtree(self.tmpdir, ignore_errors=True)
