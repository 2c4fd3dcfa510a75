"""Launch the default guest under QEMU and talk to it over its serial console.

Theory of operation
-------------------
``GuestVM`` assembles one ``qemu-system-x86_64`` command line: the i440fx ``pc`` machine (the PCI
proxy work needs ``/machine/i440fx/ioapic``), TCG unless told otherwise, guest RAM as a shared
memfd backend (vhost-user and the PCI proxy map it), ``-nodefaults -display none -no-reboot``,
the image's kernel and initramfs with ``console=ttyS0 panic=-1 quiet`` plus ``vw.*`` arguments the
guest's /init reads (addresses per NIC), and whatever each NIC plan adds (see ``nics``).

Every VM gets a private temporary directory holding its sockets: ``console.sock`` (we listen, QEMU
connects as a client at start-up, so no console byte is ever lost), ``qmp.sock`` and, when a NIC
asks for it, ``qtest.sock``. With ``netns=`` QEMU runs under ``ip netns exec`` so TAPs it opens are
that namespace's; UNIX sockets are file-system objects and work across namespaces.

Lifecycle: NIC ``start`` hooks run before QEMU; ``stop`` hooks after QEMU has exited, also on any
failure; ``shutdown()`` asks the guest to power off, then terminates and finally kills QEMU.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from virtwire.errors import CliError, UserFacingError
from virtwire.guest import nics
from virtwire.guest.console import (
    MAX_LINE,
    ConsoleClosed,
    RunResult,
    SerialConsole,
    frame_command,
    interact,
)
from virtwire.guest.image import GuestImage, load_image

QEMU_ENV = "VIRTWIRE_QEMU"
DEFAULT_QEMU = "qemu-system-x86_64"
READY_MARKER = "virtwire-guest-ready"
PROMPT = "vw# "
ACCELS = ("tcg", "kvm")
_MEM_RE = re.compile(r"^(\d+)([KMGkmg]?)$")

__all__ = [
    "GuestVM", "GuestError", "GuestTimeout", "CommandFailed", "RunResult", "parse_memory",
    "find_qemu", "READY_MARKER",
]


class GuestError(UserFacingError):
    """QEMU could not be started, or the guest died or misbehaved."""


class GuestTimeout(GuestError):
    """The guest did not reach a point in time; the message ends with the console tail."""


class CommandFailed(GuestError):
    """``run(..., check=True)`` saw a non-zero exit status."""

    def __init__(self, result: RunResult) -> None:
        tail = "\n".join(result.output.rstrip("\n").splitlines()[-10:])
        super().__init__(f"guest command {result.command!r} exited with status {result.status}"
                         + (f":\n{tail}" if tail else ""))
        self.result = result


def parse_memory(text: str | int) -> int:
    """``256M``/``1G``/``131072K``/bytes -> MiB (QEMU's -m unit); 64 MiB .. 64 GiB."""
    if isinstance(text, int):
        mib = text
    else:
        m = _MEM_RE.match(text.strip())
        if not m:
            raise CliError(f"bad memory size {text!r} (expected e.g. 256M or 1G)")
        n, unit = int(m.group(1)), m.group(2).upper()
        if unit == "":
            unit = "M"
        mult = {"K": 1 / 1024, "M": 1, "G": 1024}[unit]
        mib = n * mult
        if mib != int(mib):
            raise CliError(f"bad memory size {text!r}: not a whole number of MiB")
        mib = int(mib)
    if not 64 <= mib <= 65536:
        raise CliError(f"bad memory size {text!r}: must be 64M..64G")
    return mib


def find_qemu(binary: str | None = None) -> str:
    """The QEMU binary: ``binary``, else ``$VIRTWIRE_QEMU``, else qemu-system-x86_64 on PATH."""
    want = binary or os.environ.get(QEMU_ENV) or DEFAULT_QEMU
    found = shutil.which(want)
    if not found:
        src = f" (from ${QEMU_ENV})" if not binary and os.environ.get(QEMU_ENV) else ""
        raise GuestError(f"QEMU not found: {want}{src}; install qemu-system-x86 "
                         f"or set ${QEMU_ENV}")
    return found


def _first_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() or "could not" in ln.lower() or "failed" in ln.lower():
            return ln
    return lines[0] if lines else ""


class GuestVM:
    """A Debian guest under QEMU. ``with GuestVM(net=["qemu-tap,ifname=t0"]) as vm: ...``

    ``net``: NIC specs (strings as for ``--net`` or ``NicSpec``), eth0 first. ``ip``/``gw``/
    ``hostname``: guest network set-up (``ip`` is eth0's unless that NIC has ``ip=``).
    ``memory``: e.g. "256M". ``accel``: "tcg" (default) or "kvm". ``netns``: run QEMU inside this
    network namespace. ``pass_fds``: extra fds QEMU inherits. ``extra_args``: appended to QEMU's
    command line; ``append``: appended to the kernel command line.
    """

    def __init__(
        self,
        net: Sequence[str | nics.NicSpec] = (),
        *,
        ip: str | None = None,
        gw: str | None = None,
        hostname: str | None = None,
        memory: str | int = "256M",
        smp: int = 1,
        accel: str = "tcg",
        netns: str | None = None,
        image: GuestImage | None = None,
        qemu: str | None = None,
        pass_fds: Sequence[int] = (),
        extra_args: Sequence[str] = (),
        append: str = "",
        name: str | None = None,
        console_log: str | os.PathLike[str] | None = None,
    ) -> None:
        if accel not in ACCELS:
            raise CliError(f"bad accelerator {accel!r} (expected one of: {', '.join(ACCELS)})")
        if not isinstance(smp, int) or not 1 <= smp <= 64:
            raise CliError(f"bad CPU count {smp!r} (expected 1..64)")
        self.memory_mib = parse_memory(memory)
        self.nics = [nics.parse_nic_spec(n, i) if isinstance(n, str)
                     else nics.NicSpec(n.kind, dict(n.options), i) for i, n in enumerate(net)]
        self.nics = [n for n in self.nics if n.kind != "none"]
        for n in self.nics:
            nics.get_nic_kind(n.kind)
        if ip is not None:
            nics.check_ip(ip)
            if not self.nics:
                raise CliError("a guest address (--ip) needs a NIC (--net KIND,...)")
        if gw is not None and not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", gw):
            raise CliError(f"bad gateway {gw!r}")
        if hostname is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}", hostname):
            raise CliError(f"bad hostname {hostname!r}")
        if netns is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", netns):
            raise CliError(f"bad network namespace name {netns!r}")
        self.ip, self.gw, self.hostname = ip, gw, hostname
        self.smp = smp
        self.accel = accel
        self.netns = netns
        self._image = image
        self._qemu = qemu
        self.pass_fds = list(pass_fds)
        self.extra_args = list(extra_args)
        self.append = append
        self.name = name or f"vw{os.getpid()}-{secrets.token_hex(3)}"
        self._console_log = Path(console_log) if console_log else None
        self.tmpdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.console: SerialConsole | None = None
        self.argv: list[str] = []
        self.ready_seconds: float | None = None
        self._plans: list[nics.NicPlan] = []
        self._started_plans: list[nics.NicPlan] = []
        self._t_start = 0.0
        self._lock = threading.Lock()
        self._stderr_path: Path | None = None

    # -- paths ------------------------------------------------------------------------------
    @property
    def qtest_path(self) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / "qtest.sock"

    @property
    def qmp_path(self) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        assert self.tmpdir is not None
        return self._console_log or self.tmpdir / "console.log"

    @property
    def console_text(self) -> str:
        return self.console.text if self.console else ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- start ------------------------------------------------------------------------------
    def _kernel_args(self) -> str:
        args = ["console=ttyS0", "panic=-1", "quiet"]
        ips = {n.index: n.options["ip"] for n in self.nics if "ip" in n.options}
        if self.ip is not None and 0 not in ips:
            ips[0] = self.ip
        for idx, addr in sorted(ips.items()):
            args.append(f"vw.ip={addr}" if idx == 0 else f"vw.ip{idx}={addr}")
        if self.gw:
            args.append(f"vw.gw={self.gw}")
        if self.hostname:
            args.append(f"vw.hostname={self.hostname}")
        if self.append:
            args.append(self.append)
        return " ".join(args)

    def build_argv(self, image: GuestImage, qemu: str) -> list[str]:
        assert self.tmpdir is not None
        mem = f"{self.memory_mib}M"
        argv = [
            qemu, "-name", self.name,
            "-machine", "pc,memory-backend=mem",
            "-accel", self.accel,
            "-m", mem,
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-smp", str(self.smp),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", f"socket,id=con0,path={self.tmpdir / 'console.sock'}",
            "-serial", "chardev:con0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel", str(image.kernel),
            "-initrd", str(image.initramfs),
            "-append", self._kernel_args(),
        ]
        for plan in self._plans:
            argv += plan.qemu_args
        if any(p.needs_qtest for p in self._plans):
            argv += ["-chardev", f"socket,id=qt0,path={self.qtest_path},server=on,wait=off",
                     "-object", "qtest,id=qt,chardev=qt0,log=/dev/null"]
        argv += self.extra_args
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    def start(self) -> GuestVM:
        """Start QEMU (and NIC sidecars); returns once QEMU has connected its console."""
        if self.proc is not None:
            raise GuestError("guest already started")
        qemu = find_qemu(self._qemu)
        image = self._image or load_image()
        if self.netns and not Path("/run/netns", self.netns).exists():
            raise GuestError(f"network namespace {self.netns!r} does not exist")
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"virtwire-{self.name}-"))
        try:
            self._start(image, qemu)
        except BaseException:
            self._cleanup()
            raise
        return self

    def _start(self, image: GuestImage, qemu: str) -> None:
        assert self.tmpdir is not None
        for spec in self.nics:
            ctx = nics.NicContext(
                index=spec.index, id=f"net{spec.index}",
                mac=nics.check_mac(spec.options["mac"]) if "mac" in spec.options
                else nics.derive_mac(self.name, spec.index),
                tmpdir=self.tmpdir, accel=self.accel, vm_name=self.name, netns=self.netns,
                qtest_path=self.tmpdir / "qtest.sock")
            self._plans.append(nics.get_nic_kind(spec.kind).builder(spec, ctx))
        self.argv = self.build_argv(image, qemu)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.tmpdir / "console.sock"))
        listener.listen(1)
        listener.settimeout(0.2)
        try:
            for plan in self._plans:
                if plan.start:
                    plan.start()
                self._started_plans.append(plan)
            fds = sorted({*self.pass_fds, *(fd for p in self._plans for fd in p.pass_fds)})
            self._stderr_path = self.tmpdir / "qemu.stderr"
            with open(self._stderr_path, "wb") as err:
                self._t_start = time.monotonic()
                self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=err,
                                             stderr=err, pass_fds=fds, start_new_session=True)
            deadline = time.monotonic() + 30
            while True:
                try:
                    conn, _ = listener.accept()
                    break
                except TimeoutError:
                    pass
                if self.proc.poll() is not None:
                    raise GuestError(self._exit_message("QEMU exited at start-up"))
                if time.monotonic() > deadline:
                    raise GuestError("QEMU did not connect its console within 30 s")
        finally:
            listener.close()
        conn.settimeout(None)
        self.console = SerialConsole(conn, self.console_log)
        for plan in self._plans:
            if plan.after_launch:
                plan.after_launch(self)

    def _reap(self, timeout: float) -> None:
        """Give an exiting QEMU a moment, so its status and last stderr line are known."""
        try:
            if self.proc is not None:
                self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def _qemu_stderr(self) -> str:
        try:
            return self._stderr_path.read_text(errors="replace") if self._stderr_path else ""
        except OSError:
            return ""

    def _exit_message(self, what: str) -> str:
        rc = self.proc.poll() if self.proc else None
        line = _first_error_line(self._qemu_stderr())
        msg = f"{what} (status {rc})" + (f": {line}" if line else "")
        return msg

    def _with_tail(self, msg: str) -> str:
        tail = self.console.tail(15) if self.console else ""
        return f"{msg}\n--- console tail ---\n{tail}" if tail else msg

    # -- readiness and commands -------------------------------------------------------------
    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait for the ready marker (and the shell prompt); return seconds since QEMU start."""
        if self.console is None:
            raise GuestError("guest not started")
        if self.ready_seconds is not None:
            return self.ready_seconds
        try:
            m = self.console.wait_for(READY_MARKER, timeout=timeout)
            if m is None:
                raise GuestTimeout(self._with_tail(
                    f"guest {self.name} not ready within {timeout:g} s"))
            self.ready_seconds = time.monotonic() - self._t_start
            self.console.wait_for(PROMPT, start=m.end(), timeout=10)
        except ConsoleClosed:
            self._reap(2.0)
            raise GuestError(self._with_tail(self._exit_message(
                f"guest {self.name} stopped before it was ready"))) from None
        return self.ready_seconds

    def run(self, command: str, timeout: float = 30.0, check: bool = False) -> RunResult:
        """Run ``command`` in the guest shell; its stdout+stderr and exit status.

        Raises GuestTimeout (with the console tail) when it takes longer than ``timeout`` (the
        command is then interrupted with Ctrl-C), CommandFailed if ``check`` and status != 0.
        """
        if self.console is None:
            raise GuestError("guest not started")
        if self.ready_seconds is None:
            self.wait_ready()
        if any(len(ln.encode()) > MAX_LINE - 100 for ln in command.split("\n")):
            # Too long to type: ship it as a script (in short lines) and run that.
            script = f"/tmp/.vw-cmd-{secrets.token_hex(6)}"
            self.write_file(script, command.encode() + b"\n", timeout=timeout)
            command = f"sh {script}; rc=$?; rm -f {script}; exit $rc"
        line, begin, end = frame_command(command)
        with self._lock:
            start = len(self.console.text)
            try:
                self.console.send(line)
                b = self.console.wait_for(begin, start=start, timeout=timeout)
                e = self.console.wait_for(end, start=b.end(), timeout=timeout) if b else None
            except ConsoleClosed:
                self._reap(2.0)
                raise GuestError(self._with_tail(self._exit_message(
                    f"guest {self.name} stopped while running {command!r}"))) from None
            if b is None or e is None:
                self.console.send(b"\x03")
                raise GuestTimeout(self._with_tail(
                    f"guest command {command!r} did not finish within {timeout:g} s"))
            text = self.console.text
            result = RunResult(command, text[b.end():e.start()], int(e.group(1)))
        if check and result.status != 0:
            raise CommandFailed(result)
        return result

    def write_file(self, path: str, data: bytes, *, mode: int = 0o644,
                   timeout: float = 30.0) -> None:
        """Write ``data`` to ``path`` in the guest (base64 over the console; small files only)."""
        if not re.fullmatch(r"/[A-Za-z0-9_./-]+", path):
            raise ValueError(f"unsupported guest path {path!r}")
        self.run(f": > {path}", timeout=timeout, check=True)
        enc = base64.b64encode(data).decode()
        step = MAX_LINE - 200
        for i in range(0, len(enc), step):
            self.run(f"echo {enc[i:i + step]} | base64 -d >> {path}", timeout=timeout,
                     check=True)
        self.run(f"chmod {mode:o} {path}", timeout=timeout, check=True)

    def qmp(self, command: str, arguments: dict | None = None, timeout: float = 10.0) -> dict:
        """One QMP command on the VM's monitor socket; returns its ``return`` value."""
        if not self.is_running():
            raise GuestError("guest not running")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.qmp_path))
            f = s.makefile("rwb")

            def call(cmd: str, args: dict | None) -> dict:
                msg: dict = {"execute": cmd}
                if args:
                    msg["arguments"] = args
                f.write(json.dumps(msg).encode() + b"\n")
                f.flush()
                while True:
                    line = f.readline()
                    if not line:
                        raise GuestError("QMP connection closed")
                    reply = json.loads(line)
                    if "return" in reply:
                        return reply["return"]
                    if "error" in reply:
                        raise GuestError(f"QMP {cmd}: {reply['error'].get('desc', reply)}")

            f.readline()  # greeting
            call("qmp_capabilities", None)
            return call(command, arguments)

    def interact(self) -> None:
        """Attach the terminal to the guest console until Ctrl-] or the guest powers off."""
        if self.console is None:
            raise GuestError("guest not started")
        interact(self.console, is_alive=self.is_running)

    # -- stop -------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 5.0) -> int | None:
        """Power the guest off (then SIGTERM, then SIGKILL QEMU); stop sidecars; clean up."""
        try:
            if self.is_running() and self.console and not self.console.closed:
                try:
                    self.console.send(b"\x03\x15poweroff -f\n")
                except ConsoleClosed:
                    pass
                try:
                    assert self.proc is not None
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self._cleanup()
        return self.proc.returncode if self.proc else None

    def kill(self) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                try:
                    self.proc.send_signal(sig)
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        if self.console is not None:
            self.console.close()
        errors: list[BaseException] = []
        for plan in reversed(self._started_plans):
            if plan.stop:
                try:
                    plan.stop()
                except Exception as e:  # keep stopping the others
                    errors.append(e)
        self._started_plans.clear()
        if self.tmpdir is not None and self.tmpdir.exists():
            # The console text stays in memory (console_text); pass console_log= to keep a file.
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> GuestVM:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()
