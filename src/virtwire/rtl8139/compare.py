"""``virtwire compare``: the same guest and workloads on emulated and paravirtual NICs, in turn.

Theory of operation
-------------------
Each row boots the default Debian guest under QEMU (TCG unless ``accel`` says otherwise) with one
NIC on a TAP in a private network namespace made for that row (host end 10.81.0.1/24, guest
10.81.0.2/24), runs the workloads, and tears everything down before the next row:

- **RTT**: ``ping -c 100 -i 0.05`` from the guest; the average round trip.
- **Throughput**: ``iperf3`` for ``seconds`` each way (the server in the namespace); the
  receiver's rate, guest to host ("TX") and host to guest ("RX").
- **UDP burst**: a fixed count of 1000-byte datagrams guest to host (``iperf3 -u -b 0 -k N``):
  datagrams per second received and the loss.
- **Traps and interrupts per packet**: a second, short iperf3 run each way with the counters
  read before and after. Traps are register (BAR) accesses by the guest's driver: virtwire's
  devices count their own (the RTL8139 model counts every access by register name; the virtio PCI
  device's proxy counts BAR reads and writes); for QEMU's devices (and the vhost-user row, whose
  registers QEMU emulates) the ``memory_region_ops_read/write`` trace events are switched on over
  QMP for that run only and counted by memory region name. Packets are the TAP's counters: the
  guest's sent packets for the TX run, its received packets for the RX run. Interrupts are the
  NIC's lines in the guest's ``/proc/interrupts``. A TSO/GSO super-frame crosses the TAP as one
  packet (QEMU's virtio-net, our C+ and vhost-user rows pass them through), so packets are wire
  frames: the TAP's packet count or its bytes / 1514, whichever is larger.
- **Host CPU per GB**: user+system CPU of QEMU, this process (it hosts the PCI proxy sidecars)
  and any ``virtwire serve`` sidecar, over the two throughput runs, per 10^9 bytes through the TAP.

Rows (``ROWS``) name the NIC: QEMU's own rtl8139 (which reports revision 0x20, so the guest
drives it with ``8139cp``), e1000 and virtio-net-pci; virtwire's RTL8139 over the PCI proxy
(classic 0x10 / ``8139too``, and C+ 0x20 / ``8139cp``), virtwire's virtio-net over the PCI proxy
and over vhost-user. A failing row records its error and the run goes on.
"""

from __future__ import annotations

import os
import re
import resource
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtwire.errors import CliError, UserFacingError
from virtwire.guest.nics import NicContext, NicPlan, NicSpec, check_ifname, register_nic_kind

__all__ = ["ROWS", "RowSpec", "run_compare", "parse_only", "parse_iperf", "parse_ping",
           "parse_interrupts", "count_trace"]

HOST_IP, GUEST_IP, PREFIX = "10.81.0.1", "10.81.0.2", 24
IPERF_PORT = 5299
UDP_DATAGRAMS = 1000
COUNT_SECONDS = 2
WIRE_FRAME = 1514
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class RowSpec:
    """One row: a label, the ``--net`` spec (``{tap}`` is replaced), where traps come from
    (``rtl``, ``proxy``, ``qemu``, or ``vhost``: QEMU trace plus the back end's kicks) and, for the
    traced ones, the memory regions that are the NIC's."""

    label: str
    net: str
    traps: str
    regions: str = ""


ROWS: dict[str, RowSpec] = {
    "qemu-rtl8139": RowSpec("QEMU rtl8139 (8139cp)", "qemu-model,model=rtl8139,ifname={tap}",
                            "qemu", r"^rtl8139$"),
    "qemu-e1000": RowSpec("QEMU e1000", "qemu-model,model=e1000,ifname={tap}", "qemu",
                          r"^e1000-(mmio|io)$"),
    "qemu-virtio": RowSpec("QEMU virtio-net (ioeventfd=off)",
                           "qemu-model,model=virtio-net-pci,ifname={tap}", "qemu",
                           r"^virtio-pci-"),
    "virtwire-rtl8139": RowSpec("virtwire rtl8139 (8139too, proxy)",
                                "rtl8139,backend=tap,ifname={tap},revision=0x10", "rtl"),
    "virtwire-rtl8139cp": RowSpec("virtwire rtl8139 C+ (8139cp, proxy)",
                                  "rtl8139,backend=tap,ifname={tap},revision=0x20", "rtl"),
    "virtwire-virtio-pci": RowSpec("virtwire virtio-net (PCI proxy)",
                                   "pci,backend=tap,ifname={tap}", "proxy"),
    "virtwire-vhost-user": RowSpec("virtwire virtio-net (vhost-user)",
                                   "vhost-user,serve=tap:{tap}", "vhost", r"^virtio-pci-"),
}

_QEMU_MODELS = ("rtl8139", "e1000", "e1000e", "virtio-net-pci")


def _build_qemu_model(spec: NicSpec, ctx: NicContext) -> NicPlan:
    model = spec.options.get("model", "rtl8139")
    ifname = check_ifname(spec.options.get("ifname", f"vwtap{ctx.index}"))
    # virtio kicks handled by an ioeventfd never reach the memory region's ops (nor its trace
    # events): with ioeventfd=off every notify is a counted register write.
    extra = ",ioeventfd=off" if model == "virtio-net-pci" else ""
    return NicPlan(qemu_args=[
        "-netdev", f"tap,id={ctx.id},ifname={ifname},script=no,downscript=no",
        "-device", f"{model},netdev={ctx.id},mac={ctx.mac}{extra}"])


def _check_qemu_model(spec: NicSpec) -> None:
    if spec.options.get("model", "rtl8139") not in _QEMU_MODELS:
        raise CliError(f"--net qemu-model,model={spec.options['model']}: expected one of "
                       + ", ".join(_QEMU_MODELS))
    if "ifname" in spec.options:
        check_ifname(spec.options["ifname"])


register_nic_kind("qemu-model", _build_qemu_model, keys={"model", "ifname"},
                  check=_check_qemu_model,
                  help="one of QEMU's own NIC models on a TAP (model=rtl8139|e1000|e1000e|"
                       "virtio-net-pci, ifname=)")


def parse_only(text: str | None) -> list[str]:
    """``--only a,b`` -> row names in the order given (CliError for an unknown one)."""
    if not text:
        return list(ROWS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ROWS]
    if bad or not names:
        raise CliError(f"--only: unknown row {bad[0] if bad else text!r} "
                       f"(known: {', '.join(ROWS)})")
    return list(dict.fromkeys(names))


# -- parsing what the guest prints ------------------------------------------------------------
_IPERF_RX = re.compile(r"([\d.]+)-([\d.]+)\s+sec\s+[\d.]+\s+\w?Bytes\s+([\d.]+)\s+Mbits/sec"
                       r"(?:\s+[\d.]+\s+ms\s+(\d+)/(\d+))?.*receiver")


def parse_iperf(output: str) -> dict[str, float] | None:
    """The receiver line of an ``iperf3 -f m`` client: seconds, Mbit/s, and for UDP lost/total."""
    found = _IPERF_RX.findall(output)
    if not found:
        return None
    t0, t1, mbps, lost, total = found[-1]
    out = {"seconds": float(t1) - float(t0), "mbps": float(mbps)}
    if total:
        out.update(lost=float(lost), total=float(total))
    return out


def parse_ping(output: str) -> tuple[int, float | None]:
    m = re.search(r"(\d+) packets received", output)
    rtt = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", output)
    return (int(m.group(1)) if m else 0), (float(rtt.group(1)) if rtt else None)


def parse_interrupts(text: str) -> int:
    """Sum of the NIC's lines (eth0, virtio) in a guest's ``/proc/interrupts``."""
    total = 0
    for line in text.splitlines():
        if "eth0" not in line and "virtio" not in line:
            continue
        parts = line.split()
        total += sum(int(p) for p in parts[1:] if p.isdigit())
    return total


_TRACE_RE = re.compile(r"memory_region_ops_(?:read|write) .*name '([^']*)'")


def count_trace(path: Path, offset: int, regions: str) -> tuple[int, int, dict[str, int]]:
    """Count trace lines after ``offset`` whose region name matches ``regions``; returns
    (count, new offset, count per region name seen)."""
    want = re.compile(regions)
    names: dict[str, int] = {}
    n = 0
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return 0, offset, {}
    for m in _TRACE_RE.finditer(data.decode("utf-8", "replace")):
        name = m.group(1)
        names[name] = names.get(name, 0) + 1
        if want.search(name):
            n += 1
    return n, offset + len(data), names


# -- host-side helpers -------------------------------------------------------------------------
def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise UserFacingError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _tap_stats(ns: str, tap: str) -> dict[str, int]:
    out = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c",
                          f"cd /sys/class/net/{tap}/statistics && cat rx_packets tx_packets "
                          "rx_bytes tx_bytes"], capture_output=True, text=True).stdout.split()
    vals = [int(x) for x in out] if len(out) == 4 else [0, 0, 0, 0]
    return dict(zip(("rx_packets", "tx_packets", "rx_bytes", "tx_bytes"), vals))


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def host_cpu_seconds() -> float:
    """CPU of this process and its descendants except iperf3 (QEMU, serve sidecars)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    total = ru.ru_utime + ru.ru_stime
    for pid in _descendants(os.getpid()):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm != "iperf3":
            total += _proc_cpu(pid)
    return total


# -- one row ----------------------------------------------------------------------------------
@dataclass
class _Ctx:
    name: str
    spec: RowSpec
    ns: str
    tap: str
    vm: Any
    trace: Path
    trace_off: int = 0
    kicks: int = 0


def _kicks(stats: Any) -> int:
    """Sum of ``kicks`` over every ring in a ``virtwire serve`` stats document."""
    if isinstance(stats, dict):
        return sum(int(r.get("kicks", 0)) for r in stats.get("rings", []) if isinstance(r, dict)) \
            + sum(_kicks(v) for k, v in stats.items() if k != "rings")
    if isinstance(stats, list):
        return sum(_kicks(v) for v in stats)
    return 0


def _traps(c: _Ctx) -> tuple[int, dict[str, int]]:
    """Register accesses so far (QEMU-traced rows: since the last call). The vhost-user row adds
    the kicks its back end counted (they reach it through an ioeventfd, not QEMU's ops)."""
    if c.spec.traps in ("qemu", "vhost"):
        n, c.trace_off, names = count_trace(c.trace, c.trace_off, c.spec.regions)
        if c.spec.traps == "vhost":
            from virtwire.serve import query_stats

            kicks = _kicks(query_stats(str(c.vm.tmpdir / "net0.vhost.sock.ctl")))
            names = {**names, "vhost-user kicks (cumulative)": kicks}
            c.kicks, n = kicks, n + kicks - c.kicks
        return n, names
    st = c.vm.pci_proxy.stats()
    if c.spec.traps == "rtl":
        d = st["device"]["counters"]
        return d["reads"] + d["writes"], {}
    m = st["proxy"]["messages"]
    return m.get("BAR_READ", 0) + m.get("BAR_WRITE", 0), {}


def _guest_irqs(vm: Any) -> int:
    return parse_interrupts(vm.run("cat /proc/interrupts", timeout=30).output)


def _iperf(vm: Any, seconds: int, extra: str = "", limit: str = "") -> dict[str, float] | None:
    """One iperf3 client run; ``limit`` replaces ``-t seconds`` (iperf3 takes one of -t/-n/-k)."""
    out = vm.run(f"iperf3 -c {HOST_IP} -p {IPERF_PORT} -f m {extra} {limit or f'-t {seconds}'} "
                 "2>&1 | tail -4", timeout=seconds + 120).output
    return parse_iperf(out)


def _set_trace(c: _Ctx, on: bool) -> None:
    if c.spec.traps in ("qemu", "vhost"):
        for ev in ("memory_region_ops_read", "memory_region_ops_write"):
            c.vm.qmp("trace-event-set-state", {"name": ev, "enable": on})


def _count_run(c: _Ctx, direction: str) -> dict[str, Any]:
    """A short iperf3 run with counters around it: traps and interrupts per packet."""
    before_tap = _tap_stats(c.ns, c.tap)
    before_irq = _guest_irqs(c.vm)
    _set_trace(c, True)
    before_traps, _ = _traps(c)
    _iperf(c.vm, COUNT_SECONDS, "-R" if direction == "rx" else "")
    after_traps, names = _traps(c)
    _set_trace(c, False)
    after_irq = _guest_irqs(c.vm)
    after_tap = _tap_stats(c.ns, c.tap)
    d = "rx" if direction == "tx" else "tx"  # the TAP sees the other side
    frames = after_tap[f"{d}_packets"] - before_tap[f"{d}_packets"]
    nbytes = after_tap[f"{d}_bytes"] - before_tap[f"{d}_bytes"]
    # A GSO super-frame crosses the TAP as one packet: count wire frames of at most 1514 bytes.
    pkts = max(frames, -(-nbytes // WIRE_FRAME))
    traps = after_traps if c.spec.traps in ("qemu", "vhost") else after_traps - before_traps
    return {"packets": pkts, "tap_packets": frames, "bytes": nbytes, "traps": traps,
            "irqs": after_irq - before_irq, "regions": names}


def _measure(c: _Ctx, seconds: int, progress: Callable[[str], None]) -> dict[str, Any]:
    vm = c.vm
    res: dict[str, Any] = {}
    res["driver"] = vm.run("basename $(readlink /sys/class/net/eth0/device/driver)",
                           timeout=30).output.strip()
    progress("waiting for the link, then ping")
    # e1000's link comes up seconds after the guest is ready: wait for carrier, warm ARP up
    vm.run("for i in $(seq 1 300); do [ \"$(cat /sys/class/net/eth0/carrier 2>/dev/null)\" = 1 ]"
           f" && break; sleep 0.1; done; ping -c 3 -W 2 {HOST_IP} >/dev/null", timeout=120)
    received, rtt = parse_ping(vm.run(f"ping -c 100 -i 0.05 -W 2 {HOST_IP}", timeout=300).output)
    res.update(ping_received=received, rtt_ms=rtt)
    cpu0, tap0 = host_cpu_seconds(), _tap_stats(c.ns, c.tap)
    progress(f"iperf3 TCP guest to host, {seconds} s")
    tx = _iperf(vm, seconds)
    progress(f"iperf3 TCP host to guest, {seconds} s")
    rx = _iperf(vm, seconds, "-R")
    cpu1, tap1 = host_cpu_seconds(), _tap_stats(c.ns, c.tap)
    res["tx_mbps"] = tx["mbps"] if tx else None
    res["rx_mbps"] = rx["mbps"] if rx else None
    moved = sum(tap1[k] - tap0[k] for k in ("rx_bytes", "tx_bytes"))
    res["cpu_s_per_gb"] = (cpu1 - cpu0) / (moved / 1e9) if moved > 0 else None
    progress(f"UDP burst of {UDP_DATAGRAMS} datagrams")
    udp = _iperf(vm, 60, "-u -b 0 -l 1000", f"-k {UDP_DATAGRAMS}")
    if udp and udp.get("total"):
        got = udp["total"] - udp["lost"]
        res["udp_pps"] = got / udp["seconds"] if udp["seconds"] > 0 else None
        res["udp_loss_pct"] = 100.0 * udp["lost"] / udp["total"]
    for d in ("tx", "rx"):
        progress(f"counting traps, {d.upper()}")
        cnt = _count_run(c, d)
        res[f"count_{d}"] = cnt
        p = cnt["packets"]
        res[f"traps_per_pkt_{d}"] = cnt["traps"] / p if p else None
        res[f"irqs_per_pkt_{d}"] = cnt["irqs"] / p if p else None
    if c.spec.traps in ("rtl", "proxy"):
        st = vm.pci_proxy.stats()
        res["device_accesses"] = st["device"].get("accesses", {})
    return res


def _run_row(name: str, spec: RowSpec, image: Any, seconds: int, accel: str,
             progress: Callable[[str], None]) -> dict[str, Any]:
    from virtwire.guest.qemu import GuestVM

    tag = secrets.token_hex(3)
    ns, tap = f"vwcmp-{os.getpid()}-{tag}", f"vwc{tag}"
    _ip("netns", "add", ns)
    server = None
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "tuntap", "add", "mode", "tap", "name", tap)
        _ip("-n", ns, "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", tap)
        _ip("-n", ns, "link", "set", tap, "up")
        server = subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-B", HOST_IP,
                                   "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        trace = Path(f"/tmp/vwcmp-{os.getpid()}-{tag}.trace")
        extra = ["-D", str(trace)]
        if spec.traps in ("qemu", "vhost"):
            extra += ["-trace", "memory_region_ops_read", "-trace", "memory_region_ops_write"]
        vm = GuestVM([spec.net.format(tap=tap)], ip=f"{GUEST_IP}/{PREFIX}", netns=ns,
                     image=image, memory="256M", accel=accel, name=f"vwcmp{tag}",
                     extra_args=extra)
        with vm:
            progress("booting")
            vm.wait_ready(180)
            c = _Ctx(name, spec, ns, tap, vm, trace)
            _set_trace(c, False)
            _traps(c)  # skip the boot's accesses
            res = _measure(c, seconds, progress)
        try:
            trace.unlink()
        except OSError:
            pass
        return res
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run_compare(rows: Sequence[str], *, seconds: int = 5, accel: str = "tcg",
                progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run each row in turn (module docstring); returns one result dict per row."""
    from virtwire.guest.image import build_image, load_image

    say = progress or (lambda msg: print(f"compare: {msg}", file=sys.stderr, flush=True))
    build_image(progress=lambda m: None)
    image = load_image()
    results: list[dict[str, Any]] = []
    for i, name in enumerate(rows, 1):
        spec = ROWS[name]

        def step(msg: str, i: int = i, name: str = name) -> None:
            say(f"[{i}/{len(rows)}] {name}: {msg}")

        t0 = time.monotonic()
        base = {"row": name, "label": spec.label, "trap_source": spec.traps}
        try:
            res = {**base, **_run_row(name, spec, image, seconds, accel, step), "error": None}
        except Exception as e:  # a row's failure must not lose the other rows
            res = {**base, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
        res["wall_seconds"] = round(time.monotonic() - t0, 1)
        step("done" if not res.get("error") else f"failed: {res['error']}")
        results.append(res)
    return results
