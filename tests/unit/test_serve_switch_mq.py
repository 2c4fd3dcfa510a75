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


def _device_arg(args: list[str]) -> str:
    return args[args.index("-device") + 1]


def test_qemu_snippet_carries_the_port_mtu_as_host_mtu() -> None:
    from virtwire.serve import libvirt_xml, qemu_args

    plain = parse_port("vhost-user,path=/tmp/x.sock,backend=memory")
    assert "host_mtu" not in _device_arg(qemu_args(plain))
    assert "<mtu" not in libvirt_xml(plain)
    cfg = parse_port("vhost-user,path=/tmp/x.sock,backend=memory,mtu=1400")
    dev = _device_arg(qemu_args(cfg))
    assert dev.startswith("virtio-net-pci,") and ",host_mtu=1400" in dev
    assert "<mtu size='1400'/>" in libvirt_xml(cfg)


def test_vxlan_uplink_mtu_reaches_the_qemu_snippet() -> None:
    """The MTU derived from a VXLAN uplink (netlab.wire) is what the printed snippet carries."""
    from types import SimpleNamespace

    from virtwire.netlab.wire import wire_port
    from virtwire.serve import qemu_args

    overlay = SimpleNamespace(guest_mtu=1450, dev="eth9", underlay_mtu=1500, overhead=50)
    sw = SimpleNamespace(overlay=overlay, uplink=object(), name="s")
    cfg = parse_port("vhost-user,path=/tmp/x.sock,backend=switch,switch=s")
    wire_port(cfg, [], {"s": sw})
    assert cfg.mtu == 1450
    assert ",host_mtu=1450" in _device_arg(qemu_args(cfg, 1))
