"""The conformance checks: named, each citing the spec clause it tests, run by our driver.

Theory of operation
-------------------
A check is a function ``(Context) -> Result`` registered in ``CHECKS`` with an id
(``area.name``), a title and the clause of virtio 1.2 (or vhost-user.rst) it enforces. The
``Context`` hands out fresh drivers for the target (each one resets the device and re-runs
§3.1.1), and exchanges frames with the target's peer (a socket QEMU's netdev talks to, a TAP's
packet socket, or testpmd's loopback). A check passes, fails (the device broke a MUST, with the
evidence in ``detail``), warns (a SHOULD) or is skipped (the feature is not offered, or the
target gives no way to observe it -- the reason is in ``detail``). One failing check never stops
the others: exceptions inside a check become a ``fail`` with the exception text, since a device
fault surfacing as ``DeviceFault`` *is* a finding.

Frames sent by the suite carry EtherType 0x88B5 and a magic (``peers.is_test_frame``) so a
peer can ignore unrelated traffic.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from virtwire.conform import checks_core, checks_offload  # noqa: F401 - they register the checks
from virtwire.conform.context import (
    CHECKS,
    FAIL,
    PASS,
    SKIP,
    WARN,
    Check,
    Context,
    Result,
    Skip,
)
from virtwire.conform.targets import Target

__all__ = ["Result", "Check", "CHECKS", "run_suite", "Context", "format_table"]


def run_suite(target: Target, only: list[str] | None = None, seed: int = 1,
              strict: bool = False) -> dict[str, Any]:
    """Run every check (or ``only`` those ids / id prefixes) against an opened target.
    ``strict``: a SHOULD clause broken (a warning) is a failure."""
    ctx = Context(target, seed)
    results = []
    for c in CHECKS:
        if only and not any(c.id == o or c.id.startswith(o + ".") or c.id.startswith(o)
                            for o in only):
            continue
        t0 = time.monotonic()
        try:
            r = c.fn(ctx)
        except Skip as e:
            r = Result(SKIP, str(e))
        except Exception as e:  # noqa: BLE001 - a device fault is a finding, not a crash
            tb = traceback.extract_tb(e.__traceback__)[-1]
            r = Result(FAIL, f"{type(e).__name__}: {e} (at {tb.name}:{tb.lineno})")
        if strict and r.status == WARN:
            r = Result(FAIL, "[strict: SHOULD] " + r.detail, r.data)
        results.append({"id": c.id, "title": c.title, "clause": c.clause, "status": r.status,
                        "detail": r.detail, "data": r.data,
                        "seconds": round(time.monotonic() - t0, 3)})
    summary = {s: sum(1 for r in results if r["status"] == s) for s in (PASS, FAIL, WARN, SKIP)}
    return {"target": target.name, "description": target.description, "checks": results,
            "summary": summary, "strict": strict}


def format_table(report: dict[str, Any], width: int = 100) -> str:
    """A readable table: one line per check, the detail wrapped under it."""
    import textwrap

    mark = {PASS: "PASS", FAIL: "FAIL", WARN: "WARN", SKIP: "skip"}
    lines = [f"virtwire conform {report['target']}: {report['description']}", ""]
    idw = max(len(r["id"]) for r in report["checks"]) if report["checks"] else 10
    for r in report["checks"]:
        lines.append(f"  {mark[r['status']]}  {r['id']:<{idw}}  {r['title']}")
        for ln in textwrap.wrap(r["detail"], width - idw - 10):
            lines.append(f"        {'':<{idw}}  {ln}")
    s = report["summary"]
    lines += ["", f"  {s['pass']} passed, {s['fail']} failed, {s['warn']} warnings, "
                  f"{s['skip']} skipped"]
    return "\n".join(lines)


