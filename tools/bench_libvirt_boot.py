#!/usr/bin/env python3
"""Start-to-ready time and ping round trip of a libvirt guest on ``virtwire serve``, against the
same guest on the same port started by virtwire's own launcher, in one run.

    python3 tools/bench_libvirt_boot.py [--rounds 5] [--pings 20] [--json]

Set-up: a network namespace with a TAP (10.83.0.1/24) and ``virtwire serve`` on it; a libvirtd of
this run's own (``virtwire.testing.libvirtd``). Each round boots, on that one port:

- ``libvirt``: a domain made by ``virtwire libvirt domain`` + ``attach``, ``virsh start`` (TCG);
- ``launcher``: ``GuestVM(net=["vhost-user,socket=..."])``, QEMU started directly.

Both are the default guest image, 1 vCPU, 256 MiB; "ready" is the guest's ready marker on its
serial console, counted from ``virsh start`` or the QEMU launch. Then ``ping -c N`` to the TAP.
Printed: medians per kind and the ratio libvirt/launcher (JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

from virtwire.cli import main as vw
from virtwire.guest.qemu import GuestVM
from virtwire.testing.libvirtd import Libvirtd, LibvirtGuest
from virtwire.testing.serve_process import serve_on_tap

TAP_ADDR, GUEST_IP = "10.83.0.1/24", "10.83.0.2/24"


def _ping(vm: GuestVM, count: int) -> tuple[int, float]:
    out = vm.run(f"ping -c {count} -i 0.2 -W 2 {TAP_ADDR.split('/')[0]}", timeout=120).output
    got = re.search(r"(\d+) packets received", out)
    avg = re.search(r"= [\d.]+/([\d.]+)/", out)
    if not got:
        raise SystemExit(f"bench: no ping summary: {out[-300:]}")
    return int(got.group(1)), float(avg.group(1)) if avg else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="boots per kind (default 5)")
    ap.add_argument("--pings", type=int, default=20, help="pings per boot (default 20)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    if not 1 <= args.rounds <= 50 or not 1 <= args.pings <= 1000:
        ap.error("--rounds 1..50, --pings 1..1000")
    tmp = Path(tempfile.mkdtemp(prefix="vwbl-"))
    res: dict[str, dict[str, list]] = {k: {"ready_s": [], "received": [], "rtt_ms": []}
                                       for k in ("libvirt", "launcher")}
    with Libvirtd() as d, serve_on_tap(tmp, "vwbl", tap_addr=TAP_ADDR) as (_ns, _srv, sock):
        name, console = "vwbl-bench", str(tmp / "console.sock")
        d.adopt(name)
        with open("/dev/null", "w") as null:
            saved, sys.stdout = sys.stdout, null
            try:
                rc = vw(["libvirt", "domain", name, "--ip", GUEST_IP, "--console-socket",
                         console, "--define", "-c", d.uri])
                rc = rc or vw(["libvirt", "attach", name, "--port", sock, "-c", d.uri])
            finally:
                sys.stdout = saved
        if rc:
            raise SystemExit("bench: could not define and attach the domain")
        for i in range(args.rounds):
            for kind in ("libvirt", "launcher"):
                vm = (LibvirtGuest(d, name, console) if kind == "libvirt" else
                      GuestVM(net=[f"vhost-user,socket={sock}"], ip=GUEST_IP, name="vwbl-l"))
                with vm:
                    ready = vm.wait_ready(120)
                    got, rtt = _ping(vm, args.pings)
                r = res[kind]
                r["ready_s"].append(round(ready, 2))
                r["received"].append(got)
                r["rtt_ms"].append(rtt)
                print(f"  round {i + 1}/{args.rounds} {kind:8} ready {ready:5.2f} s, "
                      f"{got}/{args.pings} pings, avg rtt {rtt:.2f} ms",
                      file=sys.stderr, flush=True)
    summary = {k: {"median_ready_s": round(statistics.median(v["ready_s"]), 2),
                   "median_rtt_ms": round(statistics.median(v["rtt_ms"]), 3),
                   "pings": f"{sum(v['received'])}/{args.pings * args.rounds}", **v}
               for k, v in res.items()}
    lv, ln = summary["libvirt"], summary["launcher"]
    ratios = {"ready": round(lv["median_ready_s"] / ln["median_ready_s"], 3),
              "rtt": round(lv["median_rtt_ms"] / ln["median_rtt_ms"], 3)}
    if args.json:
        print(json.dumps({"rounds": args.rounds, "pings": args.pings, **summary,
                          "ratio_libvirt_over_launcher": ratios}))
    else:
        print(f"{'':10} {'ready (median)':>15} {'ping rtt (median)':>18} {'pings':>9}")
        for k in ("libvirt", "launcher"):
            s = summary[k]
            print(f"{k:10} {s['median_ready_s']:13.2f} s {s['median_rtt_ms']:15.3f} ms "
                  f"{s['pings']:>9}")
        print(f"{'ratio':10} {ratios['ready']:14.3f}x {ratios['rtt']:17.3f}x   (libvirt/launcher)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
