"""`virtwire vm` bad input: one clear line on stderr, non-zero exit, no traceback, no QEMU run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from virtwire.cli import main
from virtwire.errors import CliError
from virtwire.guest import nics
from virtwire.guest.console import frame_command
from virtwire.guest.qemu import GuestVM, parse_memory


def _one_line_error(capsys, argv: list[str]) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("virtwire: error: ")
    assert "Traceback" not in err
    return rc, lines[0]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["vm", "--net", "bogus", "-c", "true"], "unknown --net kind 'bogus'"),
        (["vm", "--net", "qemu-tap,color=red", "-c", "true"], "unknown key 'color'"),
        (["vm", "--net", "qemu-tap,ifname", "-c", "true"], "expected key=value"),
        (["vm", "--net", "qemu-tap,mac=zz", "-c", "true"], "bad MAC address"),
        (["vm", "--net", "qemu-tap,mac=01:00:5e:00:00:01", "-c", "true"], "multicast"),
        (["vm", "--memory", "12X", "-c", "true"], "bad memory size '12X'"),
        (["vm", "--memory", "1M", "-c", "true"], "64M..64G"),
        (["vm", "--memory", "100000G", "-c", "true"], "64M..64G"),
        (["vm", "--ip", "10.0.0.1", "--net", "qemu-tap", "-c", "true"], "bad guest address"),
        (["vm", "--ip", "10.0.0.300/24", "--net", "qemu-tap", "-c", "true"],
         "bad guest address"),
        (["vm", "--ip", "10.0.0.1/24", "-c", "true"], "needs a NIC"),
        (["vm", "--smp", "0", "-c", "true"], "bad CPU count"),
        (["vm", "--netns", "a/b", "-c", "true"], "bad network namespace name"),
    ],
)
def test_bad_flag_values(capsys, argv, fragment):
    rc, line = _one_line_error(capsys, argv)
    assert rc == 2
    assert fragment in line


@pytest.mark.parametrize("ifname", ["thisnameistoolong0", "a/b", "has space", "x:y", ""])
def test_bad_tap_name_refused_before_qemu(capsys, monkeypatch, ifname):
    # The name check runs while the launch is planned: QEMU must never be started.
    monkeypatch.setattr("subprocess.Popen", _no_popen)
    rc, line = _one_line_error(capsys, ["vm", "--net", f"qemu-tap,ifname={ifname}", "-c", "true"])
    assert rc == 2
    assert "bad TAP name" in line


def _no_popen(*a, **k):
    raise AssertionError("QEMU must not be started")


def test_qemu_missing(capsys, monkeypatch):
    monkeypatch.setenv("VIRTWIRE_QEMU", "/nonexistent/qemu-system-x86_64")
    rc, line = _one_line_error(capsys, ["vm", "-c", "true"])
    assert rc == 1
    assert "QEMU not found: /nonexistent/qemu-system-x86_64" in line
    assert "VIRTWIRE_QEMU" in line


def test_image_missing(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rc, line = _one_line_error(capsys, ["vm", "-c", "true"])
    assert rc == 1
    assert "no guest image" in line and "virtwire image build" in line
    rc, line = _one_line_error(capsys, ["image", "path"])
    assert rc == 1 and "no guest image" in line


def test_image_pointer_corrupt(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "virtwire").mkdir()
    (tmp_path / "virtwire" / "current.json").write_text("{not json")
    rc, line = _one_line_error(capsys, ["image", "path"])
    assert rc == 1 and "corrupt" in line


def test_unknown_kind_end_to_end_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "virtwire", "vm", "--net", "warp-drive"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("virtwire: error: unknown --net kind 'warp-drive' (known: ")
    assert "qemu-tap" in lines[0]
    assert "Traceback" not in proc.stderr


def test_parse_nic_spec_and_registry():
    spec = nics.parse_nic_spec("qemu-tap,ifname=t0,mac=52:54:00:AA:bb:01,ip=10.1.2.3/24", 1)
    assert spec.kind == "qemu-tap" and spec.index == 1
    assert spec.options == {"ifname": "t0", "mac": "52:54:00:AA:bb:01", "ip": "10.1.2.3/24"}
    with pytest.raises(CliError, match="given twice"):
        nics.parse_nic_spec("qemu-tap,ifname=a,ifname=b")
    calls = []

    def build(spec, ctx):
        calls.append((spec, ctx))
        return nics.NicPlan(qemu_args=["-device", "x"], needs_qtest=True)

    nics.register_nic_kind("vwf-test-kind", build, keys={"color"}, required={"color"})
    try:
        with pytest.raises(CliError, match="missing key 'color'"):
            nics.parse_nic_spec("vwf-test-kind")
        assert nics.parse_nic_spec("vwf-test-kind,color=red").options == {"color": "red"}
    finally:
        nics._KINDS.pop("vwf-test-kind")


def test_argv_carries_plans_qtest_and_kernel_args(tmp_path, guest_image_stub):
    def build(spec, ctx):
        assert ctx.accel == "tcg" and ctx.id == "net0" and ctx.mac.startswith("52:54:")
        return nics.NicPlan(qemu_args=["-device", f"virtio-net-pci,id=d{ctx.index}"],
                            needs_qtest=True)

    nics.register_nic_kind("vwf-argv", build)
    try:
        vm = GuestVM(net=["vwf-argv,ip=10.5.0.2/24", "qemu-tap,ifname=t1,ip=10.6.0.2/24"],
                     gw="10.5.0.1", hostname="g1", memory="512M", smp=2, netns="vwfns")
        vm.tmpdir = tmp_path
        vm._plans = [nics.get_nic_kind(n.kind).builder(n, nics.NicContext(
            n.index, f"net{n.index}", nics.derive_mac(vm.name, n.index), tmp_path, "tcg",
            vm.name, "vwfns", tmp_path / "qtest.sock")) for n in vm.nics]
        argv = vm.build_argv(guest_image_stub, "/usr/bin/qemu-system-x86_64")
    finally:
        nics._KINDS.pop("vwf-argv")
    assert argv[:4] == ["ip", "netns", "exec", "vwfns"]
    joined = " ".join(argv)
    assert "-machine pc,memory-backend=mem" in joined
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in joined
    assert "-accel tcg" in joined and "-smp 2" in joined and "-no-reboot" in joined
    assert "-nodefaults" in joined and "-display none" in joined
    assert "virtio-net-pci,id=d0" in joined
    assert "tap,id=net1,ifname=t1,script=no,downscript=no" in joined
    assert "qtest,id=qt,chardev=qt0,log=/dev/null" in joined
    assert argv.count("-chardev") == 2  # console + qtest, once
    append = argv[argv.index("-append") + 1]
    assert append.split() == ["console=ttyS0", "panic=-1", "quiet", "vw.ip=10.5.0.2/24",
                              "vw.ip1=10.6.0.2/24", "vw.gw=10.5.0.1", "vw.hostname=g1"]


@pytest.fixture
def guest_image_stub(tmp_path):
    from virtwire.guest.image import GuestImage

    return GuestImage(kernel=tmp_path / "vmlinuz", initramfs=tmp_path / "initramfs.cpio.gz",
                      kernel_release="6.1.0-test", key="0" * 16, manifest={})


@pytest.mark.parametrize("text, mib", [("64M", 64), ("256", 256), ("1G", 1024),
                                       ("131072K", 128), (512, 512)])
def test_parse_memory(text, mib):
    assert parse_memory(text) == mib


def test_frame_command_markers_are_not_in_the_echo():
    line, begin, end = frame_command("echo hi")
    # What the tty echoes back is the line itself: neither marker may match it.
    assert not begin.search(line.replace("\r", ""))
    assert not end.search("\n" + line)
    out = f"{line}\nVWB{begin.pattern[3:15]}B\nhi\n\nVWE{begin.pattern[3:15]}E7\n"
    b = begin.search(out)
    e = end.search(out, b.end())
    assert out[b.end():e.start()] == "hi\n" and e.group(1) == "7"
    with pytest.raises(ValueError, match="longer than"):
        frame_command("x" * 1000)
    with pytest.raises(ValueError, match="control character"):
        frame_command("echo \x1b[A")
