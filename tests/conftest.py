"""Shared pytest fixtures. Add fixtures with small additive edits; keep them cheap to import."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def guest_image():
    """The default guest image (built once per session; a cached build takes well under 1 s)."""
    from virtwire.guest.image import build_image, load_image

    build_image()
    return load_image()
