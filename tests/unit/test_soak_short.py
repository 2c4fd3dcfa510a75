"""A short run of ``tools/soak.py`` (issue 14): reconnects and memory-table changes under
traffic; serve stays up, no refusals or loop errors, fds and RSS back near the start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_short_soak() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "soak.py"), "--minutes", "0.15",
                        "--reconnect", "1.5", "--remap", "1", "--every", "2"],
                       capture_output=True, text=True, timeout=120)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, (summary, r.stderr[-2000:])
    assert summary["ok"] and summary["alive"]
    assert summary["reconnects"] >= 4 and summary["remaps"] >= 6
    assert summary["frames"] > 1000
