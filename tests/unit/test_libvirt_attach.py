"""``virtwire libvirt attach`` (the pure edit) and ``virtwire libvirt domain``, offline.

The libvirt API half (define with validation, a real libvirtd, ``virsh start``) is in
tests/system/test_libvirt_domain.py.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET

import pytest

from virtwire.cli import main
from virtwire.config import parse_port
from virtwire.errors import UserFacingError
from virtwire.libvirt.attach import AttachRefused, plan_attach
from virtwire.libvirt.check import QEMU_NS, check_domain
from virtwire.libvirt.domain import guest_domain

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_libvirt_check import BARE, GOOD  # noqa: E402

Q = f"{{{QEMU_NS}}}"


def _vhost_ifaces(root: ET.Element) -> list[ET.Element]:
    return root.findall("./devices/interface[@type='vhostuser']")


def test_bare_tcg_domain_gets_everything_it_needs():
    root = ET.fromstring(BARE)
    assert not check_domain(root, check_paths=False).ok
    alias, changes = plan_attach(root, parse_port("vhost-user,path=/run/vw0.sock"))
    assert alias == "ua-vw0"
    text = "\n".join(changes)
    assert "memoryBacking: source=memfd, access=shared (was none)" in text
    assert "features/acpi: added" in text
    assert "vectors=0" in text and "(added)" in text
    rep = check_domain(root, check_paths=False)
    assert rep.ok, rep.table()
    # The disk and console of the original domain are kept.
    assert root.find("./devices/disk/source").get("file") == "/var/lib/vwl.qcow2"
    assert root.find("./devices/console") is not None


def test_kvm_domain_gets_no_override():
    root = ET.fromstring(BARE.replace("type='qemu'", "type='kvm'", 1))
    _, changes = plan_attach(root, parse_port("vhost-user,path=/run/vw0.sock"))
    assert root.find(f"{Q}override") is None
    assert not any("vectors" in c for c in changes)
    assert check_domain(root, check_paths=False).ok


def test_attach_twice_on_one_socket_replaces_the_nic():
    root = ET.fromstring(GOOD.format(sock="/run/vw0.sock"))
    alias, changes = plan_attach(root, parse_port("vhost-user,path=/run/vw0.sock,queues=4"))
    assert alias == "ua-vw0"  # the replaced NIC's alias is kept
    assert "replaced" in changes[-2]
    ifaces = _vhost_ifaces(root)
    assert len(ifaces) == 1 and ifaces[0].find("driver").get("queues") == "4"
    devs = root.findall(f"{Q}override/{Q}device")
    assert [d.get("alias") for d in devs] == ["ua-vw0"]
    # Nothing about memory or ACPI changed: GOOD had both.
    assert not any(c.startswith(("memoryBacking", "features")) for c in changes)


def test_second_socket_gets_the_next_free_alias():
    root = ET.fromstring(GOOD.format(sock="/run/vw0.sock"))
    alias, _ = plan_attach(root, parse_port("vhost-user,path=/run/vw1.sock,mac=52:54:00:00:00:02"))
    assert alias == "ua-vw1"
    assert len(_vhost_ifaces(root)) == 2
    assert sorted(d.get("alias") for d in root.findall(f"{Q}override/{Q}device")) == \
        ["ua-vw0", "ua-vw1"]
    assert check_domain(root, check_paths=False).ok


def test_alias_taken_or_bad_is_refused():
    root = ET.fromstring(GOOD.format(sock="/run/vw0.sock"))
    with pytest.raises(UserFacingError, match="taken"):
        plan_attach(root, parse_port("vhost-user,path=/run/vw1.sock"), "ua-vw0")
    with pytest.raises(UserFacingError, match="'ua-' then"):
        plan_attach(root, parse_port("vhost-user,path=/run/vw1.sock"), "net0")


def test_numa_private_memory_still_cannot_work():
    xml = BARE.replace("<vcpu>1</vcpu>", "<vcpu>1</vcpu><cpu><numa><cell id='0' cpus='0' "
                       "memory='512' unit='MiB' memAccess='private'/></numa></cpu>")
    root = ET.fromstring(xml)
    plan_attach(root, parse_port("vhost-user,path=/run/vw0.sock"))
    rep = check_domain(root, check_paths=False)
    assert not rep.ok
    err = AttachRefused(rep)
    assert "memAccess" in str(err) and "nothing saved" in str(err)


def test_qemu_listens_mode_server_without_reconnect():
    root = ET.fromstring(BARE)
    plan_attach(root, parse_port("vhost-user,path=/run/vw0.sock,server=off"))
    src = _vhost_ifaces(root)[0].find("source")
    assert src.get("mode") == "server" and src.find("reconnect") is None


def test_guest_domain_shape():
    dom = guest_domain("vwl-a", "/img/vmlinuz", "/img/initrd", memory_mib=300, ip="10.0.0.2/24",
                       console_socket="/tmp/c.sock")
    assert dom.get("type") == "qemu"
    assert dom.findtext("memory") == "300"
    assert "vw.ip=10.0.0.2/24" in dom.findtext("os/cmdline")
    assert dom.find("devices/serial").get("type") == "unix"
    assert dom.find("devices/serial/source").get("mode") == "connect"
    assert dom.findtext("on_poweroff") == "destroy"
    pty = guest_domain("vwl-a", "/img/vmlinuz", "/img/initrd", kvm=True)
    assert pty.get("type") == "kvm" and pty.find("devices/console").get("type") == "pty"


@pytest.mark.parametrize("kw", [{"name": "bad name"}, {"memory_mib": 1}, {"ip": "10.0.0.2"},
                                {"console_socket": "rel/path"}, {"cmdline_extra": "a'b"}])
def test_guest_domain_refuses_bad_values(kw):
    args = {"name": "vwl-a", "kernel": "/k", "initrd": "/i", **kw}
    name, kernel, initrd = args.pop("name"), args.pop("kernel"), args.pop("initrd")
    with pytest.raises(UserFacingError):
        guest_domain(name, kernel, initrd, **args)


def test_cli_attach_without_libvirtd_is_one_line(capsys):
    rc = main(["libvirt", "attach", "vwl-x", "--port", "vhost-user,path=/tmp/vwl-x.sock",
               "-c", "qemu:///system?socket=/nonexistent/vwl/libvirt-sock"])
    err = capsys.readouterr().err
    assert rc != 0
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
    assert "cannot connect" in err


def test_serve_prints_the_same_parts_as_libvirt_interface(capsys):
    """``virtwire serve``'s libvirt snippet carries the alias and the TCG override, and the
    ``attach --port`` it suggests describes the same NIC."""
    import json

    from virtwire import serve
    from virtwire.commands import serve as serve_cmd
    from virtwire.libvirt.check import interface_snippet

    cfg = parse_port("vhost-user,path=/tmp/vwl-s.sock,backend=null,queues=2,mac=52:54:00:00:00:07")
    capsys.readouterr()
    serve_cmd._print_snippets([cfg], "/tmp/vwl-s.sock.ctl", False, False, serve)
    out = capsys.readouterr().out
    assert interface_snippet(cfg, "ua-vw0") in out
    assert "<alias name=\"ua-vw0\" />" in out and "name=\"vectors\"" in out
    spec = out.split("virtwire libvirt attach DOMAIN --port ", 1)[1].split(")", 1)[0]
    again = parse_port(spec)
    assert (again.path, again.server, again.queues, again.mac) == \
        (cfg.path, cfg.server, cfg.queues, cfg.mac)
    serve_cmd._print_snippets([cfg], "/tmp/vwl-s.sock.ctl", True, True, serve)
    data = json.loads(capsys.readouterr().out)
    assert "ua-vw0" in data["ports"][0]["libvirt"] and "vectors" not in data["ports"][0]["libvirt"]


def test_port_read_from_a_running_serve(tmp_path, capsys):
    """A running serve's port socket is enough: its settings come from the control socket, which
    every port reaches through PORT_PATH.ctl (the second port's is a link to the first's)."""
    import os

    from virtwire.libvirt.attach import port_config
    from virtwire.serve import build

    p0, p1 = str(tmp_path / "p0.sock"), str(tmp_path / "p1.sock")
    srv = build([parse_port(f"vhost-user,path={p0},backend=null"),
                 parse_port(f"vhost-user,path={p1},backend=null,queues=2,server=off,"
                            "mac=52:54:00:00:00:09")])
    # (server=off ports connect out when the loop runs; nothing runs it here)
    srv.start(p0 + ".ctl")
    import threading

    srv.loop.call_every(0.02, lambda: None)
    t = threading.Thread(target=srv.loop.run, daemon=True)
    t.start()
    try:
        assert os.path.islink(p1 + ".ctl")
        cfg = port_config(p1)
        assert (cfg.path, cfg.server, cfg.queues, cfg.mac) == (p1, False, 2, "52:54:00:00:00:09")
        assert port_config(p0).server is True
        capsys.readouterr()
        assert main(["libvirt", "interface", p1, "--kvm"]) == 0
        out = capsys.readouterr().out
        assert f"path=\"{p1}\" mode=\"server\"" in out and "<driver queues=\"2\" />" in out
        assert "52:54:00:00:00:09" in out
        assert main(["stats", p1, "--compact"]) == 0
        assert len(json.loads(capsys.readouterr().out)["ports"]) == 2
    finally:
        srv.loop.stop()
        t.join(5)
        srv.close()
    assert not os.path.lexists(p1 + ".ctl")
    with pytest.raises(UserFacingError, match="no virtwire serve runs there"):
        port_config(p1)
    with pytest.raises(UserFacingError, match="absolute"):
        port_config("p1.sock")


def test_detach_removes_the_nic_and_its_override_only():
    from virtwire.libvirt.attach import plan_detach

    root = ET.fromstring(GOOD.format(sock="/run/vw0.sock"))
    plan_attach(root, parse_port("vhost-user,path=/run/vw1.sock,mac=52:54:00:00:00:02"))
    changes = plan_detach(root, "52:54:00:00:00:02")
    assert changes == ["devices/interface ua-vw1: removed (/run/vw1.sock)",
                       "qemu:override ua-vw1: removed"]
    assert [d.get("alias") for d in root.findall(f"{Q}override/{Q}device")] == ["ua-vw0"]
    plan_detach(root, "/run/vw0.sock")
    assert _vhost_ifaces(root) == [] and root.find(f"{Q}override") is None
    assert root.find("memoryBacking") is not None and root.find("features/acpi") is not None
    with pytest.raises(UserFacingError, match="no vhostuser interface"):
        plan_detach(root, "ua-vw0")
