"""TCP transfers between a guest and its host-side netns, checked by sha256 at both ends.

The host end runs as a small Python program inside the test's network namespace (``ip netns
exec``); the guest end is busybox ``nc``, ``dd`` and ``sha256sum`` over the serial console.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

from virtwire.guest.qemu import GuestVM
from virtwire.netns import Netns

__all__ = ["tcp_both_ways", "pattern_sha256"]

# Listens on argv[1]:argv[2], prints "listening", then "<bytes> <sha256>" of what one peer sent.
_HOST_SINK = r"""
import hashlib, socket, sys
t = float(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(t)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(t); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

# Connects to argv[1]:argv[2] (retrying while the guest's nc starts), sends argv[3] bytes (random,
# or the streamed pattern when argv[5] is "pattern") and prints "<bytes> <sha256>".
_HOST_SOURCE = r"""
import hashlib, os, socket, sys, time
n = int(sys.argv[3]); t = float(sys.argv[4]); pattern = sys.argv[5] == "pattern"
for _ in range(200):
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); break
    except OSError: time.sleep(0.2)
c.settimeout(t); h = hashlib.sha256()
if pattern:
    block = bytes((i * 7 + 3) & 0xFF for i in range(1 << 16)); left = n
    while left:
        b = block[: min(left, len(block))]; c.sendall(b); h.update(b); left -= len(b)
else:
    data = os.urandom(n); c.sendall(data); h.update(data)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
print(n, h.hexdigest(), flush=True)
"""


def pattern_sha256(size: int) -> str:
    """sha256 of the first ``size`` bytes of the repeating pattern the host source streams."""
    block = bytes((i * 7 + 3) & 0xFF for i in range(1 << 16))
    return hashlib.sha256((block * (size // len(block) + 1))[:size]).hexdigest()


def tcp_both_ways(vm: GuestVM, ns: Netns, host_ip: str, guest_ip: str, size: int, *,
                  ports: tuple[int, int] = (5201, 5202), io_timeout: float = 120.0,
                  pattern: bool = False) -> None:
    """``size`` bytes guest -> host (random, from the guest) and host -> guest (random, or the
    streamed pattern with ``pattern``); byte counts and sha256 must match at both ends."""
    to_host, to_guest = ports
    # guest -> host
    sink = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", _HOST_SINK,
                             host_ip, str(to_host), str(io_timeout)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
        out = vm.run(f"dd if=/dev/urandom of=/tmp/tx bs=1M count={size >> 20} 2>/dev/null; "
                     f"sha256sum /tmp/tx; nc {host_ip} {to_host} < /tmp/tx; echo nc=$?",
                     timeout=300).output
        n, host_sum = sink.stdout.readline().split()
        assert (int(n), host_sum) == (size, out.split()[0]), out
    finally:
        sink.kill()
        sink.wait()
    vm.run("rm -f /tmp/tx", timeout=20)
    # host -> guest
    vm.run(f"(nc -l -p {to_guest} > /tmp/rx; echo done > /tmp/rx.done) "
           "</dev/null >/dev/null 2>&1 &", timeout=20)
    src = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-c", _HOST_SOURCE,
                          guest_ip, str(to_guest), str(size), str(io_timeout),
                          "pattern" if pattern else "random"],
                         capture_output=True, text=True, timeout=300)
    assert src.returncode == 0, src.stderr
    n, host_sum = src.stdout.split()
    deadline = time.monotonic() + 60
    while "done" not in vm.run("cat /tmp/rx.done 2>/dev/null", timeout=20).output:
        assert time.monotonic() < deadline, "guest nc did not finish"
        time.sleep(0.5)
    out = vm.run("wc -c < /tmp/rx; sha256sum /tmp/rx; rm -f /tmp/rx", timeout=60).output.split()
    assert (int(out[0]), out[1]) == (size, host_sum)
    assert int(n) == size
    if pattern:
        assert host_sum == pattern_sha256(size)
