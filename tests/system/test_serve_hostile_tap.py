"""Issue 14, defect 4, against a real ``virtwire serve`` on a TAP: a mergeable RX buffer in more
pieces than one readv takes (IOV_MAX) made readv fail with EINVAL, read as "nothing pending":
the TAP stayed readable, the loop spun at 100 % CPU and no frame was delivered."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from virtwire.testing.hostile import HostileFrontend, wait_until
from virtwire.testing.serve_process import serve_on_tap

pytestmark = pytest.mark.system

NEXT, WRITE, INDIRECT = 1, 2, 4


def test_rx_buffer_beyond_iov_max_is_filled(tmp_path: Path) -> None:
    with serve_on_tap(tmp_path, "vwhx", tap_addr="10.77.0.1/24") as (ns, srv, sock):
        fe = HostileFrontend(sock)
        try:
            fe.handshake()
            assert fe.set_mem(4 << 20) == 0
            assert fe.start_ring(0, 256) == 0
            assert fe.mem is not None
            chains = []
            for c in range(4):  # each: one indirect table of 1024 one-byte writable buffers
                table = 0x100000 + c * 0x4000
                for k in range(1024):
                    struct.pack_into("<QIHH", fe.mem, table + 16 * k, 0x200000 + c * 1024 + k,
                                     1, WRITE | (NEXT if k < 1023 else 0), k + 1 if k < 1023 else 0)
                chains.append([(c, table, 16 * 1024, INDIRECT, 0)])
            fe.post_tx(0, 256, chains)  # (posts on ring 0: the RX ring)
            cpu0 = _cpu_ticks(srv.proc.pid)  # type: ignore[union-attr]
            ns.run(["ping", "-c", "3", "-i", "0.2", "-W", "1", "10.77.0.2"], check=False)
            assert wait_until(lambda: fe.used_idx(0, 256) >= 1, timeout=5)
            time.sleep(1.0)
            busy = (_cpu_ticks(srv.proc.pid) - cpu0) / 100  # type: ignore[union-attr]
            assert busy < 1.0, f"serve used {busy:.1f} s of CPU in ~2 s"
        finally:
            fe.close()
        log = srv.log.read_text(errors="replace")
        assert "Invalid argument" not in log, log[-2000:]


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime
