"""``virtwire libvirt check`` / ``interface``: domain XML checked element by element, offline."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import xml.etree.ElementTree as ET

import pytest

from virtwire.cli import main
from virtwire.libvirt.check import QEMU_NS, check_domain

# A realistic full TCG domain (as `virsh dumpxml` prints one): disks, graphics, consoles, a
# vhost-user NIC set up the way virtwire needs. {sock} is the back end's socket path.
GOOD = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vwl-guest</name>
  <uuid>5b4c2a7e-1f0d-4c8e-9a55-3c1d2e6f7a80</uuid>
  <memory unit='KiB'>1048576</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/vwl-guest.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci'/>
    <controller type='pci' index='0' model='pcie-root'/>
    <interface type='vhostuser'>
      <mac address='52:54:00:12:34:56'/>
      <source type='unix' path='{sock}' mode='client'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <model type='virtio'/>
      <driver queues='2'/>
      <alias name='ua-vw0'/>
    </interface>
    <serial type='pty'>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <input type='tablet' bus='usb'/>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <video>
      <model type='virtio' heads='1' primary='yes'/>
    </video>
    <memballoon model='virtio'/>
  </devices>
  <qemu:override>
    <qemu:device alias='ua-vw0'>
      <qemu:frontend>
        <qemu:property name='vectors' type='unsigned' value='0'/>
      </qemu:frontend>
    </qemu:device>
  </qemu:override>
</domain>
"""


@pytest.fixture
def sock():
    """A listening UNIX socket, as `virtwire serve` (the server side) leaves one."""
    d = tempfile.mkdtemp(prefix="vwl-lv-")
    path = os.path.join(d, "vw0.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(4)
    try:
        yield path
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "domain.xml"
    p.write_text(text)
    return str(p)


def _run_check(path: str, capsys) -> tuple[int, dict]:
    rc = main(["libvirt", "check", "--json", path])
    return rc, json.loads(capsys.readouterr().out)


def _errors(report: dict) -> list[dict]:
    return [f for f in report["findings"] if f["status"] == "error"]


def test_good_full_domain_passes(tmp_path, sock, capsys):
    rc, rep = _run_check(_write(tmp_path, GOOD.format(sock=sock)), capsys)
    assert rc == 0, _errors(rep)
    assert rep["ok"] is True and rep["type"] == "qemu" and rep["domain"] == "vwl-guest"
    elements = {f["element"] for f in rep["findings"]}
    for e in ("memoryBacking/access", "memoryBacking/source", "features/acpi",
              "interface[0](ua-vw0)/source", "interface[0](ua-vw0)/source/path",
              "interface[0](ua-vw0)/model", "interface[0](ua-vw0)/driver",
              "interface[0](ua-vw0)/source/reconnect", "interface[0](ua-vw0)/qemu:override"):
        assert e in elements
    # The people's table says the same.
    assert main(["libvirt", "check", _write(tmp_path, GOOD.format(sock=sock))]) == 0
    out = capsys.readouterr().out
    assert "result: OK" in out and "queues=2" in out


# (name, edit of the good XML, the element reported, a word of its fix)
BROKEN = [
    ("no shared memory", lambda x: x.replace("<access mode='shared'/>", ""),
     "memoryBacking/access", "<access mode='shared'/>"),
    ("private memory", lambda x: x.replace("mode='shared'", "mode='private'"),
     "memoryBacking/access", "<access mode='shared'/>"),
    ("anonymous memory", lambda x: x.replace("type='memfd'", "type='anonymous'"),
     "memoryBacking/source", "memfd"),
    ("no ACPI", lambda x: x.replace("<acpi/>", ""), "features/acpi", "<acpi/>"),
    ("no vectors=0 under TCG",
     lambda x: x[:x.index("<qemu:override>")] + x[x.index("</qemu:override>") + 16:],
     "interface[0](ua-vw0)/qemu:override", "name='vectors' type='unsigned' value='0'"),
    ("override on another alias", lambda x: x.replace("<qemu:device alias='ua-vw0'>",
                                                      "<qemu:device alias='ua-other'>"),
     "interface[0](ua-vw0)/qemu:override", "alias='ua-vw0'"),
    ("vectors not 0", lambda x: x.replace("value='0'", "value='4'"),
     "interface[0](ua-vw0)/qemu:override", "value='0'"),
    ("no alias under TCG", lambda x: x.replace("<alias name='ua-vw0'/>", ""),
     "interface[0]/alias", "<alias name='ua-"),
    ("not a virtio model", lambda x: x.replace("<model type='virtio'/>", "<model type='e1000'/>"),
     "interface[0](ua-vw0)/model", "<model type='virtio'/>"),
    ("bad queues", lambda x: x.replace("queues='2'", "queues='zero'"),
     "interface[0](ua-vw0)/driver", "queues"),
    ("no vhostuser interface", lambda x: x.replace("type='vhostuser'", "type='network'"),
     "devices/interface", "virtwire libvirt interface"),
]


@pytest.mark.parametrize("name,edit,element,fix", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_domain_names_problem_and_fix(tmp_path, sock, capsys, name, edit, element, fix):
    text = edit(GOOD.format(sock=sock))
    assert text != GOOD.format(sock=sock)
    rc, rep = _run_check(_write(tmp_path, text), capsys)
    assert rc == 1 and rep["ok"] is False
    errs = {f["element"]: f for f in _errors(rep)}
    assert element in errs, errs
    assert fix in errs[element]["fix"]
    # The table shows the fix too.
    assert main(["libvirt", "check", _write(tmp_path, text)]) == 1
    out = capsys.readouterr().out
    assert "CANNOT WORK" in out and "fix: " in out and element in out


def test_socket_path_missing(tmp_path, capsys):
    missing = str(tmp_path / "vwl-nothing.sock")
    rc, rep = _run_check(_write(tmp_path, GOOD.format(sock=missing)), capsys)
    assert rc == 1
    errs = {f["element"]: f for f in _errors(rep)}
    f = errs["interface[0](ua-vw0)/source/path"]
    assert "does not exist" in f["message"] and f"path={missing}" in f["fix"]
    # --no-path-check: the XML alone is fine.
    assert main(["libvirt", "check", "--no-path-check", _write(tmp_path, GOOD.format(
        sock=missing))]) == 0


def test_path_not_a_socket(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.write_text("x")
    rc, rep = _run_check(_write(tmp_path, GOOD.format(sock=plain)), capsys)
    assert rc == 1
    assert any("not a socket" in f["message"] for f in _errors(rep))


def test_wrong_socket_mode(tmp_path, sock, capsys):
    # virtwire serve already listens (server=on), so QEMU must be the client.
    text = GOOD.format(sock=sock).replace("mode='client'>", "mode='server'>")
    rc, rep = _run_check(_write(tmp_path, text), capsys)
    assert rc == 1
    f = {f["element"]: f for f in _errors(rep)}["interface[0](ua-vw0)/source/path"]
    assert "wrong mode" in f["message"] and "mode='client'" in f["fix"]
    # An unknown mode is named as well.
    text = GOOD.format(sock=sock).replace("mode='client'>", "mode='both'>")
    rc, rep = _run_check(_write(tmp_path, text), capsys)
    assert rc == 1
    assert "mode='client'" in {f["element"]: f for f in _errors(rep)}[
        "interface[0](ua-vw0)/source"]["fix"]


def test_client_without_reconnect_warns(tmp_path, sock, capsys):
    text = GOOD.format(sock=sock).replace("<reconnect enabled='yes' timeout='1'/>", "")
    rc, rep = _run_check(_write(tmp_path, text), capsys)
    assert rc == 0
    warns = [f for f in rep["findings"] if f["status"] == "warn"]
    assert warns and "reconnect" in warns[0]["fix"]


def test_numa_cells_shared_memory(sock):
    text = GOOD.format(sock=sock).replace("<access mode='shared'/>", "").replace(
        "</cpu>", "<numa><cell id='0' cpus='0-1' memory='1048576' unit='KiB' "
                  "memAccess='shared'/></numa></cpu>")
    assert check_domain(ET.fromstring(text)).ok
    private = text.replace("memAccess='shared'", "memAccess='private'").replace(
        "<source type='memfd'/>", "<source type='memfd'/><access mode='shared'/>")
    rep = check_domain(ET.fromstring(private))
    assert not rep.ok
    assert any(f.element == "cpu/numa/cell" for f in rep.findings if f.status == "error")


def test_kvm_domain_needs_no_override(sock):
    text = GOOD.format(sock=sock).replace("<domain type='qemu'", "<domain type='kvm'")
    text = text[:text.index("<qemu:override>")] + text[text.index("</qemu:override>") + 16:]
    rep = check_domain(ET.fromstring(text))
    assert rep.ok, rep.table()
    assert not any("override" in f.element for f in rep.findings)


@pytest.mark.parametrize("content,word", [(None, "cannot read"), ("<domain><name>", "not XML"),
                                          ("<network/>", "not <domain>")])
def test_unreadable_file_one_line_error(tmp_path, capsys, content, word):
    path = tmp_path / "d.xml"
    if content is not None:
        path.write_text(content)
    assert main(["libvirt", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("virtwire: error: libvirt check:") and word in err
    assert err.count("\n") == 1 and "Traceback" not in err


# A bare domain the `interface --into` parts go into (no memoryBacking, no features, no NIC).
BARE = """<domain type='qemu'>
  <name>vwl-bare</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <source file='/var/lib/vwl.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <console type='pty'/>
  </devices>
</domain>
"""


@pytest.mark.parametrize("extra", [[], ["--queues", "4", "--alias", "net1"], ["--kvm"]])
def test_interface_round_trips_through_check(tmp_path, sock, capsys, extra):
    bare = tmp_path / "bare.xml"
    bare.write_text(BARE)
    assert main(["libvirt", "check", str(bare)]) == 1  # it cannot work as it is
    capsys.readouterr()
    assert main(["libvirt", "interface", "--path", sock, "--into", str(bare), *extra]) == 0
    merged = capsys.readouterr().out
    root = ET.fromstring(merged)
    kvm = "--kvm" in extra
    assert root.get("type") == ("kvm" if kvm else "qemu")
    assert (root.find(f"{{{QEMU_NS}}}override") is None) == kvm
    rc, rep = _run_check(_write(tmp_path, merged), capsys)
    assert rc == 0, _errors(rep)
    assert not [f for f in rep["findings"] if f["status"] == "warn"]
    # The disks and console are still there.
    assert root.find("./devices/disk") is not None and root.find("./devices/console") is not None


def test_interface_snippet_parts_assemble_into_a_passing_domain(tmp_path, sock, capsys):
    """The standalone snippet, pasted where its comments say, gives a domain that passes."""
    assert main(["libvirt", "interface", "--path", sock, "--alias", "ua-x1", "--queues", "2"]) == 0
    out = capsys.readouterr().out
    frag = ET.fromstring(f"<frag xmlns:qemu='{QEMU_NS}'>{out}</frag>")
    mb, acpi, iface, ovr = list(frag)
    assert iface.find("alias").get("name") == "ua-x1"
    assert iface.find("source").get("mode") == "client"
    assert iface.find("driver").get("queues") == "2"
    root = ET.fromstring(BARE)
    root.insert(2, mb)
    feats = ET.SubElement(root, "features")
    feats.append(acpi)
    root.find("devices").append(iface)
    root.append(ovr)
    rep = check_domain(root)
    assert rep.ok, rep.table()


def test_interface_server_mode_and_bad_values(capsys):
    assert main(["libvirt", "interface", "--path", "/tmp/vwl-q.sock", "--mode", "server",
                 "--kvm"]) == 0
    out = capsys.readouterr().out
    iface = ET.fromstring(out[out.index("<interface"):out.index("</interface>") + 12])
    assert iface.find("source").get("mode") == "server"
    assert iface.find("source/reconnect") is None
    assert "qemu:override" not in out and "server=off" in out
    assert main(["libvirt", "interface", "--path", "/tmp/x.sock", "--alias", "bad name"]) == 2
    assert main(["libvirt", "interface", "--path", "/tmp/x.sock", "--queues", "0"]) == 2
    assert main(["libvirt", "interface", "--path", "/tmp/x'.sock"]) == 2
    err = capsys.readouterr().err
    assert "--alias" in err and "--queues" in err and "Traceback" not in err


def test_interface_from_serve_port_spec(capsys):
    """--port takes what `virtwire serve --port` took: server=off makes QEMU the server."""
    assert main(["libvirt", "interface", "--kvm", "--port",
                 "vhost-user,path=/tmp/vwl-p.sock,server=off,queues=3,mac=52:54:00:00:00:07,"
                 "backend=null"]) == 0
    out = capsys.readouterr().out
    iface = ET.fromstring(out[out.index("<interface"):out.index("</interface>") + 12])
    assert iface.find("source").get("path") == "/tmp/vwl-p.sock"
    assert iface.find("source").get("mode") == "server"
    assert iface.find("driver").get("queues") == "3"
    assert iface.find("mac").get("address") == "52:54:00:00:00:07"
    assert main(["libvirt", "interface", "--port", "vhost-user,path=/tmp/a.sock",
                 "--path", "/tmp/b.sock"]) == 2
    assert main(["libvirt", "interface"]) == 2
    assert "--path" in capsys.readouterr().err


def test_listening_socket_seen_without_connecting(sock):
    """check finds a listening back end in /proc/net/unix: serve never sees a probe connection."""
    from virtwire.libvirt import check as mod

    assert sock in mod._proc_listening_paths()
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(sock + "2")
    lst.listen(1)
    lst.setblocking(False)
    try:
        assert mod._is_listening(sock + "2")
        with pytest.raises(BlockingIOError):
            lst.accept()  # nobody connected
    finally:
        lst.close()
        os.unlink(sock + "2")


def test_each_interface_checked_on_its_own(sock):
    """Two vhost-user NICs and a bridge NIC: only the second vhost-user one lacks its override."""
    good = GOOD.format(sock=sock)
    second = (f"<interface type='vhostuser'><source type='unix' path='{sock}' mode='client'>"
              "<reconnect enabled='yes'/></source><model type='virtio'/>"
              "<alias name='ua-vw1'/></interface>"
              "<interface type='bridge'><source bridge='br0'/><model type='e1000'/></interface>"
              )
    rep = check_domain(ET.fromstring(good.replace("<serial type='pty'>",
                                                  second + "<serial type='pty'>")))
    errs = [f.element for f in rep.findings if f.status == "error"]
    assert errs == ["interface[1](ua-vw1)/qemu:override"]
    assert "alias='ua-vw1'" in [f for f in rep.findings if f.status == "error"][0].fix


def test_domain_name_read_through_virsh(tmp_path, monkeypatch, capsys, sock):
    """A name that is not a file is read with `virsh dumpxml --inactive` (a stand-in virsh here)."""
    fake = tmp_path / "virsh"
    xml = tmp_path / "dom.xml"
    xml.write_text(GOOD.format(sock=sock))
    fake.write_text("#!/bin/sh\n"
                    f"echo \"$@\" > {tmp_path}/argv\n"
                    f"if [ \"$6\" = vwl-guest ]; then cat {xml}; exit 0; fi\n"
                    "echo \"error: failed to get domain '$6'\" >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    assert main(["libvirt", "check", "vwl-guest"]) == 0
    assert "result: OK" in capsys.readouterr().out
    assert (tmp_path / "argv").read_text().split() == [
        "-c", "qemu:///system", "dumpxml", "--inactive", "--", "vwl-guest"]
    assert main(["libvirt", "check", "-c", "qemu:///session", "vwl-nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "failed to get domain 'vwl-nope'" in err
