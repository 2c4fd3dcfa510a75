"""``virtwire kvm``: a small VMM on /dev/kvm whose vCPU exits reach our NIC's PCI function
(virtio-net, or the classic RTL8139 with ``--nic rtl8139``).

The guest's UART is the terminal (stdout; stderr with ``--json``). The run ends with one line on
stderr saying why, and an exit status: the guest's own status (0 when it exited cleanly, the
program's error codes otherwise), 124 for ``--timeout``, 3 for a triple fault or failed entry,
4 for an instruction this host's KVM cannot emulate.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from virtwire.errors import CliError, UserFacingError

NAME = "kvm"
HELP = "run a guest on /dev/kvm with virtwire's own PCI bus and NIC (virtio-net or RTL8139)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guest", default="ping", metavar="ping|burst|FILE.bin",
                        help="our guest program (ping: answer ARP/ICMP; burst: send --count "
                             "frames), a hostile test (garbage|badbar|badring|badinsn), or a "
                             "flat binary started at the real-mode reset vector F000:FFF0")
    parser.add_argument("--net", default="null", metavar="tap,ifname=T|switch|null",
                        help="the NIC's backend (default null)")
    parser.add_argument("--ip", default="10.0.2.15/24", metavar="A/N",
                        help="the guest program's IPv4 address (default 10.0.2.15/24)")
    parser.add_argument("--netns", help="open the TAP in this network namespace")
    parser.add_argument("--mac", help="the NIC's MAC address (default: random, locally managed)")
    parser.add_argument("--nic", default="virtio", choices=("virtio", "rtl8139"),
                        help="the NIC on the PCI bus: virtio-net (default) or the classic "
                             "RTL8139 (10ec:8139 rev 0x10, every register access an exit)")
    parser.add_argument("--transitional", action="store_true",
                        help="transitional device 0x1000 with the legacy I/O BAR")
    parser.add_argument("--count", type=int, default=1000, help="burst: frames (default 1000)")
    parser.add_argument("--size", type=int, default=60, help="burst: frame size (60..1514)")
    parser.add_argument("--memory", type=int, default=None, metavar="MIB",
                        help="guest RAM in MiB (default 32; 512 with --kernel)")
    parser.add_argument("--kernel", metavar="FILE",
                        help="boot a Linux kernel (ELF vmlinux, or a bzImage whose payload is "
                             "unpacked) by its PVH entry instead of a guest program")
    parser.add_argument("--initrd", metavar="FILE", help="with --kernel: the initrd")
    parser.add_argument("--append", default="console=ttyS0 earlyprintk=serial,ttyS0,115200",
                        metavar="S", help="with --kernel: the command line (the VMM adds what "
                                          "this host needs and prints it)")
    parser.add_argument("--stall", type=float, default=None, metavar="S",
                        help="stop when the console is silent for S seconds (exit status 6; "
                             "default 120 with --kernel, off otherwise)")
    parser.add_argument("--system-map", metavar="FILE",
                        help="with --kernel: System.map, to name the function of a failing RIP")
    parser.add_argument("--timeout", type=float, default=0.0, metavar="S",
                        help="stop the VM after S seconds (exit status 124)")
    parser.add_argument("--exits", action="store_true",
                        help="print a table of exits by kind, port/address and register")
    parser.add_argument("--json", action="store_true",
                        help="print the result (guest report, exits, counters) as JSON")
    from virtwire.commands.trace_options import add_trace_arguments

    add_trace_arguments(parser)


def _parse_ip(text: str) -> tuple[str, int]:
    addr, _, prefix = text.partition("/")
    parts = addr.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise CliError(f"--ip {text}: expected an IPv4 address like 10.0.2.15/24")
    if prefix and (not prefix.isdigit() or not 0 < int(prefix) <= 32):
        raise CliError(f"--ip {text}: the prefix length must be 1..32")
    return addr, int(prefix or 24)


def _backends(spec: str, netns: str | None) -> list[Any]:
    kind, _, rest = spec.partition(",")
    opts: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise CliError(f"--net {spec}: expected key=value, not {item!r}")
        opts[k] = v
    if kind == "null" and not opts:
        from virtwire.backends.null import NullBackend

        return [NullBackend("null:kvm0")]
    if kind == "tap" and set(opts) <= {"ifname"} and opts.get("ifname"):
        from virtwire.backends.tap import TapBackend

        try:
            return [TapBackend(opts["ifname"], netns=netns)]
        except Exception as e:  # TapError, OSError: one line
            raise UserFacingError(f"kvm: cannot open TAP {opts['ifname']}: {e}") from None
    if kind == "switch" and set(opts) <= {"uplink"}:
        from virtwire.backends.switch import L2Switch

        sw = L2Switch("kvm")
        if opts.get("uplink"):
            sw.add_uplink(opts["uplink"])
        return [sw.port("kvm0")]
    raise CliError(f"--net {spec}: expected tap,ifname=NAME | switch[,uplink=TAP] | null")


def _check(args: argparse.Namespace) -> None:
    if args.nic == "rtl8139" and args.transitional:
        raise CliError("--transitional goes with --nic virtio")
    if args.timeout < 0:
        raise CliError("--timeout must be >= 0")
    if not 1 <= args.count <= 100_000_000:
        raise CliError("--count must be 1..100000000")
    if not 60 <= args.size <= 1514:
        raise CliError("--size must be 60..1514")
    if args.stall is None:
        args.stall = 120.0 if args.kernel else 0.0
    if args.stall < 0:
        raise CliError("--stall must be >= 0")
    if args.memory is None:
        args.memory = 512 if args.kernel else 32
    if not 4 <= args.memory <= 3072:
        raise CliError("--memory must be 4..3072 MiB")


def run(args: argparse.Namespace) -> int:
    _check(args)
    ip, prefix = _parse_ip(args.ip)
    from virtwire import trace
    from virtwire.kvm import machine as m
    from virtwire.kvm import program
    from virtwire.kvm.vm import install_kick_signal, open_kvm

    kvm_path = os.environ.get("VIRTWIRE_KVM_DEVICE", "/dev/kvm")
    os.close(open_kvm(kvm_path))  # no /dev/kvm or no permission: one line before anything
    if args.kernel and not os.path.isfile(args.kernel):
        raise CliError(f"--kernel {args.kernel}: no such file")
    if (args.initrd or args.system_map) and not args.kernel:
        raise CliError("--initrd and --system-map go with --kernel")
    if not args.kernel and args.guest not in program.MODES and not os.path.isfile(args.guest):
        raise CliError(f"--guest {args.guest}: not a guest program "
                       f"({', '.join(program.MODES)}) nor a file")
    mac = None
    if args.mac:
        from virtwire.net.options import mac_bytes

        try:
            mac = mac_bytes(args.mac)
        except ValueError as e:
            raise CliError(f"--mac {args.mac}: {e}") from None
    install_kick_signal()
    from virtwire.commands.trace_options import configure_from_args

    configure_from_args(args, export=False)
    out = sys.stderr if args.json else sys.stdout

    def console(b: bytes) -> None:
        out.buffer.write(b)
        if b == b"\n":
            out.buffer.flush()

    cfg = m.MachineConfig(guest=args.guest, ram_mb=args.memory, ip=ip, prefix=prefix,
                          burst_count=args.count, burst_size=args.size,
                          transitional=args.transitional, nic=args.nic, timeout=args.timeout,
                          count_exits=args.exits, console=console, kvm_path=kvm_path,
                          kernel=args.kernel, initrd=args.initrd, append=args.append,
                          system_map=args.system_map, stall=args.stall)
    if args.kernel:
        from virtwire.kvm.linux import LinuxBoot

        sys.stderr.write(f"virtwire kvm: kernel command line += {LinuxBoot.extra_args()}\n")
    backends = _backends(args.net, args.netns)
    try:
        machine = m.Machine(cfg, backends, mac=mac)
    except BaseException:
        for b in backends:
            b.close()
        raise
    old = {s: signal.signal(s, lambda *_: machine.request_stop(
        "stopped by a signal", "signal", 0)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        res = machine.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        machine.close()
        trace.stop()
    out.flush()
    _print_result(res, args)
    return res.reason.status


def _print_result(res: Any, args: argparse.Namespace) -> None:
    per_exit = res.run_seconds / res.exits * 1e6 if res.exits else 0.0
    if args.exits:
        w = sys.stderr if args.json else sys.stdout
        w.write(f"{'kind':<5} {'port/addr':>12}  {'register':<34} {'exits':>9}\n")
        for r in res.exit_table:
            w.write(f"{r['kind']:<5} {r['addr']:>#12x}  {r['reg']:<34} {r['count']:>9}\n")
        w.write(f"total {res.exits} exits in {res.run_seconds:.3f} s "
                f"({per_exit:.1f} us of vCPU thread per exit)\n")
    if args.json:
        doc = {"stop": {"kind": res.reason.kind, "message": res.reason.message,
                        "status": res.reason.status, **res.reason.detail},
               "guest_status": res.guest_status, "report": res.report, "exits": res.exits,
               "run_seconds": round(res.run_seconds, 6), "us_per_exit": round(per_exit, 2),
               "unclaimed_accesses": res.unclaimed, "warnings": res.warnings,
               "exit_table": res.exit_table, "stats": res.stats}
        json.dump(doc, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    line = f"virtwire kvm: {res.reason.message}"
    if res.warnings:
        line += "; " + "; ".join(res.warnings)
    sys.stderr.write(line + "\n")
