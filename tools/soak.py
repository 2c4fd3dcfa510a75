#!/usr/bin/env python3
"""Soak ``virtwire serve``: traffic for N minutes with reconnects and memory-table changes.

One ``serve`` process (two ports, ``backend=null``); on each port a front end (the vhost-user
wire client of ``virtwire.testing.hostile``, driven the well-behaved way) streams TX frames;
every ``--reconnect`` seconds one of them disconnects and comes back, every ``--remap`` seconds
one re-sends its memory table (a new memfd holding the rings' memory: the back end must move the
running rings over). Every ``--every`` seconds a line: elapsed, serve's RSS and fd count, frames
served, refusals, loop errors. At the end a JSON summary; the exit status is 1 when the process
died, errors appeared, or fds/RSS did not come back near their first figure.

    python3 tools/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from virtwire.hosts import vhost_user_proto as vp  # noqa: E402
from virtwire.hosts.vhost_user_proto import VhostUserRequest as R  # noqa: E402
from virtwire.serve import query_stats  # noqa: E402
from virtwire.testing.hostile import UVA, HostileFrontend, fd_count, memfd, rss_kib  # noqa: E402
from virtwire.testing.serve_process import ServeProcess  # noqa: E402

NUM = 256
FRAME = bytes(12) + b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + bytes(46)


class Client:
    """A front end on one port streaming TX frames on ring 1."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fe: HostileFrontend | None = None
        self.sent = 0

    def connect(self) -> None:
        fe = HostileFrontend(self.path)
        fe.handshake()
        assert fe.set_mem() == 0
        assert fe.start_ring(1, NUM) == 0
        assert fe.mem is not None
        fe.mem[0x40000:0x40000 + len(FRAME)] = FRAME
        self.fe, self.sent = fe, 0

    def pump(self, n: int = 64) -> None:
        fe = self.fe
        assert fe is not None
        if (self.sent - fe.used_idx(1, NUM)) & 0xFFFF > NUM - n:
            return  # the back end is behind: wait
        fe.post_tx(1, NUM, [[((self.sent + k) % NUM, 0x40000, len(FRAME), 0, 0)]
                            for k in range(n)])
        self.sent = (self.sent + n) & 0xFFFF

    def remap(self) -> None:
        """A new memfd with the same contents and addresses (QEMU after a memory change)."""
        fe = self.fe
        assert fe is not None and fe.mem is not None
        new = memfd(len(fe.mem))
        os.pwrite(new, bytes(fe.mem), 0)
        table = vp.MemTable((vp.MemRegion(0, len(fe.mem), UVA, 0),))
        if fe.ack(R.SET_MEM_TABLE, vp.encode_payload(vp.P.MEMTABLE, table), (new,)) != 0:
            raise RuntimeError("memory table change refused")
        import mmap

        fe.mem.close()
        os.close(fe.mem_fd)
        fe.mem_fd, fe.mem = new, mmap.mmap(new, 1 << 20)

    def close(self) -> None:
        if self.fe is not None:
            self.fe.close()
            self.fe = None


def _sample(srv: ServeProcess, ctl: str, t0: float) -> dict:
    st = query_stats(ctl, timeout=2)
    pid = srv.proc.pid  # type: ignore[union-attr]
    frames = sum(r.get("frames", 0) for p in st["ports"] for r in p["vhost_user"]["rings"])
    refused = sum(p["vhost_user"]["refused"] for p in st["ports"])
    return {"t": round(time.monotonic() - t0, 1), "rss_kib": rss_kib(pid),
            "fds": fd_count(pid), "frames": frames, "refused": refused,
            "loop_errors": st["loop"]["errors"]}


def soak(seconds: float, reconnect: float, remap: float, every: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        a, b = f"{d}/a.sock", f"{d}/b.sock"
        srv = ServeProcess(None, [f"vhost-user,path={a},backend=null",
                                  f"vhost-user,path={b},backend=null"], Path(d) / "serve.log")
        srv.start()
        clients = [Client(a), Client(b)]
        samples: list[dict] = []
        try:
            for c in clients:
                c.connect()
            t0 = time.monotonic()
            samples.append(_sample(srv, a + ".ctl", t0))
            next_rc, next_remap, next_line, turn = t0 + reconnect, t0 + remap, t0 + every, 0
            reconnects = remaps = 0
            while time.monotonic() - t0 < seconds:
                for c in clients:
                    c.pump()
                now = time.monotonic()
                if now >= next_rc:
                    c = clients[turn % 2]
                    c.close()
                    c.connect()
                    reconnects, turn, next_rc = reconnects + 1, turn + 1, now + reconnect
                if now >= next_remap:
                    clients[(turn + 1) % 2].remap()
                    remaps, next_remap = remaps + 1, now + remap
                if now >= next_line:
                    samples.append(_sample(srv, a + ".ctl", t0))
                    print(json.dumps(samples[-1]), flush=True)
                    next_line = now + every
                time.sleep(0.002)
            for c in clients:
                c.close()
            time.sleep(0.5)
            end = _sample(srv, a + ".ctl", t0)
            alive = srv.proc is not None and srv.proc.poll() is None
        finally:
            for c in clients:
                c.close()
            srv.stop()
        log = (Path(d) / "serve.log").read_text(errors="replace")
    first = samples[1] if len(samples) > 1 else samples[0]
    ok = (alive and end["loop_errors"] == 0 and end["refused"] == 0
          and "Traceback" not in log and end["fds"] <= samples[0]["fds"] + 2
          and end["rss_kib"] <= first["rss_kib"] + 8192)
    return {"ok": ok, "seconds": seconds, "reconnects": reconnects, "remaps": remaps,
            "frames": end["frames"], "start": samples[0], "end": end, "alive": alive}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--reconnect", type=float, default=3.0, help="seconds between reconnects")
    p.add_argument("--remap", type=float, default=2.0, help="seconds between table changes")
    p.add_argument("--every", type=float, default=5.0, help="seconds between progress lines")
    a = p.parse_args()
    if a.minutes <= 0 or a.reconnect <= 0 or a.remap <= 0 or a.every <= 0:
        print("soak: durations must be positive", file=sys.stderr)
        return 2
    summary = soak(a.minutes * 60, a.reconnect, a.remap, a.every)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
