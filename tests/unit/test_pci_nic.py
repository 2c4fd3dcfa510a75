"""The ``pci`` NIC kind: option checks and the QEMU arguments of its plan (no QEMU started)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtwire.errors import CliError
from virtwire.guest import nics
from virtwire.guest.nic_pci import build_pci_nic


def ctx(accel: str = "tcg") -> nics.NicContext:
    return nics.NicContext(index=0, id="net0", mac="52:54:00:12:34:56", tmpdir=Path("/tmp"),
                           accel=accel, vm_name="vwx", netns=None,
                           qtest_path=Path("/tmp/vwx-qtest.sock"))


def test_options_are_checked_at_parse_time():
    spec = nics.parse_nic_spec("pci,backend=tap,ifname=vwx0,transitional=on,packed=off")
    assert spec.kind == "pci" and spec.options["transitional"] == "on"
    for bad, words in [("pci,backend=vhost", "expected tap or null"),
                       ("pci,transitional=maybe", "expected on or off"),
                       ("pci,queue_size=0", "1..32768"),
                       ("pci,ifname=a/b", "bad TAP name"),
                       ("pci,mrg_rxbuf=sometimes", "expected on or off"),
                       ("pci,bogus=1", "unknown key")]:
        with pytest.raises(CliError, match=words):
            nics.parse_nic_spec(bad)


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_plan_hands_qemu_one_socket_end(accel):
    plan = build_pci_nic(nics.parse_nic_spec("pci,backend=null"), ctx(accel))
    try:
        (fd,) = plan.pass_fds
        assert plan.qemu_args == ["-device", f"x-pci-proxy-dev,id=net0,fd={fd}"]
        assert os.get_inheritable(fd)
        assert plan.needs_qtest == (accel == "tcg")  # INTx over qtest only under TCG
    finally:
        plan.stop()  # without start: closes both ends
    with pytest.raises(OSError):
        os.fstat(fd)


def test_sidecar_starts_and_stops_cleanly_without_qemu():
    base = len(os.listdir("/proc/self/fd"))
    plan = build_pci_nic(nics.parse_nic_spec("pci,backend=null"), ctx())
    assert plan.start is not None and plan.stop is not None
    plan.start()
    plan.stop()
    assert len(os.listdir("/proc/self/fd")) == base  # sockets, eventfds, loop: all closed
