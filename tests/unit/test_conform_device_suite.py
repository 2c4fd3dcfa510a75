"""The device suite's own rules, in process: the MTU rule the suite's frames obey (virtio 1.2
§5.1.4.1), dependency findings in §5.1.3.1's words, reserved-bit warnings and ``--strict``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from virtwire.conform.context import Context, MtuRuleBroken, guard_tx, test_frame
from virtwire.conform.suite import run_suite
from virtwire.conform.targets import Target
from virtwire.conform.targets_local import LocalTarget
from virtwire.virtio import spec as s


@pytest.mark.parametrize("enforce", [True, False])
def test_frame_checks_stay_within_the_negotiated_mtu(enforce: bool) -> None:
    """frames.sizes and offload.tx_csum against a device that drops non-GSO frames above
    mtu + 14 (as §5.1.4.1 allows): they pass, and no oversized non-GSO frame ever left the
    driver (before the fix: 1518..65535 B and 8000/30000 B payloads went out with MTU on)."""
    with LocalTarget("mtu=1500", enforce_mtu=enforce) as t:
        rep = run_suite(t, ["frames.sizes", "offload.tx_csum", "frames.bulk"])
        st = {c["id"]: c for c in rep["checks"]}
        assert {k: v["status"] for k, v in st.items()} == {
            "frames.bulk": "pass", "frames.sizes": "pass", "offload.tx_csum": "pass"}
        assert t.peer is not None and t.peer.oversized == []
        # the report says how large frames were sent
        assert "did not negotiate MTU" in st["frames.sizes"]["detail"]
        assert "mtu 1500" in st["frames.sizes"]["detail"]
        assert "did not negotiate MTU" in st["offload.tx_csum"]["detail"]


def test_without_mtu_offered_large_frames_need_no_second_driver() -> None:
    with LocalTarget("") as t:
        rep = run_suite(t, ["frames.sizes"])
        c = rep["checks"][0]
        assert c["status"] == "pass" and "not negotiated (not offered)" in c["detail"]


def test_guard_refuses_oversized_non_gso_frames() -> None:
    with LocalTarget("mtu=1000") as t:
        ctx = Context(t)
        drv = ctx.driver()
        assert drv.mtu == 1000
        guard_tx(drv, [test_frame(ctx.rnd, 1014)])
        with pytest.raises(MtuRuleBroken, match="5.1.4.1"):
            guard_tx(drv, [test_frame(ctx.rnd, 1015)])
        guard_tx(drv, [test_frame(ctx.rnd, 5000)], gso_type=s.VIRTIO_NET_HDR_GSO_TCPV4)
        with pytest.raises(MtuRuleBroken):
            ctx.exchange(drv, [1500])
        assert all(n <= 1014 for n in ctx.rand_sizes(drv, 200))
        assert ctx.driver_without_mtu().has(s.VIRTIO_NET_F_MTU) is False


class _Offer(Target):
    """A target that only shows a feature word (no data path)."""

    has_peer = False

    def __init__(self, offered: int, raw: bool = True) -> None:
        self.offered = offered
        self.raw = raw
        self.name = "offer"

    def driver(self, cfg: Any = None, probe: bool = True) -> Any:
        return SimpleNamespace(offered=self.offered, has=lambda b: bool(self.offered >> b & 1))

    def backend_offered(self) -> int | None:
        return self.offered if self.raw else None


def _one(t: Target, cid: str, strict: bool = False) -> dict[str, Any]:
    return run_suite(t, [cid], strict=strict)["checks"][0]


def test_dependencies_quote_the_clause() -> None:
    # DPDK's vhost PMD: HOST_ECN with CSUM but without HOST_TSO4/TSO6
    c = _one(_Offer(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_CSUM, s.VIRTIO_NET_F_HOST_ECN)),
             "features.dependencies")
    assert c["status"] == "fail"
    assert c["detail"].startswith('§5.1.3.1 "VIRTIO_NET_F_HOST_ECN Requires '
                                  'VIRTIO_NET_F_HOST_TSO4 or VIRTIO_NET_F_HOST_TSO6"')
    assert "CSUM" not in c["detail"]


def test_transitive_gap_is_a_note_not_a_finding_against_the_first_bit() -> None:
    c = _one(_Offer(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_HOST_ECN,
                          s.VIRTIO_NET_F_HOST_TSO4), raw=False), "features.dependencies")
    assert c["status"] == "fail"  # HOST_TSO4 really lacks CSUM
    fails = c["detail"].split(" (notes:")[0]
    assert fails == ('§5.1.3.1 "VIRTIO_NET_F_HOST_TSO4 Requires VIRTIO_NET_F_CSUM": offered '
                     'without VIRTIO_NET_F_CSUM')
    assert c["data"]["notes"] == ["VIRTIO_NET_F_HOST_ECN needs VIRTIO_NET_F_CSUM only "
                                  "transitively (through its direct requirements): not offered"]
    ok = _one(_Offer(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_HOST_ECN, s.VIRTIO_NET_F_CSUM,
                           s.VIRTIO_NET_F_HOST_TSO6)), "features.dependencies")
    assert ok["status"] == "pass" and ok["data"]["notes"] == []


@pytest.mark.parametrize(("extra", "words"), [
    (s.VIRTIO_NET_F_GSO, "VIRTIO_NET_F_GSO (legacy interface only"),
    (26, "VHOST_F_LOG_ALL"),
    (30, "bit 30"),
    (45, "41 to 49 are reserved"),
])
def test_reserved_and_legacy_bits_warn_and_fail_under_strict(extra: int, words: str) -> None:
    t = _Offer(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_MAC, extra))
    c = _one(t, "features.reserved_bits")
    assert c["status"] == "warn" and words in c["detail"]
    c = _one(t, "features.reserved_bits", strict=True)
    assert c["status"] == "fail" and c["detail"].startswith("[strict: SHOULD]")
    clean = _one(_Offer(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_MAC)), "features.reserved_bits")
    assert clean["status"] == "pass"


def test_local_target_is_clean() -> None:
    with LocalTarget() as t:
        rep = run_suite(t)
    bad = {c["id"]: c["detail"] for c in rep["checks"] if c["status"] in ("fail", "warn")}
    assert bad == {}


def test_target_names() -> None:
    from virtwire.conform.catalog import make_target
    from virtwire.errors import CliError

    t = make_target("vhost-user:/tmp/x.sock,mode=client,loopback", mtu=9000)
    got = (t.path, t.listen, t.mtu, t.loopback)  # type: ignore[attr-defined]
    assert got == ("/tmp/x.sock", True, 9000, True)
    assert t.name == "vhost-user:/tmp/x.sock,loopback,mode=client"
    t = make_target("vhost-user:/tmp/x.sock")
    assert (t.listen, t.mtu, t.has_peer) == (False, 1500, False)  # type: ignore[attr-defined]
    assert make_target("local:mtu=9000").name == "local:mtu=9000"
    for bad, words in (("vhost-user:/x,mode=both", "server or client"),
                       ("vhost-user:/x,speed=1", "unknown option"), ("nosuch", "unknown"),
                       ("local:mtu=5", "68..65535")):
        with pytest.raises(CliError, match=words):
            make_target(bad)
    with pytest.raises(CliError, match="--mtu 20"):
        make_target("dpdk", mtu=20)


def test_cli_driver_suite_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from virtwire.cli import main

    assert main(["conform", "--driver", "virtwire", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["suite"] == "driver" and rep["summary"]["fail"] == 0
    assert main(["conform", "--driver", "nosuch"]) == 2
    assert "unknown driver 'nosuch'" in capsys.readouterr().err
    assert main(["conform", "local", "--only", "features", "--strict", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["strict"] is True and rep["summary"]["pass"] == 4


def test_config_fields_that_change_at_features_ok_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device whose mtu reads differently before FEATURES_OK (§2.5.1, §3.1.1)."""
    from virtwire.virtio.pair import LocalNetTransport

    real = LocalNetTransport.read_config

    def early_mtu(self: LocalNetTransport, off: int, n: int) -> bytes:
        data = real(self, off, n)
        if off == 10 and not self.get_status() & s.VIRTIO_CONFIG_S_FEATURES_OK:
            return (9000).to_bytes(2, "little")
        return data
    with LocalTarget() as t:
        assert _one(t, "config.before_features_ok")["status"] == "pass"
        monkeypatch.setattr(LocalNetTransport, "read_config", early_mtu)
        c = _one(t, "config.before_features_ok")
    assert c["status"] == "fail" and "mtu 9000 before, 1500 after" in c["detail"]


def test_num_buffers_wrong_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that reports num_buffers 1 for a frame spanning several buffers: the driver
    reads a truncated frame (or refuses it), and used.num_buffers fails."""
    from virtwire.net.rx import Receive

    real = Receive._write_num_buffers

    def one_buffer(views: list[memoryview], used: int, hl: int, vnet: bool) -> None:
        real(views, 1, hl, vnet)
    with LocalTarget() as t:
        assert _one(t, "used.num_buffers")["status"] == "pass"
        monkeypatch.setattr(Receive, "_write_num_buffers", staticmethod(one_buffer))
        c = _one(t, "used.num_buffers")
    assert c["status"] == "fail", c
