#!/usr/bin/env python3
"""64-byte frames/s from DPDK's virtio-user (testpmd txonly) into ``virtwire serve`` (null
backend) beside DPDK's own vhost PMD (testpmd rxonly) in the same run, as a ratio.

    python3 tools/bench_vhost_dpdk.py [--seconds 10] [--json]

Both runs use the same front end: ``dpdk-testpmd --no-huge -m 512 --vdev net_virtio_user0`` in
txonly mode with 64-byte frames, its forwarding lcore on CPU 1. The consumer is pinned to CPU 0:
``virtwire serve --port vhost-user,backend=null`` or a second testpmd with a vhost PMD port in
rxonly mode. The rate is the consumer's: ours from ``virtwire stats`` frame counts over the
measured interval, DPDK's the median of testpmd's per-second Rx-pps. Rounds alternate between the
two so that other load on the machine hurts both alike; the ratio is the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def _testpmd(argv: list[str], log: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(["dpdk-testpmd", *argv], stdin=subprocess.PIPE, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def _txonly(sock: str, prefix: str, log: str, packed: bool) -> subprocess.Popen[bytes]:
    vdev = f"net_virtio_user0,path={sock},queues=1,queue_size=1024"
    if packed:
        vdev += ",packed_vq=1"
    return _testpmd(["-l", "0,1", "--main-lcore", "0", "--no-huge", "-m", "512", "--no-pci",
                     "--file-prefix", prefix, "--vdev", vdev, "--",
                     "--total-num-mbufs", "16384", "--forward-mode=txonly", "--txpkts=64",
                     "--nb-cores=1", "--txd=1024", "--rxd=1024", "--burst=32"], log)


def _last(pattern: str, text: str) -> int:
    m = re.findall(pattern, text)
    return int(m[-1]) if m else 0


def _wait_file(path: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench: {path} never appeared")
        time.sleep(0.05)


def _stats(sock: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "virtwire", "stats", sock, "--compact"],
                         capture_output=True, text=True, check=True, timeout=20).stdout
    return json.loads(out)


def _frames(sock: str) -> int:
    rings = _stats(sock)["ports"][0]["vhost_user"]["rings"]
    return sum(r.get("frames", 0) for r in rings if r["role"].startswith("tx"))


def run_ours(tmp: str, seconds: float, packed: bool) -> dict:
    sock = os.path.join(tmp, "vw.sock")
    r, w = os.pipe()
    env = dict(os.environ, VIRTWIRE_SERVE_READY_FD=str(w))
    srv = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "virtwire", "serve",
                            "-q", "--port",
                            f"vhost-user,path={sock},backend=null,queue_size=1024,"
                            f"packed={'on' if packed else 'off'}"],
                           pass_fds=(w,), env=env, stdout=subprocess.DEVNULL,
                           stderr=open(os.path.join(tmp, "serve.log"), "wb"))
    os.close(w)
    os.read(r, 1)
    os.close(r)
    log = os.path.join(tmp, "tx-ours.log")
    tx = _txonly(sock, f"vwvb-tx-{os.getpid()}", log, packed)
    try:
        deadline = time.monotonic() + 20
        while _frames(sock) == 0:
            if time.monotonic() > deadline or tx.poll() is not None:
                raise SystemExit("bench: no frames reached virtwire serve")
            time.sleep(0.2)
        time.sleep(1.0)
        f0, t0 = _frames(sock), time.monotonic()
        time.sleep(seconds)
        f1, t1 = _frames(sock), time.monotonic()
        st = _stats(sock)
    finally:
        _stop(tx)
        srv.terminate()
        srv.wait(10)
    text = open(log, errors="replace").read()
    return {"pps": (f1 - f0) / (t1 - t0), "frames": f1 - f0, "seconds": t1 - t0,
            "testpmd_tx_packets": _last(r"TX-packets:\s*(\d+)", text),
            "testpmd_tx_dropped": _last(r"TX-dropped:\s*(\d+)", text),
            "features": st["ports"][0]["vhost_user"]["features"]}


def run_dpdk(tmp: str, seconds: float, packed: bool) -> dict:
    sock = os.path.join(tmp, "vhost.sock")
    rx_log = os.path.join(tmp, "rx-dpdk.log")
    rx = _testpmd(["-l", "1,0", "--main-lcore", "1", "--no-huge", "-m", "512", "--no-pci",
                   "--file-prefix", f"vwvb-rx-{os.getpid()}", "--vdev",
                   f"net_vhost0,iface={sock},client=0,queues=1", "--",
                   "--total-num-mbufs", "16384", "--forward-mode=rxonly", "--nb-cores=1",
                   "--burst=32", "--stats-period", "1"], rx_log)
    tx = None
    try:
        _wait_file(sock, rx)
        tx_log = os.path.join(tmp, "tx-dpdk.log")
        tx = _txonly(sock, f"vwvb-tx2-{os.getpid()}", tx_log, packed)
        time.sleep(3.0 + seconds)  # start-up, then the measured interval
    finally:
        if tx is not None:
            _stop(tx)
        _stop(rx)
    rx_text = open(rx_log, errors="replace").read()
    tx_text = open(os.path.join(tmp, "tx-dpdk.log"), errors="replace").read()
    # testpmd prints totals at exit: divide by the time the txonly side ran (from its stats).
    rx_packets = _last(r"RX-packets:\s*(\d+)", rx_text)
    # testpmd's per-second Rx-pps lines; skip the ramp-up ones, take the median of the rest.
    rates = sorted(int(x) for x in re.findall(r"Rx-pps:\s*(\d+)", rx_text)[2:] if int(x))
    pps = rates[len(rates) // 2] if rates else 0
    return {"pps": pps, "rx_pps_samples": len(rates), "rx_packets": rx_packets,
            "tx_packets": _last(r"TX-packets:\s*(\d+)", tx_text)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--packed", action="store_true", help="packed rings (packed_vq=1)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for tool in ("dpdk-testpmd", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} not found")
    tmp = tempfile.mkdtemp(prefix="vwv-bench-")
    rounds = []
    try:
        for _ in range(args.rounds):  # alternate, so a busy machine hurts both sides alike
            ours = run_ours(tmp, args.seconds, args.packed)
            dpdk = run_dpdk(tmp, args.seconds, args.packed)
            rounds.append({"virtwire_pps": round(ours["pps"]), "dpdk_pps": dpdk["pps"],
                           "ratio": round(ours["pps"] / dpdk["pps"], 4) if dpdk["pps"] else None,
                           "virtwire": ours, "dpdk": dpdk})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in os.listdir("/var/run/dpdk") if os.path.isdir("/var/run/dpdk") else []:
            if d.startswith("vwvb-") and d.endswith(str(os.getpid())):
                shutil.rmtree(os.path.join("/var/run/dpdk", d), ignore_errors=True)
    ratios = sorted(r["ratio"] for r in rounds if r["ratio"] is not None)
    result = {
        "frame_bytes": 64,
        "ring": "packed" if args.packed else "split",
        "virtwire_serve_null_pps": sorted(r["virtwire_pps"] for r in rounds)[len(rounds) // 2],
        "dpdk_vhost_rxonly_pps": sorted(r["dpdk_pps"] for r in rounds)[len(rounds) // 2],
        "ratio": ratios[len(ratios) // 2] if ratios else None,
        "load_average": os.getloadavg()[0],
        "rounds": rounds,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"64-byte frames/s, testpmd txonly -> consumer ({result['ring']} ring):")
        print(f"  virtwire serve (null backend): {result['virtwire_serve_null_pps']:>12,} pps")
        print(f"  DPDK vhost PMD (rxonly):       {result['dpdk_vhost_rxonly_pps']:>12,} pps")
        print(f"  ratio virtwire / DPDK:         {result['ratio']}  (median of {args.rounds} "
              f"alternating rounds; load average {result['load_average']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
