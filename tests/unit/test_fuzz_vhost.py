"""A bounded CI slice of ``virtwire fuzz --target vhost-user`` (issue 14)."""

from __future__ import annotations

import random

from virtwire.hosts.vhost_fuzz import build_case, fuzz
from virtwire.hosts.vhost_user_proto import VhostUserRequest as R


def test_a_bounded_slice_finds_nothing_and_covers_the_back_end() -> None:
    report = fuzz(300, 25.0, seed=14)
    assert report.failures == []
    assert report.cases >= 100
    assert report.lines > 1000  # hosts, net, virtio and memory lines reached
    assert report.corpus > 5


def test_cases_start_rings_and_shrink_memory() -> None:
    rng = random.Random(3)
    kinds = {s.kind for _ in range(50) for s in build_case(rng)}
    assert {"msg", "poke", "kick", "truncate", "raw"} <= kinds
    requests = {s.request for s in build_case(random.Random(5)) if s.kind == "msg"}
    assert {R.SET_MEM_TABLE, R.SET_VRING_KICK} <= requests



def test_a_bounded_pci_proxy_slice_finds_nothing() -> None:
    from virtwire.hosts.proxy_fuzz import fuzz as proxy_fuzz

    report = proxy_fuzz(60, 20.0, seed=14)
    assert report.failures == []
    assert report.cases >= 5
    assert report.lines > 500


def test_a_bounded_net_slice_agrees_and_reaches_c() -> None:
    from virtwire.net import native
    from virtwire.net.fuzz import fuzz as net_fuzz

    report = net_fuzz(300, 20.0, seed=14)
    assert report.failures == []
    assert report.cases == 300 and report.frames > 1000
    if native.load() is not None:
        assert report.native_cases >= 200
