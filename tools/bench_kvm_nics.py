#!/usr/bin/env python3
"""virtio-net vs the classic RTL8139 on ``virtwire kvm``: real KVM exits per packet.

The seed's claim: an emulated NIC traps on every register access, a paravirtual one batches
through shared rings. Both NICs run here in the same run, with the same C guest program (its
virtio-net driver or its RTL8139 driver), the same Python VMM and back ends:

- **burst**: the guest sends ``--frames`` frames of ``--size`` bytes to the null backend;
  frames/s (frames over the vCPU thread's run time) and exits per frame. Exits per frame are
  *marginal*: (exits of a run with F frames - exits of a run with F/10 frames) / (0.9 F), so the
  set-up's exits (PCI enumeration, console) cancel out.
- **ping**: ``virtwire kvm --guest ping`` on a TAP in a private netns, pinged from the netns
  ``--pings`` times and a tenth as many; exits per round trip are marginal the same way (ARP
  and set-up cancel out). Every exit to the VMM counts (``KVM_RUN`` returns).

    flock /tmp/vw-heavy.lock python3 tools/bench_kvm_nics.py [--frames 20000] [--pings 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

PINGER = r'''
import os, socket, struct, sys, time
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack(f"!{len(b)//2}H", b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
dst, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(2.0)
ident, ok, rtts = os.getpid() & 0xffff, 0, []
for seq in range(1, count + 1):
    h = struct.pack("!BBHHH", 8, 0, 0, ident, seq); p = bytes(56)
    h = struct.pack("!BBHHH", 8, 0, csum(h + p), ident, seq); t0 = time.perf_counter()
    s.sendto(h + p, (dst, 0)); deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try: data, _ = s.recvfrom(2048)
        except socket.timeout: break
        ihl = (data[0] & 15) * 4; t, c, ck, i, q = struct.unpack("!BBHHH", data[ihl:ihl+8])
        if t == 0 and i == ident and q == seq:
            ok += 1; rtts.append(time.perf_counter() - t0); break
print(ok, sum(rtts) / max(len(rtts), 1))
'''


def burst(nic: str, frames: int, size: int) -> dict:
    from virtwire.backends.null import NullBackend
    from virtwire.kvm.machine import Machine, MachineConfig

    m = Machine(MachineConfig(guest="burst", burst_count=frames, burst_size=size, nic=nic),
                [NullBackend("null:bench")])
    try:
        res = m.run()
    finally:
        m.close()
    if res.reason.status != 0:
        sys.exit(f"bench_kvm_nics: {nic} burst: {res.reason.message}")
    return {"frames": int(res.report["report"]["tx"]), "exits": res.exits,
            "seconds": res.run_seconds}


def ping(nic: str, count: int) -> dict:
    from virtwire.netns import netns_with_tap

    with netns_with_tap("vwbn", addr="10.93.9.1/24") as (ns, tap):
        proc = subprocess.Popen(
            [sys.executable, "-m", "virtwire", "kvm", "--nic", nic, "--guest", "ping", "--net",
             f"tap,ifname={tap}", "--netns", ns.name, "--ip", "10.93.9.2/24", "--json",
             "--timeout", "300"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            seen, deadline = b"", time.monotonic() + 60
            while b"vwguest: ready" not in seen and time.monotonic() < deadline:
                if select.select([proc.stderr], [], [], 1.0)[0]:
                    seen += os.read(proc.stderr.fileno(), 65536)
            r = ns.run([sys.executable, "-c", PINGER, "10.93.9.2", str(count)], timeout=600)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _err = proc.communicate(timeout=30)
    ok, rtt = r.stdout.split()
    if int(ok) != count:
        sys.exit(f"bench_kvm_nics: {nic}: {ok}/{count} pings answered")
    return {"pings": count, "exits": json.loads(out)["exits"], "rtt_us": float(rtt) * 1e6}


def measure(nic: str, frames: int, size: int, pings: int) -> dict:
    small, big = burst(nic, frames // 10, size), burst(nic, frames, size)
    p_small, p_big = ping(nic, max(pings // 10, 1)), ping(nic, pings)
    return {"nic": nic, "frames_per_s": big["frames"] / big["seconds"],
            "exits_per_frame": (big["exits"] - small["exits"]) / (big["frames"] - small["frames"]),
            "exits_per_ping": (p_big["exits"] - p_small["exits"]) / (pings - p_small["pings"]),
            "rtt_us": p_big["rtt_us"], "burst_exits": big["exits"], "burst_frames": big["frames"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--pings", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from virtwire.kvm.vm import install_kick_signal

    install_kick_signal()
    rows = [measure(nic, args.frames, args.size, args.pings) for nic in ("virtio", "rtl8139")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'nic':<8} {'burst frames/s':>14} {'exits/frame':>12} {'exits/ping RTT':>15} "
          f"{'ping RTT us':>12}")
    for r in rows:
        print(f"{r['nic']:<8} {r['frames_per_s']:>14.0f} {r['exits_per_frame']:>12.2f} "
              f"{r['exits_per_ping']:>15.2f} {r['rtt_us']:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
