"""The explain HTML page in headless Chromium: it renders, its script runs, nothing throws.

The browser is driven over the DevTools protocol (``--remote-debugging-pipe``: JSON messages ending
in NUL on fds 3 and 4), so every uncaught exception, console error, error log entry (a failed load)
and non-local request is seen; a screenshot of each page is kept in the test's tmp dir.
"""


from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageReport:
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)


class _Pipe:
    def __init__(self, wfd: int, rfd: int, deadline: float) -> None:
        self.w, self.r, self.deadline = wfd, rfd, deadline
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def recv(self) -> dict[str, Any]:
        while b"\0" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise EOFError("chromium closed its pipe")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\0")
        return json.loads(line)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        i = self.send(method, params, session)
        while True:
            m = self.recv()
            if m.get("id") == i:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float) -> dict | None:
        for k, m in enumerate(self.events):
            if m.get("method") == method:
                return self.events.pop(k)
        end = min(self.deadline, time.monotonic() + timeout)
        while time.monotonic() < end:
            try:
                saved = self.deadline
                self.deadline = end
                m = self.recv()
            except TimeoutError:
                return None
            finally:
                self.deadline = saved
            if m.get("method") == method:
                return m
            self.events.append(m)
        return None


def _high_pipe() -> tuple[int, int]:
    """A pipe whose ends are above 9, so moving them onto fds 3 and 4 cannot clobber them."""
    r, w = os.pipe()
    hr, hw = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(r)
    os.close(w)
    return hr, hw


def render(url: str, png: str, scripts: tuple[str, ...] = (), width: int = 1400,
           height: int = 2000, timeout: float = 60.0) -> PageReport:
    """Load ``url`` in headless Chromium; return what went wrong and the scripts' results."""
    assert CHROMIUM, "chromium is not installed (tools/setup.sh installs it)"
    rep = PageReport()
    to_r, to_w = _high_pipe()
    from_r, from_w = _high_pipe()
    profile = tempfile.mkdtemp(prefix="vwt-chromium-")

    # The shell moves the pipe ends to fds 3 and 4, where --remote-debugging-pipe wants them.
    proc = subprocess.Popen(
        ["/bin/bash", "-c", f'exec 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-; exec "$0" "$@"',
         CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
         "--remote-debugging-pipe", f"--window-size={width},{height}", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        pass_fds=(to_r, from_w),
    )
    os.close(to_r)
    os.close(from_w)
    pipe = _Pipe(to_w, from_r, time.monotonic() + timeout)
    try:
        tid = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = pipe.call("Target.attachToTarget", {"targetId": tid, "flatten": True})["sessionId"]
        for dom in ("Runtime", "Log", "Network", "Page"):
            pipe.call(f"{dom}.enable", {}, sid)
        pipe.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                  sid)
        pipe.events.clear()
        pipe.call("Page.navigate", {"url": url}, sid)
        if pipe.wait_event("Page.loadEventFired", timeout) is None:
            rep.errors.append("page never fired load")
        pipe.wait_event("never.happens", 0.5)  # let late scripts and logs arrive
        for src in scripts:
            r = pipe.call("Runtime.evaluate", {"expression": src, "returnByValue": True}, sid)
            if "exceptionDetails" in r:
                rep.errors.append(f"script failed: {r['exceptionDetails'].get('text')}")
                rep.results.append(None)
            else:
                rep.results.append(r.get("result", {}).get("value"))
        pipe.wait_event("never.happens", 0.3)
        shot = pipe.call("Page.captureScreenshot", {"format": "png"}, sid)
        with open(png, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        for m in pipe.events:
            meth, p = m.get("method"), m.get("params", {})
            if meth == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                rep.errors.append("exception: " + str(d.get("exception", {}).get(
                    "description", d.get("text"))))
            elif meth == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", "")))
                                for a in p.get("args", []))
                rep.console.append(f"{p.get('type')}: {text}")
                if p.get("type") in ("error", "assert"):
                    rep.errors.append(f"console.{p.get('type')}: {text}")
            elif meth == "Log.entryAdded":
                e = p.get("entry", {})
                if e.get("level") == "error":
                    rep.errors.append(f"log: {e.get('text')} {e.get('url', '')}")
            elif meth == "Network.requestWillBeSent":
                u = p.get("request", {}).get("url", "")
                if not u.startswith(("file:", "data:", "about:")):
                    rep.requests.append(u)
        try:
            pipe.send("Browser.close")
        except OSError:
            pass
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        os.close(to_w)
        os.close(from_r)
        shutil.rmtree(profile, ignore_errors=True)
    return rep


# --- the tests ------------------------------------------------------------------------------
pytestmark = pytest.mark.system

_PROBES = (
    "document.body.getAttribute('data-ready')",
    "document.getElementById('expand').click();"
    " document.querySelectorAll('#seq details[open]').length",
    "document.getElementById('collapse').click();"
    " document.querySelectorAll('#seq details[open]').length",
    "var b = document.querySelector('input[data-cat=\"pci\"]'); if (b) { b.click(); }"
    " document.querySelectorAll('#seq .row[hidden]').length",
    "document.querySelectorAll('#seq .row').length",
    "document.querySelectorAll('.chart svg rect[fill]').length",
)


def _page(tmp_path: Path, example: str) -> Path:
    from virtwire import cli

    out = tmp_path / f"{example}.html"
    how = ["--live"] if example == "live" else ["--example", example]
    assert cli.main(["explain", *how, "--html", str(out)]) == 0
    return out


def _check_png(png: Path) -> None:
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a real page, not a blank canvas


@pytest.mark.parametrize("example", ["pci-proxy", "vhost-user", "live"])
def test_explain_page_renders_without_errors(tmp_path: Path, example: str) -> None:
    page = _page(tmp_path, example)
    png = tmp_path / f"{example}.png"
    rep = render(page.as_uri(), str(png), _PROBES)
    assert rep.errors == [], rep.errors
    assert rep.requests == [], "the page must not load anything from outside"
    ready, opened, closed, hidden, rows, lines = rep.results
    assert ready == "1"
    assert opened >= rows > 20 and closed == 0
    if example in ("pci-proxy", "live"):
        assert hidden > 10  # the pci filter hid the config-space rows
    assert lines >= 20  # chart bars
    _check_png(png)


def test_harness_catches_a_throwing_page(tmp_path: Path) -> None:
    """Control: the same harness reports an exception and a failed load (the check can fail)."""
    bad = tmp_path / "bad.html"
    text = _page(tmp_path, "pci-proxy").read_text()
    bad.write_text(text.replace("</body>", "<script>noSuchFunction();</script>"
                                '<img src="http://127.0.0.1:9/x.png"></body>'))
    rep = render(bad.as_uri(), str(tmp_path / "bad.png"))
    assert any("noSuchFunction" in e for e in rep.errors)
    assert rep.requests == ["http://127.0.0.1:9/x.png"]
