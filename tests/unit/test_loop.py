"""The event loop: readers, eventfds, timers, coalesced deferred work, signals."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from virtwire.loop import EventFd, EventLoop


@pytest.fixture
def loop():
    lp = EventLoop(raise_errors=True)
    yield lp
    lp.close()


def test_eventfd_counts_and_drains():
    efd = EventFd()
    assert efd.read() == 0
    efd.write()
    efd.write(2)
    assert efd.read() == 3
    assert efd.read() == 0
    efd.close()


def test_kicks_coalesce_into_one_deferred_batch(loop):
    kicks = [EventFd(), EventFd()]
    batches: list[int] = []
    drained: list[int] = []

    def on_kick(efd: EventFd) -> None:
        drained.append(efd.read())
        loop.defer("queue", lambda: batches.append(len(drained)))

    for k in kicks:
        loop.add_reader(k, on_kick, k)
    kicks[0].write()
    kicks[0].write()
    kicks[1].write()
    loop.run_once(1.0)
    assert sorted(drained) == [1, 2]
    assert batches == [2]  # both wake-ups, one batch
    loop.run_once(0.01)
    assert batches == [2]
    for k in kicks:
        loop.remove_reader(k)
        k.close()


def test_timers_order_cancel_and_repeat(loop):
    seen: list[str] = []
    loop.call_later(0.02, seen.append, "b")
    loop.call_later(0.01, seen.append, "a")
    h = loop.call_later(0.015, seen.append, "never")
    h.cancel()
    rep = loop.call_every(0.005, seen.append, "r")
    assert loop.run_until(lambda: "b" in seen, 2.0)
    rep.cancel()
    assert seen.index("a") < seen.index("b") and "never" not in seen
    assert seen.count("r") >= 2


def test_reader_on_socket_and_stop(loop):
    a, b = socket.socketpair()
    got: list[bytes] = []

    def on_read() -> None:
        got.append(b.recv(100))
        loop.stop()

    loop.add_reader(b, on_read)
    loop.call_soon(a.send, b"hi")
    loop.run(timeout=2.0)
    assert got == [b"hi"]
    assert loop.remove_reader(b) and not loop.remove_reader(b)
    a.close()
    b.close()


def test_errors_are_logged_and_counted_without_stopping_the_loop(caplog):
    lp = EventLoop()
    seen = []
    lp.call_soon(lambda: 1 / 0)
    lp.call_soon(seen.append, 1)
    lp.run_once(0)
    assert lp.errors == 1 and seen == [1]
    assert "callback" in caplog.text
    lp.close()


def test_signal_handler_runs_from_the_loop(loop):
    got: list[int] = []
    loop.add_signal_handler(signal.SIGUSR1, got.append)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert loop.run_until(lambda: got == [signal.SIGUSR1], 2.0)
