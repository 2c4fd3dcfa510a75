"""``--port`` parsing and the attachment snippets ``virtwire serve`` prints."""

from __future__ import annotations

import pytest

from virtwire.config import parse_port
from virtwire.errors import CliError
from virtwire.guest.nics import NicContext, parse_nic_spec
from virtwire.serve import libvirt_xml, qemu_args


def test_port_parsing_defaults_and_switches():
    c = parse_port("vhost-user,path=/tmp/a.sock,backend=tap,ifname=vwvt0,queues=2,"
                   "mrg_rxbuf=off,packed=on")
    assert (c.path, c.server, c.backend, c.ifname, c.queues) == ("/tmp/a.sock", True, "tap",
                                                               "vwvt0", 2)
    assert c.features == {"mrg_rxbuf": False, "packed": True}
    n = parse_port("vhost-user,path=/x,backend=null,server=off")
    assert n.backend == "null" and not n.server and n.ifname is None


@pytest.mark.parametrize("text,reason", [
    ("tap,path=/x", "expected 'vhost-user"),
    ("vhost-user,backend=null", "missing path"),
    ("vhost-user,path=/x,bogus=1", "unknown key"),
    ("vhost-user,path=/x,queues=0", "expected 1..64"),
    ("vhost-user,path=/x,queues=two", "not a number"),
    ("vhost-user,path=/x,mrg_rxbuf=maybe", "expected on or off"),
    ("vhost-user,path=/x,backend=tap,ifname=waytoolonginterfacename", "1-15 characters"),
    ("vhost-user,path=/x,backend=null,ifname=t0", "needs backend=tap"),
    ("vhost-user,path=/x,mac=01:00:00:00:00:01", "unicast"),
    ("vhost-user,path=/x,queue_size=1000", "power of 2"),
    ("vhost-user,path=/x,queues=2,mq=off", "needs mq=on"),
])
def test_port_parsing_refuses_bad_values(text, reason):
    with pytest.raises(CliError, match=reason):
        parse_port(text)


def test_qemu_args_and_libvirt_xml():
    c = parse_port("vhost-user,path=/run/vw0.sock,backend=null,queues=2,mrg_rxbuf=off")
    args = qemu_args(c, 0)
    joined = " ".join(args)
    assert "memory-backend-memfd,id=mem,size=1G,share=on" in joined
    assert "socket,id=vwchr0,path=/run/vw0.sock,reconnect=1" in joined
    assert "vhost-user,id=vwnet0,chardev=vwchr0,queues=2" in joined
    assert "mq=on" in joined and "mrg_rxbuf=off" in joined and "vectors=0" in joined
    assert "vectors=6" in " ".join(qemu_args(c, 0, tcg=False))
    xml = libvirt_xml(c)
    assert "<interface type='vhostuser'>" in xml and "mode='client'" in xml
    assert "<driver queues='2'/>" in xml and "<reconnect enabled='yes'" in xml


def test_vhost_user_nic_kind_builds_qemu_args(tmp_path):
    spec = parse_nic_spec("vhost-user,socket=/tmp/vwv.sock,queues=2,packed=on")
    from virtwire.guest.nics import get_nic_kind

    ctx = NicContext(index=0, id="net0", mac="52:54:00:00:00:01", tmpdir=tmp_path, accel="tcg",
                     vm_name="vwv", netns=None, qtest_path=tmp_path / "q")
    plan = get_nic_kind("vhost-user").builder(spec, ctx)
    joined = " ".join(plan.qemu_args)
    assert "socket,id=net0c,path=/tmp/vwv.sock,reconnect=1" in joined
    assert "vhost-user,id=net0,chardev=net0c,queues=2" in joined
    assert "mq=on" in joined and "packed=on" in joined and "vectors=0" in joined
    assert plan.start is None  # no serve= -> no sidecar
    with pytest.raises(CliError, match="serve="):
        get_nic_kind("vhost-user").builder(
            parse_nic_spec("vhost-user,serve=bogus"), ctx)


def test_serve_cli_errors_are_one_line(capsys, tmp_path):
    from virtwire.cli import main

    assert main(["serve", "-q", "--port", f"vhost-user,path={tmp_path}/no/dir/x.sock,"
                 "backend=null"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot listen on" in err and "Traceback" not in err
    assert main(["serve"]) == 2
    assert main(["serve", "--port", "vhost-user,path=/x,queues=99"]) == 2
    assert main(["stats", str(tmp_path / "none.ctl")]) == 1
    assert "cannot read counters" in capsys.readouterr().err
