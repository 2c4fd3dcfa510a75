"""virtwire kvm on this host's /dev/kvm: our guest program drives our virtio-net PCI device through
real vCPU exits; the host pings it from a netns over a TAP; bursts arrive complete and in order; a
user's flat binary enumerates PCI; hostile guests end with one line and a non-zero status."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from virtwire.guest.nic_pci import run_in_netns
from virtwire.netns import netns_with_tap

pytestmark = [pytest.mark.system,
              pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")]

GUESTS = Path(__file__).with_name("kvm_guests")
ETH_P_BURST = 0x88B5

PINGER = r'''
import os, socket, struct, sys, time
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack(f"!{len(b)//2}H", b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
dst, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(2.0)
ident = os.getpid() & 0xffff; ok = 0
for seq in range(1, count + 1):
    payload = struct.pack("!d", time.time()) + bytes(range(48))
    h = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    h = struct.pack("!BBHHH", 8, 0, csum(h + payload), ident, seq)
    s.sendto(h + payload, (dst, 0)); deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try: data, _ = s.recvfrom(2048)
        except socket.timeout: break
        ihl = (data[0] & 15) * 4; t, c, ck, i, q = struct.unpack("!BBHHH", data[ihl:ihl+8])
        if t == 0 and i == ident and q == seq and data[ihl+8:] == payload and csum(data[ihl:]) == 0:
            ok += 1; break
    time.sleep(0.05)
print(f"{ok}/{count}")
'''


def _kvm(*args: str) -> list[str]:
    return [sys.executable, "-m", "virtwire", "kvm", *args]


def _wait_for(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """Read proc's stderr until ``text`` appears (the console is on stderr with --json)."""
    seen = b""
    deadline = time.monotonic() + timeout
    fd = proc.stderr.fileno()
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            so_far = seen.decode(errors="replace")
            raise AssertionError(f"{text!r} not seen; console so far:\n{so_far}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            seen += os.read(fd, 65536)
    return seen.decode(errors="replace")


def _finish(proc: subprocess.Popen, before: str = "") -> tuple[dict, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    return json.loads(out), before + err.decode(errors="replace")


@pytest.mark.parametrize("transitional,device_id", [(False, "1af4:1041"), (True, "1af4:1000")])
def test_host_pings_guest_20_of_20(transitional: bool, device_id: str, tmp_path) -> None:
    with netns_with_tap("vwkvm", addr="10.93.7.1/24") as (ns, tap):
        trace = tmp_path / "kvm.trace"
        proc = subprocess.Popen(
            _kvm("--guest", "ping", "--net", f"tap,ifname={tap}", "--netns", ns.name,
                 "--ip", "10.93.7.2/24", "--json", "--timeout", "120", "--trace", str(trace),
                 *(["--transitional"] if transitional else [])),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            console = _wait_for(proc, "vwguest: ready", 30)
            r = ns.run([sys.executable, "-c", PINGER, "10.93.7.2", "20"], timeout=120)
        finally:
            doc, err = _finish(proc, console)
    assert r.stdout.strip() == "20/20", (r.stdout, r.stderr, err)
    assert proc.returncode == 0, err
    rep = doc["report"]
    assert rep["device"]["id"] == device_id
    assert rep["device"]["class"] == "020000"
    feats = rep["features"]
    assert int(feats["device"], 16) & (1 << 5)  # MAC offered
    if transitional:
        assert int(feats["driver"], 16) == 1 << 5
        assert "bar0" in rep and rep["bar0"]["io"].startswith("0x")
    else:
        assert int(rep["negotiated"]["features"], 16) == (1 << 32) | (1 << 5)
        assert rep["negotiated"]["features_ok"] == "1"
    assert int(rep["report"]["icmp"]) == 20
    assert int(rep["report"]["rx"]) >= 21 and int(rep["report"]["tx"]) >= 21
    assert int(rep["report"]["irqs"]) > 0  # interrupts, not polling
    assert err.strip().splitlines()[-1].startswith("virtwire kvm: stopped by a signal")
    if not transitional:
        _check_explain(trace)


def _check_explain(trace: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "virtwire", "explain", str(trace)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    sections = re.split(r"\n  (?=\d+\. )", text)

    def section(title: str) -> str:
        hits = [s for s in sections if s.split(". ", 1)[-1].startswith(title)]
        assert hits, f"no {title} section in:\n{text}"
        return hits[0]
    assert "pci.config_address" in section("Discovery") and "KVM_EXIT_IO" in section("Discovery")
    assert "carried by" in section("BAR")
    assert "common_cfg.driver_feature" in section("Feature")
    assert "common_cfg.queue_desc_lo" in section("Queue")
    assert "notify.q1" in section("First transmit") and "KVM_EXIT_MMIO" in section("First transmit")
    assert "isr" in section("First receive") and "KVM_IRQ_LINE" in section("First receive")


def _burst_socket(ns: str, tap: str) -> socket.socket:
    def open_sock() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_BURST))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        s.bind((tap, ETH_P_BURST))
        return s
    return run_in_netns(ns, open_sock)


def test_burst_10000_frames_arrive_complete_and_in_order() -> None:
    n = 10_000
    with netns_with_tap("vwkvb") as (ns, tap):
        sock = _burst_socket(ns.name, tap)
        try:
            r = subprocess.run(_kvm("--guest", "burst", "--count", str(n), "--size", "128",
                                    "--net", f"tap,ifname={tap}", "--netns", ns.name,
                                    "--json", "--exits", "--timeout", "120"),
                               capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stderr[-2000:]
            seqs = []
            sock.settimeout(1.0)
            while len(seqs) < n:
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    break
                if len(data) == 128 and data[12:14] == b"\x88\xb5":
                    seqs.append(struct.unpack_from("<I", data, 14)[0])
        finally:
            sock.close()
    assert seqs == list(range(n))
    doc = json.loads(r.stdout)
    assert doc["report"]["report"]["tx"] == str(n)
    assert doc["stats"]["backends"][0]["tx_frames"] == n
    notify = sum(row["count"] for row in doc["exit_table"] if row["reg"] == "notify.q1")
    assert 0 < notify < n  # kicks batch frames


def _build_enum(tmp_path: Path) -> Path:
    obj, out = tmp_path / "enum.o", tmp_path / "enum.bin"
    subprocess.run(["as", "--32", "-o", str(obj), str(GUESTS / "enum.S")], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0xf000", "--oformat", "binary",
                    "-o", str(out), str(obj)], check=True)
    return out


@pytest.mark.parametrize("transitional", [False, True])
def test_user_flat_binary_enumerates_pci(tmp_path, transitional: bool) -> None:
    binary = _build_enum(tmp_path)
    r = subprocess.run(_kvm("--guest", str(binary), "--timeout", "30",
                            *(["--transitional"] if transitional else [])),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {line.split("=")[0]: line.split("=")[1].split() for line in r.stdout.splitlines()
            if line.startswith("pci ")}
    assert rows["pci 00"][0] == "29c08086"  # the host bridge
    ident, cls, bar0, bar4, size4 = rows["pci 03"]
    assert ident == ("10001af4" if transitional else "10411af4")
    assert cls[:6] == "020000"
    assert size4 == "ffffc000"  # BAR4: 16 KiB, 32-bit memory
    assert (bar0 == "00000001") == transitional  # the legacy I/O BAR, unassigned
    assert "virtwire kvm: guest exited with status 0x00" in r.stderr


@pytest.mark.parametrize("guest,status,needle", [
    ("garbage", 0x23, "guest accesses hit nothing"),
    ("badbar", 0x21, "over guest RAM"),
    ("badring", 0x22, "NEEDS_RESET"),
    ("badinsn", 4, "cannot emulate"),
])
def test_hostile_guests_end_with_one_line(guest: str, status: int, needle: str) -> None:
    t0 = time.monotonic()
    r = subprocess.run(_kvm("--guest", guest, "--timeout", "60"), capture_output=True,
                       timeout=120)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == status, err
    assert time.monotonic() - t0 < 60
    last = err.strip().splitlines()[-1]
    assert last.startswith("virtwire kvm: ") and needle in last, err
    assert "Traceback" not in err
    if guest == "badinsn":
        assert "RIP=0x" in last and "f3 0f b8 c0" in last  # popcnt's bytes


def test_timeout_and_missing_kvm() -> None:
    r = subprocess.run(_kvm("--guest", "ping", "--timeout", "1"), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 124
    assert r.stderr.strip().splitlines()[-1].startswith("virtwire kvm: timeout: stopped after 1 s")
    assert "vwguest: report" in r.stdout  # the guest answered the stop request
    env = {**os.environ, "VIRTWIRE_KVM_DEVICE": "/nonexistent/kvm"}
    r = subprocess.run(_kvm(), capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


def test_int3_is_completed_as_the_cpu_would() -> None:
    # this host's emulator refuses int3 at CPL0; the VMM delivers #BP as a trap instead
    r = subprocess.run(_kvm("--guest", "int3", "--timeout", "30"), capture_output=True,
                       text=True, timeout=60)
    m = re.search(r"exception vector=3 eip=(0x[0-9a-f]+) int3_next=(0x[0-9a-f]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert m.group(1) == m.group(2)  # the pushed EIP is the instruction after the int3
    assert r.returncode == 0x30
    assert "1 int3 completed as #BP by the VMM" in r.stderr


def _debian_kernel() -> str:
    r = subprocess.run([sys.executable, "-m", "virtwire", "image", "path", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    kernel = doc.get("kernel") or doc.get("vmlinuz")
    assert kernel and os.path.exists(kernel), doc
    return kernel


def test_linux_prints_banner_command_line_and_memory_map_within_60s() -> None:
    kernel = _debian_kernel()
    t0 = time.monotonic()
    proc = subprocess.Popen(_kvm("--kernel", kernel, "--memory", "512", "--timeout", "120"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: dict[str, float] = {}
    want = {"banner": re.compile(rb"Linux version \d"),
            "cmdline": re.compile(rb"Command line: console=ttyS0 .*clearcpuid=popcnt"),
            "e820": re.compile(rb"BIOS-e820: \[mem 0x0000000000100000-0x000000001fffffff\] "
                               rb"usable")}
    try:
        for line in proc.stdout:
            for k, rx in want.items():
                if k not in seen and rx.search(line):
                    seen[k] = time.monotonic() - t0
            if len(seen) == len(want) or time.monotonic() - t0 > 60:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert set(seen) == set(want), (seen, err[-2000:])
    assert max(seen.values()) < 60
    assert b"kernel command line += " in err  # the extra arguments are printed
    last = err.decode(errors="replace").strip().splitlines()[-1]
    assert last.startswith("virtwire kvm: stopped by a signal") and "RIP=0x" in last


def test_bzimage_payload_unpacks_to_a_pvh_kernel() -> None:
    from virtwire.kvm.linux import elf_segments, pvh_entry, unpack_bzimage

    elf = unpack_bzimage(Path(_debian_kernel()).read_bytes())
    loads, notes = elf_segments(elf)
    assert loads and all(paddr >= 0x100000 for paddr, *_ in loads)
    entry = pvh_entry(elf, notes)
    assert entry is not None and 0x100000 <= entry < 0x40000000


def test_spinning_guest_is_stopped_by_the_watchdog(tmp_path) -> None:
    # cli; jmp $ at the reset vector: emulated code that never exits to the VMM
    spin = tmp_path / "spin.bin"
    spin.write_bytes(b"\xfa\xeb\xfe" + b"\x90" * 13)
    t0 = time.monotonic()
    r = subprocess.run(_kvm("--guest", str(spin), "--timeout", "2"), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 124
    assert time.monotonic() - t0 < 20
    last = r.stderr.strip().splitlines()[-1]
    assert last == "virtwire kvm: timeout: stopped after 2 s at RIP=0xfff1, interrupts off"


def test_host_pings_rtl8139_guest_20_of_20() -> None:
    # the same ping guest on the classic RTL8139: its driver's register accesses are vCPU exits
    with netns_with_tap("vwkvr", addr="10.93.8.1/24") as (ns, tap):
        proc = subprocess.Popen(
            _kvm("--nic", "rtl8139", "--guest", "ping", "--net", f"tap,ifname={tap}",
                 "--netns", ns.name, "--ip", "10.93.8.2/24", "--json", "--exits",
                 "--timeout", "120"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            console = _wait_for(proc, "vwguest: ready", 30)
            r = ns.run([sys.executable, "-c", PINGER, "10.93.8.2", "20"], timeout=120)
        finally:
            doc, err = _finish(proc, console)
    assert r.stdout.strip() == "20/20", (r.stdout, r.stderr, err)
    assert proc.returncode == 0, err
    rep = doc["report"]
    assert rep["device"]["id"] == "10ec:8139" and rep["device"]["class"] == "020000"
    assert int(rep["report"]["icmp"]) == 20 and int(rep["report"]["irqs"]) > 0
    regs = {row["reg"]: row["count"] for row in doc["exit_table"]}
    assert regs["rtl8139.CAPR"] >= 21  # one per received frame, after init's
    assert regs["rtl8139.ISR"] > 0 and regs["rtl8139.CR"] > 21  # BUFE polled, ISR acked
    model = doc["stats"]["device"]["counters"]
    assert model["rx_frames"] >= 21 and model["tx_frames"] >= 21


def test_rtl8139_burst_arrives_complete_and_in_order() -> None:
    n = 3000
    with netns_with_tap("vwkrb") as (ns, tap):
        sock = _burst_socket(ns.name, tap)
        try:
            r = subprocess.run(_kvm("--nic", "rtl8139", "--guest", "burst", "--count", str(n),
                                    "--size", "128", "--net", f"tap,ifname={tap}",
                                    "--netns", ns.name, "--json", "--exits", "--timeout", "120"),
                               capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stderr[-2000:]
            seqs = []
            sock.settimeout(1.0)
            while len(seqs) < n:
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    break
                if len(data) == 128 and data[12:14] == b"\x88\xb5":
                    seqs.append(struct.unpack_from("<I", data, 14)[0])
        finally:
            sock.close()
    assert seqs == list(range(n))
    doc = json.loads(r.stdout)
    assert doc["report"]["report"]["tx"] == str(n)
    assert doc["stats"]["backends"][0]["tx_frames"] == n
    tsd = sum(row["count"] for row in doc["exit_table"] if row["reg"].startswith("rtl8139.TSD"))
    assert tsd >= n  # one TSD write per frame, at least: no batching on this NIC


def test_rtl8139_refuses_transitional() -> None:
    r = subprocess.run(_kvm("--nic", "rtl8139", "--transitional"), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--transitional" in r.stderr
