#!/usr/bin/env python3
"""iperf3 guest->host and host->guest through ``virtwire serve`` (vhost-user + TAP) beside QEMU's
own virtio-net on the same TAP set-up, in the same run, as ratios.

    python3 tools/bench_vhost_iperf.py [--seconds 8] [--json]

Set-up, identical for both: a network namespace with a persistent TAP (10.78.0.1/24) and an
``iperf3 -s`` on it; a Debian guest under QEMU TCG (1 vCPU, 512 MiB) at 10.78.0.2. Ours: the
guest's NIC is vhost-user, served by ``virtwire serve --port ...,backend=tap``. QEMU's: the
guest's NIC is ``-netdev tap`` + ``virtio-net-pci`` (QEMU's userspace virtio-net). The guest runs
``iperf3 -c`` (guest->host) and ``iperf3 -c -R`` (host->guest); the receiver's rate counts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import subprocess
import sys
import tempfile

from virtwire.guest.qemu import GuestVM
from virtwire.netns import netns

HOST, GUEST = "10.78.0.1", "10.78.0.2"


def _rate(out: str) -> float:
    m = re.findall(r"([\d.]+) Mbits/sec.*receiver", out)
    if not m:
        raise SystemExit(f"bench: no iperf3 result in:\n{out}")
    return float(m[-1])


def _measure(vm: GuestVM, seconds: float) -> dict[str, float]:
    vm.wait_ready(120)
    vm.run(f"ping -c 3 -W 2 {HOST} >/dev/null", timeout=30)
    t = int(seconds)
    up = vm.run(f"iperf3 -f m -c {HOST} -t {t}", timeout=t + 60).output
    down = vm.run(f"iperf3 -f m -c {HOST} -t {t} -R", timeout=t + 60).output
    return {"guest_to_host_mbps": _rate(up), "host_to_guest_mbps": _rate(down)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vwv-iperf-")
    with netns("vwvi") as ns:
        subprocess.run(["ip", "-n", ns.name, "tuntap", "add", "dev", "vwvi0", "mode", "tap"],
                       check=True)
        subprocess.run(["ip", "-n", ns.name, "addr", "add", f"{HOST}/24", "dev", "vwvi0"],
                       check=True)
        subprocess.run(["ip", "-n", ns.name, "link", "set", "vwvi0", "up"], check=True)
        srv3 = subprocess.Popen(["ip", "netns", "exec", ns.name, "iperf3", "-s", "-B", HOST],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        serve = None
        try:
            # ours
            sock = os.path.join(tmp, "vw.sock")
            r, w = os.pipe()
            env = dict(os.environ, VIRTWIRE_SERVE_READY_FD=str(w))
            serve = subprocess.Popen(
                ["ip", "netns", "exec", ns.name, sys.executable, "-m", "virtwire", "serve",
                 "-q", "--port", f"vhost-user,path={sock},backend=tap,ifname=vwvi0"],
                pass_fds=(w,), env=env, stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(tmp, "serve.log"), "wb"))
            os.close(w)
            ready, _, _ = select.select([r], [], [], 20)
            os.close(r)
            if not ready:
                raise SystemExit("bench: virtwire serve did not start")
            with GuestVM(net=[f"vhost-user,socket={sock}"], ip=f"{GUEST}/24",
                         memory="512M", name="vwv-iperf-ours") as vm:
                ours = _measure(vm, args.seconds)
            serve.terminate()
            serve.wait(10)
            serve = None
            # QEMU's own virtio-net on the same TAP
            with GuestVM(net=["qemu-tap,ifname=vwvi0"], ip=f"{GUEST}/24", memory="512M",
                         netns=ns.name, name="vwv-iperf-qemu") as vm:
                qemu = _measure(vm, args.seconds)
        finally:
            if serve is not None:
                serve.terminate()
                serve.wait(10)
            srv3.terminate()
            srv3.wait(10)
    result = {
        "ours": ours, "qemu_virtio_net": qemu,
        "ratio_guest_to_host": round(ours["guest_to_host_mbps"] / qemu["guest_to_host_mbps"], 3),
        "ratio_host_to_guest": round(ours["host_to_guest_mbps"] / qemu["host_to_guest_mbps"], 3),
        "load_average": os.getloadavg()[0],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("iperf3 through a TAP, Debian guest under QEMU TCG (Mbit/s, receiver side):")
        print(f"  {'':24}{'virtwire':>10}{'QEMU':>10}{'ratio':>8}")
        for key, label in (("guest_to_host_mbps", "guest -> host"),
                           ("host_to_guest_mbps", "host -> guest")):
            o, q = ours[key], qemu[key]
            print(f"  {label:24}{o:>10.0f}{q:>10.0f}{o / q:>8.2f}")
        print(f"  (load average {result['load_average']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
