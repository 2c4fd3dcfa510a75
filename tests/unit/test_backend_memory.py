"""The in-memory and null backends, and the backend factory."""

from __future__ import annotations

import os

import pytest

from virtwire.backends import BackendError, NetBackend, create
from virtwire.backends.memory import MemoryBackend
from virtwire.backends.null import NullBackend
from virtwire.net.header import VirtioNetHdr


def mv(b: bytes) -> memoryview:
    return memoryview(b)


def test_memory_records_and_injects_with_header() -> None:
    b = MemoryBackend(vnet_hdr=True)
    b.configure(0, 10)
    assert b.send([[mv(bytes(10)), mv(b"abc")], [mv(bytes(10) + b"de")]]) == 2
    assert b.frames() == [b"abc", b"de"]
    assert b.counters["tx_frames"] == 2
    b.inject(b"xyz", VirtioNetHdr(flags=2))
    assert b.pending_len() == 13
    buf = bytearray(20)
    assert b.recv([memoryview(buf)[:5], memoryview(buf)[5:]]) == 13
    assert buf[0] == 2 and buf[10:13] == b"xyz"
    assert b.pending_len() == 0 and b.recv([memoryview(buf)]) == 0


def test_memory_stall_wakes_and_limit() -> None:
    b = MemoryBackend(tx_limit=1)
    fd = b.fileno()
    b.stall = True
    assert b.send([[mv(b"a" * 14)]]) == 0
    woke = []
    b.on_readable = lambda: woke.append(1)
    b.unstall()
    assert woke == [1] and os.eventfd_read(fd) == 1
    assert b.send([[mv(b"a" * 14)], [mv(b"b" * 14)]]) == 1
    b.close()


def test_null_counts_and_discards() -> None:
    n = NullBackend()
    assert n.fileno() is None and n.pending_len() == 0
    assert n.send([[mv(b"12345"), mv(b"67")]] * 3) == 3
    assert n.stats()["tx_frames"] == 3 and n.stats()["tx_bytes"] == 21


def test_factory() -> None:
    assert isinstance(create("null"), NullBackend)
    assert isinstance(create("memory"), NetBackend)
    with pytest.raises(BackendError, match="unknown backend"):
        create("carrier-pigeon")
