"""DPDK's virtio-user front end (dpdk-testpmd, no VM) against ``virtwire serve``.

testpmd's ``net_virtio_user0`` port connects to our vhost-user socket and forwards in ``io`` mode
(every frame it receives goes back out of the same port). Our port's backend is a TAP in a test
namespace: we write N frames into the TAP (an AF_PACKET socket on the host end), they reach
testpmd through our RX ring, come back through our TX ring and out of the TAP, where we capture
them. The counts must match everywhere -- what we injected, testpmd's RX and TX, our rx0/tx0
ring counters, what we captured -- and every frame must come back byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from virtwire.netns import netns

pytestmark = pytest.mark.system

N_FRAMES = 3000

INJECT = r"""
import os, socket, sys, time, random
n = int(sys.argv[2]); s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
s.bind((sys.argv[1], 0)); s.settimeout(0.2)
src = bytes.fromhex("020000000001"); dst = bytes.fromhex("020000000002")
rnd = random.Random(5)
frames = [dst + src + b"\x88\xb5" + i.to_bytes(4, "big") + rnd.randbytes(rnd.randint(46, 1400))
          for i in range(n)]
got = {}
sent = 0
deadline = time.monotonic() + 60
while (sent < n or len(got) < n) and time.monotonic() < deadline:
    if sent < n:
        for f in frames[sent:sent + 16]:
            s.send(f)
        sent = min(n, sent + 16)
    try:
        while True:
            f, addr = s.recvfrom(4096)
            if addr[2] == socket.PACKET_OUTGOING:  # our own transmissions, looped back to us
                continue
            got[int.from_bytes(f[14:18], "big")] = f
    except (socket.timeout, BlockingIOError):
        pass
ok = sum(1 for i, f in got.items() if f == frames[i])
print(sent, len(got), ok, flush=True)
"""


def _testpmd(sock: str, prefix: str, packed: bool, log_path: str) -> subprocess.Popen[bytes]:
    vdev = f"net_virtio_user0,path={sock},queues=1,queue_size=256"
    if packed:
        vdev += ",packed_vq=1"
    argv = ["dpdk-testpmd", "-l", "0,1", "--no-huge", "-m", "512", "--no-pci",
            "--file-prefix", prefix, "--vdev", vdev, "--", "--total-num-mbufs", "16384",
            "--forward-mode=io", "--nb-cores=1"]
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop_testpmd(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        try:
            assert p.stdin is not None
            p.stdin.write(b"\n")
            p.stdin.close()
        except OSError:
            pass
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def _stats(sock: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "virtwire", "stats", sock, "--compact"],
                         capture_output=True, text=True, check=True, timeout=20).stdout
    return json.loads(out)


def _rings(sock: str) -> dict[str, dict]:
    return {x["role"]: x for x in _stats(sock)["ports"][0]["vhost_user"]["rings"]}


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_testpmd_virtio_user_exchanges_frames_with_serve(packed):
    tmp = tempfile.mkdtemp(prefix="vwv-dpdk-")
    sock = os.path.join(tmp, "vwv.sock")
    prefix = f"vwv-{os.getpid()}-{int(packed)}"
    tp_log = os.path.join(tmp, "testpmd.log")
    serve_log = os.path.join(tmp, "serve.log")
    try:
        with netns("vwv") as ns:
            ns.add_tap("vwvd0")
            ns.run(["sysctl", "-qw", "net.ipv6.conf.vwvd0.disable_ipv6=1"])
            r, w = os.pipe()
            env = dict(os.environ, VIRTWIRE_SERVE_READY_FD=str(w))
            with open(serve_log, "wb") as f:
                srv = subprocess.Popen(
                    ["ip", "netns", "exec", ns.name, sys.executable, "-m", "virtwire", "-v",
                     "serve", "-q", "--port",
                     f"vhost-user,path={sock},backend=tap,ifname=vwvd0"
                     + (",packed=on" if packed else ",packed=off")],
                    stdout=f, stderr=f, pass_fds=(w,), env=env)
            os.close(w)
            tp = None
            try:
                ready, _, _ = select.select([r], [], [], 20)
                assert ready and os.read(r, 1) == b"1", open(serve_log).read()
                tp = _testpmd(sock, prefix, packed, tp_log)
                # testpmd's stdout is block-buffered into the log: watch our rings instead.
                deadline = time.monotonic() + 30
                while not all(x["started"] and x["enabled"] for x in _rings(sock).values()):
                    assert tp.poll() is None and time.monotonic() < deadline, \
                        open(tp_log, errors="replace").read()[-2000:]
                    time.sleep(0.3)
                time.sleep(1.0)
                inj = ns.run([sys.executable, "-c", INJECT, "vwvd0", str(N_FRAMES)],
                             timeout=120)
                sent, got, same = map(int, inj.stdout.split())
                stats = _stats(sock)
            finally:
                if tp is not None:
                    _stop_testpmd(tp)
                srv.terminate()
                srv.wait(10)
                os.close(r)
        rings = {x["role"]: x for x in stats["ports"][0]["vhost_user"]["rings"]}
        feats = stats["ports"][0]["vhost_user"]["features"]
        assert ("RING_PACKED" in feats) == packed
        out = open(tp_log, errors="replace").read()
        m_rx = re.findall(r"RX-packets:\s*(\d+)", out)
        m_tx = re.findall(r"TX-packets:\s*(\d+)", out)
        assert m_rx and m_tx, out[-3000:]
        tp_rx, tp_tx = int(m_rx[-1]), int(m_tx[-1])
        assert (sent, got, same) == (N_FRAMES, N_FRAMES, N_FRAMES), (tp_rx, tp_tx, rings)
        assert tp_rx == tp_tx == N_FRAMES, out[-2000:]
        assert rings["rx0"]["frames"] == N_FRAMES and rings["tx0"]["frames"] == N_FRAMES
        assert "Traceback" not in open(serve_log).read()
    finally:
        shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
