"""The domain XML ``virtwire libvirt interface`` writes passes libvirt's own schema.

``virt-xml-validate`` (libvirt-clients) with the schemas libvirt ships (libvirt0) and xmllint
(libxml2-utils); tools/setup.sh installs them. No libvirtd is needed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from virtwire.cli import main
from virtwire.libvirt.check import check_domain

pytestmark = pytest.mark.system

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0] + "/tests/unit")
from test_libvirt_check import BARE, GOOD  # noqa: E402


def _validate(path) -> subprocess.CompletedProcess:
    tool = shutil.which("virt-xml-validate")
    assert tool, "virt-xml-validate missing: run tools/setup.sh (libvirt-clients, libxml2-utils)"
    return subprocess.run([tool, str(path), "domain"], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("extra", [[], ["--queues", "4", "--alias", "net1"],
                                   ["--mode", "server", "--kvm"],
                                   ["--mac", "52:54:00:aa:bb:cc", "--queues", "2", "--kvm"]])
def test_interface_into_domain_validates(tmp_path, capsys, extra):
    bare = tmp_path / "bare.xml"
    bare.write_text(BARE)
    assert main(["libvirt", "interface", "--path", "/tmp/vwl-schema.sock", "--into", str(bare),
                 *extra]) == 0
    merged = tmp_path / "merged.xml"
    merged.write_text(capsys.readouterr().out)
    r = _validate(merged)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "validates" in r.stderr + r.stdout
    # And virtwire's own check agrees (paths aside: nothing listens in this test).
    assert check_domain(ET.parse(merged).getroot(), check_paths=False).ok


def test_good_example_validates_and_schema_rejects_a_bad_one(tmp_path):
    good = tmp_path / "good.xml"
    good.write_text(GOOD.format(sock="/tmp/vwl-schema.sock"))
    r = _validate(good)
    assert r.returncode == 0, r.stderr + r.stdout
    # The validator really checks: a source mode libvirt does not know fails.
    bad = tmp_path / "bad.xml"
    bad.write_text(GOOD.format(sock="/tmp/vwl-schema.sock").replace("mode='client'>",
                                                                   "mode='both'>"))
    r = _validate(bad)
    assert r.returncode != 0


@pytest.fixture
def live_serve(tmp_path):
    """A real ``virtwire serve`` (null backend) listening on a fresh socket; stopped after."""
    import os
    import select
    import tempfile

    d = tempfile.mkdtemp(prefix="vwl-lvs-")
    sock = os.path.join(d, "vw0.sock")
    port = f"vhost-user,path={sock},backend=null,queues=2,name=vwl0"
    r, w = os.pipe()
    env = dict(os.environ, VIRTWIRE_SERVE_READY_FD=str(w))
    log = tmp_path / "serve.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "virtwire", "-v", "serve", "-q",
                                 "--port", port], stdout=f, stderr=f, pass_fds=(w,), env=env,
                                stdin=subprocess.DEVNULL)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 20)
        assert ready and os.read(r, 1) == b"1", log.read_text()[-2000:]
        yield port, sock, proc, log
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def test_against_a_running_serve(tmp_path, capsys, live_serve):
    """interface --port (serve's own spec) into a domain: valid, and check passes while serve
    listens - without serve seeing a connection; once serve is gone check fails, naming the fix."""
    port, sock, proc, log = live_serve
    bare = tmp_path / "bare.xml"
    bare.write_text(BARE)
    assert main(["libvirt", "interface", "--port", port, "--into", str(bare)]) == 0
    merged = tmp_path / "merged.xml"
    merged.write_text(capsys.readouterr().out)
    r = _validate(merged)
    assert r.returncode == 0, r.stderr
    assert main(["libvirt", "check", "--json", str(merged)]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)
    path_f = [f for f in rep["findings"] if f["element"].endswith("/source/path")]
    assert path_f and path_f[0]["status"] == "ok" and "listens" in path_f[0]["message"]
    assert "front end connected" not in log.read_text()
    proc.terminate()
    proc.wait(10)
    assert main(["libvirt", "check", str(merged)]) == 1
    out = capsys.readouterr().out
    assert "CANNOT WORK" in out and f"virtwire serve --port vhost-user,path={sock}" in out


def test_queues_compared_with_the_running_serve(tmp_path, capsys, live_serve):
    """serve runs queues=2: a domain asking for 4 queue pairs is named, with both fixes."""
    port, sock, _, _ = live_serve
    bare = tmp_path / "bare.xml"
    bare.write_text(BARE)
    assert main(["libvirt", "interface", "--path", sock, "--queues", "4", "--into",
                 str(bare)]) == 0
    merged = tmp_path / "merged.xml"
    merged.write_text(capsys.readouterr().out)
    assert main(["libvirt", "check", str(merged)]) == 1
    out = capsys.readouterr().out
    assert "serves 2 queue pair(s)" in out and "<driver queues='2'/>" in out
