"""``virtwire vm``: boot the default guest under QEMU (console on the terminal, one command, or
the demo: a guest on QEMU's virtio-net wired to a TAP in a private namespace, pinging the host)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from virtwire.errors import UserFacingError
from virtwire.guest.nics import nic_kinds
from virtwire.guest.qemu import ACCELS, GuestVM

NAME = "vm"
HELP = "boot the default guest under QEMU (try: virtwire vm --demo)"

DEMO_HOST = "10.77.0.1"
DEMO_GUEST = "10.77.0.2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demo", action="store_true",
                        help="boot a guest on a TAP in a new netns, ping the host, clean up")
    parser.add_argument("--net", action="append", default=[], metavar="KIND[,key=val...]",
                        help=f"add a NIC (kinds: {', '.join(nic_kinds())}); eth0 first")
    parser.add_argument("--ip", help="guest address of eth0, e.g. 10.1.2.3/24")
    parser.add_argument("--gw", help="guest default gateway")
    parser.add_argument("--hostname", help="guest host name")
    parser.add_argument("--memory", default="256M", help="guest RAM (default 256M)")
    parser.add_argument("--smp", type=int, default=1, help="guest CPUs (default 1)")
    parser.add_argument("--accel", default="tcg", choices=ACCELS, help="QEMU accelerator")
    parser.add_argument("--netns", help="run QEMU inside this network namespace")
    parser.add_argument("--append", default="", help="extra kernel command-line arguments")
    parser.add_argument("--command", "-c", metavar="CMD",
                        help="run CMD in the guest, print its output, exit with its status")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds allowed for boot and for --command (default 60)")
    parser.add_argument("--json", action="store_true", help="machine-readable result")
    from virtwire.commands.trace_options import add_trace_arguments

    add_trace_arguments(parser)  # exported to sidecars (serve, PCI proxy): FILE.<cmd>.<pid>


def _process_age() -> float:
    """Seconds since this process started (from /proc), so timings include Python start-up."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return 0.0


def run(args: argparse.Namespace) -> int:
    from virtwire.commands.trace_options import configure_from_args

    configure_from_args(args)
    if args.demo:
        return demo(json_out=args.json, accel=args.accel, timeout=args.timeout)
    vm = GuestVM(net=args.net, ip=args.ip, gw=args.gw, hostname=args.hostname,
                 memory=args.memory, smp=args.smp, accel=args.accel, netns=args.netns,
                 append=args.append)
    with vm:
        vm.wait_ready(args.timeout)
        since_start = _process_age()
        if args.command is None:
            if not args.json:
                sys.stderr.write(f"virtwire: guest ready in {vm.ready_seconds:.1f} s; console "
                                 "attached (Ctrl-] or `exit` stops the guest)\n")
            vm.interact()
            return 0
        result = vm.run(args.command, timeout=args.timeout)
    if args.json:
        print(json.dumps({"command": result.command, "status": result.status,
                          "output": result.output, "ready_seconds": round(vm.ready_seconds, 3),
                          "ready_seconds_since_start": round(since_start, 3)}, indent=2))
    else:
        sys.stdout.write(result.output)
        if result.output and not result.output.endswith("\n"):
            sys.stdout.write("\n")
    return result.status


def demo(*, json_out: bool = False, accel: str = "tcg", timeout: float = 60.0) -> int:
    """The README's first command: guest <-> TAP in a private netns, ping, tidy summary."""
    from virtwire.netns import netns_with_tap

    say = (lambda s: None) if json_out else (lambda s: print(s, flush=True))
    t0 = time.monotonic()
    say("virtwire demo: a Debian guest on QEMU's virtio-net, wired to a TAP in a private "
        "network namespace")
    summary: dict = {}
    with netns_with_tap("vw-demo", addr=f"{DEMO_HOST}/24", tap="vwtap0") as (ns, tap):
        say(f"  netns    {ns.name}: TAP {tap} at {DEMO_HOST}/24")
        with GuestVM(net=[f"qemu-tap,ifname={tap}"], ip=f"{DEMO_GUEST}/24",
                     hostname="vw-demo", accel=accel, netns=ns.name) as vm:
            ready = vm.wait_ready(timeout)
            kernel = vm.run("uname -r", check=True).output.strip()
            say(f"  guest    Debian kernel {kernel}, eth0 {DEMO_GUEST}/24, ready in {ready:.1f} s "
                f"({accel})")
            ping = vm.run(f"ping -c 3 -W 2 {DEMO_HOST}", timeout=20)
            m = re.search(r"(\d+) packets transmitted, (\d+) packets received", ping.output)
            rtt = re.search(r"= [\d.]+/([\d.]+)/", ping.output)
            sent, got = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
            say(f"  ping     guest -> host {DEMO_HOST}: {got}/{sent} replies"
                + (f", avg rtt {rtt.group(1)} ms" if rtt else ""))
            stats = vm.run("cat /sys/class/net/eth0/statistics/rx_packets "
                           "/sys/class/net/eth0/statistics/tx_packets", check=True).output.split()
            host = ns.link_stats(tap)
            say(f"  counters guest eth0 rx {stats[0]} tx {stats[1]} packets; "
                f"host {tap} rx {host['rx_packets']} tx {host['tx_packets']} packets")
            summary = {"netns": ns.name, "tap": tap, "kernel": kernel,
                       "ready_seconds": round(ready, 3), "accel": accel,
                       "ping": {"sent": sent, "received": got,
                                "avg_rtt_ms": float(rtt.group(1)) if rtt else None},
                       "guest_eth0": {"rx_packets": int(stats[0]), "tx_packets": int(stats[1])},
                       "host_tap": host}
    ok = summary["ping"]["received"] > 0 and summary["ping"]["received"] == summary["ping"]["sent"]
    summary["ok"] = ok
    summary["seconds"] = round(time.monotonic() - t0, 3)
    if json_out:
        print(json.dumps(summary, indent=2))
    if not ok:
        raise UserFacingError(f"demo failed: the guest got {summary['ping']['received']}/"
                              f"{summary['ping']['sent']} ping replies from the host")
    say(f"  done     guest stopped, namespace removed; {summary['seconds']:.1f} s in all: ok")
    return 0
