"""qtest client parsing and the halt firmware, against a scripted fake QEMU on a socketpair."""

from __future__ import annotations

import socket
import threading

import pytest

from virtwire.drive.firmware import FIRMWARE_SIZE, HALT_CODE, firmware_image
from virtwire.drive.qtest import QtestClient, QtestError


def test_firmware_halts_at_reset_vector() -> None:
    img = firmware_image()
    assert len(img) == FIRMWARE_SIZE
    assert img[0xFFF0:0xFFF4] == HALT_CODE == bytes([0xFA, 0xF4, 0xEB, 0xFD])
    # jmp rel8 -3 from the end of the jmp (offset 4) lands on the hlt at offset 1
    assert 4 + (HALT_CODE[3] - 256) == 1


def _fake(script: dict[str, list[str]]) -> tuple[QtestClient, threading.Thread, list[str]]:
    a, b = socket.socketpair()
    seen: list[str] = []

    def serve() -> None:
        f = b.makefile("rb")
        for line in f:
            cmd = line.decode().strip()
            seen.append(cmd)
            for reply in script.get(cmd, ["FAIL unknown"]):
                b.sendall(reply.encode() + b"\n")
        b.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return QtestClient(a, timeout=2.0), t, seen


def test_values_and_async_irq_lines() -> None:
    q, t, seen = _fake({
        "inl 0xcfc": ["IRQ raise 11", "OK 0x10411af4"],
        "outl 0xcf8 0x80001000": ["OK"],
        "readw 0xe0000014": ["IRQ lower 11", "OK 0x0003"],
        "read 0x1000 0x4": ["OK 0xdeadbeef"],
        "write 0x1000 0x2 0xabcd": ["OK"],
    })
    q.outl(0xCF8, 0x80001000)
    assert q.inl(0xCFC) == 0x10411AF4
    assert q.irq_level[11] is True and q.irq_raises[11] == 1
    assert q.readw(0xE0000014) == 3
    assert q.irq_level[11] is False
    assert q.read(0x1000, 4) == bytes.fromhex("deadbeef")
    q.write(0x1000, b"\xab\xcd")
    assert seen == ["outl 0xcf8 0x80001000", "inl 0xcfc", "readw 0xe0000014",
                    "read 0x1000 0x4", "write 0x1000 0x2 0xabcd"]
    q.close()


def test_fail_and_malformed_replies_raise() -> None:
    q, t, _ = _fake({"inb 0x60": ["FAIL nope"], "inw 0x60": ["OK zz"],
                     "read 0x0 0x4": ["OK 0x00"]})
    with pytest.raises(QtestError):
        q.inb(0x60)
    with pytest.raises(QtestError):
        q.inw(0x60)
    with pytest.raises(QtestError):
        q.read(0, 4)  # short reply
    q.close()


def test_closed_connection_raises() -> None:
    a, b = socket.socketpair()
    b.close()
    q = QtestClient(a, timeout=1.0)
    with pytest.raises(QtestError):
        q.inb(0x60)
