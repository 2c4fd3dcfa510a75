"""The qtest INTx line against a scripted qtest server on a socketpair."""

from __future__ import annotations

import socket
import threading

from virtwire.hosts import qtest_irq
from virtwire.hosts.qtest_irq import QtestIntx


class FakeQemu:
    """Answers each line with OK (after ``gate`` is set, when one is given)."""

    def __init__(self, sock: socket.socket, gate: threading.Event | None = None) -> None:
        self.sock = sock
        self.lines: list[str] = []
        self.gate = gate
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.lines.append(line.decode())
                if self.gate is not None:
                    self.gate.wait(5)
                try:
                    self.sock.sendall(b"OK\n")
                except OSError:
                    return


def pair(gate=None, gsi=10):
    a, b = socket.socketpair()
    q = FakeQemu(b, gate)
    box = {"gsi": gsi}
    return QtestIntx(a, lambda: box["gsi"]), q, box


def test_raise_and_lower_drive_the_routed_ioapic_input():
    line, q, _ = pair()
    line.set_level(True)
    line.set_level(False)  # waits for both OKs
    assert line.outstanding == 0
    assert q.lines == ["set_irq_in /machine/i440fx/ioapic unnamed-gpio-in 10 1",
                       "set_irq_in /machine/i440fx/ioapic unnamed-gpio-in 10 0"]
    assert line.counters["raises"] == 1 and line.counters["lowers"] == 1


def test_raise_does_not_wait_but_lower_does():
    gate = threading.Event()
    line, q, _ = pair(gate)
    line.set_level(True)  # returns although QEMU has not answered
    assert line.outstanding == 1
    threading.Timer(0.1, gate.set).start()
    line.set_level(False)
    assert line.outstanding == 0 and line.counters["lower_timeouts"] == 0


def test_a_lower_that_is_not_answered_in_time_goes_on(monkeypatch):
    monkeypatch.setattr(qtest_irq, "LOWER_TIMEOUT", 0.05)
    gate = threading.Event()
    line, q, _ = pair(gate)
    line.set_level(True)
    line.set_level(False)
    assert line.counters["lower_timeouts"] == 1 and not line.dead
    gate.set()
    line.set_level(True)  # late OKs are consumed in order
    line.set_level(False)
    assert line.outstanding == 0


def test_rerouted_line_is_lowered_at_its_old_input_and_bad_lines_are_skipped(caplog):
    line, q, box = pair()
    line.set_level(True)
    box["gsi"] = 11
    line.set_level(True)
    line.set_level(False)
    assert q.lines[1:] == ["set_irq_in /machine/i440fx/ioapic unnamed-gpio-in 10 0",
                           "set_irq_in /machine/i440fx/ioapic unnamed-gpio-in 11 1",
                           "set_irq_in /machine/i440fx/ioapic unnamed-gpio-in 11 0"]
    box["gsi"] = 0xFF  # firmware did not route it
    line.set_level(True)
    assert "no usable interrupt line" in caplog.text and len(q.lines) == 4


def test_qemu_going_away_silences_the_line(caplog):
    line, q, _ = pair()
    q.sock.close()
    line.set_level(True)
    line.set_level(False)
    assert line.dead
    line.set_level(True)  # no exception, nothing sent
    assert "interrupts stop" in caplog.text


def test_async_lower_mode_does_not_wait():
    gate = threading.Event()
    line, q, _ = pair(gate)
    line.wait_lower = False
    line.set_level(True)
    line.set_level(False)  # returns although nothing was answered
    assert line.outstanding == 2 and not line.dead
    gate.set()
    line.wait_lower = True
    line.set_level(True)
    line.set_level(False)  # the two late OKs and the two new ones, in order
    assert line.outstanding == 0 and len(line.lower_samples) == 2
