"""A real guest on our vhost-user device, traced: every phase in order, the guest's real features.

``virtwire serve --trace T --pcap P`` runs in a namespace of its own with a TAP (10.73.0.1/24);
a Debian guest boots on it under QEMU TCG and pings the TAP. Then:

- ``virtwire explain T`` finds discovery (the vhost-user handshake), device set-up, negotiation,
  queue set-up, first transmit, first receive and steady state, in that order;
- the features the trace says were negotiated are the ones the guest's virtio driver reports
  (``/sys/bus/virtio/devices/virtioN/features``) for the bits the back end handles;
- tshark reads the pcap: the guest's echo requests outbound, the replies inbound.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from virtwire.explain import analyze, load, narrate
from virtwire.guest.qemu import GuestVM
from virtwire.netns import netns
from virtwire.virtio import spec

pytestmark = pytest.mark.system

# virtio-net features QEMU's vhost-user net front end serves itself, never forwarded.
QEMU_OWN = spec.bit(spec.VIRTIO_NET_F_MAC, spec.VIRTIO_NET_F_STATUS, spec.VIRTIO_NET_F_CTRL_VQ,
                    spec.VIRTIO_NET_F_CTRL_RX, spec.VIRTIO_NET_F_CTRL_VLAN,
                    spec.VIRTIO_NET_F_CTRL_RX_EXTRA, spec.VIRTIO_NET_F_GUEST_ANNOUNCE,
                    spec.VIRTIO_NET_F_CTRL_MAC_ADDR, spec.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
                    spec.VHOST_USER_F_PROTOCOL_FEATURES)


def _serve(ns_name: str, sock: str, tpath: Path, ppath: Path, log: Path) -> subprocess.Popen:
    argv = ["ip", "netns", "exec", ns_name, sys.executable, "-m", "virtwire", "serve", "-q",
            "--trace", str(tpath), "--pcap", str(ppath),
            "--port", f"vhost-user,path={sock},backend=tap,ifname=vwtt0"]
    r, w = os.pipe()
    env = dict(os.environ, VIRTWIRE_SERVE_READY_FD=str(w))
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=f, pass_fds=(w,), env=env,
                                stdin=subprocess.DEVNULL)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        if not (ready and os.read(r, 1) == b"1"):
            proc.kill()
            proc.wait(10)
            raise AssertionError("serve did not start: " + log.read_text()[-2000:])
    finally:
        os.close(r)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def guest_features(vm: GuestVM) -> int:
    """The feature bits the guest's virtio core negotiated (sysfs: one char per bit)."""
    out = vm.run("cat /sys/class/net/eth0/device/features", timeout=20).output
    bits = re.search(r"[01]{32,}", out)
    assert bits, out
    return sum(1 << i for i, c in enumerate(bits.group(0)) if c == "1")


def test_vhost_user_guest_trace_tells_every_phase(tmp_path: Path, guest_image) -> None:
    tpath, ppath = tmp_path / "vu.jsonl", tmp_path / "vu.pcapng"
    sock = str(tmp_path / "vwt.sock")
    with netns("vwt") as ns:
        ns.add_tap("vwtt0", addr="10.73.0.1/24")
        srv = _serve(ns.name, sock, tpath, ppath, tmp_path / "serve.log")
        try:
            with GuestVM(net=[f"vhost-user,socket={sock}"], ip="10.73.0.2/24", image=guest_image,
                         name=f"vwt{os.getpid() % 10000}") as vm:
                vm.wait_ready(120)
                out = vm.run("ping -c 5 -i 0.3 -W 2 10.73.0.1", timeout=60).output
                assert re.search(r"5 packets received", out), out
                feats = guest_features(vm)
        finally:
            _stop(srv)
        log = (tmp_path / "serve.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]

    events, sources = load([tpath])
    a = analyze(events, sources)
    assert a.transport == "vhost-user"
    assert a.in_order(), [(p.id, p.start) for p in a.phases]
    # The back end negotiates what QEMU passes on (QEMU keeps the MAC, link status and the
    # control queue for itself); for every other bit it offered, the guest's choice is exact.
    negotiated = int(a.negotiated_hex, 16)
    offered = sum(1 << b for b, n in spec.FEATURE_NAMES.items() if n in a.offered)
    assert negotiated >> spec.VIRTIO_F_VERSION_1 & 1
    assert negotiated & ~feats == 0, spec.feature_names(negotiated & ~feats)
    assert negotiated == feats & offered & ~QEMU_OWN, \
        (spec.feature_names(negotiated), spec.feature_names(feats & offered & ~QEMU_OWN))
    text = narrate(a)
    (tmp_path / "narrative.txt").write_text(text)
    for title in ("Discovery (vhost-user handshake)", "Feature negotiation", "First transmit",
                  "First receive", "Steady state"):
        assert title in text
    assert any("ICMP echo request" in f for p in a.phases for f in p.facts) or \
        any(e.get("cat") == "frame" and "echo request" in e.get("summary", "")
            for e in a.events)
    assert a.steady["kicks"] > 0 and a.steady["irqs"] > 0

    res = subprocess.run(["tshark", "-r", str(ppath), "-Y", "icmp", "-T", "fields", "-e",
                          "frame.packet_flags_direction", "-e", "icmp.type"],
                         capture_output=True, text=True, timeout=60)
    rows = [r.split("\t") for r in res.stdout.splitlines() if r.strip()]
    assert sum(1 for d, t in rows if t == "8" and int(d, 16) == 2) >= 5  # requests: outbound
    assert sum(1 for d, t in rows if t == "0" and int(d, 16) == 1) >= 5  # replies: inbound
