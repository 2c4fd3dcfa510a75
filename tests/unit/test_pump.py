"""hosts.pump.BackendPump: backend fds watched, paused per reason, resumed on an RX kick."""

from __future__ import annotations

from typing import Any

from virtwire.backends.memory import MemoryBackend
from virtwire.hosts.pump import DEVICE, RING, BackendPump
from virtwire.loop import EventLoop


class Dev:
    def __init__(self) -> None:
        self.active = True
        self.served: list[int] = []
        self.rx_watch: Any = None

    def backend_ready(self, pair: int) -> None:
        self.served.append(pair)


def test_readable_backend_is_served_once_per_iteration() -> None:
    loop = EventLoop()
    be = MemoryBackend()
    dev = Dev()
    pump = BackendPump(loop, dev, [be])
    assert dev.rx_watch == pump.rx_watch
    be.inject(bytes(60))
    loop.run_once(0.1)
    assert dev.served == [0] and pump.counters["serves"] == 1
    pump.close()
    be.close()
    loop.close()


def test_not_ready_pauses_until_the_rx_kick() -> None:
    loop = EventLoop()
    be = MemoryBackend()
    dev = Dev()
    ready = {"ok": False}
    pump = BackendPump(loop, dev, [be], ready=lambda pair: ready["ok"])
    be.inject(bytes(60))
    loop.run_once(0.1)
    assert dev.served == [] and pump.paused[0] == {RING} and pump.waiting(RING)
    loop.run_once(0.01)  # unwatched: a level-triggered fd does not spin the loop
    assert pump.counters["wakeups"] == 1
    pump.kicked(1)  # a TX kick says nothing about RX buffers
    assert pump.paused[0] == {RING}
    ready["ok"] = True
    pump.kicked(0)
    assert not pump.paused[0]
    loop.run_once(0.1)
    assert dev.served == [0]
    pump.close()
    be.close()
    loop.close()


def test_reasons_stack_and_resume_only_when_all_are_gone() -> None:
    loop = EventLoop()
    be = MemoryBackend()
    dev = Dev()
    pump = BackendPump(loop, dev, [be])
    dev.rx_watch(0, False)  # the device: RX ring ran dry
    pump.pause(0, RING)
    pump.resume(0, RING)
    assert pump.paused[0] == {DEVICE}
    be.inject(bytes(60))
    loop.run_once(0.01)
    assert dev.served == []
    dev.rx_watch(0, True)  # buffers came
    loop.run_once(0.1)
    assert dev.served == [0] and pump.counters["resumes"] == 1
    pump.close()
    be.close()
    loop.close()
