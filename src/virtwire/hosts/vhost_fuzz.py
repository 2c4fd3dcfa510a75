"""Fuzz target for the vhost-user back end: hostile message sequences with real memfds, started
rings and hostile ring contents, coverage-guided.

Theory of operation
-------------------
A case is a list of steps (``Step``: a message with its fds described symbolically, a write of
random bytes into guest memory, a kick, a truncation of the memory file, or raw bytes through the
message reader). ``build_case(rng)`` draws one from a grammar biased towards what a front end
really sends (GET_FEATURES .. SET_VRING_KICK in QEMU's order) with mutations at every field:
ring indices, sizes, addresses inside/outside the region, memfds sealed/sealable/unsealable and
short, pipes and files where eventfds belong, raw payloads of random length.

``run_steps`` executes a case against a fresh ``VhostUserBackend`` serving a real
``VirtioNet`` (null backend) on a private event loop. The invariants: ``handle()`` never raises,
no callback fails in the loop (``loop.errors`` stays 0), the process survives (SIGBUS included:
truncations exercise the guard), and after ``close()`` every fd the case created or passed is
gone (no leak).

``fuzz`` runs cases for a number of cases or seconds. Coverage feedback: lines executed in
``virtwire.hosts``/``virtwire.net``/``virtwire.virtio`` are traced (``sys.settrace``); a case
that reaches a new line joins the corpus, and later cases are mutations (a step replaced,
inserted, dropped, or two cases spliced) of corpus entries.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from virtwire.hosts import vhost_user_proto as vp
from virtwire.hosts.vhost_device import VirtioDeviceHost
from virtwire.hosts.vhost_user import VhostUserBackend
from virtwire.hosts.vhost_user_conn import MessageReader
from virtwire.hosts.vhost_user_proto import VhostUserRequest as R
from virtwire.loop import EventLoop

__all__ = [
    "Step",
    "FuzzReport",
    "build_case",
    "run_steps",
    "fuzz",
    "coverage_loop",
    "fuzz_memfd",
    "run_guarded",
]

UVA = 0x7F0000000000
MEM = 1 << 20
_TRACED = ("virtwire/hosts/", "virtwire/net/", "virtwire/virtio/", "virtwire/memory.py")


@dataclass
class Step:
    kind: str  # "msg", "poke", "kick", "truncate", "raw"
    request: int = 0
    payload: bytes = b""
    fds: tuple[str, ...] = ()  # "mem-sealed", "mem-sealable", "mem-unsealable", "efd", "pipe"...
    need_reply: bool = False
    offset: int = 0
    data: bytes = b""


@dataclass
class FuzzReport:
    cases: int = 0
    failures: list[str] = field(default_factory=list)
    lines: int = 0
    corpus: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"cases": self.cases, "failures": len(self.failures),
                "first_failures": self.failures[:5], "lines_covered": self.lines,
                "corpus": self.corpus, "seconds": round(self.seconds, 2)}


def _edge(rng: random.Random, lo: int, hi: int) -> int:
    return rng.choice([lo, hi, hi + 1, 0, 1, 0xFF, 0xFFFF, 0xFFFFFFFF, rng.randint(lo, hi)])


def _state(rng: random.Random, index: int, num: int) -> bytes:
    return vp.encode_payload(vp.P.STATE, vp.VringState(index & 0xFFFFFFFF, num & 0xFFFFFFFF))


def _ring_steps(rng: random.Random, i: int) -> list[Step]:
    num = rng.choice([256, 256, 8, 1, 0, 100, 1024, 32768, 65536])
    base = 0x10000 * (i + 1)
    desc, avail, used = base, base + 16 * 256, base + 0x8000
    if rng.random() < 0.2:
        desc = rng.choice([MEM - 8, MEM, 1 << 40, 0])
    addr = vp.VringAddr(i, rng.choice([0, 0, 1, 2]), UVA + desc, UVA + used, UVA + avail)
    kick = rng.choice(["efd", "efd", "efd", "pipe", "file", "none"])
    return [
        Step("msg", R.SET_VRING_NUM, _state(rng, i, num), need_reply=True),
        Step("msg", R.SET_VRING_BASE, _state(rng, i, rng.choice([0, 0, 5, 0xFFFF, 1 << 15])),
             need_reply=True),
        Step("msg", R.SET_VRING_ADDR, vp.encode_payload(vp.P.ADDR, addr), need_reply=True),
        Step("msg", R.SET_VRING_CALL, vp.encode_payload(vp.P.FILE, vp.VringFile(i, 0)),
             (rng.choice(["efd", "efd", "pipe", "opath"]),), need_reply=True),
        Step("msg", R.SET_VRING_KICK, vp.encode_payload(vp.P.FILE, vp.VringFile(
            i, None if kick == "none" else 0)), () if kick == "none" else (kick,),
            need_reply=True),
        Step("msg", R.SET_VRING_ENABLE, _state(rng, i, rng.choice([1, 1, 0, 2])),
             need_reply=True),
    ]


def _random_step(rng: random.Random) -> Step:
    k = rng.random()
    if k < 0.3:
        return Step("poke", offset=rng.randrange(0, 0x20000),
                    data=rng.randbytes(rng.choice([2, 4, 16, 64, 256])))
    if k < 0.45:
        return Step("kick", offset=rng.randrange(0, 4))
    if k < 0.5:
        return Step("truncate", offset=rng.choice([0, 4096, MEM // 2]))
    if k < 0.6:
        return Step("raw", data=rng.randbytes(rng.randint(0, 40)))
    req = rng.choice(list(R))
    return Step("msg", int(req), rng.randbytes(rng.choice([0, 8, 12, 16, 40, 200])),
                tuple(rng.choice(["efd", "pipe", "mem-sealed", "file"])
                      for _ in range(rng.choice([0, 0, 1, 2]))), rng.random() < 0.5)


def build_case(rng: random.Random) -> list[Step]:
    """One case: a mostly valid start with mutations, then hostile steps."""
    seal = rng.choice(["mem-sealed", "mem-sealed", "mem-sealable", "mem-unsealable"])
    size = rng.choice([MEM, MEM, MEM // 2, 4096, MEM * 2])
    off = rng.choice([0, 0, 0, 4096, 3])
    table = vp.MemTable((vp.MemRegion(0, size, UVA, off),))
    feats = rng.choice([(1 << 32) | (1 << 30) | (1 << 28) | (1 << 29) | (1 << 15),
                        (1 << 32) | (1 << 34) | (1 << 28) | (1 << 29) | (1 << 15),
                        rng.getrandbits(64)])
    steps = [
        Step("msg", R.GET_FEATURES),
        Step("msg", R.SET_PROTOCOL_FEATURES,
             vp.encode_payload(vp.P.U64, rng.choice([8, 8, 0x8209, rng.getrandbits(20)]))),
        Step("msg", R.SET_OWNER),
        Step("msg", R.SET_FEATURES, vp.encode_payload(vp.P.U64, feats), need_reply=True),
        Step("msg", R.SET_MEM_TABLE, vp.encode_payload(vp.P.MEMTABLE, table), (seal,),
             need_reply=True),
    ]
    for i in rng.sample(range(3), rng.randint(1, 3)):
        steps += _ring_steps(rng, i)
    for _ in range(rng.randint(3, 25)):
        steps.insert(rng.randint(3, len(steps)), _random_step(rng))
    return steps


class _Case:
    """Runs one case; owns the fds it creates (closed and checked at the end)."""

    def __init__(self) -> None:
        self.loop = EventLoop()
        from virtwire.backends.null import NullBackend
        from virtwire.net.device import VirtioNet

        self.dev = VirtioNet([NullBackend("fuzz")], queues=1, name="fuzz")
        self.backend = VhostUserBackend(VirtioDeviceHost(self.dev, num_rings=2), self.loop,
                                        "/nonexistent/fuzz.sock", name="fuzz")
        self.dev.more_work = self.backend.kick_ring
        self.memfd: int | None = None
        self.mapping: Any = None
        self.kicks: list[int] = []
        self.mine: list[int] = []

    def fd(self, kind: str) -> int:
        import mmap

        if kind.startswith("mem-"):
            fd = fuzz_memfd(kind, "vwfuzz", MEM)
            if self.memfd is None:
                self.memfd = os.dup(fd)
                self.mine.append(self.memfd)
                self.mapping = mmap.mmap(self.memfd, MEM)
            return fd
        if kind == "efd":
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.kicks.append(os.dup(fd))
            self.mine.append(self.kicks[-1])
            return fd
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            return r
        if kind == "opath":
            return os.open("/", os.O_PATH)
        return os.open("/dev/null", os.O_RDWR)

    def step(self, s: Step) -> None:
        if s.kind == "msg":
            fds = [self.fd(k) for k in s.fds]
            flags = vp.VHOST_USER_VERSION | (vp.VHOST_USER_NEED_REPLY_MASK if s.need_reply else 0)
            self.backend.handle(vp.Message(s.request, flags, s.payload, fds))
        elif s.kind == "poke" and self.mapping is not None:
            end = min(len(self.mapping), s.offset + len(s.data))
            try:
                self.mapping[s.offset:end] = s.data[: max(0, end - s.offset)]
            except (IndexError, ValueError):
                pass
        elif s.kind == "kick" and self.kicks:
            os.eventfd_write(self.kicks[s.offset % len(self.kicks)], 1)
        elif s.kind == "truncate" and self.memfd is not None:
            try:
                os.ftruncate(self.memfd, s.offset)
            except OSError:
                pass  # sealed: the point
            else:  # our own view of it is gone too (the back end's is guarded)
                if self.mapping is not None:
                    self.mapping.close()
                    self.mapping = None
        elif s.kind == "raw":
            _feed_reader(s.data)
        for _ in range(3):
            self.loop.run_once(0)

    def close(self) -> None:
        self.backend.close()
        self.loop.close()
        if self.mapping is not None:
            self.mapping.close()
        for fd in self.mine:
            try:
                os.close(fd)
            except OSError:
                pass


def _feed_reader(data: bytes) -> None:
    """Raw bytes through the non-blocking reassembly (must never raise anything but its own)."""
    import socket

    a, b = socket.socketpair()
    try:
        a.send(data)
        a.shutdown(socket.SHUT_WR)
        reader = MessageReader()
        for _ in range(8):
            try:
                msg = reader.read(b)
            except (EOFError, vp.ProtocolError):
                break
            if msg is None:
                break
            msg.close_fds()
    finally:
        a.close()
        b.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_steps(steps: list[Step]) -> str | None:
    """Run one case; None when every invariant held, else what went wrong."""
    return run_guarded(_Case, steps, lambda case: case.loop.errors)


def fuzz_memfd(kind: str, name: str, size: int) -> int:
    """A memfd of ``size`` bytes for a fuzz step's ``mem-*`` fd kind: ``mem-unsealable`` without
    sealing, ``mem-sealed`` already sealed against shrinking."""
    flags = os.MFD_CLOEXEC | (0 if kind == "mem-unsealable" else os.MFD_ALLOW_SEALING)
    fd = os.memfd_create(name, flags)
    os.ftruncate(fd, size)
    if kind == "mem-sealed":
        import fcntl

        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def run_guarded(make_case: Callable[[], Any], steps: Sequence[Any],
                loop_errors: Callable[[Any], int],
                stop: Callable[[Any], bool] | None = None) -> str | None:
    """The fuzz targets' invariants around one case: logging silenced, ``make_case()`` fed each
    step (until ``stop(case)``), then closed. None when every invariant held, else what went
    wrong: loop callbacks that failed (``loop_errors(case)``), an exception, or leaked fds."""
    before = _fds()
    log = logging.getLogger("virtwire")
    level = log.level
    log.setLevel(logging.CRITICAL)
    case = make_case()
    try:
        for s in steps:
            case.step(s)
            if stop is not None and stop(case):
                break
        errors = loop_errors(case)
        if errors:
            return f"{errors} loop callback(s) failed"
    except Exception:
        return traceback.format_exc(limit=6)
    finally:
        case.close()
        log.setLevel(level)
    after = _fds()
    if after > before:
        return f"fd leak: {after - before} fd(s)"
    return None


def _mutate(rng: random.Random, corpus: list[list[Any]],
            random_step: Callable[[random.Random], Any]) -> list[Any]:
    base = list(rng.choice(corpus))
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.3 and base:
            base[rng.randrange(len(base))] = random_step(rng)
        elif op < 0.6:
            base.insert(rng.randint(0, len(base)), random_step(rng))
        elif op < 0.8 and len(base) > 2:
            del base[rng.randrange(len(base))]
        else:
            other = rng.choice(corpus)
            cut = rng.randint(0, len(other))
            base = base[: rng.randint(0, len(base))] + other[cut:]
    return base[:120]


def fuzz(cases: int, seconds: float, seed: int = 0,
         progress: Callable[[FuzzReport], None] | None = None) -> FuzzReport:
    """Run up to ``cases`` cases within ``seconds`` (module docstring: coverage feedback)."""
    return coverage_loop(cases, seconds, seed, build_case, _random_step, run_steps, progress)


def coverage_loop(cases: int, seconds: float, seed: int,
                  build: Callable[[random.Random], list[Any]],
                  random_step: Callable[[random.Random], Any],
                  run: Callable[[list[Any]], str | None],
                  progress: Callable[[FuzzReport], None] | None = None) -> FuzzReport:
    """The coverage-guided loop shared by the fuzz targets (module docstring)."""
    rng = random.Random(seed)
    report = FuzzReport()
    seen: set[tuple[str, int]] = set()
    corpus: list[list[Step]] = []
    t0 = time.monotonic()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        fn = frame.f_code.co_filename
        if not any(t in fn for t in _TRACED):
            return None
        if event == "line":
            new.add((fn, frame.f_lineno))
        return tracer

    while report.cases < cases and time.monotonic() - t0 < seconds:
        steps = (build(rng) if not corpus or rng.random() < 0.3
                 else _mutate(rng, corpus, random_step))
        new: set[tuple[str, int]] = set()
        traced = report.cases % 4 == 0  # tracing costs ~5x: every 4th case feeds coverage
        if traced:
            sys.settrace(tracer)
        try:
            err = run(steps)
        finally:
            if traced:
                sys.settrace(None)
        report.cases += 1
        if err is not None:
            report.failures.append(f"case {report.cases - 1} (seed {seed}): {err}")
        if new - seen:
            seen |= new
            corpus.append(steps)
        if progress is not None and report.cases % 50 == 0:
            report.lines, report.corpus = len(seen), len(corpus)
            progress(report)
    report.lines, report.corpus = len(seen), len(corpus)
    report.seconds = time.monotonic() - t0
    return report
