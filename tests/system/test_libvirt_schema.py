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
