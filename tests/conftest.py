"""Shared pytest fixtures. Add fixtures with small additive edits; keep them cheap to import."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite tests this checkout's code, whatever `pip install -e` last pointed at: pytest puts src/
# first on sys.path (pyproject's `pythonpath`), and the `python -m virtwire` processes the tests
# start (serve sidecars, CLI runs) get it through PYTHONPATH.
_SRC = str(Path(__file__).resolve().parent.parent / "src")
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_SRC] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _SRC])


@pytest.fixture(scope="session")
def guest_image():
    """The default guest image (built once per session; a cached build takes well under 1 s)."""
    from virtwire.guest.image import build_image, load_image

    build_image()
    return load_image()


@pytest.fixture
def tap_netns():
    """(Netns, tap name): a fresh namespace with one TAP (no address), removed after the test."""
    from virtwire.netns import netns_with_tap

    with netns_with_tap("vwfx") as pair:
        yield pair


@pytest.fixture
def bridge_netns():
    """(Netns, bridge, [tap0, tap1]): a fresh namespace with a bridge and two TAPs on it."""
    from virtwire.netns import netns_with_bridge

    with netns_with_bridge("vwfx", taps=2) as triple:
        yield triple


@pytest.fixture(scope="session")
def libvirtd():
    """A libvirtd of the suite's own (private socket directory), stopped after the session; the
    domains a test defines through it or ``adopt``s are destroyed and undefined then."""
    from virtwire.testing.libvirtd import Libvirtd

    with Libvirtd() as d:
        yield d
