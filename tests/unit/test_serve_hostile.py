"""Issue 14: hostile front ends against a real ``virtwire serve`` process (backend=null).

Each test reproduces one numbered defect of the issue over the real socket and checks that the
process stays up, keeps serving its other port and answers ``stats``."""

from __future__ import annotations

import os
import socket
import stat
import struct
import time
from pathlib import Path

import pytest

from virtwire.hosts import vhost_user_proto as vp
from virtwire.hosts.vhost_user_proto import VhostUserRequest as R
from virtwire.serve import query_stats
from virtwire.testing.hostile import HostileFrontend, fd_count, wait_until
from virtwire.testing.serve_process import ServeProcess


@pytest.fixture
def serve(tmp_path: Path):  # noqa: ANN201
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    srv = ServeProcess(None, [f"vhost-user,path={a},backend=null",
                              f"vhost-user,path={b},backend=null"], tmp_path / "serve.log")
    srv.start()
    srv.a, srv.b, srv.ctl = a, b, a + ".ctl"  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        alive = srv.proc is not None and srv.proc.poll() is None
        srv.stop()
        text = srv.log.read_text(errors="replace")
        assert alive, text[-3000:]
        assert "Traceback" not in text, text[-3000:]


def _port(srv: ServeProcess, name: str) -> dict:
    for p in query_stats(srv.ctl, timeout=2)["ports"]:  # type: ignore[attr-defined]
        if p["attach"]["path"].endswith(name):
            return p
    raise AssertionError(name)


def _healthy(srv: ServeProcess) -> None:
    """The process runs, the other port answers a handshake, stats within 100 ms."""
    assert srv.proc is not None and srv.proc.poll() is None
    t0 = time.monotonic()
    query_stats(srv.ctl, timeout=2)  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < 0.1
    fe = HostileFrontend(srv.b, timeout=2)  # type: ignore[attr-defined]
    try:
        assert fe.alive()
    finally:
        fe.close()


def test_socket_mode_is_0600_by_default(serve: ServeProcess) -> None:
    """Defect 9: the socket's mode followed the umask."""
    assert stat.S_IMODE(os.stat(serve.a).st_mode) == 0o600  # type: ignore[attr-defined]


def test_trickled_message_does_not_freeze_the_loop(serve: ServeProcess) -> None:
    """Defect 2: one byte at a time, under 5 s apart, froze every port."""
    fe = HostileFrontend(serve.a)  # type: ignore[attr-defined]
    data = vp.encode(R.SET_FEATURES, struct.pack("<Q", 0))
    try:
        for byte in data[:10]:
            fe.sock.send(bytes([byte]))
            t0 = time.monotonic()
            _healthy(serve)
            assert time.monotonic() - t0 < 1.0
            time.sleep(0.1)
        # The whole message did not arrive within its deadline: the connection is dropped.
        assert wait_until(lambda: _port(serve, "a.sock")["vhost_user"]["connected"] is False,
                          timeout=4)
    finally:
        fe.close()
    _healthy(serve)


def test_peer_that_never_reads_replies_does_not_block(serve: ServeProcess) -> None:
    """Defect 2: ``_send`` blocked 5 s per reply when the peer stopped reading."""
    fe = HostileFrontend(serve.a)  # type: ignore[attr-defined]
    fe.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        msg = vp.encode(R.GET_CONFIG, struct.pack("<III", 0, 256, 0) + bytes(256))
        fe.sock.settimeout(0.5)
        for _ in range(2000):
            try:
                fe.sock.send(msg)
            except (TimeoutError, BlockingIOError, OSError):
                break
        t0 = time.monotonic()
        _healthy(serve)
        assert time.monotonic() - t0 < 0.5
    finally:
        fe.close()
    _healthy(serve)


def test_silent_client_gives_the_slot_back(serve: ServeProcess) -> None:
    """Defect 9: a client that connects and says nothing held the port's only slot forever."""
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(serve.a)  # type: ignore[attr-defined]
    try:
        assert wait_until(lambda: _port(serve, "a.sock")["vhost_user"]["connected"] is False
                          and _port(serve, "a.sock")["vhost_user"]["connections"] == 1,
                          timeout=8)
        fe = HostileFrontend(serve.a)  # type: ignore[attr-defined]
        assert fe.alive()
        fe.close()
    finally:
        silent.close()


@pytest.mark.parametrize("kind", ["pipe", "file", "opath"])
@pytest.mark.parametrize("what", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
def test_ring_fds_must_be_eventfds(serve: ServeProcess, tmp_path: Path, kind: str,
                                   what: int) -> None:
    """Defects 5 and 6: a pipe/regular file/O_PATH fd as kick/call/err fd spun the loop, raised
    out of ``handle()`` or leaked the fd."""
    fe = HostileFrontend(serve.a)  # type: ignore[attr-defined]
    pid = serve.proc.pid  # type: ignore[union-attr]
    try:
        fe.handshake()
        assert fe.set_mem() == 0
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)  # writer closed: the read end is readable forever
        elif kind == "file":
            r = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
        else:
            r = os.open(tmp_path, os.O_PATH)
        before = fd_count(pid)
        payload = vp.encode_payload(vp.P.FILE, vp.VringFile(1, r))
        for _ in range(50):
            assert fe.ack(what, payload, (r,)) != 0  # refused, answered
        assert fd_count(pid) <= before  # nothing kept
        os.close(r)
        if what == R.SET_VRING_KICK:
            assert not _port(serve, "a.sock")["vhost_user"]["rings"][1]["started"]
        assert fe.alive()
    finally:
        fe.close()
    _healthy(serve)


def _tx_frames(srv: ServeProcess, name: str = "a.sock") -> int:
    return int(_port(srv, name)["vhost_user"]["rings"][1].get("frames", 0))


def _post_frame(fe: HostileFrontend, slot: int, num: int = 256) -> None:
    """One TX chain: a 12-byte virtio-net header and a 60-byte frame at 0x40000."""
    assert fe.mem is not None
    fe.mem[0x40000:0x40000 + 72] = bytes(12) + b"\xff" * 6 + b"\x02" + bytes(53)
    fe.post_tx(1, num, [[(slot, 0x40000, 72, 0, 0)]])


@pytest.mark.parametrize("seal", ["sealable", "unsealable"])
def test_shrunk_memfd_does_not_kill_serve(serve: ServeProcess, seal: str) -> None:
    """Defect 1: ftruncate(memfd, 0) under a started ring, then a kick: SIGBUS killed every
    port. A sealable memfd is sealed by serve (the shrink fails); an unsealable one (DPDK's)
    is guarded: the fault is absorbed and that front end dropped."""
    fe = HostileFrontend(serve.a)  # type: ignore[attr-defined]
    try:
        fe.handshake()
        assert fe.set_mem(seal=seal) == 0
        assert fe.start_ring(1) == 0
        _post_frame(fe, 0)
        assert wait_until(lambda: _tx_frames(serve) == 1)
        if seal == "sealable":
            with pytest.raises(PermissionError):
                os.ftruncate(fe.mem_fd, 0)
            _post_frame(fe, 1)
            assert wait_until(lambda: _tx_frames(serve) == 2)
        else:
            os.ftruncate(fe.mem_fd, 0)
            os.eventfd_write(fe.kick, 1)
            assert wait_until(lambda: not _port(serve, "a.sock")["vhost_user"]["connected"])
    finally:
        fe.close()
    _healthy(serve)


def test_memory_fd_must_be_a_file(serve: ServeProcess) -> None:
    """Defect 1: memory fds are regular files (memfds) only."""
    fe = HostileFrontend(serve.a)  # type: ignore[attr-defined]
    r, w = os.pipe()
    try:
        fe.handshake()
        table = vp.MemTable((vp.MemRegion(0, 1 << 20, 0x7F0000000000, 0),))
        assert fe.ack(R.SET_MEM_TABLE, vp.encode_payload(vp.P.MEMTABLE, table), (r,)) != 0
        assert fe.alive()
    finally:
        os.close(r)
        os.close(w)
        fe.close()


def test_memory_table_change_is_all_or_nothing(serve: ServeProcess) -> None:
    """Defect 7: a table that no longer holds a running ring was half applied (the ring
    stopped, the old mapping gone); it is refused and the ring keeps running."""
    fe = HostileFrontend(serve.a)  # type: ignore[attr-defined]
    try:
        fe.handshake()
        assert fe.set_mem() == 0
        assert fe.start_ring(1) == 0
        _post_frame(fe, 0)
        assert wait_until(lambda: _tx_frames(serve) == 1)
        other = os.memfd_create("other", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(other, 1 << 20)
        # The same addresses, a different region size: the ring's tables fall outside it.
        table = vp.MemTable((vp.MemRegion(0, 0x8000, 0x7F0000000000, 0),))
        assert fe.ack(R.SET_MEM_TABLE, vp.encode_payload(vp.P.MEMTABLE, table), (other,)) != 0
        os.close(other)
        assert _port(serve, "a.sock")["vhost_user"]["rings"][1]["started"]
        _post_frame(fe, 1)
        assert wait_until(lambda: _tx_frames(serve) == 2)
    finally:
        fe.close()
    _healthy(serve)


INDIRECT = 4


def test_huge_indirect_tables_do_not_stall_serve(serve: ServeProcess) -> None:
    """Defect 3: chains all pointing at one 32768-entry indirect table cost 60-85 ms each; a
    ring of them stalled every port for seconds."""
    fe = HostileFrontend(serve.a)  # type: ignore[attr-defined]
    try:
        fe.handshake()
        assert fe.set_mem(8 << 20) == 0
        assert fe.start_ring(1) == 0
        assert fe.mem is not None
        table = 0x100000
        for k in range(32768):  # empty entries chained to the next; the last ends the chain
            struct.pack_into("<QIHH", fe.mem, table + 16 * k, 0x40000, 0, int(k < 32767),
                             k + 1 if k < 32767 else 0)
        fe.post_tx(1, 256, [[(k, table, 16 * 32768, INDIRECT, 0)] for k in range(256)])
        worst = 0.0
        for _ in range(10):
            t0 = time.monotonic()
            query_stats(serve.ctl, timeout=5)  # type: ignore[attr-defined]
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.05)
        assert worst < 0.1, worst
    finally:
        fe.close()
    _healthy(serve)


@pytest.fixture
def serve_memory(tmp_path: Path):  # noqa: ANN201
    a = str(tmp_path / "m.sock")
    srv = ServeProcess(None, [f"vhost-user,path={a},backend=memory"], tmp_path / "serve.log")
    srv.start()
    srv.a, srv.ctl = a, a + ".ctl"  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        srv.stop()


def test_memory_backend_of_serve_is_bounded(serve_memory: ServeProcess) -> None:
    """Defect 10: ``backend=memory`` under serve kept every TX frame forever."""
    from virtwire.testing.hostile import rss_kib

    srv = serve_memory
    fe = HostileFrontend(srv.a)  # type: ignore[attr-defined]
    pid = srv.proc.pid  # type: ignore[union-attr]
    try:
        fe.handshake()
        assert fe.set_mem(1 << 20) == 0
        assert fe.start_ring(1) == 0
        assert fe.mem is not None
        fe.mem[0x40000:0x40000 + 1526] = bytes(12) + b"\xff" * 6 + b"\x02" + bytes(1507)
        time.sleep(0.3)
        base = rss_kib(pid)
        sent = 0
        for _ in range(60):  # 60 x 256 frames of 1514 bytes: 23 MiB if all were kept
            fe.post_tx(1, 256, [[(k, 0x40000, 1526, 0, 0)] for k in range(256)])
            sent += 256
            assert wait_until(lambda s=sent: fe.used_idx(1, 256) == s & 0xFFFF, timeout=10)
        grown = rss_kib(pid) - base
        assert grown < 8 * 1024, f"RSS grew by {grown} KiB"
    finally:
        fe.close()


def test_ring_format_change_is_refused_before_it_is_stored(serve: ServeProcess) -> None:
    """Defect 10: SET_FEATURES stored a packed-ring feature word, then refused it."""
    fe = HostileFrontend(serve.a)  # type: ignore[attr-defined]
    try:
        fe.handshake()
        assert fe.set_mem() == 0
        assert fe.start_ring(1) == 0
        before = _port(serve, "a.sock")["vhost_user"]["features"]
        offered = fe.ack_get(R.GET_FEATURES)
        assert offered >> 34 & 1
        assert fe.ack(R.SET_FEATURES, vp.encode_payload(vp.P.U64, offered)) != 0
        assert _port(serve, "a.sock")["vhost_user"]["features"] == before
        assert "RING_PACKED" not in before
    finally:
        fe.close()


def _attack(path: str, tmp_path: Path) -> None:
    """Every hostile move of the issue, on one port, one after another."""
    from virtwire.testing.hostile import memfd

    fe = HostileFrontend(path)
    try:
        fe.handshake()
        assert fe.set_mem(8 << 20, seal="unsealable") == 0
        r, w = os.pipe()
        os.close(w)
        opath = os.open(tmp_path, os.O_PATH)
        for fd in (r, opath):
            for req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
                fe.ack(req, vp.encode_payload(vp.P.FILE, vp.VringFile(1, fd)), (fd,))
        os.close(r)
        os.close(opath)
        assert fe.start_ring(1) == 0
        assert fe.mem is not None
        table = 0x100000
        for k in range(32768):
            struct.pack_into("<QIHH", fe.mem, table + 16 * k, 0x40000, 0, int(k < 32767),
                             k + 1 if k < 32767 else 0)
        fe.post_tx(1, 256, [[(k, table, 16 * 32768, INDIRECT, 0)] for k in range(256)])
        other = memfd(1 << 20, seal="sealable")
        bad = vp.MemTable((vp.MemRegion(0, 0x8000, 0x7F0000000000, 0),))
        fe.ack(R.SET_MEM_TABLE, vp.encode_payload(vp.P.MEMTABLE, bad), (other,))
        os.close(other)
        os.ftruncate(fe.mem_fd, 0)
        os.eventfd_write(fe.kick, 1)
    except (OSError, EOFError):
        pass  # dropped: expected for some of these
    finally:
        fe.close()
    trickle = HostileFrontend(path)
    try:
        for byte in vp.encode(R.SET_FEATURES, struct.pack("<Q", 0))[:6]:
            trickle.sock.send(bytes([byte]))
            time.sleep(0.3)
    finally:
        trickle.close()


def test_under_all_of_them_together(serve: ServeProcess, tmp_path: Path) -> None:
    """While one port is attacked, the other keeps moving frames, ``stats`` answers within
    100 ms, and fds and RSS return to the baseline once the hostile peer is gone."""
    import threading

    from virtwire.testing.hostile import rss_kib

    pid = serve.proc.pid  # type: ignore[union-attr]
    good = HostileFrontend(serve.b)  # type: ignore[attr-defined]
    good.handshake()
    assert good.set_mem() == 0
    assert good.start_ring(1) == 0
    assert good.mem is not None
    good.mem[0x40000:0x40000 + 72] = bytes(12) + b"\xff" * 6 + b"\x02" + bytes(53)
    time.sleep(0.3)
    fds0, rss0 = fd_count(pid), rss_kib(pid)
    attacker = threading.Thread(target=_attack, args=(serve.a, tmp_path))  # type: ignore[attr-defined]
    attacker.start()
    sent, worst = 0, 0.0
    try:
        while attacker.is_alive():
            good.post_tx(1, 256, [[(k, 0x40000, 72, 0, 0)] for k in range(16)])
            sent += 16
            assert wait_until(lambda s=sent: good.used_idx(1, 256) == s & 0xFFFF, timeout=2)
            t0 = time.monotonic()
            query_stats(serve.ctl, timeout=2)  # type: ignore[attr-defined]
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.02)
    finally:
        attacker.join()
    assert worst < 0.1, worst
    assert sent >= 16 * 20
    assert wait_until(lambda: not _port(serve, "a.sock")["vhost_user"]["connected"], timeout=5)
    assert wait_until(lambda: fd_count(pid) <= fds0, timeout=5), (fd_count(pid), fds0)
    assert rss_kib(pid) - rss0 < 4096, (rss_kib(pid), rss0)
    good.close()
    _healthy(serve)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root")
def test_access_control_keys_and_user(tmp_path: Path) -> None:
    """Defect 9: mode=/group= per port, allow-uid= (SO_PEERCRED), serve --user."""
    import subprocess
    import sys

    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    os.chmod(tmp_path, 0o755)
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtwire", "serve", "-q", "--user", "nobody",
         "--port", f"vhost-user,path={a},backend=null,mode=0660,group=0",
         "--port", f"vhost-user,path={b},backend=null,allow-uid=12345"],
        pass_fds=(w,), env=dict(os.environ, VIRTWIRE_SERVE_READY_FD=str(w)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
        st = os.stat(a)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 0
        assert st.st_uid == 65534  # handed to the user serve now runs as
        with open(f"/proc/{proc.pid}/status") as f:
            uids = [ln.split()[1:] for ln in f if ln.startswith("Uid:")][0]
        assert set(uids) == {"65534"}
        fe = HostileFrontend(a)
        assert fe.alive()
        fe.close()
        fe = HostileFrontend(b)  # root is not on b's allow-list: the connection is closed
        assert not fe.alive()
        fe.close()
    finally:
        os.close(r)
        proc.terminate()
        err = proc.communicate(timeout=10)[1].decode()
    assert "Traceback" not in err, err
    assert "allow-uid" in err


def test_removing_a_region_under_a_running_ring_is_refused(serve: ServeProcess) -> None:
    """Defect 7: REM_MEM_REG of the region that holds a running ring was half applied."""
    from virtwire.testing.hostile import memfd

    fe = HostileFrontend(serve.a)  # type: ignore[attr-defined]
    extra = memfd(1 << 20)
    try:
        fe.handshake()
        assert fe.set_mem() == 0
        region = vp.MemRegion(1 << 30, 1 << 20, 0x7E0000000000, 0)
        assert fe.ack(R.ADD_MEM_REG, vp.encode_payload(vp.P.MEMREG, region), (extra,)) == 0
        assert fe.start_ring(1) == 0
        _post_frame(fe, 0)
        assert wait_until(lambda: _tx_frames(serve) == 1)
        ring_region = vp.MemRegion(0, 1 << 20, 0x7F0000000000, 0)
        assert fe.ack(R.REM_MEM_REG, vp.encode_payload(vp.P.MEMREG, ring_region)) != 0
        assert _port(serve, "a.sock")["vhost_user"]["rings"][1]["started"]
        _post_frame(fe, 1)
        assert wait_until(lambda: _tx_frames(serve) == 2)
        # The other region holds nothing of ours: it goes.
        assert fe.ack(R.REM_MEM_REG, vp.encode_payload(vp.P.MEMREG, region)) == 0
    finally:
        os.close(extra)
        fe.close()
    _healthy(serve)
