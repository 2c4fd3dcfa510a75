"""Property tests: arbitrary vhost-user messages never crash the codec or the back end.

Invariants: ``decode_request`` raises nothing but ``ProtocolError``; the back end answers every
message (a reply, an ack, a refusal or a disconnect), keeps no fd it was not meant to keep, and
its counters stay consistent.
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtwire.hosts import vhost_user_proto as vp
from virtwire.hosts.vhost_device import VirtioDeviceHost
from virtwire.hosts.vhost_user import VhostUserBackend
from virtwire.hosts.vhost_user_proto import Message, ProtocolError
from virtwire.loop import EventLoop
from virtwire.virtio.pair import LoopbackDevice

codes = st.one_of(st.sampled_from(list(vp.REQUESTS)), st.integers(0, 2**32 - 1))
flags = st.sampled_from([1, 1 | 8, 1 | 4, 0, 3, 1 | 0x100])


def _payload_for(code: int) -> st.SearchStrategy[bytes]:
    fixed = {vp.P.U64: 8, vp.P.STATE: 8, vp.P.ADDR: 40, vp.P.FILE: 8, vp.P.MEMREG: 40}
    spec = vp.REQUESTS.get(code)
    sized = fixed.get(spec.payload) if spec else None
    return st.one_of(st.binary(max_size=300),
                     st.binary(min_size=sized, max_size=sized) if sized else st.binary(max_size=8))


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_decode_request_raises_only_protocol_errors(data):
    code = data.draw(codes)
    msg = Message(code, data.draw(flags), data.draw(_payload_for(code)),
                  fds=list(range(100, 100 + data.draw(st.integers(0, 9)))))
    try:
        vp.decode_request(msg)
    except ProtocolError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(codes, flags, st.binary(max_size=80), st.integers(0, 3)),
                max_size=12))
def test_backend_survives_arbitrary_message_sequences(tmp_path_factory, msgs):
    loop = EventLoop(raise_errors=True)  # any exception inside the back end fails the test
    be = VhostUserBackend(VirtioDeviceHost(LoopbackDevice([64, 64])), loop,
                          str(tmp_path_factory.mktemp("h") / "vwv.sock"))
    before = len(os.listdir("/proc/self/fd"))
    try:
        for code, fl, body, nfds in msgs:
            fds = [os.eventfd(0) for _ in range(nfds)]
            be.handle(Message(code, fl, body, fds))
            # The back end owns what it was given: every fd is either kept in a ring or closed.
            kept = {e.fd for vr in be.vrings for e in (vr.kick, vr.call, vr.err) if e}
            for fd in fds:
                if fd not in kept:
                    try:
                        os.fstat(fd)
                        raise AssertionError(f"fd {fd} leaked by {vp.request_name(code)}")
                    except OSError:
                        pass
        assert be.refused <= be.messages == len(msgs)
    finally:
        be.close()
        loop.close()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_memory_table_with_a_bogus_fd_is_refused(tmp_path):
    loop = EventLoop(raise_errors=True)
    be = VhostUserBackend(VirtioDeviceHost(LoopbackDevice([64, 64])), loop,
                          str(tmp_path / "vwv.sock"))
    efd = os.eventfd(0)
    body = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 1 << 20, 0x7F0000000000, 0)
    be.handle(Message(vp.VhostUserRequest.SET_MEM_TABLE, 1, body, [efd]))
    assert be.mem is None and be.refused == 1
    try:
        os.fstat(efd)
        raise AssertionError("fd not closed")
    except OSError:
        pass
    be.close()
    loop.close()
