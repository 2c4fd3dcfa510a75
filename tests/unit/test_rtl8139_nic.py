"""The ``rtl8139`` NIC kind: option checks and its plan (the PCI proxy path, no QEMU started)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtwire.errors import CliError
from virtwire.guest import nics
from virtwire.guest.nic_rtl8139 import build_rtl8139_nic
from virtwire.rtl8139.cplus import Rtl8139CPlus
from virtwire.rtl8139.pci import Rtl8139Pci


def ctx() -> nics.NicContext:
    return nics.NicContext(index=0, id="net0", mac="52:54:00:12:34:56", tmpdir=Path("/tmp"),
                           accel="tcg", vm_name="vwr", netns=None,
                           qtest_path=Path("/tmp/vwr-qtest.sock"))


def test_kind_is_found_and_options_are_checked():
    spec = nics.parse_nic_spec("rtl8139,backend=tap,ifname=vwr0,revision=0x20")
    assert spec.kind == "rtl8139" and spec.options["revision"] == "0x20"
    assert "rtl8139" in nics.nic_kinds()
    for bad, words in [("rtl8139,backend=vhost", "expected tap or null"),
                       ("rtl8139,revision=0x30", "expected 0x10 or 0x20"),
                       ("rtl8139,revision=abc", "expected 0x10 or 0x20"),
                       ("rtl8139,ifname=a/b", "bad TAP name"),
                       ("rtl8139,queue_size=8", "unknown key")]:
        with pytest.raises(CliError, match=words):
            nics.parse_nic_spec(bad)


@pytest.mark.parametrize("revision", ["0x10", "0x20"])
def test_sidecar_serves_an_rtl8139_pci_function(revision):
    c = ctx()
    plan = build_rtl8139_nic(nics.parse_nic_spec(f"rtl8139,backend=null,revision={revision}"), c)
    (fd,) = plan.pass_fds
    assert plan.qemu_args == ["-device", f"x-pci-proxy-dev,id=net0,fd={fd}"]
    assert plan.needs_qtest  # INTx through qtest under TCG, as for --net pci
    kvm = build_rtl8139_nic(nics.parse_nic_spec(f"rtl8139,backend=null,revision={revision}"),
                            nics.NicContext(**{**c.__dict__, "accel": "kvm"}))
    kvm.start()
    try:

        class VM:
            pci_proxy = None

        vm = VM()
        assert kvm.after_launch is not None
        kvm.after_launch(vm)
        pci = vm.pci_proxy.transport
        assert isinstance(pci, Rtl8139Pci) and pci.model.revision == int(revision, 16)
        assert pci.device.mac == bytes.fromhex("525400123456")
        # after_launch closed QEMU's end (no QEMU here): the sidecar sees EOF and stops
        assert vm.pci_proxy.stopped.wait(5)
    finally:
        kvm.stop()
        plan.stop()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_pci_function_shape():
    from virtwire.backends.null import NullBackend
    from virtwire.rtl8139.pci import Rtl8139Nic

    for rev, cls in ((0x10, "Rtl8139"), (0x20, "Rtl8139CPlus")):
        nic = Rtl8139Nic(NullBackend(), mac=bytes(6), revision=rev)
        pci = Rtl8139Pci(nic)
        assert type(nic.model).__name__ == cls
        assert pci.config_read(8, 1) == rev
        assert isinstance(nic.model, Rtl8139CPlus) == (rev == 0x20)
    with pytest.raises(ValueError):
        Rtl8139Nic(NullBackend(), mac=bytes(6), revision=0x30)
