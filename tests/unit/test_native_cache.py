"""Issue 14, defect 8: the C helper is never loaded from a directory another user controls."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "virtwire" / "_native" / "vwnet.c"
PLANT = r'''
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w"); if (f) { fputs("planted", f); fclose(f); }
}
'''


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to plant a directory of another user")
def test_planted_library_in_foreign_cache_dir_is_not_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    evil = tmpdir / f"virtwire-native-{os.getuid()}"
    evil.mkdir(mode=0o777)
    os.chmod(evil, 0o777)
    tag = hashlib.sha256(SRC.read_bytes()).hexdigest()[:16]
    c = tmp_path / "plant.c"
    c.write_text(PLANT)
    so = evil / f"vwnet-{tag}.so"
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(so), str(c)],
                   check=True)
    os.chown(evil, 65534, 65534)
    os.chown(so, 65534, 65534)
    not_a_dir = tmp_path / "cachefile"
    not_a_dir.write_text("")  # XDG_CACHE_HOME unusable: the $TMPDIR fallback is taken
    env = dict(os.environ, TMPDIR=str(tmpdir), XDG_CACHE_HOME=str(not_a_dir))
    out = subprocess.run([sys.executable, "-c",
                          "from virtwire.net import native; print(native.load() is not None)"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not marker.exists(), "a library planted by another user was loaded"
    assert out.stdout.strip() == "False"
