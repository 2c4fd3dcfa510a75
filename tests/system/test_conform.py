"""``virtwire conform`` against QEMU's device, DPDK's vhost PMD and virtwire's own back end.

The expected findings are pinned: a change in any device's behaviour (or in a check) shows up
here as a changed status, not silently in a README.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.system

# check id -> status, for checks whose outcome differs from "pass" on that target
NO_OFFLOADS = {"offload.tx_csum": "skip", "offload.tx_tso": "skip", "offload.rx_gso": "skip"}
EXPECTED = {
    "qemu": {"used.packed_write_flag": "fail", "notify.no_stall": "fail", "ctrl.mq": "skip",
             **NO_OFFLOADS},
    "qemu-legacy": {"features.version_1": "skip", "features.reserved_bits": "skip",
                    "used.packed_write_flag": "skip",
                    "ctrl.mq": "skip", "irq.msix": "skip", "reset.queue": "skip", **NO_OFFLOADS},
    "qemu-tap": {"used.packed_write_flag": "fail"},
    # reserved_bits: testpmd offers VIRTIO_NET_F_GSO (bit 6) and ANY_LAYOUT with VERSION_1
    "dpdk": {"features.dependencies": "fail", "features.reserved_bits": "warn",
             "config.generation": "skip", "ctrl.mq": "skip",
             "config.before_features_ok": "skip", "reset.queue": "skip",
             "irq.msix": "skip",
             "ctrl.commands": "skip", "offload.tx_tso": "skip", "offload.rx_gso": "skip"},
    "virtwire-pci": {"reset.queue": "skip", "offload.rx_gso": "skip", "irq.msix": "skip",
                     "ctrl.mq": "skip"},
    "virtwire-pci-legacy": {"features.reserved_bits": "skip", "features.version_1": "skip",
                            "reset.queue": "skip", "used.packed_write_flag": "skip",
                            "offload.rx_gso": "skip", "irq.msix": "skip", "ctrl.mq": "skip"},
    "local": {"config.generation": "skip", "ctrl.mq": "skip", "irq.msix": "skip",
              "reset.queue": "skip", "offload.rx_gso": "skip"},
    "virtwire": {"config.generation": "skip", "ctrl.mq": "skip", "ctrl.commands": "skip",
                 "irq.msix": "skip", "reset.queue": "skip"},
}


@pytest.mark.parametrize("target", list(EXPECTED))
def test_conform_reports(target: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "virtwire", "conform", target, "--json"],
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    statuses = {c["id"]: c["status"] for c in report["checks"]}
    want = {cid: EXPECTED[target].get(cid, "pass") for cid in statuses}
    assert statuses == want, {c["id"]: c["detail"] for c in report["checks"]
                              if c["status"] != want[c["id"]]}
    assert all(c["clause"] for c in report["checks"])
    # exit status reflects failures
    assert proc.returncode == (1 if "fail" in want.values() else 0), proc.stderr[-2000:]


def test_conform_cli_errors_and_table() -> None:
    bad = subprocess.run([sys.executable, "-m", "virtwire", "conform", "nosuch"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown conformance target" in bad.stderr
    assert "Traceback" not in bad.stderr
    table = subprocess.run([sys.executable, "-m", "virtwire", "conform", "qemu-legacy",
                            "--only", "config"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "PASS  config.net_fields" in table.stdout and "3 passed, 0 failed" in table.stdout


def test_conform_any_vhost_user_socket() -> None:
    """``vhost-user:PATH[,loopback]``: a back end someone else started (here testpmd)."""
    from virtwire.conform.dpdk import Testpmd

    with Testpmd("io", name="vwd") as tp:
        for suffix, data in (("", False), (",loopback", True)):
            proc = subprocess.run([sys.executable, "-m", "virtwire", "conform",
                                   f"vhost-user:{tp.sock}{suffix}", "--json"],
                                  capture_output=True, text=True, timeout=300)
            report = json.loads(proc.stdout)
            st = {c["id"]: c["status"] for c in report["checks"]}
            assert st["features.dependencies"] == "fail"  # testpmd's HOST_ECN, as for "dpdk"
            assert st["frames.bulk"] == ("pass" if data else "skip")
            assert proc.returncode == 1


# the driver suite: every driver here gets a clean report (each check's failure mode is in
# tests/unit/test_conform_drivers.py, with a driver broken on purpose)
DRIVER_EXPECTED: dict[str, dict[str, str]] = {
    # over vhost-user no control command reaches the back end (QEMU keeps the control queue;
    # serve does not offer CTRL_VQ to DPDK's virtio-user)
    "virtwire": {}, "linux-pci": {}, "linux-vhost-user": {"driver.ctrl": "skip"},
    "dpdk": {"driver.ctrl": "skip"},
}


@pytest.mark.parametrize("driver", list(DRIVER_EXPECTED))
def test_conform_driver_reports(driver: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "virtwire", "conform", "--driver", driver,
                           "--json"], capture_output=True, text=True, timeout=600)
    assert proc.stdout, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    statuses = {c["id"]: c["status"] for c in report["checks"]}
    want = {cid: DRIVER_EXPECTED[driver].get(cid, "pass") for cid in statuses}
    assert statuses == want, {c["id"]: c["detail"] for c in report["checks"]
                              if c["status"] != want[c["id"]]}
    # the driver really moved traffic through the device
    chains = next(c for c in report["checks"] if c["id"] == "driver.buffer_reuse")["detail"]
    assert int(chains.split()[0]) > 50, chains
    assert proc.returncode == 0


def test_conform_strict_turns_warnings_into_failures() -> None:
    proc = subprocess.run([sys.executable, "-m", "virtwire", "conform", "dpdk", "--only",
                           "features", "--strict", "--json"], capture_output=True, text=True,
                          timeout=300)
    st = {c["id"]: c["status"] for c in json.loads(proc.stdout)["checks"]}
    assert st["features.reserved_bits"] == "fail" and proc.returncode == 1
