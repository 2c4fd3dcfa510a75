#!/usr/bin/env python3
"""Per-access round-trip cost of virtwire's PCI-proxy device, and iperf3 through it beside the
vhost-user device, in one run.

    python3 tools/bench_pci_proxy.py [--seconds 5] [--reads 200] [--rounds 1] [--json]

Set-up, identical for both devices: a network namespace with a persistent TAP (10.78.x.1/24) and
``iperf3 -s`` on it; the Debian guest under QEMU TCG (1 vCPU, 256 MiB) at 10.78.x.2.

- ``pci``: ``GuestVM(net=["pci,backend=tap,ifname=..."])`` -- the whole device in virtwire behind
  QEMU's ``x-pci-proxy-dev``, INTx over qtest.
- ``vhost-user``: ``virtwire serve --port vhost-user,...,backend=tap`` and QEMU's vhost-user
  virtio-net-pci (QEMU keeps PCI, virtwire serves the rings).

Per-access cost (PCI device only): the guest reads its whole configuration space 200 times with
one ``cat`` (64 dword reads each, every one a synchronous round trip vCPU -> QEMU -> our sidecar
-> back), against the same on QEMU's own host bridge (00:00.0, emulated inside QEMU); the
difference per read is the proxy's round trip. The sidecar reports its own service time per
message type, and the qtest INTx lower (which an ISR read waits for) as p10/p50/p90.
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
from typing import Any

from virtwire.guest.qemu import GuestVM
from virtwire.netns import netns, netns_with_tap


def _rate(out: str) -> float:
    m = re.findall(r"([\d.]+) Mbits/sec.*receiver", out)
    if not m:
        raise SystemExit(f"bench: no iperf3 result in:\n{out[-800:]}")
    return float(m[-1])


def _iperf(vm: GuestVM, ns_name: str, host: str, seconds: int) -> dict[str, float]:
    srv = subprocess.Popen(["ip", "netns", "exec", ns_name, "iperf3", "-s", "-B", host],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        vm.run(f"ping -c 3 -W 2 {host} >/dev/null", timeout=30)
        up = vm.run(f"iperf3 -f m -c {host} -t {seconds}", timeout=seconds + 60).output
        down = vm.run(f"iperf3 -f m -c {host} -t {seconds} -R", timeout=seconds + 60).output
    finally:
        srv.kill()
        srv.wait()
    return {"guest_to_host_mbps": _rate(up), "host_to_guest_mbps": _rate(down)}


def _config_reads(vm: GuestVM, bdf: str, n: int) -> float:
    """Seconds for ``n`` reads of the whole 256-byte config space of ``bdf`` (guest clock)."""
    out = vm.run(
        f"F=/sys/bus/pci/devices/{bdf}/config; set --; i=0; "
        f"while [ $i -lt {n} ]; do set -- \"$@\" $F; i=$((i+1)); done; "
        "t0=$(cat /proc/uptime); cat \"$@\" >/dev/null; t1=$(cat /proc/uptime); echo $t0 $t1",
        timeout=300).output.split()
    return float(out[2]) - float(out[0])


def _pct(samples: list[float]) -> list[float]:
    s = sorted(samples)
    return [round(s[int(len(s) * q)] * 1e6, 1) for q in (0.1, 0.5, 0.9)] if s else []


def bench_pci(seconds: int, reads: int) -> dict[str, Any]:
    with netns_with_tap("vwxb", addr="10.78.30.1/24") as (ns, tap):
        with GuestVM([f"pci,backend=tap,ifname={tap}"], ip="10.78.30.2/24", netns=ns.name,
                     name=f"vwxb{os.getpid() % 10000}") as vm:
            vm.wait_ready(120)
            px = vm.pci_proxy
            before = dict(px.remote.counts)
            t_emul = _config_reads(vm, "0000:00:00.0", reads)
            t_ours = _config_reads(vm, "0000:00:02.0", reads)
            proxied = px.remote.counts.get("PCI_CFGREAD", 0) - before.get("PCI_CFGREAD", 0)
            dwords = reads * 64
            intx = px.transport.intx
            intx.lower_samples.clear()
            rates = _iperf(vm, ns.name, "10.78.30.1", seconds)
            st = px.stats()
            msgs = st["proxy"]["messages"]
            return {
                **rates,
                "config_read_us": {
                    "proxied": round(t_ours / dwords * 1e6, 1),
                    "qemu_emulated": round(t_emul / dwords * 1e6, 1),
                    "proxy_round_trip": round((t_ours - t_emul) / dwords * 1e6, 1),
                    "reads": dwords, "proxied_messages_seen": proxied,
                },
                "sidecar_service_us": {k: round(v / msgs[k] * 1e6, 1)
                                       for k, v in st["proxy"]["service_seconds"].items()},
                "messages": msgs,
                "intx_lower_us_p10_p50_p90": _pct(list(intx.lower_samples)),
                "isr_reads": st["transport"]["isr_reads"],
                "isr_zero_reads": st["transport"]["isr_zero_reads"],
                "raises": st["intx"].get("raises", 0),
            }


def bench_vhost(seconds: int) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="vwxb-")
    sock = os.path.join(tmp, "vwxb.sock")
    with netns("vwxb") as ns:
        for argv in (["tuntap", "add", "dev", "vwxb0", "mode", "tap"],
                     ["addr", "add", "10.78.31.1/24", "dev", "vwxb0"],
                     ["link", "set", "vwxb0", "up"]):
            subprocess.run(["ip", "-n", ns.name, *argv], check=True)
        r, w = os.pipe()
        env = dict(os.environ, VIRTWIRE_SERVE_READY_FD=str(w))
        with open(os.path.join(tmp, "serve.log"), "wb") as log:
            srv = subprocess.Popen(
                ["ip", "netns", "exec", ns.name, sys.executable, "-m", "virtwire", "serve", "-q",
                 "--port", f"vhost-user,path={sock},backend=tap,ifname=vwxb0"],
                pass_fds=(w,), env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], 30)
            if not ready:
                raise SystemExit("bench: virtwire serve did not become ready")
            with GuestVM([f"vhost-user,socket={sock}"], ip="10.78.31.2/24",
                         name=f"vwxv{os.getpid() % 10000}") as vm:
                vm.wait_ready(120)
                return _iperf(vm, ns.name, "10.78.31.1", seconds)
        finally:
            os.close(r)
            srv.terminate()
            srv.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 duration per direction")
    ap.add_argument("--reads", type=int, default=200, help="whole-config-space reads")
    ap.add_argument("--rounds", type=int, default=1, help="repeat both devices this often")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = []
    for _ in range(args.rounds):
        runs.append({"pci_proxy": bench_pci(args.seconds, args.reads),
                     "vhost_user": bench_vhost(args.seconds),
                     "loadavg": os.getloadavg()[0]})
    if args.json:
        print(json.dumps(runs, indent=1))
        return 0
    for i, run in enumerate(runs):
        p, v = run["pci_proxy"], run["vhost_user"]
        c = p["config_read_us"]
        print(f"round {i + 1} (load average {run['loadavg']:.1f} on {os.cpu_count()} CPUs)")
        print(f"  config read: proxied {c['proxied']} us, QEMU-emulated {c['qemu_emulated']} us,"
              f" proxy round trip {c['proxy_round_trip']} us ({c['reads']} reads)")
        print(f"  sidecar service per message (us): {p['sidecar_service_us']}")
        print(f"  qtest INTx lower p10/p50/p90 (us): {p['intx_lower_us_p10_p50_p90']}; "
              f"ISR reads {p['isr_reads']} (zero: {p['isr_zero_reads']}), raises {p['raises']}")
        print("  iperf3 Mbit/s   guest->host  host->guest")
        for name, r in (("pci proxy", p), ("vhost-user", v)):
            print(f"    {name:<12}  {r['guest_to_host_mbps']:>11.0f}  "
                  f"{r['host_to_guest_mbps']:>11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
