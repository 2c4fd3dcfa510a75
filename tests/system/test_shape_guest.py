"""Impairments and rate limits on a real guest's port (QEMU TCG, vhost-user, ``virtwire serve``
on a TAP in its own namespace), set at start or changed at run time with ``virtwire ctl``."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from virtwire.guest.qemu import GuestVM
from virtwire.testing.serve_process import serve_on_tap

pytestmark = pytest.mark.system


def _guest(sock: str, ip: str, image) -> GuestVM:
    return GuestVM(net=[f"vhost-user,socket={sock}"], ip=ip, image=image, memory="256M",
                   name=f"vws{os.getpid() % 10000}-{ip.split('/')[0].replace('.', '-')}")


def _ctl(sock: str, *settings: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "virtwire", "ctl", sock, "port/set", "port0",
                          *settings, "--compact"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _backend(srv, sock: str) -> dict:
    return srv.stats(sock)["ports"][0]["backends"][0]


def _snapshot(srv, sock: str) -> tuple[dict, int]:
    """The shaper's counters and the TX ring's frame count, from one reading."""
    port = srv.stats(sock)["ports"][0]
    rings = port["vhost_user"]["rings"]
    return port["backends"][0], next(r["frames"] for r in rings if r["role"] == "tx0")


def _ping(vm: GuestVM, host: str, count: int, interval: float) -> tuple[int, float]:
    out = vm.run(f"ping -q -c {count} -i {interval} -W 2 {host}",
                 timeout=count * interval + 60).output
    m = re.search(r"(\d+) packets received", out)
    assert m, out
    avg = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", out)
    return int(m.group(1)), float(avg.group(1)) if avg else math.nan


def test_tx_loss_10_percent_of_1000_pings_and_counted(tmp_path, guest_image):
    with serve_on_tap(tmp_path, "vws", tap_addr="10.81.0.1/24",
                      port_opts="shape=on,seed=18") as (ns, srv, sock), \
            _guest(sock, "10.81.0.2/24", guest_image) as vm:
        vm.wait_ready(90)
        assert _ping(vm, "10.81.0.1", 3, 0.1)[0] == 3  # ARP resolved, no loss yet
        assert _ctl(sock, "tx.loss=10%")["settings"] == {"shape": "on", "seed": "18",
                                                         "tx.loss": "10%"}
        b0, f0 = _snapshot(srv, sock)
        tap0 = ns.link_stats("vwst0")["rx_packets"]
        n, p = 1000, 0.10
        got, _avg = _ping(vm, "10.81.0.1", n, 0.01)
        b1, f1 = _snapshot(srv, sock)
        lost_pings = n - got
        # a tolerance from the binomial distribution: 4.5 standard deviations (p ~ 7e-6)
        tol = 4.5 * math.sqrt(n * p * (1 - p))
        print(f"loss=10%: {lost_pings} of {n} pings lost (tolerance +-{tol:.0f})")
        assert abs(lost_pings - n * p) <= tol, (lost_pings, tol)
        dropped = b1["tx.lost"] - b0["tx.lost"]
        passed = b1["tx.passed"] - b0["tx.passed"]
        # the counters account for every frame the guest sent in that time, and for the pings
        assert dropped + passed == f1 - f0
        # what passed reached the host's TAP (read apart from the snapshot: an ARP or two may
        # fall between the readings)
        assert abs(ns.link_stats("vwst0")["rx_packets"] - tap0 - passed) <= 2
        assert lost_pings <= dropped <= lost_pings + 3  # (+ an ARP refresh, if one was lost)
        assert b1["rx.lost"] == 0


def test_tx_delay_50ms_raises_rtt_and_rate_10mbit_caps_iperf3(tmp_path, guest_image):
    with serve_on_tap(tmp_path, "vws", tap_addr="10.82.0.1/24",
                      port_opts="shape=on") as (ns, srv, sock), \
            _guest(sock, "10.82.0.2/24", guest_image) as vm:
        vm.wait_ready(90)
        got, base = _ping(vm, "10.82.0.1", 40, 0.02)
        assert got == 40
        _ctl(sock, "tx.delay=50ms")
        got, delayed = _ping(vm, "10.82.0.1", 40, 0.02)
        assert got == 40
        print(f"delay=50ms: average RTT {base:.2f} ms -> {delayed:.2f} ms")
        assert 50 - 5 <= delayed - base <= 50 + 15, (base, delayed)
        assert _backend(srv, sock)["tx.delayed"] >= 40
        # run time again: no delay, 10 Mbit/s on the guest's TX
        _ctl(sock, "tx.delay=", "tx.rate=10mbit")
        got, after = _ping(vm, "10.82.0.1", 10, 0.02)
        assert got == 10 and after < base + 20
        iperf = subprocess.Popen(["ip", "netns", "exec", ns.name, "iperf3", "-s", "-1",
                                  "-B", "10.82.0.1"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(0.5)
            out = vm.run("iperf3 -c 10.82.0.1 -t 8 -f m", timeout=90).output
        finally:
            iperf.wait(30)
        m = re.search(r"([\d.]+) Mbits/sec\s+receiver", out)
        assert m, out
        mbit = float(m.group(1))
        print(f"rate=10mbit: iperf3 receiver {mbit} Mbit/s")
        assert 9.0 <= mbit <= 11.0, out
        st = srv.stats(sock)
        be = st["ports"][0]["backends"][0]
        rings = {r["role"]: r for r in st["ports"][0]["vhost_user"]["rings"]}
        # back-pressure, not loss: the limiter throttled, and nobody dropped a frame
        assert be["tx.throttled"] > 0 and be["tx.lost"] == 0
        assert rings["tx0"]["drops"] == 0, rings["tx0"]
        assert rings["tx0"].get("tx_backpressure", 0) > 0
