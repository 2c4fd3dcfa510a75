"""kvm.host.DeviceHost on the shared BackendPump: a readable backend is served under the device
lock on the loop thread; rx_watch calls from another (vCPU) thread reach the pump on the loop."""

from __future__ import annotations

import os
import threading
import time

from virtwire.kvm.host import DeviceHost


class FakeBackend:
    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)

    def fileno(self) -> int:
        return self.r

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)

    def stats(self) -> dict:
        return {}


class FakeDevice:
    def __init__(self, lock: threading.Lock, backend: FakeBackend) -> None:
        self.lock, self.backend = lock, backend
        self.active = True
        self.rx_watch = None
        self.served: list[tuple[int, bool, str]] = []

    def backend_ready(self, pair: int) -> int:
        try:
            os.read(self.backend.r, 4096)
        except BlockingIOError:
            pass
        self.served.append((pair, self.lock.locked(), threading.current_thread().name))
        return 1


class FakeTransport:
    def __init__(self, device: FakeDevice) -> None:
        self.device, self.pending, self.defer_notify, self.flushes = device, False, False, 0

    def flush(self) -> None:
        self.flushes += 1

    def release_memory_views(self) -> None:
        pass

    def stats(self) -> dict:
        return {}


def _until(cond, timeout: float = 2.0) -> bool:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.005)
    return cond()


def test_backend_served_under_lock_and_rx_watch_handed_to_the_loop() -> None:
    lock = threading.Lock()
    be = FakeBackend()
    dev = FakeDevice(lock, be)
    tr = FakeTransport(dev)
    host = DeviceHost(tr, [be], lock)
    assert tr.defer_notify and dev.rx_watch == host.rx_watch
    host.start()
    try:
        os.write(be.w, b"x")
        assert _until(lambda: dev.served)
        pair, locked, thread = dev.served[0]
        assert pair == 0 and locked and thread == "virtwire-kvm-device"
        # the vCPU thread (here: this one) says the ring ran dry, then that buffers came
        dev.rx_watch(0, False)
        assert _until(lambda: "device" in host.pump.paused[0])
        n = len(dev.served)
        os.write(be.w, b"y")
        time.sleep(0.1)
        assert len(dev.served) == n  # not watched while paused
        dev.rx_watch(0, True)
        assert _until(lambda: len(dev.served) > n)  # resumed: the waiting byte is served
        tr.pending = True
        host.kick()
        assert _until(lambda: tr.flushes > 0)
    finally:
        host.close()


def test_rtl8139_function_traces_config_and_register_names() -> None:
    # with --trace on, the RTL8139 function's config accesses are events (they raised before)
    import io
    import json

    from virtwire import trace
    from virtwire.backends.null import NullBackend
    from virtwire.kvm.events import bar_register
    from virtwire.rtl8139.pci import Rtl8139Nic, Rtl8139Pci

    fn = Rtl8139Pci(Rtl8139Nic(NullBackend("null:t"), mac=b"\x02\x00\x00\x00\x00\x01"))
    buf = io.StringIO()
    trace.start(out=buf)
    try:
        assert fn.config_read(0, 4) == 0x813910EC
        fn.config_write(0x14, 4, 0xE0000000)
        fn.config_write(0x04, 2, 0x0007)
    finally:
        trace.stop()
    evs = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert any(e.get("ev") == "cfg_read" and e.get("off") == 0 for e in evs)
    assert any(e.get("ev") == "cfg_write" and e.get("off") == 0x14 for e in evs)
    assert bar_register(fn, 0xE0000010, 4, True) == "rtl8139.TSD0"
    assert bar_register(fn, 0xE000003E, 2, True) == "rtl8139.ISR"
