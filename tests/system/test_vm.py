"""Real guests under QEMU TCG: boot, commands, two guests on one bridge, the demo, TAP refusal."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time

import pytest

from virtwire.guest.qemu import CommandFailed, GuestError, GuestTimeout, GuestVM
from virtwire.netns import TapError, netns, netns_exists, netns_with_bridge

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def vm(guest_image):
    """One guest without NICs shared by the command tests (a boot costs ~5 s)."""
    with GuestVM(image=guest_image) as v:
        v.wait_ready(60)
        yield v


def test_boots_to_ready_marker_and_runs_uname(vm, guest_image):
    assert 0 < vm.ready_seconds < 60
    assert "virtwire-guest-ready kernel=" in vm.console_text
    r = vm.run("uname -r", timeout=20)
    assert r.status == 0
    assert r.output == guest_image.kernel_release + "\n"
    assert r.output.strip().startswith("6.1.")


def test_run_output_and_status(vm):
    r = vm.run("echo out; echo err >&2; exit 3", timeout=20)
    assert (r.output, r.status) == ("out\nerr\n", 3)
    assert vm.run("printf 'a\\nb'", timeout=20).output == "a\nb"
    # Output that looks like our prompt or a marker does not confuse the framing.
    r = vm.run("echo 'vw# VWBxB'; echo VWE0E0", timeout=20)
    assert r.output == "vw# VWBxB\nVWE0E0\n" and r.status == 0
    with pytest.raises(CommandFailed, match="status 1"):
        vm.run("false", check=True, timeout=20)
    dd = vm.run("dd if=/dev/zero bs=1k count=64 2>/dev/null | sha256sum", timeout=20)
    assert dd.output.split()[0] == hashlib.sha256(bytes(65536)).hexdigest()
    assert vm.run("busybox nc --help 2>&1 | head -1; iperf3 --version | head -1",
                  timeout=20).output.count("\n") == 2


def test_write_file_and_qmp(vm):
    data = bytes(range(256)) * 20 + b"tail"
    vm.write_file("/tmp/blob", data, mode=0o755)
    r = vm.run("sha256sum /tmp/blob; stat -c %a /tmp/blob", timeout=20, check=True)
    assert r.output.split() == [hashlib.sha256(data).hexdigest(), "/tmp/blob", "755"]
    # A command longer than the guest line editor takes goes as a script.
    long = "echo " + "y" * 3000 + " | wc -c"
    assert vm.run(long, timeout=30).output == "3001\n"
    assert vm.qmp("query-status")["status"] == "running"
    devs = vm.qmp("query-pci")[0]["devices"]
    assert any(d["id"]["device"] == 0x1237 for d in devs)  # i440fx host bridge


def test_timeout_raises_with_console_tail_and_guest_survives(vm):
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout) as ei:
        vm.run("sleep 30", timeout=1.5)
    assert time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert "did not finish within 1.5 s" in msg and "console tail" in msg and "sleep 30" in msg
    assert vm.run("echo alive", timeout=20).output == "alive\n"


def test_two_guests_on_one_bridge_ping_each_other(guest_image):
    with netns_with_bridge("vwf", taps=2, addr="10.88.0.1/24") as (ns, br, taps):
        a = GuestVM([f"qemu-tap,ifname={taps[0]}"], ip="10.88.0.11/24", image=guest_image,
                    netns=ns.name, hostname="ga")
        b = GuestVM([f"qemu-tap,ifname={taps[1]}"], ip="10.88.0.12/24", image=guest_image,
                    netns=ns.name, hostname="gb")
        with a, b:
            a.wait_ready(90)
            b.wait_ready(90)
            ab = a.run("ping -c 3 -W 3 10.88.0.12", timeout=30)
            ba = b.run("ping -c 3 -W 3 10.88.0.11", timeout=30)
            assert "3 packets received" in ab.output, ab.output
            assert "3 packets received" in ba.output, ba.output
            assert b.run("hostname", timeout=20).output == "gb\n"
            # The bridge saw both guests' MACs (distinct per VM).
            macs = {v.run("cat /sys/class/net/eth0/address", timeout=20).output.strip()
                    for v in (a, b)}
            assert len(macs) == 2
            fdb = ns.run(["bridge", "fdb", "show", "br", br]).stdout
            assert all(m in fdb for m in macs)
        assert not a.is_running() and not b.is_running()
        name = ns.name
    assert not netns_exists(name)


def test_demo_command():
    proc = subprocess.run([sys.executable, "-m", "virtwire", "vm", "--demo", "--json"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is True
    assert out["ping"] == {"sent": 3, "received": 3, "avg_rtt_ms": out["ping"]["avg_rtt_ms"]}
    assert out["guest_eth0"]["tx_packets"] >= 3 and out["host_tap"]["rx_packets"] >= 3
    assert not netns_exists(out["netns"])


def test_vm_command_cli():
    proc = subprocess.run([sys.executable, "-m", "virtwire", "vm", "--command",
                           "cat /proc/cmdline; exit 4", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == 4
    assert out["output"].startswith("console=ttyS0 panic=-1 quiet")
    assert 0 < out["ready_seconds"] <= out["ready_seconds_since_start"] + 0.1


def test_tap_refused_by_kernel_is_one_line(guest_image):
    # "lo" is a valid name but not a TAP: the kernel refuses TUNSETIFF, QEMU exits at once.
    with netns("vwf") as ns:
        proc = subprocess.run([sys.executable, "-m", "virtwire", "vm", "--netns", ns.name,
                               "--net", "qemu-tap,ifname=lo", "-c", "true"],
                              capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1
    assert len(lines) == 1 and lines[0].startswith("virtwire: error: ")
    assert "could not configure /dev/net/tun (lo)" in lines[0]
    with pytest.raises(GuestError, match="does not exist"):
        GuestVM(["qemu-tap,ifname=t0"], netns="vwf-no-such-ns", image=guest_image).start()


def test_netns_helper_cleans_up_on_failure():
    with pytest.raises(RuntimeError):
        with netns("vwf") as ns:
            tap = ns.add_tap("vwft0", addr="10.89.0.1/24")
            assert re.search(r"10\.89\.0\.1/24", ns.run(["ip", "addr", "show", tap]).stdout)
            name = ns.name
            raise RuntimeError("test body failed")
    assert not netns_exists(name)
    with netns("vwf") as ns:
        with pytest.raises(TapError, match="bad interface name"):
            ns.add_tap("much-too-long-tap-name")
        ns.add_tap("vwft1")
        with pytest.raises(TapError, match="cannot create TAP 'vwft1'"):
            ns.add_tap("vwft1")


def test_netns_fixtures(tap_netns, bridge_netns):
    ns, tap = tap_netns
    ns2, br, taps = bridge_netns
    assert ns.name != ns2.name
    assert "tun" in ns.run(["ip", "-d", "link", "show", tap]).stdout
    for t in taps:
        assert f"master {br}" in ns2.run(["ip", "link", "show", t]).stdout
