"""The guest's serial console: a reader thread, waits on its text, and framed shell commands.

Theory of operation
-------------------
QEMU connects its ``ttyS0`` chardev to a UNIX socket we listen on. One thread reads the socket,
appends the raw bytes to a log file and the decoded text (carriage returns dropped: the guest tty
turns every ``\\n`` into ``\\r\\n``) to an in-memory buffer, and wakes waiters.

A command is framed so its output can be cut out of the console stream whatever the tty echoes::

    printf '\\n%s\\n' VWB<tok>'B'; ( CMD ) </dev/null 2>&1; printf '\\n%s%s\\n' VWE<tok>'E' $?

The echo of that line contains ``VWB<tok>'B'`` (quotes included), never ``VWB<tok>B``: only the
shell's execution prints the joined marker, so echo, prompts and line editing never produce a
false match. ``<tok>`` is random per command, so the output of an earlier command cannot either.
The output is what lies between the begin marker's line and the newline printed before the end
marker; the end marker carries the exit status. A command that times out is interrupted with
Ctrl-C (the shell runs on ttyS0 as its controlling terminal).
"""

from __future__ import annotations

import codecs
import os
import re
import secrets
import select
import socket
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Longest line we type: busybox's line editor (the guest shell) cuts input lines at 1024 bytes.
#: ``GuestVM.run`` sends longer commands as a script file instead.
MAX_LINE = 960


class ConsoleClosed(Exception):
    """The console socket reached EOF (QEMU exited)."""


@dataclass(frozen=True)
class RunResult:
    """What ``GuestVM.run`` returns: the command, its combined stdout+stderr and exit status."""

    command: str
    output: str
    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0

    def __str__(self) -> str:
        return self.output


class SerialConsole:
    """Reads a connected console socket in a thread; keeps a log and the text seen so far."""

    def __init__(self, sock: socket.socket, log_path: Path | None = None) -> None:
        self._sock = sock
        self._cond = threading.Condition()
        self._text: list[str] = []
        self._text_len = 0
        self._joined = ""
        self._closed = False
        self._listeners: list[Callable[[bytes], None]] = []
        self._log = open(log_path, "ab") if log_path else None  # noqa: SIM115
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._thread = threading.Thread(target=self._reader, name="vw-console", daemon=True)
        self._thread.start()

    # -- reading ---------------------------------------------------------------------------
    def _reader(self) -> None:
        try:
            while True:
                try:
                    data = self._sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                if self._log:
                    self._log.write(data)
                    self._log.flush()
                for fn in list(self._listeners):
                    fn(data)
                text = self._decoder.decode(data).replace("\r", "")
                with self._cond:
                    self._text.append(text)
                    self._text_len += len(text)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            if self._log:
                self._log.close()

    @property
    def text(self) -> str:
        """Everything the console printed so far (CR removed)."""
        with self._cond:
            if len(self._text) > 1:
                self._text[:] = ["".join(self._text)]
            return self._text[0] if self._text else ""

    @property
    def closed(self) -> bool:
        return self._closed

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.text.rstrip("\n").splitlines()[-lines:])

    def wait_for(self, pattern: str | re.Pattern[str], *, start: int = 0,
                 timeout: float) -> re.Match[str] | None:
        """First match of ``pattern`` at or after offset ``start``; None on timeout.

        Raises ConsoleClosed if the console ends without a match.
        """
        rx = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        searched = start
        while True:
            text = self.text
            # Re-scan a little before the previous end in case a match straddles two reads.
            m = rx.search(text, max(start, searched - 256))
            if m:
                return m
            searched = len(text)
            with self._cond:
                if self._text_len > searched:
                    continue
                if self._closed:
                    raise ConsoleClosed()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    # -- writing ---------------------------------------------------------------------------
    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise ConsoleClosed() from e

    def add_listener(self, fn: Callable[[bytes], None]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[bytes], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=2)


def frame_command(command: str) -> tuple[str, re.Pattern[str], re.Pattern[str]]:
    """The line to type for ``command``, and the begin/end marker patterns of its output."""
    if any(c in command for c in "\x03\x04\r") or any(
            ord(c) < 32 and c not in "\t\n" for c in command):
        raise ValueError("command contains a tty control character")
    tok = secrets.token_hex(6)
    line = (f"printf '\\n%s\\n' VWB{tok}'B'; ( {command}\n) </dev/null 2>&1; "
            f"printf '\\n%s%s\\n' VWE{tok}'E' $?\n")
    if any(len(ln.encode()) > MAX_LINE for ln in line.split("\n")):
        raise ValueError(f"command line longer than {MAX_LINE} bytes (the guest's line editor "
                         "limit); GuestVM.run sends such commands as a script")
    begin = re.compile(rf"VWB{tok}B\n")
    end = re.compile(rf"\nVWE{tok}E(\d+)\n")
    return line, begin, end


def interact(console: SerialConsole, *, escape: bytes = b"\x1d",
             is_alive: Callable[[], bool] = lambda: True) -> None:
    """Attach the terminal to ``console`` until the escape byte (Ctrl-]) or the guest exits."""
    in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()
    out = lambda data: os.write(out_fd, data)  # noqa: E731
    console.add_listener(out)
    old = termios.tcgetattr(in_fd) if os.isatty(in_fd) else None
    try:
        if old is not None:
            tty.setraw(in_fd)
        console.send(b"\n")
        while is_alive() and not console.closed:
            r, _, _ = select.select([in_fd], [], [], 0.2)
            if not r:
                continue
            data = os.read(in_fd, 1024)
            if not data:
                break
            if escape in data:
                console.send(data.split(escape, 1)[0])
                break
            console.send(data)
    finally:
        console.remove_listener(out)
        if old is not None:
            termios.tcsetattr(in_fd, termios.TCSADRAIN, old)
