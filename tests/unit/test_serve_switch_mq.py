"""``virtwire serve`` wiring for netlab: a multi-queue switch port, and the QEMU snippet's MTU."""

from __future__ import annotations

from virtwire.backends.shape import ShapedBackend
from virtwire.backends.switch import SwitchQueue
from virtwire.config import parse_port
from virtwire.serve import build


def test_switch_port_with_two_queue_pairs_is_one_port_with_a_backend_per_pair(tmp_path) -> None:
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    srv = build([parse_port(f"vhost-user,path={a},backend=switch,switch=s,name=pa,queues=2"),
                 parse_port(f"vhost-user,path={b},backend=switch,switch=s,name=pb,queues=2,"
                            "tx.loss=1%,seed=1")])
    try:
        pa, pb = srv.ports
        assert len(pa.backends) == 2 and all(isinstance(x, SwitchQueue) for x in pa.backends)
        assert pa.backends[0].port is pa.backends[1].port
        assert pa.backends[0].fileno() != pa.backends[1].fileno()  # a wake-up per pair
        assert all(isinstance(x, ShapedBackend) for x in pb.backends)
        assert list(srv.switches["s"].ports) == ["pa", "pb"]
        assert pa.device.stats()["queue_pairs"]["max"] == 2
    finally:
        srv.close()
